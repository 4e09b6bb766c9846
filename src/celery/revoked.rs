//! Revokes of Celery ids this node has not ingested (yet): Celery's `revoke(id)` reaches
//! every consumer at once, while the task's message may still wait in the Celery broker (a
//! countdown, a queue not drained, taskd stopped when it was sent and the revoke kept in its
//! pidbox queue). Like a Celery worker's revoked set, the ids are kept for a while and the
//! message is revoked when it arrives, instead of run.
//!
//! Unlike Celery's in-memory set (kept only with `--statedb`), this one is a file in the
//! node's `state_dir`, written (to a temporary file, synced, renamed) before the revoke is
//! acknowledged, so a restart keeps it. Each node keeps its own, as each Celery worker
//! does: every node receives every revoke. It is bounded: an id is kept for
//! `result_expires` (a message arriving later than that is past the time anyone reads its
//! result), and at most [`MAX_IDS`] of them, the oldest dropped first (Celery's own bound).
//!
//! It does not touch taskd's store or the Celery broker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::model::{now_ms, UnixMs};

/// At most this many ids are kept (Celery's `REVOKES_MAX`).
pub const MAX_IDS: usize = 50_000;

/// The file's name in `state_dir`.
pub const FILE: &str = "celery-revoked.json";

/// The kept ids, each with the time it is dropped.
pub struct RevokedSet {
    path: PathBuf,
    keep: Duration,
    ids: Mutex<HashMap<String, UnixMs>>,
}

impl RevokedSet {
    /// The set kept in `path` (empty when the file does not exist or cannot be read, which
    /// is logged), each id kept for `keep`.
    pub fn open(path: PathBuf, keep: Duration) -> RevokedSet {
        let mut ids: HashMap<String, UnixMs> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "Celery bridge: the kept revokes cannot be read; starting without them");
                HashMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "Celery bridge: the kept revokes cannot be read; starting without them");
                HashMap::new()
            }
        };
        let now = now_ms();
        ids.retain(|_, until| *until > now);
        RevokedSet {
            path,
            keep,
            ids: Mutex::new(ids),
        }
    }

    /// Keep `ids` (revoked, not found in taskd's store) and write the set; `Err` when the
    /// file cannot be written (the ids are kept in memory all the same).
    pub fn add(&self, ids: &[String]) -> std::io::Result<()> {
        self.add_at(ids, now_ms())
    }

    fn add_at(&self, ids: &[String], now: UnixMs) -> std::io::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let until = now.saturating_add(i64::try_from(self.keep.as_millis()).unwrap_or(i64::MAX));
        let text = {
            let mut set = self.ids.lock().unwrap_or_else(|e| e.into_inner());
            set.retain(|_, u| *u > now);
            for id in ids {
                set.insert(id.clone(), until);
            }
            if set.len() > MAX_IDS {
                let mut by_age: Vec<(UnixMs, String)> =
                    set.iter().map(|(k, v)| (*v, k.clone())).collect();
                by_age.sort();
                for (_, k) in by_age.iter().take(set.len() - MAX_IDS) {
                    set.remove(k);
                }
            }
            serde_json::to_vec(&*set).expect("a map of strings to integers serializes")
        };
        write_atomically(&self.path, &text)
    }

    /// Is `id` revoked (and not yet dropped)?
    pub fn contains(&self, id: &str) -> bool {
        let set = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        set.get(id).is_some_and(|until| *until > now_ms())
    }

    pub fn len(&self) -> usize {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Write `bytes` to `path` so that a crash leaves the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_ids_are_kept_across_a_reopen_and_dropped_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let set = RevokedSet::open(path.clone(), Duration::from_secs(3600));
        assert!(!set.contains("a"));
        set.add(&["a".into(), "b".into()]).unwrap();
        assert!(set.contains("a") && set.contains("b"));
        let again = RevokedSet::open(path.clone(), Duration::from_secs(3600));
        assert!(again.contains("a"), "kept in the file");
        // Kept for no time at all: gone when read back.
        let brief = RevokedSet::open(path.clone(), Duration::ZERO);
        brief.add(&["c".into()]).unwrap();
        assert!(!brief.contains("c"));
        let third = RevokedSet::open(path, Duration::from_secs(3600));
        assert!(!third.contains("c"));
    }

    #[test]
    fn the_set_is_bounded_dropping_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let set = RevokedSet::open(dir.path().join(FILE), Duration::from_secs(3600));
        let first: Vec<String> = (0..MAX_IDS).map(|i| format!("old-{i}")).collect();
        let now = now_ms();
        set.add_at(&first, now).unwrap();
        set.add_at(&["new".into()], now + 1).unwrap();
        assert_eq!(set.len(), MAX_IDS);
        assert!(set.contains("new"));
    }
}
