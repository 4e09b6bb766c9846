"""W7, Dramatiq: the actor, on a Redis broker (db 0) with its results middleware (db 1)."""
import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6399")
broker = RedisBroker(url=URL + "/0")
broker.add_middleware(Results(backend=RedisBackend(url=URL + "/1")))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="w7", store_results=True, max_retries=0)
def echo(x):
    return x
