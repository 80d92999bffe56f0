import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench import bodies

Q = "bench-dramatiq"
# The publish workload's dramatiq-confirm peer: dramatiq's own publisher confirms (off by default).
broker = RabbitmqBroker(url="amqp://guest:guest@127.0.0.1:5672/%2F",
                        confirm_delivery=os.environ.get("BENCH_DRAMATIQ_CONFIRM") == "1")
dramatiq.set_broker(broker)

# max_retries=0: a failure would be a bench bug, not something to retry; same for every peer.
incr = dramatiq.actor(bodies.incr, actor_name="incr", queue_name=Q, max_retries=0)
sleep_incr = dramatiq.actor(bodies.sleep_incr, actor_name="sleep_incr", queue_name=Q, max_retries=0)
fib_incr = dramatiq.actor(bodies.fib_incr, actor_name="fib_incr", queue_name=Q, max_retries=0)
noop = dramatiq.actor(bodies.noop, actor_name="noop", queue_name=Q, max_retries=0)
