//! The executor: runs ONE attempt of one task as its own process group and reports an
//! [`Outcome`].
//!
//! What it owns:
//! - spawning the program (argv executed directly, never through a shell) with exactly the
//!   given environment, cwd, stdin payload and, optionally, another user's identity, a umask
//!   and resource limits; every task gets the open-files soft limit 1024 and
//!   `oom_score_adj` 0 whatever the daemon's own are (see `setup.rs` for when that costs a
//!   `pre_exec` hook and when it does not);
//! - no descriptor of the daemon reaches a task: everything this module opens (pipes, log
//!   files, /dev/null) is close-on-exec, and the daemon marks what it inherited at start-up
//!   ([`mark_inherited_fds_cloexec`]);
//! - the pipes: a bounded tail of stdout and stderr (memory O(`tail_bytes`) however much the
//!   child writes) and optional capped full-output log files;
//! - the timeout, operator cancel and daemon shutdown, all handled the same way: SIGTERM to the
//!   whole group → `kill_grace` → SIGKILL to the group;
//! - making sure nothing of the task's group survives it: after the leader exits the group is
//!   SIGKILLed once more, and pipes held open by a background grandchild are waited for only
//!   briefly;
//! - the process plumbing around that: the registry of live leaders, reaping adopted orphans
//!   by pid, killing orphaned groups after a crash, subreaper and close-on-exec set-up.
//!
//! What it must not do:
//! - know brokers, queues, configs or retries: it never imports `crate::broker` or
//!   `crate::config`; the supervisor turns an [`Outcome`] into task state;
//! - treat a failing task as an error: exit codes, signals, timeouts and programs that cannot
//!   start are all [`Status`] values. [`ExecError`] is for taskd's own failures;
//! - call `waitpid(-1)` (it would steal tokio's exit statuses) or sleep/poll on the normal
//!   path: a `/bin/true` task costs one spawn, a few pipe reads and one `killpg`.

pub mod cgroup;
mod escalation;
pub mod live;
pub(crate) mod output;
mod procs;
mod result;
mod setup;
mod spawn;
mod user;

#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Doubling;
use crate::model::{now_ms, UnixMs};

use output::{feed, pump, Capture, LogFile};
pub use procs::{
    become_subreaper, kill_orphan_group, kill_task_processes, mark_inherited_fds_cloexec,
    reap_orphans, spawn_tracked, task_ids_with_processes, track, TrackedChild,
};
use result::ResultFile;
pub use result::{ResultDir, ResultSpec, Returned};
pub use setup::{fit_own_nofile, host, reserved_fds, Rlimit, UNLIMITED};
pub use user::UserSpec;

pub use escalation::{sleep_until_opt, Escalation, StopWhy};
use setup::ChildSetup;

/// How long a task started by `spawn.rs` may keep its pipes open before the daemon starts
/// watching its leader through a pidfd rather than by its pipes closing.
const WAIT_ARM_DELAY: Duration = Duration::from_millis(20);
/// How long pipes may stay open after the leader exited before the group is killed.
const PIPE_LINGER: Duration = Duration::from_millis(200);
/// How long to keep reading after that kill. Only a holder that escaped the group (setsid)
/// keeps a pipe open past it; we then stop reading rather than wait for it.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(1);

/// taskd's own failures in this module (a failing task is a [`Status`], not this).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("unknown user `{0}`")]
    UnknownUser(String),
    #[error("unknown group `{0}`")]
    UnknownGroup(String),
    #[error("failed to look up {what}: {source}")]
    Lookup {
        what: String,
        #[source]
        source: nix::Error,
    },
}

/// One attempt to run. `Default` is there for `..Default::default()`: an empty argv and a
/// zero timeout run nothing useful.
#[derive(Clone, Debug, Default)]
pub struct Spec {
    /// `argv[0]` is the program, executed directly. Shell queues pass `["/bin/sh", "-c", script]`.
    pub argv: Vec<String>,
    /// The child's whole environment: nothing of the daemon's is inherited.
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// Written to the child's stdin, which is then closed. Empty: stdin is `/dev/null`.
    pub stdin: Vec<u8>,
    /// Counted from the spawn.
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Keep the last `tail_bytes` of stdout and, separately, of stderr (0 keeps nothing).
    pub tail_bytes: usize,
    /// Also emit each line of output as a log event (target `taskd::output`), inside the
    /// caller's tracing span, so the daemon's log shows it tagged with the task.
    pub log_lines: bool,
    pub log: Option<LogSpec>,
    pub user: Option<UserSpec>,
    /// The task's umask; `None` keeps the daemon's.
    pub umask: Option<u32>,
    /// Resource limits to set before exec. Without an `RLIMIT_NOFILE` entry, the open-files
    /// soft limit is reset to [`TASK_NOFILE_SOFT`].
    pub limits: Vec<Rlimit>,
    /// Give the task a result file (`TASKD_RESULT_FILE`, see `result.rs`), read once it
    /// exited 0 ([`Outcome::returned`]); `None` gives it none.
    pub result: Option<ResultSpec>,
    /// The attempt's live ring: its output is pushed there too, for followers.
    pub live: Option<std::sync::Arc<live::LiveOutput>>,
    /// The cgroup the task runs in (`None`: its process group alone contains it).
    pub cgroup: Option<cgroup::CgroupSpec>,
}

/// Full-output files: the attempt's output is appended up to `max_bytes` per file, then one
/// line `[taskd: output truncated at N bytes]`, then nothing (the pipe is still drained).
#[derive(Clone, Debug)]
pub struct LogSpec {
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    pub max_bytes: u64,
}

/// Why a running task should stop early.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    /// An operator cancelled the task.
    pub cancel: CancellationToken,
    /// The daemon is stopping.
    pub shutdown: CancellationToken,
    /// The daemon is stopping *now* (a second signal): SIGKILL the group without a grace.
    /// Counts as a shutdown.
    pub kill: CancellationToken,
}

/// Sent once the leader exists, for the record that lets crash recovery find its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spawned {
    /// The leader's pid, which is also the group's id.
    pub pid: i32,
}

impl Spawned {
    /// Field 22 of `/proc/PID/stat` (clock ticks since boot), which tells this process from a
    /// later one with the same pid; 0 if it could not be read (the leader already exited).
    /// Read on demand: most tasks end before anyone asks.
    pub fn start_time(&self) -> u64 {
        procs::read_stat(self.pid).map_or(0, |st| st.start_time)
    }
}

/// How an attempt ended, whether it ran as a process of its own or on a long-lived worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    /// Died by a signal taskd did not send.
    Signaled(i32),
    /// Ran past its timeout; `killed_with` is the last signal taskd sent before the leader
    /// ended (SIGTERM or SIGKILL).
    TimedOut {
        killed_with: i32,
    },
    /// Stopped because [`Stop::cancel`] fired.
    Cancelled,
    /// Stopped because [`Stop::shutdown`] fired.
    Interrupted,
    /// Never ran.
    SpawnFailed {
        kind: SpawnFailure,
        message: String,
    },
    /// A long-lived worker answered for the task.
    Answered {
        verdict: Verdict,
        message: Option<String>,
    },
    /// The long-lived worker died (or closed its result pipe) before answering.
    Crashed {
        how: String,
        signal: Option<i32>,
    },
    /// The long-lived worker wrote something that is not a valid message for this task.
    Protocol {
        line: String,
        why: String,
    },
    /// No long-lived worker took the task (it stopped meanwhile): nothing ran.
    Unavailable,
}

/// A long-lived worker's answer for a task (`ok`, `error`, `retry` in the protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// A failure not worth retrying.
    Error,
    /// A failure to retry under the queue's policy.
    Retry,
}

/// What ran the attempt: the words of its history say which (a worker is restarted after a
/// timeout or a cancel; a process of its own simply ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runner {
    Process,
    Worker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpawnFailure {
    NotFound,
    NotExecutable,
    BadCwd,
    Other,
}

impl Status {
    pub fn is_success(&self) -> bool {
        *self == Status::Exited(0)
    }
}

/// A signal's name for people ("SIGTERM"), falling back to "signal N".
pub fn signal_name(sig: i32) -> String {
    Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// What happened to one attempt.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub status: Status,
    /// The leader's pid; `None` if nothing was spawned.
    pub pid: Option<i32>,
    pub started_at_ms: UnixMs,
    pub ended_at_ms: UnixMs,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
    /// Everything the child wrote, counted even where it was not kept. Read by the
    /// executor's tests only (the pipes are read to their end, past what the tails keep);
    /// kept for them on purpose, as no record carries it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub stdout_total: u64,
    #[cfg_attr(not(test), allow(dead_code))]
    pub stderr_total: u64,
    /// Processes of the group outlived the leader and were killed. Like the totals, read by
    /// the executor's tests only (the daemon logs it at debug where it is found).
    #[cfg_attr(not(test), allow(dead_code))]
    pub stray_killed: bool,
    pub ran_on: Runner,
    /// What the task returned: its result file once it exited 0, or a worker's `ok`
    /// answer; [`Returned::Nothing`] otherwise.
    pub returned: Returned,
    /// The counters of the attempt's cgroup (CPU time, peak memory, OOM kills), when it
    /// ran in one of its own.
    pub usage: Option<cgroup::Usage>,
}

impl Outcome {
    /// An attempt that ran as `pid` (a task's leader or a long-lived worker) from
    /// `started_at_ms` until now, with what its two streams captured; nothing returned and
    /// no stray killed until the caller says so.
    pub(crate) fn ran(
        ran_on: Runner,
        status: Status,
        pid: i32,
        started_at_ms: UnixMs,
        out: Capture,
        err: Capture,
    ) -> Outcome {
        Outcome {
            status,
            pid: Some(pid),
            started_at_ms,
            ended_at_ms: now_ms(),
            stdout_total: out.total,
            stderr_total: err.total,
            stdout_tail: out.tail.into_vec(),
            stderr_tail: err.tail.into_vec(),
            stray_killed: false,
            ran_on,
            returned: Returned::Nothing,
            usage: None,
        }
    }

    /// An attempt that ended before anything ran.
    pub fn not_started(status: Status, at: UnixMs) -> Outcome {
        Outcome {
            ran_on: Runner::Process,
            status,
            pid: None,
            started_at_ms: at,
            ended_at_ms: at,
            stdout_tail: Vec::new(),
            stderr_tail: Vec::new(),
            stdout_total: 0,
            stderr_total: 0,
            stray_killed: false,
            returned: Returned::Nothing,
            usage: None,
        }
    }
}

/// The spawned group, for as long as `run` owns it.
struct Leader {
    pgid: i32,
    /// The task's cgroup: dropped with the leader, it kills what is left in it and is removed.
    cgroup: Option<cgroup::Cgroup>,
    /// Registered until tokio has reaped the leader.
    tracked: Option<TrackedChild>,
    /// Until the final SIGKILL after the leader's exit has been sent.
    armed: bool,
}

impl Drop for Leader {
    fn drop(&mut self) {
        // `run` was dropped mid-task (its caller gave up on it): do not leave the group
        // running. If the leader was not reaped yet, tokio's orphan queue reaps it.
        if self.armed {
            procs::signal_group(self.pgid, Signal::SIGKILL);
        }
    }
}

/// Runs one attempt of one task and reports how it ended.
///
/// Never fails: a task that cannot start, fails, times out or is stopped is an [`Outcome`].
/// `spawned` receives the leader's pid and start time as soon as it exists.
///
/// The leader is registered (see [`spawn_tracked`]) until it has been reaped, so that
/// [`reap_orphans`] leaves it to tokio. If this future is dropped before it completes, the
/// task's group is SIGKILLed.
pub async fn run(mut spec: Spec, stop: Stop, spawned: Option<oneshot::Sender<Spawned>>) -> Outcome {
    let started_at_ms = now_ms();
    if stop.cancel.is_cancelled() {
        return Outcome::not_started(Status::Cancelled, started_at_ms);
    }
    if stop.shutdown.is_cancelled() {
        return Outcome::not_started(Status::Interrupted, started_at_ms);
    }
    if let Some(status) = preflight(&spec) {
        return Outcome::not_started(status, started_at_ms);
    }
    // Removed when this function returns or is dropped, whatever happens in between.
    let result_file = match &spec.result {
        None => None,
        Some(r) => match create_result_file(r, &spec, &stop).await {
            Ok(f) => {
                spec.env.push((
                    "TASKD_RESULT_FILE".into(),
                    f.path().to_string_lossy().into_owned(),
                ));
                Some(f)
            }
            Err(Err(status)) => return Outcome::not_started(status, started_at_ms),
            Err(Ok(e)) => {
                let message = format!(
                    "could not create the task's result file in {}: {e}",
                    r.dir.root().display()
                );
                return Outcome::not_started(
                    Status::SpawnFailed {
                        kind: SpawnFailure::Other,
                        message,
                    },
                    started_at_ms,
                );
            }
        },
    };

    let (stdout_log, stderr_log) = match &spec.log {
        Some(log) => (
            open_log(&log.stdout_path, log.max_bytes),
            open_log(&log.stderr_path, log.max_bytes),
        ),
        None => (None, None),
    };

    let (mut child, tracked, cgroup) = match start_when_descriptors_allow(&spec, &stop).await {
        Ok(started) => started,
        Err(status) => return Outcome::not_started(status, started_at_ms),
    };
    let pid = tracked.pid();
    let mut leader = Leader {
        pgid: pid,
        cgroup,
        tracked: Some(tracked),
        armed: true,
    };
    let deadline = Instant::now().checked_add(spec.timeout);

    if let Some(tx) = spawned {
        // The receiver may have lost interest; the task runs anyway.
        let _ = tx.send(Spawned { pid });
    }

    let mut out = Capture::new(spec.tail_bytes, stdout_log);
    let mut err = Capture::new(spec.tail_bytes, stderr_log);
    if spec.log_lines {
        out.lines = Some(output::Lines::new("stdout"));
        err.lines = Some(output::Lines::new("stderr"));
    }
    out.follow(spec.live.as_ref(), live::Stream::Stdout);
    err.follow(spec.live.as_ref(), live::Stream::Stderr);
    let mut esc = Escalation::new(pid).with_cgroup(leader.cgroup.clone());

    let (waited, stray_killed) = {
        let (stdin, stdout, stderr) = child.take_pipes();
        let pumps = async {
            tokio::join!(pump(stdout, &mut out), pump(stderr, &mut err));
        };
        tokio::pin!(pumps);
        let stdin = feed(stdin, &spec.stdin);
        tokio::pin!(stdin);
        let (mut pumps_done, mut stdin_done) = (false, false);
        // A leader started without std's Command is waited for once its pipes close (most
        // tasks: it exited), or after WAIT_ARM_DELAY (a task that closed them early, or left a
        // background process holding them); see spawn.rs.
        let mut wait_armed = child.waits_from_the_start();
        let arm_at = Instant::now() + WAIT_ARM_DELAY;

        let waited = loop {
            tokio::select! {
                // A leader that has already exited wins over a stop that arrives at once.
                biased;
                res = child.wait(), if wait_armed => break res,
                _ = &mut pumps, if !pumps_done => {
                    pumps_done = true;
                    wait_armed = true;
                }
                _ = tokio::time::sleep_until(arm_at), if !wait_armed => wait_armed = true,
                _ = &mut stdin, if !stdin_done => stdin_done = true,
                _ = esc.step(&stop, deadline, spec.kill_grace) => {}
            }
        };
        // Either tokio reaped the leader, or it never will (someone else did): in both cases
        // the pid is no longer ours to guard.
        leader.tracked = None;

        // The leader is gone; its pipes normally are too. A background member may still hold
        // them: give it a moment, then kill the group and take what is buffered.
        let stray_killed = if !pumps_done
            && tokio::time::timeout(PIPE_LINGER, &mut pumps).await.is_err()
        {
            let killed = procs::signal_group(pid, Signal::SIGKILL);
            if let Some(cg) = &leader.cgroup {
                cg.kill();
            }
            if tokio::time::timeout(DRAIN_AFTER_KILL, &mut pumps)
                .await
                .is_err()
            {
                tracing::warn!(pid, "task output pipes stay open after its process group was killed (a process left the group); not reading them any more");
            }
            killed
        } else {
            // Nothing of the group may survive the task, whether or not it holds a pipe.
            // (Sent after the leader was reaped: a group id is not handed out again while the
            // group has members; an empty group gives a harmless ESRCH, and its id could only
            // name someone else's group after the pid space wrapped around in between.)
            // The cgroup also holds what left the group (setsid, a double fork): killed
            // by its `finish` below, before anything else.
            procs::signal_group(pid, Signal::SIGKILL)
        };
        leader.armed = false;
        (waited, stray_killed)
    };

    let status = match (esc.why(), &waited) {
        (Some(StopWhy::Cancel), _) => Status::Cancelled,
        (Some(StopWhy::Shutdown), _) => Status::Interrupted,
        (Some(StopWhy::Timeout), _) => Status::TimedOut {
            killed_with: esc.last_signal().unwrap_or(Signal::SIGTERM) as i32,
        },
        (None, Ok(st)) => match (st.code(), st.signal()) {
            (Some(code), _) => Status::Exited(code),
            (None, Some(sig)) => Status::Signaled(sig),
            (None, None) => Status::Exited(-1),
        },
        (None, Err(e)) => {
            // Only possible if something else reaped our child (a waitpid(-1) somewhere).
            tracing::error!(pid, error = %e, "failed to wait for task process; its exit status is lost");
            Status::Exited(-1)
        }
    };
    tracing::debug!(pid, ?status, stray_killed, "task process ended");
    // The escalation's hold on the cgroup ends here: `finish` then has the only one.
    drop(esc);
    // Its counters, read once everything in it is gone; then it is kept for the queue's
    // next task (or removed).
    let usage = match leader.cgroup.take() {
        Some(cg) => Some(cg.finish().await),
        None => None,
    };
    // Streams cut short (a holder that escaped the group) still get their last line logged.
    out.finish();
    err.finish();
    // Read once nothing of the group is left to write it.
    let returned = match result_file {
        Some(f) if status.is_success() => f.take().await,
        _ => Returned::Nothing,
    };

    Outcome {
        returned,
        stray_killed,
        usage,
        ..Outcome::ran(Runner::Process, status, pid, started_at_ms, out, err)
    }
}

/// Checks what would make the spawn fail with a misleading error.
fn preflight(spec: &Spec) -> Option<Status> {
    if spec.argv.is_empty() {
        return Some(Status::SpawnFailed {
            kind: SpawnFailure::Other,
            message: "empty command: no program to run".to_string(),
        });
    }
    if let Some(message) = setup::unsettable_limit(spec, &host()) {
        return Some(Status::SpawnFailed {
            kind: SpawnFailure::Other,
            message,
        });
    }
    // A missing cwd fails the spawn with ENOENT, which would read as "program not found".
    let cwd = spec.cwd.as_ref()?;
    let failure = |message: String| Status::SpawnFailed {
        kind: SpawnFailure::BadCwd,
        message,
    };
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some(failure(format!("cwd {} is not a directory", cwd.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Some(failure(format!("cwd {} does not exist", cwd.display())))
        }
        Err(e) => Some(failure(format!("cwd {} is not usable: {e}", cwd.display()))),
    }
}

pub(crate) fn open_log(path: &std::path::Path, max: u64) -> Option<LogFile> {
    match LogFile::open(path, max) {
        Ok(f) => Some(f),
        Err(e) => {
            // The output tail is still kept; a missing log is not worth failing the task over.
            tracing::warn!(path = %path.display(), error = %e, "failed to open task output log; running without it");
            None
        }
    }
}

/// The spawn command for `spec`: own process group, exact environment, piped stdout and
/// stderr, and the `pre_exec` set-up when one is needed. Long-lived workers add to it.
pub(crate) fn command(spec: &Spec, cgroup: Option<&cgroup::Cgroup>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        // Its own group, so that signals reach everything the task started. Without a
        // pre_exec hook this keeps std's posix_spawn fast path.
        .process_group(0)
        .kill_on_drop(false)
        // Pipes and /dev/null are opened close-on-exec by std: only 0, 1 and 2 reach the task.
        .stdin(match stdin_for(&spec.stdin) {
            StdinPlan::Null => Stdio::null(),
            StdinPlan::Prefilled(fd) => Stdio::from(fd),
            StdinPlan::Piped => Stdio::piped(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    if let Some(cg) = cgroup {
        // First of the hooks (before any change of user): into the task's cgroup (v2's
        // `cgroup.procs`, then each v1 `tasks`: the forked child has one thread).
        let fds = cg.join().writes();
        // SAFETY: write(2) on descriptors opened before the fork; nothing allocated.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    if let Some(setup) = ChildSetup::plan(spec, &host()) {
        // SAFETY: the hook only makes async-signal-safe system calls and allocates nothing
        // (see ChildSetup::into_hook).
        unsafe {
            cmd.pre_exec(setup.into_hook());
        }
    }
    cmd
}

/// A started leader, by whichever path started it.
enum LeaderChild {
    Fast(spawn::Child),
    Std(tokio::process::Child),
}

type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type Writer = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

impl LeaderChild {
    /// Whether `wait` should be polled from the start (std's child) or only once the pipes
    /// closed (ours: see spawn.rs).
    fn waits_from_the_start(&self) -> bool {
        matches!(self, LeaderChild::Std(_))
    }

    async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        match self {
            LeaderChild::Fast(c) => c.wait().await,
            LeaderChild::Std(c) => c.wait().await,
        }
    }

    fn take_pipes(&mut self) -> (Option<Writer>, Option<Reader>, Option<Reader>) {
        fn boxed_r<R: tokio::io::AsyncRead + Unpin + Send + 'static>(reader: R) -> Reader {
            Box::new(reader)
        }
        fn boxed_w<W: tokio::io::AsyncWrite + Unpin + Send + 'static>(writer: W) -> Writer {
            Box::new(writer)
        }
        match self {
            LeaderChild::Fast(c) => (
                c.stdin.take().map(boxed_w),
                c.stdout.take().map(boxed_r),
                c.stderr.take().map(boxed_r),
            ),
            LeaderChild::Std(c) => (
                c.stdin.take().map(boxed_w),
                c.stdout.take().map(boxed_r),
                c.stderr.take().map(boxed_r),
            ),
        }
    }
}

/// Starts the leader: without std's `Command` when nothing needs a `pre_exec` hook (see
/// `spawn.rs`), through it otherwise.
/// The most a task waits between two tries while descriptors are short.
const NO_DESCRIPTORS_RETRY_MAX: Duration = Duration::from_secs(1);

/// [`start`], waiting and trying again while the daemon (EMFILE) or the system (ENFILE) is
/// out of file descriptors: the shortage passes (a burst of connections or tasks), and a
/// task that never started must not be failed for it, nor charged an attempt. A cancel or a
/// shutdown ends the wait (`Cancelled`, `Interrupted`); any other error is the task's.
async fn start_when_descriptors_allow(
    spec: &Spec,
    stop: &Stop,
) -> Result<(LeaderChild, TrackedChild, Option<cgroup::Cgroup>), Status> {
    let mut delay = Doubling::new(Duration::from_millis(10), NO_DESCRIPTORS_RETRY_MAX);
    let mut warned = false;
    // The task's cgroup, made once (its descriptors can run short too).
    let mut cgroup: Option<cgroup::Cgroup> = None;
    loop {
        let made = match (&spec.cgroup, &cgroup) {
            (Some(c), None) => cgroup::Cgroup::create(c).map(|cg| {
                cgroup = Some(cg);
            }),
            _ => Ok(()),
        };
        let err = match made {
            Err(e) => {
                if !matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) {
                    let c = spec.cgroup.as_ref().expect("only a cgroup is made here");
                    let name = if c.kept {
                        format!("{}-<n>", c.name)
                    } else {
                        c.name.clone()
                    };
                    return Err(Status::SpawnFailed {
                        kind: SpawnFailure::Other,
                        message: format!(
                            "could not create the task's cgroup {}: {e}",
                            c.place.tree().join(name).display()
                        ),
                    });
                }
                e
            }
            Ok(()) => match start(spec, cgroup.as_ref()) {
                Ok((child, tracked)) => return Ok((child, tracked, cgroup)),
                Err(err) => err,
            },
        };
        if !matches!(err.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) {
            return Err(spawn_failure(spec, &err));
        }
        if !warned {
            warned = true;
            tracing::warn!(error = %err, "out of file descriptors: the task waits and starts when some are free (no attempt is charged)");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay.next_delay()) => {}
            _ = stop.cancel.cancelled() => return Err(Status::Cancelled),
            _ = stop.shutdown.cancelled() => return Err(Status::Interrupted),
        }
    }
}

/// [`ResultFile::create`], waiting and trying again while descriptors are short, as
/// [`start_when_descriptors_allow`] does. `Err(Ok(e))`: another error, the task's;
/// `Err(Err(status))`: a cancel or a shutdown ended the wait.
async fn create_result_file(
    result: &ResultSpec,
    spec: &Spec,
    stop: &Stop,
) -> Result<ResultFile, Result<io::Error, Status>> {
    let mut delay = Doubling::new(Duration::from_millis(10), NO_DESCRIPTORS_RETRY_MAX);
    loop {
        match ResultFile::create(result, spec.user.as_ref()) {
            Ok(f) => return Ok(f),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {}
            Err(e) => return Err(Ok(e)),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay.next_delay()) => {}
            _ = stop.cancel.cancelled() => return Err(Err(Status::Cancelled)),
            _ = stop.shutdown.cancelled() => return Err(Err(Status::Interrupted)),
        }
    }
}

fn start(spec: &Spec, cgroup: Option<&cgroup::Cgroup>) -> io::Result<(LeaderChild, TrackedChild)> {
    let join = cgroup.map(|c| c.join());
    if spawn::supported() && ChildSetup::plan(spec, &host()).is_none() {
        let stdin = match stdin_for(&spec.stdin) {
            StdinPlan::Null => spawn::Stdin::Null,
            StdinPlan::Prefilled(fd) => spawn::Stdin::Fd(fd),
            StdinPlan::Piped => spawn::Stdin::Piped,
        };
        let (child, tracked) = spawn::spawn(
            &spec.argv,
            &spec.env,
            spec.cwd.as_deref(),
            stdin,
            join.as_ref(),
        )?;
        return Ok((LeaderChild::Fast(child), tracked));
    }
    let mut cmd = command(spec, cgroup);
    let (child, tracked) = spawn_tracked(&mut cmd)?;
    Ok((LeaderChild::Std(child), tracked))
}

/// A payload that fits in a pipe's buffer is written into the pipe before the spawn and its
/// write end closed: the child reads it and then EOF, and the daemon has no stdin stream to
/// watch. A bigger one is streamed (see `feed`).
/// At most one page: even a pipe the kernel shrank (a user over `pipe-user-pages-soft`) holds
/// that much, so the write never blocks.
const PREFILLED_STDIN_MAX: usize = 4096;

enum StdinPlan {
    Null,
    Prefilled(std::os::fd::OwnedFd),
    Piped,
}

fn stdin_for(payload: &[u8]) -> StdinPlan {
    if payload.is_empty() {
        return StdinPlan::Null;
    }
    if payload.len() <= PREFILLED_STDIN_MAX {
        if let Some(read) = prefilled_pipe(payload) {
            return StdinPlan::Prefilled(read);
        }
    }
    StdinPlan::Piped
}

/// A pipe holding `data`, its write end closed; `None` if that could not be done (the caller
/// falls back to streaming).
fn prefilled_pipe(data: &[u8]) -> Option<std::os::fd::OwnedFd> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok()?;
    let mut file = std::fs::File::from(write);
    // Never blocks: see PREFILLED_STDIN_MAX.
    std::io::Write::write_all(&mut file, data).ok()?;
    drop(file);
    Some(read)
}

fn spawn_failure(spec: &Spec, err: &io::Error) -> Status {
    let program = &spec.argv[0];
    let (kind, message) = match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => {
            // A script whose `#!` interpreter is missing also gives ENOENT.
            let exists = program.contains('/')
                && spec
                    .cwd
                    .as_ref()
                    .map_or_else(|| PathBuf::from(program), |cwd| cwd.join(program))
                    .is_file();
            if exists {
                (
                    SpawnFailure::NotFound,
                    format!("program not found: the interpreter of {program} does not exist"),
                )
            } else {
                (
                    SpawnFailure::NotFound,
                    format!("program not found: {program}"),
                )
            }
        }
        Some(libc::EACCES) => (
            SpawnFailure::NotExecutable,
            format!("permission denied (not executable): {program}"),
        ),
        Some(libc::ENOEXEC) => (
            SpawnFailure::NotExecutable,
            format!("not an executable format: {program}"),
        ),
        _ => match &spec.user {
            Some(user) if !user.is_current() => (
                SpawnFailure::Other,
                format!("failed to start {program} as user {}: {err}", user.name),
            ),
            _ => (
                SpawnFailure::Other,
                format!("failed to start {program}: {err}"),
            ),
        },
    };
    Status::SpawnFailed { kind, message }
}
