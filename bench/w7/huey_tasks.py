"""W7, huey: the function, on Redis (results kept in huey's results hash)."""
import os

from huey import RedisHuey

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6399")
huey = RedisHuey("w7", url=URL + "/0")


@huey.task()
def echo(x):
    return x
