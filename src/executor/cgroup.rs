//! Containment: a cgroup per task (and per long-lived worker), so that stopping a task ends
//! everything it started, a grandchild that called `setsid` or double-forked included.
//!
//! Where the machine allows it (see docs/architecture.md, "Containment"):
//! - **Tracking and kill** go through a writable cgroup v2 hierarchy: taskd's subtree
//!   `taskd-<key>` (the key names the daemon's state directory) under `cgroup_root`, or
//!   under the daemon's own v2 cgroup (under systemd with `Delegate=yes`, its delegated
//!   service cgroup). Each task's leader moves itself into its own cgroup before `execve`
//!   (it writes `0` to the `cgroup.procs` the daemon opened), so nothing it starts can be
//!   outside; the whole cgroup is ended with `cgroup.kill` (or, on kernels before 5.14, by
//!   SIGKILLing its members until it is empty), then removed.
//! - **Limits** (`memory_max`, `pids_max`, `cpu_weight`) go through the v2 controllers where
//!   they are enabled, and otherwise through the v1 `memory`, `pids` and `cpu` hierarchies
//!   (a hybrid machine), in a cgroup of the same name under the daemon's own v1 cgroup.
//! - Nothing writable: [`detect`] says why, and the daemon keeps process groups.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// A name unique among the cgroups alive in the subtree (`task-<id>`, `worker-…`).
    pub name: String,
    pub limits: CgroupLimits,
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
    Ok(Containment {
        tree,
        has_kill,
        v2,
        v1,
        serial: AtomicU64::new(0),
    })
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
            "a cgroup per task under {} (stopped with {kill}; limits: {limits})",
            self.tree.display()
        )
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

    /// At a clean exit: removes the subtree (it is empty once every task and worker ended).
    pub fn close(&self) {
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
/// it and removes it.
#[derive(Clone, Debug)]
pub struct Cgroup(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// The v2 directory first, then the v1 ones.
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each, open for the child to write `0` to before `execve`; closed
    /// once the child is started ([`Cgroup::started`]).
    procs: std::sync::Mutex<Vec<OwnedFd>>,
    has_kill: bool,
    /// Where memory is counted: (directory, v2?).
    memory: Option<(PathBuf, bool)>,
    /// Removed already ([`Cgroup::finish`]): nothing left for the drop.
    removed: std::sync::atomic::AtomicBool,
}

impl Cgroup {
    /// Creates the cgroup `spec.name` with its limits. An error is taskd's or the machine's
    /// (the caller fails the start with it).
    pub fn create(spec: &CgroupSpec) -> io::Result<Cgroup> {
        let place = &spec.place;
        let limits = &spec.limits;
        let v2dir = place.tree.join(&spec.name);
        make_dir(&v2dir)?;
        let mut inner = Inner {
            dirs: vec![v2dir.clone()],
            procs: std::sync::Mutex::new(Vec::new()),
            has_kill: place.has_kill,
            memory: None,
            removed: std::sync::atomic::AtomicBool::new(false),
        };
        // From here on a failure removes what was made (Inner's drop).
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
        if place.v2.contains(&"memory") {
            inner.memory = Some((v2dir.clone(), true));
        }
        for (controller, tree) in &place.v1 {
            // Memory is joined whenever it is there, for the peak use `taskd show` gives;
            // the others only for a limit.
            let needed = *controller == "memory" || wanted.iter().any(|(c, _, _)| c == controller);
            if !needed {
                continue;
            }
            let dir = tree.join(&spec.name);
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
            if *controller == "memory" && inner.memory.is_none() {
                inner.memory = Some((dir, false));
            }
        }
        Ok(Cgroup(Arc::new(inner)))
    }

    /// Opens the `cgroup.procs` files the child writes to, for one start. A start that
    /// cannot happen now closes them ([`Cgroup::started`]) before it waits: a task waiting
    /// for descriptors must not hold any.
    pub(crate) fn open_procs(&self) -> io::Result<()> {
        let mut procs = self.procs();
        if !procs.is_empty() {
            return Ok(());
        }
        for dir in &self.0.dirs {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(dir.join("cgroup.procs"));
            match f {
                Ok(f) => procs.push(OwnedFd::from(f)),
                Err(e) => {
                    procs.clear();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` descriptors the child writes `0` to before `execve`. Valid until
    /// [`Cgroup::started`].
    pub(crate) fn procs_fds(&self) -> Vec<RawFd> {
        self.procs().iter().map(|f| f.as_raw_fd()).collect()
    }

    fn procs(&self) -> std::sync::MutexGuard<'_, Vec<OwnedFd>> {
        self.0
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The child is started (in the cgroup), or will not be for now: the descriptors are
    /// closed, and a running or waiting task holds none of the daemon's for its cgroup.
    pub(crate) fn started(&self) {
        self.procs().clear();
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
        kill_dir(&self.0.dirs[0], self.0.has_kill);
    }

    /// What the counters say now.
    pub fn usage(&self) -> Usage {
        let v2 = &self.0.dirs[0];
        let cpu_usec = read_keyed(&v2.join("cpu.stat"), "usage_usec");
        let (memory_peak, oom_kills) = match &self.0.memory {
            Some((dir, true)) => (
                read_number(&dir.join("memory.peak")),
                read_keyed(&dir.join("memory.events"), "oom_kill").unwrap_or(0),
            ),
            Some((dir, false)) => (
                read_number(&dir.join("memory.max_usage_in_bytes")),
                read_keyed(&dir.join("memory.oom_control"), "oom_kill").unwrap_or(0),
            ),
            None => (None, 0),
        };
        Usage {
            cpu_usec,
            memory_peak,
            oom_kills,
        }
    }

    /// Kills what is left in the cgroup, reads its counters and removes it.
    pub async fn finish(self) -> Usage {
        self.kill();
        let usage = self.usage();
        // The usual case: nothing was left to kill (the leader was reaped and its children
        // ended with it), and the directories go at once, here.
        let removed = Arc::strong_count(&self.0) == 1
            && self
                .0
                .dirs
                .iter()
                .rev()
                .all(|d| std::fs::remove_dir(d).is_ok());
        if removed {
            self.0.removed.store(true, Ordering::Relaxed);
            return usage;
        }
        let inner = self.0.clone();
        drop(self);
        // Removed by the last clone's drop: waiting for killed processes to go blocks, so it
        // runs off the runtime's threads.
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

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`key value` lines).
fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.procs
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        if *self.removed.get_mut() {
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
    }
}
