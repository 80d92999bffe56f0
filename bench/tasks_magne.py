from bench import bodies
from magne import task

Q = "bench-magne"
incr = task(name="incr", queue=Q)(bodies.incr)
sleep_incr = task(name="sleep_incr", queue=Q)(bodies.sleep_incr)
fib_incr = task(name="fib_incr", queue=Q)(bodies.fib_incr)
noop = task(name="noop", queue=Q)(bodies.noop)
