"""The Celery bridge's figures (docs/performance.md, "Celery bridge"), on a private
redis-server:

- ingest: N messages published by Celery's own `send_task` wait in Redis before taskd
  starts (its queue paused, so nothing runs); the rate is N over the time from the daemon's
  start until the Celery queue and kombu's `unacked` are empty, every message acknowledged
  and durable in taskd's store (SQLite);
- end to end: N `.delay()` calls of a trivial task, then every `.get()`, through taskd (an
  exec queue running `true`-like python, concurrency C) and through Celery's prefork worker
  at the same concurrency, on the same Redis.

Run with the bench venv's python (celery installed), after `cargo build --release`:
    target/bench/venv/bin/python bench/celery_bridge.py [--n 10000] [--concurrency 4]
"""
import argparse, json, os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from private_redis import Redis, log  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKD = os.path.join(ROOT, "target", "release", "taskd")

CONFIG = """
[taskd]
state_dir = "state"
[queues.default]
shell = "true"
concurrency = {c}
[celery]
broker = "{url}/0"
result_backend = "{url}/1"
[celery.tasks]
"bench.*" = "default"
"""

CELERY_APP = """
import os
from celery import Celery
app = Celery("bench", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
@app.task(name="bench.noop")
def noop():
    return None
"""


def publish(app, n):
    t = time.monotonic()
    rs = [app.send_task("bench.noop") for _ in range(n)]
    return rs, time.monotonic() - t


def start_taskd(tmp):
    log_file = open(os.path.join(tmp, "taskd.log"), "w")
    p = subprocess.Popen([TASKD, "-c", os.path.join(tmp, "taskd.toml"), "start"], cwd=tmp,
                         stdout=subprocess.DEVNULL, stderr=log_file)
    return p


def ingest(redis, n, c):
    from celery import Celery
    tmp = tempfile.mkdtemp(prefix="taskd-celery-bench-")
    base = f"redis://127.0.0.1:{redis.port}"
    open(os.path.join(tmp, "taskd.toml"), "w").write(CONFIG.format(c=c, url=base))
    subprocess.run([TASKD, "-c", os.path.join(tmp, "taskd.toml"), "pause", "default"],
                   check=True, capture_output=True)
    app = Celery("bench", broker=base + "/0", backend=base + "/1")
    _, took = publish(app, n)
    log(f"published {n} with send_task in {took:.1f}s ({n / took:.0f}/s)")
    t0 = time.monotonic()
    p = start_taskd(tmp)
    while True:
        left = int(redis.cli("-n", "0", "LLEN", "celery") or 0) + int(redis.cli("-n", "0", "HLEN", "unacked") or 0)
        if left == 0:
            break
        time.sleep(0.01)
    took = time.monotonic() - t0
    p.terminate()
    p.wait()
    return n / took, took


def end_to_end_taskd(redis, n, c):
    from celery import Celery
    tmp = tempfile.mkdtemp(prefix="taskd-celery-bench-")
    base = f"redis://127.0.0.1:{redis.port}"
    redis.cli("FLUSHALL")
    open(os.path.join(tmp, "taskd.toml"), "w").write(CONFIG.format(c=c, url=base))
    p = start_taskd(tmp)
    time.sleep(1)  # its start: not what is measured
    app = Celery("bench", broker=base + "/0", backend=base + "/1")
    t0 = time.monotonic()
    rs, _ = publish(app, n)
    for r in rs:
        r.get(timeout=600)
    took = time.monotonic() - t0
    p.terminate()
    p.wait()
    return n / took, took


def end_to_end_celery(redis, n, c):
    from celery import Celery
    tmp = tempfile.mkdtemp(prefix="celery-bench-")
    base = f"redis://127.0.0.1:{redis.port}"
    redis.cli("FLUSHALL")
    open(os.path.join(tmp, "bench_app.py"), "w").write(CELERY_APP)
    env = dict(os.environ, BROKER=base + "/0", BACKEND=base + "/1")
    w = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench_app", "worker", "--pool", "prefork",
                          "--concurrency", str(c), "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
                         cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "w.log"), "w"))
    time.sleep(3)  # its start: not what is measured
    app = Celery("bench", broker=base + "/0", backend=base + "/1")
    t0 = time.monotonic()
    rs, _ = publish(app, n)
    for r in rs:
        r.get(timeout=600)
    took = time.monotonic() - t0
    w.terminate()
    w.wait()
    return n / took, took


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    redis = Redis(prefix="taskd-celery-bench-")
    try:
        load = open("/proc/loadavg").read().split()[:3]
        rate, took = ingest(redis, a.n, a.concurrency)
        log(f"ingest: {a.n} messages in {took:.2f}s = {rate:.0f}/s (load {' '.join(load)})")
        tr, tt = end_to_end_taskd(redis, a.n, a.concurrency)
        log(f"delay->get, taskd bridge (shell queue, concurrency {a.concurrency}): {tr:.0f}/s ({tt:.1f}s)")
        cr, ct = end_to_end_celery(redis, a.n, a.concurrency)
        log(f"delay->get, Celery prefork (concurrency {a.concurrency}): {cr:.0f}/s ({ct:.1f}s)")
        print(json.dumps({"n": a.n, "concurrency": a.concurrency, "ingest_per_s": round(rate),
                          "taskd_per_s": round(tr), "celery_per_s": round(cr),
                          "ratio": round(tr / cr, 2), "load": load}))
    finally:
        redis.close()


if __name__ == "__main__":
    main()
