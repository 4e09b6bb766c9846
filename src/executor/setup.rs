//! What a task's process does between fork and exec, and when it needs to do anything at all.
//!
//! Every task starts from a clean slate whatever the daemon did to itself:
//! - the open-files soft limit is [`TASK_NOFILE_SOFT`] (1024; the hard limit is kept), even
//!   when the daemon raised its own, because programs that use `select(2)` break above 1024
//!   and a task should not depend on how its daemon happened to be started;
//! - `oom_score_adj` is 0, so that a daemon protected from the OOM killer (systemd's
//!   `OOMScoreAdjust=`) does not pass that protection on to the tasks it runs.
//!
//! On top of that, a queue may ask for resource limits, a umask and another user.
//!
//! The cost: any `pre_exec` hook makes std fork the daemon instead of taking its
//! `posix_spawn` fast path, which costs throughput for short tasks. So the hook is added only
//! when it has work to do: the two resets only when the daemon's own soft open-files limit
//! differs from 1024 or its `oom_score_adj` from 0 (both read once, see [`host`]), and the
//! rest only when the queue asks for it. A daemon started with default limits runs plain
//! tasks on the fast path.
//!
//! The hook runs in the child after fork: it may only make async-signal-safe system calls.
//! Everything it needs is computed before the fork ([`ChildSetup::plan`]); the hook
//! allocates nothing and takes no lock. The nix calls it makes (`setrlimit`, `umask`,
//! `setgroups`, `setgid`, `setuid`) are each the bare system call and an errno check.

use std::io;
use std::sync::{LazyLock, RwLock};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::stat::{umask as umask_of_process, Mode};
use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};

use super::Spec;

/// RLIM_INFINITY: a limit that is not one.
pub const UNLIMITED: u64 = libc::RLIM_INFINITY;

/// The open-files soft limit a task starts with unless its queue sets `limits.nofile`.
pub const TASK_NOFILE_SOFT: u64 = 1024;

/// One resource limit for a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: Resource,
    pub soft: u64,
    pub hard: u64,
}

impl Rlimit {
    /// A limit whose soft and hard values are both `value`.
    pub fn both(resource: Resource, value: u64) -> Rlimit {
        Rlimit {
            resource,
            soft: value,
            hard: value,
        }
    }
}

/// The daemon's own process state that tasks must not inherit, read once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Host {
    /// The daemon's open-files limit (soft, hard).
    pub nofile: (u64, u64),
    /// The daemon's `oom_score_adj`; `None` where it cannot be read.
    pub oom_score_adj: Option<i32>,
    /// The daemon's effective uid and gid.
    pub euid: u32,
    pub egid: u32,
}

impl Host {
    fn read() -> Host {
        let nofile = getrlimit(Resource::RLIMIT_NOFILE)
            // Unknown: behave as if it were already what tasks get, and leave it alone.
            .unwrap_or((TASK_NOFILE_SOFT, UNLIMITED));
        let oom_score_adj = std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Host {
            nofile,
            oom_score_adj,
            euid: nix::unistd::geteuid().as_raw(),
            egid: nix::unistd::getegid().as_raw(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.euid == 0
    }

    /// What a task's open-files limit is reset to when its queue does not set one: the soft
    /// limit [`TASK_NOFILE_SOFT`] (never above the hard limit), the hard limit kept. `None`
    /// when the daemon's limit is that already.
    fn nofile_reset(&self) -> Option<Rlimit> {
        let (soft, hard) = self.nofile;
        let target = TASK_NOFILE_SOFT.min(hard);
        (soft != target).then_some(Rlimit {
            resource: Resource::RLIMIT_NOFILE,
            soft: target,
            hard,
        })
    }
}

/// The daemon's limits and `oom_score_adj`, cached: tasks must not pay a read each. Read when
/// first asked for, and again by [`refresh_host`] after the daemon changes its own limits.
pub fn host() -> Host {
    *HOST.read().unwrap_or_else(|p| p.into_inner())
}

static HOST: LazyLock<RwLock<Host>> = LazyLock::new(|| RwLock::new(Host::read()));

/// Read the daemon's limits again (call after changing them).
pub fn refresh_host() {
    *HOST.write().unwrap_or_else(|p| p.into_inner()) = Host::read();
}

/// The descriptors the daemon keeps for `tasks` task slots and itself: 64 of its own, and
/// per slot 8 for a running task (pipes, pidfd, log files) plus the files its slot's cgroup
/// keeps open ([`super::cgroup::files_per_cgroup`], known once the containment is found).
pub fn reserved_fds(tasks: usize) -> u64 {
    64 + (8 + super::cgroup::files_per_cgroup() as u64) * tasks as u64
}

/// The open-files soft limit for the daemon itself: [`reserved_fds`], and no less than
/// what tasks get. When that is [`TASK_NOFILE_SOFT`] the daemon sets its own soft limit to it, so
/// that tasks inherit the right value and keep the fast spawn path (no `pre_exec` hook);
/// only a daemon that really needs more descriptors resets them in each task.
pub fn fit_own_nofile(tasks: usize) -> std::io::Result<u64> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    let needed = reserved_fds(tasks).max(TASK_NOFILE_SOFT);
    let soft = needed.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map_err(std::io::Error::from)?;
    refresh_host();
    Ok(soft)
}

/// The name of a resource as `getrlimit(2)` spells it, for messages.
pub(crate) fn resource_name(resource: Resource) -> &'static str {
    match resource {
        Resource::RLIMIT_NOFILE => "RLIMIT_NOFILE",
        Resource::RLIMIT_NPROC => "RLIMIT_NPROC",
        Resource::RLIMIT_AS => "RLIMIT_AS",
        Resource::RLIMIT_CPU => "RLIMIT_CPU",
        Resource::RLIMIT_FSIZE => "RLIMIT_FSIZE",
        Resource::RLIMIT_CORE => "RLIMIT_CORE",
        _ => "a resource limit",
    }
}

/// Everything the child does before exec, computed before the fork.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChildSetup {
    reset_oom_score_adj: bool,
    limits: Vec<Rlimit>,
    umask: Option<Mode>,
    /// (supplementary groups, gid, uid) to switch to.
    identity: Option<(Vec<Gid>, Gid, Uid)>,
}

impl ChildSetup {
    /// What `spec` needs done in the child, given the daemon's state; `None` when nothing is
    /// (the spawn then keeps std's posix_spawn fast path).
    pub(crate) fn plan(spec: &Spec, host: &Host) -> Option<ChildSetup> {
        let mut limits = spec.limits.clone();
        let sets_nofile = limits.iter().any(|l| l.resource == Resource::RLIMIT_NOFILE);
        if !sets_nofile {
            limits.extend(host.nofile_reset());
        }
        let identity = spec
            .user
            .as_ref()
            .filter(|u| !(u.uid == host.euid && u.gid == host.egid))
            .map(|u| {
                let groups = u.groups.iter().map(|&g| Gid::from_raw(g)).collect();
                (groups, Gid::from_raw(u.gid), Uid::from_raw(u.uid))
            });
        let setup = ChildSetup {
            reset_oom_score_adj: host.oom_score_adj.is_some_and(|v| v != 0),
            limits,
            umask: spec.umask.map(|m| Mode::from_bits_truncate(m & 0o777)),
            identity,
        };
        let idle = !setup.reset_oom_score_adj
            && setup.limits.is_empty()
            && setup.umask.is_none()
            && setup.identity.is_none();
        (!idle).then_some(setup)
    }

    #[cfg(test)]
    pub(crate) fn limits(&self) -> &[Rlimit] {
        &self.limits
    }

    /// The `pre_exec` hook. In order: `oom_score_adj` and the limits while still privileged
    /// (lowering the one and raising a hard limit need it), the umask, and last the identity:
    /// setgroups → setgid → setuid (setuid last, since it gives up the right to the others).
    pub(crate) fn into_hook(self) -> impl FnMut() -> io::Result<()> + Send + Sync + 'static {
        let ChildSetup {
            reset_oom_score_adj,
            limits,
            umask,
            identity,
        } = self;
        move || {
            if reset_oom_score_adj {
                // Best effort: without CAP_SYS_RESOURCE a value below the daemon's floor is
                // refused, and that must not stop the task.
                write_oom_score_adj_zero();
            }
            for l in &limits {
                setrlimit(l.resource, l.soft, l.hard)
                    .map_err(|errno| io::Error::from_raw_os_error(errno as i32))?;
            }
            if let Some(mask) = umask {
                umask_of_process(mask);
            }
            if let Some((groups, gid, uid)) = &identity {
                setgroups(groups)?;
                setgid(*gid)?;
                setuid(*uid)?;
            }
            Ok(())
        }
    }
}

/// Writes "0" to `/proc/self/oom_score_adj` with raw system calls (async-signal-safe: no
/// allocation, no std file machinery). Failures are ignored. Raw libc rather than nix: nix's
/// `open` returns a raw descriptor that its `write` takes only through an unsafe conversion,
/// so nix would save no `unsafe` here.
fn write_oom_score_adj_zero() {
    // SAFETY: open/write/close on a static C string and a static buffer; the descriptor is
    // ours and closed before returning (and O_CLOEXEC in any case).
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            let _ = libc::write(fd, b"0\n".as_ptr().cast(), 2);
            libc::close(fd);
        }
    }
}

/// A limit a non-root daemon cannot set (a hard limit above its own), as a message; checked
/// before the fork so that the task's failure says which limit and why, not just "EPERM".
pub(crate) fn unsettable_limit(spec: &Spec, host: &Host) -> Option<String> {
    if host.is_root() {
        return None;
    }
    spec.limits.iter().find_map(|l| {
        let (_, own_hard) = getrlimit(l.resource).ok()?;
        (l.hard > own_hard).then(|| {
            let show = |v: u64| {
                if v == UNLIMITED {
                    "unlimited".to_string()
                } else {
                    v.to_string()
                }
            };
            format!(
                "cannot set {} to {}: taskd does not run as root, and cannot raise a hard limit above its own ({})",
                resource_name(l.resource),
                show(l.hard),
                show(own_hard)
            )
        })
    })
}
