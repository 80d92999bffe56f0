"""A celery app standing in for the old celery workers (tests/e2e/test_migration.py): its task records each run
like tests/support/migration_tasks.py does, and counts its own runs in PREFIX:old."""

import os
import time

import redis
from celery import Celery

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
KEY = os.environ["MAGNE_TEST_KEY"]
r = redis.Redis(host="127.0.0.1", port=6379)
app = Celery("migration_celery", broker=os.environ["MAGNE_TEST_CELERY_URL"])
app.conf.task_default_queue = f"{PREFIX}.cel"
app.conf.worker_prefetch_multiplier = 1
app.conf.worker_hijack_root_logger = False
app.conf.worker_enable_remote_control = False  # no pidbox queue or exchange left on the shared broker


@app.task(name="mig.crecord")
def crecord(n, sleep=0.0):
    time.sleep(sleep)
    r.hincrby(KEY, str(n), 1)
    r.hincrby(f"{PREFIX}:old", "runs", 1)
