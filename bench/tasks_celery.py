import os

from celery import Celery

from bench import bodies

Q = "bench-celery"
app = Celery("bench", broker="amqp://guest:guest@127.0.0.1:5672//")
app.conf.update(
    task_default_queue=Q,
    task_acks_late=True,  # ack after the task, as magne and dramatiq do
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_MULTIPLIER", "4")),  # celery's default is 4
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

incr = app.task(name="incr")(bodies.incr)
sleep_incr = app.task(name="sleep_incr")(bodies.sleep_incr)
fib_incr = app.task(name="fib_incr")(bodies.fib_incr)
noop = app.task(name="noop")(bodies.noop)
