#!/usr/bin/env python3
"""Long-lived workers' throughput: tasks/s end to end, with durable state (SQLite, WAL,
synchronous = FULL), from a pre-filled queue at concurrency 2, against exec mode.

  exec     N x /bin/true (a process per task), the reference
  C        bench/worker.c, the smallest worker: answers every task ok
  Python   bench/echo_worker.py on contrib/python/taskd_worker.py: prints the payload

Each round runs the three in alternation (so a noisy moment on a shared machine hits all
alike); medians are reported with every round's figure, and the ratio worker/exec.
Usage: bench/workers.py [--rounds 3] [--tasks-c 100000] [--tasks-py 20000] [--tasks-exec 2000]
Needs target/release/taskd (cargo build --release). Writes bench/results/workers.md.
"""
import argparse, json, os, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
from bench import Env, batch_file, log, sh, wait_succeeded  # noqa: E402

WORKER_C = os.path.join(bench.OUT, "worker")


def worker_toml(name, concurrency, argv):
    return (f'[queues.{name}]\nconcurrency = {concurrency}\nworker = {json.dumps(argv)}\n'
            f'start_secs = "0s"\noutput_tail = "4KiB"\n')


def workers_running(env, n):
    out = subprocess.run([bench.TASKD, "-c", env.config, "status", "--json"], check=True,
                         capture_output=True, text=True).stdout
    ws = json.loads(out).get("workers", [])
    return sum(1 for w in ws if w["state"] == "running") == n


def run(toml, n, concurrency, workers):
    env = Env(toml)
    try:
        env.taskd("pause", "w")
        env.taskd("submit", "w", "--batch", batch_file(n, os.path.join(env.dir, "b.jsonl")))
        env.start()
        if workers:
            deadline = time.time() + 30
            while not workers_running(env, concurrency):
                if time.time() > deadline:
                    raise SystemExit("workers did not get RUNNING: see " + env.dir)
                time.sleep(0.01)
        s = bench.Sampler(env.pids)
        t0 = time.time()
        env.taskd("resume", "w")
        wait_succeeded(env, n)
        peak = s.stop()
        last = env.query("SELECT max(finished_at) FROM tasks") / 1000.0
        return n / (last - t0), peak
    finally:
        env.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tasks-exec", type=int, default=2000)
    ap.add_argument("--tasks-c", type=int, default=100_000)
    ap.add_argument("--tasks-py", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=2)
    a = ap.parse_args()
    os.makedirs(bench.OUT, exist_ok=True)
    sh("cc", "-O2", "-o", WORKER_C, os.path.join(HERE, "worker.c"))
    p = a.concurrency
    cases = [
        ("exec", f"exec: {a.tasks_exec:,} x /bin/true", a.tasks_exec,
         bench.queue_toml("w", p, ["/bin/true"]), False),
        ("c", f"worker: bench/worker.c, {a.tasks_c:,} tasks", a.tasks_c,
         worker_toml("w", p, [WORKER_C]), True),
        ("py", f"worker: Python helper echoing its payload, {a.tasks_py:,} tasks", a.tasks_py,
         worker_toml("w", p, [sys.executable, os.path.join(HERE, "echo_worker.py")]), True),
    ]
    rates = {k: [] for k, *_ in cases}
    peaks = {k: [] for k, *_ in cases}
    for r in range(a.rounds):
        for key, label, n, toml, workers in cases:
            rate, peak = run(toml, n, p, workers)
            rates[key].append(rate)
            peaks[key].append(peak)
            log(f"round {r + 1}: {label}: {rate:,.0f} tasks/s, daemon peak RSS {bench.mib(peak)} MiB")
    load = os.getloadavg()[0]
    lines = [
        f"Long-lived workers, concurrency {p}, {a.rounds} rounds, {time.strftime('%Y-%m-%d %H:%M')} "
        f"(load average {load:.1f} at the end; {os.cpu_count()} cores)",
        "",
        "| mode | tasks/s (median) | per round | ratio to exec (median; per round) | daemon peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for key, label, *_ in cases:
        med = statistics.median(rates[key])
        per = ", ".join(f"{x:,.0f}" for x in rates[key])
        ratios = [x / e for x, e in zip(rates[key], rates["exec"])]
        ratio = "—" if key == "exec" else f"{statistics.median(ratios):.1f} ({', '.join(f'{x:.1f}' for x in ratios)})"
        lines.append(f"| {label} | {med:,.0f} | {per} | {ratio} | {bench.mib(max(peaks[key]))} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "workers.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
