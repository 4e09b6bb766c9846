//! The real Celery client, from PyPI, in a venv the tests make once and keep under
//! `target/celery-venv-<version>` (so that later runs start at once): `python3 -m venv`,
//! then `pip install celery[redis]==VERSION`. Where python3 or PyPI is missing the test is
//! skipped visibly (`common::skip`), and fails under `CI=true`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The Celery release the tests speak to.
pub const CELERY_VERSION: &str = "5.5.3";

fn venv_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!("celery-venv-{CELERY_VERSION}"))
}

/// The venv's python, with Celery importable; `None` (the test skipped) when it cannot be had.
pub fn python(test: &str) -> Option<PathBuf> {
    let dir = venv_dir();
    let py = dir.join("bin").join("python");
    let ready = dir.join(".ready");
    if ready.exists() {
        return Some(py);
    }
    // One test binary at a time builds it: an exclusive lock next to it.
    std::fs::create_dir_all(dir.parent().expect("target")).expect("target dir");
    let lock = std::fs::File::create(dir.with_extension("lock")).expect("lock file");
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map(|held| {
            let made = ready.exists() || make(&dir, &py);
            if made {
                let _ = std::fs::write(&ready, CELERY_VERSION);
            }
            drop(held);
            made
        })
        .unwrap_or(false)
        .then_some(py)
        .or_else(|| {
            crate::common::skip::skip_named(
                test,
                &format!("could not make a venv with celery {CELERY_VERSION} from PyPI"),
                "install python3 with its venv module (apt-get install -y python3-venv) and let pip reach PyPI",
            );
            None
        })
}

fn make(dir: &Path, py: &Path) -> bool {
    let quiet = |c: &mut Command| {
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !py.exists() && !quiet(Command::new("python3").args(["-m", "venv"]).arg(dir)) {
        return false;
    }
    quiet(
        Command::new(py)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .arg(format!("celery[redis]=={CELERY_VERSION}")),
    ) && quiet(Command::new(py).args(["-c", "import celery, redis, kombu.transport.redis"]))
}
