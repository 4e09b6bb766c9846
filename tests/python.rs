//! The Python library (contrib/python, importable as `taskd`): its own test suite,
//! `python3 -m unittest` against the real daemon built with this package (over TCP with a
//! token and over the Unix socket: submit, batch, results, failures, timeouts, and the
//! `App`/`@app.task`/`.delay()` round trip through a real worker queue), and its
//! installation with pip.
//!
//! Without python3 3.9 or newer these tests are skipped, visibly; under `CI=true` they fail
//! (`common::skip`), and .ci/run installs python3.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::BIN;

fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/python")
}

/// python3 when it is 3.9 or newer; else the test is skipped (`None`).
fn python() -> Option<&'static str> {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        common::skip::skip(
            "needs python3 3.9 or newer",
            "apt-get install -y python3 python3-venv",
        );
        return None;
    }
    Some("python3")
}

fn shown(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_python_library_passes_its_tests_against_the_real_daemon() {
    let Some(py) = python() else { return };
    let out = Command::new(py)
        .args(["-W", "error::ResourceWarning", "-m", "unittest", "discover"])
        .args(["-s", ".", "-p", "test_*.py", "-v"])
        .current_dir(package_dir())
        .env("TASKD_BIN", BIN)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("TASKD_SERVER")
        .env_remove("TASKD_TOKEN")
        .env_remove("TASKD_CONFIG")
        .output()
        .expect("run python3 -m unittest");
    let text = shown(&out);
    assert!(out.status.success(), "the Python tests failed:\n{text}");
    // The suite ran for real: both transports, the worker round trip.
    let err = String::from_utf8_lossy(&out.stderr);
    for name in [
        "OverTCPWithToken.test_app_task_delay_round_trip_through_a_worker",
        "OverTheUnixSocket.test_submit_and_result",
        "OverTheUnixSocket.test_worker_failures_fail_the_task_not_the_worker",
    ] {
        assert!(
            err.lines().any(|l| l.contains(name) && l.ends_with("ok")),
            "{name} did not pass:\n{text}"
        );
    }
}

#[test]
fn pip_installs_the_package_with_its_type_marker_and_the_worker_helper() {
    let Some(py) = python() else { return };
    let has_pip = Command::new(py)
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_pip {
        common::skip::skip("needs pip for python3", "apt-get install -y python3-pip");
        return;
    }
    let target = tempfile::tempdir().unwrap();
    let build = tempfile::tempdir().unwrap();
    // Built from a copy: pip's build leaves files next to the sources.
    let copy = build.path().join("python");
    let status = Command::new("cp")
        .arg("-r")
        .arg(package_dir())
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new(py)
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
        .arg(target.path())
        .arg(&copy)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .output()
        .expect("run pip");
    assert!(out.status.success(), "pip install failed:\n{}", shown(&out));
    for f in ["taskd/__init__.py", "taskd/py.typed", "taskd_worker.py"] {
        assert!(target.path().join(f).exists(), "{f} is not installed");
    }
    let out = Command::new(py)
        .args([
            "-c",
            "import taskd, taskd_worker; print(taskd.__file__); print(taskd.Client, taskd.App, taskd.TaskFailed, taskd.Timeout, taskd.Retry)",
        ])
        .current_dir(target.path())
        .env("PYTHONPATH", target.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&target.path().display().to_string()));
}
