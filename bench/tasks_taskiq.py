"""The async-latency workload on taskiq with taskiq-aio-pika, on the same RabbitMQ.

`taskiq worker bench.tasks_taskiq:broker --workers 1 --max-async-tasks 1000` (bench/peers.py).
The queues are classic, like every other peer's (taskiq-aio-pika declares quorum queues unless
told), with a direct exchange and a dead-letter queue of the bench's own names, so the bench can
delete them between runs. qos is the AMQP prefetch: BENCH_TASKIQ_QOS, else taskiq-aio-pika's 10.
"""

import os

from aio_pika import ExchangeType
from taskiq_aio_pika import AioPikaBroker, Exchange, Queue, QueueType

from bench import bodies

Q = "bench-taskiq"
DEAD = f"{Q}.dead"
broker = AioPikaBroker(
    url="amqp://guest:guest@127.0.0.1:5672/%2F",
    qos=int(os.environ.get("BENCH_TASKIQ_QOS", "10")),
    exchange=Exchange(name=Q, type=ExchangeType.DIRECT),
    task_queues=[Queue(name=Q, type=QueueType.CLASSIC)],
    dead_letter_queue=Queue(name=DEAD, type=QueueType.CLASSIC),
)

async_sleep_incr = broker.task(task_name="async_sleep_incr")(bodies.async_sleep_incr)
