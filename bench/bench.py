#!/usr/bin/env python3
"""taskd side by side with the tools users would pick instead: run by bench/run (see
docs/performance.md for what each workload measures and the latest figures).

Peers: the floor (bench/floor.c, a bare fork+exec+wait loop), xargs -P, GNU parallel,
task-spooler (tsp), pueue, Celery with a Redis broker. Every workload runs taskd and each
peer in alternation (A B C ... A B C, --rounds times), medians reported, with the ratio
taskd/peer per round. Peers that cannot be installed are reported as such in the table.

  W1 dispatch     2,000 x /bin/true at concurrency 2, from a pre-filled queue
  W2 concurrency  500 x sleep 0.01 at concurrency 8, from a pre-filled queue
  W3 enqueue      10,000 single enqueue calls; one batch of 100,000
  W4 latency      enqueue returned -> process started, p50/p99 over 1,000 tasks, idle daemon
  W5 memory       daemon RSS idle, with 1,000,000 queued, during W1
  W6 backlog      claim+complete rate of 2,000 tasks, empty queue vs 1,000,000 queued
"""
import argparse, json, os, shlex, shutil, sqlite3, statistics, subprocess, sys, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import install, peers  # noqa: E402

TASKD = os.path.join(ROOT, "target", "release", "taskd")
OUT = os.path.join(ROOT, "target", "bench")
TRUE = ["/bin/true"]
SLEEP = ["/bin/sleep", "0.01"]

TOOLS = ["taskd", "floor", "xargs", "parallel", "tsp", "pueue", "celery"]
HEAD = {"taskd": "taskd", "floor": "floor (fork+exec)", "xargs": "xargs -P", "parallel": "GNU parallel",
        "tsp": "tsp", "pueue": "pueue", "celery": "Celery + Redis"}
DAEMONS = ["tsp", "pueue", "celery"]  # the peers that have a queue and a daemon
NA = "—"


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_tools():
    os.makedirs(OUT, exist_ok=True)
    for name in ("floor", "stamp"):
        sh("cc", "-O2", "-o", os.path.join(OUT, name), os.path.join(HERE, name + ".c"))


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def mib(kib):
    return f"{kib / 1024:.1f}"


def chunks(n, k):
    """n split into k near-equal parts (for the calls of a workload spread over k rounds)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


class Sampler:
    """Peak RSS (sum over pids_fn()) sampled every 10 ms while it runs."""

    def __init__(self, pids_fn):
        self.pids_fn, self.peak, self.stop_ = pids_fn, 0, False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop_:
            self.peak = max(self.peak, peers.rss_kib(self.pids_fn()))
            time.sleep(0.01)

    def stop(self):
        self.stop_ = True
        self.t.join()
        return self.peak


# --- taskd ------------------------------------------------------------------------------

class Env:
    """A throwaway state dir and config with the given queues."""

    def __init__(self, queues):
        self.dir = tempfile.mkdtemp(prefix="taskd-bench-")
        self.config = os.path.join(self.dir, "taskd.toml")
        with open(self.config, "w") as f:
            f.write('[taskd]\nstate_dir = "state"\nshutdown_grace = "5s"\n\n' + queues)
        self.db = os.path.join(self.dir, "state", "taskd.db")
        self.daemon = None

    def taskd(self, *args, **kw):
        return sh(TASKD, "-c", self.config, *args, stdout=subprocess.DEVNULL, **kw)

    def start(self):
        logf = os.path.join(self.dir, "daemon.log")
        self.daemon = subprocess.Popen([TASKD, "-c", self.config, "start"], stderr=open(logf, "w"),
                                       env=dict(os.environ, RUST_LOG="warn,taskd::daemon=info"),
                                       preexec_fn=peers._die_with_parent)
        deadline = time.time() + 60
        while time.time() < deadline:
            with open(logf) as f:
                if "ready" in f.read():
                    return
            if self.daemon.poll() is not None:
                break
            time.sleep(0.01)
        raise SystemExit("daemon did not start: see " + self.dir)

    def pids(self):
        return [self.daemon.pid]

    def rss_kib(self):
        return peers.rss_kib([self.daemon.pid])

    def stop(self):
        if self.daemon:
            self.daemon.terminate()
            self.daemon.wait(60)
            self.daemon = None

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def query(self, sql, *args):
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute(sql, args).fetchone()[0]
        finally:
            con.close()

    def count(self, state):
        return self.query("SELECT count(*) FROM tasks WHERE state = ?", state)


def queue_toml(name, concurrency, argv):
    return f'[queues.{name}]\nconcurrency = {concurrency}\ncommand = {json.dumps(argv)}\noutput_tail = "4KiB"\n'


def batch_file(n, path):
    with open(path, "w") as f:
        for i in range(n):
            f.write('{"i":%d}\n' % i)
    return path


def fill_taskd(env, queue, n, step=200_000):
    have = 0
    while have < n:
        k = min(step, n - have)
        env.taskd("submit", queue, "--batch", batch_file(k, os.path.join(env.dir, "fill.jsonl")))
        have += k


def wait_succeeded(env, target, timeout=600):
    deadline = time.time() + timeout
    while env.count("succeeded") < target:
        time.sleep(0.005)
        if env.daemon.poll() is not None:
            raise SystemExit("taskd daemon died: see " + env.dir)
        if time.time() > deadline:
            raise SystemExit(f"taskd: fewer than {target} tasks succeeded in {timeout} s")


def nth_finished(env, offset):
    """finished_at (epoch s) of the offset-th task to succeed, 0-based."""
    return env.query("SELECT finished_at FROM tasks WHERE state = 'succeeded' "
                     "ORDER BY finished_at LIMIT 1 OFFSET ?", offset) / 1000.0


# --- W1, W2: dispatch from a pre-filled queue --------------------------------------------

def dispatch_taskd(n, p, argv):
    env = Env(queue_toml("w", p, argv))
    try:
        env.taskd("pause", "w")
        env.taskd("submit", "w", "--batch", batch_file(n, os.path.join(env.dir, "b.jsonl")))
        env.start()
        s = Sampler(env.pids)
        t0 = time.time()
        env.taskd("resume", "w")
        wait_succeeded(env, n)
        peak = s.stop()
        last = env.query("SELECT max(finished_at) FROM tasks") / 1000.0
        return n / (last - t0), peak
    finally:
        env.close()


def dispatch_floor(n, p, argv):
    t0 = time.time()
    sh(os.path.join(OUT, "floor"), str(p), str(n), *argv)
    return n / (time.time() - t0), None


def dispatch_xargs(n, p, argv):
    t0 = time.time()
    subprocess.run(f"seq {n} | xargs -P{p} -I{{}} {shlex.join(argv)}", shell=True, check=True)
    return n / (time.time() - t0), None


def dispatch_parallel(path, n, p, argv):
    t0 = time.time()
    subprocess.run(f"seq {n} | {path} --will-cite -j{p} -N0 {shlex.join(argv)}", shell=True, check=True)
    return n / (time.time() - t0), None


def dispatch_tsp(path, n, p, argv):
    """tsp cannot hold more than ~1,000 waiting jobs: the queue is filled and drained in
    blocks of up to 900, and the rate is n over the sum of the drain times."""
    t = peers.Tsp(path, p)
    try:
        s = Sampler(t.pids)
        busy, left = 0.0, n
        while left:
            k = min(left, t.MAX_WAITING - p)
            t.hold()
            ids = [t.add(argv) for _ in range(k)]
            t0 = time.time()
            t.release()
            t.wait(ids[-p:])  # at most p run at once, in order: the last p end last
            busy += time.time() - t0
            left -= k
        return n / busy, s.stop()
    finally:
        t.close()


def dispatch_pueue(paths, n, p, argv):
    q = peers.Pueue(paths, p)
    try:
        q.hold()
        for _ in range(n):
            q.add(argv)
        s = Sampler(q.pids)
        t0 = time.time()
        q.release()
        last = q.wait_all(n)
        return n / (last - t0), s.stop()
    finally:
        q.close()


def dispatch_celery(c, worker, n, argv, queue="w"):
    """The worker is up, consuming another queue; n tasks are enqueued with delay(); the
    clock starts when add_consumer tells the worker to consume them."""
    c.results.flushdb()
    for _ in range(n):
        c.add(argv, queue)
    return drain_celery(c, worker, n, queue)


def drain_celery(c, worker, n, queue):
    c.results.flushdb()
    s = Sampler(worker.pids)
    t0 = time.time()
    worker.consume(queue)
    deadline = t0 + 600
    while c.results.dbsize() < n:
        time.sleep(0.005)
        if time.time() > deadline:
            raise SystemExit(f"celery: fewer than {n} results in 600 s")
    dt = time.time() - t0
    peak = s.stop()
    worker.stop_consuming(queue)
    time.sleep(0.3)
    c.results.flushdb()
    return n / dt, peak


# --- the table --------------------------------------------------------------------------

class Table:
    def __init__(self, found):
        self.found = found
        self.rows = []

    def missing(self, tool):
        v = self.found.get(tool)
        return v if isinstance(v, str) and v.startswith("not installed") else None

    def row(self, label, cells, ratio=""):
        """cells: {tool: text}; a peer that is not installed shows why wherever it would
        have a figure."""
        out = {}
        for t in TOOLS:
            if t in cells:
                out[t] = self.missing(t) or cells[t]
            else:
                out[t] = NA
        self.rows.append((label, out, ratio))

    def markdown(self):
        # by workload (W1 ... W6), in the order measured within each
        self.rows.sort(key=lambda r: r[0][:2] if r[0].startswith("W") else "")
        lines = ["| workload | " + " | ".join(HEAD[t] for t in TOOLS) + " | ratio taskd/peer: median (per round) |",
                 "|---" * (len(TOOLS) + 2) + "|"]
        for label, cells, ratio in self.rows:
            lines.append(f"| {label} | " + " | ".join(cells[t] for t in TOOLS) + f" | {ratio} |")
        return "\n".join(lines)


def num(r):
    return f"{r:.3f}" if r < 0.0995 else f"{r:.0f}" if r >= 99.5 else f"{r:.2f}"


def ratios(res):
    """'peer 0.62 (0.72, 0.60, 0.62); ...' from {tool: [per-round values]}, taskd first."""
    tv = res.get("taskd", [])
    out = []
    for t in TOOLS[1:]:
        pv = res.get(t)
        if not pv or not tv:
            continue
        rs = [a / b for a, b in zip(tv, pv) if b]
        if rs:
            out.append(f"{t} {num(med(rs))} ({', '.join(num(r) for r in rs)})")
    return "; ".join(out)


# --- the workloads ----------------------------------------------------------------------

class Bench:
    def __init__(self, a, found):
        self.a, self.found, self.rounds = a, found, a.rounds
        q = a.quick
        self.n = dict(
            w1=500 if q else 2000, w1_pueue=30 if q else 100,
            w2=200 if q else 500, w2_pueue=80 if q else 200,
            w3=1000 if q else 10_000, w3_pueue=300 if q else a.pueue_adds,
            batch=20_000 if q else 100_000, group=5_000 if q else 20_000,
            w4=200 if q else 1000, w4_pueue=20 if q else 100,
            backlog=100_000 if q else 1_000_000, w6=500 if q else 2000, calls=50 if q else 200)
        self.t = Table(found)
        self.rss = {}  # W5 rows, filled as the other workloads run: {row: {tool: text}}
        self.celery = None

    def has(self, tool):
        return tool in self.a.peers and not self.t.missing(tool)

    def get_celery(self):
        if self.celery is None:
            self.celery = peers.Celery(self.found["celery"])
        return self.celery

    def note_rss(self, row, tool, text):
        self.rss.setdefault(row, {})[tool] = text

    # W1 and W2 ----------------------------------------------------------------------
    def dispatch(self, key, n, n_pueue, p, argv, label):
        tools = [t for t in TOOLS if t == "taskd" or self.has(t)]
        res = {t: [] for t in tools}
        peak = {t: [] for t in tools}
        worker = None
        if "celery" in tools:
            worker = self.get_celery().worker(p)
        try:
            for r in range(self.rounds):
                for t in tools:
                    if t == "taskd":
                        v, pk = dispatch_taskd(n, p, argv)
                    elif t == "floor":
                        v, pk = dispatch_floor(n, p, argv)
                    elif t == "xargs":
                        v, pk = dispatch_xargs(n, p, argv)
                    elif t == "parallel":
                        v, pk = dispatch_parallel(self.found["parallel"], n, p, argv)
                    elif t == "tsp":
                        v, pk = dispatch_tsp(self.found["tsp"], n, p, argv)
                    elif t == "pueue":
                        v, pk = dispatch_pueue(self.found["pueue"], n_pueue, p, argv)
                    elif t == "celery":
                        v, pk = dispatch_celery(self.celery, worker, n, argv)
                    res[t].append(v)
                    if pk is not None:
                        peak[t].append(pk)
                log(f"{key} round {r + 1}: " + ", ".join(f"{t} {v[-1]:.0f}/s" for t, v in res.items()))
        finally:
            if worker:
                worker.close()
        cells = {t: f"{med(v):.0f}" for t, v in res.items()}
        if "pueue" in cells:
            cells["pueue"] += f" ({n_pueue} tasks)"
        if "tsp" in cells:
            cells["tsp"] += f" (blocks of ≤{peers.Tsp.MAX_WAITING - p})"
        for t in ("floor", "xargs", "parallel", "tsp", "pueue", "celery"):
            cells.setdefault(t, "")
        self.t.row(label, cells, ratios(res))
        if key == "W1":
            for t, v in peak.items():
                if v:
                    self.note_rss("during W1 (peak)", t, mib(med(v)) + (" (worker processes)" if t == "celery" else ""))
        return res

    # W3 -----------------------------------------------------------------------------
    def enqueue(self):
        n, rounds = self.n, self.rounds
        tools = [t for t in ["taskd", "tsp", "pueue", "celery"] if t == "taskd" or self.has(t)]
        env = Env('[queues.q]\ncommand = ["/bin/true"]\n')
        tsp = pueue = None
        try:
            env.taskd("pause", "q")
            # the existing figures: one call with no daemon, on an empty store
            t_nod = submit_times(env, n["calls"])
            self.t.row("W3 one `taskd submit`, no daemon, empty store (ms, lower is better)",
                       {"taskd": f"median {med(t_nod):.2f}, p99 {pct(t_nod, 99):.2f}"})
            env.start()
            if "tsp" in tools:
                tsp = peers.Tsp(self.found["tsp"], 2)
            if "pueue" in tools:
                pueue = peers.Pueue(self.found["pueue"], 2)
                pueue.hold()
            if "celery" in tools:
                c = self.get_celery()
                c.broker.delete("w3")
            times = {t: [] for t in tools}
            per_round = {t: [] for t in tools}
            tsp_waiting = None
            for r, (k, kp) in enumerate(zip(chunks(n["w3"], rounds), chunks(n["w3_pueue"], rounds))):
                for t in tools:
                    if t == "taskd":
                        ts = submit_times(env, k)
                    elif t == "tsp":
                        ts, tsp_waiting = tsp_add_times(tsp, k, tsp_waiting)
                    elif t == "pueue":
                        ts = timed(lambda: pueue.add(TRUE), kp)
                    elif t == "celery":
                        ts = timed(lambda: c.add(TRUE, "w3"), k)
                    times[t] += ts
                    per_round[t].append(med(ts))
                log(f"W3 round {r + 1}: " + ", ".join(f"{t} {v[-1]:.2f} ms" for t, v in per_round.items()))
            cells = {t: f"median {med(v):.2f}, p99 {pct(v, 99):.2f}" for t, v in times.items()}
            if "pueue" in cells:
                cells["pueue"] += f" ({n['w3_pueue']:,} adds; queue 0 → {n['w3_pueue']:,})"
                self.note_rss("with queued tasks", "pueue", f"{mib(peers.rss_kib(pueue.pids()))} ({n['w3_pueue']:,} queued)")
            if "tsp" in cells:
                cells["tsp"] += f" (queue ≤{tsp.MAX_WAITING - 2}, drained between blocks)"
                self.note_rss("with queued tasks", "tsp", tsp_waiting)
            if "celery" in cells:
                cells["celery"] += " (delay(), in-process)"
            self.t.row(f"W3 one enqueue call, daemon running, {n['w3']:,} calls (ms, lower is better)", cells,
                       ratios(per_round))
            # batch
            bres = {t: [] for t in tools if t in ("taskd", "celery")}
            for r in range(rounds):
                bres["taskd"].append(batch_rate(env, n["batch"]))
                if "celery" in bres:
                    bres["celery"].append(celery_group_rate(c, n["group"]))
                log(f"W3 batch round {r + 1}: " + ", ".join(f"{t} {v[-1]:,.0f}/s" for t, v in bres.items()))
            cells = {t: f"{med(v):,.0f}" for t, v in bres.items()}
            if "celery" in cells:
                cells["celery"] += f" (group of {n['group']:,})"
            cells["tsp"] = "no batch enqueue"
            cells["pueue"] = "no batch enqueue"
            self.t.row(f"W3 one batch of {n['batch']:,}: taskd `submit --batch` (tasks/s)", cells, ratios(bres))
        finally:
            for x in (tsp, pueue):
                if x:
                    x.close()
            if self.celery:
                self.celery.broker.delete("w3", "w3b")
            env.close()

    # W4 and W5 idle ------------------------------------------------------------------
    def latency(self):
        n, rounds = self.n, self.rounds
        tools = [t for t in ["taskd", "tsp", "pueue", "celery"] if t == "taskd" or self.has(t)]
        tmp = tempfile.mkdtemp(prefix="bench-lat-")
        stamp = os.path.join(OUT, "stamp")
        files = {t: os.path.join(tmp, t) for t in tools}
        env = Env(queue_toml("lat", 2, [stamp, files["taskd"]]))
        tsp = pueue = worker = None
        submit = {}
        try:
            env.start()
            time.sleep(0.5)
            self.note_rss("idle", "taskd", mib(env.rss_kib()))
            submit["taskd"] = lambda: env.taskd("submit", "lat", "{}")
            if "tsp" in tools:
                tsp = peers.Tsp(self.found["tsp"], 2)
                self.note_rss("idle", "tsp", mib(peers.rss_kib(tsp.pids())))
                submit["tsp"] = lambda: tsp.add([stamp, files["tsp"]])
            if "pueue" in tools:
                pueue = peers.Pueue(self.found["pueue"], 2)
                time.sleep(0.5)
                self.note_rss("idle", "pueue", mib(peers.rss_kib(pueue.pids())))
                submit["pueue"] = lambda: pueue.add([stamp, files["pueue"]])
            if "celery" in tools:
                c = self.get_celery()
                worker = c.worker(2, "lat")
                time.sleep(0.5)
                self.note_rss("idle", "celery", f"{mib(peers.rss_kib(worker.pids()))} (worker processes, PSS "
                              f"{mib(peers.pss_kib(worker.pids()))}) + redis {mib(c.redis_kib())}")
                submit["celery"] = lambda: c.add([stamp, files["celery"]], "lat")
            lat = {t: [] for t in tools}
            p50 = {t: [] for t in tools}
            for r, (k, kp) in enumerate(zip(chunks(n["w4"], rounds), chunks(n["w4_pueue"], rounds))):
                for t in tools:
                    xs = latency(submit[t], files[t], kp if t == "pueue" else k)
                    lat[t] += xs
                    p50[t].append(med(xs))
                log(f"W4 round {r + 1}: p50 " + ", ".join(f"{t} {v[-1]:.2f} ms" for t, v in p50.items()))
            cells = {t: f"p50 {pct(v, 50):.2f}, p99 {pct(v, 99):.2f}" for t, v in lat.items()}
            if "pueue" in cells:
                cells["pueue"] += f" ({n['w4_pueue']} tasks)"
            self.t.row(f"W4 enqueue returned → process started, {n['w4']:,} tasks, idle daemon (ms, lower is better)", cells,
                       "p50: " + ratios(p50))
        finally:
            for x in (tsp, pueue, worker):
                if x:
                    x.close()
            env.close()
            shutil.rmtree(tmp, ignore_errors=True)

    # W5 with a backlog, W6 ----------------------------------------------------------
    def backlog(self):
        n, rounds, nb, k = self.n, self.rounds, self.n["backlog"], self.n["w6"]
        celery = "celery" in self.a.peers and self.has("celery")
        env = Env(queue_toml("w6", 2, TRUE))
        worker = None
        try:
            env.taskd("pause", "w6")
            t0 = time.time()
            fill_taskd(env, "w6", nb)
            log(f"taskd: {nb:,} queued in {time.time() - t0:.1f} s")
            env.start()
            time.sleep(1)
            self.note_rss("with queued tasks", "taskd", f"{mib(env.rss_kib())} ({env.count('queued'):,} queued)")
            if celery:
                c = self.get_celery()
                c.broker.delete("w6", "w6e")
                t0 = time.time()
                c.fill(TRUE, "w6", nb)
                log(f"celery: {nb:,} queued in {time.time() - t0:.1f} s (Redis pipeline)")
                worker = c.worker(2)
                time.sleep(0.5)
                self.note_rss("with queued tasks", "celery",
                              f"{mib(peers.rss_kib(worker.pids()))} (worker processes) + redis "
                              f"{mib(c.redis_kib())} ({c.queued('w6'):,} queued)")
            res = {"taskd empty": [], "taskd backlog": []}
            if celery:
                res.update({"celery empty": [], "celery backlog": []})
            peak = []
            for r in range(rounds):
                res["taskd empty"].append(dispatch_taskd(k, 2, TRUE)[0])
                time.sleep(0.2)
                done = env.count("succeeded")
                s = Sampler(env.pids)
                t0 = time.time()
                env.taskd("resume", "w6")
                wait_succeeded(env, done + k)
                env.taskd("pause", "w6")
                peak.append(s.stop())
                res["taskd backlog"].append(k / (nth_finished(env, done + k - 1) - t0))
                if celery:
                    c.fill(TRUE, "w6e", k)
                    res["celery empty"].append(drain_celery(c, worker, k, "w6e")[0])
                    res["celery backlog"].append(drain_celery(c, worker, k, "w6")[0])
                log(f"W6 round {r + 1}: " + ", ".join(f"{t} {v[-1]:.0f}/s" for t, v in res.items()))
            self.note_rss("with queued tasks, while claiming (peak)", "taskd", mib(med(peak)))
            # the existing figures: one submit and one batch with the backlog, no daemon
            env.stop()
            t2 = submit_times(env, n["calls"], queue="w6")
            b2 = [batch_rate(env, n["batch"], queue="w6") for _ in range(rounds)]
            cells_e = {"taskd": f"{med(res['taskd empty']):.0f}"}
            cells_b = {"taskd": f"{med(res['taskd backlog']):.0f}"}
            rel = {"taskd": [b / e for b, e in zip(res["taskd backlog"], res["taskd empty"])]}
            if celery:
                cells_e["celery"] = f"{med(res['celery empty']):.0f}"
                cells_b["celery"] = f"{med(res['celery backlog']):.0f}"
                rel["celery"] = [b / e for b, e in zip(res["celery backlog"], res["celery empty"])]
            why_tsp = "cannot hold it: ~1,000 waiting jobs at most (a client process and a connection each)"
            why_pueue = "not measured: each add rewrites the whole state (see W3), 1,000,000 adds take hours"
            for cells in (cells_e, cells_b):
                if "tsp" in self.a.peers:
                    cells["tsp"] = why_tsp
                if "pueue" in self.a.peers:
                    cells["pueue"] = why_pueue
            self.t.row(f"W6 claim+complete {k:,} × /bin/true, conc. 2, empty queue (tasks/s)", cells_e,
                       ratios({"taskd": res["taskd empty"], "celery": res.get("celery empty")}))
            self.t.row(f"W6 the same, first {k:,} of {nb:,} queued (tasks/s)", cells_b,
                       ratios({"taskd": res["taskd backlog"], "celery": res.get("celery backlog")}))
            cells = {t: f"{med(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})" for t, v in rel.items()}
            self.t.row("W6 backlog rate / empty rate (per round)", cells)
            self.t.row(f"W3 one `taskd submit`, no daemon, {nb:,} queued (ms, lower is better)",
                       {"taskd": f"median {med(t2):.2f}, p99 {pct(t2, 99):.2f}"})
            self.t.row(f"W3 `submit --batch` of {n['batch']:,}, {nb:,} queued (tasks/s)",
                       {"taskd": f"{med(b2):,.0f}"})
        finally:
            if worker:
                worker.close()
            if self.celery:
                self.celery.broker.delete("w6", "w6e")
            env.close()

    def memory_rows(self):
        for row, label in (("idle", "W5 daemon RSS, idle (MiB)"),
                           ("with queued tasks", "W5 daemon RSS with a backlog (MiB)"),
                           ("with queued tasks, while claiming (peak)", "W5 daemon RSS with the backlog, claiming (peak, MiB)"),
                           ("during W1 (peak)", "W5 daemon RSS during W1 (peak, MiB)")):
            cells = dict(self.rss.get(row, {}))
            if not cells:
                continue
            self.t.row(label, cells)


def submit_times(env, calls, queue="q"):
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        env.taskd("submit", queue, '{"i":%d}' % i)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def timed(fn, calls):
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def tsp_add_times(tsp, calls, waiting):
    """Timed single adds on a held queue, in blocks: tsp holds ~1,000 waiting jobs at most.
    Also the memory it takes with a full block waiting: server + client processes."""
    times = []
    while calls:
        k = min(calls, tsp.MAX_WAITING - tsp.slots)
        tsp.hold()
        ids = []
        for _ in range(k):
            t0 = time.perf_counter()
            ids.append(tsp.add(TRUE))
            times.append((time.perf_counter() - t0) * 1000)
        if k == tsp.MAX_WAITING - tsp.slots or waiting is None:
            cl = tsp.clients()
            waiting = (f"server {mib(peers.rss_kib(tsp.pids()))} + {len(cl)} client processes "
                       f"{mib(peers.rss_kib(cl))} ({k} queued)")
        tsp.release()
        tsp.wait(ids[-tsp.slots:])
        calls -= k
    return times, waiting


def batch_rate(env, n, queue="q"):
    path = batch_file(n, os.path.join(env.dir, f"b{n}.jsonl"))
    t0 = time.perf_counter()
    env.taskd("submit", queue, "--batch", path)
    return n / (time.perf_counter() - t0)


def celery_group_rate(c, n):
    from celery import group
    sigs = [c.mod.run.s(TRUE) for _ in range(n)]
    t0 = time.perf_counter()
    group(sigs).apply_async(queue="w3b")
    dt = time.perf_counter() - t0
    c.broker.delete("w3b")
    return n / dt


def spawn_overhead(calls):
    """What starting any process costs here, measured the same way (for reading the figures)."""
    return med(timed(lambda: sh("/bin/true"), calls))


def latency(submit, stamp_file, n):
    """submit() returned -> the stamp process started, one task at a time."""
    lat = []
    for _ in range(n):
        before = os.path.getsize(stamp_file) if os.path.exists(stamp_file) else 0
        submit()
        t_ret = time.time_ns()
        deadline = time.time() + 10
        while True:
            size = os.path.getsize(stamp_file) if os.path.exists(stamp_file) else 0
            if size > before:
                break
            if time.time() > deadline:
                raise SystemExit(f"a latency task ({stamp_file}) did not start within 10 s")
            time.sleep(0.0002)
        lat.append((first_stamp(stamp_file, before) - t_ret) / 1e6)
    return lat


def first_stamp(stamp_file, before):
    """The ns of the first whole stamp line past `before`: a line still being appended when
    the size was read is waited for, and a partial one (a size read mid-write) skipped."""
    deadline = time.time() + 10
    while True:
        with open(stamp_file, "rb") as f:
            f.seek(before)
            text = f.read().decode("utf-8", "replace")
        for line in text.splitlines(keepends=True):
            head = line.split()[0] if line.split() else ""
            if line.endswith("\n") and head.isdigit():
                return int(head)
        if time.time() > deadline:
            raise SystemExit(f"no whole stamp line in {stamp_file} past byte {before}: {text!r}")
        time.sleep(0.0002)


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    return f"{os.cpu_count()} cores, {cpu}, load average {os.getloadavg()[0]:.2f} at the start"


def versions(found):
    v = []
    for t, args in (("tsp", ["-V"]), ("parallel", ["--version"])):
        if not Table(found).missing(t):
            out = subprocess.run([found[t], *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
            v.append((out.stdout + out.stderr).strip().splitlines()[0])
    if not Table(found).missing("pueue"):
        v.append(subprocess.run([found["pueue"][0], "--version"], capture_output=True, text=True).stdout.strip())
    if not Table(found).missing("celery"):
        try:
            import celery
            v.append(f"celery {celery.__version__}")
            v.append(subprocess.run([found["celery"], "--version"], capture_output=True, text=True).stdout.split(" sha")[0])
        except ImportError:
            pass
    return "; ".join(v)


def main():
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: blocks
    start = time.time()
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes and 2 rounds, under 3 minutes")
    ap.add_argument("--rounds", type=int, help="rounds of alternation (default 3, --quick 2)")
    ap.add_argument("--only", default="W1,W2,W3,W4,W5,W6", help="comma-separated workloads to run")
    ap.add_argument("--peers", default=",".join(TOOLS[1:]), help="comma-separated peers to run")
    ap.add_argument("--pueue-adds", type=int, default=10_000, help="W3 single adds for pueue (full run)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "latest.md"))
    a = ap.parse_args()
    a.rounds = a.rounds or (2 if a.quick else 3)
    a.peers = set(a.peers.split(",")) | {"taskd"}
    only = set(a.only.upper().split(","))

    found = install.install(os.path.join(OUT, "install.log"))
    found = {t: v for t, v in found.items()}
    if not isinstance(found.get("celery"), str) or not found["celery"].startswith("not installed"):
        py = install.venv_python()
        if os.path.realpath(sys.prefix) != os.path.realpath(install.VENV) and os.access(py, os.X_OK):
            os.execv(py, [py, os.path.abspath(__file__), *sys.argv[1:]])
    for t in TOOLS[1:]:
        if t in ("floor", "xargs"):
            found[t] = t
    build_tools()
    b = Bench(a, found)
    for t in TOOLS[1:]:
        if b.t.missing(t):
            log(f"{t}: {found[t]}")
    b.t.row("starting `/bin/true` from the harness, for reference (ms)",
            {"taskd": f"median {spawn_overhead(100):.2f}"})
    try:
        if "W1" in only or "W5" in only:
            b.dispatch("W1", b.n["w1"], b.n["w1_pueue"], 2, TRUE,
                       f"W1 dispatch: {b.n['w1']:,} × /bin/true, concurrency 2 (tasks/s, higher is better)")
            log(f"W1 done at {time.time() - start:.0f} s")
        if "W2" in only:
            b.dispatch("W2", b.n["w2"], b.n["w2_pueue"], 8, SLEEP,
                       f"W2 concurrency: {b.n['w2']:,} × sleep 0.01, concurrency 8 (tasks/s, ideal 800)")
            log(f"W2 done at {time.time() - start:.0f} s")
        if "W3" in only or "W5" in only:
            b.enqueue()
            log(f"W3 done at {time.time() - start:.0f} s")
        if "W4" in only or "W5" in only:
            b.latency()
            log(f"W4 done at {time.time() - start:.0f} s")
        if "W5" in only or "W6" in only:
            b.backlog()
            log(f"W5/W6 done at {time.time() - start:.0f} s")
        b.memory_rows()
    finally:
        if b.celery:
            b.celery.close()

    took = time.time() - start
    md = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}. {'Quick' if a.quick else 'Full'} run, "
          f"{a.rounds} rounds, {took / 60:.1f} min (peers already installed). Peers: {versions(found)}.", "",
          b.t.markdown()]
    text = "\n".join(md) + "\n"
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
