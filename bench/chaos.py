"""The chaos suite: a mixed workload on real taskd daemons while faults are injected at random
times, then an invariant checker that reads the whole history through the CLI's --json.
See docs/chaos.md. Run it with bench/chaos (which builds the release binary first)."""
import argparse, collections, concurrent.futures, json, os, random, shutil, signal, subprocess
import sys, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from peers import free_port  # noqa: E402

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
TERMINAL = {"succeeded", "failed", "cancelled"}
UNCHARGED = {"lost", "shutdown"}
TOLERANCE_MS = 50           # a retry may start this much before its backoff has passed
LATE_MS = 15_000            # ...and this much after it, when no fault was near (queue `flaky`)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def now_ms():
    return int(time.time() * 1000)


def parse_duration(text):
    units = {"s": 1, "m": 60, "h": 3600}
    if text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


# --- the queues and the workload ----------------------------------------------------------

SCRIPT = ('printf \'%s %s %s\\n\' "$TASKD_TASK_ID" "$TASKD_ATTEMPT" "$$" >> "$LEDGER"; '
          'if [ -n "$TASKD_ARG_escape" ]; then setsid sleep 600 </dev/null >/dev/null 2>&1 & fi; '
          'sleep "$TASKD_ARG_secs"; '
          'if [ "$TASKD_ATTEMPT" -lt "$TASKD_ARG_ok_from" ]; then exit "$TASKD_ARG_code"; fi')

# name: (config lines, max_attempts, backoff base s, backoff max s, fail_exit_codes)
QUEUES = {
    "quick": dict(concurrency=4, timeout="10s", max_attempts=3, base=1, max=4, permanent=[64]),
    "slow": dict(concurrency=3, timeout="60s", max_attempts=3, base=2, max=8, permanent=[64]),
    "flaky": dict(concurrency=4, timeout="10s", max_attempts=4, base=2, max=8, permanent=[64]),
    "timeouts": dict(concurrency=2, timeout="2s", max_attempts=2, base=1, max=2, permanent=[64]),
    "escape": dict(concurrency=2, timeout="10s", max_attempts=3, base=1, max=4, permanent=[64]),
    "work": dict(concurrency=3, timeout="10s", max_attempts=3, base=1, max=4, permanent=[],
                 worker=True),
}


def backoff_ms(queue, number):
    q = QUEUES[queue]
    return int(min(q["base"] * 2 ** (number - 1), q["max"]) * 1000)


def config_text(run, node, broker_url, lease):
    lines = ["[taskd]", f'state_dir = "{run.state}/{node}"', 'shutdown_grace = "5s"']
    if broker_url:
        lines += [f'broker = "{broker_url}"', f'lease = "{lease}s"']
    lines += ["", "[defaults]", 'kill_grace = "1s"', 'output_tail = "1KiB"', ""]
    env = f'env = {{ LEDGER = "{run.ledger}", CHAOS_RUN = "{run.token}" }}'
    for name, q in QUEUES.items():
        lines.append(f"[queues.{name}]")
        if q.get("worker"):
            lines.append(f'worker = ["python3", "{HERE}/chaos_worker.py"]')
        else:
            lines.append("shell = " + json.dumps(SCRIPT))
            lines.append(f"fail_exit_codes = {q['permanent']}")
        lines += [f"concurrency = {q['concurrency']}", f'timeout = "{q["timeout"]}"',
                  f"max_attempts = {q['max_attempts']}",
                  f'backoff = {{ kind = "exponential", base = "{q["base"]}s", '
                  f'max = "{q["max"]}s", jitter = false }}', env, ""]
    return "\n".join(lines)


def payload(rng, queue):
    """One task of `queue`, and the plan the checker holds it to."""
    p = {"secs": "0", "ok_from": 1, "code": 1, "escape": ""}
    r = rng.random()
    if queue == "quick":
        p["secs"] = f"{rng.uniform(0.01, 0.3):.2f}"
        if r < 0.15:
            p["ok_from"] = rng.randint(2, 3)          # fails, then succeeds
        elif r < 0.22:
            p["ok_from"] = 99                          # fails every attempt
        elif r < 0.27:
            p["ok_from"], p["code"] = 99, 64           # a permanent failure
    elif queue == "slow":
        p["secs"] = f"{rng.uniform(3, 20):.1f}"
        if r < 0.1:
            p["ok_from"] = 2
    elif queue == "flaky":
        p["secs"] = f"{rng.uniform(0.05, 1):.2f}"
        p["ok_from"] = rng.randint(1, 5)
    elif queue == "timeouts":
        p["secs"] = f"{rng.uniform(0.5, 4):.1f}"      # past 2 s it times out
    elif queue == "escape":
        p["secs"] = f"{rng.uniform(0.1, 3):.1f}"
        p["escape"] = "1"
    elif queue == "work":
        p = {"secs": f"{rng.uniform(0.01, 1.5):.2f}", "ok_from": 1, "fail": "retry"}
        if r < 0.15:
            p["ok_from"] = rng.randint(2, 3)
        elif r < 0.2:
            p["ok_from"], p["fail"] = 2, "error"
        elif r < 0.25:
            p["ok_from"], p["fail"] = 2, "crash"
        elif r < 0.28:
            p["secs"] = "12"                           # past its 10 s timeout
    return p


# --- processes ----------------------------------------------------------------------------

def environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_of_run(token):
    """Every live process that carries the run's marker in its environment: what the
    tasks and workers of this run started (the daemons do not carry it)."""
    mark = f"CHAOS_RUN={token}".encode()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and mark in environ(int(d)):
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                if stat[0] == "Z":
                    continue
                out.append((int(d), int(stat[2]), cmdline(int(d))))   # pid, pgid, cmdline
            except (OSError, IndexError):
                pass
    return out


# A shared broker is a server class (start, kill9, url, close): Redis and PostgreSQL.
class Redis:
    """A private redis-server with the settings docs/redis.md asks for (AOF, everysec,
    noeviction): its own port and directory, restartable on the same port. A kill -9 of it
    must lose nothing it acknowledged (the AOF is written before a reply; everysec only
    delays its fsync, which a process crash does not need)."""

    def __init__(self, run):
        self.dir = os.path.join(run.dir, "redis")
        os.makedirs(self.dir)
        self.port = free_port()
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
             "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            r = subprocess.run(["redis-cli", "-p", str(self.port), "PING"], capture_output=True,
                               text=True)
            if r.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def pg_bin_dir():
    """The directory holding initdb and postgres: Debian's /usr/lib/postgresql/<version>/bin
    (newest first), then /usr/local/bin and PATH, as tests/common/postgres.rs looks."""
    dirs = []
    try:
        versions = sorted(os.listdir("/usr/lib/postgresql"),
                          key=lambda v: int(v.split(".")[0]) if v.split(".")[0].isdigit() else 0,
                          reverse=True)
        dirs = [os.path.join("/usr/lib/postgresql", v, "bin") for v in versions]
    except OSError:
        pass
    dirs += ["/usr/local/bin"] + os.environ.get("PATH", "").split(os.pathsep)
    for d in dirs:
        if os.path.isfile(os.path.join(d, "initdb")) and os.path.isfile(os.path.join(d, "postgres")):
            return d
    return None


class Postgres:
    """A private PostgreSQL server: initdb in the run directory, its own port, the server's
    default durability (fsync on, synchronous_commit on). As root it runs as the `postgres`
    system user (PostgreSQL refuses root). Its restart fault is a crash: SIGKILL of the
    postmaster and every backend at once (its own process group), then a start on the same
    data and port, which replays the WAL. It must lose nothing it acknowledged: a commit
    returns once its WAL record is written and flushed."""

    def __init__(self, run):
        self.bin = pg_bin_dir()
        if self.bin is None:
            raise SystemExit("PostgreSQL (initdb, postgres) is missing (apt-get install postgresql)")
        self.dir = os.path.join(run.dir, "postgres")
        os.makedirs(self.dir, mode=0o700)
        self.user = None
        if os.geteuid() == 0:
            import pwd
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise SystemExit("running as root, the server runs as the `postgres` system "
                                 "user, which does not exist (apt-get install postgresql)")
            self.user = (pw.pw_uid, pw.pw_gid)
            os.chmod(run.dir, 0o711)           # the server's user passes through to its dir
            os.chown(self.dir, *self.user)
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "postgres.log")
        r = subprocess.run([os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres",
                            "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                           capture_output=True, text=True, preexec_fn=self.as_server,
                           cwd=self.dir)
        if r.returncode != 0:
            raise SystemExit(f"initdb failed: {r.stdout}{r.stderr}")
        self.port = free_port()
        self.proc = None
        self.start()

    def as_server(self):
        if self.user:
            os.setgid(self.user[1])
            os.setuid(self.user[0])

    def start(self):
        log_file = open(self.log, "a")
        if self.user:
            os.chown(self.log, *self.user)
        self.proc = subprocess.Popen(
            [os.path.join(self.bin, "postgres"), "-D", self.data, "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
             "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd=self.dir,
            preexec_fn=self.as_server, start_new_session=True)
        log_file.close()
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"postgres exited ({self.proc.returncode}): see {self.log}")
            r = subprocess.run([os.path.join(self.bin, "pg_isready"), "-q", "-h", "127.0.0.1",
                                "-p", str(self.port)], capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise SystemExit(f"postgres did not start: see {self.log}")

    def kill9(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # the postmaster and its backends
        except ProcessLookupError:
            pass
        self.proc.wait()
        # A backend must not outlive its postmaster (the next one would refuse the data
        # directory while it holds the shared memory): wait until the group is empty.
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)

    def url(self):
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres?sslmode=disable"

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()          # smart shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()



SHARED = {"redis": Redis, "postgres": Postgres}


class Node:
    """One taskd daemon: its config, its process, kill -9 and restart."""

    def __init__(self, run, name, broker_url, lease, faketime):
        self.run, self.name = run, name
        self.conf = os.path.join(run.dir, f"{name}.toml")
        with open(self.conf, "w") as f:
            f.write(config_text(run, name, broker_url, lease))
        os.makedirs(os.path.join(run.state, name), exist_ok=True)
        self.log = os.path.join(run.dir, f"{name}.log")
        self.env = dict(os.environ, RUST_LOG="info")
        if faketime:
            self.env.update(LD_PRELOAD=FAKETIME_LIB, FAKETIME_TIMESTAMP_FILE=run.faketime_file,
                            FAKETIME_CACHE_DURATION="1", FAKETIME_DONT_FAKE_MONOTONIC="1")
        self.proc = None
        self.stopped = False
        self.starts = 0

    def start(self):
        self.proc = subprocess.Popen([self.run.taskd, "-c", self.conf, "start",
                                      "--log-file", self.log],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log + ".stderr", "a"), env=self.env)
        self.starts += 1

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        if self.stopped:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.stopped = False
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout=60):
        if not self.alive():
            return self.proc.returncode if self.proc else None
        if self.stopped:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.stopped = False
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "killed after 60 s"


# --- the run ------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.args = args
        self.seed = args.seed if args.seed is not None else random.randrange(1 << 32)
        self.rng = random.Random(self.seed)
        self.wrng = random.Random(self.seed ^ 0x5EED)     # the workload's own stream
        self.token = f"{self.seed:x}-{os.getpid()}"
        self.dir = tempfile.mkdtemp(prefix="taskd-chaos-")
        self.state = os.path.join(self.dir, "state")
        os.makedirs(self.state)
        self.ledger = os.path.join(self.dir, "ledger")
        open(self.ledger, "w").close()
        self.faketime_file = os.path.join(self.dir, "faketime")
        self.taskd = args.taskd
        self.mounted = False
        self.server = None                # the shared broker's server (Redis, PostgreSQL)
        self.nodes = []
        self.acked = {}                   # id -> (queue, payload)
        self.refused = collections.Counter()
        self.faults = collections.Counter()
        self.windows = []                 # (start ms, end ms, kind): when a fault disturbed
        self.clock_steps = []             # (real ms, offset s after it)
        self.events = []                  # things the run saw that are not violations
        self.stop = threading.Event()
        self.lock = threading.Lock()

    # -- set-up and tear-down

    def setup(self):
        if self.args.disk and os.geteuid() == 0:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.args.tmpfs_mib}m",
                                "taskd-chaos", self.state], capture_output=True, text=True)
            if r.returncode == 0:
                self.mounted = True
            else:
                self.events.append(f"no tmpfs for the state directory: {r.stderr.strip()}")
        elif self.args.disk:
            self.events.append("not root: the state directory is not on a tmpfs, no disk faults")
        faketime = False
        if self.args.broker == "sqlite" and self.args.clock:
            if os.path.exists(FAKETIME_LIB):
                faketime = True
                with open(self.faketime_file, "w") as f:
                    f.write("+0\n")
            else:
                self.events.append("libfaketime is not installed (apt-get install faketime): "
                                   "no clock steps")
        self.faketime = faketime
        url, lease = None, None
        if self.args.broker in SHARED:
            self.server = SHARED[self.args.broker](self)
            url, lease = self.server.url(), self.args.lease
        n = self.args.nodes if self.server else 1
        for i in range(n):
            self.nodes.append(Node(self, f"n{i + 1}", url, lease, faketime))
        for node in self.nodes:
            node.start()
        self.wait_daemons()
        st = self.cli_json("status", "--json")
        self.containment = ((st or {}).get("daemon") or {}).get("containment") or "unknown"
        self.cgroups = "cgroup" in self.containment and "process groups only" not in self.containment
        if not self.cgroups:
            self.events.append(f"no cgroups ({self.containment}): queue `escape` is left out")
            QUEUES.pop("escape", None)

    def wait_daemons(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.cli_json("status", "--json")
            if st and st.get("daemon"):
                return
            time.sleep(0.2)
        raise SystemExit("the daemon did not come up: see " + self.nodes[0].log)

    def teardown(self):
        for node in self.nodes:
            if node.alive():
                node.kill9()
        if self.server:
            self.server.close()
        if self.mounted:
            self.unfill()
            subprocess.run(["umount", "-l", self.state])
            self.mounted = False

    # -- the CLI

    def cli(self, *args, timeout=120, conf=None):
        conf = conf or self.nodes[0].conf
        try:
            return subprocess.run([self.taskd, "-c", conf, *args], capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return None

    def cli_json(self, *args, timeout=120):
        r = self.cli(*args, timeout=timeout)
        if r is None or r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    # -- the workload

    def producer(self):
        weights = {"quick": 50, "slow": 4, "flaky": 10, "timeouts": 6, "escape": 5, "work": 25}
        names = [q for q in weights if q in QUEUES]
        batch_file = os.path.join(self.dir, "batch.jsonl")
        while not self.stop.is_set():
            queue = self.wrng.choices(names, [weights[q] for q in names])[0]
            size = {"slow": 1, "timeouts": 2, "escape": 2}.get(queue, self.wrng.randint(1, 12))
            payloads = [payload(self.wrng, queue) for _ in range(size)]
            with open(batch_file, "w") as f:
                for p in payloads:
                    f.write(json.dumps(p) + "\n")
            r = self.cli("submit", queue, "--batch", batch_file, "--json", timeout=90)
            if r is None:
                self.refused["timed out (not acknowledged)"] += size
            elif r.returncode != 0:
                self.refused[f"exit {r.returncode}"] += size
            else:
                ids = json.loads(r.stdout)["ids"]
                with self.lock:
                    for i, p in zip(ids, payloads):
                        self.acked[i] = (queue, p)
            self.stop.wait(self.wrng.expovariate(1 / self.args.submit_every))

    # -- the faults

    def fault_kinds(self):
        kinds = ["daemon_kill9", "worker_kill9", "task_kill9"]
        if self.server:
            kinds += ["node_sigstop", f"{self.args.broker}_restart"]
        if self.mounted:
            kinds += ["disk_full", "crash_while_full"]
        if self.server:
            kinds.append("crash_in_outage")
        if self.faketime:
            kinds.append("clock_step")
        if self.args.faults:
            kinds = [k for k in kinds if k in self.args.faults.split(",")]
        return kinds

    def window(self, kind, start):
        self.windows.append((start, now_ms(), kind))
        self.faults[kind] += 1

    def injector(self):
        kinds = self.fault_kinds()
        if not kinds:
            return
        while not self.stop.wait(self.rng.expovariate(1 / self.args.fault_every)):
            kind = self.rng.choice(kinds)
            start = now_ms()
            try:
                done = getattr(self, "fault_" + kind)()
            except Exception as e:  # a fault that could not be injected is reported
                self.events.append(f"{kind}: could not inject: {e!r}")
                continue
            if done is not False:
                self.window(kind, start)
            self.keep_alive()

    def keep_alive(self):
        """A daemon that exited by itself is an event to report, and is started again."""
        for node in self.nodes:
            if not node.alive():
                code = node.proc.returncode
                self.events.append(f"{node.name} exited by itself (status {code}) at "
                                   f"{time.strftime('%H:%M:%S')}; started again")
                node.start()

    def fault_daemon_kill9(self):
        node = self.rng.choice(self.nodes)
        node.kill9()
        self.stop.wait(self.rng.uniform(0.2, 3))
        node.start()

    def fault_worker_kill9(self):
        workers = [p for p, _, c in processes_of_run(self.token) if "chaos_worker.py" in c]
        if not workers:
            return False
        os.kill(self.rng.choice(workers), signal.SIGKILL)

    def fault_task_kill9(self):
        leaders = [g for p, g, c in processes_of_run(self.token)
                   if p == g and c.startswith("/bin/sh -c")]
        if not leaders:
            return False
        try:
            os.killpg(self.rng.choice(leaders), signal.SIGKILL)
        except ProcessLookupError:
            return False

    def fault_node_sigstop(self):
        node = self.rng.choice(self.nodes)
        os.kill(node.proc.pid, signal.SIGSTOP)
        node.stopped = True
        self.stop.wait(self.args.lease + self.rng.uniform(6, 12))   # past its lease
        os.kill(node.proc.pid, signal.SIGCONT)
        node.stopped = False

    def fault_redis_restart(self):
        self.server.kill9()
        self.stop.wait(self.rng.uniform(0.5, 5))
        self.server.start()

    fault_postgres_restart = fault_redis_restart

    def fill(self):
        path = os.path.join(self.state, "fill")
        chunk = b"\0" * (1 << 20)
        try:
            with open(path, "ab") as f:
                while True:
                    f.write(chunk)
                    f.flush()
        except OSError:
            pass

    def unfill(self):
        try:
            os.unlink(os.path.join(self.state, "fill"))
        except FileNotFoundError:
            pass

    def fault_disk_full(self):
        self.fill()
        self.stop.wait(self.rng.uniform(2, 10))
        self.unfill()

    def fault_crash_while_full(self):
        """Two faults at once: a daemon dies while the state directory's disk is full (the
        tasks that started meanwhile could be noted nowhere)."""
        self.fill()
        self.stop.wait(self.rng.uniform(1, 4))
        node = self.rng.choice(self.nodes)
        node.kill9()
        self.stop.wait(self.rng.uniform(0, 3))
        self.unfill()
        node.start()

    def fault_crash_in_outage(self):
        """Two faults at once: a node dies while the broker is down (the starts it could
        not record)."""
        self.server.kill9()
        self.stop.wait(self.rng.uniform(1, 4))
        node = self.rng.choice(self.nodes)
        node.kill9()
        self.stop.wait(self.rng.uniform(0, 2))
        self.server.start()
        node.start()

    def fault_clock_step(self):
        cur = self.clock_steps[-1][1] if self.clock_steps else 0
        step = self.rng.choice([-1, 1]) * self.rng.randint(5, 60)
        new = max(-30, min(300, cur + step))
        with open(self.faketime_file + ".tmp", "w") as f:
            f.write(f"{new:+d}\n")
        os.replace(self.faketime_file + ".tmp", self.faketime_file)
        self.clock_steps.append((now_ms(), new))

    # -- the end

    def settle(self):
        """Faults stop; every node runs; the backlog drains (every acknowledged task ends)."""
        for node in self.nodes:
            if node.stopped:
                os.kill(node.proc.pid, signal.SIGCONT)
                node.stopped = False
        if self.mounted:
            self.unfill()
        if self.server and self.server.proc.poll() is not None:
            self.server.start()
        if self.faketime and self.clock_steps and self.clock_steps[-1][1] != 0:
            with open(self.faketime_file, "w") as f:
                f.write("+0\n")
            self.clock_steps.append((now_ms(), 0))
        self.keep_alive()
        deadline = time.time() + self.args.drain
        while time.time() < deadline:
            st = self.cli_json("status", "--json")
            if st is not None:
                left = sum(q["counts"].get(s, 0) for q in st["queues"]
                           for s in ("scheduled", "queued", "running", "retrying"))
                if left == 0:
                    return True
                log(f"draining: {left} tasks not finished")
            self.keep_alive()
            time.sleep(5)
        return False

    def run(self):
        self.setup()
        log(f"seed {self.seed}; broker {self.args.broker}; {len(self.nodes)} node(s); "
            f"budget {self.args.budget:.0f} s; run directory {self.dir}; containment: "
            f"{self.containment}")
        log(f"fault kinds: {', '.join(self.fault_kinds())}")
        threads = [threading.Thread(target=self.producer, daemon=True),
                   threading.Thread(target=self.injector, daemon=True)]
        t0 = time.time()
        for t in threads:
            t.start()
        while time.time() - t0 < self.args.budget:
            time.sleep(min(30, max(0.1, self.args.budget - (time.time() - t0))))
            log(f"{len(self.acked)} tasks acknowledged; faults {dict(self.faults)}")
        self.stop.set()
        for t in threads:
            t.join()
        self.duration = time.time() - t0
        drained = settle_ok = self.settle()
        checker = Checker(self)
        checker.check_tasks(drained)
        codes = {n.name: n.terminate() for n in self.nodes}
        for name, code in codes.items():
            if code not in (0, None):
                checker.violation(None, f"daemon {name} exited {code} on SIGTERM")
        checker.check_survivors()
        return checker, settle_ok


# --- the invariant checker ----------------------------------------------------------------

class Checker:
    def __init__(self, run):
        self.run = run
        self.violations = []
        self.states = collections.Counter()
        self.reasons = collections.Counter()
        self.duplicates = 0

    def violation(self, task_id, text):
        self.violations.append(f"{task_id or '-'}: {text}")

    def ledger(self):
        runs = collections.defaultdict(list)
        with open(self.run.ledger) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3:
                    runs[parts[0]].append((int(parts[1]), int(parts[2])))
        return runs

    def near_fault(self, a, b, margin=5000):
        return any(s - margin <= b and a <= e + margin for s, e, _ in self.run.windows)

    def near_clock_step(self, a, b):
        # Daemon times are on its faked clock: widen the interval by the largest offset.
        width = max([abs(o) for _, o in self.run.clock_steps] or [0]) * 1000 + 5000
        return any(a - width <= t <= b + width for t, _ in self.run.clock_steps)

    def check_tasks(self, drained):
        if not drained:
            self.violation(None, f"the backlog did not drain within {self.run.args.drain} s")
        ledger = self.ledger()
        ids = list(self.run.acked)
        log(f"checking {len(ids)} acknowledged tasks through `taskd show --json`")

        def show(i):
            r = self.run.cli("show", i, "--json", timeout=120)
            if r is None or r.returncode != 0:
                return i, None, (r.stderr.strip() if r else "timed out")
            return i, json.loads(r.stdout), None

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for i, detail, err in pool.map(show, ids):
                if detail is None:
                    self.violation(i, f"acknowledged, but `taskd show` fails: {err}")
                    continue
                self.check_task(i, detail, ledger.get(i, []))
        # The ledger names only acknowledged tasks (a batch that was not acknowledged never
        # ran, or it was stored after all and ran: then it must still be in the store).
        for i in ledger:
            if i not in self.run.acked:
                r = self.run.cli("show", i, "--json")
                if r is None or r.returncode != 0:
                    self.violation(i, "a task ran that the store does not know")

    def check_task(self, tid, d, runs):
        queue, plan = self.run.acked[tid]
        q = QUEUES[queue]
        state = d["state"]
        self.states[state] += 1
        # The history in the order the broker recorded it (a daemon's clock steps make its
        # times disagree with that order); sorted by start time for the checks of time.
        recorded = d["history"]
        hist = sorted(recorded, key=lambda a: (a["started_at"], a["ended_at"]))
        for a in hist:
            self.reasons[a.get("reason") or "none"] += 1
        # 1. every acknowledged task is terminal
        if state not in TERMINAL:
            self.violation(tid, f"acknowledged, but {state} after the drain")
        elif state == "cancelled":
            # The suite cancels nothing and sets no expiry.
            self.violation(tid, f"cancelled, though nothing cancelled it: {d.get('last_error')}")
        # 2. every run that happened (the ledger) has its attempt record, pid included
        # (A record without a pid, a run noted just before its spawn and recovered after a
        # crash, stands for any pid of its number.)
        have = collections.Counter((a["number"], a.get("pid")) for a in hist)
        for number, pid in sorted(runs, key=lambda r: (r[0], (r[0], r[1]) not in have)):
            if have[(number, pid)] > 0:
                have[(number, pid)] -= 1
            elif have[(number, None)] > 0:
                have[(number, None)] -= 1
            else:
                self.violation(tid, f"attempt {number} ran (pid {pid}) but has no attempt "
                                    f"record: history {[(a['number'], a.get('pid'), a.get('reason')) for a in hist]}")
        # 3. lost runs are uncharged: a charged run takes the next number; an uncharged one
        #    keeps it
        charged = [a for a in recorded if a.get("reason") not in UNCHARGED]
        for k, a in enumerate(charged):
            if a["number"] != k + 1:
                self.violation(tid, f"charged attempts numbered {[c['number'] for c in charged]}"
                                    f" (uncharged runs: {[u['number'] for u in hist if u.get('reason') in UNCHARGED]})")
                break
        for a in hist:
            if a.get("reason") in UNCHARGED and not self.near_clock_step(a["started_at"], a["ended_at"]):
                before = sum(1 for c in charged if c["started_at"] <= a["started_at"])
                if a["number"] != before + 1 and a["number"] != before:
                    self.violation(tid, f"{a['reason']} run numbered {a['number']} after "
                                        f"{before} charged runs")
        if d.get("lost", 0) != sum(1 for a in hist if a.get("reason") == "lost"):
            self.violation(tid, f"show's lost = {d.get('lost')} does not count the lost runs")
        # 4. fencing: one accepted result per attempt number, never two at once
        by_start = sorted(charged, key=lambda a: (a["started_at"], a["ended_at"]))
        for k in range(1, len(by_start)):
            a, b = by_start[k - 1], by_start[k]
            if b["started_at"] < a["ended_at"] and not self.near_clock_step(a["started_at"], b["ended_at"]):
                self.violation(tid, f"attempts {a['number']} ({a['node']}) and {b['number']} "
                                    f"({b['node']}) both accepted and ran at the same time")
        succ = [a for a in charged if a.get("reason") in ("exit", "result")
                and a.get("exit_code") in (0, None) and a.get("error") is None]
        if len(succ) > 1:
            self.violation(tid, f"{len(succ)} successful attempts accepted")
        if state == "succeeded" and charged and charged[-1].get("error") is not None:
            self.violation(tid, f"succeeded, but its last accepted attempt failed: {charged[-1].get('error')}")
        # 5. retries follow the backoff
        for k in range(1, len(hist)):
            prev, nxt = hist[k - 1], hist[k]
            if prev.get("reason") in UNCHARGED or prev.get("reason") is None:
                continue
            if self.near_clock_step(prev["ended_at"], nxt["started_at"]):
                continue
            due = prev["ended_at"] + backoff_ms(queue, prev["number"])
            if nxt["started_at"] < due - TOLERANCE_MS:
                self.violation(tid, f"attempt after {prev['number']} started "
                                    f"{due - nxt['started_at']} ms before its backoff had passed")
            elif (queue == "flaky" and nxt["started_at"] > due + LATE_MS
                  and not self.near_fault(prev["ended_at"], nxt["started_at"])):
                self.violation(tid, f"attempt after {prev['number']} started "
                                    f"{nxt['started_at'] - due} ms after its backoff, no fault near")
        # 6. a failed task used up its attempts or has a permanent reason
        if state == "failed":
            # The attempt that failed it is the last charged one (the broker's order): a lost
            # run may come later by start time (a clock step) or by record (a frozen node's
            # late result), and fails nothing.
            last = charged[-1] if charged else {}
            reason = last.get("reason")
            permanent = (
                (reason == "exit" and last.get("exit_code") in q["permanent"])
                or reason in ("spawn", "invalid")
                or d.get("lost", 0) > 3
                or (reason == "crash" and d.get("crashes", 0) >= 3)
                or (reason == "result" and plan.get("fail") == "error"
                    and last["number"] >= 1 and last["number"] < plan["ok_from"]))
            if not permanent and len(charged) < q["max_attempts"]:
                self.violation(tid, f"failed after {len(charged)} of {q['max_attempts']} "
                                    f"attempts, last reason {reason} ({last.get('error')})")
        # the plan: a task planned to succeed on attempt k <= max fails only through faults
        if state == "succeeded":
            if charged and charged[-1]["number"] < plan["ok_from"] and queue != "timeouts":
                self.violation(tid, f"succeeded on attempt {charged[-1]['number']}, planned "
                                    f"to fail until {plan['ok_from']}")
        if len(runs) > len(set(runs)) or len({n for n, _ in runs}) < len(runs):
            self.duplicates += 1

    def check_survivors(self):
        deadline = time.time() + 10
        left = processes_of_run(self.run.token)
        while left and time.time() < deadline:
            time.sleep(0.2)
            left = processes_of_run(self.run.token)
        for pid, pgid, cmd in left:
            self.violation(None, f"process {pid} (group {pgid}) of a task survived: {cmd[:120]}")
        if self.run.cgroups:
            for node in self.run.nodes:
                canon = os.path.realpath(os.path.join(self.run.state, node.name))
                h = 0xcbf29ce484222325
                for b in canon.encode():
                    h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
                name = f"taskd-{h:016x}"
                for top, dirs, _ in os.walk("/sys/fs/cgroup"):
                    if name in dirs:
                        left = [os.path.join(top, name)]
                        self.violation(None, f"cgroup left after {node.name} stopped: {left[0]}")
                    if top.count("/") > 8:
                        dirs[:] = []


def self_test():
    """The checker holds bad histories to account: each crafted history below breaks one
    invariant and must be reported (and a good one must not be)."""
    class FakeRun:
        windows, clock_steps = [], []
        acked = {}
    run = FakeRun()

    def rec(number, start, end, reason="exit", code=0, pid=100, node="n1", error=None):
        return dict(number=number, started_at=start, ended_at=end, reason=reason,
                    exit_code=code, pid=pid, node=node, error=error)

    def task(state, hist, lost=None, crashes=0):
        return dict(state=state, history=hist, crashes=crashes,
                    lost=sum(1 for a in hist if a["reason"] == "lost") if lost is None else lost)

    plan = {"secs": "0", "ok_from": 1, "code": 1, "escape": ""}
    failing = dict(plan, ok_from=99)
    cases = [
        ("good", "quick", plan, task("succeeded", [rec(1, 0, 10)]), [(1, 100)], 0),
        ("not terminal", "quick", plan, task("running", []), [], 1),
        ("run without record", "quick", plan, task("succeeded", [rec(1, 0, 10)]),
         [(1, 100), (1, 101)], 1),
        ("lost run charged", "quick", failing,
         task("failed", [rec(1, 0, 10, "lost", None), rec(2, 20, 30, code=1, error="x"),
                         rec(3, 2100, 2200, code=1, error="x")]), [], 2),
        ("two accepted at once", "quick", failing,
         task("failed", [rec(1, 0, 100, code=1, error="x"), rec(2, 50, 3000, code=1, error="x",
                                                                 node="n2"),
                         rec(3, 7000, 7100, code=1, error="x")]), [], 2),
        ("retry before its backoff", "quick", failing,
         task("failed", [rec(1, 0, 10, code=1, error="x"), rec(2, 500, 600, code=1, error="x"),
                         rec(3, 5000, 5100, code=1, error="x")]), [], 1),
        ("failed with attempts left", "quick", failing,
         task("failed", [rec(1, 0, 10, code=1, error="x")]), [], 1),
        ("succeeded before its plan", "quick", dict(plan, ok_from=3),
         task("succeeded", [rec(1, 0, 10)]), [], 1),
        ("a frozen node's run recorded after the failing attempt", "quick",
         dict(plan, ok_from=99, code=64),
         task("failed", [rec(1, 500, 600, code=64, error="x"),
                         rec(1, 0, 900, "lost", None, pid=99, node="n2")]), [(1, 99), (1, 100)], 0),
        ("cancelled by no one", "quick", plan,
         task("cancelled", [rec(1, 0, 10, "cancelled", None)]), [(1, 100)], 1),
    ]
    bad = 0
    for name, queue, p, detail, runs, expected in cases:
        checker = Checker(run)
        run.acked = {"t": (queue, p)}
        checker.check_task("t", detail, runs)
        if len(checker.violations) != expected:
            bad += 1
            print(f"self-test `{name}`: {len(checker.violations)} violations, expected "
                  f"{expected}: {checker.violations}")
    print(f"self-test: {len(cases) - bad} of {len(cases)} cases as expected")
    sys.exit(1 if bad else 0)


def main():
    if sys.argv[1:] == ["--self-test"]:
        self_test()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--broker", choices=["sqlite", "redis", "postgres"], default="sqlite")
    ap.add_argument("--budget", default="60s", help="how long faults are injected (60s, 30m)")
    ap.add_argument("--seed", type=int, help="the seed (printed; random by default)")
    ap.add_argument("--nodes", type=int, default=2,
                    help="daemons sharing Redis or PostgreSQL (default 2)")
    ap.add_argument("--lease", type=int, default=6,
                    help="the lease on Redis or PostgreSQL, s (default 6)")
    ap.add_argument("--fault-every", type=float, default=12, help="mean s between faults")
    ap.add_argument("--submit-every", type=float, default=1.5, help="mean s between batches")
    ap.add_argument("--drain", type=float, default=600, help="s the backlog has to drain")
    ap.add_argument("--tmpfs-mib", type=int, default=128)
    ap.add_argument("--faults", help="only these fault kinds, comma-separated")
    ap.add_argument("--no-disk", dest="disk", action="store_false", help="no disk-full faults")
    ap.add_argument("--no-clock", dest="clock", action="store_false", help="no clock steps")
    ap.add_argument("--taskd", default=os.path.join(ROOT, "target", "release", "taskd"))
    ap.add_argument("--summary", help="write the figures as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    ap.add_argument("--self-test", action="store_true",
                    help="check the checker on crafted histories, then exit")
    args = ap.parse_args()
    args.budget = parse_duration(args.budget)
    if args.broker == "redis" and not shutil.which("redis-server"):
        raise SystemExit("redis-server is missing (apt-get install redis-server)")
    # A SIGTERM ends the run like Ctrl-C: the finally below stops the daemons and Redis and
    # unmounts the tmpfs.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    run = Run(args)
    checker, settle_ok = None, False
    try:
        checker, settle_ok = run.run()
    finally:
        run.teardown()
    print()
    print(f"seed        {run.seed}")
    print(f"broker      {args.broker} ({len(run.nodes)} node(s)); containment: {run.containment}")
    print(f"duration    {run.duration:.0f} s of faults")
    print(f"faults      {sum(run.faults.values())}: " +
          ", ".join(f"{k} {v}" for k, v in sorted(run.faults.items())))
    print(f"tasks       {len(run.acked)} acknowledged: " +
          ", ".join(f"{k} {v}" for k, v in sorted(checker.states.items())) +
          f"; by queue: " + ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(q for q, _ in run.acked.values()).items())))
    print(f"attempts    " + ", ".join(f"{k} {v}" for k, v in sorted(checker.reasons.items())))
    print(f"not acked   " + (", ".join(f"{k} {v}" for k, v in run.refused.items()) or "none"))
    print(f"ran twice   {checker.duplicates} tasks ran one attempt number more than once")
    for e in run.events:
        print(f"event       {e}")
    print(f"violations  {len(checker.violations)}")
    for v in checker.violations:
        print(f"  VIOLATION {v}")
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump({"seed": run.seed, "broker": args.broker, "nodes": len(run.nodes),
                       "duration_s": round(run.duration), "faults": dict(run.faults),
                       "tasks": len(run.acked), "states": dict(checker.states),
                       "attempt_reasons": dict(checker.reasons), "not_acked": dict(run.refused),
                       "events": run.events, "violations": checker.violations}, f, indent=1)
    if args.keep:
        print(f"run directory kept: {run.dir}")
    else:
        shutil.rmtree(run.dir, ignore_errors=True)
    sys.exit(1 if checker.violations else 0)


if __name__ == "__main__":
    main()
