"""The worker module of the raw-payload tests: the `pyraw` queue, served by `taskd.serve`,
which hands a raw payload to the handler as bytes."""

import taskd


def handle(payload, job):
    if isinstance(payload, bytes):
        return {"hex": payload.hex(), "raw": job.raw}
    return {"json": payload, "raw": job.raw}


if __name__ == "__main__":
    taskd.serve(handle)
