"""The Python helper's trivial worker for bench/workers.py: echoes each payload to stdout
(captured as the task's output), answers ok."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "contrib", "python"))
import taskd_worker  # noqa: E402


@taskd_worker.task
def echo(payload):
    print(payload)


taskd_worker.run()
