"""The worker side of taskd's worker protocol (docs/worker-protocol.md, version 1.4): tasks
arrive as JSON lines on TASKD_TASK_FD (3), answers go to TASKD_RESULT_FD (4), so that a stray
print() cannot corrupt them; stdout and stderr are the running task's output.

With `worker_fork = true` (TASKD_WORKER_FORK_FD set) the process is the queue's *parent*: it
has loaded the program (the module that calls `app.run()` imported everything), announces
itself on that descriptor and forks one worker per request; each child then serves as above.
"""

from __future__ import annotations

import fcntl
import gc
import os
import select
import sys

# Only what serving a task needs is loaded here: typing is for the type checker, base64 and
# traceback are imported when a raw payload or a failure first needs them, and the C modules
# under json, socket and signal are used directly: the Python layers above them load re and
# enum, about 1.4 MiB per interpreter (docs/python.md, "Memory"; with worker_fork, what the
# parent loads is shared, what a child loads is its own).
try:
    import _signal
    import _socket
except ImportError:  # an interpreter without CPython's module layout
    import signal as _signal  # type: ignore[no-redef]
    import socket as _socket  # type: ignore[no-redef]

from ._wire import decode as _decode
from ._wire import encode as _encode
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Optional

from .errors import Fail, Retry

PROTOCOL = 1


class Job:
    """What taskd says about the task being run: `id`, `queue`, `attempt`, `max_attempts`."""

    def __init__(self, msg: Dict[str, Any]) -> None:
        self.id: str = msg["id"]
        self.queue: Optional[str] = msg.get("queue")
        self.attempt: int = int(msg.get("attempt") or 1)
        self.max_attempts: Optional[int] = msg.get("max_attempts")
        self.args = list(msg.get("args") or [])
        #: The ids of the tasks this one ran after (all succeeded).
        self.after = list(msg.get("after") or [])
        #: True when the payload is raw bytes (`submit --raw`), not JSON.
        self.raw: bool = "payload_b64" in msg

    def __repr__(self) -> str:
        return "Job(id=%r, attempt=%r)" % (self.id, self.attempt)


_current: Optional[Job] = None
_results: Optional[int] = None


def current_job() -> Optional[Job]:
    """The task this worker runs now (None outside a task)."""
    return _current


def _send(obj: Dict[str, Any]) -> None:
    _write((_encode(obj) + "\n").encode("utf-8"))


def _write(line: bytes) -> None:
    assert _results is not None
    view = memoryview(line)
    while view:
        n = os.write(_results, view)
        view = view[n:]


def progress(message: Optional[str] = None) -> None:
    """Tells taskd the current task is alive (shown in the daemon's debug log)."""
    if _current is None or _results is None:
        return
    msg: Dict[str, Any] = {"type": "progress", "id": _current.id}
    if message is not None:
        msg["message"] = str(message)
    _send(msg)


def serve(handle: Callable[[Any, Job], Any], name: str = "taskd") -> None:
    """Serves tasks until taskd closes the task pipe: `handle(payload, job)` runs each (the
    payload is the JSON value, or `bytes` for a raw payload); its return value is the result,
    Retry and any other exception a retried attempt, Fail a failed task."""
    global _results, _current
    version = os.environ.get("TASKD_WORKER_PROTOCOL")
    if version != str(PROTOCOL):
        sys.stderr.write(
            "%s: not started by taskd as a protocol %d worker (TASKD_WORKER_PROTOCOL=%r); "
            "run it as a queue's `worker = [...]`\n" % (name, PROTOCOL, version)
        )
        sys.exit(2)
    fork_fd = os.environ.get("TASKD_WORKER_FORK_FD")
    if fork_fd is not None:
        # Returns in each forked worker only; the parent exits from inside.
        _fork_server(int(fork_fd))
    task_fd = int(os.environ.get("TASKD_TASK_FD", "3"))
    _results = int(os.environ.get("TASKD_RESULT_FD", "4"))
    tasks = os.fdopen(task_fd, "rb")
    _send({"type": "ready", "protocol": PROTOCOL})
    for line in tasks:
        msg = _decode(line.decode("utf-8"))
        if msg.get("type") != "task":
            continue
        job = Job(msg)
        _current = job
        result: Dict[str, Any] = {"type": "result", "id": job.id, "status": "ok"}
        line: Optional[str] = None
        try:
            payload: Any = msg.get("payload")
            if job.raw:
                # A raw payload: the bytes as they were submitted.
                import base64

                payload = base64.b64decode(msg["payload_b64"])
            value = handle(payload, job)
            if value is not None:
                result["result"] = value
                try:
                    # The answer, encoded once, here: a value JSON cannot hold fails this
                    # task only.
                    line = _encode(result)
                except (TypeError, ValueError) as e:
                    del result["result"]
                    result.update(
                        status="error",
                        message="the task's return value is not JSON: %s: %s"
                        % (type(e).__name__, e),
                    )
        except Retry as e:
            result.update(status="retry", message=str(e) or "retry requested")
        except Fail as e:
            result.update(status="error", message=str(e) or "failed")
        except Exception as e:  # any other failure is a failed attempt, as in exec mode
            import traceback

            traceback.print_exc()
            result.update(status="retry", message="%s: %s" % (type(e).__name__, e))
        finally:
            _current = None
            # What the task printed belongs to it: out before the answer.
            try:
                sys.stdout.flush()
            finally:
                sys.stderr.flush()
        _write(((line if line is not None else _encode(result)) + "\n").encode("utf-8"))


def _fork_server(fd: int) -> None:
    """The parent of a `worker_fork` queue: answers taskd's `fork` requests (each carries the
    worker's descriptors 3, 4, 0, 1, 2) by forking, reports each worker's exit status, and
    exits when taskd closes the socket. Returns only in a forked worker, set up to serve."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, fd)
    # Children exit-report through a self-pipe: SIGCHLD only wakes the select below.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    _signal.signal(_signal.SIGCHLD, lambda signum, frame: None)
    _signal.set_wakeup_fd(wake_w)
    # What is loaded now stays shared with the children: the collector would otherwise
    # touch (and so copy) every object's header in each child.
    gc.collect()
    gc.freeze()

    def send(obj: Dict[str, Any]) -> None:
        try:
            sock.send(_encode(obj).encode("utf-8"))
        except (BrokenPipeError, ConnectionResetError):
            # taskd is gone: no more workers from this parent.
            os._exit(0)

    send({"type": "forkserver", "protocol": PROTOCOL})
    while True:
        try:
            ready, _, _ = select.select([sock, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                send({"type": "exited", "pid": pid, "status": status})
        if sock not in ready:
            continue
        try:
            data, fds = _recv_fds(sock, 65536, 8)
        except InterruptedError:
            continue
        except ConnectionResetError:
            # taskd closed the socket with our exit reports unread: the same end.
            data, fds = b"", []
        if not data:
            # taskd closed the socket: no more workers from this parent. The children are
            # taskd's to stop, not ours.
            os._exit(0)
        try:
            msg = _decode(data.decode("utf-8"))
        except ValueError:
            msg = {}
        slot = msg.get("slot")
        if msg.get("type") != "fork" or len(fds) != 5:
            for f in fds:
                os.close(f)
            send({"type": "error", "slot": slot, "message": "a fork request needs 5 descriptors"})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as e:
            for f in fds:
                os.close(f)
            send({"type": "error", "slot": slot, "message": "fork: %s" % e})
            continue
        if pid == 0:
            _become_worker(sock, fds, slot, (wake_r, wake_w))
            return
        for f in fds:
            os.close(f)
        send({"type": "forked", "slot": slot, "pid": pid})


def _recv_fds(sock: Any, size: int, maxfds: int) -> Any:
    """socket.recv_fds without the socket module: one message and the descriptors it
    carries (SCM_RIGHTS)."""
    data, ancdata, _flags, _addr = sock.recvmsg(size, _socket.CMSG_LEN(maxfds * 4))
    fds = []
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            for i in range(0, len(payload) - len(payload) % 4, 4):
                fds.append(int.from_bytes(payload[i : i + 4], sys.byteorder, signed=True))
    return data, fds


def _become_worker(sock: Any, fds: Any, slot: Any, wake: Any) -> None:
    """In a forked child: a process group of its own (taskd signals the group; not a session,
    which would be a scheduler autogroup of its own, its wake-ups slowed on a busy machine), the
    received descriptors as 3, 4, 0, 1, 2, nothing of the parent's conversation left."""
    _signal.set_wakeup_fd(-1)
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    os.setpgid(0, 0)
    # Above every target first, so that moving one cannot overwrite another.
    high = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, 10) for f in fds]
    for f in fds:
        os.close(f)
    for f in wake:
        os.close(f)
    sock.close()
    for target, f in zip((3, 4, 0, 1, 2), high):
        os.dup2(f, target)
        os.close(f)
    os.environ.pop("TASKD_WORKER_FORK_FD", None)
    os.environ["TASKD_TASK_FD"] = "3"
    os.environ["TASKD_RESULT_FD"] = "4"
    os.environ["TASKD_WORKER_SLOT"] = str(slot)
