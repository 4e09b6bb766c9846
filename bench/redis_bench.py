#!/usr/bin/env python3
"""The Redis broker beside the SQLite one (run by bench/redis.sh; figures in
docs/performance.md).

  W1 dispatch     2,000 x /bin/true at concurrency 2, from a pre-filled queue
  W2 concurrency  500 x sleep 0.01 at concurrency 8, from a pre-filled queue
  enqueue         100,000 tasks in batches of 100 from 4 clients, beside
                  redis-benchmark -t lpush -n 100000 -P 100 -c 4 (alternating, --rounds
                  times); and until all are stored too (plain tasks wait in the inbox)
  claim           20,000 tasks claimed 64 at a time and finished, by 1 and by 2 nodes

W1 and W2 alternate SQLite and Redis, --rounds times, and report medians. Their queues are
pre-filled and stored before the daemon starts (on Redis `taskd tasks` stores the inbox);
W1 is also run with the pre-fill left in the inbox, for the daemon to store while it runs.
The time of a dispatch run is from the daemon's `ready` to `taskd status` counting every
task succeeded (polled every 50 ms), so short runs carry about 50 ms of slack.
"""
import argparse, json, os, re, shutil, statistics, subprocess, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TASKD = os.path.join(ROOT, "target", "release", "taskd")
BENCH = os.path.join(ROOT, "target", "release", "examples", "redis_bench")

from private_redis import Redis, log


def dispatch(broker, redis, n, p, argv, stored=True):
    """Seconds from `ready` to all n succeeded. With stored=False the Redis pre-fill is
    left in the queue's inbox, for the daemon to store inside the timed run."""
    d = tempfile.mkdtemp(prefix="taskd-bench-")
    try:
        conf = os.path.join(d, "taskd.toml")
        b = f'broker = "{redis.url()}"\n' if broker == "redis" else ""
        if broker == "redis":
            redis.cli("FLUSHALL")
        with open(conf, "w") as f:
            f.write(f'[taskd]\nstate_dir = "state"\n{b}\n[queues.w]\nconcurrency = {p}\n'
                    f'command = {json.dumps(argv)}\n')
        batch = os.path.join(d, "batch.jsonl")
        with open(batch, "w") as f:
            f.write("{}\n" * n)
        subprocess.run([TASKD, "-c", conf, "submit", "w", "--batch", batch], check=True,
                       stdout=subprocess.DEVNULL)
        if broker == "redis" and stored:
            # The batch waits in the queue's inbox; listing stores it, so that the queue is
            # pre-filled as SQLite's is (storing is enqueue work, measured apart).
            subprocess.run([TASKD, "-c", conf, "tasks", "--limit", "1"], check=True,
                           stdout=subprocess.DEVNULL)
        logf = open(os.path.join(d, "daemon.log"), "w")
        daemon = subprocess.Popen([TASKD, "-c", conf, "start"], stdout=subprocess.DEVNULL,
                                  stderr=logf, env={**os.environ, "RUST_LOG": "info"})
        try:
            while "ready" not in open(os.path.join(d, "daemon.log")).read():
                time.sleep(0.005)
            t0 = time.monotonic()
            while True:
                s = json.loads(subprocess.run([TASKD, "-c", conf, "status", "--json"],
                                              capture_output=True, text=True, check=True).stdout)
                done = sum(q["counts"]["succeeded"] for q in s["queues"])
                if done >= n:
                    return time.monotonic() - t0
                time.sleep(0.05)
        finally:
            daemon.terminate()
            daemon.wait()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_bench(*args):
    out = subprocess.run([BENCH, *map(str, args)], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=([\d.]+)", out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    redis = Redis(prefix="taskd-redis-bench-")
    rows = []
    try:
        for key, n, p, argv in (("W1", 2000, 2, ["/bin/true"]), ("W2", 500, 8, ["/bin/sleep", "0.01"])):
            times = {"sqlite": [], "redis": [], "inbox": []}
            for r in range(a.rounds):
                for broker in ("sqlite", "redis", "inbox"):
                    if broker == "inbox" and key != "W1":
                        continue
                    t = dispatch("redis" if broker == "inbox" else broker, redis, n, p, argv,
                                 stored=broker != "inbox")
                    times[broker].append(t)
                    log(f"{key} round {r + 1} {broker}: {t:.2f} s ({n / t:.0f} tasks/s)")
            s, rd = statistics.median(times["sqlite"]), statistics.median(times["redis"])
            rows.append((f"{key}: {n} x {' '.join(argv)}, concurrency {p} (tasks/s)",
                         f"{n / s:.0f}", f"{n / rd:.0f}", f"{(n / rd) / (n / s):.2f}"))
            if times["inbox"]:
                ib = statistics.median(times["inbox"])
                rows.append((f"{key} with the pre-fill still in the inbox (stored inside the run)",
                             f"{n / s:.0f}", f"{n / ib:.0f}", f"{(n / ib) / (n / s):.2f}"))

        # Enqueue through taskd's broker and LPUSH alternate on the same server.
        enq, stored, lpushes = [], [], []
        for r in range(a.rounds):
            redis.cli("FLUSHALL")
            e = run_bench("enqueue", redis.url(), 100000, 100, 4)
            log(f"enqueue through taskd's broker, round {r + 1}: {e}")
            redis.cli("FLUSHALL")
            lp = subprocess.run(["redis-benchmark", "-p", str(redis.port), "-t", "lpush", "-n",
                                 "100000", "-P", "100", "-c", "4", "-q"],
                                capture_output=True, text=True).stdout
            m = re.search(r"LPUSH: ([\d.]+) requests per second", lp)
            lpush = float(m.group(1)) if m else float("nan")
            log(f"redis-benchmark -t lpush -P 100 -c 4, round {r + 1}: {lpush:.0f}/s")
            enq.append(float(e["tasks_per_s"]))
            stored.append(float(e["stored_per_s"]))
            lpushes.append(lpush)
        ratios = [x / y for x, y in zip(enq, lpushes)]
        d = tempfile.mkdtemp(prefix="taskd-bench-")
        try:
            se = run_bench("enqueue", "sqlite:" + os.path.join(d, "e.db"), 100000, 100, 4)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        rows.append(("enqueue, batches of 100, 4 clients (tasks/s) / LPUSH -P 100 -c 4 (ops/s)",
                     f"{float(se['tasks_per_s']):.0f}",
                     f"{statistics.median(enq):.0f} / {statistics.median(lpushes):.0f}",
                     f"{statistics.median(ratios):.2f} of LPUSH ("
                     + ", ".join(f"{x:.2f}" for x in ratios) + ")"))
        rows.append(("enqueue and store, end to end (tasks/s)", f"{float(se['stored_per_s']):.0f}",
                     f"{statistics.median(stored):.0f}",
                     f"{statistics.median(stored) / float(se['stored_per_s']):.2f}"))

        for k in (1, 2):
            redis.cli("FLUSHALL")
            c = run_bench("claim", redis.url(), 20000, k)
            d = tempfile.mkdtemp(prefix="taskd-bench-")
            try:
                sc = run_bench("claim", "sqlite:" + os.path.join(d, "c.db"), 20000, k)
            finally:
                shutil.rmtree(d, ignore_errors=True)
            log(f"claim+complete, {k} node(s): redis {c}, sqlite {sc}")
            rows.append((f"claim+complete, {k} node(s) (tasks/s; round trips per task)",
                         f"{float(sc['tasks_per_s']):.0f}",
                         f"{float(c['tasks_per_s']):.0f}; {float(c['round_trips_per_task']):.3f}",
                         f"{float(c['tasks_per_s']) / float(sc['tasks_per_s']):.2f}"))
    finally:
        redis.close()

    cpu = os.cpu_count()
    text = [f"Redis broker beside SQLite, {time.strftime('%Y-%m-%d')}, {cpu} cores, release build, "
            f"redis-server {subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]} "
            f"(AOF everysec), {a.rounds} rounds (medians)", "",
            "| workload | SQLite | Redis | Redis / SQLite |", "|---|---:|---:|---:|"]
    text += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "redis.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
