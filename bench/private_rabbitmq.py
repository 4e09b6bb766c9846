"""A private RabbitMQ node for a benchmark, as tests/common/rabbitmq.rs starts one: its own
epmd, node name, AMQP and distribution ports, with data, logs, config and Erlang cookie in a
temp dir; every process it started is killed on close. Never the machine's own node (which
uses epmd on 4369 and AMQP on 5672).

The server is Debian's upstream start script /usr/lib/rabbitmq/bin/rabbitmq-server (the
/usr/sbin wrapper switches user), or the one TASKD_TEST_RABBITMQ_SERVER names."""
import os, shutil, signal, socket, subprocess, tempfile, time

from peers import free_port, tree

SCRIPT = os.environ.get("TASKD_TEST_RABBITMQ_SERVER", "/usr/lib/rabbitmq/bin/rabbitmq-server")


def amqp_answers(port):
    """An AMQP server answers the protocol header with a method frame (type 1)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return s.recv(1) == b"\x01"
    except OSError:
        return False


class RabbitMQ:
    def __init__(self, prefix="taskd-bench-rabbitmq-"):
        if not os.path.isfile(SCRIPT) or not shutil.which("epmd"):
            raise SystemExit(f"rabbitmq-server is not installed ({SCRIPT}, epmd): apt-get install -y rabbitmq-server")
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.node = f"rabbit-taskd-bench-{os.getpid()}@localhost"
        for sub in ("home", "mnesia", "log"):
            os.makedirs(os.path.join(self.dir, sub))
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as f:
            f.write(f"listeners.tcp.1 = 127.0.0.1:{self.port}\ndisk_free_limit.absolute = 10MB\n"
                    "log.console = false\nlog.file.level = warning\n")
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        open(os.path.join(self.dir, "rabbitmq-env.conf"), "w").close()
        d = self.dir
        self.env = dict(os.environ, HOME=os.path.join(d, "home"), RABBITMQ_NODENAME=self.node,
                        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(self.port),
                        RABBITMQ_DIST_PORT=str(self.dist_port), ERL_EPMD_PORT=str(self.epmd_port),
                        ERL_EPMD_ADDRESS="127.0.0.1", RABBITMQ_MNESIA_BASE=os.path.join(d, "mnesia"),
                        RABBITMQ_LOG_BASE=os.path.join(d, "log"),
                        RABBITMQ_CONFIG_FILE=os.path.join(d, "rabbitmq.conf"),
                        RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(d, "advanced.config"),
                        RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(d, "enabled_plugins"),
                        RABBITMQ_CONF_ENV_FILE=os.path.join(d, "rabbitmq-env.conf"),
                        RABBITMQ_PID_FILE=os.path.join(d, "rabbitmq.pid"))
        for k in ("RABBITMQ_USE_LONGNAME", "NOTIFY_SOCKET"):
            self.env.pop(k, None)
        log = open(os.path.join(d, "out.log"), "w")
        self.epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     preexec_fn=lambda: os.setpgid(0, 0))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.epmd_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise SystemExit("epmd did not start")
                time.sleep(0.02)
        group = self.epmd.pid
        self.server = subprocess.Popen([SCRIPT], cwd=d, env=self.env, stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=log,
                                       preexec_fn=lambda: os.setpgid(0, group))
        deadline = time.monotonic() + 90
        while not amqp_answers(self.port):
            if self.server.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"rabbitmq-server did not start; see {d}/out.log")
            time.sleep(0.05)

    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def close(self):
        group = self.epmd.pid
        pids = tree(group) + (tree(self.server.pid) if getattr(self, "server", None) else [])
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        for c in (getattr(self, "server", None), self.epmd):
            if c is not None:
                c.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
