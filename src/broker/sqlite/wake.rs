//! Wake-ups: a producer that changed something sends a datagram (`work`, `cancel`, `pause`,
//! `sched`, `schedules`) to a Unix socket next to the database, `<db>.wake`, where the daemon listens.
//! Losing one only delays a task until the daemon's next periodic check, so sending is best
//! effort and never fails an operation.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use super::SqliteBroker;
use crate::broker::{BrokerError, Result, Wakeups};

/// The wake-up socket of the database at `db`.
pub(super) fn socket_path(db: &Path) -> PathBuf {
    let mut wake = db.as_os_str().to_owned();
    wake.push(".wake");
    PathBuf::from(wake)
}

impl SqliteBroker {
    /// Tell a daemon listening on this database that something changed. Best effort.
    pub(super) fn wake(&self, what: &[u8]) {
        let mut guard = match self.wake_tx.lock() {
            Ok(g) => g,
            Err(_) => return,
        };
        if guard.is_none() {
            *guard = UnixDatagram::unbound().ok();
            if let Some(s) = guard.as_ref() {
                let _ = s.set_nonblocking(true);
            }
        }
        if let Some(s) = guard.as_ref() {
            let _ = s.send_to(what, &self.wake_path);
        }
    }
}

/// Bind the wake-up socket of the database and raise `Wakeups` for what arrives on it.
pub(super) fn listen(wake_path: &Path) -> Result<Wakeups> {
    let _ = std::fs::remove_file(wake_path);
    let sock = tokio::net::UnixDatagram::bind(wake_path).map_err(|e| {
        BrokerError::Unavailable(format!(
            "failed to bind the wake-up socket {}: {e}",
            wake_path.display()
        ))
    })?;
    // Producers must be able to send to it: the daemon's own user, or the group that shares
    // the state directory (`state_group`), as for the store's files.
    if let Some(dir) = wake_path.parent() {
        use std::os::unix::fs::PermissionsExt;
        let mode = super::conn::store_file_mode(dir);
        if let Err(e) = std::fs::set_permissions(wake_path, std::fs::Permissions::from_mode(mode)) {
            tracing::warn!(path = %wake_path.display(), error = %e, "failed to set the wake-up socket's mode");
        }
    }
    let wakeups = Wakeups::default();
    let w = wakeups.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        loop {
            let mut n = match sock.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "wake-up socket failed; falling back to periodic checks");
                    return;
                }
            };
            // A burst of producers sends a burst of datagrams: take all that are waiting
            // and raise each kind of wake-up once.
            let (mut work, mut cancel, mut pause, mut sched) = (false, false, false, false);
            let mut schedules = false;
            let mut first = true;
            loop {
                if !first {
                    match sock.try_recv(&mut buf) {
                        Ok(m) => n = m,
                        Err(_) => break,
                    }
                }
                first = false;
                match &buf[..n.min(buf.len())] {
                    b"cancel" => cancel = true,
                    b"pause" => pause = true,
                    b"sched" => sched = true,
                    b"schedules" => schedules = true,
                    _ => work = true,
                }
            }
            if work {
                w.work.notify_one();
            }
            if cancel {
                w.cancel.notify_one();
            }
            if pause {
                w.pause.notify_one();
            }
            if sched {
                w.sched.notify_one();
            }
            if schedules {
                w.schedules.notify_one();
            }
        }
    });
    Ok(wakeups)
}
