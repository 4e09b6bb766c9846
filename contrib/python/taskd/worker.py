"""The worker side of taskd's worker protocol (docs/worker-protocol.md, version 1.3): tasks
arrive as JSON lines on TASKD_TASK_FD (3), answers go to TASKD_RESULT_FD (4), so that a stray
print() cannot corrupt them; stdout and stderr are the running task's output."""

from __future__ import annotations

import base64
import json
import os
import sys
import traceback
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


#: Compact JSON, one encoder for every message (json.dumps makes one per call with options).
_encode = json.JSONEncoder(separators=(",", ":")).encode
#: taskd's lines are UTF-8 JSON objects.
_decode = json.JSONDecoder().decode


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
