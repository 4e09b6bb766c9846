#!/usr/bin/env python3
"""taskd benchmarks for the core and dispatch: run by bench/run (see docs/performance.md).

Workloads (each repeated in alternation with its peers, medians reported):
  dispatch   2,000 x /bin/true at concurrency 2: taskd vs the bare fork+exec floor vs xargs -P2
  submit     median wall time of one `taskd submit` call (a new process each time)
  batch      tasks/s of one `taskd submit --batch` of 100,000 lines
  latency    submit returned -> task process started, p50/p99 over N tasks, idle daemon
  backlog    submit and batch again with 1,000,000 tasks already queued
"""
import argparse, json, os, shutil, sqlite3, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKD = os.path.join(ROOT, "target", "release", "taskd")
OUT = os.path.join(ROOT, "target", "bench")


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def build_tools():
    os.makedirs(OUT, exist_ok=True)
    for name in ("floor", "stamp"):
        sh("cc", "-O2", "-o", os.path.join(OUT, name), os.path.join(ROOT, "bench", name + ".c"))


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
        log = open(os.path.join(self.dir, "daemon.log"), "w")
        self.daemon = subprocess.Popen([TASKD, "-c", self.config, "start"], stderr=log,
                                       env=dict(os.environ, RUST_LOG="warn,taskd::daemon=info"))
        deadline = time.time() + 20
        while time.time() < deadline:
            with open(os.path.join(self.dir, "daemon.log")) as f:
                if "ready" in f.read():
                    return
            time.sleep(0.01)
        raise SystemExit("daemon did not start: see " + self.dir)

    def rss_kib(self):
        with open(f"/proc/{self.daemon.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        if self.daemon:
            self.daemon.terminate()
            self.daemon.wait(30)
            self.daemon = None

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def count(self, state):
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute("SELECT count(*) FROM tasks WHERE state = ?", (state,)).fetchone()[0]
        finally:
            con.close()


def batch_file(n, path):
    with open(path, "w") as f:
        for i in range(n):
            f.write('{"i":%d}\n' % i)
    return path


# --- dispatch -------------------------------------------------------------------------

def dispatch_taskd(n, p):
    env = Env(f'[queues.w1]\nconcurrency = {p}\ncommand = ["/bin/true"]\noutput_tail = "4KiB"\n')
    try:
        env.taskd("pause", "w1")
        env.taskd("submit", "w1", "--batch", batch_file(n, os.path.join(env.dir, "b.jsonl")))
        env.start()
        t0 = time.time()
        env.taskd("resume", "w1")
        while env.count("succeeded") < n:
            time.sleep(0.005)
            if env.daemon.poll() is not None:
                raise SystemExit("daemon died during dispatch")
        con = sqlite3.connect(f"file:{env.db}?mode=ro", uri=True)
        last = con.execute("SELECT max(finished_at) FROM tasks").fetchone()[0] / 1000.0
        con.close()
        return n / (last - t0)
    finally:
        env.close()


def dispatch_floor(n, p):
    t0 = time.time()
    sh(os.path.join(OUT, "floor"), str(p), str(n), "/bin/true")
    return n / (time.time() - t0)


def dispatch_xargs(n, p):
    t0 = time.time()
    subprocess.run(f"seq {n} | xargs -P{p} -n1 /bin/true", shell=True, check=True)
    return n / (time.time() - t0)


# --- enqueue --------------------------------------------------------------------------

def submit_times(env, calls):
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        env.taskd("submit", "q", '{"i":%d}' % i)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def batch_rate(env, n):
    path = batch_file(n, os.path.join(env.dir, f"b{n}.jsonl"))
    t0 = time.perf_counter()
    env.taskd("submit", "q", "--batch", path)
    return n / (time.perf_counter() - t0)


def spawn_overhead(calls):
    """What starting any process costs here, measured the same way (for reading the figures)."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sh("/bin/true")
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def latency(env, stamp_file, n):
    lat = []
    for i in range(n):
        before = os.path.getsize(stamp_file) if os.path.exists(stamp_file) else 0
        env.taskd("submit", "lat", "{}")
        t_ret = time.time_ns()
        deadline = time.time() + 10
        while True:
            size = os.path.getsize(stamp_file) if os.path.exists(stamp_file) else 0
            if size > before:
                break
            if time.time() > deadline:
                raise SystemExit("a latency task did not start within 10 s")
            time.sleep(0.0002)
        with open(stamp_file) as f:
            f.seek(before)
            line = f.readline()
        lat.append((int(line.split()[0]) - t_ret) / 1e6)
    return lat


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, a minute or so")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "latest.md"))
    a = ap.parse_args()
    q = a.quick
    n_dispatch, calls, n_batch, n_lat = (500, 50, 20_000, 200) if q else (2000, 200, 100_000, 1000)
    n_backlog = 100_000 if q else 1_000_000
    build_tools()
    rows = []
    rows.append(("starting `/bin/true` from the harness, for reference (ms)", f"median {spawn_overhead(100):.2f}", "", ""))

    # dispatch: A B C A B C ...
    res = {"taskd": [], "floor": [], "xargs": []}
    for r in range(a.rounds):
        res["floor"].append(dispatch_floor(n_dispatch, 2))
        res["taskd"].append(dispatch_taskd(n_dispatch, 2))
        res["xargs"].append(dispatch_xargs(n_dispatch, 2))
        print(f"dispatch round {r+1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in res.items()), flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    ratios = [t / f for t, f in zip(res["taskd"], res["floor"])]
    rows.append((f"dispatch: {n_dispatch} x /bin/true, concurrency 2 (tasks/s)",
                 f"{med['taskd']:.0f}", f"floor {med['floor']:.0f}, xargs -P2 {med['xargs']:.0f}",
                 f"taskd/floor {statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)}); "
                 f"xargs/floor {med['xargs']/med['floor']:.2f}"))

    # enqueue on an empty store, then with a backlog
    env = Env('[queues.q]\ncommand = ["/bin/true"]\n\n'
              f'[queues.lat]\ncommand = ["{os.path.join(OUT, "stamp")}", "{os.path.join(tempfile.gettempdir(), "taskd-bench-stamps")}"]\n')
    try:
        env.taskd("pause", "q")
        t = submit_times(env, calls)
        b = statistics.median([batch_rate(env, n_batch) for _ in range(a.rounds)])
        rows.append((f"one `taskd submit` call, empty store, no daemon (ms)", f"median {statistics.median(t):.2f}, p99 {pct(t, 99):.2f}", "", ""))
        rows.append((f"`submit --batch` of {n_batch:,} (tasks/s)", f"{b:,.0f}", "", ""))
        # latency on an idle daemon
        stamps = os.path.join(tempfile.gettempdir(), "taskd-bench-stamps")
        if os.path.exists(stamps):
            os.remove(stamps)
        env.start()
        idle = env.rss_kib()
        t_d = submit_times(env, calls)
        rows.append((f"one `taskd submit` call, daemon running (ms)", f"median {statistics.median(t_d):.2f}, p99 {pct(t_d, 99):.2f}", "", ""))
        lat = latency(env, stamps, n_lat)
        rows.append((f"submit returned -> process started, {n_lat} tasks (ms)",
                     f"p50 {pct(lat, 50):.2f}, p99 {pct(lat, 99):.2f}", "", ""))
        rows.append(("daemon RSS, idle (MiB)", f"{idle/1024:.1f}", "", ""))
        env.stop()
        # backlog: fill up to n_backlog queued tasks on the paused queue
        have = env.count("queued")
        while have < n_backlog:
            step = min(200_000, n_backlog - have)
            env.taskd("submit", "q", "--batch", batch_file(step, os.path.join(env.dir, "fill.jsonl")))
            have += step
        t2 = submit_times(env, calls)
        b2 = statistics.median([batch_rate(env, n_batch) for _ in range(a.rounds)])
        rows.append((f"one `taskd submit` call, {have:,} queued, no daemon (ms)", f"median {statistics.median(t2):.2f}, p99 {pct(t2, 99):.2f}", "",
                     f"vs empty {statistics.median(t2)/statistics.median(t):.2f}"))
        rows.append((f"`submit --batch` of {n_batch:,}, {have:,} queued (tasks/s)", f"{b2:,.0f}", "", f"vs empty {b2/b:.2f}"))
        env.start()
        rows.append((f"daemon RSS with {have:,} queued (MiB)", f"{env.rss_kib()/1024:.1f}", "", ""))
        env.stop()
    finally:
        env.close()

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    md = [f"Machine: {os.cpu_count()} cores, {cpu}; {time.strftime('%Y-%m-%d')}; "
          f"{'quick' if q else 'full'} run, {a.rounds} rounds.", "",
          "| workload | taskd | peers | ratio |", "|---|---|---|---|"]
    md += [f"| {w} | {t} | {p} | {r} |" for w, t, p, r in rows]
    text = "\n".join(md) + "\n"
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
