//! Starting a task's leader without std's `Command`, for the common case: no identity change,
//! no limits, no umask, nothing that needs a `pre_exec` hook.
//!
//! Why: a `/bin/true` task is mostly spawn. std's posix_spawn path (through glibc) maps a
//! fresh stack for every child and unmaps it afterwards (a page fault per touched page, and a
//! TLB shoot-down across cores in a multi-threaded process), builds file actions that probe
//! the descriptor table size six times, and tokio then makes each pipe non-blocking with two
//! more system calls. Here the child runs on a stack kept for the life of the daemon, with
//! `clone(CLONE_VM | CLONE_VFORK)`: the parent thread sleeps until the child has called
//! `execve` (or failed to), exactly like `vfork`, and the child does only async-signal-safe
//! system calls on memory the parent prepared. A task with a cgroup is cloned straight into
//! its v2 cgroup where the kernel allows it (`clone3` with `CLONE_INTO_CGROUP`, Linux 5.7, on
//! x86_64): it is in it from its first instruction, and no write to `cgroup.procs` (which
//! takes the kernel's global `cgroup_threadgroup_rwsem` for writing) is needed. Elsewhere, or
//! when `clone3` is refused (`ENOSYS`, `E2BIG`, `EINVAL`: an older kernel, a seccomp filter),
//! plain `clone` and the write below, for the life of the process. The child then:
//!
//! 1. default dispositions for the signals the daemon handles or ignores (the child shares
//!    the daemon's memory until `execve`, so none of the daemon's handlers may run in it; the
//!    daemon blocks every signal around the clone, and the child resets them before it
//!    unblocks);
//! 2. its own cgroup, when the task has one (`0` written to v2's `cgroup.procs` unless it was
//!    born there, then to each v1 `tasks` the cgroup holds open: see `cgroup.rs`), and its
//!    own process group (`setpgid(0, 0)`);
//! 3. stdin, stdout and stderr from the prepared descriptors (everything else the daemon
//!    holds is close-on-exec);
//! 4. the working directory;
//! 5. an empty signal mask, then `execve` of each candidate path in turn (the `PATH` search
//!    was done by the parent, as `execvp` would do it with the task's own `PATH`).
//!
//! A failure before or at `execve` is written to a slot the parent reads after the clone
//! returns (shared memory), the child exits 127 and the parent reaps it: the caller gets the
//! `errno`, exactly as from `Command::spawn`.
//!
//! The leader is reaped with `waitpid(pid)`, never `waitpid(-1)`. The caller first waits for
//! its pipes to close (for most tasks that is the leader exiting), then tries a non-blocking
//! `waitpid`; only a leader still running then (or one that closed its pipes early, or left a
//! background process holding them) is watched through a pidfd, readable when it exits.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::{Mutex, OnceLock, PoisonError};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

use super::cgroup::Join;
use super::procs::{spawn_registered, TrackedChild};

/// The child's stack. It needs a few hundred bytes (a handful of libc calls); 64 KiB leaves
/// room for whatever glibc's wrappers do. Kept for the life of the process, so its pages are
/// touched once.
const STACK_SIZE: usize = 64 * 1024;

/// Signals whose disposition the child resets to the default before it unblocks signals:
/// those the daemon installs handlers for (tokio's signal driver, reload, log reopening), and
/// SIGPIPE, which Rust programs ignore (std's spawn resets it too).
const RESET_SIGNALS: &[libc::c_int] = &[
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGPIPE,
    libc::SIGALRM,
    libc::SIGTERM,
    libc::SIGCHLD,
    libc::SIGWINCH,
];

/// Where the task's stdin comes from.
pub(crate) enum Stdin {
    /// `/dev/null`.
    Null,
    /// This descriptor (a pipe already holding the payload, its write end closed).
    Fd(OwnedFd),
    /// A pipe the caller writes to ([`Child::stdin`]).
    Piped,
}

/// A running leader started by [`spawn`].
pub(crate) struct Child {
    pid: i32,
    /// Opened on the first [`Child::wait`] that finds the leader still running: most tasks
    /// have exited by the time their pipes report EOF, and are reaped without one.
    pidfd: Option<AsyncFd<OwnedFd>>,
    pub(crate) stdin: Option<pipe::Sender>,
    pub(crate) stdout: Option<pipe::Receiver>,
    pub(crate) stderr: Option<pipe::Receiver>,
}

impl Child {
    /// Reaps the leader if it has exited.
    fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        try_reap(self.pid)
    }

    /// Waits for the leader to exit and reaps it.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        if self.pidfd.is_none() {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            // Still running (and unreaped, so the pid is still ours): watch it.
            let fd = match pidfd_open(self.pid) {
                Ok(fd) => fd,
                // The daemon is out of descriptors for now: look every few ms instead, rather
                // than lose the task's exit status.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    loop {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        if let Some(status) = self.try_wait()? {
                            return Ok(status);
                        }
                    }
                }
                Err(e) => return Err(e),
            };
            // SAFETY: the AsyncFd owns the pidfd, which nothing else closes or replaces.
            self.pidfd = Some(unsafe {
                AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)?
            });
        }
        let pid = self.pid;
        let pidfd = self.pidfd.as_ref().expect("opened above");
        loop {
            let mut guard = pidfd.readable().await?;
            if let Some(status) = try_reap(pid)? {
                return Ok(status);
            }
            guard.clear_ready();
        }
    }
}

/// Reaps `pid` if it has exited.
fn try_reap(pid: i32) -> io::Result<Option<ExitStatus>> {
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            // The raw status std's ExitStatus is made of (see wait(2)).
            Ok(WaitStatus::Exited(_, code)) => {
                return Ok(Some(ExitStatus::from_raw((code & 0xff) << 8)))
            }
            Ok(WaitStatus::Signaled(_, sig, core)) => {
                let core = if core { 0x80 } else { 0 };
                return Ok(Some(ExitStatus::from_raw(sig as i32 | core)));
            }
            // Still running (stops and continues are not asked for).
            Ok(_) => return Ok(None),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether this kernel gives pidfds (Linux 5.3); without them [`spawn`] is not used.
pub(crate) fn supported() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| pidfd_open(std::process::id() as i32).is_ok())
}

/// `pidfd_open(2)`, which nix does not wrap.
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call; the descriptor it returns is ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned by nobody else. pidfds are close-on-exec.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A pipe whose both ends are close-on-exec; the end the daemon keeps is also non-blocking.
fn pipe_pair(daemon_reads: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let ours = if daemon_reads { &read } else { &write };
    let flags = if daemon_reads {
        OFlag::O_RDONLY
    } else {
        OFlag::O_WRONLY
    };
    // A fresh pipe end has exactly these flags (O_CLOEXEC lives in the descriptor flags, not
    // these), so no F_GETFL is needed.
    fcntl(
        ours.as_raw_fd(),
        FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
    )?;
    Ok((read, write))
}

/// `/dev/null`, opened once and shared by every task's stdin (a read of it never moves).
fn dev_null() -> io::Result<RawFd> {
    static NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    let file = std::fs::File::open("/dev/null")?; // close-on-exec, as std opens everything
    Ok(NULL.get_or_init(|| OwnedFd::from(file)).as_raw_fd())
}

fn cstring(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// The paths `execvp` would try for `program` with `path` as `PATH`: the program itself if it
/// names a file (has a `/`), else each directory of `path` joined with it (an empty entry is
/// the working directory).
fn candidates(program: &str, path: Option<&str>) -> io::Result<Vec<CString>> {
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if program.contains('/') {
        return Ok(vec![cstring(program.as_bytes(), "the program name")?]);
    }
    let path = path.unwrap_or("/bin:/usr/bin");
    path.split(':')
        .map(|dir| {
            let full = if dir.is_empty() {
                program.to_string()
            } else {
                format!("{}/{program}", dir.trim_end_matches('/'))
            };
            cstring(full.as_bytes(), "the program name")
        })
        .collect()
}

/// Everything the child reads; prepared by the parent, which is asleep while the child runs.
struct ChildArgs {
    paths: Vec<*const libc::c_char>,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    /// Descriptors for 0, 1, 2.
    fds: [RawFd; 3],
    /// Cgroup files the child writes `0` to first (its own cgroup per hierarchy).
    cgroup_joins: *const RawFd,
    cgroup_joins_len: usize,
    /// Written by the child when it fails: the errno, or 0.
    errno: libc::c_int,
}

/// The child. Only async-signal-safe libc calls, on memory the parent owns; never returns
/// unless it failed (returning ends the child; the parent reaps it). Raw libc, not nix: the
/// child shares the daemon's memory and runs on a borrowed stack until `execve`, so it reads
/// `errno` and calls the bare functions, with nothing that could allocate or unwind.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive and untouched until the parent wakes
    // (CLONE_VFORK), which happens only at our execve or exit.
    unsafe {
        let a = &mut *(arg as *mut ChildArgs);
        let fail = |a: &mut ChildArgs| -> libc::c_int {
            a.errno = *libc::__errno_location();
            if a.errno == 0 {
                a.errno = libc::EIO;
            }
            127
        };
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for &sig in RESET_SIGNALS {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        // Into the task's cgroup before anything else: whatever it starts is born there.
        for i in 0..a.cgroup_joins_len {
            let fd = *a.cgroup_joins.add(i);
            if libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1) != 1 {
                return fail(a);
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(a);
        }
        for (target, &fd) in a.fds.iter().enumerate() {
            let target = target as RawFd;
            if fd == target {
                // Already in place (the daemon had that descriptor closed): keep it across
                // exec by clearing close-on-exec, which dup2 would otherwise do.
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return fail(a);
                }
            } else if libc::dup2(fd, target) < 0 {
                return fail(a);
            }
        }
        if !a.cwd.is_null() && libc::chdir(a.cwd) != 0 {
            return fail(a);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // As execvp: a candidate that is not there is skipped; one that is there but may not
        // be run is remembered (EACCES wins over a later ENOENT); anything else stops.
        let mut denied = false;
        for &path in &a.paths {
            libc::execve(path, a.argv, a.envp);
            match *libc::__errno_location() {
                libc::ENOENT | libc::ENOTDIR | libc::ENAMETOOLONG | libc::ELOOP => {}
                libc::EACCES => denied = true,
                _ => return fail(a),
            }
        }
        if denied {
            *libc::__errno_location() = libc::EACCES;
        }
        fail(a)
    }
}

/// The child's stack, reused by every spawn (one at a time: the lock is held across the
/// clone, and the child is done with the stack when the clone returns).
fn with_stack<T>(body: impl FnOnce(*mut libc::c_void) -> T) -> T {
    static STACK: Mutex<Option<Box<[u128]>>> = Mutex::new(None);
    let mut guard = STACK.lock().unwrap_or_else(PoisonError::into_inner);
    let stack = guard.get_or_insert_with(|| vec![0u128; STACK_SIZE / 16].into_boxed_slice());
    // The stack grows down: hand clone its top (16-byte aligned: the slice is of u128).
    let top = stack.as_mut_ptr_range().end as *mut libc::c_void;
    body(top)
}

/// Starts `argv` with exactly `env` in its own process group, in `cwd`, with stdout and
/// stderr to pipes the caller reads. The leader is registered (see
/// [`spawn_tracked`](super::spawn_tracked)) before anything could reap it.
pub(crate) fn spawn(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&Path>,
    stdin: Stdin,
    cgroup: Option<&Join>,
) -> io::Result<(Child, TrackedChild)> {
    let program = argv
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    let task_path = env.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v);
    let inherited;
    let path = match task_path {
        Some(p) => Some(p.as_str()),
        None => {
            inherited = std::env::var("PATH").ok();
            inherited.as_deref()
        }
    };
    let paths = candidates(program, path)?;
    let argv_c = argv
        .iter()
        .map(|a| cstring(a.as_bytes(), "an argument"))
        .collect::<io::Result<Vec<_>>>()?;
    let env_c = env
        .iter()
        .map(|(k, v)| {
            let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
            kv.extend_from_slice(k.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstring(&kv, "an environment variable")
        })
        .collect::<io::Result<Vec<_>>>()?;
    let cwd_c = cwd
        .map(|c| cstring(OsStr::as_bytes(c.as_os_str()), "the working directory"))
        .transpose()?;
    let mut argv_p: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    env_p.push(std::ptr::null());

    let (out_r, out_w) = pipe_pair(true)?;
    let (err_r, err_w) = pipe_pair(true)?;
    let (stdin_fd, stdin_keep, stdin_ours) = match stdin {
        Stdin::Null => (dev_null()?, None, None),
        Stdin::Fd(fd) => (fd.as_raw_fd(), Some(fd), None),
        Stdin::Piped => {
            let (r, w) = pipe_pair(false)?;
            (r.as_raw_fd(), Some(r), Some(w))
        }
    };

    // Born in the v2 cgroup where clone3 can do it: then only the v1 files are written.
    let mut into = cgroup
        .filter(|c| c.dir >= 0 && clone3::usable())
        .map(|c| c.dir);
    let mut joins: Vec<RawFd> = match (cgroup, into) {
        (None, _) => Vec::new(),
        (Some(c), Some(_)) => c.v1_tasks.clone(),
        (Some(c), None) => c.writes(),
    };
    let mut args = ChildArgs {
        paths: paths.iter().map(|c| c.as_ptr()).collect(),
        argv: argv_p.as_ptr(),
        envp: env_p.as_ptr(),
        cwd: cwd_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        fds: [stdin_fd, out_w.as_raw_fd(), err_w.as_raw_fd()],
        cgroup_joins: joins.as_ptr(),
        cgroup_joins_len: joins.len(),
        errno: 0,
    };

    let ((), tracked) = spawn_registered(|| {
        let pid = with_stack(|top| {
            // SAFETY: every signal is blocked around the clone so that no handler of the
            // daemon runs in the child before it has reset its dispositions; the previous mask
            // is restored right after. The child only reads `args` and writes `args.errno`.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                let mut old: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
                let arg = &mut args as *mut ChildArgs as *mut libc::c_void;
                let mut pid = -1;
                let mut clone_err = io::Error::from_raw_os_error(libc::ENOSYS);
                if let Some(dir) = into {
                    match clone3::into_cgroup(child_main, top, STACK_SIZE, arg, dir) {
                        Ok(p) => pid = p,
                        Err(e) if clone3::refused(&e) => {
                            // Not on this kernel: the child joins by its writes, from now on.
                            into = None;
                            if let Some(c) = cgroup {
                                joins = c.writes();
                                let a = &mut *(arg as *mut ChildArgs);
                                a.cgroup_joins = joins.as_ptr();
                                a.cgroup_joins_len = joins.len();
                            }
                        }
                        Err(e) => clone_err = e,
                    }
                }
                if pid < 0 && into.is_none() {
                    pid = libc::clone(
                        child_main,
                        top,
                        libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                        arg,
                    );
                    clone_err = io::Error::last_os_error();
                }
                libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                if pid < 0 {
                    Err(clone_err)
                } else {
                    Ok(pid)
                }
            }
        })?;
        // Read only after the clone returned: the child is past execve or gone.
        // SAFETY: `args` lives on this frame and the child, which shared our memory
        // (CLONE_VM) and wrote `errno` before execve or _exit, no longer runs on it
        // (CLONE_VFORK suspended us until then); volatile so the compiler cannot assume the
        // value it had before the clone.
        let errno = unsafe { std::ptr::read_volatile(&args.errno) };
        if errno != 0 {
            // Reaping the child that just failed; it has exited already.
            let _ = waitpid(Pid::from_raw(pid), None);
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok((pid, ()))
    })?;
    drop((out_w, err_w, stdin_keep, joins));

    let child = Child {
        pid: tracked.pid(),
        pidfd: None,
        stdin: stdin_ours
            .map(pipe::Sender::from_owned_fd_unchecked)
            .transpose()?,
        stdout: Some(pipe::Receiver::from_owned_fd_unchecked(out_r)?),
        stderr: Some(pipe::Receiver::from_owned_fd_unchecked(err_r)?),
    };
    Ok((child, tracked))
}

/// `clone3(2)` with `CLONE_INTO_CGROUP`, for the vfork-like start above.
mod clone3 {
    use std::io;
    use std::os::fd::RawFd;
    use std::sync::atomic::{AtomicU8, Ordering};

    /// 0: not tried yet; 1: works here; 2: refused here (see [`refused`]).
    static STATE: AtomicU8 = AtomicU8::new(0);

    /// Whether to try `clone3` (not refused before, and an architecture this file has the
    /// entry code for).
    pub(super) fn usable() -> bool {
        cfg!(target_arch = "x86_64") && STATE.load(Ordering::Relaxed) != 2
    }

    /// Whether `err` says this kernel (or a seccomp filter) does not give `clone3` with
    /// `CLONE_INTO_CGROUP`, rather than that this start failed: `ENOSYS` (before 5.3, or
    /// filtered), `E2BIG` (5.3 to 5.6: no `cgroup` field) or `EINVAL` (an unknown flag).
    /// The first time only: once one worked, every error is the start's own.
    pub(super) fn refused(err: &io::Error) -> bool {
        let refused = STATE.load(Ordering::Relaxed) != 1
            && matches!(
                err.raw_os_error(),
                Some(libc::ENOSYS) | Some(libc::E2BIG) | Some(libc::EINVAL)
            );
        if refused {
            STATE.store(2, Ordering::Relaxed);
        }
        refused
    }

    /// `struct clone_args` (linux/sched.h), up to `cgroup` (`CLONE_ARGS_SIZE_VER2`).
    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }

    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

    /// Starts `main(arg)` as `clone(CLONE_VM | CLONE_VFORK)` would, on the stack whose top is
    /// `top` (`size` bytes, 16-byte aligned), in the v2 cgroup whose directory is `dir`.
    /// Returns the child's pid once it called `execve` or exited.
    ///
    /// # Safety
    /// As `clone(CLONE_VM | CLONE_VFORK)`: the stack is the child's alone, `main` runs on
    /// memory shared with the caller and never returns into Rust code (its return value is
    /// the child's exit status), and signals are blocked around the call.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn into_cgroup(
        main: extern "C" fn(*mut libc::c_void) -> libc::c_int,
        top: *mut libc::c_void,
        size: usize,
        arg: *mut libc::c_void,
        dir: RawFd,
    ) -> io::Result<i32> {
        let args = CloneArgs {
            flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | CLONE_INTO_CGROUP,
            pidfd: 0,
            child_tid: 0,
            parent_tid: 0,
            exit_signal: libc::SIGCHLD as u64,
            stack: (top as usize - size) as u64,
            stack_size: size as u64,
            tls: 0,
            set_tid: 0,
            set_tid_size: 0,
            cgroup: dir as u64,
        };
        let ret: i64;
        // SAFETY: the caller's contract. The parent gets the syscall's result in rax (the
        // kernel clobbers rcx and r11 only). The child starts after the `syscall` with rax 0
        // and rsp at the top of its stack (16-byte aligned, so the call below enters `main`
        // with the alignment the ABI wants), calls `main(arg)` and exits with its result
        // without ever returning here; it needs nothing but r12 and r13, which the kernel
        // copies.
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "xor ebp, ebp",
                "mov rdi, r12",
                "call r13",
                "mov edi, eax",
                "mov eax, {exit}",
                "syscall",
                "ud2",
                "2:",
                exit = const libc::SYS_exit,
                inlateout("rax") libc::SYS_clone3 => ret,
                in("rdi") &args as *const CloneArgs,
                in("rsi") std::mem::size_of::<CloneArgs>(),
                in("r12") arg,
                in("r13") main,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        if ret < 0 {
            return Err(io::Error::from_raw_os_error(-ret as i32));
        }
        STATE.store(1, Ordering::Relaxed);
        Ok(ret as i32)
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn into_cgroup(
        _main: extern "C" fn(*mut libc::c_void) -> libc::c_int,
        _top: *mut libc::c_void,
        _size: usize,
        _arg: *mut libc::c_void,
        _dir: RawFd,
    ) -> io::Result<i32> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
}
