//! The start log: a node-local, append-only file of the ids of tasks whose process this
//! daemon is about to start.
//!
//! Why: a task's start is recorded in the broker after its process exists, without holding
//! the run up. If the daemon dies between the two, the broker still sees the task as held
//! but not started, and recovery would run it again with no trace. One `write(2)` to this
//! file before the spawn closes that gap: it survives a crash of the daemon (the page cache
//! outlives the process; no fsync is needed, since after a power cut the task's process is
//! gone as well), and at the next start-up the ids in it that the broker still holds are
//! marked as started, so their history says `lost`.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::model::TaskId;

/// Past this size the log is rewritten with only the ids still running.
const MAX_BYTES: u64 = 4 * 1024 * 1024;

pub struct StartLog {
    path: PathBuf,
    /// The file, its length as written, and whether the last write failed (it may have
    /// left part of a line, which the next note ends first).
    file: Mutex<(File, u64, bool)>,
}

impl StartLog {
    /// The ids a previous daemon noted, then a fresh, empty log.
    pub fn open(state_dir: &Path) -> std::io::Result<(StartLog, HashSet<TaskId>)> {
        let path = state_dir.join("started.log");
        let mut previous = HashSet::new();
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                if let Ok(id) = line.trim().parse() {
                    previous.insert(id);
                }
            }
        }
        // The daemon's alone, whatever the umask: the state directory may be open to
        // other users' tasks (the search bit only, for their result files).
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        Ok((
            StartLog {
                path,
                file: Mutex::new((file, 0, false)),
            },
            previous,
        ))
    }

    /// The state directory the log lives in.
    pub fn dir(&self) -> Option<&Path> {
        self.path.parent()
    }

    /// Note that `id` is about to start. `running` lists the ids still running, for when the
    /// log is rewritten. A failure to write (a full disk) is returned: the caller must not
    /// start the task then, since a crash before its start reaches the broker would leave
    /// its run without a trace.
    pub fn note(&self, id: TaskId, running: impl FnOnce() -> Vec<TaskId>) -> std::io::Result<()> {
        let mut guard = match self.file.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if guard.1 > MAX_BYTES {
            match OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&self.path)
            {
                Ok(f) => {
                    *guard = (f, 0, false);
                    let ids = running();
                    let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
                    if guard.0.write_all(text.as_bytes()).is_ok() {
                        guard.1 = text.len() as u64;
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "failed to rewrite the start log")
                }
            }
        }
        // After a failed write, a newline first ends whatever part of a line it left.
        let line = if guard.2 {
            format!("\n{id}\n")
        } else {
            format!("{id}\n")
        };
        match guard.0.write_all(line.as_bytes()) {
            Ok(()) => {
                guard.1 += line.len() as u64;
                guard.2 = false;
                Ok(())
            }
            Err(e) => {
                guard.2 = true;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_into_the_next_open_and_the_log_starts_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, before) = StartLog::open(dir.path()).expect("open");
        assert!(before.is_empty());
        let a = TaskId::new();
        let b = TaskId::new();
        log.note(a, Vec::new).expect("noted");
        log.note(b, Vec::new).expect("noted");
        drop(log);
        let (_log, seen) = StartLog::open(dir.path()).expect("reopen");
        assert_eq!(seen, HashSet::from([a, b]));
        let (_log, again) = StartLog::open(dir.path()).expect("reopen twice");
        assert!(again.is_empty(), "the log is emptied at each open");
    }

    /// A full disk (here /dev/full, where every write fails with ENOSPC) is reported, not
    /// swallowed: the supervisor then holds the task back instead of starting it untraced.
    #[test]
    fn a_write_that_fails_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = StartLog::open(dir.path()).expect("open");
        log.file.lock().expect("not poisoned").0 = OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full opens");
        let e = log
            .note(TaskId::new(), Vec::new)
            .expect_err("/dev/full takes nothing");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    }

    #[test]
    fn a_line_a_failed_write_cut_short_does_not_swallow_the_next_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = StartLog::open(dir.path()).expect("open");
        let next = TaskId::new();
        {
            let mut guard = log.file.lock().expect("not poisoned");
            // What a write cut short by ENOSPC leaves: part of an id, no newline.
            guard.0.write_all(b"01a248ea-5e77").expect("write");
            guard.2 = true;
        }
        log.note(next, Vec::new).expect("noted");
        drop(log);
        let (_log, seen) = StartLog::open(dir.path()).expect("reopen");
        assert_eq!(seen, HashSet::from([next]));
    }

    #[test]
    fn a_full_log_is_rewritten_with_the_running_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = StartLog::open(dir.path()).expect("open");
        let keep = TaskId::new();
        // Just past the limit: the next note rewrites the log.
        for _ in 0..(MAX_BYTES / 37 + 1) {
            log.note(TaskId::new(), Vec::new).expect("noted");
        }
        let last = TaskId::new();
        log.note(last, || vec![keep]).expect("noted");
        drop(log);
        let (_log, seen) = StartLog::open(dir.path()).expect("reopen");
        assert_eq!(seen, HashSet::from([keep, last]));
    }
}
