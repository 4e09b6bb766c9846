//! Containment: a cgroup per task (and per long-lived worker), so that stopping a task ends
//! everything it started, a grandchild that called `setsid` or double-forked included.
//!
//! Where the machine allows it (see docs/architecture.md, "Containment"):
//! - **Tracking and kill** go through a writable cgroup v2 hierarchy: taskd's subtree
//!   `taskd-<key>` (the key names the daemon's state directory) under `cgroup_root`, or
//!   under the daemon's own v2 cgroup (under systemd with `Delegate=yes`, its delegated
//!   service cgroup). Each task's leader is born in its v2 cgroup (`clone3` with
//!   `CLONE_INTO_CGROUP`, Linux 5.7), or moves itself into it before `execve` (it writes `0`
//!   to the `cgroup.procs` the daemon opened), so nothing it starts can be outside; the
//!   whole cgroup is ended with `cgroup.kill` (or, on kernels before 5.14, by SIGKILLing
//!   its members until it is empty), then removed.
//! - **Files** a cgroup's every task uses (`cgroup.procs`, `cgroup.kill`, the counters) are
//!   opened once, when the cgroup is made, and read with `pread` at offset 0: a kept cgroup
//!   serves task after task without an `open` or a `close` (see [`files_per_cgroup`]).
//! - **Limits** (`memory_max`, `pids_max`, `cpu_weight`) go through the v2 controllers where
//!   they are enabled, and otherwise through the v1 `memory`, `pids` and `cpu` hierarchies
//!   (a hybrid machine), in a cgroup of the same name under the daemon's own v1 cgroup.
//! - Nothing writable: [`detect`] says why, and the daemon keeps process groups.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Limits of one task's (or worker's) cgroup; `None`: not limited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Bytes of memory (and swap) the cgroup may use; past it the kernel's OOM killer
    /// ends a process of the cgroup.
    pub memory_max: Option<u64>,
    /// Processes (and threads) the cgroup may hold at once.
    pub pids_max: Option<u64>,
    /// The cgroup's share of CPU time under contention, 1 to 10000 (100 is the default).
    pub cpu_weight: Option<u32>,
}

impl CgroupLimits {
    pub fn any(&self) -> bool {
        self.memory_max.is_some() || self.pids_max.is_some() || self.cpu_weight.is_some()
    }
}

/// Which cgroup one spawn goes into: the daemon's subtree, the cgroup's name in it, limits.
#[derive(Clone, Debug)]
pub struct CgroupSpec {
    pub place: Arc<Containment>,
    /// A name unique among the cgroups alive in the subtree (`worker-…`); for a kept
    /// cgroup (`kept`), the family its name starts with (`task-<queue>`): the cgroup is
    /// `<family>-<n>`, the lowest `n` free.
    pub name: String,
    pub limits: CgroupLimits,
    /// A task's cgroup, kept for the family's next task once this one's processes are all
    /// gone, instead of being removed (see [`Containment`]): `mkdir` and `rmdir` of a cgroup
    /// per task cost the daemon more than everything else it does for a short task.
    pub kept: bool,
}

/// What a cgroup's counters said when it was removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time of every process the cgroup held (user + system), in microseconds.
    pub cpu_usec: Option<u64>,
    /// The cgroup's peak memory use, in bytes, where a memory controller counted it.
    pub memory_peak: Option<u64>,
    /// Processes the kernel's OOM killer ended in the cgroup.
    pub oom_kills: u64,
}

/// The daemon's cgroup subtree, found by [`detect`].
#[derive(Debug)]
pub struct Containment {
    /// taskd's subtree in the v2 hierarchy: every task's cgroup is a directory in it.
    tree: PathBuf,
    /// `cgroup.kill` exists (Linux 5.14).
    has_kill: bool,
    /// v2 controllers enabled for the cgroups in `tree` (of memory, pids, cpu).
    v2: Vec<&'static str>,
    /// v1 subtrees of the same name, for the controllers v2 does not give.
    v1: Vec<(&'static str, PathBuf)>,
    /// Numbers the names of worker cgroups.
    serial: AtomicU64,
    /// Kept task cgroups, by family (`task-<queue>`): the idle ones, and the numbers in use.
    kept: std::sync::Mutex<std::collections::HashMap<String, Family>>,
}

/// The kept cgroups `<family>-<n>` of one family. A queue holds at most its concurrency
/// at once, so a family has that many (the most it ran at once), numbered from 0.
#[derive(Debug, Default)]
struct Family {
    /// Empty, counters noted, waiting for the family's next task.
    idle: Vec<Inner>,
    /// The numbers whose directories exist: idle, busy, or left behind by a cgroup that
    /// could not be emptied (never used again in this daemon's life).
    taken: std::collections::BTreeSet<u32>,
}

/// How this daemon contains its tasks.
#[derive(Clone, Debug)]
pub enum Mode {
    Cgroups(Arc<Containment>),
    /// No writable cgroup hierarchy: process groups, as the reason says.
    ProcessGroups(String),
}

impl Mode {
    /// One line for the log and `taskd status`.
    pub fn describe(&self) -> String {
        match self {
            Mode::Cgroups(c) => c.describe(),
            Mode::ProcessGroups(why) => format!(
                "process groups only ({why}): a process that leaves its task's group (setsid) is not stopped with the task, and queue limits memory_max, pids_max and cpu_weight are not available"
            ),
        }
    }

    pub fn containment(&self) -> Option<&Arc<Containment>> {
        match self {
            Mode::Cgroups(c) => Some(c),
            Mode::ProcessGroups(_) => None,
        }
    }
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// `mkdir`, an existing directory being fine.
fn make_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Finds where this daemon may create its tasks' cgroups: under `root` (the `cgroup_root`
/// key: a directory of a cgroup v2 hierarchy) when given, else under the daemon's own v2
/// cgroup. `key` names the daemon's subtree (`taskd-<key>`): one per state directory, so
/// that the next daemon of the same state directory finds what a crashed one left.
pub fn detect(root: Option<&Path>, key: &str) -> Mode {
    match try_detect(root, key) {
        Ok(c) => Mode::Cgroups(Arc::new(c)),
        Err(why) => Mode::ProcessGroups(why),
    }
}

fn try_detect(root: Option<&Path>, key: &str) -> Result<Containment, String> {
    let probe = crate::cgroupfs::probe(root)?;
    let name = format!("taskd-{key}");
    let base = probe.base;
    if root.is_some() {
        make_dir(&base)
            .map_err(|e| format!("cannot create cgroup_root {}: {e}", base.display()))?;
    }
    let tree = base.join(&name);
    make_dir(&tree).map_err(|e| {
        format!(
            "cannot create {}: {e} (under systemd give the unit `Delegate=yes`; elsewhere set `cgroup_root` to a writable directory of a cgroup v2 hierarchy)",
            tree.display()
        )
    })?;
    let has_kill = tree.join("cgroup.kill").exists();
    let v2 = enable_v2_controllers(&base, &tree);
    let mut v1 = Vec::new();
    for (controller, own) in probe.v1 {
        if v2.contains(&controller) {
            continue;
        }
        let dir = own.join(&name);
        if make_dir(&dir).is_ok() {
            v1.push((controller, dir));
        }
    }
    let place = Containment {
        tree,
        has_kill,
        v2,
        v1,
        serial: AtomicU64::new(0),
        kept: Default::default(),
    };
    FILES_PER_CGROUP.fetch_max(place.files_each(), Ordering::Relaxed);
    Ok(place)
}

/// The most descriptors one cgroup of this process keeps open ([`Files`]): set by
/// [`detect`] from what the machine offers, 0 while no cgroups are used.
static FILES_PER_CGROUP: AtomicUsize = AtomicUsize::new(0);

/// The descriptors each task slot's cgroup keeps open for the daemon's life (0 without
/// cgroups): part of the open-files budget per task (`executor::reserved_fds`).
pub fn files_per_cgroup() -> usize {
    FILES_PER_CGROUP.load(Ordering::Relaxed)
}

/// Enables the memory, pids and cpu controllers for the cgroups in `tree` where `base`
/// offers them; the ones enabled. A v2 cgroup that holds processes cannot hand domain
/// controllers down ("no internal processes"): when `base` is the daemon's own cgroup (a
/// delegated service cgroup), the daemon first moves itself into `base/daemon`.
fn enable_v2_controllers(base: &Path, tree: &Path) -> Vec<&'static str> {
    let wanted = crate::cgroupfs::CONTROLLERS;
    let offered = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
    let offered: Vec<&'static str> = wanted
        .into_iter()
        .filter(|w| offered.split_whitespace().any(|o| o == *w))
        .collect();
    if offered.is_empty() {
        return Vec::new();
    }
    let enabled_in = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("cgroup.subtree_control"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let missing: Vec<&str> = offered
        .iter()
        .copied()
        .filter(|c| !enabled_in(base).iter().any(|e| e == c))
        .collect();
    if !missing.is_empty() {
        let procs = std::fs::read_to_string(base.join("cgroup.procs")).unwrap_or_default();
        if !procs.trim().is_empty() && is_own_cgroup(base) {
            let leaf = base.join("daemon");
            if make_dir(&leaf).is_err() || write_file(&leaf.join("cgroup.procs"), "0").is_err() {
                return Vec::new();
            }
        }
        let line: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
        // One at a time: a controller that cannot be enabled does not stop the others.
        for c in line {
            let _ = write_file(&base.join("cgroup.subtree_control"), &c);
        }
    }
    let in_tree: Vec<&'static str> = offered
        .into_iter()
        .filter(|c| {
            let _ = write_file(&tree.join("cgroup.subtree_control"), &format!("+{c}"));
            enabled_in(tree).iter().any(|e| e == c)
        })
        .collect();
    in_tree
}

/// Whether `dir` is this process's own v2 cgroup.
fn is_own_cgroup(dir: &Path) -> bool {
    let me = std::process::id().to_string();
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|p| p.lines().any(|l| l == me))
        .unwrap_or(false)
}

impl Containment {
    /// One line for the log and `taskd status`.
    pub fn describe(&self) -> String {
        let kill = if self.has_kill {
            "cgroup.kill"
        } else {
            "SIGKILL to each member (no cgroup.kill before Linux 5.14)"
        };
        let mut limits: Vec<String> = self.v2.iter().map(|c| format!("{c} (v2)")).collect();
        limits.extend(self.v1.iter().map(|(c, _)| format!("{c} (v1)")));
        let limits = if limits.is_empty() {
            "none".to_string()
        } else {
            limits.join(", ")
        };
        format!(
            "a cgroup per task under {} (one per queue slot, kept and reused; stopped with {kill}; limits: {limits})",
            self.tree.display()
        )
    }

    /// The most descriptors a cgroup here keeps open ([`Files`]): in v2 its directory,
    /// `cgroup.procs`, `cpu.stat` and `cgroup.kill` (Linux 5.14), and `memory.peak` and
    /// `memory.events` with a v2 memory controller; in each v1 hierarchy `tasks`, and for
    /// v1 memory `memory.max_usage_in_bytes` and `memory.oom_control`.
    fn files_each(&self) -> usize {
        let v2 = 3 + usize::from(self.has_kill);
        let v2_memory = if self.v2.contains(&"memory") { 2 } else { 0 };
        let v1: usize = self
            .v1
            .iter()
            .map(|(c, _)| if *c == "memory" { 3 } else { 1 })
            .sum();
        v2 + v2_memory + v1
    }

    /// The subtree's v2 directory.
    pub fn tree(&self) -> &Path {
        &self.tree
    }

    /// Whether a limit on `controller` (memory, pids, cpu) can be applied.
    pub fn can_limit(&self, controller: &str) -> bool {
        self.v2.contains(&controller) || self.v1.iter().any(|(c, _)| *c == controller)
    }

    /// A fresh number for a cgroup's name.
    pub fn serial(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed)
    }

    /// Crash recovery: kills every process of every cgroup a previous daemon of this state
    /// directory left in the subtree, and removes those cgroups. How many cgroups held
    /// processes.
    pub fn kill_leftovers(&self) -> usize {
        let mut killed = 0;
        let mut dirs: Vec<PathBuf> = Vec::new();
        for tree in std::iter::once(&self.tree).chain(self.v1.iter().map(|(_, d)| d)) {
            if let Ok(rd) = std::fs::read_dir(tree) {
                dirs.extend(
                    rd.filter_map(|e| e.ok())
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        for dir in &dirs {
            if !members(dir).is_empty() {
                killed += 1;
            }
            kill_dir(
                dir,
                crate::cgroupfs::is_cgroup2(dir) && dir.join("cgroup.kill").exists(),
            );
        }
        for dir in &dirs {
            remove_dir_waiting(dir, Duration::from_secs(2));
        }
        killed
    }

    fn families(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Family>> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A kept cgroup of `spec.name`'s family for one task: an idle one when there is one
    /// (its limits set again if the queue's changed: made anew under its name), else a new
    /// one with the lowest free number.
    fn take_kept(self: &Arc<Self>, spec: &CgroupSpec) -> io::Result<Inner> {
        let idle = {
            let mut families = self.families();
            let family = families.entry(spec.name.clone()).or_default();
            let lowest = (0..family.idle.len()).min_by_key(|&i| slot_number(&family.idle[i]));
            lowest.map(|i| family.idle.swap_remove(i))
        };
        if let Some(inner) = idle {
            if inner.limits == spec.limits {
                return Ok(inner);
            }
            // The queue's limits changed (a reload): this one is removed (it is empty) and
            // its number made again below, with the new limits.
            drop(inner);
        }
        // A directory of that name left by something else (a cgroup that could not be
        // removed) is never taken over: its number stays taken and the next one is tried.
        for _ in 0..64 {
            let n = {
                let mut families = self.families();
                let family = families.entry(spec.name.clone()).or_default();
                let n = (0u32..)
                    .find(|n| !family.taken.contains(n))
                    .expect("fewer than 2^32 cgroups");
                family.taken.insert(n);
                n
            };
            let slot = Slot {
                place: Arc::downgrade(self),
                family: spec.name.clone(),
                n,
            };
            let name = format!("{}-{n}", spec.name);
            match Inner::make(self, &name, &spec.limits, Some(slot)) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                other => return other,
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "64 cgroups named {}-<n> exist already in {}",
                spec.name,
                self.tree.display()
            ),
        ))
    }

    /// Gives an emptied kept cgroup back to its family.
    fn keep(&self, inner: Inner) {
        let Some(slot) = &inner.slot else { return };
        let mut families = self.families();
        match families.get_mut(&slot.family) {
            Some(family) => family.idle.push(inner),
            None => {
                drop(families);
                drop(inner);
            }
        }
    }

    /// At a clean exit: removes the kept cgroups, then the subtree (it is empty once every
    /// task and worker ended).
    pub fn close(&self) {
        let idle: Vec<Inner> = self
            .families()
            .values_mut()
            .flat_map(|f| std::mem::take(&mut f.idle))
            .collect();
        // Each is empty: its drop removes it at once.
        drop(idle);
        for dir in std::iter::once(&self.tree).chain(self.v1.iter().map(|(_, d)| d)) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Pids in a cgroup directory.
fn members(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills every process of the cgroup `dir`: `cgroup.kill` when `has_kill`, else SIGKILL to
/// each member, again while new ones appear (a fork between the read and the kill).
fn kill_dir(dir: &Path, has_kill: bool) {
    if has_kill && write_file(&dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for _ in 0..100 {
        let pids = members(dir);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Removes the cgroup `dir` once its killed processes are gone, trying for up to `within`.
/// True when it is gone.
fn remove_dir_waiting(dir: &Path, within: Duration) -> bool {
    let until = std::time::Instant::now() + within;
    let mut delay = Duration::from_micros(200);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(_) => return false,
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        // The processes were killed: they are gone within a moment (a zombie that the
        // daemon, their subreaper, has not reaped yet is reaped on its SIGCHLD).
        super::procs::reap_orphans();
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// One task's (or worker's) cgroup: a directory in the v2 subtree, plus one in each v1
/// hierarchy a limit needs. Cloning shares it; the last clone dropped kills what is left in
/// it and removes it. A kept task cgroup ([`CgroupSpec::kept`]) goes back to its family
/// instead, by [`Cgroup::finish`], once nothing of its task is left in it.
#[derive(Clone, Debug)]
pub struct Cgroup(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// The v2 directory first, then the v1 ones.
    dirs: Vec<PathBuf>,
    /// The files every task uses, open for the cgroup's life; `None` only while it is
    /// being made, and once its drop began.
    files: Option<Files>,
    has_kill: bool,
    /// Where memory is counted: `Some(true)` the v2 controller, `Some(false)` v1's.
    memory_v2: Option<bool>,
    /// Removed already: nothing left for the drop.
    removed: std::sync::atomic::AtomicBool,
    /// `cgroup.kill` was written: no task is cloned into it any more ([`Join::dir`]).
    killed: std::sync::atomic::AtomicBool,
    /// The limits it was made with.
    limits: CgroupLimits,
    /// A kept cgroup's family and number.
    slot: Option<Slot>,
    /// What the counters said when the current task got the cgroup (empty then): the
    /// task's use is the difference. Zero for a new cgroup.
    base: Base,
}

#[derive(Debug)]
struct Slot {
    place: std::sync::Weak<Containment>,
    family: String,
    n: u32,
}

#[derive(Debug, Default)]
struct Base {
    cpu_usec: u64,
    oom_kills: u64,
}

/// The files of one cgroup that its every task uses, opened (close-on-exec) when the
/// cgroup is made and closed with it: read with `pread` at offset 0 (a cgroup file's read
/// starts its records afresh there, and returns every record that fits, so a short read is
/// the end), written with `pwrite`. A kept cgroup thus costs no `open` or `close` per task.
#[derive(Debug)]
struct Files {
    /// The v2 directory: where `clone3(CLONE_INTO_CGROUP)` starts a task.
    dir: OwnedFd,
    /// v2 `cgroup.procs`, read and write: whether anything is left in the cgroup, and what
    /// a child that was not born in the cgroup writes `0` to.
    procs: File,
    /// v2 `cgroup.kill` (Linux 5.14).
    kill: Option<File>,
    /// v2 `cpu.stat` (`usage_usec`).
    cpu_stat: Option<File>,
    /// `tasks` of each v1 directory, in `dirs` order: the child writes `0` there. Its only
    /// thread is the whole process, and a thread's move of itself takes no global lock,
    /// where a write to `cgroup.procs` takes `cgroup_threadgroup_rwsem` for writing (a
    /// wait of up to an RCU grace period, 10-16 ms measured on a loaded machine).
    v1_tasks: Vec<File>,
    /// The peak memory, read and write: v2 `memory.peak` (a write of `reset` resets the
    /// peak seen through this open file, Linux 6.12; read-only before), v1
    /// `memory.max_usage_in_bytes` (a write of `0` resets it).
    peak: Option<File>,
    /// OOM kills: v2 `memory.events`, v1 `memory.oom_control` (`oom_kill`).
    events: Option<File>,
}

/// What a child needs to start in its cgroup: born in it (`dir`, `clone3` with
/// `CLONE_INTO_CGROUP`) or moving itself (`0` to `procs`), then `0` to each `v1_tasks`.
/// Descriptors of the cgroup's [`Files`], valid while its [`Cgroup`] is held.
#[derive(Debug, Clone)]
pub(crate) struct Join {
    /// -1 once `cgroup.kill` was written to the cgroup: a child cloned into a cgroup that
    /// was ever killed that way is SIGKILLed at birth (seen on Linux 6.18: the kernel
    /// compares the kill count of the parent's cgroup, taken at the fork's start, with
    /// the target's), so such a cgroup's tasks join by the write instead.
    pub(crate) dir: RawFd,
    pub(crate) procs: RawFd,
    pub(crate) v1_tasks: Vec<RawFd>,
}

impl Join {
    /// The descriptors a child writes `0` to when it was not born in the cgroup: v2's
    /// `cgroup.procs`, then each v1 `tasks`.
    pub(crate) fn writes(&self) -> Vec<RawFd> {
        std::iter::once(self.procs)
            .chain(self.v1_tasks.iter().copied())
            .collect()
    }
}

/// Opens `name` in `dir`, close-on-exec, for reading (`read`) and/or writing (`write`).
fn open_in(dir: &Path, name: &str, read: bool, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(read)
        .write(write)
        .custom_flags(libc::O_CLOEXEC)
        .open(dir.join(name))
}

/// `open_in`, `None` where the file does not exist (an older kernel, a controller absent).
fn open_optional(dir: &Path, name: &str, read: bool, write: bool) -> io::Result<Option<File>> {
    match open_in(dir, name, read, write) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Files {
    /// Opens the files of the cgroup whose directories are `dirs` (v2 first); `memory`:
    /// the directory where memory is counted, and whether it is v2's.
    fn open(dirs: &[PathBuf], has_kill: bool, memory: Option<(&Path, bool)>) -> io::Result<Files> {
        let v2 = &dirs[0];
        let dir = OwnedFd::from(
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_DIRECTORY)
                .open(v2)?,
        );
        let procs = open_in(v2, "cgroup.procs", true, true)?;
        let kill = if has_kill {
            open_optional(v2, "cgroup.kill", false, true)?
        } else {
            None
        };
        let cpu_stat = open_optional(v2, "cpu.stat", true, false)?;
        let v1_tasks = dirs[1..]
            .iter()
            .map(|d| open_in(d, "tasks", false, true))
            .collect::<io::Result<Vec<_>>>()?;
        let (peak, events) = match memory {
            None => (None, None),
            Some((d, true)) => {
                // Read-only before Linux 6.12: the peak is read, and cannot be reset.
                let peak = match open_in(d, "memory.peak", true, true) {
                    Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                        open_optional(d, "memory.peak", true, false)?
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    other => Some(other?),
                };
                (peak, open_optional(d, "memory.events", true, false)?)
            }
            Some((d, false)) => (
                open_optional(d, "memory.max_usage_in_bytes", true, true)?,
                open_optional(d, "memory.oom_control", true, false)?,
            ),
        };
        Ok(Files {
            dir,
            procs,
            kill,
            cpu_stat,
            v1_tasks,
            peak,
            events,
        })
    }
}

/// Reads an open cgroup file from its start into `buf`: one `pread` (a cgroup file's read
/// returns every record that fits; what does not fit in `buf` is not read).
fn read_start<'a>(file: &File, buf: &'a mut [u8]) -> Option<&'a str> {
    let n = loop {
        match file.read_at(buf, 0) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    };
    std::str::from_utf8(&buf[..n]).ok()
}

/// The number in an open cgroup file.
fn number_in(file: &File) -> Option<u64> {
    let mut buf = [0u8; 32];
    read_start(file, &mut buf)?.trim().parse().ok()
}

/// The value of `key` in an open flat-keyed cgroup file (`key value` lines).
fn keyed_in(file: &File, key: &str) -> Option<u64> {
    let mut buf = [0u8; 1024];
    read_start(file, &mut buf)?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Writes `value` to an open cgroup file (the offset means nothing to it).
fn write_at(file: &File, value: &[u8]) -> io::Result<()> {
    let n = file.write_at(value, 0)?;
    if n != value.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
    }
    Ok(())
}

fn slot_number(inner: &Inner) -> u32 {
    inner.slot.as_ref().map_or(u32::MAX, |s| s.n)
}

impl Inner {
    /// Makes the cgroup `name` in `place` with `limits`. A kept one (`slot`) must be new:
    /// `AlreadyExists` when its v2 directory exists.
    fn make(
        place: &Containment,
        name: &str,
        limits: &CgroupLimits,
        slot: Option<Slot>,
    ) -> io::Result<Inner> {
        let v2dir = place.tree.join(name);
        let fresh = slot.is_some();
        let mut inner = Inner {
            dirs: Vec::new(),
            files: None,
            has_kill: place.has_kill,
            memory_v2: None,
            removed: std::sync::atomic::AtomicBool::new(false),
            killed: std::sync::atomic::AtomicBool::new(false),
            limits: *limits,
            slot,
            base: Base::default(),
        };
        // From here on a failure removes what was made (Inner's drop), and gives back a
        // kept cgroup's number.
        if fresh {
            if let Err(e) = std::fs::create_dir(&v2dir) {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    // Not ours: its number stays taken.
                    inner.slot = None;
                }
                return Err(e);
            }
        } else {
            make_dir(&v2dir)?;
        }
        inner.dirs.push(v2dir.clone());
        let mut wanted: Vec<(&str, String, String)> = Vec::new(); // (controller, file, value)
        if let Some(m) = limits.memory_max {
            wanted.push(("memory", "memory.max".into(), m.to_string()));
            wanted.push(("memory", "memory.swap.max".into(), "0".into()));
        }
        if let Some(p) = limits.pids_max {
            wanted.push(("pids", "pids.max".into(), p.to_string()));
        }
        if let Some(w) = limits.cpu_weight {
            wanted.push(("cpu", "cpu.weight".into(), w.to_string()));
        }
        for (controller, file, value) in &wanted {
            if place.v2.contains(controller) {
                let path = v2dir.join(file);
                match write_file(&path, value) {
                    Ok(()) => {}
                    // No swap accounting on this kernel: the memory limit still holds.
                    Err(_) if file == "memory.swap.max" => {}
                    Err(e) => return Err(limit_error(&path, e)),
                }
            }
        }
        let mut memory: Option<(PathBuf, bool)> = None;
        if place.v2.contains(&"memory") {
            memory = Some((v2dir.clone(), true));
        }
        for (controller, tree) in &place.v1 {
            // Memory is joined whenever it is there, for the peak use `taskd show` gives;
            // the others only for a limit.
            let needed = *controller == "memory" || wanted.iter().any(|(c, _, _)| c == controller);
            if !needed {
                continue;
            }
            let dir = tree.join(name);
            make_dir(&dir)?;
            inner.dirs.push(dir.clone());
            for (c, file, value) in &wanted {
                if c != controller {
                    continue;
                }
                let (file, value) = match file.as_str() {
                    "memory.max" => ("memory.limit_in_bytes", value.clone()),
                    "memory.swap.max" => ("memory.memsw.limit_in_bytes", limits_memsw(limits)),
                    "cpu.weight" => (
                        "cpu.shares",
                        // cpu.weight 100 is cpu.shares 1024, the defaults of each.
                        (value.parse::<u64>().unwrap_or(100) * 1024 / 100)
                            .max(2)
                            .to_string(),
                    ),
                    other => (other, value.clone()),
                };
                let path = dir.join(file);
                match write_file(&path, &value) {
                    Ok(()) => {}
                    Err(_) if file == "memory.memsw.limit_in_bytes" => {}
                    Err(e) => return Err(limit_error(&path, e)),
                }
            }
            if *controller == "memory" && memory.is_none() {
                memory = Some((dir, false));
            }
        }
        inner.files = Some(Files::open(
            &inner.dirs,
            place.has_kill,
            memory.as_ref().map(|(d, v2)| (d.as_path(), *v2)),
        )?);
        inner.memory_v2 = memory.map(|(_, v2)| v2);
        Ok(inner)
    }

    fn files(&self) -> &Files {
        self.files.as_ref().expect("a made cgroup has its files")
    }

    /// What the counters say now, since the cgroup was made (the peak: since the reset).
    fn counters(&self) -> Usage {
        let files = self.files();
        let cpu_usec = files
            .cpu_stat
            .as_ref()
            .and_then(|f| keyed_in(f, "usage_usec"));
        let memory_peak = files.peak.as_ref().and_then(number_in);
        let oom_kills = files
            .events
            .as_ref()
            .and_then(|f| keyed_in(f, "oom_kill"))
            .unwrap_or(0);
        Usage {
            cpu_usec,
            memory_peak,
            oom_kills,
        }
    }

    /// The current task's use: the counters less what they said at its start.
    fn usage(&self) -> Usage {
        self.since_base(self.counters())
    }

    fn since_base(&self, now: Usage) -> Usage {
        Usage {
            cpu_usec: now.cpu_usec.map(|c| c.saturating_sub(self.base.cpu_usec)),
            memory_peak: now.memory_peak,
            oom_kills: now.oom_kills.saturating_sub(self.base.oom_kills),
        }
    }

    /// Whether no process is left in the cgroup (in v2, which every member joined first):
    /// its open `cgroup.procs` reads nothing (a read that fails: the cgroup is gone).
    fn is_empty(&self) -> bool {
        let mut buf = [0u8; 16];
        read_start(&self.files().procs, &mut buf).is_none_or(str::is_empty)
    }

    /// SIGKILL to every process of the cgroup: `cgroup.kill`, or each member in turn.
    fn kill(&self) {
        if let Some(f) = &self.files().kill {
            if write_at(f, b"1").is_ok() {
                self.killed.store(true, Ordering::Relaxed);
                return;
            }
        }
        kill_dir(&self.dirs[0], false);
    }

    /// After a task: its use, and the cgroup made ready for the family's next task (the
    /// counters noted, the peak reset) and given back, when nothing of the task is left in
    /// it (`empty`, just checked). Otherwise, or when the peak cannot be reset (cgroup v2
    /// before Linux 6.12), it is removed as a cgroup that is not kept would be.
    fn recycle(mut self, empty: bool) -> Usage {
        let now = self.counters();
        let usage = self.since_base(now);
        if !empty {
            return usage;
        }
        self.base.cpu_usec = now.cpu_usec.unwrap_or(0);
        self.base.oom_kills = now.oom_kills;
        let reset = match (self.memory_v2, &self.files().peak) {
            (None, _) => Ok(()),
            (Some(_), None) => Err(io::Error::from(io::ErrorKind::NotFound)),
            (Some(true), Some(f)) => write_at(f, b"reset"),
            (Some(false), Some(f)) => write_at(f, b"0"),
        };
        if let Err(e) = reset {
            tracing::debug!(error = %e, "cannot reset a cgroup's peak memory: not reused");
            return usage;
        }
        match self.slot.as_ref().and_then(|s| s.place.upgrade()) {
            Some(place) => place.keep(self),
            None => drop(self),
        }
        usage
    }

    /// Waits up to `within` for the killed processes to leave the cgroup.
    fn wait_empty(&self, within: Duration) -> bool {
        let until = std::time::Instant::now() + within;
        let mut delay = Duration::from_micros(200);
        loop {
            if self.is_empty() {
                return true;
            }
            if std::time::Instant::now() >= until {
                return false;
            }
            super::procs::reap_orphans();
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }
}

impl Cgroup {
    /// Creates the cgroup `spec.name` with its limits, or takes a kept one of the family
    /// `spec.name` ([`CgroupSpec::kept`]). An error is taskd's or the machine's (the caller
    /// fails the start with it).
    pub fn create(spec: &CgroupSpec) -> io::Result<Cgroup> {
        let inner = if spec.kept {
            spec.place.take_kept(spec)?
        } else {
            Inner::make(&spec.place, &spec.name, &spec.limits, None)?
        };
        Ok(Cgroup(Arc::new(inner)))
    }

    /// What a child needs to start in the cgroup (see [`Join`]).
    pub(crate) fn join(&self) -> Join {
        let files = self.0.files();
        Join {
            dir: if self.0.killed.load(Ordering::Relaxed) {
                -1
            } else {
                files.dir.as_raw_fd()
            },
            procs: files.procs.as_raw_fd(),
            v1_tasks: files.v1_tasks.iter().map(|f| f.as_raw_fd()).collect(),
        }
    }

    /// Moves the running process `pid` into the cgroup (each of its directories): for a
    /// worker the daemon did not spawn itself (forked by its queue's worker parent), before
    /// it gets its first task.
    pub(crate) fn adopt(&self, pid: i32) -> io::Result<()> {
        for dir in &self.0.dirs {
            write_file(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// SIGKILL to every process of the cgroup, now.
    pub fn kill(&self) {
        self.0.kill();
    }

    /// Kills what is left in the cgroup and reads its counters; then a kept cgroup goes
    /// back to its family once it is empty, and any other is removed.
    pub async fn finish(self) -> Usage {
        let inner = match Arc::try_unwrap(self.0) {
            Ok(inner) => inner,
            Err(shared) => {
                shared.kill();
                // Still held elsewhere: read now, removed by the last clone's drop.
                let usage = shared.usage();
                let _ = tokio::task::spawn_blocking(move || drop(shared)).await;
                return usage;
            }
        };
        if inner.slot.is_some() {
            // The usual case: nothing is left (the leader was reaped and its children
            // ended with it): nothing to kill, and it is given back here, at once. Nothing
            // can enter an empty cgroup but by a write to its `cgroup.procs`.
            if inner.is_empty() {
                return inner.recycle(true);
            }
            inner.kill();
            // Killed processes still leaving: waited for off the runtime's threads. The
            // family's next task never gets a cgroup that still holds one.
            return tokio::task::spawn_blocking(move || {
                let empty = inner.wait_empty(Duration::from_secs(2));
                inner.recycle(empty)
            })
            .await
            .unwrap_or_default();
        }
        inner.kill();
        let usage = inner.usage();
        if inner
            .dirs
            .iter()
            .rev()
            .all(|d| std::fs::remove_dir(d).is_ok())
        {
            inner.removed.store(true, Ordering::Relaxed);
            return usage;
        }
        // Removed by the drop: waiting for killed processes to go blocks, so it runs off
        // the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || drop(inner)).await;
        usage
    }
}

fn limits_memsw(limits: &CgroupLimits) -> String {
    limits.memory_max.unwrap_or(u64::MAX).to_string()
}

fn limit_error(path: &Path, cause: io::Error) -> io::Error {
    io::Error::new(
        cause.kind(),
        format!("could not set the task's limit {}: {cause}", path.display()),
    )
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closed first: a cgroup's open files do not keep it, but they count against the
        // daemon's descriptors.
        self.files = None;
        if *self.removed.get_mut() || self.dirs.is_empty() {
            self.give_back_number(true);
            return;
        }
        kill_dir(&self.dirs[0], self.has_kill);
        for dir in &self.dirs[1..] {
            kill_dir(dir, false);
        }
        let mut left = Vec::new();
        for dir in self.dirs.iter().rev() {
            // Fast when the processes are gone already (the usual case: the leader was
            // reaped and nothing else ran).
            if !remove_dir_waiting(dir, Duration::from_secs(2)) {
                left.push(dir.display().to_string());
            }
        }
        if !left.is_empty() {
            tracing::warn!(cgroups = %left.join(", "), "could not remove a task's cgroup; the next start of the daemon removes it");
        }
        self.give_back_number(left.is_empty());
    }
}

impl Inner {
    /// A kept cgroup removed: its number may be made again (`gone`); one that could not be
    /// removed keeps its number taken, never to be reused while its directory is there.
    fn give_back_number(&mut self, gone: bool) {
        let Some(slot) = self.slot.take() else { return };
        if !gone {
            return;
        }
        if let Some(place) = slot.place.upgrade() {
            if let Some(family) = place.families().get_mut(&slot.family) {
                family.taken.remove(&slot.n);
            }
        }
    }
}
