#!/usr/bin/env python3
"""Flow control's figures (run by bench/flow.sh; written up in docs/performance.md).

  claim   the claim rate with per-key limits against a queue without keys, through the
          broker: 100,000 waiting tasks on 1,000 keys, 8 slots, 5,000 tasks claimed and
          finished per round, 3 alternated rounds (target/release/examples/flow_bench), on
          SQLite and on a private redis-server, for two layouts of the keys (interleaved:
          consecutive tasks have other keys; grouped: each key's 100 tasks in a row).
  rate    the rate limit's accuracy: N tasks (`date +%s%N` into a file, nothing else) on a
          queue with `rate = "R/s"` (burst 1), pre-filled before the daemons start; the
          starts measured per second against R, on one daemon (SQLite, Redis) and on two
          daemons sharing one redis-server. Every full one-second window from the first
          start is counted (min, mean, max) and the whole run's rate is (N - 1) / (last
          start - first start).

The results are printed as a Markdown table and written to bench/results/flow.md.
"""
import argparse, os, re, shutil, signal, statistics, subprocess, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TASKD = os.path.join(ROOT, "target", "release", "taskd")
BENCH = os.path.join(ROOT, "target", "release", "examples", "flow_bench")

from private_redis import Redis, log


def claim_rows(redis):
    rows = []
    for backend in ["sqlite", "redis"]:
        for layout in ["interleaved", "grouped"]:
            d = tempfile.mkdtemp(prefix="taskd-flow-claim-")
            try:
                if backend == "redis":
                    redis.cli("FLUSHALL")
                    url = redis.url()
                else:
                    url = "sqlite:" + os.path.join(d, "tasks.db")
                log(f"claim {backend} {layout}")
                out = subprocess.run([BENCH, url, layout], capture_output=True, text=True, check=True).stdout
                line = next(l for l in out.splitlines() if l.startswith("claim "))
                log(line)
                f = dict(re.findall(r"(\w+)=(\[[^\]]*\]|\S+)", line))
                rows.append((backend, layout, float(f["keyed_per_s"]), float(f["plain_per_s"]),
                             float(f["ratio"]), f["keyed_rounds"], f["plain_rounds"]))
            finally:
                shutil.rmtree(d, ignore_errors=True)
    return rows


def daemon(conf, logpath):
    err = open(logpath, "w")
    p = subprocess.Popen([TASKD, "-c", conf, "start"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        with open(logpath) as f:
            if "ready" in f.read():
                return p
        if p.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"the daemon did not start: {open(logpath).read()}")


def rate_run(backend, nodes, rate, n, redis):
    """The starts (seconds, sorted) of n tasks at `rate`/s on `nodes` daemons."""
    d = tempfile.mkdtemp(prefix="taskd-flow-rate-")
    procs = []
    try:
        stamps = os.path.join(d, "stamps")
        broker = ""
        if backend == "redis":
            redis.cli("FLUSHALL")
            broker = f'broker = "{redis.url()}"\n'
        confs = []
        for i in range(nodes):
            conf = os.path.join(d, f"taskd-{i}.toml")
            with open(conf, "w") as f:
                f.write(f'[taskd]\nstate_dir = "state-{i}"\n{broker}\n'
                        f'[queues.rt]\nconcurrency = 8\nrate = "{rate}/s"\n'
                        f"shell = 'date +%s%N >> {stamps}'\n")
            confs.append(conf)
        batch = os.path.join(d, "batch.jsonl")
        with open(batch, "w") as f:
            f.write("{}\n" * n)
        subprocess.run([TASKD, "-c", confs[0], "submit", "rt", "--batch", batch],
                       check=True, capture_output=True)
        for i, conf in enumerate(confs):
            procs.append(daemon(conf, os.path.join(d, f"daemon-{i}.log")))
        deadline = time.time() + n / rate * 3 + 30
        lines = []
        while time.time() < deadline:
            try:
                with open(stamps) as f:
                    lines = f.read().split()
            except FileNotFoundError:
                lines = []
            if len(lines) >= n:
                break
            time.sleep(0.2)
        if len(lines) < n:
            raise SystemExit(f"only {len(lines)} of {n} tasks started")
        return sorted(int(x) / 1e9 for x in lines)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


def rate_rows(redis):
    rows = []
    for rate, n in [(20, 200), (100, 1000)]:
        for backend, nodes in [("sqlite", 1), ("redis", 1), ("redis", 2)]:
            log(f"rate {rate}/s, {n} tasks, {backend}, {nodes} node(s)")
            starts = rate_run(backend, nodes, rate, n, redis)
            span = starts[-1] - starts[0]
            measured = (n - 1) / span
            windows = [sum(1 for s in starts if starts[0] + i <= s < starts[0] + i + 1)
                       for i in range(int(span))]
            row = (rate, n, backend, nodes, measured, (measured - rate) / rate * 100,
                   min(windows), statistics.mean(windows), max(windows))
            log("measured %.2f/s (%+.2f %%), per second min %d, mean %.2f, max %d" % row[4:])
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["claim", "rate"])
    args = ap.parse_args()
    redis = Redis(prefix="taskd-flow-redis-")
    out = [f"# Flow control, {time.strftime('%Y-%m-%d %H:%M')} ({os.cpu_count()} cores)", ""]
    try:
        if args.only in (None, "claim"):
            rows = claim_rows(redis)
            out += ["## Claim rate: 100,000 waiting on 1,000 keys (per key 1) vs no keys, 8 slots", "",
                    "| broker | layout | with keys (tasks/s) | without (tasks/s) | ratio | rounds with | rounds without |",
                    "|---|---|---:|---:|---:|---|---|"]
            out += [f"| {b} | {l} | {w:,.0f} | {wo:,.0f} | **{r:.2f}** | {rw} | {ro} |"
                    for b, l, w, wo, r, rw, ro in rows]
            out.append("")
        if args.only in (None, "rate"):
            rows = rate_rows(redis)
            out += ["## Rate limit: starts per second measured vs configured (burst 1)", "",
                    "| configured | tasks | broker | daemons | measured (whole run) | error | per second: min | mean | max |",
                    "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
            out += [f"| {r}/s | {n} | {b} | {k} | {m:.2f}/s | {e:+.2f} % | {lo} | {mean:.2f} | {hi} |"
                    for r, n, b, k, m, e, lo, mean, hi in rows]
            out.append("")
    finally:
        redis.close()
    text = "\n".join(out)
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "flow.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
