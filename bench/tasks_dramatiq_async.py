"""The async-latency workload on dramatiq: an async actor run by its AsyncIO middleware.

Its own broker and queue (not bench.tasks_dramatiq's), so the sync peers keep the middleware
stack they ship with. Each worker thread waits for its coroutine on the middleware's one
event-loop thread, so 1,000 in flight takes --threads 1000 (bench/peers.py).
"""

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware.asyncio import AsyncIO

from bench import bodies

Q = "bench-dramatiq-async"
broker = RabbitmqBroker(url="amqp://guest:guest@127.0.0.1:5672/%2F")
broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)

async_sleep_incr = dramatiq.actor(bodies.async_sleep_incr, actor_name="async_sleep_incr", queue_name=Q,
                                  max_retries=0, broker=broker)
