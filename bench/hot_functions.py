"""Writes build/hot-functions.txt: the functions a serving daemon runs, for the linker to
lay out together in release builds (build.rs; docs/performance.md, "The daemon's code in
memory").

The kernel maps a program's code 64 KiB at a time around each page it first runs
(fault-around), so a daemon that runs a few hundred KiB of functions scattered across 16 MB
of `.text` keeps most of it mapped. Laid out together, the functions it runs fill a few
MiB instead.

    python3 bench/hot_functions.py [--taskd target/release/taskd] [--n 3000]

Runs the daemon under valgrind's cachegrind (instruction counts only) through what a
serving daemon does: start-up, tasks enqueued over the API (Unix socket and TCP, one by
one and in a batch), run by exec queues and by Python workers (spawned and forked), the
queues and tasks read back, a stop. Every function that ran is written, mangled, hottest
first, under a first line naming the compiler (`rustc -vV`): the names carry hashes of the
compiler and the dependencies' versions, so build.rs uses the list only with that compiler.
Run it again after a compiler or dependency update and before building a release: names of
functions the compiler made local carry a `.llvm.<hash>` suffix that changes with their
module, so a list written before later changes misses some (a stale name is ignored,
never wrong; it only costs memory).
Needs valgrind and python3.
"""
import argparse, collections, http.client, json, os, shutil, signal, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "contrib", "python"))
sys.path.insert(0, os.path.join(HERE, "w7"))
PYTHONPATH = os.pathsep.join([os.path.join(HERE, "w7"), os.path.join(ROOT, "contrib", "python")])
sys.path.insert(0, HERE)
from peers import free_port  # noqa: E402


def wait(what, check, deadline):
    end = time.monotonic() + deadline
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def exercise(taskd_bin, n, tmp):
    import taskd, taskd_tasks
    sock = os.path.join(tmp, "api.sock")
    port = free_port()
    cfg = os.path.join(tmp, "taskd.toml")
    worker = [sys.executable, os.path.join(HERE, "w7", "taskd_tasks.py")]
    with open(cfg, "w") as f:
        f.write(f"""[taskd]
state_dir = "state"
listen = ["unix:{sock}", "127.0.0.1:{port}"]

[queues.w7]
worker = {json.dumps(worker)}
concurrency = 2
env = {{ PYTHONPATH = {json.dumps(PYTHONPATH)} }}

[queues.forked]
worker = {json.dumps(worker)}
concurrency = 2
worker_fork = true
env = {{ PYTHONPATH = {json.dumps(PYTHONPATH)} }}

[queues.exec]
command = ["/bin/sh", "-c", "echo $0", "{{{{n}}}}"]
concurrency = 2
""")
    out = os.path.join(tmp, "cachegrind.out.%p")
    log = open(os.path.join(tmp, "daemon.log"), "w")
    daemon = subprocess.Popen(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--demangle=no",
         f"--cachegrind-out-file={out}", taskd_bin, "-c", cfg, "start"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        client = taskd.Client("unix:" + sock)
        wait("the workers", lambda: sum(w["state"] == "running" for w in client.queues()["workers"]) == 4, 600)
        taskd_tasks.app._client = client
        for queue in ("w7", "forked"):
            # As bench/w7.py runs it: the queue paused while it fills, then resumed.
            client._transport.request("POST", f"/api/v1/queues/{queue}/pause")
            taskd_tasks.app.queue = queue
            ids = [taskd_tasks.echo.delay(i) for i in range(n)]
            client._transport.request("POST", f"/api/v1/queues/{queue}/resume")
            wait(f"the {queue} queue", lambda: ids[-1].state() == "succeeded", 900)
            for t in ids[-3:]:
                t.result(timeout=600)
        client.submit_many("exec", [{"n": i} for i in range(n // 3)])
        client.submit("exec", {"n": "one"}).result(timeout=600)
        # The same reads over TCP: the status, the queues, the metrics.
        for path in ("/api/v1/queues", "/api/v1/stats", "/metrics", "/api/v1/tasks?limit=20"):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            c.request("GET", path)
            c.getresponse().read()
            c.close()

        def finished():
            qs = client.queues()["queues"]
            return all(q["counts"].get("queued", 0) == 0 and q["counts"].get("running", 0) == 0 for q in qs)
        wait("the queues to drain", finished, 900)
        # The control socket: what `taskd status` and `taskd tasks` ask.
        for args in (["status"], ["tasks", "--queue", "exec"]):
            subprocess.run([taskd_bin, "-c", cfg] + args, cwd=tmp, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=300)
        client.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(300)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
    return os.path.join(tmp, f"cachegrind.out.{daemon.pid}")


def functions(path):
    """Instruction counts per function (mangled name) of the taskd binary's code."""
    ir = collections.Counter()
    ob = fn = None
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("ob="):
                ob = line[3:].strip()
            elif line.startswith("fl="):
                pass
            elif line.startswith("fn="):
                fn = line[3:].strip()
            elif line[:1].isdigit() and fn:
                parts = line.split()
                if len(parts) >= 2:
                    ir[fn] += int(parts[1])
    return ir


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--taskd", default=os.path.join(ROOT, "target", "release", "taskd"))
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "hot-functions.txt"))
    a = ap.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("needs valgrind (apt-get install valgrind)")
    rustc = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    tmp = tempfile.mkdtemp(prefix="taskd-hot-")
    try:
        out = exercise(os.path.abspath(a.taskd), a.n, tmp)
        ir = functions(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Only the names the binary defines: valgrind also reports the C library's.
    nm = subprocess.run(["nm", "--defined-only", a.taskd], capture_output=True, text=True, check=True).stdout
    own = {line.split()[-1] for line in nm.splitlines() if line.split()[-2:-1] and line.split()[-2] in "tTwW"}
    names = [name for name, _ in ir.most_common() if name in own]
    if len(names) < 1000:
        sys.exit(f"only {len(names)} functions ran: is {a.taskd} a release build with its symbols?")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(rustc + "\n")
        f.write("\n".join(names) + "\n")
    print(f"{a.out}: {len(names)} functions, for {rustc}")


if __name__ == "__main__":
    main()
