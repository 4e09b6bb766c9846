"""W7, RQ: the function (RQ enqueues a module-level function by its import path)."""


def echo(x):
    return x
