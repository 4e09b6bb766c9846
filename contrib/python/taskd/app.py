"""Python functions as tasks: `App`, `@app.task`, `f.delay(...)`, and `app.run()`, the
long-lived worker that runs them."""

from __future__ import annotations

from .errors import Fail
from .worker import Job, serve

# The typing module is for the type checker only: a worker process does not load it (a
# worker's memory, docs/python.md); at run time `Generic`, `TypeVar` and `overload` are the
# stand-ins below. Type checkers read `TYPE_CHECKING` by its name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Generic, Optional, Sequence, TypeVar, Union, overload

    # Imported when first used: a worker process that only serves never loads the HTTP
    # client (http.client and the email package it pulls in, some 5 MiB per process).
    from .client import Client, Seconds, Task
else:

    class Generic:
        """`TaskFunction[int]` still works at run time, as with typing.Generic."""

        def __class_getitem__(cls, item: object) -> object:
            return cls

    def TypeVar(name: str) -> str:  # noqa: N802 (typing's name)
        return name

    def overload(fn: object) -> object:
        return fn


R = TypeVar("R")


class TaskFunction(Generic[R]):
    """A function registered with `@app.task`: call it to run it here and now, or
    `.delay(*args, **kwargs)` to have a worker of the app's queue run it."""

    def __init__(self, app: "App", fn: Callable[..., R], name: str) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        # functools.update_wrapper's work, without loading functools (and collections,
        # operator, reprlib, types...) into every worker.
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            try:
                setattr(self, attr, getattr(fn, attr))
            except AttributeError:
                pass
        self.__dict__.update(getattr(fn, "__dict__", {}))
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return "<task %s on queue %s>" % (self.name, self.app.queue)

    def delay(self, *args: Any, **kwargs: Any) -> Task:
        """Enqueues a call with these arguments (JSON values): the payload is
        `{"task": name, "args": [...], "kwargs": {...}}`."""
        return self.apply_async(args=args, kwargs=kwargs)

    def apply_async(
        self,
        args: Optional[Sequence[Any]] = None,
        kwargs: Optional[Dict[str, Any]] = None,
        *,
        delay: Optional[Seconds] = None,
        priority: int = 0,
        unique: Optional[str] = None,
        after: Optional[Sequence[Union[str, Task]]] = None,
    ) -> Task:
        """Enqueues a call, with the options of `Client.submit`."""
        payload = {"task": self.name, "args": list(args or ()), "kwargs": dict(kwargs or {})}
        return self.app.client.submit(
            self.app.queue, payload, delay=delay, priority=priority, unique=unique, after=after
        )


def _binds(fn: Callable[..., Any], args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    """Whether `fn`'s signature takes these arguments (True when it has none to check: a
    builtin's own TypeError then stands)."""
    import inspect

    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:
        pass
    return True


class App:
    """The functions one queue's worker runs. In the web app, `f.delay(...)` enqueues;
    in the worker program, `app.run()` serves the queue (`worker = ["python3", "worker.py"]`
    in taskd.toml)."""

    def __init__(self, queue: str, client: Optional[Client] = None) -> None:
        self.queue = queue
        self._client = client
        self.tasks: Dict[str, TaskFunction[Any]] = {}

    @property
    def client(self) -> Client:
        """The Client `delay` enqueues with: the one given, else `Client()` (made on first use)."""
        if self._client is None:
            from .client import Client

            self._client = Client()
        return self._client

    @overload
    def task(self, fn: Callable[..., R]) -> TaskFunction[R]: ...

    @overload
    def task(self, *, name: Optional[str] = None) -> Callable[[Callable[..., R]], TaskFunction[R]]: ...

    def task(self, fn: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None) -> Any:
        """Registers `fn` under its name (or `name`): `@app.task` or `@app.task(name="x")`."""

        def register(f: Callable[..., R]) -> TaskFunction[R]:
            key = name or f.__name__
            if key in self.tasks:
                raise ValueError("a task named %r is already registered with this App" % key)
            tf: TaskFunction[R] = TaskFunction(self, f, key)
            self.tasks[key] = tf
            return tf

        if fn is not None:
            return register(fn)
        return register

    def dispatch(self, payload: Any, job: Optional[Job] = None) -> Any:
        """Runs the call a payload names: what `run()` does with each task."""
        if isinstance(payload, bytes):
            raise Fail(
                "a raw payload (%d bytes) names no task: an App's worker runs the calls that "
                "f.delay() sends; serve raw payloads with taskd.serve(handler) instead; this "
                "worker has %s" % (len(payload), self._names())
            )
        if not isinstance(payload, dict) or not isinstance(payload.get("task"), str):
            raise Fail(
                "the payload names no task: expected {\"task\": NAME, \"args\": [...], "
                "\"kwargs\": {...}}, as f.delay() sends; this worker has %s" % self._names()
            )
        name = payload["task"]
        tf = self.tasks.get(name)
        if tf is None:
            raise Fail("unknown task %r: this worker has %s" % (name, self._names()))
        args = payload.get("args") or []
        kwargs = payload.get("kwargs") or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise Fail("task %r: `args` must be a list and `kwargs` an object" % name)
        try:
            return tf.fn(*args, **kwargs)
        except TypeError as e:
            # Arguments the function cannot take fail before its body runs: a call that can
            # never work fails the task now instead of being retried. The signature is looked
            # at only then, so that a call that works pays nothing for the check.
            if not _binds(tf.fn, args, kwargs):
                raise Fail("task %r cannot be called with these arguments: %s" % (name, e)) from None
            raise

    def _names(self) -> str:
        if not self.tasks:
            return "no registered tasks"
        return "these registered tasks: " + ", ".join(sorted(self.tasks))

    def run(self) -> None:
        """Serves the queue's tasks as a long-lived worker until taskd stops it: each task's
        payload names a registered function, whose return value is the task's result.
        `taskd.Retry` and any other exception fail the attempt (retried with the queue's
        backoff), `taskd.Fail` fails the task; an unknown name fails that task only."""
        serve(self.dispatch, name="taskd.App(%r)" % self.queue)
