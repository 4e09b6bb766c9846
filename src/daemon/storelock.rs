//! The store lock: one daemon per store, wherever its state directory is, and a way for the
//! CLI to find that daemon when its state directory is gone.
//!
//! A daemon binds an abstract Unix socket (Linux) named after its store: the canonical path
//! of the SQLite file, or, on a shared broker where many nodes serve one store, the
//! canonical path of its state directory. The name lives in the kernel, not in the file
//! system: deleting the state directory cannot remove it, the kernel frees it when the
//! daemon dies (no stale lock after a crash or kill -9), and a second daemon on the same
//! SQLite file is refused by name whatever its `state_dir`. Whoever connects gets one JSON
//! line, [`Holder`]: the pid, the store, and why the daemon claims nothing, if it does not.
//!
//! It must not be the only guard of a state directory (`taskd.pid` stays, for
//! `workers.json` and the control socket), and it does not protect a store opened from
//! another network namespace (abstract names are per namespace; taskd's unit has none).

use std::io::{BufRead, BufReader};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{BrokerUrl, Config};
use crate::exit::{self, Failure};

/// What the daemon holding a store says about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// The lock's key (see [`store_key`]).
    pub store: String,
    /// Why it claims no tasks now (its store vanished, the broker refuses writes).
    #[serde(default)]
    pub halted: Option<String>,
    /// How it contains its tasks (a cgroup per task, or process groups only, and why).
    #[serde(default)]
    pub containment: Option<String>,
}

/// The held lock. Dropping it frees the name.
pub struct StoreLock {
    listener: UnixListener,
    pub key: String,
}

/// How long a starting daemon waits for a holder that is going away.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// What the lock is keyed by: `sqlite:<canonical file>` for the embedded store, or
/// `state_dir:<canonical directory>` for a shared broker (whose nodes each have their own).
pub fn store_key(config: &Config) -> String {
    match &config.broker {
        BrokerUrl::Sqlite { path } => format!("sqlite:{}", canonical(path).display()),
        _ => format!("state_dir:{}", canonical(&config.state_dir).display()),
    }
}

/// `path` with symlinks resolved as far as it exists: the store may not exist yet (a first
/// start) or any more (its directory was deleted), and must get the same key either way.
fn canonical(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(mut found) = existing.canonicalize() {
            found.extend(rest.iter().rev());
            return found;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        }
    }
}

/// The socket's name: a hash of the key (a path can be longer than a socket name may be).
/// FNV-1a, written out so that every taskd version computes the same name.
fn socket_name(key: &str) -> String {
    format!("taskd-store-{:016x}", fnv1a(key))
}

/// FNV-1a of `key`, written out so that every taskd version computes the same value (the
/// store lock's name, the name of the daemon's cgroup subtree).
pub(crate) fn fnv1a(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The name of the daemon's cgroup subtree (`taskd-<this>`): one per state directory, so that
/// the next daemon of the same state directory finds the cgroups a crashed one left.
pub(crate) fn cgroup_key(config: &Config) -> String {
    format!(
        "{:016x}",
        fnv1a(&canonical(&config.state_dir).display().to_string())
    )
}

fn address(key: &str) -> std::io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(socket_name(key).as_bytes())
}

/// The daemon serving the store of `config`, if one is alive.
pub fn holder(config: &Config) -> Option<Holder> {
    ask(&store_key(config))
}

fn ask(key: &str) -> Option<Holder> {
    let stream = UnixStream::connect_addr(&address(key).ok()?).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let holder: Holder = serde_json::from_str(&line).ok()?;
    // Two keys with one hash: not the same store.
    (holder.store == key).then_some(holder)
}

impl StoreLock {
    /// Take the lock of `config`'s store, or say which daemon holds it.
    pub fn acquire(config: &Config) -> Result<StoreLock, Failure> {
        let key = store_key(config);
        let addr = address(&key).map_err(|e| {
            Failure::new(exit::FAILURE, format!("failed to name the store lock: {e}"))
        })?;
        let give_up = Instant::now() + LOCK_WAIT;
        loop {
            match UnixListener::bind_addr(&addr) {
                Ok(listener) => return Ok(StoreLock { listener, key }),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    if let Some(h) = ask(&key) {
                        return Err(Failure::new(
                            exit::FAILURE,
                            format!(
                                "another taskd daemon (pid {}) is serving the store {} (whatever its state_dir); stop it first, or give this daemon a store of its own (`broker` or `state_dir`)",
                                h.pid,
                                key.split_once(':').map_or(key.as_str(), |(_, p)| p)
                            ),
                        ));
                    }
                    // A holder going away, or one that does not answer: wait a little.
                    if Instant::now() >= give_up {
                        return Err(Failure::new(
                            exit::FAILURE,
                            format!("another process holds the store lock of {key} and does not answer; stop the other taskd daemon first"),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(Failure::new(
                        exit::FAILURE,
                        format!("failed to take the store lock of {key}: {e}"),
                    ))
                }
            }
        }
    }

    /// Answer everyone who asks, with what `status` says at that moment, until dropped.
    pub async fn serve(self, status: impl Fn() -> Option<String>, containment: Option<String>) {
        let key = self.key;
        let listener = match self
            .listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(self.listener))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "the store lock cannot answer `taskd status`");
                return std::future::pending().await;
            }
        };
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let holder = Holder {
                pid: std::process::id(),
                store: key.clone(),
                halted: status(),
                containment: containment.clone(),
            };
            let mut line = serde_json::to_vec(&holder).expect("a Holder always serializes");
            line.push(b'\n');
            // One small line: the socket buffer takes it at once; a client gone is no matter.
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &line).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_store_gets_the_key_it_will_have() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("state").join("taskd.db");
        let before = canonical(&db);
        std::fs::create_dir_all(db.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&db, b"").expect("create");
        assert_eq!(canonical(&db), before);
        std::fs::remove_dir_all(dir.path().join("state")).expect("rm -r");
        assert_eq!(canonical(&db), before);
    }

    #[test]
    fn names_are_stable_and_short() {
        assert_eq!(socket_name("sqlite:/a"), socket_name("sqlite:/a"));
        assert_ne!(socket_name("sqlite:/a"), socket_name("sqlite:/b"));
        assert!(socket_name(&"x".repeat(4096)).len() < 100);
    }
}
