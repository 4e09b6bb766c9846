"""W7, Celery: the function, with a Redis broker (db 0) and result backend (db 1)."""
import os

from celery import Celery

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6399")
app = Celery("w7", broker=URL + "/0", backend=URL + "/1")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue="w7",
)


@app.task(name="w7.echo")
def echo(x):
    return x
