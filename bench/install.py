"""Find the peers bench/bench.py compares taskd with, installing the missing ones from the
package registries: task-spooler and GNU parallel from Debian (apt-get), pueue from crates.io
(cargo install, into ~/.cargo/bin), Celery and the redis client from PyPI (pip, into the venv
target/bench/venv), redis-server from Debian. Each peer ends up as a path, or as the reason
it could not be had; a peer that cannot be installed is reported as such in the table."""
import os, shutil, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "target", "bench", "venv")
CARGO_BIN = os.path.expanduser("~/.cargo/bin")


def _out(args, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)  # moreutils' `ts` would read stdin
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=30, **kw)
        return p.stdout + p.stderr
    except (OSError, subprocess.SubprocessError):
        return ""


def _last_line(text):
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return (lines[-1] if lines else "no output")[:160].replace("|", "/")


def find_tsp():
    """task-spooler is `tsp` on Debian (its `ts` clashes with moreutils' timestamp tool)
    and `ts` elsewhere: accept either, once it says it is Task Spooler."""
    for name in ("tsp", "ts"):
        path = shutil.which(name)
        if path and "task spooler" in _out([path, "-h"]).lower():
            return path
    return None


def find_gnu_parallel():
    """moreutils ships a different `parallel`: only GNU parallel will do."""
    path = shutil.which("parallel")
    if path and "GNU parallel" in _out([path, "--version"], stdin=subprocess.DEVNULL):
        return path
    return None


def find_pueue():
    for d in (CARGO_BIN, *os.environ.get("PATH", "").split(os.pathsep)):
        a, b = os.path.join(d, "pueue"), os.path.join(d, "pueued")
        if os.access(a, os.X_OK) and os.access(b, os.X_OK):
            return a, b
    return None


def venv_python():
    return os.path.join(VENV, "bin", "python")


def celery_ok():
    py = venv_python()
    return os.access(py, os.X_OK) and subprocess.run(
        [py, "-c", "import celery, redis, kombu.transport.redis"], capture_output=True).returncode == 0


def _apt(packages, log):
    """apt-get install -y the given Debian packages (apt-get update once first)."""
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    if os.geteuid() != 0 and not shutil.which("sudo"):
        return "apt-get needs root"
    pre = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing {' '.join(packages)} with apt-get ...", flush=True)
    subprocess.run(pre + ["apt-get", "update", "-qq"], stdout=log, stderr=log, env=env)
    p = subprocess.run(pre + ["apt-get", "install", "-y", "-qq", *packages], stdout=log,
                       stderr=subprocess.PIPE, text=True, env=env)
    if p.returncode != 0:
        log.write(p.stderr)
        return "apt-get install failed: " + _last_line(p.stderr)
    return None


def install(log_path):
    """Returns {peer: path or tuple of paths, or "not installed: why"}."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "a")
    found = {}
    want_apt = []
    if not find_tsp():
        want_apt.append("task-spooler")
    if not find_gnu_parallel():
        want_apt.append("parallel")
    if not shutil.which("redis-server"):
        want_apt.append("redis-server")
    if not shutil.which("flock"):
        want_apt.append("util-linux")
    why = _apt(want_apt, log) if want_apt else None
    for peer, finder, pkg in (("tsp", find_tsp, "task-spooler"),
                              ("parallel", find_gnu_parallel, "parallel")):
        path = finder()
        if path:
            found[peer] = path
        elif peer == "parallel" and shutil.which("parallel"):
            found[peer] = "not installed: `parallel` here is not GNU parallel (moreutils?)"
        else:
            found[peer] = f"not installed: {why or 'apt-get install ' + pkg + ' gave no binary'}"

    if not find_pueue():
        if shutil.which("cargo"):
            print("installing pueue with cargo install (one time, a few minutes) ...", flush=True)
            p = subprocess.run(["nice", "-n", "10", "cargo", "install", "pueue", "--locked"],
                               stdout=log, stderr=subprocess.PIPE, text=True)
            log.write(p.stderr)
            if p.returncode != 0:
                found["pueue"] = "not installed: cargo install pueue failed: " + _last_line(p.stderr)
        else:
            found["pueue"] = "not installed: no cargo"
    if "pueue" not in found:
        found["pueue"] = find_pueue() or "not installed: cargo install gave no pueue/pueued"

    redis = shutil.which("redis-server")
    if not redis:
        found["celery"] = f"not installed: no redis-server ({why or 'apt-get gave none'})"
    elif not celery_ok():
        print("installing celery and redis into target/bench/venv with pip ...", flush=True)
        p = subprocess.run([sys.executable, "-m", "venv", VENV], stdout=log,
                           stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            found["celery"] = "not installed: python3 -m venv failed: " + _last_line(p.stderr)
        else:
            p = subprocess.run([venv_python(), "-m", "pip", "install", "-q", "celery[redis]", "redis", "packaging"],
                               stdout=log, stderr=subprocess.PIPE, text=True)
            log.write(p.stderr)
            if p.returncode != 0 or not celery_ok():
                found["celery"] = "not installed: pip install celery[redis] redis packaging failed: " + _last_line(p.stderr)
    if "celery" not in found:
        found["celery"] = redis
    log.close()
    return found
