//! `state_dir/workers.json`: the daemon's workers as `taskd status` shows them, and their
//! pids for the next daemon to kill after a crash.
//!
//! Written atomically (a temporary file renamed over it) whenever a worker changes state,
//! and at most once a second while only task counters change. Not fsynced: after a power
//! cut the processes it names are gone too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Shared;
use crate::model::{now_ms, QueueName, UnixMs};

pub const FILE_NAME: &str = "workers.json";

/// supervisord's states, and STOPPING/STOPPED for a worker taskd is stopping on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Spawned; waiting for its `ready` message and `start_secs`.
    Starting,
    /// Ready: it takes tasks.
    Running,
    /// Died; waiting before the next start (exponential backoff).
    Backoff,
    /// Being stopped (recycle, reload, shutdown).
    Stopping,
    /// Failed to start `start_retries` times in a row: not restarted until a reload.
    Fatal,
    Stopped,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "STARTING",
            WorkerState::Running => "RUNNING",
            WorkerState::Backoff => "BACKOFF",
            WorkerState::Stopping => "STOPPING",
            WorkerState::Fatal => "FATAL",
            WorkerState::Stopped => "STOPPED",
        }
    }
}

/// One worker slot, as shown by `taskd status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub queue: QueueName,
    /// 0..concurrency within the queue.
    pub slot: usize,
    pub pid: Option<i32>,
    /// The process's start time in clock ticks since boot (crash recovery).
    #[serde(default)]
    pub start_time: u64,
    pub state: WorkerState,
    /// When it entered `state`.
    pub since_ms: UnixMs,
    /// When the current process started.
    pub started_ms: Option<UnixMs>,
    /// Tasks the current process answered.
    pub tasks_done: u64,
    /// How the previous process ended, and why.
    pub last_exit: Option<String>,
    /// Why the worker is FATAL.
    pub why: Option<String>,
    /// The last lines (at most [`LastLines::MAX_LINES`]) the previous process wrote on
    /// stderr outside tasks: what a worker that cannot start says about it ("can't open
    /// file …", an import error). Output written during a task is that task's.
    #[serde(default)]
    pub last_stderr: Vec<String>,
}

impl WorkerInfo {
    pub(super) fn new(queue: &QueueName, slot: usize) -> Self {
        WorkerInfo {
            queue: queue.clone(),
            slot,
            pid: None,
            start_time: 0,
            state: WorkerState::Starting,
            since_ms: now_ms(),
            started_ms: None,
            tasks_done: 0,
            last_exit: None,
            why: None,
            last_stderr: Vec::new(),
        }
    }
}

/// The last non-blank lines of a stream, bounded in count and length, so that a worker
/// that writes megabytes before it dies costs a few hundred bytes.
#[derive(Default)]
pub(super) struct LastLines {
    lines: std::collections::VecDeque<String>,
    partial: Vec<u8>,
}

impl LastLines {
    pub const MAX_LINES: usize = 10;
    /// Characters kept of one line.
    pub const MAX_CHARS: usize = 300;

    pub fn push(&mut self, mut data: &[u8]) {
        while let Some(i) = data.iter().position(|b| *b == b'\n') {
            self.keep(&data[..i]);
            self.end_line();
            data = &data[i + 1..];
        }
        self.keep(data);
    }

    /// Add to the current line what still fits (a line is cut, not split).
    fn keep(&mut self, data: &[u8]) {
        let room = (Self::MAX_CHARS * 4).saturating_sub(self.partial.len());
        self.partial
            .extend_from_slice(&data[..data.len().min(room)]);
    }

    fn end_line(&mut self) {
        let raw = std::mem::take(&mut self.partial);
        let text = String::from_utf8_lossy(&raw);
        let line = text.trim_end();
        if line.trim().is_empty() {
            return;
        }
        let line: String = line.chars().take(Self::MAX_CHARS).collect();
        if self.lines.len() == Self::MAX_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The lines so far (an unfinished last line included), oldest first; empties it.
    pub fn take(&mut self) -> Vec<String> {
        self.end_line();
        self.lines.drain(..).collect()
    }
}

/// The file's content.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusFile {
    pub daemon_pid: u32,
    /// `/proc/sys/kernel/random/boot_id`: pids from another boot mean nothing.
    pub boot_id: String,
    pub updated_ms: UnixMs,
    pub workers: Vec<WorkerInfo>,
}

/// Every pool of the daemon, for the status file.
pub struct Registry {
    path: Option<PathBuf>,
    pools: Mutex<Vec<Weak<Shared>>>,
    /// A state changed: write at once.
    dirty: AtomicBool,
    /// Only counters changed: write on the next tick.
    touched: AtomicBool,
    wake: tokio::sync::Notify,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Registry {
    /// A registry writing `state_dir/workers.json` (none when `state_dir` is `None`).
    pub fn new(state_dir: Option<&Path>) -> Arc<Registry> {
        Arc::new(Registry {
            path: state_dir.map(|d| d.join(FILE_NAME)),
            pools: Mutex::new(Vec::new()),
            dirty: AtomicBool::new(false),
            touched: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        })
    }

    pub(super) fn add(&self, shared: &Arc<Shared>) {
        let mut pools = self.pools.lock().expect("not poisoned");
        pools.retain(|w| w.strong_count() > 0);
        pools.push(Arc::downgrade(shared));
    }

    pub(super) fn changed(&self) {
        self.dirty.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub(super) fn touched(&self) {
        self.touched.store(true, Ordering::Release);
    }

    /// Every worker of every live pool, by queue and slot.
    pub fn infos(&self) -> Vec<WorkerInfo> {
        let pools: Vec<Arc<Shared>> = self
            .pools
            .lock()
            .expect("not poisoned")
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut out: Vec<WorkerInfo> = Vec::new();
        for p in pools {
            // A retired pool whose loops ended shows nothing.
            if p.stop.is_cancelled() && p.loops.is_closed() && p.loops.is_empty() {
                continue;
            }
            for s in p.slots.lock().expect("not poisoned").iter() {
                out.push(s.info.lock().expect("not poisoned").clone());
            }
        }
        out.retain(|i| i.state != WorkerState::Stopped);
        out.sort_by(|a, b| (&a.queue, a.slot).cmp(&(&b.queue, b.slot)));
        out
    }

    /// Writes the file now (a worker was just spawned: its pid must be on record).
    pub(super) fn write_now(&self) {
        self.dirty.store(false, Ordering::Release);
        self.touched.store(false, Ordering::Release);
        let Some(path) = &self.path else { return };
        let file = StatusFile {
            daemon_pid: std::process::id(),
            boot_id: boot_id(),
            updated_ms: now_ms(),
            workers: self.infos(),
        };
        if let Err(e) = write_atomic(path, &file) {
            tracing::warn!(path = %path.display(), error = %e, "failed to write the workers' status file");
        }
    }

    /// Keeps the file current: at once after a state change, once a second for counters.
    pub fn spawn_writer(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = me.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    // The drain stops the workers and removes the file.
                    _ = stop.cancelled() => return,
                }
                if me.dirty.load(Ordering::Acquire) || me.touched.load(Ordering::Acquire) {
                    me.write_now();
                }
            }
        });
    }

    /// The daemon stopped cleanly: no worker is left.
    pub fn remove_file(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn write_atomic(path: &Path, file: &StatusFile) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The resident memory of process `pid` in bytes (`VmRSS` of /proc/PID/status), for the
/// worker panels of `taskd status` and the dashboard.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The status file of the daemon using `state_dir`, if there is one.
pub fn read_status(state_dir: &Path) -> Option<StatusFile> {
    let text = std::fs::read(state_dir.join(FILE_NAME)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// At start-up: kill the process groups of workers a previous daemon left behind (it was
/// killed, or crashed). Only pids recorded on this boot, whose process still has the
/// recorded start time, are signalled. Returns how many groups were killed.
pub fn kill_leftovers(state_dir: &Path) -> usize {
    let Some(file) = read_status(state_dir) else {
        return 0;
    };
    let _ = std::fs::remove_file(state_dir.join(FILE_NAME));
    if file.boot_id != boot_id() || file.daemon_pid == std::process::id() {
        return 0;
    }
    file.workers
        .iter()
        .filter_map(|w| Some((w.pid?, w.start_time)))
        .filter(|&(pid, start)| crate::executor::kill_orphan_group(pid, start))
        .count()
}

#[cfg(test)]
mod last_lines_tests {
    use super::LastLines;

    #[test]
    fn keeps_the_last_non_blank_lines_bounded() {
        let mut l = LastLines::default();
        l.push(b"Traceback (most recent call last):\n  File \"w.py\", line 1\n\n");
        l.push(b"ModuleNotFoundError: No module");
        l.push(b" named 'x'");
        assert_eq!(
            l.take(),
            [
                "Traceback (most recent call last):",
                "  File \"w.py\", line 1",
                "ModuleNotFoundError: No module named 'x'"
            ]
        );
        assert!(l.take().is_empty(), "take empties it");
        for i in 0..100 {
            l.push(format!("line {i}\n").as_bytes());
        }
        l.push(&vec![b'x'; 1 << 20]);
        let got = l.take();
        assert_eq!(got.len(), LastLines::MAX_LINES);
        assert_eq!(got[0], "line 91");
        assert_eq!(got[9].len(), LastLines::MAX_CHARS);
    }
}
