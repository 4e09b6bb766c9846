#!/usr/bin/env python3
"""The PostgreSQL broker beside SQLite and Redis (run by bench/postgres.sh; figures in
docs/performance.md and docs/postgres.md). A private PostgreSQL (fsync on, pg_stat_statements
loaded) and a private redis-server (AOF everysec) are started for the run.

  W1 dispatch     2,000 x /bin/true at concurrency 2, from a pre-filled queue
  W2 concurrency  500 x sleep 0.01 at concurrency 8, from a pre-filled queue
  enqueue         `taskd submit` one task per call (200 calls); `taskd submit --batch` of
                  10,000 (on PostgreSQL beside one plain INSERT ... SELECT of the same rows into
                  a table like taskd.tasks, from psql: the floor); and on PostgreSQL `SELECT taskd.enqueue(...)` from 4 psql clients at
                  once (2,500 statements each, each its own transaction) beside a plain INSERT
                  of the same rows into a table like taskd.tasks (its columns, defaults and
                  indexes, no trigger): the floor
  claim           2,000 x /bin/true, concurrency 4 per node, by 1 and by 2 daemons on one
                  database: tasks/s, and the statements the daemons sent per task, counted by
                  pg_stat_statements (top-level statements of the daemons' role, BEGIN and
                  COMMIT included; each is one round trip, as tokio-postgres sends them one at
                  a time; the bench's own polls run as another role and are left out)
  latency         enqueue (`taskd submit` returned) -> process started, 200 tasks, idle daemon

A run (W1, W2, claim) is timed from the daemon's `ready` to the last task's finish time as
the store recorded it; its end is checked for every POLL seconds, the same for each backend.

Each workload alternates the backends (A B C, A B C, ... --rounds times); medians are
reported, with the 1-minute load average (/proc/loadavg) read at each measurement, since
the machine may be shared.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
TASKD = os.environ.get("TASKD_BIN", os.path.join(ROOT, "target", "release", "taskd"))
OUT = os.path.join(ROOT, "target", "bench")

from private_redis import Redis, log  # noqa: E402
from private_postgres import Postgres  # noqa: E402
import bench  # noqa: E402  (latency(), the stamp program)

BACKENDS = ("sqlite", "postgres", "redis")
loads = []


def load1():
    with open("/proc/loadavg") as f:
        v = float(f.read().split()[0])
    loads.append(v)
    return v


class Store:
    """A fresh store of one backend for one measurement: its `[taskd]` broker line."""

    def __init__(self, kind, pg, redis, tag):
        self.kind, self.pg, self.redis = kind, pg, redis
        if kind == "postgres":
            self.db = pg.new_db(f"b_{tag}")
            self.line = f'broker = "{pg.url(self.db)}"\n'
        elif kind == "redis":
            redis.cli("FLUSHALL")
            self.line = f'broker = "{redis.url()}"\n'
        else:
            self.line = ""


def conf(d, store, body):
    path = os.path.join(d, "taskd.toml")
    with open(path, "w") as f:
        f.write(f'[taskd]\nstate_dir = "state"\n{store.line}\n{body}\n')
    return path


def taskd(c, *args, **kw):
    return subprocess.run([TASKD, "-c", c, *args], check=True, capture_output=True, text=True, **kw).stdout


def start_daemon(d, c, i=0):
    logf = open(os.path.join(d, f"daemon{i}.log"), "w")
    p = subprocess.Popen([TASKD, "-c", c, "start"], stdout=subprocess.DEVNULL, stderr=logf,
                         env={**os.environ, "RUST_LOG": "info"})
    deadline = time.time() + 30
    while not any(l.rstrip().endswith(" ready") for l in open(logf.name)):
        if time.time() > deadline or p.poll() is not None:
            raise SystemExit("daemon did not start: " + open(logf.name).read())
        time.sleep(0.005)
    return p


def prefill(c, d, store, n):
    batch = os.path.join(d, "batch.jsonl")
    with open(batch, "w") as f:
        f.write("{}\n" * n)
    taskd(c, "submit", "w", "--batch", batch)
    if store.kind == "redis":
        taskd(c, "tasks", "--limit", "1")  # stores the inbox, as bench/redis_bench.py does


POLL = 0.25  # seconds between checks for the end of a run, the same for every backend


def wait_done(c, n, store, poll_role=None):
    """Wait until n tasks have succeeded, checking every POLL seconds. A check is a process
    and (on PostgreSQL) a connection and queries on the server under test: checked every
    50 ms they took a share of the 2 cores from the daemon, more on PostgreSQL than on
    SQLite, and the run's end was only known to within the interval. The end is read
    afterwards from the tasks' own finish times instead (last_finish)."""
    while True:
        if store.kind == "postgres" and poll_role:
            done = int(store.pg.psql(store.db, "SELECT count(*) FROM taskd.tasks WHERE state = 'succeeded'",
                                     user=poll_role).strip() or 0)
        else:
            s = json.loads(taskd(c, "status", "--json"))
            done = sum(q["counts"]["succeeded"] for q in s["queues"])
        if done >= n:
            return
        time.sleep(POLL)


def last_finish(c, n):
    """When the last of the n succeeded tasks finished, as the daemon recorded it (seconds
    since the epoch; the store's clock, this machine's)."""
    tasks = json.loads(taskd(c, "tasks", "--state", "succeeded", "--limit", str(n), "--json"))
    if len(tasks) < n:
        raise SystemExit(f"{len(tasks)} succeeded tasks listed, {n} expected")
    return max(t["finished_at"] for t in tasks) / 1000


def dispatch(kind, pg, redis, n, p, argv, tag):
    """Seconds from `ready` to all n succeeded, one daemon."""
    d = tempfile.mkdtemp(prefix="taskd-bench-")
    try:
        store = Store(kind, pg, redis, tag)
        c = conf(d, store, f"[queues.w]\nconcurrency = {p}\ncommand = {json.dumps(argv)}\n")
        prefill(c, d, store, n)
        daemon = start_daemon(d, c)
        try:
            t0 = time.time()  # wall clock, as the finish times are
            wait_done(c, n, store)
            return last_finish(c, n) - t0
        finally:
            daemon.terminate()
            daemon.wait()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def statements(store):
    """Top-level statements the daemons' role sent, per pg_stat_statements."""
    return int(store.pg.psql("postgres", "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s "
                             "JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = 'postgres' "
                             f"AND s.dbid = (SELECT oid FROM pg_database WHERE datname = '{store.db}')").strip())


def claim(kind, pg, redis, nodes, n, tag):
    """tasks/s of `nodes` daemons on one store; on PostgreSQL also statements per task."""
    dirs = [tempfile.mkdtemp(prefix="taskd-bench-") for _ in range(nodes)]
    try:
        store = Store(kind, pg, redis, tag)
        if kind == "sqlite" and nodes > 1:
            return None, None
        body = '[queues.w]\nconcurrency = 4\ncommand = ["/bin/true"]\n'
        cs = [conf(d, store, body) for d in dirs]
        prefill(cs[0], dirs[0], store, n)
        if kind == "postgres":
            pg.psql("postgres", "SELECT pg_stat_statements_reset()")
        daemons = [start_daemon(d, c, i) for i, (d, c) in enumerate(zip(dirs, cs))]
        try:
            t0 = time.time()
            wait_done(cs[0], n, store, poll_role="bench_poll")
            took = last_finish(cs[0], n) - t0
            per_task = statements(store) / n if kind == "postgres" else None
            return n / took, per_task
        finally:
            for dm in daemons:
                dm.terminate()
            for dm in daemons:
                dm.wait()
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def enqueue_cli(kind, pg, redis, singles, batch_n, tag):
    d = tempfile.mkdtemp(prefix="taskd-bench-")
    try:
        store = Store(kind, pg, redis, tag)
        c = conf(d, store, '[queues.w]\ncommand = ["/bin/true"]\n')
        taskd(c, "submit", "w", "{}")  # the schema and the queue exist
        t0 = time.monotonic()
        for _ in range(singles):
            taskd(c, "submit", "w", "{}")
        single = singles / (time.monotonic() - t0)
        batch = os.path.join(d, "batch.jsonl")
        with open(batch, "w") as f:
            f.write("{}\n" * batch_n)
        t0 = time.monotonic()
        taskd(c, "submit", "w", "--batch", batch)
        rate = batch_n / (time.monotonic() - t0)
        floor = None
        if kind == "postgres":
            # The floor: the same rows in one statement into a table like taskd.tasks (its
            # columns, defaults and indexes, no trigger), from a psql process as the batch
            # came from a taskd process.
            pg.psql(store.db, "CREATE TABLE public.floor (LIKE taskd.tasks INCLUDING DEFAULTS INCLUDING INDEXES)")
            t0 = time.monotonic()
            pg.psql(store.db, "INSERT INTO public.floor (id, queue, state, payload, run_at, created_at, updated_at) "
                    f"SELECT gen_random_uuid()::text, 'w', 'queued', '{{}}', {NOW_MS}, {NOW_MS}, {NOW_MS} "
                    f"FROM generate_series(1, {batch_n})")
            floor = batch_n / (time.monotonic() - t0)
        return single, rate, floor
    finally:
        shutil.rmtree(d, ignore_errors=True)


NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"


def sql_clients(pg, db, stmt, clients, each):
    """Statements per second: `clients` psql processes at once, each sending `each` copies of
    `stmt` (autocommit: each its own transaction)."""
    script = os.path.join(pg.dir, f"script-{abs(hash(stmt))}.sql")
    with open(script, "w") as f:
        f.write((stmt + "\n") * each)
    argv = [os.path.join(pg.bin, "psql"), "-X", "-q", "-o", "/dev/null", "-v", "ON_ERROR_STOP=1",
            "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-d", db, "-f", script]
    t0 = time.monotonic()
    procs = [subprocess.Popen(argv) for _ in range(clients)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"psql failed on {stmt!r}")
    return clients * each / (time.monotonic() - t0)


def enqueue_sql(pg, tag, clients=4, each=2500):
    """taskd.enqueue and the plain INSERT floor, alternating; each on a fresh database."""
    db = pg.new_db(f"s_{tag}")
    d = tempfile.mkdtemp(prefix="taskd-bench-")
    try:
        store = type("S", (), {"line": f'broker = "{pg.url(db)}"\n'})()
        taskd(conf(d, store, '[queues.w]\ncommand = ["/bin/true"]\n'), "migrate")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    pg.psql(db, "CREATE TABLE public.floor (LIKE taskd.tasks INCLUDING DEFAULTS INCLUDING INDEXES)")
    fn = sql_clients(pg, db, "SELECT taskd.enqueue('w', '{}'::jsonb);", clients, each)
    floor = sql_clients(pg, db, "INSERT INTO public.floor (id, queue, state, payload, run_at, created_at, "
                        f"updated_at) VALUES (gen_random_uuid()::text, 'w', 'queued', '{{}}', {NOW_MS}, "
                        f"{NOW_MS}, {NOW_MS});", clients, each)
    return fn, floor


def latency(kind, pg, redis, n, tag):
    d = tempfile.mkdtemp(prefix="taskd-bench-")
    try:
        store = Store(kind, pg, redis, tag)
        stamp = os.path.join(OUT, "stamp")
        stamps = os.path.join(d, "stamps")
        c = conf(d, store, f'[queues.lat]\nconcurrency = 2\ncommand = ["{stamp}", "{stamps}"]\n')
        taskd(c, "migrate") if kind == "postgres" else None
        daemon = start_daemon(d, c)
        try:
            lat = bench.latency(lambda: taskd(c, "submit", "lat", "{}"), stamps, n)
            return statistics.median(lat), bench.pct(lat, 99)
        finally:
            daemon.terminate()
            daemon.wait()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    return "—" if x is None else f"{x:,.{digits}f}"


def main():
    global POLL
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="W1,W2,enqueue,sql,claim,latency")
    ap.add_argument("--poll", type=float, default=POLL,
                    help="seconds between checks for a run's end (0.05 was the earlier measure)")
    a = ap.parse_args()
    POLL = a.poll
    only = set(a.only.split(","))
    os.makedirs(OUT, exist_ok=True)
    subprocess.run(["cc", "-O2", "-o", os.path.join(OUT, "stamp"), os.path.join(HERE, "stamp.c")], check=True)
    pg, redis = Postgres(), Redis(prefix="taskd-pg-bench-redis-")
    pg.psql("postgres", "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    pg.psql("postgres", "CREATE ROLE bench_poll LOGIN SUPERUSER")
    rows = []
    tag = iter(range(1_000_000))
    try:
        for key, n, p, argv in (("W1", 2000, 2, ["/bin/true"]), ("W2", 500, 8, ["/bin/sleep", "0.01"])):
            if key not in only:
                continue
            times, ld = {b: [] for b in BACKENDS}, []
            for r in range(a.rounds):
                for b in BACKENDS:
                    ld.append(load1())
                    t = dispatch(b, pg, redis, n, p, argv, next(tag))
                    times[b].append(t)
                    log(f"{key} round {r + 1} {b}: {t:.2f} s ({n / t:.0f} tasks/s), load {ld[-1]}")
            rate = {b: n / med(times[b]) for b in BACKENDS}
            ratios = [times["sqlite"][i] / times["postgres"][i] for i in range(a.rounds)]
            rows.append((f"{key}: {n} x {' '.join(argv)}, concurrency {p} (tasks/s)", fmt(rate["sqlite"]),
                         fmt(rate["postgres"]), fmt(rate["redis"]),
                         f"{med(ratios):.2f} (" + ", ".join(f"{x:.2f}" for x in ratios) + ")",
                         f"{min(ld):.1f}–{max(ld):.1f}"))
        if "enqueue" in only:
            single, batch, ld = {b: [] for b in BACKENDS}, {b: [] for b in BACKENDS}, []
            floors = []
            for r in range(a.rounds):
                for b in BACKENDS:
                    ld.append(load1())
                    s1, bt, fl = enqueue_cli(b, pg, redis, 200, 10000, next(tag))
                    single[b].append(s1)
                    batch[b].append(bt)
                    if fl is not None:
                        floors.append(fl)
                    log(f"enqueue round {r + 1} {b}: single {s1:.0f}/s, batch {bt:.0f}/s"
                        + (f" (plain INSERT of the same rows {fl:.0f}/s)" if fl else "") + f", load {ld[-1]}")
            for name, v in (("enqueue, `taskd submit` one per call, 200 calls (tasks/s)", single),
                            ("enqueue, `taskd submit --batch` of 10,000 (tasks/s)", batch)):
                ratios = [v["postgres"][i] / v["sqlite"][i] for i in range(a.rounds)]
                rows.append((name, fmt(med(v["sqlite"])), fmt(med(v["postgres"])), fmt(med(v["redis"])),
                             f"{med(ratios):.2f} (" + ", ".join(f"{x:.2f}" for x in ratios) + ")",
                             f"{min(ld):.1f}–{max(ld):.1f}"))
            ratios = [x / y for x, y in zip(batch["postgres"], floors)]
            rows.append(("enqueue, `taskd submit --batch` of 10,000 / one plain `INSERT … SELECT` of the same rows "
                         "from psql (rows/s)", "—", f"{fmt(med(batch['postgres']))} / {fmt(med(floors))}", "—",
                         f"{med(ratios):.2f} of the INSERT (" + ", ".join(f"{x:.2f}" for x in ratios) + ")",
                         f"{min(ld):.1f}–{max(ld):.1f}"))
        if "sql" in only:
            fns, floors, ld = [], [], []
            for r in range(a.rounds):
                ld.append(load1())
                fn, floor = enqueue_sql(pg, next(tag))
                fns.append(fn)
                floors.append(floor)
                log(f"SQL enqueue round {r + 1}: taskd.enqueue {fn:.0f}/s, plain INSERT {floor:.0f}/s, load {ld[-1]}")
            ratios = [x / y for x, y in zip(fns, floors)]
            rows.append(("enqueue, `SELECT taskd.enqueue(...)` from 4 psql clients, 10,000 (tasks/s) / plain INSERT of the same rows (rows/s)",
                         "—", f"{fmt(med(fns))} / {fmt(med(floors))}", "—",
                         f"{med(ratios):.2f} of the INSERT (" + ", ".join(f"{x:.2f}" for x in ratios) + ")",
                         f"{min(ld):.1f}–{max(ld):.1f}"))
        if "claim" in only:
            for nodes in (1, 2):
                rate, stm, ld = {b: [] for b in BACKENDS}, [], []
                for r in range(a.rounds):
                    for b in BACKENDS:
                        ld.append(load1())
                        t, per = claim(b, pg, redis, nodes, 2000, next(tag))
                        rate[b].append(t)
                        if per is not None:
                            stm.append(per)
                        log(f"claim+complete {nodes} node(s) round {r + 1} {b}: {fmt(t)} tasks/s"
                            + (f", {per:.2f} statements/task" if per else "") + f", load {ld[-1]}")
                rows.append((f"claim+complete, 2,000 x /bin/true, {nodes} node(s), concurrency 4 each "
                             "(tasks/s; PostgreSQL: statements per task)",
                             fmt(med(rate["sqlite"])), f"{fmt(med(rate['postgres']))}; {med(stm):.2f}",
                             fmt(med(rate["redis"])),
                             "—" if nodes > 1 else f"{med(rate['postgres']) / med(rate['sqlite']):.2f}",
                             f"{min(ld):.1f}–{max(ld):.1f}"))
        if "latency" in only:
            p50, p99, ld = {b: [] for b in BACKENDS}, {b: [] for b in BACKENDS}, []
            for r in range(a.rounds):
                for b in BACKENDS:
                    ld.append(load1())
                    m, h = latency(b, pg, redis, 200, next(tag))
                    p50[b].append(m)
                    p99[b].append(h)
                    log(f"latency round {r + 1} {b}: p50 {m:.2f} ms, p99 {h:.2f} ms, load {ld[-1]}")
            rows.append(("enqueue → start latency, 200 tasks, idle daemon: p50 / p99 (ms)",
                         f"{med(p50['sqlite']):.2f} / {med(p99['sqlite']):.2f}",
                         f"{med(p50['postgres']):.2f} / {med(p99['postgres']):.2f}",
                         f"{med(p50['redis']):.2f} / {med(p99['redis']):.2f}",
                         f"{med(p50['postgres']) / med(p50['sqlite']):.2f}",
                         f"{min(ld):.1f}–{max(ld):.1f}"))
        version = pg.version()
    finally:
        pg.close()
        redis.close()

    text = [f"PostgreSQL broker beside SQLite and Redis, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"{os.cpu_count()} cores, release build, PostgreSQL {version} (fsync on, defaults), "
            f"redis-server (AOF everysec), {a.rounds} round(s), alternated (medians)", "",
            "| workload | SQLite | PostgreSQL | Redis | PostgreSQL / SQLite (per round) | load (1 min) |",
            "|---|---:|---:|---:|---:|---:|"]
    text += ["| " + " | ".join(r) + " |" for r in rows]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "postgres.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
