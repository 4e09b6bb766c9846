#!/usr/bin/env python3
"""Schedules: how late a slot's task starts, and what 1,000 idle schedules cost the daemon.

    cargo build --release && python3 bench/schedules.py [--taskd target/release/taskd]
        [--slots 200] [--idle 60]

1. Firing delay. Four schedules fire every second (`every = "1s"`, so four slots share each
   second: the busier case) into a queue with free slots, until `--slots` slots fired. For
   each slot: enqueue delay (the task's `created_at` − slot) and start delay (its first
   attempt's `started_at`, taken right before the process is spawned, − slot). Prints p50,
   p99 and the maximum of both.
2. Idle cost. The daemon runs `--idle` seconds with no schedule, then with 1,000 schedules
   none of which fires during the window (`M H * * *` at other hours); each run after 5 s
   of settling. Prints CPU time used as % of one core (from /proc/PID/stat) and resident
   memory (VmRSS) at the end, for both, and the growth. The two runs alternate twice and
   the second pair is reported (the first warms the page cache).
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Daemon:
    def __init__(self, taskd, body):
        self.taskd = taskd
        self.dir = tempfile.mkdtemp(prefix="bench-sched-")
        self.config = os.path.join(self.dir, "taskd.toml")
        with open(self.config, "w") as f:
            f.write('[taskd]\nstate_dir = "state"\nshutdown_grace = "5s"\n\n' + body)
        self.log = open(os.path.join(self.dir, "daemon.log"), "w")
        self.proc = subprocess.Popen([taskd, "-c", self.config, "start"], stdout=subprocess.DEVNULL,
                                     stderr=self.log, env={**os.environ, "RUST_LOG": "warn"})
        for _ in range(500):
            if os.path.exists(os.path.join(self.dir, "state", "taskd.sock")):
                break
            time.sleep(0.02)
        time.sleep(0.3)

    def cli(self, *args):
        return subprocess.run([self.taskd, "-c", self.config, *args], check=True,
                              capture_output=True, text=True).stdout

    def cpu_ticks(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def firing(taskd, slots):
    body = '[queues.q]\nshell = "true"\nconcurrency = 8\n\n'
    for i in range(4):
        body += f'[schedules.s{i}]\nqueue = "q"\nevery = "1s"\n\n'
    d = Daemon(taskd, body)
    try:
        deadline = time.time() + slots / 4 + 60
        while time.time() < deadline:
            tasks = json.loads(d.cli("tasks", "--json", "--limit", "100000"))
            done = [t for t in tasks if t.get("slot") and t["state"] == "succeeded"]
            if len(done) >= slots:
                break
            time.sleep(1)
        done = sorted(done, key=lambda t: (t["slot"], t["schedule"]))[:slots]
        enq, start = [], []
        for t in done:
            h = json.loads(d.cli("show", t["id"], "--json"))["history"][0]
            enq.append(t["created_at"] - t["slot"])
            start.append(h["started_at"] - t["slot"])
        return enq, start
    finally:
        d.close()


def idle(taskd, n, seconds):
    body = '[queues.q]\nshell = "true"\n\n'
    hour = (time.gmtime().tm_hour + 12) % 24
    for i in range(n):
        body += f'[schedules.s{i}]\nqueue = "q"\ncron = "{i % 60} {hour} * * *"\ntimezone = "UTC"\n\n'
    d = Daemon(taskd, body)
    try:
        time.sleep(5)
        t0, c0 = time.time(), d.cpu_ticks()
        time.sleep(seconds)
        t1, c1 = time.time(), d.cpu_ticks()
        hz = os.sysconf("SC_CLK_TCK")
        return 100 * (c1 - c0) / hz / (t1 - t0), d.rss_kib()
    finally:
        d.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--taskd", default=os.path.join(ROOT, "target", "release", "taskd"))
    ap.add_argument("--slots", type=int, default=200)
    ap.add_argument("--idle", type=int, default=60)
    a = ap.parse_args()
    enq, start = firing(a.taskd, a.slots)
    print(f"firing delay over {len(start)} slots (4 schedules, every 1s):")
    print(f"  enqueued - slot: p50 {pct(enq, 50)} ms, p99 {pct(enq, 99)} ms, max {max(enq)} ms")
    print(f"  started  - slot: p50 {pct(start, 50)} ms, p99 {pct(start, 99)} ms, max {max(start)} ms")
    runs = {}
    for _ in range(2):
        for n in (0, 1000):
            runs[n] = idle(a.taskd, n, a.idle)
    (c0, r0), (c1, r1) = runs[0], runs[1000]
    print(f"idle over {a.idle} s:")
    print(f"  no schedules:    CPU {c0:.2f} % of a core, RSS {r0 / 1024:.1f} MiB")
    print(f"  1000 schedules:  CPU {c1:.2f} % of a core, RSS {r1 / 1024:.1f} MiB")
    print(f"  growth:          RSS +{(r1 - r0) / 1024:.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
