"""The Celery bridge's figures (docs/celery.md, "Speed"), on a private redis-server and a
private RabbitMQ node that this script starts (bench/private_redis.py,
bench/private_rabbitmq.py) and removes:

- ingest: N messages published by Celery's own `send_task` wait in the Celery broker before
  taskd starts (its queue paused, so nothing runs); the rate is the messages over the time
  from the first one in taskd's store (its `taskd_celery_ingested_total`, read from /metrics
  every 5 ms) until all N are, and on Redis until kombu's `unacked` is empty too (every
  message acknowledged after it was durable in taskd's store, SQLite);
- end to end: N `.delay()` calls of a trivial task, then `.get()` of each, timed from the
  first `.delay()` to the last result, through
    taskd exec    the bridge into a queue with `command = ["/bin/true"]` (a process a task),
    taskd worker  the bridge into a `worker` queue: long-lived Python workers running the
                  function registered under the Celery name (contrib/python's `App`),
    celery        Celery's own prefork worker (`celery worker --pool prefork`),
  each at the same concurrency C on the same broker, with the same result backend (Redis:
  its db 1; RabbitMQ: `rpc://`). The producers (`--producers`, one by default) are started,
  connected and warmed up (one task sent and its result read) before the clock starts.

Run with the bench venv's python (celery installed: bench/install.py makes it), after
`cargo build --release`:
    target/bench/venv/bin/python bench/celery_bridge.py [--n 10000] [--concurrency 4]
        [--brokers redis,amqp] [--only ingest,exec,worker,celery] [--producers 1]
Prints a line per figure with the load average (`/proc/loadavg`) when it was taken, and the
whole as one JSON line at the end.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from peers import free_port  # noqa: E402
from private_redis import Redis, log  # noqa: E402

ROOT = os.path.dirname(HERE)
TASKD = os.environ.get("TASKD_BIN") or os.path.join(ROOT, "target", "release", "taskd")
CONTRIB = os.path.join(ROOT, "contrib", "python")

TASKD_CONFIG = """
[taskd]
state_dir = "state"
listen = "127.0.0.1:{api}"
[queues.default]
{runner}
concurrency = {c}
[celery]
broker = "{broker}"
result_backend = "{backend}"
queues = ["celery"]
[celery.tasks]
"bench.*" = "default"
"""

RUNNERS = {
    "exec": 'command = ["/bin/true"]',
    "worker": 'worker = {argv}\nstart_secs = "0s"',
}

# The Celery app: the producers' and Celery's worker's (`bench.noop` returns None).
CELERY_APP = """
import os
from celery import Celery
app = Celery("bench", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
@app.task(name="bench.noop")
def noop():
    return None
"""

# The same function for taskd's worker queue, on contrib/python's App.
TASKD_WORKER = """
import sys
sys.path.insert(0, {contrib!r})
import taskd
app = taskd.App(queue="default")
@app.task(name="bench.noop")
def noop():
    return None
app.run()
"""

# One producer: connect, warm up, say ready, wait for "go", then N .delay() and every
# .get(); prints how long that took.
PRODUCER = """
import json, sys, time
from bench_app import noop
n = int(sys.argv[1])
noop.delay().get(timeout=120)
print("ready", flush=True)
sys.stdin.readline()
t = time.monotonic()
rs = [noop.delay() for _ in range(n)]
sent = time.monotonic() - t
for r in rs:
    r.get(timeout=600)
print(json.dumps({"sent": sent, "took": time.monotonic() - t}), flush=True)
"""


def load():
    return " ".join(open("/proc/loadavg").read().split()[:3])


class Broker:
    """The private broker of one run: its URL, result backend, and how to empty it."""

    def __init__(self, kind):
        self.kind = kind
        if kind == "redis":
            self.server = Redis(prefix="taskd-celery-bench-")
            base = f"redis://127.0.0.1:{self.server.port}"
            self.url, self.backend = base + "/0", base + "/1"
        else:
            from private_rabbitmq import RabbitMQ
            self.server = RabbitMQ()
            self.url, self.backend = self.server.url(), "rpc://"

    def reset(self):
        """An empty `celery` queue (declared, as a producer's first send leaves it)."""
        from kombu import Connection, Queue
        if self.kind == "redis":
            self.server.cli("FLUSHALL")
        with Connection(self.url) as conn:
            q = Queue("celery", routing_key="celery")(conn.default_channel)
            q.declare()
            q.purge()

    def close(self):
        self.server.close()


def env(broker):
    return dict(os.environ, BROKER=broker.url, BACKEND=broker.backend,
                PYTHONPATH=os.pathsep.join([CONTRIB, os.environ.get("PYTHONPATH", "")]))


def workdir(prefix):
    tmp = tempfile.mkdtemp(prefix=prefix)
    with open(os.path.join(tmp, "bench_app.py"), "w") as f:
        f.write(CELERY_APP)
    with open(os.path.join(tmp, "taskd_worker.py"), "w") as f:
        f.write(TASKD_WORKER.format(contrib=CONTRIB))
    return tmp


class Taskd:
    def __init__(self, tmp, broker, runner, c):
        self.tmp, self.api = tmp, free_port()
        self.config = os.path.join(tmp, "taskd.toml")
        argv = json.dumps([sys.executable, os.path.join(tmp, "taskd_worker.py")])
        with open(self.config, "w") as f:
            f.write(TASKD_CONFIG.format(api=self.api, runner=RUNNERS[runner].format(argv=argv), c=c,
                                        broker=broker.url, backend=broker.backend))
        self.env = env(broker)
        self.proc = None

    def cli(self, *args):
        subprocess.run([TASKD, "-c", self.config, *args], check=True, capture_output=True, env=self.env)

    def start(self):
        self.proc = subprocess.Popen([TASKD, "-c", self.config, "start"], cwd=self.tmp, env=self.env,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.tmp, "taskd.log"), "w"))

    def ingested(self):
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.api}/metrics", timeout=2).read().decode()
        except OSError:
            return 0
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("taskd_celery_ingested_total"))

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()


def ingest(broker, n, c):
    """Messages/s moved from the Celery broker into taskd's store."""
    from celery import Celery
    broker.reset()
    tmp = workdir("taskd-celery-bench-")
    app = Celery("bench", broker=broker.url, backend=broker.backend)
    t = time.monotonic()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task("bench.noop", producer=producer)
    took = time.monotonic() - t
    log(f"{broker.kind}: published {n} with send_task in {took:.1f}s ({n / took:.0f}/s)")
    d = Taskd(tmp, broker, "exec", c)
    d.cli("pause", "default")
    d.start()
    first = None
    deadline = time.monotonic() + 600
    try:
        while True:
            got = d.ingested()
            now = time.monotonic()
            if got and first is None:
                first = (now, got)
            if got >= n and (broker.kind != "redis" or int(broker.server.cli("-n", "0", "HLEN", "unacked") or 0) == 0):
                break
            if now > deadline:
                raise SystemExit(f"ingest: {got} of {n} after 600 s; see {tmp}/taskd.log")
            time.sleep(0.005)
        took = now - first[0]
        return (n - first[1]) / took, took
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def produce(broker, tmp, n, producers):
    """Start the producers, warm them up, then time N .delay() and their results."""
    e = env(broker)
    e["PYTHONPATH"] = os.pathsep.join([tmp, e["PYTHONPATH"]])
    share = [n // producers + (1 if i < n % producers else 0) for i in range(producers)]
    ps = [subprocess.Popen([sys.executable, "-c", PRODUCER, str(k)], cwd=tmp, env=e, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE) for k in share]
    for p in ps:
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"a producer did not get ready (warm-up task); see {tmp}")
    t = time.monotonic()
    for p in ps:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [json.loads(p.stdout.readline()) for p in ps]
    took = time.monotonic() - t
    for p in ps:
        p.wait()
    return n / took, took, max(o["sent"] for o in outs)


def end_to_end_taskd(broker, n, c, runner, producers):
    broker.reset()
    tmp = workdir("taskd-celery-bench-")
    d = Taskd(tmp, broker, runner, c)
    d.start()
    try:
        return produce(broker, tmp, n, producers)
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def end_to_end_celery(broker, n, c, producers):
    broker.reset()
    tmp = workdir("celery-bench-")
    w = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench_app", "worker", "--pool", "prefork",
                          "--concurrency", str(c), "-Q", "celery", "--without-gossip", "--without-mingle",
                          "--without-heartbeat", "--loglevel", "WARNING"],
                         cwd=tmp, env=env(broker), stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(tmp, "worker.log"), "w"))
    try:
        return produce(broker, tmp, n, producers)
    finally:
        w.terminate()
        w.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--producers", type=int, default=1)
    ap.add_argument("--brokers", default="redis,amqp")
    ap.add_argument("--only", default="ingest,exec,worker,celery")
    a = ap.parse_args()
    only = a.only.split(",")
    out = {"n": a.n, "concurrency": a.concurrency, "producers": a.producers}
    for kind in a.brokers.split(","):
        broker = Broker(kind)
        figures = out[kind] = {}
        try:
            if "ingest" in only:
                l = load()
                rate, took = ingest(broker, a.n, a.concurrency)
                figures["ingest"] = {"per_s": round(rate), "load": l}
                log(f"{kind}: ingest {a.n} messages: {rate:.0f}/s ({took:.2f}s; load {l})")
            for what in ("exec", "worker", "celery"):
                if what not in only:
                    continue
                l = load()
                if what == "celery":
                    rate, took, sent = end_to_end_celery(broker, a.n, a.concurrency, a.producers)
                else:
                    rate, took, sent = end_to_end_taskd(broker, a.n, a.concurrency, what, a.producers)
                figures[what] = {"per_s": round(rate), "load": l}
                log(f"{kind}: delay->get, {what} (concurrency {a.concurrency}): {rate:.0f}/s "
                    f"({took:.1f}s, sending took {sent:.1f}s; load {l})")
            if "celery" in figures:
                for what in ("exec", "worker"):
                    if what in figures:
                        figures[f"{what}_vs_celery"] = round(figures[what]["per_s"] / figures["celery"]["per_s"], 2)
        finally:
            broker.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
