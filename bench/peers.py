"""Drivers for the daemons bench/bench.py compares taskd with: task-spooler, pueue and Celery
(with its Redis), each in a throwaway directory of its own, never the machine's shared ones.
Every driver gives the same few operations: start/stop, enqueue one task, hold the queue
(so that a pre-filled queue can be released at a known instant), the pids of its daemon."""
import fcntl, json, os, re, shutil, socket, subprocess, sys, tempfile, time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
FLOCK = shutil.which("flock") or "/usr/bin/flock"


# --- /proc ------------------------------------------------------------------------------

def tree(pid):
    """pid and all its descendants."""
    out, i = [pid], 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pids):
    return sum(_status_kib(p, "VmRSS:") for p in pids)


def pss_kib(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def _die_with_parent():
    """preexec_fn: SIGTERM this child when the harness dies, however it dies."""
    import ctypes, signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _run(args, env=None, out=False):
    p = subprocess.run(args, env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE if out else subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-300:]}")
    return p.stdout


# --- task-spooler -----------------------------------------------------------------------

class Tsp:
    """task-spooler with its own socket (TS_SOCKET) and output files in a temp dir.

    tsp keeps one client process, holding one connection to the server, per waiting job,
    and its server serves at most ~1,000 connections: past about 995 waiting jobs a new
    `tsp` call blocks until a job ends. So a queue is never filled beyond MAX_WAITING.
    To hold a queue, `slots` blocker jobs (`flock -s LOCK true`) occupy every slot while the
    harness holds LOCK exclusively; releasing the lock releases them all at once."""
    MAX_WAITING = 900

    def __init__(self, path, slots):
        self.path = path
        self.dir = tempfile.mkdtemp(prefix="bench-tsp-")
        self.env = dict(os.environ, TS_SOCKET=os.path.join(self.dir, "socket"), TMPDIR=self.dir)
        self.lock_path = os.path.join(self.dir, "hold")
        self.lock = open(self.lock_path, "w")
        self.slots = slots
        _run([path, "-S", str(slots)], env=self.env)
        self.server = self._server_pid()

    def _server_pid(self):
        mark = ("TS_SOCKET=" + self.env["TS_SOCKET"]).encode()
        for _ in range(200):
            for d in os.listdir("/proc"):
                if not d.isdigit():
                    continue
                try:
                    with open(f"/proc/{d}/environ", "rb") as f:
                        if mark in f.read().split(b"\0"):
                            return int(d)
                except OSError:
                    pass
            time.sleep(0.01)
        raise RuntimeError("tsp server not found")

    def clients(self):
        """The tsp client processes (one per waiting or running job), not the server."""
        mark = ("TS_SOCKET=" + self.env["TS_SOCKET"]).encode()
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != self.server:
                try:
                    with open(f"/proc/{d}/comm") as f:
                        if f.read().strip() not in ("tsp", "ts"):
                            continue
                    with open(f"/proc/{d}/environ", "rb") as f:
                        if mark in f.read().split(b"\0"):
                            out.append(int(d))
                except OSError:
                    pass
        return out

    def add(self, argv):
        return int(_run([self.path, *argv], env=self.env, out=True).strip())

    def hold(self):
        """Occupy every slot with a blocker: jobs added now wait until release()."""
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        for _ in range(self.slots):
            self.add([FLOCK, "-s", self.lock_path, "/bin/true"])

    def release(self):
        fcntl.flock(self.lock, fcntl.LOCK_UN)

    def wait(self, job_ids):
        for j in job_ids:
            subprocess.run([self.path, "-w", str(j)], env=self.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def pids(self):
        return [self.server]

    def close(self):
        subprocess.run([self.path, "-K"], env=self.env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        self.lock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- pueue ------------------------------------------------------------------------------

def _ts(s):
    """pueue's RFC 3339 timestamps (nanoseconds, Z or an offset) -> epoch seconds."""
    m = re.match(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", s)
    base, frac, tz = m.groups()
    t = datetime.fromisoformat(base + ("+00:00" if tz == "Z" else tz)).timestamp()
    return t + (float("0." + frac) if frac else 0.0)


class Pueue:
    """pueued with its own config, state and socket in a temp dir, run in the foreground
    (the same as `pueued -c CONFIG -d`, but the harness keeps its pid). Its task loop wakes
    every 300 ms, and every add rewrites its whole state as JSON: both show in the figures."""

    def __init__(self, paths, parallel):
        self.pueue, self.pueued = paths
        self.dir = tempfile.mkdtemp(prefix="bench-pueue-")
        for d in ("data", "run"):
            os.makedirs(os.path.join(self.dir, d))
        self.config = os.path.join(self.dir, "pueue.yml")
        with open(self.config, "w") as f:
            f.write("shared:\n"
                    f"  pueue_directory: {self.dir}/data\n"
                    f"  runtime_directory: {self.dir}/run\n"
                    f"  unix_socket_path: {self.dir}/run/pueue.sock\n")
        self.log = open(os.path.join(self.dir, "pueued.log"), "w")
        self.daemon = subprocess.Popen([self.pueued, "-c", self.config], stdout=self.log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=_die_with_parent)
        deadline = time.time() + 20
        while True:
            if subprocess.run([self.pueue, "-c", self.config, "status"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0:
                break
            if time.time() > deadline or self.daemon.poll() is not None:
                raise RuntimeError("pueued did not start: see " + self.dir)
            time.sleep(0.05)
        self.cmd("parallel", str(parallel))

    def cmd(self, *args, out=False):
        return _run([self.pueue, "-c", self.config, *args], out=out)

    def add(self, argv):
        self.cmd("add", "--", *argv)

    def hold(self):
        self.cmd("pause")

    def release(self):
        self.cmd("start")

    def status(self):
        return json.loads(self.cmd("status", "--json", out=True))

    def wait_all(self, n, timeout=600):
        """Wait until n tasks are done; the latest end time (epoch s) among them."""
        deadline = time.time() + timeout
        while True:
            tasks = self.status()["tasks"].values()
            done = [t["status"]["Done"] for t in tasks if "Done" in t["status"]]
            if len(done) >= n:
                return max(_ts(d["end"]) for d in done)
            if time.time() > deadline:
                raise RuntimeError(f"pueue: {len(done)} of {n} done after {timeout} s")
            time.sleep(0.1)

    def pids(self):
        return [self.daemon.pid]

    def close(self):
        self.daemon.terminate()
        try:
            self.daemon.wait(10)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- Celery with Redis ------------------------------------------------------------------

class Redis:
    """A throwaway redis-server on a free loopback port, no persistence, in a temp dir."""

    def __init__(self, path):
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [path, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"],
            stdout=open(os.path.join(self.dir, "redis.log"), "w"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.url = f"redis://127.0.0.1:{self.port}"
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start: see " + self.dir)
                time.sleep(0.02)

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Celery:
    """The Celery app of bench/celery_app.py on its own Redis. Queues are held by having no
    worker consume them: a worker starts on a queue nobody uses, and `add_consumer` (the
    release) makes it consume the pre-filled one; `cancel_consumer` holds it again."""

    def __init__(self, redis_path):
        self.redis = Redis(redis_path)
        os.environ["BENCH_REDIS_URL"] = self.redis.url
        sys.path.insert(0, HERE)
        import celery_app, redis
        self.mod = celery_app
        self.app = celery_app.app
        self.broker = redis.Redis(port=self.redis.port, db=0)
        self.results = redis.Redis(port=self.redis.port, db=1)
        self.workers = []

    def add(self, argv, queue):
        self.mod.run.apply_async((argv,), queue=queue)

    def worker(self, concurrency, queue="idle"):
        return Worker(self, concurrency, queue)

    def template(self, argv, queue):
        """One message exactly as Celery enqueues it, with its task id and delivery tag."""
        self.broker.delete("tmpl")
        self.add(argv, "tmpl")
        raw = self.broker.lpop("tmpl").decode()
        msg = json.loads(raw)
        return raw, msg["headers"]["id"], msg["properties"]["delivery_tag"]

    def fill(self, argv, queue, n):
        """n tasks onto `queue` with a Redis pipeline: copies of the message Celery itself
        builds for run(argv), each with a fresh task id and delivery tag. For filling the
        million-task backlog in seconds (one delay() per task would take minutes)."""
        import uuid
        raw, tid, tag = self.template(argv, queue)
        parts = raw.replace(tid, "\0").replace(tag, "\1")
        step = 20_000
        for start in range(0, n, step):
            batch = []
            for _ in range(min(step, n - start)):
                batch.append(parts.replace("\0", str(uuid.uuid4())).replace("\1", str(uuid.uuid4())))
            self.broker.lpush(queue, *batch)

    def queued(self, queue):
        return self.broker.llen(queue)

    def redis_kib(self):
        return rss_kib([self.redis.proc.pid])

    def close(self):
        for w in list(self.workers):
            w.close()
        self.redis.close()


class Worker:
    _n = 0

    def __init__(self, c, concurrency, queue):
        Worker._n += 1
        self.c = c
        self.name = f"bench{Worker._n}@localhost"
        self.log = open(os.path.join(c.redis.dir, f"worker{Worker._n}.log"), "w")
        celery_bin = os.path.join(os.path.dirname(sys.executable), "celery")
        self.proc = subprocess.Popen(
            [celery_bin, "-A", "celery_app", "worker", "--pool", "prefork",
             "--concurrency", str(concurrency), "-Q", queue, "-n", self.name,
             "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"],
            env=dict(os.environ, PYTHONPATH=HERE), cwd=HERE, stdout=self.log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        c.workers.append(self)
        deadline = time.time() + 60
        while not c.app.control.ping(destination=[self.name], timeout=0.5):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("celery worker did not start: see " + self.log.name)
        # the pool's children are up once the worker answers; let it settle
        time.sleep(0.5)

    def consume(self, queue):
        self.c.app.control.add_consumer(queue, destination=[self.name])

    def stop_consuming(self, queue):
        self.c.app.control.cancel_consumer(queue, destination=[self.name], reply=True)

    def pids(self):
        return tree(self.proc.pid)

    def close(self):
        if self in self.c.workers:
            self.c.workers.remove(self)
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            for p in reversed(tree(self.proc.pid)):
                try:
                    os.kill(p, 9)
                except OSError:
                    pass
            self.proc.wait()
        self.log.close()
