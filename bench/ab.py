#!/usr/bin/env python3
"""Two taskd builds side by side on the dispatch workloads, alternated round by round.

    python3 bench/ab.py OLD_TASKD NEW_TASKD [--rounds 5]

W1 (2,000 × /bin/true, concurrency 2), W2 (500 × sleep 0.01, concurrency 8) and W4
(enqueue returned → process started, 1,000 tasks one at a time) as bench/bench.py runs
them, each round running the two builds in turn (the order swapped every round so that a
drift of the machine's speed does not favour one). Prints the median of each and the
ratio new/old: a change that claims "no figure got worse" shows it here. No peer is
installed or run. W1 also gives the daemon's CPU time per task (user + system of all its
threads, from /proc/PID/stat, from the resume to the last task's end): the work the daemon
does per task, which the load of a shared machine moves far less than the rates.
"""
import argparse, os, shutil, statistics, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """User + system CPU seconds of a process, every thread (dead ones included)."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def w1(n=2000):
    """tasks/s, and the daemon's CPU µs per task."""
    env = bench.Env(bench.queue_toml("w", 2, bench.TRUE))
    try:
        env.taskd("pause", "w")
        env.taskd("submit", "w", "--batch", bench.batch_file(n, os.path.join(env.dir, "b.jsonl")))
        env.start()
        c0 = cpu_s(env.daemon.pid)
        t0 = time.time()
        env.taskd("resume", "w")
        bench.wait_succeeded(env, n)
        c1 = cpu_s(env.daemon.pid)
        last = env.query("SELECT max(finished_at) FROM tasks") / 1000.0
        return n / (last - t0), (c1 - c0) / n * 1e6
    finally:
        env.close()


def w2(n=500):
    return bench.dispatch_taskd(n, 8, bench.SLEEP)[0]


def w4(n=1000):
    """p50 and p99 in ms of one round of n tasks."""
    stamp = os.path.join(bench.OUT, "stamp")
    tmp = tempfile.mkdtemp(prefix="bench-ab-")
    out = os.path.join(tmp, "stamps")
    env = bench.Env(bench.queue_toml("lat", 2, [stamp, out]))
    try:
        env.start()
        xs = bench.latency(lambda: env.taskd("submit", "lat", "{}"), out, n)
        return bench.pct(xs, 50), bench.pct(xs, 99)
    finally:
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    bench.build_tools()
    builds = {"old": os.path.abspath(a.old), "new": os.path.abspath(a.new)}
    res = {b: {"W1": [], "W1 daemon CPU per task": [], "W2": [], "W4 p50": [], "W4 p99": []}
           for b in builds}
    for r in range(a.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for b in order:
            bench.TASKD = builds[b]
            rate, cpu = w1()
            res[b]["W1"].append(rate)
            res[b]["W1 daemon CPU per task"].append(cpu)
            res[b]["W2"].append(w2())
            p50, p99 = w4()
            res[b]["W4 p50"].append(p50)
            res[b]["W4 p99"].append(p99)
            bench.log(f"round {r + 1} {b}: W1 {res[b]['W1'][-1]:.0f}/s ({cpu:.0f} µs daemon CPU per task), "
                      f"W2 {res[b]['W2'][-1]:.0f}/s, "
                      f"W4 p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print("\n| workload | old | new | new/old | per round, old / new |\n|---|---:|---:|---:|---|")
    for k in res["old"]:
        o, n = statistics.median(res["old"][k]), statistics.median(res["new"][k])
        unit = "ms" if k.startswith("W4") else "µs" if "CPU" in k else "tasks/s"
        rounds = ", ".join(f"{x:.4g}/{y:.4g}" for x, y in zip(res["old"][k], res["new"][k]))
        print(f"| {k} ({unit}, median of {a.rounds}) | {o:.2f} | {n:.2f} | {n / o:.2f} | {rounds} |")


if __name__ == "__main__":
    main()
