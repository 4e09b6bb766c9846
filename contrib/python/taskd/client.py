"""The client side: enqueue tasks and read them back through the daemon's HTTP API."""

from __future__ import annotations

import base64
import datetime
import os
import time
import urllib.parse
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from ._http import Transport
from .errors import TaskFailed, Timeout

#: Where `Client()` looks for the daemon's Unix socket when TASKD_SERVER is not set
#: (`listen = "unix:/run/taskd/api.sock"` in taskd.toml).
DEFAULT_SOCKET = "/run/taskd/api.sock"
#: The address `Client()` uses when neither TASKD_SERVER nor the socket is there.
DEFAULT_SERVER = "http://127.0.0.1:7070"

#: The states a task ends in.
FINISHED = ("succeeded", "failed", "cancelled")

Seconds = Union[int, float, datetime.timedelta]


def _seconds(value: Seconds) -> float:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return float(value)


def _duration(value: Seconds) -> str:
    """A delay as the API reads it (whole milliseconds)."""
    ms = int(round(_seconds(value) * 1000))
    if ms < 0:
        raise ValueError("a delay cannot be negative")
    return "%dms" % ms


def default_server() -> str:
    """TASKD_SERVER, else the Unix socket at DEFAULT_SOCKET when it exists, else
    DEFAULT_SERVER."""
    server = os.environ.get("TASKD_SERVER")
    if server:
        return server
    if os.path.exists(DEFAULT_SOCKET):
        return "unix:" + DEFAULT_SOCKET
    return DEFAULT_SERVER


class Task:
    """A task taskd holds: its `id`, and calls that read it."""

    def __init__(self, client: "Client", id: str, queue: Optional[str] = None, existing: bool = False) -> None:
        self.client = client
        self.id = id
        self.queue = queue
        #: True when `unique=` found a waiting or running task with the key: this is that one.
        self.existing = existing

    def __repr__(self) -> str:
        return "Task(id=%r, queue=%r)" % (self.id, self.queue)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def info(self) -> Dict[str, Any]:
        """The task as the API shows it: state, attempts, `history`, `result`, …"""
        return self.client.get(self.id)

    def state(self) -> str:
        """`scheduled`, `queued`, `running`, `retrying`, `succeeded`, `failed` or `cancelled`."""
        return str(self.info()["state"])

    def result(self, timeout: Optional[Seconds] = None) -> Any:
        """Waits for the task to finish and returns what it returned (None: nothing).

        Raises TaskFailed when it failed or was cancelled, Timeout when `timeout` seconds
        pass first (None: wait as long as it takes)."""
        limit = None if timeout is None else _seconds(timeout)
        start = time.monotonic()
        pause = 0.02
        while True:
            task = self.info()
            state = task.get("state")
            if state == "succeeded":
                return task.get("result")
            if state in ("failed", "cancelled"):
                raise _failure(task)
            waited = time.monotonic() - start
            if limit is not None and waited >= limit:
                raise Timeout(self.id, str(state), waited)
            nap = pause if limit is None else min(pause, max(limit - waited, 0.0))
            time.sleep(nap)
            pause = min(pause * 2, 0.5)

    def cancel(self) -> Dict[str, Any]:
        """Cancels the task (a running one is stopped): the API's answer."""
        return self.client._transport.request("POST", "/api/v1/tasks/%s/cancel" % self._quoted())

    def _quoted(self) -> str:
        return urllib.parse.quote(self.id, safe="")


def _failure(task: Dict[str, Any]) -> TaskFailed:
    history = task.get("history") or []
    last = history[-1] if history else {}
    error = last.get("error") or task.get("last_error")
    if task.get("state") == "cancelled" and not error:
        error = "cancelled"
    return TaskFailed(
        str(task.get("id")),
        str(task.get("state")),
        error,
        last.get("stdout_tail") or "",
        last.get("stderr_tail") or "",
        task,
    )


class Client:
    """A client of one taskd daemon's API.

    `server`: `http://host:port` or `unix:/path/to/api.sock`; by default TASKD_SERVER, else
    the Unix socket at /run/taskd/api.sock if it exists, else http://127.0.0.1:7070.
    `token`: the API's bearer token (by default TASKD_TOKEN); a Unix socket needs none.
    Connections are kept open between calls (one per thread). A Client may be shared by
    threads, and survives a fork (the child opens its own connection)."""

    def __init__(
        self,
        server: Optional[str] = None,
        token: Optional[str] = None,
        timeout: float = 30.0,
    ) -> None:
        server = server or default_server()
        if token is None:
            token = os.environ.get("TASKD_TOKEN") or None
        self._transport = Transport(server, token, timeout)

    @property
    def server(self) -> str:
        return self._transport.server

    def __repr__(self) -> str:
        return "Client(server=%r)" % self.server

    def close(self) -> None:
        """Closes this thread's connection (a later call opens a new one)."""
        self._transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self,
        queue: str,
        payload: Any = None,
        *,
        raw: Optional[Union[bytes, bytearray, memoryview]] = None,
        delay: Optional[Seconds] = None,
        priority: int = 0,
        unique: Optional[str] = None,
        after: Optional[Sequence[Union[str, Task]]] = None,
        run_at: Optional[Union[int, str, datetime.datetime]] = None,
        args: Optional[Sequence[str]] = None,
    ) -> Task:
        """Enqueues one task on `queue` with `payload` (any JSON value; None is `{}`).

        `delay`: run no sooner than this many seconds from now (or a timedelta); `run_at`:
        no sooner than this time (a datetime, Unix seconds, or RFC 3339 text); `priority`:
        higher runs first; `unique`: at most one waiting or running task of the queue holds
        this key (a second submit returns the first task, with `existing` set); `after`:
        tasks (or ids) that must succeed first; `args`: extra argv for a command queue.

        `raw`: bytes to send instead of a JSON payload (a serialized Protobuf message, an
        image); taskd stores them untouched and the task reads them on stdin byte for byte
        (a worker gets them base64-encoded in `payload_b64`). A queue whose command has
        `{field}` placeholders or whose script reads $TASKD_ARG_<field> refuses them."""
        path = "/api/v1/queues/%s/tasks" % urllib.parse.quote(queue, safe="")
        if raw is not None:
            if payload is not None:
                raise ValueError("give a payload or raw bytes, not both")
            if args:
                raise ValueError("a raw payload takes no extra args")
            body = _task_body(None, delay, priority, unique, after, run_at, None)
            del body["payload"]
            query = urllib.parse.urlencode(
                {k: (",".join(v) if isinstance(v, list) else v) for k, v in body.items()}
            )
            answer = self._transport.request(
                "POST", path + ("?" + query if query else ""), raw=bytes(raw)
            )
        else:
            body = _task_body(payload, delay, priority, unique, after, run_at, args)
            answer = self._transport.request("POST", path, body)
        return Task(self, str(answer["id"]), queue, bool(answer.get("existing")))

    def submit_many(
        self,
        queue: str,
        payloads: Iterable[Any],
        *,
        delay: Optional[Seconds] = None,
        priority: int = 0,
        after: Optional[Sequence[Union[str, Task]]] = None,
    ) -> List[Task]:
        """Enqueues one task per payload on `queue`, in one batch: all of them, or none
        (an error names the item refused). A payload of `bytes` is a raw payload (as
        `submit(raw=...)`)."""
        items = [_task_body(p, delay, priority, None, after, None, None) for p in payloads]
        if not items:
            return []
        answer = self._transport.request(
            "POST", "/api/v1/queues/%s/tasks/batch" % urllib.parse.quote(queue, safe=""), items
        )
        return [Task(self, str(i), queue) for i in answer["ids"]]

    def task(self, id: str) -> Task:
        """A Task for an id got earlier (from a log, a database row)."""
        return Task(self, id)

    def get(self, id: str) -> Dict[str, Any]:
        """The task with this id, as the API shows it."""
        return self._transport.request("GET", "/api/v1/tasks/%s" % urllib.parse.quote(id, safe=""))

    def queues(self) -> Dict[str, Any]:
        """The daemon's queues with their counts, workers and nodes (`taskd status`)."""
        return self._transport.request("GET", "/api/v1/queues")


def _task_body(
    payload: Any,
    delay: Optional[Seconds],
    priority: int,
    unique: Optional[str],
    after: Optional[Sequence[Union[str, Task]]],
    run_at: Optional[Union[int, str, datetime.datetime]],
    args: Optional[Sequence[str]],
) -> Dict[str, Any]:
    body: Dict[str, Any]
    if isinstance(payload, (bytes, bytearray, memoryview)):
        body = {"payload_b64": base64.b64encode(bytes(payload)).decode("ascii")}
    else:
        body = {"payload": {} if payload is None else payload}
    if delay is not None:
        body["delay"] = _duration(delay)
    if run_at is not None:
        if isinstance(run_at, datetime.datetime):
            if run_at.tzinfo is None:
                raise ValueError("run_at needs a time zone (datetime.timezone.utc, …)")
            body["run_at"] = run_at.isoformat()
        else:
            body["run_at"] = run_at
    if priority:
        body["priority"] = int(priority)
    if unique is not None:
        body["unique"] = unique
    if after:
        body["after"] = [t.id if isinstance(t, Task) else str(t) for t in after]
    if args:
        body["args"] = [str(a) for a in args]
    return body
