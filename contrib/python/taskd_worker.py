"""taskd_worker: a taskd long-lived worker as a decorated function and a run() call.

Single file, standard library only. Copy it next to your worker, then:

    import taskd_worker

    @taskd_worker.task
    def handle(payload, job):
        print("working on", job.id)       # stdout/stderr are the task's output
        if payload.get("later"):
            raise taskd_worker.Retry("not now")   # a failed attempt: retried with backoff
        if "to" not in payload:
            raise taskd_worker.Fail("no recipient")  # fails the task for good
        return {"sent": True}              # returning is success; the value is the result

    if __name__ == "__main__":
        taskd_worker.run()

What the function returns is the task's result (`taskd result ID`, `taskd show`, the API):
any value json.dumps() takes; None is no result. A value it cannot encode fails the task
(not retried), with the TypeError as its error. Any exception is a failed attempt (retried
like a non-zero exit), with its traceback on stderr. The protocol (version 1.1) is described
in docs/worker-protocol.md: tasks arrive as JSON lines on the descriptor named by
TASKD_TASK_FD (3), answers go to TASKD_RESULT_FD (4), so that a stray print() cannot corrupt
them. A taskd older than minor version 1 ignores the result; the task still succeeds.
"""

import base64
import inspect
import json
import os
import sys
import traceback

PROTOCOL = 1

__all__ = ["task", "run", "progress", "Retry", "Fail", "Job"]


class Retry(Exception):
    """Raise to fail this attempt; taskd retries the task with the queue's backoff."""


class Fail(Exception):
    """Raise to fail the task for good: it is not retried."""


class Job:
    """What taskd says about the task being run."""

    def __init__(self, msg):
        self.id = msg["id"]
        self.queue = msg.get("queue")
        self.attempt = msg.get("attempt")
        self.max_attempts = msg.get("max_attempts")
        self.args = msg.get("args") or []

    def __repr__(self):
        return "Job(id=%r, attempt=%r)" % (self.id, self.attempt)


_handler = None
_results = None
_current = None


def task(fn):
    """Decorator: `fn(payload)` or `fn(payload, job)` handles every task of this worker."""
    global _handler
    _handler = fn
    return fn


def _send(obj):
    line = (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8")
    view = memoryview(line)
    while view:
        n = os.write(_results, view)
        view = view[n:]


def progress(message=None):
    """Tell taskd the current task is alive (shown in the daemon's debug log)."""
    if _current is None:
        return
    msg = {"type": "progress", "id": _current.id}
    if message is not None:
        msg["message"] = str(message)
    _send(msg)


def _call(fn, payload, job):
    try:
        params = inspect.signature(fn).parameters
        takes_job = len(params) >= 2 or any(
            p.kind == p.VAR_POSITIONAL for p in params.values()
        )
    except (TypeError, ValueError):
        takes_job = False
    return fn(payload, job) if takes_job else fn(payload)


def run(handler=None):
    """Serve tasks until taskd closes the task pipe (then return) or stops the process."""
    global _results, _current
    fn = handler or _handler
    if fn is None:
        raise RuntimeError("no task handler: decorate a function with @taskd_worker.task")
    version = os.environ.get("TASKD_WORKER_PROTOCOL")
    if version != str(PROTOCOL):
        sys.stderr.write(
            "taskd_worker: not started by taskd as a protocol %d worker "
            "(TASKD_WORKER_PROTOCOL=%r)\n" % (PROTOCOL, version)
        )
        sys.exit(2)
    task_fd = int(os.environ.get("TASKD_TASK_FD", "3"))
    _results = int(os.environ.get("TASKD_RESULT_FD", "4"))
    tasks = os.fdopen(task_fd, "rb")
    _send({"type": "ready", "protocol": PROTOCOL})
    for line in tasks:
        msg = json.loads(line)
        if msg.get("type") != "task":
            continue
        job = Job(msg)
        _current = job
        result = {"type": "result", "id": job.id, "status": "ok"}
        try:
            payload = msg.get("payload")
            if "payload_b64" in msg:
                # A raw payload (`taskd submit --raw`): the bytes as they were sent.
                payload = base64.b64decode(msg["payload_b64"])
            value = _call(fn, payload, job)
            if value is not None:
                try:
                    # Encoded now, so that a value JSON cannot hold fails this task only.
                    json.dumps(value)
                except (TypeError, ValueError) as e:
                    result.update(
                        status="error",
                        message="the task's return value is not JSON: %s: %s"
                        % (type(e).__name__, e),
                    )
                else:
                    result["result"] = value
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
        _send(result)
