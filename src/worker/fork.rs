//! `worker_fork`: one loaded parent per queue (and pool generation) that forks the queue's
//! workers, so that they share the parent's pages (its interpreter, its imports) until they
//! write them.
//!
//! What it owns: the parent process (spawned with one end of a `SOCK_SEQPACKET` socket pair
//! on fd 5, `TASKD_WORKER_FORK_FD`), the conversation on that socket (`forkserver`, then
//! `fork` requests carrying a slot's descriptors, answered by `forked`, `error` and, as the
//! parent reaps them, `exited`), and the exit status of each forked worker
//! ([`ForkedChild`]: the parent's word, or the daemon's own `waitid` when the parent died
//! first and the worker was re-parented to the daemon, its child subreaper).
//!
//! What it must not do: run tasks or decide about slots. A forked worker is an ordinary
//! [`Proc`](super::process::Proc) from its `ready` on; the slot loop supervises it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    recv, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::process::{describe, Event, Proc, Wiring};
use super::protocol::{self, ParentMessage};
use super::IdleOutput;
use crate::executor::{Spec, TrackedChild};
use crate::model::QueueName;

/// How long a forked worker that is gone may take to be reported by its parent before its
/// exit status counts as unknown.
const EXIT_REPORT: Duration = Duration::from_millis(500);
/// The largest message the parent sends.
const MAX_MESSAGE: usize = 64 * 1024;
/// A wait status that is neither an exit nor a signal: shown as "ended".
const UNKNOWN_STATUS: i32 = 0xffff;

/// A worker parent, seen by the slots that fork from it. The last handle dropped stops it.
pub(crate) struct ForkServer {
    pub(crate) pid: i32,
    /// The pool generation it was started for: a newer one starts a new parent.
    pub(crate) generation: u64,
    requests: mpsc::Sender<Request>,
    alive: Arc<AtomicBool>,
    stop: CancellationToken,
    done: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Request {
    slot: usize,
    fds: [OwnedFd; 5],
    reply: oneshot::Sender<Result<(i32, oneshot::Receiver<i32>), String>>,
}

/// Why a parent did not start.
pub(crate) struct StartFailed {
    pub(crate) why: String,
    pub(crate) said: Vec<String>,
}

impl ForkServer {
    /// Spawns the parent and waits for its `forkserver` message (within `ready_within`);
    /// `stop` ends the wait (and then the parent).
    pub(crate) async fn start(
        spec: &Spec,
        queue: &QueueName,
        generation: u64,
        ready_within: Duration,
        stop: &CancellationToken,
        kill_now: &CancellationToken,
    ) -> Result<Option<Arc<ForkServer>>, StartFailed> {
        let failed = |why: String| StartFailed {
            why,
            said: Vec::new(),
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|e| failed(format!("failed to make the worker parent's socket: {e}")))?;
        // The parent's end blocks (a plain `recv` there); ours is read by tokio.
        nix::fcntl::fcntl(
            theirs.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|e| failed(format!("failed to set up the worker parent's socket: {e}")))?;
        let mut spec = spec.clone();
        spec.env.extend(parent_env());
        let mut parent = Proc::spawn(&spec, Wiring::ForkServer(theirs))
            .map_err(|e| failed(super::spawn_error(&spec.argv, &e)))?;
        // SAFETY: `ours` is an OwnedFd that the AsyncFd owns from here on; nothing else
        // closes or replaces that descriptor while it is registered.
        let sock = unsafe { AsyncFd::register(ours) }
            .map_err(|e| failed(format!("failed to watch the worker parent's socket: {e}")))?;
        let mut out = IdleOutput::parent(queue, parent.pid);
        tracing::info!(queue = %queue, pid = parent.pid, "worker parent starting (worker_fork)");
        let ready_by = Instant::now() + ready_within;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let end: Result<(), String> = loop {
            tokio::select! {
                r = recv_message(&sock, &mut buf) => match r {
                    Ok(0) | Err(_) => break Err(unsupported("it closed fd 5 before announcing `forkserver`")),
                    Ok(n) => match protocol::parse_parent(&buf[..n]) {
                        Ok(ParentMessage::Forkserver { protocol: v }) if v == protocol::VERSION => break Ok(()),
                        Ok(ParentMessage::Forkserver { protocol: v }) => break Err(format!("its worker parent speaks protocol version {v}; this taskd speaks {}", protocol::VERSION)),
                        _ => break Err(unsupported(&format!("it sent {} on fd 5 instead of `forkserver`", protocol::show_line(&buf[..n])))),
                    },
                },
                ev = parent.next_event() => match ev {
                    Event::Exit(st) => break Err(unsupported(&format!("it ended ({}) before announcing `forkserver` on fd 5", describe(&st)))),
                    Event::Gone => break Err(unsupported("it ended before announcing `forkserver` on fd 5")),
                    ev => out.event(ev),
                },
                _ = tokio::time::sleep_until(ready_by) => break Err(unsupported(&format!("no `forkserver` message on fd 5 within {}", humantime::format_duration(ready_within)))),
                _ = stop.cancelled() => {
                    parent.stop(spec.kill_grace, kill_now, |ev| out.event(ev)).await;
                    return Ok(None);
                }
            }
        };
        if let Err(why) = end {
            let st = parent
                .stop(spec.kill_grace, kill_now, |ev| out.event(ev))
                .await;
            out.flush();
            let why = match st {
                Some(st) if !why.contains(&describe(&st)) => {
                    format!("{why} (then {})", describe(&st))
                }
                _ => why,
            };
            return Err(StartFailed {
                why,
                said: out.last_stderr.take(),
            });
        }
        tracing::info!(queue = %queue, pid = parent.pid, "worker parent ready");
        let (requests, rx) = mpsc::channel(8);
        let alive = Arc::new(AtomicBool::new(true));
        let stop_parent = CancellationToken::new();
        let pid = parent.pid;
        let conv = Conversation {
            queue: queue.clone(),
            parent,
            sock,
            out,
            requests: rx,
            alive: alive.clone(),
            stop: stop_parent.clone(),
            kill_now: kill_now.clone(),
            grace: spec.kill_grace,
        };
        let done = tokio::spawn(conv.run());
        Ok(Some(Arc::new(ForkServer {
            pid,
            generation,
            requests,
            alive,
            stop: stop_parent,
            done: Mutex::new(Some(done)),
        })))
    }

    /// The parent still takes requests.
    pub(crate) fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Asks for a worker for `slot` with its descriptors (3, 4, 0, 1, 2 in the worker).
    pub(crate) async fn fork(&self, slot: usize, fds: [OwnedFd; 5]) -> io::Result<ForkedChild> {
        let gone = || io::Error::other(format!("the worker parent (pid {}) is gone", self.pid));
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request { slot, fds, reply })
            .await
            .map_err(|_| gone())?;
        let (pid, status) = rx.await.map_err(|_| gone())?.map_err(io::Error::other)?;
        Ok(ForkedChild::new(pid, status))
    }

    /// Stops the parent (its socket closed, SIGTERM, SIGKILL after the grace) and waits for
    /// it. Its workers are not touched: they are not in its group or cgroup.
    pub(crate) async fn shutdown(&self) {
        self.stop.cancel();
        let done = self.done.lock().expect("not poisoned").take();
        if let Some(done) = done {
            let _ = done.await;
        }
    }
}

impl Drop for ForkServer {
    fn drop(&mut self) {
        // No slot forks from it any more (a newer generation, the pool gone).
        self.stop.cancel();
    }
}

/// The environment of a worker parent on top of its queue's.
fn parent_env() -> [(String, String); 3] {
    [
        (
            "TASKD_WORKER_PROTOCOL".to_string(),
            protocol::VERSION.to_string(),
        ),
        (
            "TASKD_WORKER_PROTOCOL_MINOR".to_string(),
            protocol::MINOR.to_string(),
        ),
        (
            "TASKD_WORKER_FORK_FD".to_string(),
            protocol::FORK_FD.to_string(),
        ),
    ]
}

fn unsupported(what: &str) -> String {
    format!(
        "{what}: the program does not support worker_fork (with TASKD_WORKER_FORK_FD set it must announce {{\"type\":\"forkserver\",\"protocol\":1}} on that descriptor, as the Python library's app.run() and serve() do; see docs/worker-protocol.md), or it failed while loading"
    )
}

/// One message from the socket (its length; 0 when the peer closed it). Cancel-safe.
async fn recv_message(sock: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = sock.readable().await?;
        match guard
            .try_io(|s| recv(s.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from))
        {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

/// Sends one `fork` request with the slot's descriptors.
async fn send_fork(sock: &AsyncFd<OwnedFd>, slot: usize, fds: &[OwnedFd; 5]) -> io::Result<()> {
    let msg = format!(r#"{{"type":"fork","slot":{slot}}}"#);
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    loop {
        let mut guard = sock.writable().await?;
        match guard.try_io(|s| {
            sendmsg::<UnixAddr>(
                s.as_raw_fd(),
                &[io::IoSlice::new(msg.as_bytes())],
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        }) {
            Ok(r) => return r.map(|_| ()),
            Err(_would_block) => continue,
        }
    }
}

/// The parent's side of the daemon: requests out, answers and exit reports in, its output
/// to the log, until it is stopped or dies.
struct Conversation {
    queue: QueueName,
    parent: Proc,
    sock: AsyncFd<OwnedFd>,
    out: IdleOutput,
    requests: mpsc::Receiver<Request>,
    alive: Arc<AtomicBool>,
    stop: CancellationToken,
    kill_now: CancellationToken,
    grace: Duration,
}

type Pending = oneshot::Sender<Result<(i32, oneshot::Receiver<i32>), String>>;

impl Conversation {
    async fn run(mut self) {
        let mut pending: HashMap<usize, Pending> = HashMap::new();
        let mut exits: HashMap<i32, oneshot::Sender<i32>> = HashMap::new();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let why = loop {
            tokio::select! {
                biased;
                r = recv_message(&self.sock, &mut buf) => match r {
                    Ok(0) | Err(_) => break "it closed its socket (fd 5)".to_string(),
                    Ok(n) => self.message(&buf[..n], &mut pending, &mut exits),
                },
                ev = self.parent.next_event() => match ev {
                    Event::Exit(st) => break format!("it ended ({})", describe(&st)),
                    Event::Gone => break "it ended".to_string(),
                    ev => self.out.event(ev),
                },
                req = self.requests.recv() => match req {
                    Some(req) => match send_fork(&self.sock, req.slot, &req.fds).await {
                        Ok(()) => {
                            // Our copies go now: the worker's pipes close when it dies.
                            drop(req.fds);
                            pending.insert(req.slot, req.reply);
                        }
                        Err(e) => {
                            let _ = req.reply.send(Err(format!("failed to send the fork request to the worker parent: {e}")));
                        }
                    },
                    None => break "no worker forks from it any more".to_string(),
                },
                _ = self.stop.cancelled() => break "no worker forks from it any more".to_string(),
            }
        };
        self.alive.store(false, Ordering::Release);
        // Reports written just before it ended are still in the socket.
        while let Ok(n) = recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            if n == 0 {
                break;
            }
            let msg = buf[..n].to_vec();
            self.message(&msg, &mut pending, &mut exits);
        }
        for (_, reply) in pending.drain() {
            let _ = reply.send(Err(format!("the worker parent went away: {why}")));
        }
        // The workers' watches fall back to their pidfds and the daemon's waitid.
        drop(exits);
        let expected = self.stop.is_cancelled();
        if expected {
            tracing::info!(queue = %self.queue, pid = self.parent.pid, "worker parent stopping: {why}");
        } else {
            tracing::warn!(queue = %self.queue, pid = self.parent.pid, "worker parent ended: {why}; its workers keep serving, and the next worker to start forks from a new parent");
        }
        let out = &mut self.out;
        let st = self
            .parent
            .stop(self.grace, &self.kill_now, |ev| out.event(ev))
            .await;
        self.out.flush();
        if expected {
            tracing::info!(queue = %self.queue, pid = self.parent.pid, "worker parent ended ({})", st.as_ref().map(describe).unwrap_or_else(|| "ended".into()));
        }
    }

    fn message(
        &mut self,
        msg: &[u8],
        pending: &mut HashMap<usize, Pending>,
        exits: &mut HashMap<i32, oneshot::Sender<i32>>,
    ) {
        match protocol::parse_parent(msg) {
            Ok(ParentMessage::Forked { slot, pid }) => {
                let (tx, rx) = oneshot::channel();
                exits.insert(pid, tx);
                match pending.remove(&slot) {
                    Some(reply) => {
                        let _ = reply.send(Ok((pid, rx)));
                    }
                    None => {
                        tracing::warn!(queue = %self.queue, pid = self.parent.pid, slot, child = pid, "worker parent forked a worker nobody asked for")
                    }
                }
            }
            Ok(ParentMessage::Error { slot, message }) => {
                if let Some(reply) = pending.remove(&slot) {
                    let _ = reply.send(Err(format!("the worker parent could not fork: {message}")));
                }
            }
            Ok(ParentMessage::Exited { pid, status }) => {
                if let Some(tx) = exits.remove(&pid) {
                    let _ = tx.send(status);
                }
            }
            Ok(ParentMessage::Forkserver { .. }) | Err(_) => {
                tracing::warn!(queue = %self.queue, pid = self.parent.pid, message = %protocol::show_line(msg), "worker parent sent an unexpected message; ignored");
            }
        }
    }
}

/// A worker forked by a parent: its exit is seen on a pidfd at once, and its status comes
/// from the parent's `exited` report, or from the daemon's own `waitid` when the parent died
/// first (the worker was then re-parented to the daemon, a child subreaper).
pub(crate) struct ForkedChild {
    pub(crate) pid: i32,
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<oneshot::Receiver<i32>>,
    /// Keeps the daemon's orphan reaper away from it.
    _tracked: TrackedChild,
    /// When it was seen gone: its status is awaited until then + [`EXIT_REPORT`].
    gone_at: Option<Instant>,
}

impl ForkedChild {
    fn new(pid: i32, status: oneshot::Receiver<i32>) -> Self {
        let tracked = crate::executor::track(pid);
        // SAFETY: the pidfd is an OwnedFd that the AsyncFd owns from here on; nothing else
        // closes or replaces it while it is registered.
        let pidfd = pidfd_open(pid).and_then(|fd| unsafe { AsyncFd::register(fd) }.ok());
        ForkedChild {
            pid,
            pidfd,
            status: Some(status),
            _tracked: tracked,
            gone_at: None,
        }
    }

    /// Its exit status. Cancel-safe.
    pub(crate) async fn wait(&mut self) -> ExitStatus {
        loop {
            let Some(gone_at) = self.gone_at else {
                tokio::select! {
                    biased;
                    st = async { self.status.as_mut().expect("checked").await }, if self.status.is_some() => match st {
                        Ok(st) => return ExitStatus::from_raw(st),
                        Err(_) => self.status = None,
                    },
                    _ = async { self.pidfd.as_ref().expect("checked").readable().await }, if self.pidfd.is_some() => {
                        self.gone_at = Some(Instant::now());
                    }
                    // No pidfd (a kernel before 5.3): look now and then.
                    _ = tokio::time::sleep(Duration::from_millis(100)), if self.pidfd.is_none() => {
                        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), None).is_err() {
                            self.gone_at = Some(Instant::now());
                        }
                    }
                }
                continue;
            };
            if let Some(st) = self.reap() {
                return st;
            }
            tokio::select! {
                biased;
                st = async { self.status.as_mut().expect("checked").await }, if self.status.is_some() => match st {
                    Ok(st) => return ExitStatus::from_raw(st),
                    Err(_) => self.status = None,
                },
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if Instant::now() >= gone_at + EXIT_REPORT {
                return ExitStatus::from_raw(self.reap_status().unwrap_or(UNKNOWN_STATUS));
            }
        }
    }

    fn reap(&self) -> Option<ExitStatus> {
        self.reap_status().map(ExitStatus::from_raw)
    }

    /// `waitid` on the pidfd: works once the worker is the daemon's child (its parent died).
    fn reap_status(&self) -> Option<i32> {
        let fd = self.pidfd.as_ref()?.get_ref().as_raw_fd();
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`; P_PIDFD takes the descriptor as the id.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                fd as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        // SAFETY: si_pid and si_status are set by a waitid that returned 0.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if r != 0 || pid == 0 {
            return None;
        }
        Some(match info.si_code {
            libc::CLD_EXITED => (status & 0xff) << 8,
            libc::CLD_DUMPED => (status & 0x7f) | 0x80,
            _ => status & 0x7f,
        })
    }
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: a plain system call; the descriptor it returns is ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    let fd = i32::try_from(fd).ok()?;
    // SAFETY: a fresh descriptor owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
