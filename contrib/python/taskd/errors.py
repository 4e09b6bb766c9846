"""What the taskd library raises."""

from __future__ import annotations

# The typing module is for the type checker only: a worker process does not load it (see
# docs/python.md, "Memory"). Type checkers read `TYPE_CHECKING` by its name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional


class Error(Exception):
    """The base of every error the library raises about a daemon or a task."""


class ConnectionFailed(Error):
    """The daemon's API could not be reached (or the connection broke)."""

    def __init__(self, server: str, cause: BaseException) -> None:
        self.server = server
        self.cause = cause
        super().__init__("failed to reach the taskd API at %s: %s" % (server, cause))


class APIError(Error):
    """The API refused a request: `status` (HTTP), `code` (`unknown_queue`,
    `invalid_task`, `bad_token`, …), `message`, and the whole error object in `details`."""

    def __init__(self, status: int, code: str, message: str, details: Dict[str, Any]) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        super().__init__("%s (HTTP %d, %s)" % (message, status, code))


class TaskFailed(Error):
    """The task failed or was cancelled: its `state`, its `error` (the last attempt's, or
    the task's last error) and the `output` tail of its last attempt (stdout, then stderr)."""

    def __init__(
        self,
        task_id: str,
        state: str,
        error: Optional[str],
        stdout: str,
        stderr: str,
        task: Dict[str, Any],
    ) -> None:
        self.task_id = task_id
        self.state = state
        self.error = error
        self.stdout = stdout
        self.stderr = stderr
        self.output = stdout + stderr
        self.task = task
        message = "task %s %s: %s" % (task_id, state, error or "no error recorded")
        tail = self.output.strip()
        if tail:
            message += "\n--- output of its last attempt ---\n" + tail[-2000:]
        super().__init__(message)


class Timeout(Error):
    """The task had not finished when the time given to `result()` ran out."""

    def __init__(self, task_id: str, state: str, waited: float) -> None:
        self.task_id = task_id
        self.state = state
        self.waited = waited
        super().__init__(
            "task %s not finished after %.3gs (it is %s)" % (task_id, waited, state)
        )


class Retry(Exception):
    """Raised by a task function: this attempt failed, and taskd retries the task with the
    queue's backoff (until `max_attempts`)."""


class Fail(Exception):
    """Raised by a task function: the task fails for good, without a retry."""
