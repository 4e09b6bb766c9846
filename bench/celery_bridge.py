"""The Celery bridge's figures (docs/celery.md, "Speed"), on a private redis-server and a
private RabbitMQ node that this script starts (bench/private_redis.py,
bench/private_rabbitmq.py) and removes:

- ingest: N messages (`--ingest-n`, default `--n`) published by Celery's own `send_task`
  (from `--producers` processes) wait in the Celery broker before taskd starts (its queue
  paused, so nothing runs); the rate is N over the time from the first message taken off
  the queue (its depth, read from the broker every 2 ms, drops below N) until the queue is
  empty, on Redis kombu's `unacked` too (every message acknowledged, which taskd does only
  after it is durable in its store, SQLite), and taskd's `taskd_celery_ingested_total`
  says N (read from /metrics only then: reading it every few ms loads the daemon measured);
- end to end: N `.delay()` calls of a trivial task and their results, spread over P producer
  processes (`--producers`, 4 by default: one Python producer cannot send faster than
  about 1,000/s, which bounded every figure), each sending its share and then reading the
  results as Celery's client reads a group's (`ResultSet(results).get()`), timed from the
  first `.delay()` to the last result, through
    taskd exec    the bridge into a queue with `command = ["/bin/true"]` (a process a task),
    taskd worker  the bridge into a `worker` queue: long-lived Python workers running the
                  function registered under the Celery name (contrib/python's `App`),
    celery        Celery's own prefork worker (`celery worker --pool prefork`),
  each at the same concurrency C on the same broker, with the same result backend (Redis:
  its db 1; RabbitMQ: `rpc://`). The producers are the same program for all three; they are
  started, connected and warmed up (one task sent and its result read) before the clock
  starts;
- producers: the same producers' `.delay()` calls alone, nothing consuming meanwhile (a
  Celery worker answers the warm-up task and is stopped before the clock starts): the
  ceiling of every end-to-end figure on this machine, whose cores the producers share
  with the consumers;
- drain: the consumer's own rate, with no producer competing: the same producers send N
  `.delay()` with nothing consuming (the queue fills), then the consumer starts (the taskd
  daemon with its worker queue, or Celery's prefork worker), timed from its start to the
  last result read by the producers (`ResultSet.join_native`, the path of `.get()`), and
  also from the first result read (the consumer's start-up left out);
- `--rounds R` takes each figure R times; `--against BIN` takes each figure with that other
  taskd binary too, alternating with TASKD_BIN round by round on the same broker node (so
  both builds see the same machine), and prints each build's median;
- `--cpu` (ingest): the CPU time taskd's threads (by name, from /proc/<pid>/task/*/stat) and
  the broker's server process spent from the first message taken to the last stored, per
  message;
- `--pin`: the producers on one CPU, everything else (the broker server, the taskd daemon
  and its workers or Celery's worker and its children, this script) on the others, by
  `os.sched_setaffinity` (inherited by children), identically for taskd and Celery.

Run with the bench venv's python (celery installed: bench/install.py makes it), after
`cargo build --release`:
    target/bench/venv/bin/python bench/celery_bridge.py [--n 10000] [--concurrency 4]
        [--brokers redis,amqp] [--only ingest,producers,exec,worker,celery,drain] [--producers 4]
        [--ingest-n N] [--pin] [--rounds R] [--against OTHER_TASKD] [--cpu]
Prints a line per figure with the load average (`/proc/loadavg`) before and after it was
taken, and the whole as one JSON line at the end.
"""
import argparse, contextlib, json, os, shutil, subprocess, sys, tempfile, time, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from peers import free_port, tree  # noqa: E402
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

# One producer: connect, warm up, say ready, wait for "go", then N .delay() and the results
# of all of them, read as Celery's client reads a group's (`ResultSet.get()`: on Redis one
# MGET for the results already there and the result channels for the others, on rpc:// the
# reply queue); prints how long that took. Identical for taskd and Celery.
PRODUCER = """
import json, sys, time
from celery.result import ResultSet
from bench_app import noop
n = int(sys.argv[1])
noop.delay().get(timeout=120)
print("ready", flush=True)
sys.stdin.readline()
t = time.monotonic()
rs = [noop.delay() for _ in range(n)]
sent = time.monotonic() - t
if sys.argv[2] == "drain":
    # The queue is full; the consumer starts now. CLOCK_MONOTONIC is system-wide, so the
    # parent compares these instants with its own.
    print("sent", flush=True)
    got = []
    ResultSet(rs).join_native(timeout=600, callback=lambda tid, v: got.append(time.monotonic()))
    assert len(got) == n, len(got)
    print(json.dumps({"first": got[0], "done": time.monotonic()}), flush=True)
    sys.exit(0)
if sys.argv[2] == "results":
    values = ResultSet(rs).get(timeout=600)
    assert len(values) == n and all(v is None for v in values), values[:5]
print(json.dumps({"sent": sent, "took": time.monotonic() - t}), flush=True)
"""


# With --pin: the CPUs of the producers; this script and everything else it starts runs on
# the others (set in main, inherited).
PRODUCER_CPUS = None


def producer_popen(args, **kw):
    """A producer process, on the producers' CPU with --pin."""
    cpus = PRODUCER_CPUS
    return subprocess.Popen(args, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None, **kw)


class BenchFailed(Exception):
    """A figure that could not be taken; its work directory (logs) is kept and named."""


@contextlib.contextmanager
def kept_on_failure(tmp):
    """Remove the work directory `tmp` after a figure, unless it failed: then it is kept (the
    taskd and Celery worker logs are there) and the error names it."""
    try:
        yield
    except BaseException as e:
        log(f"failed ({e}); its logs are kept in {tmp}")
        raise
    shutil.rmtree(tmp, ignore_errors=True)


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
        self.bin = TASKD
        self.tmp, self.api = tmp, free_port()
        self.config = os.path.join(tmp, "taskd.toml")
        argv = json.dumps([sys.executable, os.path.join(tmp, "taskd_worker.py")])
        with open(self.config, "w") as f:
            f.write(TASKD_CONFIG.format(api=self.api, runner=RUNNERS[runner].format(argv=argv), c=c,
                                        broker=broker.url, backend=broker.backend))
        self.env = env(broker)
        self.proc = None

    def cli(self, *args):
        subprocess.run([self.bin, "-c", self.config, *args], check=True, capture_output=True, env=self.env)

    def start(self):
        self.proc = subprocess.Popen([self.bin, "-c", self.config, "start"], cwd=self.tmp, env=self.env,
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


# One publisher of the pre-filled queue: N `send_task` on one connection.
PUBLISHER = """
import sys
from bench_app import app
with app.producer_or_acquire() as producer:
    for _ in range(int(sys.argv[1])):
        app.send_task("bench.noop", producer=producer)
"""


class Depth:
    """How many messages wait in the Celery queue, and (Redis) how many are taken and not
    acknowledged, read from the broker itself (reading taskd's /metrics every few ms would
    load the daemon being measured)."""

    def __init__(self, broker):
        self.kind = broker.kind
        if broker.kind == "redis":
            import redis
            self.r = redis.Redis.from_url(broker.url)
        else:
            from kombu import Connection
            self.conn = Connection(broker.url)
            self.ch = self.conn.default_channel

    def ready(self):
        if self.kind == "redis":
            return self.r.llen("celery")
        return self.ch.queue_declare("celery", passive=True).message_count

    def wait_for(self, n, secs=30):
        """The depth once it reached `n`, or after `secs`. A producer's last messages may
        still be on their way into the queue when it has sent them (its publishes are not
        confirmed), so one reading right after the producers may be short."""
        deadline = time.monotonic() + secs
        while (waiting := self.ready()) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return waiting

    def unacked(self):
        return self.r.hlen("unacked") if self.kind == "redis" else 0

    def close(self):
        if self.kind != "redis":
            self.conn.release()


TICK = os.sysconf("SC_CLK_TCK")


def _stat_ticks(path):
    """utime + stime (clock ticks) and the name from a /proc stat file, or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return name, int(fields[11]) + int(fields[12])


def taskd_threads(pid):
    """CPU ticks of each of taskd's threads, summed by thread name."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        got = _stat_ticks(f"/proc/{pid}/task/{t}/stat")
        if got:
            out[got[0]] = out.get(got[0], 0) + got[1]
    return out


def broker_ticks(broker):
    """CPU ticks of the broker server's processes (RabbitMQ: beam.smp and its helpers)."""
    root = broker.server.server.pid if broker.kind == "amqp" else broker.server.proc.pid
    return sum(got[1] for p in tree(root) if (got := _stat_ticks(f"/proc/{p}/stat")))


def cpu_per_message(before, after, n):
    """{name: µs per message} between two readings ({name: ticks})."""
    return {k: round((after.get(k, 0) - before.get(k, 0)) / TICK * 1e6 / n, 1)
            for k in sorted(after, key=lambda k: before.get(k, 0) - after.get(k, 0))
            if after.get(k, 0) > before.get(k, 0)}


def ingest(broker, n, c, producers, cpu=None):
    """Messages/s moved from the Celery broker into taskd's store: from the first message
    taken off the pre-filled queue (its depth drops below N) until all N are in taskd's store
    and acknowledged (the queue is empty, on Redis kombu's `unacked` too, and taskd's
    `taskd_celery_ingested_total` says N). With `cpu` (a dict), the CPU each taskd thread and
    the broker server spent meanwhile, in µs per message, is put there."""
    broker.reset()
    tmp = workdir("taskd-celery-bench-")
    e = env(broker)
    e["PYTHONPATH"] = os.pathsep.join([tmp, e["PYTHONPATH"]])
    t = time.monotonic()
    share = [n // producers + (1 if i < n % producers else 0) for i in range(producers)]
    ps = [producer_popen([sys.executable, "-c", PUBLISHER, str(k)], cwd=tmp, env=e) for k in share]
    if any(p.wait() != 0 for p in ps):
        raise SystemExit("a publisher failed")
    took = time.monotonic() - t
    depth = Depth(broker)
    waiting = depth.wait_for(n)
    if waiting != n:
        depth.close()
        raise BenchFailed(f"ingest: the queue holds {waiting} messages, not {n}")
    log(f"{broker.kind}: published {n} with send_task in {took:.1f}s ({n / took:.0f}/s, {producers} processes)")
    d = Taskd(tmp, broker, "exec", c)
    d.cli("pause", "default")
    d.start()
    deadline = time.monotonic() + 600
    with kept_on_failure(tmp):
        try:
            while depth.ready() >= n:
                if time.monotonic() > deadline:
                    raise BenchFailed("ingest: nothing taken after 600 s")
                time.sleep(0.002)
            first = time.monotonic()
            if cpu is not None:
                threads0, broker0 = taskd_threads(d.proc.pid), broker_ticks(broker)
            while depth.ready() > 0 or depth.unacked() > 0:
                if time.monotonic() > deadline:
                    raise BenchFailed("ingest: not done after 600 s")
                time.sleep(0.002)
            while d.ingested() < n:
                if time.monotonic() > deadline:
                    raise BenchFailed(f"ingest: {d.ingested()} of {n} after 600 s")
                time.sleep(0.002)
            took = time.monotonic() - first
            if cpu is not None:
                cpu.update(cpu_per_message(threads0, taskd_threads(d.proc.pid), n))
                cpu["broker server"] = round((broker_ticks(broker) - broker0) / TICK * 1e6 / n, 1)
            return n / took, took
        finally:
            depth.close()
            d.stop()


def start_producers(broker, tmp, n, producers, mode):
    """P producer processes sharing N `.delay()` calls (`mode`: "results", "send" or "drain",
    as PRODUCER reads it), each connected and warmed up (one task sent and its result read)
    when this returns; each waits for "go" on its stdin."""
    e = env(broker)
    e["PYTHONPATH"] = os.pathsep.join([tmp, e["PYTHONPATH"]])
    share = [n // producers + (1 if i < n % producers else 0) for i in range(producers)]
    ps = [producer_popen([sys.executable, "-c", PRODUCER, str(k), mode], cwd=tmp, env=e, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE) for k in share]
    for p in ps:
        if p.stdout.readline().strip() != "ready":
            for q in ps:
                kill(q)
            raise BenchFailed("a producer did not get ready (warm-up task)")
    return ps


def go(ps):
    for p in ps:
        p.stdin.write("go\n")
        p.stdin.flush()


def stop(proc):
    """Stop a consumer as its user would (SIGTERM: a warm shutdown), and wait for it."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait()


def kill(proc):
    """A producer still running after its figure failed: killed, so that it holds no
    connection and no reply queue into the next figure."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def produce(broker, tmp, n, producers, results=True, before=None):
    """Start the producers, warm them up, call `before` (if any), then time N .delay() and
    their results (or, with `results` false, the sending alone)."""
    ps = start_producers(broker, tmp, n, producers, "results" if results else "send")
    try:
        if before:
            before()
        t = time.monotonic()
        go(ps)
        outs = [json.loads(p.stdout.readline()) for p in ps]
        took = time.monotonic() - t
        for p in ps:
            p.wait()
        return n / took, took, max(o["sent"] for o in outs)
    finally:
        for p in ps:
            kill(p)


def end_to_end_taskd(broker, n, c, runner, producers):
    broker.reset()
    tmp = workdir("taskd-celery-bench-")
    d = Taskd(tmp, broker, runner, c)
    d.start()
    with kept_on_failure(tmp):
        try:
            return produce(broker, tmp, n, producers)
        finally:
            d.stop()


def producers_alone(broker, n, c, producers):
    """The producers' own ceiling: N .delay() with a Celery worker only for the warm-up
    task, stopped before the clock starts, so nothing consumes meanwhile."""
    broker.reset()
    tmp = workdir("celery-bench-")
    w = celery_worker(broker, tmp, "solo", 1)
    with kept_on_failure(tmp):
        try:
            return produce(broker, tmp, n, producers, results=False, before=lambda: stop(w))
        finally:
            stop(w)


def celery_worker(broker, tmp, pool, c):
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench_app", "worker", "--pool", pool,
                             "--concurrency", str(c), "-Q", "celery", "--without-gossip", "--without-mingle",
                             "--without-heartbeat", "--loglevel", "WARNING"],
                            cwd=tmp, env=env(broker), stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(tmp, f"worker-{pool}.log"), "w"))


def drain(broker, n, c, producers, consumer):
    """The consumer's own rate: the producers fill the queue with N `.delay()` (a solo Celery
    worker answers their warm-up task and is stopped first), then the consumer (`worker`: the
    taskd daemon with a worker queue; `celery`: Celery's prefork worker) starts; timed from its
    start, and from the first result read, to the last result read."""
    broker.reset()
    tmp = workdir("drain-bench-")
    warm = celery_worker(broker, tmp, "solo", 1)
    consumer_proc, d, ps = None, None, []
    with kept_on_failure(tmp):
        try:
            ps = start_producers(broker, tmp, n, producers, "drain")
            stop(warm)
            go(ps)
            for p in ps:
                if p.stdout.readline().strip() != "sent":
                    raise BenchFailed("a producer did not send")
            depth = Depth(broker)
            try:
                waiting = depth.wait_for(n)
            finally:
                depth.close()
            if waiting != n:
                raise BenchFailed(f"drain: the queue holds {waiting} messages, not {n}")
            t = time.monotonic()
            if consumer == "celery":
                consumer_proc = celery_worker(broker, tmp, "prefork", c)
            else:
                d = Taskd(tmp, broker, "worker", c)
                d.start()
            outs = [json.loads(p.stdout.readline()) for p in ps]
            for p in ps:
                p.wait()
            done = max(o["done"] for o in outs)
            first = min(o["first"] for o in outs)
            return n / (done - t), done - t, n / (done - first), first - t
        finally:
            for p in ps:
                kill(p)
            stop(warm)
            stop(consumer_proc)
            if d:
                d.stop()


def end_to_end_celery(broker, n, c, producers):
    broker.reset()
    tmp = workdir("celery-bench-")
    w = celery_worker(broker, tmp, "prefork", c)
    with kept_on_failure(tmp):
        try:
            return produce(broker, tmp, n, producers)
        finally:
            stop(w)


def figures_of(broker, kind, a, only):
    """Every figure `only` names, on `broker`, with the taskd binary TASKD names now."""
    figures = {}
    if "ingest" in only:
        l = load()
        cpu = {} if a.cpu else None
        rate, took = ingest(broker, a.ingest_n or a.n, a.concurrency, a.producers, cpu)
        after = load()
        figures["ingest"] = {"per_s": round(rate), "load": l, "load_after": after}
        log(f"{kind}: ingest {a.ingest_n or a.n} messages: {rate:.0f}/s ({took:.2f}s; load {l} -> {after})")
        if cpu is not None:
            figures["ingest"]["cpu_us_per_message"] = cpu
            log(f"{kind}: ingest CPU per message (µs): " + ", ".join(f"{k} {v}" for k, v in cpu.items()))
    for what in ("producers", "exec", "worker", "celery"):
        if what not in only:
            continue
        l = load()
        if what == "producers":
            rate, took, sent = producers_alone(broker, a.n, a.concurrency, a.producers)
        elif what == "celery":
            rate, took, sent = end_to_end_celery(broker, a.n, a.concurrency, a.producers)
        else:
            rate, took, sent = end_to_end_taskd(broker, a.n, a.concurrency, what, a.producers)
        after = load()
        figures[what] = {"per_s": round(rate), "sending_s": round(sent, 2), "load": l, "load_after": after}
        step = "delay alone, nothing consuming" if what == "producers" else "delay->result"
        log(f"{kind}: {step}, {what} (concurrency {a.concurrency}, {a.producers} producers): "
            f"{rate:.0f}/s ({took:.1f}s, sending took {sent:.1f}s; load {l} -> {after})")
    if "drain" in only:
        for what in ("worker", "celery"):
            l = load()
            rate, took, rate_first, start = drain(broker, a.n, a.concurrency, a.producers, what)
            after = load()
            figures[f"drain_{what}"] = {"per_s": round(rate), "per_s_after_first": round(rate_first),
                                        "first_result_s": round(start, 2), "load": l, "load_after": after}
            log(f"{kind}: drain {a.n} queued, {what} (concurrency {a.concurrency}): {rate:.0f}/s from its "
                f"start ({took:.1f}s, first result after {start:.1f}s), {rate_first:.0f}/s from the first "
                f"result; load {l} -> {after}")
        if "drain_celery" in figures:
            figures["drain_worker_vs_celery"] = round(
                figures["drain_worker"]["per_s"] / figures["drain_celery"]["per_s"], 2)
    if "celery" in figures:
        for what in ("exec", "worker"):
            if what in figures:
                figures[f"{what}_vs_celery"] = round(figures[what]["per_s"] / figures["celery"]["per_s"], 2)
    return figures


def median(xs):
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def main():
    global TASKD
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--ingest-n", type=int, default=0, help="messages for the ingest figure (default: --n)")
    ap.add_argument("--brokers", default="redis,amqp")
    ap.add_argument("--only", default="ingest,producers,exec,worker,celery,drain")
    ap.add_argument("--pin", action="store_true",
                    help="producers on one CPU; broker, consumers and this script on the others")
    ap.add_argument("--rounds", type=int, default=1, help="take each figure this many times")
    ap.add_argument("--against", metavar="TASKD",
                    help="another taskd binary, measured in turn with TASKD_BIN round by round")
    ap.add_argument("--cpu", action="store_true",
                    help="ingest: CPU per message of each taskd thread and of the broker server")
    a = ap.parse_args()
    only = a.only.split(",")
    out = {"n": a.n, "concurrency": a.concurrency, "producers": a.producers, "pin": None}
    if a.pin:
        global PRODUCER_CPUS
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs two CPUs")
        PRODUCER_CPUS = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))
        out["pin"] = {"producers": cpus[:1], "rest": cpus[1:]}
        log(f"pinned: producers on CPU {cpus[0]}; broker, consumers and this script on CPU {cpus[1:]}")
    builds = [("taskd", TASKD)] + ([("against", a.against)] if a.against else [])
    for kind in a.brokers.split(","):
        broker = Broker(kind)
        try:
            if a.rounds == 1 and not a.against:
                out[kind] = figures_of(broker, kind, a, only)
                continue
            runs = out[kind] = {label: {"binary": path, "rounds": []} for label, path in builds}
            for r in range(a.rounds):
                # ABBA…: neither build always goes first after the other.
                for label, path in (builds if r % 2 == 0 else builds[::-1]):
                    TASKD = path
                    log(f"{kind}: round {r + 1} of {a.rounds}, {label} ({path})")
                    runs[label]["rounds"].append(figures_of(broker, kind, a, only))
            for label, run in runs.items():
                rates = {}
                for fig in run["rounds"]:
                    for what, v in fig.items():
                        if isinstance(v, dict):
                            rates.setdefault(what, []).append(v["per_s"])
                run["median_per_s"] = {what: median(v) for what, v in rates.items()}
                log(f"{kind}: {label} medians over {a.rounds} rounds: "
                    + ", ".join(f"{w} {m:.0f}/s {sorted(rates[w])}" for w, m in run["median_per_s"].items()))
            if a.against:
                out[kind]["ratio"] = {w: round(m / runs["against"]["median_per_s"][w], 3)
                                      for w, m in runs["taskd"]["median_per_s"].items()
                                      if runs["against"]["median_per_s"].get(w)}
                log(f"{kind}: taskd / against, by the medians: {out[kind]['ratio']}")
        finally:
            broker.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
