"""The Celery peer of bench/bench.py: one task that runs the given argv through subprocess,
capturing its output as taskd does, with a Redis broker and Redis result backend.
BENCH_REDIS_URL names the throwaway redis-server the harness started (db 0 is the broker,
db 1 the results). The worker runs as
    celery -A celery_app worker --pool prefork --concurrency N -Q <queue>"""
import os, subprocess

from celery import Celery

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6399")
app = Celery("bench", broker=URL + "/0", backend=URL + "/1")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
)


@app.task(name="bench.run")
def run(argv):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True).returncode
