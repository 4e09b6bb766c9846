"""The library against a real daemon: `target/debug/taskd` (or $TASKD_BIN) started on a
temporary config that serves the API on loopback TCP with a token and on a Unix socket, with
exec queues and a worker queue whose worker is tests/app_tasks.py (`app.run()`)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(HERE)
sys.path.insert(0, PACKAGE_DIR)

import taskd  # noqa: E402

TOKEN = "python-client-test-token-0123456789"
BIN = os.environ.get("TASKD_BIN") or os.path.join(PACKAGE_DIR, "..", "..", "target", "debug", "taskd")


def poll(what, check, deadline=30.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


class Daemon:
    """A daemon on a temporary directory, stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="taskd-py-")
        self.socket = os.path.join(self.dir, "api.sock")
        config = os.path.join(self.dir, "taskd.toml")
        with open(config, "w") as f:
            f.write(
                """[taskd]
state_dir = "state"
shutdown_grace = "2s"
listen = ["127.0.0.1:0", "unix:api.sock"]
token = "%(token)s"

[queues.echo]
# The payload back as the result.
shell = 'cat > "$TASKD_RESULT_FILE"'
concurrency = 4

[queues.fail]
shell = 'echo "some output"; echo "it went wrong" >&2; exit 3'
max_attempts = 1

[queues.slow]
shell = "sleep 30"

[queues.rawhex]
# Every byte of stdin in hex, as the result.
shell = 'od -An -v -tx1 | tr -d " \\n" > "$TASKD_RESULT_FILE"'

[queues.fields]
command = ["/bin/echo", "{to}"]

[queues.pyraw]
worker = [%(python)s, "%(raw_worker)s"]
env = { PYTHONPATH = "%(path)s" }

[queues.py]
worker = [%(python)s, "%(worker)s"]
concurrency = 2
max_attempts = 3
backoff = { base = "10ms", max = "10ms" }
env = { PYTHONPATH = "%(path)s" }
"""
                % {
                    "token": TOKEN,
                    "python": json.dumps(sys.executable),
                    "worker": os.path.join(HERE, "app_tasks.py"),
                    "raw_worker": os.path.join(HERE, "raw_worker.py"),
                    "path": PACKAGE_DIR,
                }
            )
        self.log_path = os.path.join(self.dir, "daemon.log")
        env = dict(os.environ, RUST_LOG="info")
        for k in ("TASKD_SERVER", "TASKD_TOKEN", "TASKD_CONFIG"):
            env.pop(k, None)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [BIN, "-c", config, "start"], stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, env=env
        )
        try:
            addr = poll("the daemon's API address", self._address)
            self.http = "http://" + addr
            poll("the daemon to be ready", lambda: "ready" in self.text() and os.path.exists(self.socket))
            poll("the py queue's workers", self._workers_running)
        except BaseException:
            self.stop()
            raise

    def text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def _address(self) -> Optional[str]:
        if self.proc.poll() is not None:
            raise AssertionError("the daemon exited:\n" + self.text())
        m = re.search(r"API listening on http://(\S+)", self.text())
        return m.group(1) if m else None

    def _workers_running(self) -> bool:
        with taskd.Client("unix:" + self.socket) as c:
            out = c.queues()
        workers = [w for w in out.get("workers", []) if w.get("queue") == "py"]
        return len(workers) == 2 and all(w.get("state") == "running" for w in workers)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


DAEMON: Optional[Daemon] = None


def setUpModule() -> None:
    global DAEMON
    if not os.access(BIN, os.X_OK):
        raise unittest.SkipTest("no taskd binary at %s: run `cargo build` or set TASKD_BIN" % BIN)
    DAEMON = Daemon()


def tearDownModule() -> None:
    if DAEMON is not None:
        DAEMON.stop()


class ClientTests:
    """Every test here runs once over TCP with the token and once over the Unix socket."""

    client: taskd.Client

    def make_client(self) -> taskd.Client:
        raise NotImplementedError

    def setUp(self) -> None:
        self.client = self.make_client()

    def tearDown(self) -> None:
        self.client.close()

    def test_submit_and_result(self) -> None:
        t = self.client.submit("echo", {"to": "a@example.com", "n": 12345678901234567890})
        self.assertIsInstance(t, taskd.Task)
        self.assertRegex(t.id, r"^[0-9a-f-]{36}$")
        self.assertIn(t.state(), ("queued", "running", "succeeded"))
        self.assertEqual(t.result(timeout=30), {"to": "a@example.com", "n": 12345678901234567890})
        self.assertEqual(t.state(), "succeeded")
        self.assertEqual(t.info()["queue"], "echo")

    def test_options_reach_the_task(self) -> None:
        t = self.client.submit("echo", {"k": 1}, delay=60, priority=5, unique="welcome:%s" % id(self))
        info = t.info()
        self.assertEqual(info["state"], "scheduled")
        self.assertEqual(info["priority"], 5)
        self.assertEqual(info["unique_key"], "welcome:%s" % id(self))
        self.assertGreaterEqual(info["run_at"] - info["created_at"], 59_000)
        again = self.client.submit("echo", {"k": 2}, unique="welcome:%s" % id(self))
        self.assertEqual(again.id, t.id)
        self.assertTrue(again.existing)
        t.cancel()
        with self.assertRaises(taskd.TaskFailed) as caught:
            t.result(timeout=10)
        self.assertEqual(caught.exception.state, "cancelled")

    def test_submit_many_is_one_batch_all_or_none(self) -> None:
        tasks = self.client.submit_many("echo", [{"i": i} for i in range(20)])
        self.assertEqual(len(tasks), 20)
        self.assertEqual([t.result(timeout=30) for t in tasks], [{"i": i} for i in range(20)])
        before = self.client.queues()
        # A payload over max_payload refuses the whole batch: nothing is enqueued.
        with self.assertRaises(taskd.APIError) as caught:
            self.client.submit_many("echo", [{"i": 1}, {"big": "x" * (2 << 20)}])
        self.assertEqual(caught.exception.status, 413)
        after = self.client.queues()
        count = lambda q: sum(x["counts"]["queued"] + x["counts"]["succeeded"] + x["counts"]["running"]
                              for x in q["queues"] if x["queue"] == "echo")
        self.assertEqual(count(before), count(after))

    def test_a_failed_task_raises_task_failed_with_its_error_and_output(self) -> None:
        t = self.client.submit("fail", {})
        with self.assertRaises(taskd.TaskFailed) as caught:
            t.result(timeout=30)
        e = caught.exception
        self.assertEqual(e.state, "failed")
        self.assertEqual(e.task_id, t.id)
        self.assertIn("exit code 3", e.error or "")
        self.assertEqual(e.stdout, "some output\n")
        self.assertEqual(e.stderr, "it went wrong\n")
        self.assertIn("it went wrong", str(e))

    def test_result_times_out(self) -> None:
        t = self.client.submit("slow", {})
        start = time.monotonic()
        with self.assertRaises(taskd.Timeout) as caught:
            t.result(timeout=0.3)
        self.assertGreaterEqual(time.monotonic() - start, 0.3)
        self.assertLess(time.monotonic() - start, 10)
        self.assertIn(caught.exception.state, ("queued", "running"))
        t.cancel()

    def test_errors_of_the_api(self) -> None:
        with self.assertRaises(taskd.APIError) as caught:
            self.client.submit("no-such-queue", {})
        self.assertEqual(caught.exception.status, 404)
        self.assertEqual(caught.exception.code, "unknown_queue")
        self.assertIn("echo", caught.exception.message)
        with self.assertRaises(taskd.APIError) as caught:
            self.client.get("00000000-0000-7000-8000-000000000000")
        self.assertEqual(caught.exception.status, 404)

    def test_connections_are_kept_alive(self) -> None:
        client = self.make_client()
        for i in range(10):
            client.submit("echo", {"i": i})
        client.get(client.submit("echo", {}).id)
        self.assertEqual(client._transport.connects, 1)
        # Idle past the daemon's keep-alive limit: a new connection, no error.
        time.sleep(5.5)
        client.submit("echo", {})
        self.assertEqual(client._transport.connects, 2)
        # Threads each get their own.
        ids = []

        def submit_once() -> None:
            ids.append(client.submit("echo", {}).id)
            client.close()

        threads = [threading.Thread(target=submit_once) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        self.assertEqual(len(set(ids)), 4)
        self.assertEqual(client._transport.connects, 6)
        client.close()

    def test_app_task_delay_round_trip_through_a_worker(self) -> None:
        from tests import app_tasks

        app_tasks.app._client = self.client
        t = app_tasks.send_welcome.delay(42, lang="de")
        self.assertEqual(t.info()["payload"], {"task": "send_welcome", "args": [42], "kwargs": {"lang": "de"}})
        r = t.result(timeout=30)
        self.assertEqual((r["user"], r["lang"], r["attempt"]), (42, "de", 1))
        self.assertIn("welcome 42 in de", t.info()["history"][-1]["stdout_tail"])
        self.assertEqual(app_tasks.add.apply_async(args=[2, 3]).result(timeout=30), 5)
        later = app_tasks.add.apply_async(args=[1, 1], delay=60)
        self.assertEqual(later.state(), "scheduled")
        later.cancel()
        self.assertEqual(app_tasks.named_differently.delay().result(timeout=30), "renamed")
        # Called directly, it is a plain function.
        self.assertEqual(app_tasks.add(4, 5), 9)
        # taskd.Retry: retried with the queue's backoff, then succeeds.
        self.assertEqual(app_tasks.flaky.delay(2).result(timeout=30), 3)

    def test_raw_bytes_reach_the_task_byte_for_byte(self) -> None:
        data = bytes(range(255, -1, -1)) + b"\x00\n\xff"
        t = self.client.submit("rawhex", raw=data, priority=4)
        info = t.info()
        self.assertIsNone(info["payload"])
        self.assertEqual(base64.b64decode(info["payload_b64"]), data)
        self.assertEqual(info["priority"], 4)
        self.assertEqual(t.result(timeout=30), data.hex())
        later = self.client.submit("rawhex", raw=b"later", delay=60)
        self.assertEqual(later.state(), "scheduled")
        later.cancel()
        # A batch may mix them: bytes are raw payloads.
        tasks = self.client.submit_many("rawhex", [b"\x01\x02", bytearray(b"\xfe")])
        self.assertEqual([x.result(timeout=30) for x in tasks], ["0102", "fe"])
        # A worker gets them as bytes (`taskd.serve`), its job marked raw.
        self.assertEqual(
            self.client.submit("pyraw", raw=data).result(timeout=30), {"hex": data.hex(), "raw": True}
        )
        self.assertEqual(self.client.submit("pyraw", {"a": 1}).result(timeout=30), {"json": {"a": 1}, "raw": False})
        # A queue that fills placeholders from payload fields refuses raw bytes.
        with self.assertRaises(taskd.APIError) as caught:
            self.client.submit("fields", raw=b"\x00")
        self.assertEqual(caught.exception.status, 422)
        self.assertIn("{to}", caught.exception.message)
        with self.assertRaises(ValueError):
            self.client.submit("rawhex", {"a": 1}, raw=b"x")
        # An App's worker runs named calls: raw bytes fail that task, naming the cause.
        with self.assertRaises(taskd.TaskFailed) as failed:
            self.client.submit("py", raw=b"\x08\x01").result(timeout=30)
        self.assertIn("raw payload (2 bytes)", failed.exception.error or "")
        self.assertEqual(failed.exception.task["history"][-1]["reason"], "result")

    def test_worker_failures_fail_the_task_not_the_worker(self) -> None:
        from tests import app_tasks

        app_tasks.app._client = self.client
        pids = {w["pid"] for w in self.client.queues()["workers"] if w["queue"] == "py"}
        # An exception: a failed attempt each time, until max_attempts.
        with self.assertRaises(taskd.TaskFailed) as caught:
            app_tasks.boom.delay().result(timeout=30)
        e = caught.exception
        self.assertEqual(len(e.task["history"]), 3)
        self.assertIn("ValueError: boom", e.error or "")
        self.assertIn("about to fail", e.stderr)
        # An unknown name: fails at once (reason `result`), naming the registered tasks.
        t = self.client.submit("py", {"task": "nope", "args": [], "kwargs": {}})
        with self.assertRaises(taskd.TaskFailed) as caught:
            t.result(timeout=30)
        e = caught.exception
        self.assertEqual(len(e.task["history"]), 1)
        self.assertEqual(e.task["history"][0]["reason"], "result")
        for name in ("add", "boom", "flaky", "renamed", "send_welcome"):
            self.assertIn(name, e.error or "")
        self.assertIn("unknown task 'nope'", e.error or "")
        # Arguments the function cannot take: failed at once too.
        with self.assertRaises(taskd.TaskFailed) as caught:
            self.client.submit("py", {"task": "add", "args": [1]}).result(timeout=30)
        self.assertEqual(len(caught.exception.task["history"]), 1)
        self.assertIn("cannot be called", caught.exception.error or "")
        with self.assertRaises(taskd.TaskFailed) as caught:
            self.client.submit("py", {"task": "add", "kwargs": {"a": 1, "c": 2}}).result(timeout=30)
        self.assertEqual(len(caught.exception.task["history"]), 1)
        self.assertIn("unexpected keyword argument 'c'", caught.exception.error or "")
        # A TypeError the function's body raises is a failed attempt like any other: retried.
        with self.assertRaises(taskd.TaskFailed) as caught:
            app_tasks.wrong_inside.delay(1).result(timeout=30)
        self.assertEqual(len(caught.exception.task["history"]), 3)
        self.assertIn("TypeError: unsupported operand", caught.exception.error or "")
        # The workers lived through all of it and still serve.
        self.assertEqual(app_tasks.add.delay(1, 2).result(timeout=30), 3)
        after = {w["pid"] for w in self.client.queues()["workers"] if w["queue"] == "py"}
        self.assertEqual(pids, after)


class OverTCPWithToken(ClientTests, unittest.TestCase):
    def make_client(self) -> taskd.Client:
        assert DAEMON is not None
        return taskd.Client(DAEMON.http, token=TOKEN)

    def test_a_missing_token_is_refused(self) -> None:
        assert DAEMON is not None
        with self.assertRaises(taskd.APIError) as caught, taskd.Client(DAEMON.http, token="") as c:
            c.submit("echo", {})
        self.assertEqual((caught.exception.status, caught.exception.code), (401, "missing_token"))

    def test_refusals_keep_the_connection_and_name_the_status(self) -> None:
        # The daemon reads a refused request's body before it answers (up to 64 KiB), so
        # the connection serves the next request: one connection for all three.
        assert DAEMON is not None
        with taskd.Client(DAEMON.http, token="wrong-token-0123456789") as c:
            for i in range(3):
                with self.assertRaises(taskd.APIError) as caught:
                    c.submit("echo", {"i": i, "text": "x" * 1000})
                self.assertEqual((caught.exception.status, caught.exception.code), (401, "bad_token"))
                self.assertIn("HTTP 401", str(caught.exception))
            self.assertEqual(c._transport.connects, 1)

    def test_a_refused_body_past_what_the_daemon_reads_still_names_the_status(self) -> None:
        # 4 MiB without a token: the daemon answers 401 at once and closes the connection
        # under the body still being sent; the client reads the answer all the same.
        assert DAEMON is not None
        with taskd.Client(DAEMON.http, token="") as c:
            for _ in range(2):
                with self.assertRaises(taskd.APIError) as caught:
                    c.submit("echo", {"blob": "x" * (4 << 20)})
                self.assertEqual((caught.exception.status, caught.exception.code), (401, "missing_token"))
                self.assertIn("HTTP 401", str(caught.exception))


class OverTheUnixSocket(ClientTests, unittest.TestCase):
    def make_client(self) -> taskd.Client:
        assert DAEMON is not None
        return taskd.Client("unix:" + DAEMON.socket)


class OneWrite(unittest.TestCase):
    def test_a_request_leaves_in_one_write(self) -> None:
        # Head and body in two writes: the daemon could answer (and close) between them.
        from taskd import _http

        ours, theirs = socket.socketpair()
        writes = []

        class Recording:
            def sendall(self, data: bytes) -> None:
                writes.append(bytes(data))
                ours.sendall(data)

            def __getattr__(self, name: str) -> object:
                return getattr(ours, name)

        with ours, theirs:
            transport = _http.Transport("http://127.0.0.1:9", token="t0k", timeout=10)
            conn = transport._new()
            conn.sock = Recording()
            transport._new = lambda: conn  # type: ignore[method-assign]
            theirs.sendall(
                b'HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"id": "x"}'
            )
            answer = transport.request("POST", "/api/v1/queues/echo/tasks", {"payload": {"n": 1}})
            transport.close()
        self.assertEqual(answer, {"id": "x"})
        self.assertEqual(len(writes), 1, writes)
        self.assertTrue(writes[0].startswith(b"POST /api/v1/queues/echo/tasks HTTP/1.1\r\n"), writes)
        self.assertIn(b"\r\nAuthorization: Bearer t0k\r\n", writes[0])
        self.assertTrue(writes[0].endswith(b'\r\n\r\n{"payload": {"n": 1}}'), writes)


class Defaults(unittest.TestCase):
    def test_environment_decides_the_server_and_token(self) -> None:
        assert DAEMON is not None
        saved = {k: os.environ.get(k) for k in ("TASKD_SERVER", "TASKD_TOKEN")}
        try:
            os.environ["TASKD_SERVER"] = DAEMON.http
            os.environ["TASKD_TOKEN"] = TOKEN
            with taskd.Client() as c:
                self.assertEqual(c.server, DAEMON.http)
                self.assertEqual(c.submit("echo", [1]).result(timeout=30), [1])
            os.environ["TASKD_SERVER"] = "unix:" + DAEMON.socket
            del os.environ["TASKD_TOKEN"]
            with taskd.Client() as c:
                self.assertEqual(c.submit("echo", [2]).result(timeout=30), [2])
            del os.environ["TASKD_SERVER"]
            expected = "unix:/run/taskd/api.sock" if os.path.exists("/run/taskd/api.sock") else "http://127.0.0.1:7070"
            self.assertEqual(taskd.Client().server, expected)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def test_an_unreachable_daemon_is_named(self) -> None:
        with self.assertRaises(taskd.ConnectionFailed) as caught:
            taskd.Client("unix:/nonexistent/api.sock").submit("echo", {})
        self.assertIn("unix:/nonexistent/api.sock", str(caught.exception))
        with self.assertRaises(ValueError):
            taskd.Client("ftp://host")

    def test_after_is_passed_as_the_dependencies(self) -> None:
        assert DAEMON is not None
        with taskd.Client("unix:" + DAEMON.socket) as c:
            self._after_through(c)

    def _after_through(self, c: taskd.Client) -> None:
        # The parent waits a second: the child waits for it, in `scheduled`.
        parent = c.submit("echo", {"p": 1}, delay=1)
        child = c.submit("echo", {"c": 1}, after=[parent])
        by_id = c.submit("echo", {"c": 2}, after=[parent.id])
        self.assertEqual(child.info()["after"], [parent.id])
        self.assertEqual(child.state(), "scheduled")
        self.assertEqual(child.result(timeout=30), {"c": 1})
        self.assertEqual(by_id.result(timeout=30), {"c": 2})
        self.assertEqual(parent.state(), "succeeded")
        self.assertLessEqual(parent.info()["finished_at"], child.info()["history"][0]["started_at"])
        # A parent that fails cancels its dependants.
        failing = c.submit("fail", {})
        orphan = c.submit("echo", {}, after=[failing])
        with self.assertRaises(taskd.TaskFailed) as caught:
            orphan.result(timeout=30)
        self.assertEqual(caught.exception.state, "cancelled")
        self.assertIn("dependency %s failed" % failing.id, caught.exception.error or "")
        # `apply_async(after=...)` passes them the same way.
        from tests import app_tasks

        app_tasks.app._client = c
        first = app_tasks.add.apply_async(args=[1, 2], delay=0.5)
        then = app_tasks.add.apply_async(args=[3, 4], after=[first])
        self.assertEqual(then.info()["after"], [first.id])
        self.assertEqual(then.result(timeout=30), 7)
        self.assertEqual(first.state(), "succeeded")
        app_tasks.app._client = None


class WorkerProcess(unittest.TestCase):
    """What a worker process loads: `import taskd` and an App's module, and no HTTP client
    until something enqueues (it is most of a worker's memory)."""

    def loaded(self, code: str) -> "list[str]":
        probe = (
            "import sys\n%s\nprint(','.join(m for m in ('http.client', 'taskd.client', 'inspect') if m in sys.modules))"
            % code
        )
        return [m for m in self.probe(probe).split(",") if m]

    def probe(self, code: str) -> str:
        """What `code`, run by a new interpreter beside the package, prints (stripped)."""
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=PACKAGE_DIR,
            env=dict(os.environ, PYTHONPATH=PACKAGE_DIR),
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def test_a_worker_module_loads_no_http_client(self) -> None:
        self.assertEqual(self.loaded("import tests.app_tasks"), [])

    def test_serving_loads_neither_re_nor_enum(self) -> None:
        # The json, socket, signal and functools modules load re, enum, collections and
        # more: a worker uses the C modules below them (1.4 MiB less per interpreter).
        # (Counted from what the interpreter had loaded before: a site customization may
        # load some of them itself.)
        probe = (
            "import sys\nbefore = set(sys.modules)\nimport tests.app_tasks\n"
            "heavy = ('json', 're', 'enum', 'socket', 'signal', 'functools', 'collections', 'typing')\n"
            "print(','.join(m for m in heavy if m in sys.modules and m not in before))"
        )
        self.assertEqual(self.probe(probe), "")

    def test_the_wire_codec_agrees_with_json(self) -> None:
        from taskd import _wire

        values = [
            {"type": "result", "id": "01J", "status": "ok", "result": {"a": [1, -2, 3.25, 1e300]}},
            ["caf\u00e9", "\u2603 \ud83d\ude00", "tab\t nl\n quote\" back\\", ""],
            [None, True, False, 0, -0.0, 10**30, float("inf"), float("-inf")],
            {"nested": {"deep": [[[{}]], []]}, "k\u00e9y": "v"},
            "a bare string",
            12,
        ]
        for v in values:
            text = json.dumps(v, separators=(",", ":"))
            self.assertEqual(_wire.encode(v), text)
            self.assertEqual(_wire.decode(" %s \n" % text), json.loads(text))
        nan = _wire.decode('{"x": NaN}')["x"]
        self.assertNotEqual(nan, nan)
        with self.assertRaisesRegex(TypeError, "Object of type object is not JSON serializable"):
            _wire.encode({"x": [object()]})
        loop: list = []
        loop.append(loop)
        with self.assertRaises(ValueError):
            _wire.encode(loop)
        # A failed encoding leaves nothing behind for the next one.
        self.assertEqual(_wire.encode([[1], [2]]), "[[1],[2]]")
        for bad in ("", "   ", "{", '{"a": 1} x', "[1,]", "nul"):
            with self.assertRaises(ValueError, msg=bad):
                _wire.decode(bad)

    def test_without_the_accelerator_the_json_package_serves(self) -> None:
        probe = (
            "import sys\nsys.modules['_json'] = None\nfrom taskd import _wire\n"
            "print(_wire.encode(_wire.decode(' {\"a\": [1, 2.5, \"\\\\u00e9\"]}\\n')), 'json' in sys.modules)"
        )
        self.assertEqual(self.probe(probe), '{"a":[1,2.5,"\\u00e9"]} True')

    def test_a_task_function_looks_like_its_function(self) -> None:
        app = taskd.App(queue="q")

        def f(x):
            """Doubles x."""
            return 2 * x

        f.extra = "kept"  # type: ignore[attr-defined]
        tf = app.task(f)
        self.assertEqual((tf.__name__, tf.__doc__, tf.__module__), ("f", "Doubles x.", __name__))
        self.assertEqual(tf.__qualname__, f.__qualname__)
        self.assertIs(tf.__wrapped__, f)
        self.assertEqual(tf.extra, "kept")  # type: ignore[attr-defined]
        self.assertEqual(tf(21), 42)

    def test_the_client_is_loaded_when_first_used(self) -> None:
        self.assertIn("http.client", self.loaded("import taskd\ntaskd.Client"))
        self.assertIn("taskd.client", self.loaded("from taskd import DEFAULT_SOCKET"))
        self.assertEqual(taskd.Client.__name__, "Client")
        self.assertEqual(taskd.DEFAULT_SOCKET, "/run/taskd/api.sock")
        with self.assertRaises(AttributeError):
            taskd.no_such_name  # noqa: B018

    def test_a_return_value_json_cannot_hold_fails_that_task_only(self) -> None:
        # The worker loop over real pipes, without a daemon: an answer per task.
        worker = (
            "import taskd\n"
            "app = taskd.App(queue='q')\n"
            "@app.task\n"
            "def f(x):\n"
            "    return {1, 2} if x == 'set' else [x]\n"
            "app.run()\n"
        )
        t_r, t_w = os.pipe()
        r_r, r_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=PACKAGE_DIR, TASKD_WORKER_PROTOCOL="1",
                   TASKD_TASK_FD=str(t_r), TASKD_RESULT_FD=str(r_w))
        p = subprocess.Popen([sys.executable, "-c", worker], pass_fds=(t_r, r_w), env=env,
                             stdout=subprocess.DEVNULL)
        os.close(t_r)
        os.close(r_w)
        with os.fdopen(t_w, "wb", buffering=0) as tasks, os.fdopen(r_r, "rb") as answers:
            self.assertEqual(json.loads(answers.readline()), {"type": "ready", "protocol": 1})
            answers_seen = []
            for i, x in enumerate(["set", "ok", "caf\u00e9"]):
                msg = {"type": "task", "id": "t%d" % i, "queue": "q", "attempt": 1,
                       "payload": {"task": "f", "args": [x], "kwargs": {}}}
                tasks.write((json.dumps(msg) + "\n").encode())
                answers_seen.append(json.loads(answers.readline()))
        self.assertEqual(p.wait(timeout=30), 0)
        self.assertEqual(answers_seen[0]["status"], "error")
        self.assertNotIn("result", answers_seen[0])
        self.assertIn("not JSON", answers_seen[0]["message"])
        self.assertEqual(answers_seen[1], {"type": "result", "id": "t1", "status": "ok", "result": ["ok"]})
        self.assertEqual(answers_seen[2]["result"], ["caf\u00e9"])

    def test_a_forking_parent_forks_workers_and_reports_their_exit(self) -> None:
        # worker_fork's parent over a real socket pair, without a daemon: `forkserver`, a
        # `fork` with five descriptors, a child that serves as a worker in its own process
        # group, its exit reported, and the parent's exit when the socket closes.
        import socket

        worker = (
            "import os, taskd\n"
            "app = taskd.App(queue='q')\n"
            "@app.task\n"
            "def who():\n"
            "    print('from the child')\n"
            "    return [os.getpid(), os.getppid(), os.getpgid(0), os.environ['TASKD_WORKER_SLOT']]\n"
            "app.run()\n"
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, PYTHONPATH=PACKAGE_DIR, TASKD_WORKER_PROTOCOL="1",
                   TASKD_WORKER_FORK_FD=str(theirs.fileno()))
        p = subprocess.Popen([sys.executable, "-c", worker], pass_fds=(theirs.fileno(),), env=env,
                             stdout=subprocess.DEVNULL)
        theirs.close()
        try:
            self.assertEqual(json.loads(ours.recv(4096)), {"type": "forkserver", "protocol": 1})
            t_r, t_w = os.pipe()
            r_r, r_w = os.pipe()
            o_r, o_w = os.pipe()
            e_r, e_w = os.pipe()
            null = os.open(os.devnull, os.O_RDONLY)
            socket.send_fds(ours, [b'{"type":"fork","slot":3}'], [t_r, r_w, null, o_w, e_w])
            for fd in (t_r, r_w, null, o_w, e_w):
                os.close(fd)
            forked = json.loads(ours.recv(4096))
            self.assertEqual((forked["type"], forked["slot"]), ("forked", 3))
            child = forked["pid"]
            with os.fdopen(t_w, "wb", buffering=0) as tasks, os.fdopen(r_r, "rb") as answers:
                self.assertEqual(json.loads(answers.readline()), {"type": "ready", "protocol": 1})
                tasks.write(b'{"type":"task","id":"t1","payload":{"task":"who","args":[],"kwargs":{}}}\n')
                answer = json.loads(answers.readline())
            self.assertEqual(answer["result"], [child, p.pid, child, "3"])
            self.assertEqual(os.read(o_r, 100), b"from the child\n")
            # The task pipe closed: the worker exits 0, and the parent says so.
            self.assertEqual(json.loads(ours.recv(4096)), {"type": "exited", "pid": child, "status": 0})
            for fd in (o_r, e_r):
                os.close(fd)
        finally:
            ours.close()
        self.assertEqual(p.wait(timeout=30), 0)


if __name__ == "__main__":
    unittest.main()
