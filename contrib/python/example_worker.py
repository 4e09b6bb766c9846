"""An example taskd worker built on taskd_worker.py (next to it): greets whoever the
payload names. config/taskd.toml runs it as the `hello` queue:

    taskd submit hello '{"name": "you"}' --wait
    taskd result ID                   # {"greeting":"hello, you"}: what greet() returned

Whatever the worker imports or opens at start-up is paid once per worker, not per task.
"""
import taskd_worker


@taskd_worker.task
def greet(payload, job):
    name = payload.get("name") if isinstance(payload, dict) else None
    if not name:
        # A payload that can never work: fail the task now rather than retry it.
        raise taskd_worker.Fail('the payload needs a "name", such as {"name": "you"}')
    print("hello, %s (task %s, attempt %d)" % (name, job.id, job.attempt))
    # The return value is the task's result.
    return {"greeting": "hello, %s" % name}


if __name__ == "__main__":
    taskd_worker.run()
