//! The process around a daemon, set up by `taskd start` before [`super::run`]: the log file
//! and stderr writers, the state directory (its mode, its lock), the descriptors and limits
//! of the process, and the reaping of the orphans a child subreaper inherits. A program that
//! embeds the daemon (a test) does without all of it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use crate::config::Config;
use crate::exit::{self, Failure};

/// A log file that SIGUSR1 reopens, so that logrotate can move it away.
#[derive(Clone)]
pub struct LogFile {
    path: PathBuf,
    file: Arc<std::sync::Mutex<File>>,
}

impl LogFile {
    fn open_file(path: &Path) -> std::io::Result<File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    pub fn open(path: &Path) -> std::io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Arc::new(std::sync::Mutex::new(Self::open_file(path)?)),
        })
    }

    /// The file's path, as opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn reopen(&self) -> std::io::Result<()> {
        let fresh = Self::open_file(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }
}

/// One log line's writer: takes the lock per write, so a reopen never splits a line.
pub struct LogFileWriter(Arc<std::sync::Mutex<File>>);

impl Write for LogFileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Ok(write_or_drop(&mut *file, buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Write one whole log line, or drop and count it: logging never fails, so it can neither
/// panic nor stop the work that logs. `buf.len()` either way.
fn write_or_drop(to: &mut impl Write, buf: &[u8]) -> usize {
    if to.write_all(buf).is_err() {
        crate::metrics::log_line_dropped();
    }
    buf.len()
}

/// The daemon's stderr as a log writer. Once the reader of a pipe is gone (`taskd start 2>&1
/// | logger`, and logger died) every write fails with EPIPE: the line is dropped and counted
/// (`taskd_log_lines_dropped_total`), and the daemon carries on.
pub struct LogStderr;

impl Write for LogStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(write_or_drop(&mut std::io::stderr().lock(), buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = LogFileWriter;
    fn make_writer(&'a self) -> LogFileWriter {
        LogFileWriter(self.file.clone())
    }
}

/// Creates `state_dir` (0700) when missing, then gives it the mode the config asks for,
/// whatever the umask: 0700, only the daemon's user; with `state_group`, that group and 2770
/// (set-group-id, so that what the daemon or a producer of the group creates in it belongs
/// to the group), and the group on what is already in it. The store's files follow the
/// directory's mode when the broker opens them (0600, or 0660 in a group's directory).
pub fn secure_state_dir(state_dir: &Path, group: Option<&str>) -> Result<(), Failure> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail = |what: String, e: &dyn std::fmt::Display| {
        Failure::new(
            exit::FAILURE,
            format!(
                "failed to {what} the state directory {}: {e}",
                state_dir.display()
            ),
        )
    };
    if !state_dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| fail("create".into(), &e))?;
    }
    let mode = match group {
        None => 0o700,
        Some(name) => {
            let gid = nix::unistd::Group::from_name(name)
                .map_err(|e| fail(format!("look up group {name} for"), &e))?
                .ok_or_else(|| {
                    fail(
                        format!("find group {name} (`state_group`) for"),
                        &"no such group",
                    )
                })?
                .gid;
            let chgrp = |p: &Path| nix::unistd::chown(p, None, Some(gid));
            chgrp(state_dir).map_err(|e| fail(format!("give group {name}"), &e))?;
            for entry in std::fs::read_dir(state_dir).map_err(|e| fail("read".into(), &e))? {
                let path = entry.map_err(|e| fail("read".into(), &e))?.path();
                if let Err(e) = chgrp(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "failed to give a state file to `state_group`");
                }
            }
            0o2770
        }
    };
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("set mode {mode:04o} on"), &e))
}

/// The lock that keeps a second daemon off a state directory. Held for the process's life.
pub struct StateLock {
    _file: Flock<File>,
}

const LOCK_FILE: &str = "taskd.pid";
/// How long a starting daemon waits for the state directory's lock before it gives up.
const LOCK_WAIT: Duration = Duration::from_secs(2);

impl StateLock {
    /// Creates `state_dir` when missing, gives it its mode (see [`secure_state_dir`]) and
    /// takes its lock.
    pub fn acquire(state_dir: &Path, group: Option<&str>) -> Result<StateLock, Failure> {
        secure_state_dir(state_dir, group)?;
        let path = state_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                Failure::new(
                    exit::FAILURE,
                    format!("failed to open {}: {e}", path.display()),
                )
            })?;
        // A holder that is going away (a daemon just killed, whose last child has not yet
        // closed its copy of the descriptor; a `taskd status` reading it) lets go within
        // moments: wait a little before calling it another daemon.
        let give_up = std::time::Instant::now() + LOCK_WAIT;
        let mut file = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => break locked,
                Err((back, _)) if std::time::Instant::now() < give_up => file = back,
                Err((mut back, _)) => {
                    let mut holder = String::new();
                    let _ = back.read_to_string(&mut holder);
                    let holder = holder.trim();
                    return Err(Failure::new(
                        exit::FAILURE,
                        format!(
                            "another taskd daemon{} is already using the state directory {}; stop it first, or give this one its own state_dir",
                            if holder.is_empty() { String::new() } else { format!(" (pid {holder})") },
                            state_dir.display()
                        ),
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(StateLock { _file: file })
    }
}

/// The pid of the daemon holding `state_dir`, if one does.
pub fn running_daemon(state_dir: &Path) -> Option<u32> {
    let path = state_dir.join(LOCK_FILE);
    let file = File::open(&path).ok()?;
    let mut file = match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => return None, // nobody holds it (our shared lock goes with the descriptor)
        Err((file, _)) => file,
    };
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// What the daemon's process needs before it runs tasks: the descriptors it inherited
/// marked close-on-exec (no task gets them), its open-files limit fitted to its queues, and
/// the child subreaper flag (orphaned grandchildren of tasks come back to it, to be reaped).
pub fn set_up_process(config: &Config) {
    crate::executor::mark_inherited_fds_cloexec();
    fit_nofile(config);
    if let Err(e) = crate::executor::become_subreaper() {
        tracing::warn!(error = %e, "could not become a child subreaper; orphaned grandchildren go to init");
    }
}

/// Size the daemon's own open-files limit to its queues (see `executor::fit_own_nofile`).
pub(super) fn fit_nofile(config: &Config) {
    match crate::executor::fit_own_nofile(task_slots(config)) {
        Ok(soft) => tracing::debug!(soft, "open-files limit fitted to the queues"),
        Err(e) => tracing::warn!(error = %e, "could not adjust the open-files limit"),
    }
}

pub(super) fn task_slots(config: &Config) -> usize {
    config.queues.values().map(|q| q.concurrency).sum()
}

/// Reaps, once a second, the orphaned descendants of tasks that come back to a child
/// subreaper (see [`set_up_process`]); task leaders are the executor's own business. Only
/// for a process that is a daemon and nothing else: another program's children that died
/// unwaited would be reaped too.
pub struct Reaper(tokio::task::JoinHandle<()>);

impl Reaper {
    pub fn spawn() -> Reaper {
        Reaper(tokio::spawn(async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                crate::executor::reap_orphans();
            }
        }))
    }

    /// Stop, after one last round.
    pub fn stop(self) {
        self.0.abort();
        crate::executor::reap_orphans();
    }
}
