"""W7, "a Python function per task": N calls of a trivial function (it returns its argument)
enqueued from one Python thread, each tool's own way, and run by each tool's worker at
concurrency C; taskd (taskd.App over the API's Unix socket, its long-lived Python workers)
against Celery (prefork, Redis broker and result backend), RQ, Dramatiq and huey (Redis).

For each tool and concurrency: enqueue calls/s (N calls from one thread, nothing consuming),
then the pre-filled queue is run (taskd: the queue paused during the enqueue, then resumed;
the peers: their workers started after the enqueue) and its end-to-end rate measured from
the first result stored to the last ((N-1)/span, so no tool pays for its start-up), with
the peak PSS of every process of its worker side (taskd: the daemon and its workers; a
peer: its worker processes, Redis reported apart).

Run with the bench venv's python (bench/w7_run installs it):
    target/bench/venv/bin/python bench/w7.py [--n 20000] [--concurrency 2,8] [--tools taskd,taskd-fork,celery,rq,dramatiq,huey]

`taskd-fork` is taskd with `worker_fork = true`: the workers are forked from one loaded
parent, whose PSS is counted with them (it is in the daemon's process tree).
"""
import argparse, json, os, shutil, socket, subprocess, sys, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TASKS = os.path.join(HERE, "w7")
sys.path.insert(0, HERE)
sys.path.insert(0, TASKS)
sys.path.insert(0, os.path.join(ROOT, "contrib", "python"))

import peers  # noqa: E402  (the throwaway Redis, /proc helpers)

PYTHONPATH = os.pathsep.join([TASKS, os.path.join(ROOT, "contrib", "python")])


class Peak:
    """The peak PSS (KiB) of the process trees `roots()` names, sampled every 0.2 s."""

    def __init__(self, roots):
        self.roots = roots
        self.kib = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            pids = [p for r in self.roots() for p in peers.tree(r)]
            self.kib = max(self.kib, peers.pss_kib(pids))
            self._stop.wait(0.2)

    def stop(self):
        self._stop.set()
        self._t.join()
        return self.kib


def timed_enqueue(n, one):
    start = time.perf_counter()
    for i in range(n):
        one(i)
    return n / (time.perf_counter() - start)


def drain(n, done, deadline=900):
    """Polls done() every 10 ms until it reaches n; the end-to-end rate from the first
    result seen to the last."""
    first = None
    end = time.monotonic() + deadline
    while True:
        d = done()
        now = time.perf_counter()
        if d > 0 and first is None:
            first = now
        if d >= n:
            return (n - 1) / (now - first) if now > first else float("nan")
        if time.monotonic() > end:
            raise RuntimeError(f"only {d} of {n} tasks done after {deadline}s")
        time.sleep(0.01)


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            for q in reversed(peers.tree(p.pid)):
                try:
                    os.kill(q, 9)
                except OSError:
                    pass
            p.wait()


def spawn(args, log, env=None):
    return subprocess.Popen(args, cwd=TASKS, env=dict(os.environ, PYTHONPATH=PYTHONPATH, **(env or {})),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=peers._die_with_parent)


def vbin(name):
    return os.path.join(os.path.dirname(sys.executable), name)


# --- taskd ------------------------------------------------------------------------------

def run_taskd(n, c, taskd_bin, tmp, fork=False):
    """taskd; `fork`: the queue's workers are forked from one loaded parent (`worker_fork`)."""
    import taskd, taskd_tasks
    d = tempfile.mkdtemp(prefix="w7-taskd-", dir=tmp)
    sock = os.path.join(d, "api.sock")
    cfg = os.path.join(d, "taskd.toml")
    with open(cfg, "w") as f:
        f.write(f"""[taskd]
state_dir = "state"
listen = "unix:{sock}"

[queues.w7]
worker = [{json.dumps(sys.executable)}, {json.dumps(os.path.join(TASKS, "taskd_tasks.py"))}]
concurrency = {c}
worker_fork = {"true" if fork else "false"}
env = {{ PYTHONPATH = {json.dumps(PYTHONPATH)} }}
""")
    log = open(os.path.join(d, "daemon.log"), "w")
    daemon = subprocess.Popen([taskd_bin, "-c", cfg, "start"], stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, preexec_fn=peers._die_with_parent)
    try:
        client = taskd.Client("unix:" + sock)
        deadline = time.monotonic() + 60
        while True:
            try:
                ws = [w for w in client.queues()["workers"] if w["queue"] == "w7"]
                if len(ws) == c and all(w["state"] == "running" for w in ws):
                    break
            except taskd.Error:
                pass
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError("taskd did not start its workers: see " + log.name)
            time.sleep(0.05)
        taskd_tasks.app._client = client
        client._transport.request("POST", "/api/v1/queues/w7/pause")
        enq = timed_enqueue(n, lambda i: taskd_tasks.echo.delay(i))
        peak = Peak(lambda: [daemon.pid])

        def done():
            q = [x for x in client.queues()["queues"] if x["queue"] == "w7"][0]
            return q["counts"]["succeeded"]

        client._transport.request("POST", "/api/v1/queues/w7/resume")
        rate = drain(n, done)
        return {"enqueue_per_s": enq, "tasks_per_s": rate, "worker_pss_kib": peak.stop(), "broker_kib": None}
    finally:
        stop([daemon])
        log.close()
        shutil.rmtree(d, ignore_errors=True)


# --- the peers, on one Redis flushed between runs -----------------------------------------

def run_celery(n, c, redis, tmp):
    import celery_tasks
    enq = timed_enqueue(n, lambda i: celery_tasks.echo.delay(i))
    results = redis.client(1)
    log = open(os.path.join(tmp, f"celery-{c}.log"), "w")
    w = spawn([vbin("celery"), "-A", "celery_tasks", "worker", "--pool", "prefork", "--concurrency", str(c),
               "-Q", "w7", "--without-gossip", "--without-mingle", "--without-heartbeat",
               "--loglevel", "WARNING"], log)
    peak = Peak(lambda: [w.pid])
    try:
        rate = drain(n, results.dbsize)
    finally:
        kib = peak.stop()
        stop([w])
    return {"enqueue_per_s": enq, "tasks_per_s": rate, "worker_pss_kib": kib}


def run_rq(n, c, redis, tmp):
    import rq, rq_tasks
    q = rq.Queue("w7", connection=redis.client(0))
    enq = timed_enqueue(n, lambda i: q.enqueue(rq_tasks.echo, i))
    log = open(os.path.join(tmp, f"rq-{c}.log"), "w")
    ws = [spawn([vbin("rq"), "worker", "w7", "--url", redis.url + "/0", "--quiet"], log) for _ in range(c)]
    peak = Peak(lambda: [w.pid for w in ws])
    r = redis.client(0)
    try:
        rate = drain(n, lambda: r.zcard("rq:finished:w7"))
    finally:
        kib = peak.stop()
        stop(ws)
    return {"enqueue_per_s": enq, "tasks_per_s": rate, "worker_pss_kib": kib}


def run_dramatiq(n, c, redis, tmp):
    import dramatiq_tasks
    enq = timed_enqueue(n, lambda i: dramatiq_tasks.echo.send(i))
    log = open(os.path.join(tmp, f"dramatiq-{c}.log"), "w")
    w = spawn([vbin("dramatiq"), "dramatiq_tasks", "--processes", str(c), "--threads", "1",
               "--queues", "w7"], log)
    peak = Peak(lambda: [w.pid])
    results = redis.client(1)
    try:
        rate = drain(n, results.dbsize)
    finally:
        kib = peak.stop()
        stop([w])
    return {"enqueue_per_s": enq, "tasks_per_s": rate, "worker_pss_kib": kib}


def run_huey(n, c, redis, tmp):
    import huey_tasks
    enq = timed_enqueue(n, lambda i: huey_tasks.echo(i))
    log = open(os.path.join(tmp, f"huey-{c}.log"), "w")
    w = spawn([vbin("huey_consumer"), "huey_tasks.huey", "-w", str(c), "-k", "process", "-q"], log)
    peak = Peak(lambda: [w.pid])
    r = redis.client(0)
    try:
        rate = drain(n, lambda: r.hlen("huey.results.w7"))
    finally:
        kib = peak.stop()
        stop([w])
    return {"enqueue_per_s": enq, "tasks_per_s": rate, "worker_pss_kib": kib}


class SharedRedis:
    def __init__(self):
        path = shutil.which("redis-server")
        if not path:
            raise RuntimeError("no redis-server (apt-get install redis-server)")
        self.server = peers.Redis(path)
        self.url = self.server.url
        self.port = self.server.port
        os.environ["BENCH_REDIS_URL"] = self.url

    def client(self, db):
        import redis
        return redis.Redis(port=self.port, db=db)

    def flush(self):
        self.client(0).flushall()

    def kib(self):
        return peers.rss_kib([self.server.proc.pid])

    def close(self):
        self.server.close()


PEERS = {"celery": run_celery, "rq": run_rq, "dramatiq": run_dramatiq, "huey": run_huey}


def compile_modules():
    """Byte-compiles the taskd library and the task modules, as pip does for what it installs
    (every peer's package in the venv): a process that imports a module without its `.pyc`
    (PYTHONDONTWRITEBYTECODE set, or the first run) compiles it from source, and the
    compiler's leftovers stay in that process's heap (about 1 MiB for the taskd package,
    python 3.11), which is not what a deployed worker carries."""
    import compileall
    for d in (os.path.join(ROOT, "contrib", "python", "taskd"), TASKS):
        compileall.compile_dir(d, quiet=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--concurrency", default="2,8")
    ap.add_argument("--tools", default="taskd,taskd-fork,celery,rq,dramatiq,huey")
    ap.add_argument("--taskd", default=os.path.join(ROOT, "target", "release", "taskd"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "w7-latest.md"))
    a = ap.parse_args()
    tools = a.tools.split(",")
    conc = [int(x) for x in a.concurrency.split(",")]
    tmp = tempfile.mkdtemp(prefix="w7-")
    compile_modules()
    redis = SharedRedis() if any(not t.startswith("taskd") for t in tools) else None
    rows = []
    try:
        for c in conc:
            for t in tools:
                print(f"W7 {t} c={c} n={a.n} ...", flush=True)
                try:
                    if t in ("taskd", "taskd-fork"):
                        r = run_taskd(a.n, c, a.taskd, tmp, fork=t == "taskd-fork")
                    else:
                        redis.flush()
                        r = PEERS[t](a.n, c, redis, tmp)
                        r["broker_kib"] = redis.kib()
                except Exception as e:  # a peer that fails is reported, not fatal
                    r = {"error": f"{type(e).__name__}: {e}"}
                r.update(tool=t, concurrency=c, n=a.n)
                print("   ", json.dumps(r), flush=True)
                rows.append(r)
    finally:
        if redis:
            redis.close()
    write(rows, a)


def write(rows, a):
    lines = [f"# W7: a Python function per task ({a.n} calls, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "",
             "| tool | concurrency | end to end (tasks/s) | vs Celery | enqueue from one thread (calls/s) | worker side PSS (MiB) | Redis RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    celery = {r["concurrency"]: r for r in rows if r["tool"] == "celery" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['concurrency']} | failed: {r['error'][:120]} | | | | |")
            continue
        base = celery.get(r["concurrency"])
        ratio = f"{r['tasks_per_s'] / base['tasks_per_s']:.1f}×" if base else "–"
        broker = f"{r['broker_kib'] / 1024:.1f}" if r.get("broker_kib") else "– (in the daemon)"
        lines.append(f"| {r['tool']} | {r['concurrency']} | {r['tasks_per_s']:.0f} | {ratio} | "
                     f"{r['enqueue_per_s']:.0f} | {r['worker_pss_kib'] / 1024:.1f} | {broker} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
