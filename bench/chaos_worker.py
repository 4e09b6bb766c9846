"""The chaos suite's long-lived worker (bench/chaos.py): speaks the worker protocol on fd 3
and fd 4 itself, so that it knows each task's attempt number. Before it works on a task it
appends "<task id> <attempt> <pid>" to the run's ledger ($LEDGER), which the invariant
checker compares with the attempt records taskd keeps. The payload says what to do:
`secs` to sleep, then `ok` from attempt `ok_from` on, before it `fail` (retry, error or
crash: exit without answering)."""
import json
import os
import time

LEDGER = os.environ["LEDGER"]


def note(task_id, attempt):
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{task_id} {attempt} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def main():
    tasks = os.fdopen(3, "r")
    results = os.fdopen(4, "w")
    results.write('{"type":"ready","protocol":1}\n')
    results.flush()
    for line in tasks:
        msg = json.loads(line)
        if msg.get("type") != "task":
            continue
        task_id, attempt, payload = msg["id"], int(msg["attempt"]), msg["payload"]
        note(task_id, attempt)
        time.sleep(float(payload["secs"]))
        if attempt >= int(payload["ok_from"]):
            answer = {"type": "result", "id": task_id, "status": "ok"}
        elif payload["fail"] == "crash":
            os._exit(3)
        else:
            status = payload["fail"]
            answer = {"type": "result", "id": task_id, "status": status,
                      "message": f"planned {status} on attempt {attempt}"}
        results.write(json.dumps(answer) + "\n")
        results.flush()


if __name__ == "__main__":
    main()
