//! One worker process: spawned in its own process group with the protocol's two pipes on
//! fds 3 and 4 (or forked by the queue's worker parent with the same descriptors), and read
//! as a stream of [`Event`]s (message lines, output, exit). A worker parent is spawned here
//! too, with its socket on fd 5 instead.
//!
//! Every read here is cancel-safe, so the slot loop can `select!` on [`Proc::next_event`]
//! beside timers and stop tokens without losing data.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use super::protocol::{FORK_FD, MAX_LINE, RESULT_FD, TASK_FD};
use crate::executor::{spawn_tracked, Escalation, Spawned, Spec, Stop, StopWhy, TrackedChild};

/// What a running worker did next.
#[derive(Debug)]
pub(crate) enum Event {
    /// A complete line on the result pipe (without its newline).
    Line(Vec<u8>),
    /// A line on the result pipe grew past its limit ([`MAX_LINE`], more for a queue whose
    /// results may be longer: [`Proc::set_max_line`]) without a newline.
    TooLong(Vec<u8>),
    /// The worker closed its result pipe.
    ResultsClosed,
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The leader exited.
    Exit(ExitStatus),
    /// Nothing is left to watch (exited, every pipe closed).
    Gone,
}

/// Reads lines from the result pipe; memory bounded by `max`.
struct LineReader {
    rx: pipe::Receiver,
    /// The longest line (bytes, without its newline).
    max: usize,
    buf: Vec<u8>,
    /// Bytes of `buf` known to hold no newline.
    scanned: usize,
    eof: bool,
    /// EOF was reported once; the select branch is off from then on.
    done: bool,
}

/// How much room a read of the result pipe or of the output pipes has at least.
const READ_CHUNK: usize = 16 * 1024;
/// How much of a worker's output one read takes.
const OUTPUT_CHUNK: usize = 8 * 1024;

enum Read {
    Line(Vec<u8>),
    TooLong(Vec<u8>),
    Eof,
}

impl LineReader {
    /// Cancel-safe: the only await is one `read`, whose data is kept once it completes.
    async fn next(&mut self) -> Read {
        loop {
            if let Some(i) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let end = self.scanned + i;
                let line = self.buf[..end].to_vec();
                self.buf.drain(..=end);
                self.scanned = 0;
                return Read::Line(line);
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max {
                let line = std::mem::take(&mut self.buf);
                self.scanned = 0;
                return Read::TooLong(line);
            }
            if self.eof {
                self.done = true;
                if self.buf.is_empty() {
                    return Read::Eof;
                }
                // A last line without its newline still counts.
                self.scanned = 0;
                return Read::Line(std::mem::take(&mut self.buf));
            }
            // Read straight into the line buffer's spare room (kept between tasks), not into
            // a zeroed 16 KiB array on the stack copied over after every read.
            self.buf.reserve(READ_CHUNK);
            match self.rx.read_buf(&mut self.buf).await {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.eof = true,
            }
        }
    }
}

/// The leader of a worker's group, and how its exit status is learnt.
enum Leader {
    /// Spawned by the daemon: tokio reaps it.
    Own {
        child: Child,
        /// Registered until tokio has reaped the leader (see `executor::spawn_tracked`).
        tracked: Option<TrackedChild>,
    },
    /// Forked by the queue's worker parent (`worker_fork`).
    Forked(super::fork::ForkedChild),
}

/// How the daemon wires a process it spawns.
pub(crate) enum Wiring {
    /// A worker: the protocol's pipes on fds 3 and 4.
    Protocol,
    /// A worker parent (`worker_fork`): this end of its socket pair on fd 5, no fds 3 and 4.
    ForkServer(OwnedFd),
}

pub(crate) struct Proc {
    leader: Leader,
    pub(crate) pid: i32,
    /// The leader's start time (`/proc/PID/stat` field 22), for crash recovery.
    pub(crate) start_time: u64,
    tasks: Option<pipe::Sender>,
    /// `None` for a worker parent, which has no result pipe.
    results: Option<LineReader>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    pub(crate) exited: Option<ExitStatus>,
    /// The worker's own cgroup, when the daemon has a subtree: its stop kills all of it.
    pub(crate) cgroup: Option<crate::executor::cgroup::Cgroup>,
}

/// A worker's (or worker parent's) own cgroup, `worker-<queue>-<n>`, n counting in this
/// daemon.
fn worker_cgroup(
    spec: Option<&crate::executor::cgroup::CgroupSpec>,
) -> io::Result<Option<crate::executor::cgroup::Cgroup>> {
    let Some(c) = spec else { return Ok(None) };
    let mut c = c.clone();
    c.name = format!("{}-{}", c.name, c.place.serial());
    crate::executor::cgroup::Cgroup::create(&c)
        .map(Some)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "could not create the worker's cgroup {}: {e}",
                    c.place.tree().join(&c.name).display()
                ),
            )
        })
}

fn line_reader(rx: pipe::Receiver) -> LineReader {
    LineReader {
        rx,
        max: MAX_LINE,
        buf: Vec::new(),
        scanned: 0,
        eof: false,
        done: false,
    }
}

/// A child's stdout or stderr as a tokio pipe, like the pipes of a forked worker.
fn as_pipe(fd: Option<io::Result<OwnedFd>>) -> Option<pipe::Receiver> {
    pipe::Receiver::from_owned_fd(fd?.ok()?).ok()
}

impl Proc {
    /// Spawns a worker (or, with [`Wiring::ForkServer`], a worker parent). The protocol's
    /// pipes are close-on-exec in the daemon (no other child inherits them) and moved to
    /// fds 3 and 4 in the worker only.
    pub(crate) fn spawn(spec: &Spec, wiring: Wiring) -> io::Result<Proc> {
        let cgroup = worker_cgroup(spec.cgroup.as_ref())?;
        let mut cmd = crate::executor::command(spec, cgroup.as_ref());
        let (mut ours, theirs) = match wiring {
            Wiring::Protocol => {
                let (task_r, task_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
                let (res_r, res_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
                (
                    Some((task_w, res_r)),
                    vec![(task_r, TASK_FD), (res_w, RESULT_FD)],
                )
            }
            Wiring::ForkServer(fd) => (None, vec![(fd, FORK_FD)]),
        };
        let moves: Vec<(i32, i32)> = theirs
            .iter()
            .map(|(fd, to)| (fd.as_raw_fd(), *to))
            .collect();
        // SAFETY: the hook only makes async-signal-safe system calls (fcntl, dup2, close,
        // prctl: nix's wrappers are each the bare call and an errno check) on integers
        // computed before the fork, and allocates nothing (`moves` is iterated in place).
        unsafe {
            cmd.pre_exec(move || {
                use nix::fcntl::{fcntl, FcntlArg};
                use nix::unistd::{close, dup2};
                // Copied above 5 first, so that a source that already is a target is not
                // overwritten before it is moved; dup2 clears close-on-exec on the target.
                let mut high = [0i32; 2];
                for (i, (from, _)) in moves.iter().enumerate() {
                    high[i] = fcntl(*from, FcntlArg::F_DUPFD(6))?;
                }
                for (i, (_, to)) in moves.iter().enumerate() {
                    dup2(high[i], *to)?;
                    let _ = close(high[i]);
                }
                // The worker dies with the daemon (SIGKILL of the daemon included); the
                // rest of its group is killed by the next daemon from workers.json.
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                Ok(())
            });
        }
        let (mut child, tracked) = spawn_tracked(&mut cmd)?;
        drop(cmd);
        drop(theirs);
        let pid = tracked.pid();
        let (tasks, results) = match ours.take() {
            Some((task_w, res_r)) => (
                Some(pipe::Sender::from_owned_fd(task_w)?),
                Some(line_reader(pipe::Receiver::from_owned_fd(res_r)?)),
            ),
            None => (None, None),
        };
        Ok(Proc {
            stdout: as_pipe(child.stdout.take().map(|s| s.into_owned_fd())),
            stderr: as_pipe(child.stderr.take().map(|s| s.into_owned_fd())),
            leader: Leader::Own {
                child,
                tracked: Some(tracked),
            },
            pid,
            start_time: Spawned { pid }.start_time(),
            tasks,
            results,
            exited: None,
            cgroup,
        })
    }

    /// Asks the queue's worker parent for a worker for `slot`: the five descriptors it will
    /// have as 0–4 go with the request; the parent forks, the child joins its own cgroup
    /// (moved by the daemon before it can get a task) and speaks the protocol from `ready`
    /// on, as a spawned worker does.
    pub(crate) async fn fork(
        server: &std::sync::Arc<super::fork::ForkServer>,
        slot: usize,
        cgroup: Option<&crate::executor::cgroup::CgroupSpec>,
    ) -> io::Result<Proc> {
        use nix::fcntl::OFlag;
        let cgroup = worker_cgroup(cgroup)?;
        let (task_r, task_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (res_r, res_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let null = OwnedFd::from(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/null")?,
        );
        // In the order the worker has them: 3, 4, 0, 1, 2.
        let theirs = [task_r, res_w, null, out_w, err_w];
        let child = server.fork(slot, theirs).await?;
        let pid = child.pid;
        if let Some(cg) = &cgroup {
            if let Err(e) = cg.adopt(pid) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(io::Error::new(
                    e.kind(),
                    format!("could not move the forked worker (pid {pid}) into its cgroup: {e}"),
                ));
            }
        }
        Ok(Proc {
            leader: Leader::Forked(child),
            pid,
            start_time: Spawned { pid }.start_time(),
            tasks: Some(pipe::Sender::from_owned_fd(task_w)?),
            results: Some(line_reader(pipe::Receiver::from_owned_fd(res_r)?)),
            stdout: pipe::Receiver::from_owned_fd(out_r).ok(),
            stderr: pipe::Receiver::from_owned_fd(err_r).ok(),
            exited: None,
            cgroup,
        })
    }

    /// The longest message line taken from now on: the protocol's [`MAX_LINE`], plus the
    /// queue's `max_result` (an `ok` answer carries the result).
    pub(crate) fn set_max_line(&mut self, max: usize) {
        if let Some(r) = &mut self.results {
            r.max = max;
        }
    }

    /// The longest message line taken now.
    pub(crate) fn max_line(&self) -> usize {
        self.results.as_ref().map_or(MAX_LINE, |r| r.max)
    }

    /// The next thing the worker did. Cancel-safe.
    pub(crate) async fn next_event(&mut self) -> Event {
        // Output is read into vectors of its own (handed on as they are), not into two
        // zeroed 8 KiB arrays set up on every call, most of which read nothing.
        let mut out = Vec::new();
        let mut err = Vec::new();
        let Proc {
            leader,
            results,
            stdout,
            stderr,
            exited,
            ..
        } = self;
        let reading = results.as_ref().is_some_and(|r| !r.done);
        tokio::select! {
            // Results and output before the exit: a worker that answers and exits at once
            // has its answer read first.
            biased;
            r = next_line(results), if reading => match r {
                Read::Line(l) => Event::Line(l),
                Read::TooLong(l) => Event::TooLong(l),
                Read::Eof => Event::ResultsClosed,
            },
            n = read_some(stdout, &mut out), if stdout.is_some() => match n {
                Some(_) => Event::Stdout(out),
                None => { *stdout = None; Event::Stdout(Vec::new()) }
            },
            n = read_some(stderr, &mut err), if stderr.is_some() => match n {
                Some(_) => Event::Stderr(err),
                None => { *stderr = None; Event::Stderr(Vec::new()) }
            },
            st = leader.wait(), if exited.is_none() => {
                *exited = Some(st);
                Event::Exit(st)
            },
            else => Event::Gone,
        }
    }

    /// The task pipe, to write a task beside [`Proc::next_event`]; give it back with
    /// [`Proc::restore_tasks`].
    pub(crate) fn take_tasks(&mut self) -> Option<pipe::Sender> {
        self.tasks.take()
    }

    pub(crate) fn restore_tasks(&mut self, tasks: Option<pipe::Sender>) {
        self.tasks = tasks;
    }

    /// Whatever stdout and stderr hold right now, without waiting: what a worker printed
    /// before it wrote its result is in the pipes by the time the result is read.
    ///
    /// Each pipe is read until it says EAGAIN, whatever the runtime's readiness says: the
    /// readiness of the output and of the answer arrive in one `epoll_wait`, but the runtime
    /// marks them ready one after the other, and the task woken by the answer may run on
    /// another thread before the output is marked. Trusting the readiness then lost the
    /// output (read later as the next task's), seen once in the test suite; so when it says
    /// "not ready" the pipe is read directly (non-blocking) once more.
    pub(crate) fn drain_now(&mut self, mut sink: impl FnMut(bool, &[u8])) {
        let mut buf = [0u8; OUTPUT_CHUNK];
        for (is_err, pipe) in [(false, self.stdout.as_ref()), (true, self.stderr.as_ref())] {
            let Some(pipe) = pipe else { continue };
            // Bounded: a worker that keeps writing cannot hold the loop here forever.
            for _ in 0..64 {
                let read = match pipe.try_read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        nix::unistd::read(pipe.as_raw_fd(), &mut buf).map_err(std::io::Error::from)
                    }
                    other => other,
                };
                match read {
                    Ok(n) if n > 0 => sink(is_err, &buf[..n]),
                    _ => break,
                }
            }
        }
    }

    pub(crate) fn signal(&self, sig: Signal) {
        if self.pid > 1 {
            let _ = killpg(Pid::from_raw(self.pid), sig);
        }
    }

    /// The leader's resident set size in bytes, if it can be read.
    pub(crate) fn rss(&self) -> Option<u64> {
        super::status::rss_bytes(self.pid)
    }

    /// Stops the worker: its task pipe is closed (a well-behaved worker exits on EOF), its
    /// group gets SIGTERM, then SIGKILL after `grace` (at once when `now` fires). Output
    /// meanwhile goes to `sink`. Returns the leader's exit status.
    pub(crate) async fn stop(
        &mut self,
        grace: Duration,
        now: &CancellationToken,
        mut sink: impl FnMut(Event),
    ) -> Option<ExitStatus> {
        self.tasks = None;
        let mut esc = Escalation::new(self.pid).with_cgroup(self.cgroup.clone());
        if self.exited.is_none() {
            esc.begin(StopWhy::Shutdown, grace);
        }
        // Only the daemon's kill can cut the grace short now.
        let stop = Stop {
            kill: now.clone(),
            ..Stop::default()
        };
        while self.exited.is_none() {
            tokio::select! {
                ev = self.next_event() => match ev {
                    Event::Gone => break,
                    ev => sink(ev),
                },
                _ = esc.step(&stop, None, grace) => {}
            }
        }
        self.finish();
        self.exited
    }

    /// The leader is gone: nothing of its group may outlive it.
    pub(crate) fn finish(&mut self) {
        self.tasks = None;
        self.signal(Signal::SIGKILL);
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            // Dropped while running (the daemon is going away): do not leave it behind. If
            // the leader was not reaped yet, tokio's orphan queue reaps it.
            self.signal(Signal::SIGKILL);
        }
    }
}

impl Leader {
    /// The leader's exit status. Cancel-safe.
    async fn wait(&mut self) -> ExitStatus {
        match self {
            Leader::Own { child, tracked } => {
                let st = child.wait().await;
                *tracked = None;
                match st {
                    Ok(st) => st,
                    Err(e) => {
                        tracing::error!(error = %e, "failed to wait for a worker process; its exit status is lost");
                        std::os::unix::process::ExitStatusExt::from_raw(-1 << 8)
                    }
                }
            }
            Leader::Forked(child) => child.wait().await,
        }
    }
}

async fn next_line(results: &mut Option<LineReader>) -> Read {
    match results {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

/// One read of up to [`OUTPUT_CHUNK`] bytes into `buf` (empty); `None` at the end or on
/// an error. Cancel-safe. The room is reserved only once the pipe is readable, so a call
/// cancelled before (most are: the answer comes first) allocates nothing.
async fn read_some(reader: &mut Option<pipe::Receiver>, buf: &mut Vec<u8>) -> Option<usize> {
    let r = reader.as_mut()?;
    loop {
        if r.readable().await.is_err() {
            return None;
        }
        buf.reserve_exact(OUTPUT_CHUNK);
        match r.try_read_buf(buf) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return None,
        }
    }
}

/// "exit code 3", "killed by SIGKILL".
pub(crate) fn describe(st: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by {}", crate::executor::signal_name(s)),
        _ => "ended".to_string(),
    }
}
