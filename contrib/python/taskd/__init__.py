"""taskd for Python: enqueue tasks from a web app, run Python functions as tasks.

    import taskd

    client = taskd.Client()      # TASKD_SERVER / TASKD_TOKEN, else /run/taskd/api.sock,
                                 # else http://127.0.0.1:7070
    t = client.submit("emails", {"to": "a@example.com"}, delay=60)
    t.result(timeout=30)         # raises taskd.TaskFailed or taskd.Timeout

    app = taskd.App(queue="emails")

    @app.task
    def send_welcome(user_id, lang="en"):
        return {"sent": True}

    send_welcome.delay(42, lang="de")   # in the web app
    app.run()                           # in the worker program

See docs/python.md.
"""

from __future__ import annotations


from .app import App, TaskFunction
from .errors import APIError, ConnectionFailed, Error, Fail, Retry, TaskFailed, Timeout
from .worker import Job, current_job, progress, serve

# typing is for the type checker only (a worker process does not load it); type checkers
# read `TYPE_CHECKING` by its name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .client import DEFAULT_SERVER, DEFAULT_SOCKET, Client, Task

#: Names of the client module, imported on first use: a worker that only serves tasks does
#: not load the HTTP client (see docs/python.md, "Memory").
_CLIENT_NAMES = ("Client", "Task", "DEFAULT_SERVER", "DEFAULT_SOCKET")


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError("module 'taskd' has no attribute %r" % name)


__version__ = "0.1.0"

__all__ = [
    "App",
    "TaskFunction",
    "Client",
    "Task",
    "DEFAULT_SERVER",
    "DEFAULT_SOCKET",
    "Error",
    "APIError",
    "ConnectionFailed",
    "TaskFailed",
    "Timeout",
    "Retry",
    "Fail",
    "Job",
    "current_job",
    "progress",
    "serve",
]
