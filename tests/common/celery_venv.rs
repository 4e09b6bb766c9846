//! The real Celery client from PyPI, pinned, in a virtualenv the tests create once under
//! the build's temp dir (`target/tmp/celery-venv-<celery version>`) and share: test binaries
//! and threads that need it at the same time wait on a lock file while one of them builds it.
//!
//! Where python3's venv module, pip or PyPI is missing, [`python`] skips the test visibly
//! and returns `None`, except under `CI=true`, where it fails the test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// What pip installs: Celery with both of its broker clients (py-amqp for RabbitMQ, redis-py)
/// at the versions the bridge is tested against. `packaging` is imported by kombu without
/// being declared.
pub const PINS: &[&str] = &[
    "celery==5.7.0",
    "kombu==5.7.0",
    "amqp==5.4.2",
    "billiard==4.3.2",
    "vine==5.1.0",
    "redis==8.2.0",
    "packaging==26.4",
];

pub fn venv_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("celery-venv-5.7.0")
}

/// The venv's python, built on first use; `None` (after a visible skip) when it cannot be.
pub fn python(test: &str) -> Option<PathBuf> {
    let dir = venv_dir();
    let py = dir.join("bin").join("python");
    let marker = dir.join("installed.txt");
    let want = PINS.join("\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Some(py);
    }
    std::fs::create_dir_all(dir.parent().expect("venv parent")).expect("target tmp dir");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.with_extension("lock"))
        .expect("venv lock file");
    // SAFETY: flock(2) on a descriptor this function owns; the lock ends when `lock` is
    // dropped (closed).
    unsafe {
        use std::os::fd::AsRawFd;
        libc::flock(lock.as_raw_fd(), libc::LOCK_EX);
    }
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Some(py);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            crate::common::skip::skip_named(
                test,
                &format!(
                    "python3 -m venv failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                "apt-get install -y python3-venv",
            );
            return None;
        }
        Err(e) => {
            crate::common::skip::skip_named(
                test,
                &format!("python3 cannot run: {e}"),
                "apt-get install -y python3 python3-venv",
            );
            return None;
        }
    }
    let out = Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PINS)
        .output()
        .expect("run pip");
    if !out.status.success() {
        crate::common::skip::skip_named(
            test,
            &format!(
                "pip could not install Celery from PyPI: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
            "network access to pypi.org",
        );
        return None;
    }
    std::fs::write(&marker, &want).expect("venv marker");
    Some(py)
}

/// Run `python -c CODE` in the venv with these environment variables; (status ok, stdout,
/// stderr).
pub fn run(py: &Path, code: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(py);
    cmd.arg("-c").arg(code);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the venv's python");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
