"""Prometheus metrics: `magne worker --metrics HOST:PORT` (off unless asked).

Imported only when --metrics is given: with metrics off, prometheus_client is never
imported and nothing here runs.

How the figures are kept, and who pays for them:
- The I/O thread never touches a prometheus_client metric (their inc() takes a lock, and the
  I/O thread must never take a lock that task code can take). It keeps plain ints in
  magne/io/stats.py (`Stats`, and `Tally` with --metrics), which `WorkerCollector` reads at
  scrape time, on the HTTP server's thread.
- Task durations are counted by `TaskMetrics`, a hook (magne.hooks) on the pool threads. It
  keeps one plain tally per thread (no lock: each thread writes only its own; measured, a
  prometheus_client Histogram.observe() costs about 1 us, this about 0.3 us), summed at scrape.
- Gauges (tasks running, messages waiting, threads, copies pending) are read from the pool, the
  work queue and the I/O thread's state at scrape: nothing per message.
- Process CPU and memory: prometheus_client's own ProcessCollector.

Label cardinality is bounded: queues are the consumed ones, tasks the registered ones (a
message naming anything else counts as task="unknown"), causes and outcomes fixed sets, and
`slot` the pool's thread slots. A message can never create a series.

Under `--processes P` (supervisor aggregation, `SupervisorMetrics`): each child serves its own
metrics on an ephemeral 127.0.0.1 port and reports the port to the supervisor over the pipe it
already reports "ready" on; the supervisor's endpoint (the one HOST:PORT) scrapes the children
and shows every series per process (`process="1"`...) and summed (`process="all"`). Why this
and not prometheus_client's multiprocess mode (a directory of mmap files, the route dramatiq
took): that mode needs every counter to be a prometheus_client value (a lock and a write to an
mmap per increment, on the I/O thread: ruled out above), it cannot hold custom collectors such as
ours, its files must be wiped between runs and pile up with restarts (dramatiq #309 and #127 are
its lock and file troubles), and its gauges need a mode per metric. Aggregating in the supervisor
keeps each process's counters as plain ints and costs the children nothing until a scrape.

Counters never go backwards across restarts: when a child goes away, the supervisor adds its
last counter values to an offset for its process slot, so `process="1"` and the sums continue
from there instead of dropping to the new child's zero (Prometheus would read a drop as a
reset; `rate()` copes, but a dashboard's raw totals would not). The last values come from the
file a child writes as it exits (MAGNE_METRICS_FINAL: exact for every exit but SIGKILL and
hard crashes) or else from the supervisor's last scrape of it, which it refreshes every
REFRESH seconds: at most that much of a killed child's counts is missing from the totals,
and nothing is ever counted twice. Gauges of a dead child simply disappear.
"""

from magne.metrics.base import CHILD_TIMEOUT, DURATION_BUCKETS, FINAL_ENV, REFRESH, parse_listen, serve, url_of
from magne.metrics.coordination import CoordinationCollector
from magne.metrics.supervisor import SupervisorMetrics, _Own, parse
from magne.metrics.tasks import TaskMetrics
from magne.metrics.worker import WorkerCollector, WorkerMetrics

__all__ = ["CHILD_TIMEOUT", "CoordinationCollector", "DURATION_BUCKETS", "FINAL_ENV", "REFRESH", "SupervisorMetrics",
           "TaskMetrics", "WorkerCollector", "WorkerMetrics", "_Own", "parse", "parse_listen", "serve", "url_of"]
