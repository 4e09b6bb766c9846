#!/usr/bin/env python3
"""Where taskd's time goes in W1 (dispatch) and W3 (one submit): the figures behind
"Where the time goes" in docs/performance.md. Needs target/release/taskd (bench/run builds
it) and perf; valgrind for --callgrind.

  python3 bench/profile.py dispatch [N]   W1 with N tasks (default 5000): CPU per task of each
                                          daemon thread, then perf's top symbols
  python3 bench/profile.py submit [N]     N `taskd submit` calls (default 200): wall vs CPU
                                          time, then perf's top symbols across the calls
  python3 bench/profile.py callgrind      instruction counts of one `taskd submit` (valgrind)
"""
import os, signal, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid):
    """{thread name: CPU seconds} of a live process."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        fields = s[s.rindex(")") + 2:].split()
        out[name] = out.get(name, 0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def perf_top(data, n=25, comms=None, sort="comm,dso,sym"):
    extra = ["--comms", comms] if comms else []
    rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", sort,
                          "--percent-limit", "0.5", *extra], capture_output=True, text=True).stdout
    lines = [l for l in rep.splitlines() if l.strip() and not l.startswith("#")]
    print("\n".join(lines[:n]))


def dispatch(n):
    env = bench.Env(bench.queue_toml("w", 2, bench.TRUE))
    data = os.path.join(env.dir, "perf.data")
    try:
        env.taskd("pause", "w")
        env.taskd("submit", "w", "--batch", bench.batch_file(n, os.path.join(env.dir, "b.jsonl")))
        env.start()
        before = thread_cpu(env.daemon.pid)
        perf = subprocess.Popen(["perf", "record", "-q", "-F", "4000", "-p", str(env.daemon.pid), "-o", data],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        t0 = time.time()
        env.taskd("resume", "w")
        bench.wait_succeeded(env, n)
        wall = env.query("SELECT max(finished_at) FROM tasks") / 1000.0 - t0
        after = thread_cpu(env.daemon.pid)
        perf.send_signal(signal.SIGINT)
        perf.wait()
        floor = bench.dispatch_floor(n, 2, bench.TRUE)[0]
        print(f"W1 {n} x /bin/true: taskd {n / wall:.0f}/s, floor {floor:.0f}/s (ratio {n / wall / floor:.2f})")
        print("daemon CPU per task, by thread (ms):")
        total = 0
        for name in sorted(after, key=lambda k: -(after[k] - before.get(k, 0))):
            d = after[name] - before.get(name, 0)
            total += d
            if d > 0:
                print(f"  {name:<20} {d * 1000 / n:.3f}")
        print(f"  {'all threads':<20} {total * 1000 / n:.3f}  (wall per task at concurrency 2: {wall * 1000 / n:.3f})")
        print("\nperf: by command (the tasks are 'true'; before exec a forked child is still 'taskd'):")
        perf_top(data, 8, sort="comm")
        print("\nperf: the daemon's own threads, by dso:")
        perf_top(data, 8, comms="taskd,taskd-sqlite-wr,tokio-rt-worker", sort="dso")
        print("\nperf: the daemon's own threads, top symbols:")
        perf_top(data, 30, comms="taskd,taskd-sqlite-wr,tokio-rt-worker")
    finally:
        env.close()


def submit(n):
    env = bench.Env('[queues.q]\ncommand = ["/bin/true"]\n')
    data = os.path.join(env.dir, "perf.data")
    try:
        env.taskd("pause", "q")
        env.taskd("submit", "q", "{}")
        wall, cpu = [], []
        for i in range(n):
            t0 = time.perf_counter()
            p = subprocess.Popen([bench.TASKD, "-c", env.config, "submit", "q", '{"i":%d}' % i],
                                 stdout=subprocess.DEVNULL)
            _, status, ru = os.wait4(p.pid, 0)
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((ru.ru_utime + ru.ru_stime) * 1000)
        start = bench.med(bench.timed(lambda: bench.sh("/bin/true"), 100))
        print(f"one submit: wall median {bench.med(wall):.2f} ms, CPU median {bench.med(cpu):.2f} ms "
              f"(starting /bin/true: {start:.2f} ms)")
        subprocess.run(["perf", "record", "-q", "-F", "10000", "-o", data, "--", "sh", "-c",
                        f"for i in $(seq {n}); do {bench.TASKD} -c {env.config} submit q '{{}}' >/dev/null; done"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        perf_top(data, 40)
    finally:
        env.close()


def callgrind():
    env = bench.Env('[queues.q]\ncommand = ["/bin/true"]\n')
    out = os.path.join(env.dir, "callgrind.out")
    try:
        env.taskd("pause", "q")
        env.taskd("submit", "q", "{}")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", bench.TASKD, "-c", env.config,
                        "submit", "q", "{}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        rep = subprocess.run(["callgrind_annotate", "--inclusive=yes", out], capture_output=True, text=True).stdout
        print("\n".join(rep.splitlines()[:60]))
    finally:
        env.close()


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "dispatch"
    arg = int(sys.argv[2]) if len(sys.argv) > 2 else None
    if what == "dispatch":
        dispatch(arg or 5000)
    elif what == "submit":
        submit(arg or 200)
    elif what == "callgrind":
        callgrind()
    else:
        sys.exit(__doc__)
