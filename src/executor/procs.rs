//! The process-level plumbing under [`run`](super::run): `/proc` reading, the registry of
//! live task leaders, reaping adopted orphans, killing orphaned groups after a crash, and
//! start-up hygiene (subreaper, close-on-exec).

use std::collections::HashSet;
use std::io;
use std::sync::{LazyLock, Mutex, PoisonError, RwLock};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpgrp, Pid};

/// The fields of `/proc/PID/stat` taskd needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Field 3: `R`, `S`, `Z`, …
    pub(crate) state: u8,
    /// Field 4.
    pub(crate) ppid: i32,
    /// Field 5.
    pub(crate) pgrp: i32,
    /// Field 22: clock ticks since boot. With the pid it names one process for good.
    pub(crate) start_time: u64,
}

/// Parses a `/proc/PID/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so the fields are counted from the last `)`.
pub(crate) fn parse_stat(line: &[u8]) -> Option<Stat> {
    let close = line.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&line[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    // The next field is 6; field 22 is 16 further on.
    let start_time = fields.nth(16)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        pgrp,
        start_time,
    })
}

pub(crate) fn read_stat(pid: i32) -> Option<Stat> {
    let line = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&line)
}

// ---------------------------------------------------------------------------------------------
// The registry of children whose exit status belongs to someone (tokio, for task leaders).

/// Pids of children that tokio will reap; `reap_orphans` must leave them alone.
static TRACKED: LazyLock<Mutex<HashSet<i32>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// Held shared across "spawn + register", and exclusively by `reap_orphans`: otherwise a child
/// that exits before it is registered would look like an adopted orphan and lose its status.
static SPAWN_GATE: RwLock<()> = RwLock::new(());

fn tracked() -> std::sync::MutexGuard<'static, HashSet<i32>> {
    TRACKED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A child registered as not-an-orphan; unregisters itself when dropped.
///
/// Drop it only after the child was reaped (its `wait()` returned): from then on
/// [`reap_orphans`] may reap the pid itself.
#[derive(Debug)]
pub struct TrackedChild {
    pid: i32,
}

impl TrackedChild {
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for TrackedChild {
    fn drop(&mut self) {
        tracked().remove(&self.pid);
    }
}

/// Registers `pid`, a process the daemon did not spawn but may come to reap (a worker forked
/// by a queue's worker parent is re-parented to the daemon, a child subreaper, when that
/// parent dies first): [`reap_orphans`] leaves it to its owner, who reaps it by pidfd.
pub fn track(pid: i32) -> TrackedChild {
    tracked().insert(pid);
    TrackedChild { pid }
}

/// Spawns `cmd` and registers the child so that [`reap_orphans`] never takes its exit status.
///
/// Every child of the daemon that something else waits for (tokio, std) must be spawned this
/// way once `reap_orphans` is in use; [`run`](super::run) does it for task leaders.
pub fn spawn_tracked(
    cmd: &mut tokio::process::Command,
) -> io::Result<(tokio::process::Child, TrackedChild)> {
    let _gate = SPAWN_GATE.read().unwrap_or_else(PoisonError::into_inner);
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("a freshly spawned child has no pid"))?;
    let pid = pid as i32;
    tracked().insert(pid);
    Ok((child, TrackedChild { pid }))
}

/// Runs `start` (which starts a child and returns its pid with whatever else it made) and
/// registers the pid, both under the spawn gate: for spawns that do not go through
/// [`spawn_tracked`]'s `Command`.
pub(crate) fn spawn_registered<T>(
    start: impl FnOnce() -> io::Result<(i32, T)>,
) -> io::Result<(T, TrackedChild)> {
    let _gate = SPAWN_GATE.read().unwrap_or_else(PoisonError::into_inner);
    let (pid, made) = start()?;
    tracked().insert(pid);
    Ok((made, TrackedChild { pid }))
}

/// Our own children, from `/proc/self/task/*/children` (an orphan is reparented to one of
/// our threads, so every thread's list counts). `None` if the kernel does not provide them.
fn children_from_task_lists() -> Option<Vec<i32>> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        match std::fs::read_to_string(task.path().join("children")) {
            Ok(list) => pids.extend(
                list.split_ascii_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            ),
            // The thread is gone: fine. The file does not exist: this kernel lacks it.
            Err(e) if e.kind() == io::ErrorKind::NotFound && task.path().exists() => return None,
            Err(_) => {}
        }
    }
    Some(pids)
}

/// Our own children, by scanning every process in `/proc`.
fn children_from_proc_scan(me: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| read_stat(pid).is_some_and(|st| st.ppid == me))
        .collect()
}

/// Reaps zombie children of this process that nobody else will wait for: orphaned
/// grandchildren that were reparented to us as a child subreaper. Returns how many it reaped.
///
/// Waits for each by pid; never `waitpid(-1)`, which would steal tokio's exit statuses. Pids
/// registered by [`spawn_tracked`] (every live task leader) are skipped.
pub fn reap_orphans() -> usize {
    let _gate = SPAWN_GATE.write().unwrap_or_else(PoisonError::into_inner);
    let me = std::process::id() as i32;
    let mut children = children_from_task_lists().unwrap_or_else(|| children_from_proc_scan(me));
    {
        let tracked = tracked();
        children.retain(|pid| !tracked.contains(pid));
    }
    let mut reaped = 0;
    for pid in children {
        if !read_stat(pid).is_some_and(|st| st.state == b'Z' && st.ppid == me) {
            continue;
        }
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => {}
            Ok(_) => reaped += 1,
        }
    }
    reaped
}

/// Makes this process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`), so a
/// task's double-forked grandchildren stay within reach instead of going to init.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Sends `sig` to process group `pgid`; true if the group existed and got it.
pub(crate) fn signal_group(pgid: i32, sig: Signal) -> bool {
    if pgid <= 1 {
        return false;
    }
    killpg(Pid::from_raw(pgid), sig).is_ok()
}

/// Crash recovery: SIGKILLs process group `pgid` if it still exists and is the task's — its
/// leader is gone, or the leader's start time is `start_time` (so the pid was not reused).
/// Returns whether something was killed. Never signals pgid ≤ 1 or our own group.
///
/// `start_time` counts from boot: after a reboot the recorded groups mean nothing, and the
/// caller should not ask.
pub fn kill_orphan_group(pgid: i32, start_time: u64) -> bool {
    if pgid <= 1 || pgid == getpgrp().as_raw() || pgid == std::process::id() as i32 {
        return false;
    }
    // Does the group exist at all (and may we signal it)?
    if killpg(Pid::from_raw(pgid), None).is_err() {
        return false;
    }
    if let Some(leader) = read_stat(pgid) {
        if leader.start_time != start_time {
            return false;
        }
    }
    // Zombies still count as members of a group but there is nothing left of them to kill.
    let live = has_live_member(pgid);
    signal_group(pgid, Signal::SIGKILL) && live
}

/// Kill every process that carries one of `task_ids` in its environment (`TASKD_TASK_ID`,
/// which every task and its descendants inherit), together with its process group. Used at
/// start-up to clean up after a daemon that died without stopping its tasks: the marker is
/// in each task's environment, so no per-task write is needed on the hot path to find them.
/// Returns how many processes were found.
pub fn kill_task_processes(task_ids: &[String]) -> usize {
    let own_group = getpgrp().as_raw();
    let found = live_task_processes(task_ids);
    for (pid, _, st) in &found {
        if st.pgrp > 1 && st.pgrp != own_group {
            signal_group(st.pgrp, Signal::SIGKILL);
        }
        let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    found.len()
}

/// Which of `task_ids` still have a live process on this machine (`TASKD_TASK_ID` in its
/// environment). Read-only: the caller decides what may be killed.
pub fn task_ids_with_processes(task_ids: &[String]) -> Vec<String> {
    let ids: HashSet<String> = live_task_processes(task_ids)
        .into_iter()
        .map(|(_, id, _)| id)
        .collect();
    ids.into_iter().collect()
}

/// Every live (not zombie) process other than this one whose environment holds
/// `TASKD_TASK_ID=<one of task_ids>`: its pid, that id and its stat line. One scan of `/proc`.
fn live_task_processes(task_ids: &[String]) -> Vec<(i32, String, Stat)> {
    if task_ids.is_empty() {
        return Vec::new();
    }
    let wanted: HashSet<Vec<u8>> = task_ids
        .iter()
        .map(|id| format!("TASKD_TASK_ID={id}").into_bytes())
        .collect();
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Some(var) = environ.split(|b| *b == 0).find(|var| wanted.contains(*var)) else {
            continue;
        };
        let Some(st) = read_stat(pid) else { continue };
        if st.state == b'Z' {
            continue;
        }
        let id = String::from_utf8_lossy(&var["TASKD_TASK_ID=".len()..]).into_owned();
        found.push((pid, id, st));
    }
    found
}

/// Whether any process of group `pgid` is still running (not a zombie). Scans all of `/proc`:
/// fine for crash recovery, too slow for the per-task path.
fn has_live_member(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read_stat)
        .any(|st| st.pgrp == pgid && st.state != b'Z')
}

/// Sets close-on-exec on every descriptor ≥ 3 of this process, so what the daemon inherited
/// (from systemd, a shell, a test harness) does not leak into tasks. Called once at start-up.
pub fn mark_inherited_fds_cloexec() {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&fd| fd >= 3)
            .collect(),
        Err(_) => {
            // No /proc: try every possible descriptor up to the soft limit.
            let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(soft, _)| soft.min(65_536))
                .unwrap_or(1024);
            (3..limit as i32).collect()
        }
    };
    for fd in fds {
        // A closed fd (such as the one that listed the directory) gives EBADF: skipped.
        let Ok(flags) = fcntl(fd, FcntlArg::F_GETFD) else {
            continue;
        };
        let flags = FdFlag::from_bits_retain(flags);
        if !flags.contains(FdFlag::FD_CLOEXEC) {
            let _ = fcntl(fd, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC));
        }
    }
}
