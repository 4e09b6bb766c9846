"""The worker module of the tests: the `py` queue's functions, served by `app.run()`."""

import os
import sys

import taskd

app = taskd.App(queue="py")


@app.task
def add(a, b):
    return a + b


@app.task
def send_welcome(user_id, lang="en"):
    job = taskd.current_job()
    print("welcome %s in %s" % (user_id, lang))
    return {"user": user_id, "lang": lang, "attempt": job.attempt if job else None, "pid": os.getpid()}


@app.task
def flaky(fail_times):
    job = taskd.current_job()
    if job is not None and job.attempt <= fail_times:
        raise taskd.Retry("not yet (attempt %d)" % job.attempt)
    return job.attempt if job else 0


@app.task
def boom():
    print("about to fail", file=sys.stderr)
    raise ValueError("boom")


@app.task
def wrong_inside(x):
    # A TypeError from the function's body, not from its arguments: a failed attempt, retried.
    return x + "1"


@app.task(name="renamed")
def named_differently():
    return "renamed"


if __name__ == "__main__":
    app.run()
