//! Long-lived workers: the processes of a `worker` queue, supervised, and fed one task at a
//! time over the protocol of docs/worker-protocol.md.
//!
//! What it owns:
//! - a [`Pool`] per `worker` queue: `concurrency` slots, each a loop that keeps one worker
//!   process alive through STARTING → RUNNING → (BACKOFF → STARTING …) or FATAL, restarts it
//!   with exponential backoff after it dies, recycles it (`max_tasks_per_worker`,
//!   `max_worker_memory`, a reload that changes what it runs: one at a time), and runs the
//!   tasks the supervisor hands it, with the timeout, cancel and shutdown escalation
//!   (SIGTERM → `kill_grace` → SIGKILL to the worker's group);
//! - the worker's output: what it prints while a task runs is that task's output (tails, log
//!   files, log lines); between tasks it goes to the daemon's log;
//! - `state_dir/workers.json` ([`Registry`]): every worker's state for `taskd status`, and
//!   its pid for the next daemon to kill after a crash ([`kill_leftovers`]).
//!
//! What it must not do: touch the broker. The supervisor claims tasks (only while a worker
//! is idle: [`Pool::reserve`]), records starts and results, and turns an [`Outcome`] into
//! task state with [`decide`].

mod process;
pub mod protocol;
pub mod status;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Claimed, Finish};
use crate::config::QueueConfig;
use crate::executor::output::{Capture, Lines};
use crate::executor::{Spawned, Stop};
use crate::model::{now_ms, AttemptReason, AttemptRecord, QueueName, TaskRecord, UnixMs};
use crate::supervisor::prepare::Prepared;
use process::{describe, Event, Proc};
use protocol::{ResultStatus, WorkerMessage};
pub use status::{kill_leftovers, read_status, Registry, StatusFile, WorkerInfo, WorkerState};

/// A started worker must announce itself ready within this time.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker that closed its result pipe mid-task has to exit before it counts as
/// crashed anyway (and is stopped).
const EXIT_AFTER_CLOSE: Duration = Duration::from_millis(500);
/// The first restart delay after a worker died; doubled for each death in a row.
pub const RESTART_BASE: Duration = Duration::from_millis(500);
/// The longest restart delay.
pub const RESTART_MAX: Duration = Duration::from_secs(60);

/// Restart delay after `streak` unexpected ends in a row (1 → 0.5 s, 2 → 1 s, …, ≤ 60 s).
pub fn restart_delay(streak: u32) -> Duration {
    let factor = 1u32 << streak.saturating_sub(1).min(16);
    (RESTART_BASE * factor).min(RESTART_MAX)
}

/// How one task ended in a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The worker answered.
    Answered {
        status: ResultStatus,
        message: Option<String>,
    },
    /// The worker died (or closed its result pipe) before answering.
    Crashed {
        how: String,
        signal: Option<i32>,
    },
    /// The worker wrote something that is not a valid message for this task.
    Protocol {
        line: String,
        why: String,
    },
    /// The task ran past its timeout: the worker's group was stopped.
    TimedOut {
        killed_with: i32,
    },
    Cancelled,
    Interrupted,
    /// No worker took the task (it stopped meanwhile): give the task back, uncharged.
    Unavailable,
}

/// What happened to one task given to a worker.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub end: End,
    pub pid: Option<i32>,
    pub started_at_ms: UnixMs,
    pub ended_at_ms: UnixMs,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
}

impl Outcome {
    fn unavailable() -> Outcome {
        let now = now_ms();
        Outcome {
            end: End::Unavailable,
            pid: None,
            started_at_ms: now,
            ended_at_ms: now,
            stdout_tail: Vec::new(),
            stderr_tail: Vec::new(),
        }
    }
}

/// Turn a worker's outcome into the attempt to record and where the task goes next: `ok`
/// succeeds; `error` fails at once; `retry`, a crash, a protocol error and a timeout are
/// failed attempts under the retry policy; cancel and shutdown as in exec mode.
pub fn decide(
    q: &QueueConfig,
    c: &Claimed,
    node: &str,
    o: Outcome,
    now: UnixMs,
    rng: &mut dyn rand::RngCore,
) -> (AttemptRecord, Finish) {
    use crate::supervisor::policy::{attempt_of, retry_or_fail, signal_name};
    let mut a = attempt_of(
        c,
        node,
        o.pid,
        (o.started_at_ms, o.ended_at_ms),
        (&o.stdout_tail, &o.stderr_tail),
    );
    let pid = o.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
    let finish = match o.end {
        End::Answered { status, message } => {
            a.reason = Some(AttemptReason::Result);
            match status {
                ResultStatus::Ok => Finish::Succeeded,
                ResultStatus::Error => {
                    a.error = Some(format!(
                        "the worker reported an error (not retried): {}",
                        message.as_deref().unwrap_or("no message")
                    ));
                    Finish::Failed
                }
                ResultStatus::Retry => {
                    a.error = Some(format!(
                        "the worker asked for a retry: {}",
                        message.as_deref().unwrap_or("no message")
                    ));
                    retry_or_fail(q, c, &mut a, now, rng)
                }
            }
        }
        End::Crashed { how, signal } => {
            a.reason = Some(AttemptReason::Crash);
            a.signal = signal;
            a.error = Some(format!(
                "the worker{pid} died while running the task: {how}"
            ));
            retry_or_fail(q, c, &mut a, now, rng)
        }
        End::Protocol { line, why } => {
            a.reason = Some(AttemptReason::Protocol);
            a.error = Some(format!(
                "the worker{pid} broke the protocol ({why}): {line}; it was restarted"
            ));
            retry_or_fail(q, c, &mut a, now, rng)
        }
        End::TimedOut { killed_with } => {
            a.reason = Some(AttemptReason::Timeout);
            a.signal = Some(killed_with);
            a.error = Some(format!(
                "timed out after {} (the worker's process group was stopped with {}; the worker was restarted)",
                humantime::format_duration(q.timeout),
                signal_name(killed_with)
            ));
            retry_or_fail(q, c, &mut a, now, rng)
        }
        End::Cancelled => {
            a.reason = Some(AttemptReason::Cancelled);
            a.error =
                Some("cancelled by an operator while running (its worker was restarted)".into());
            Finish::Cancelled
        }
        End::Interrupted => {
            a.reason = Some(AttemptReason::Shutdown);
            a.error =
                Some("the daemon shut down; put back in the queue (attempt not charged)".into());
            Finish::Requeue
        }
        End::Unavailable => Finish::Release,
    };
    (a, finish)
}

/// One task handed to a slot.
struct Job {
    task: TaskRecord,
    attempt: u32,
    stop: Stop,
    spawned: Option<oneshot::Sender<Spawned>>,
    reply: oneshot::Sender<Outcome>,
}

struct Slot {
    index: usize,
    jobs: mpsc::Sender<Job>,
    /// RUNNING and waiting for a task, not reserved.
    idle: AtomicBool,
    /// Its worker is RUNNING (idle or busy): a reservation given back makes it idle again
    /// only then.
    serving: AtomicBool,
    /// The slot is no longer wanted (concurrency lowered, queue removed or changed mode).
    retire: CancellationToken,
    info: Mutex<WorkerInfo>,
}

impl Slot {
    fn set(&self, registry: &Registry, f: impl FnOnce(&mut WorkerInfo)) {
        {
            let mut info = self.info.lock().expect("not poisoned");
            f(&mut info);
        }
        registry.changed();
    }

    fn set_state(&self, registry: &Registry, state: WorkerState) {
        self.set(registry, |i| {
            if i.state != state {
                i.state = state;
                i.since_ms = now_ms();
            }
        });
    }
}

/// The settings a worker process was started with: a change to any of them restarts it.
fn identity(q: &QueueConfig) -> impl PartialEq + '_ {
    (
        q.worker().map(|w| &w.argv),
        &q.env,
        &q.cwd,
        &q.user,
        &q.group,
        q.umask,
        q.limits,
        &q.env_inherit,
    )
}

struct Shared {
    queue: QueueName,
    /// The queue's current settings and their generation (bumped when a worker must restart).
    current: Mutex<(u64, Arc<Prepared>)>,
    /// (generation, reloads): slots watch it to restart stale workers and leave FATAL.
    version: watch::Sender<(u64, u64)>,
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Wakes the queue's dispatcher when a worker becomes RUNNING.
    kick: Box<dyn Fn() + Send + Sync>,
    registry: Arc<Registry>,
    /// One reload restart at a time.
    roll: Arc<Semaphore>,
    stop: CancellationToken,
    kill_now: CancellationToken,
    loops: TaskTracker,
}

impl Shared {
    fn current(&self) -> (u64, Arc<Prepared>) {
        let c = self.current.lock().expect("not poisoned");
        (c.0, c.1.clone())
    }
}

/// The workers of one queue.
pub struct Pool {
    shared: Arc<Shared>,
}

/// A slot reserved for one task: it was idle and now waits for [`Reserved::run`].
pub struct Reserved {
    slot: Option<Arc<Slot>>,
}

impl Reserved {
    /// Runs the task on the reserved worker. `spawned` receives the worker's pid at once.
    pub async fn run(
        mut self,
        task: TaskRecord,
        attempt: u32,
        stop: Stop,
        spawned: Option<oneshot::Sender<Spawned>>,
    ) -> Outcome {
        let Some(slot) = self.slot.take() else {
            return Outcome::unavailable();
        };
        let (reply, rx) = oneshot::channel();
        let job = Job {
            task,
            attempt,
            stop,
            spawned,
            reply,
        };
        if slot.jobs.send(job).await.is_err() {
            return Outcome::unavailable();
        }
        rx.await.unwrap_or_else(|_| Outcome::unavailable())
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        // Not used: the worker is idle again, unless it stopped meanwhile. (The daemon's
        // runtime has one thread: nothing runs between this check and the store.)
        if let Some(slot) = self.slot.take() {
            if slot.serving.load(Ordering::Acquire) {
                slot.idle.store(true, Ordering::Release);
            }
        }
    }
}

impl Pool {
    /// Starts `concurrency` workers for the queue. `kick` wakes its dispatcher.
    pub fn new(
        prepared: Arc<Prepared>,
        registry: Arc<Registry>,
        kill_now: CancellationToken,
        kick: Box<dyn Fn() + Send + Sync>,
    ) -> Arc<Pool> {
        let (version, _) = watch::channel((0, 0));
        let shared = Arc::new(Shared {
            queue: prepared.config.name.clone(),
            current: Mutex::new((0, prepared.clone())),
            version,
            slots: Mutex::new(Vec::new()),
            kick,
            registry: registry.clone(),
            roll: Arc::new(Semaphore::new(1)),
            stop: CancellationToken::new(),
            kill_now,
            loops: TaskTracker::new(),
        });
        registry.add(&shared);
        let pool = Arc::new(Pool { shared });
        pool.resize(prepared.config.concurrency);
        pool
    }

    fn resize(&self, n: usize) {
        let mut slots = self.shared.slots.lock().expect("not poisoned");
        while slots.len() > n {
            if let Some(s) = slots.pop() {
                s.retire.cancel();
            }
        }
        while slots.len() < n {
            let (tx, rx) = mpsc::channel(1);
            let slot = Arc::new(Slot {
                index: slots.len(),
                jobs: tx,
                idle: AtomicBool::new(false),
                serving: AtomicBool::new(false),
                retire: CancellationToken::new(),
                info: Mutex::new(WorkerInfo::new(&self.shared.queue, slots.len())),
            });
            slots.push(slot.clone());
            let shared = self.shared.clone();
            self.shared.loops.spawn(async move {
                slot_loop(shared.clone(), slot.clone(), rx).await;
                slot.set(&shared.registry, |i| {
                    i.state = WorkerState::Stopped;
                    i.pid = None;
                });
            });
        }
        self.shared.registry.changed();
    }

    /// A reload: new settings for the next tasks; workers whose command, user, env or cwd
    /// changed restart one at a time; FATAL workers try again; concurrency is applied.
    pub fn apply(&self, prepared: Arc<Prepared>) {
        let n = prepared.config.concurrency;
        {
            let mut cur = self.shared.current.lock().expect("not poisoned");
            let restart = identity(&cur.1.config) != identity(&prepared.config);
            if restart {
                cur.0 += 1;
            }
            cur.1 = prepared;
            let generation = cur.0;
            self.shared
                .version
                .send_modify(|v| *v = (generation, v.1 + 1));
        }
        self.resize(n);
    }

    /// Workers idle and RUNNING now: how many tasks may be claimed for them.
    pub fn available(&self) -> usize {
        self.shared
            .slots
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|s| s.idle.load(Ordering::Acquire))
            .count()
    }

    /// Takes an idle worker for one task.
    pub fn reserve(&self) -> Option<Reserved> {
        let slots = self.shared.slots.lock().expect("not poisoned");
        slots.iter().find_map(|s| {
            s.idle
                .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
                .then(|| Reserved {
                    slot: Some(s.clone()),
                })
        })
    }

    /// Stops every worker (after its current task, or at once with the daemon's kill) and
    /// waits until they are gone.
    pub async fn shutdown(&self) {
        self.shared.stop.cancel();
        self.shared.loops.close();
        self.shared.loops.wait().await;
        self.shared.registry.changed();
    }

    /// Stops the workers without waiting (the queue left the config or runs a command now).
    pub fn retire(&self) {
        self.shared.stop.cancel();
        self.shared.loops.close();
    }
}

/// Why a slot's worker stops serving.
enum Leave {
    /// Recycle without backoff (max tasks, memory, timeout, cancel, reload).
    Recycle(String),
    /// Died or misbehaved: restart with backoff.
    Failed(String),
    /// The daemon or the slot stops.
    Stop,
    /// A reload changed what the worker runs: restart holding the rolling permit.
    Stale(OwnedSemaphorePermit),
}

/// Answers jobs while the slot has no worker to give them to: they go back to the queue.
fn refuse_pending(jobs: &mut mpsc::Receiver<Job>) {
    while let Ok(job) = jobs.try_recv() {
        let _ = job.reply.send(Outcome::unavailable());
    }
}

/// Waits for `until`, refusing any job that arrives meanwhile.
async fn wait_refusing(
    jobs: &mut mpsc::Receiver<Job>,
    until: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => return,
            job = jobs.recv() => match job {
                Some(job) => { let _ = job.reply.send(Outcome::unavailable()); }
                None => { until.await; return; }
            },
        }
    }
}

async fn slot_loop(shared: Arc<Shared>, slot: Arc<Slot>, mut jobs: mpsc::Receiver<Job>) {
    let reg = shared.registry.clone();
    let mut version = shared.version.subscribe();
    let mut failed_starts = 0u32;
    let mut streak = 0u32;
    let mut permit: Option<OwnedSemaphorePermit> = None;
    loop {
        if shared.stop.is_cancelled() || slot.retire.is_cancelled() {
            break;
        }
        let (generation, prepared) = shared.current();
        let Some(w) = prepared.config.worker().cloned() else {
            break;
        };
        if failed_starts >= w.start_retries {
            // A reload restart whose new worker cannot start keeps the rolling permit: the
            // rollout stops here, and the other workers keep running their old settings.
            slot.set(&reg, |i| {
                // The worker's own last words usually name the cause (a missing file, an
                // import error); the way it ended rarely does.
                let said = i
                    .last_stderr
                    .last()
                    .map(|l| format!("; its stderr ended with: {l}"))
                    .unwrap_or_default();
                i.why = Some(format!(
                    "{} failed starts in a row (start_retries = {}); last: {}{said}. Its tasks wait; fix the worker and `taskd reload`",
                    failed_starts,
                    w.start_retries,
                    i.last_exit.as_deref().unwrap_or("unknown")
                ));
            });
            slot.set_state(&reg, WorkerState::Fatal);
            tracing::error!(queue = %shared.queue, slot = slot.index, failed_starts, "worker is FATAL: it failed to start {} times in a row; its tasks wait until a reload", failed_starts);
            let seen = version.borrow_and_update().1;
            let stop = shared.stop.clone();
            let retire = slot.retire.clone();
            let mut v = version.clone();
            wait_refusing(&mut jobs, async move {
                tokio::select! {
                    _ = v.wait_for(|x| x.1 != seen) => {}
                    _ = stop.cancelled() => {}
                    _ = retire.cancelled() => {}
                }
            })
            .await;
            failed_starts = 0;
            streak = 0;
            continue;
        }
        if streak > 0 {
            let delay = restart_delay(streak);
            slot.set_state(&reg, WorkerState::Backoff);
            let stop = shared.stop.clone();
            let retire = slot.retire.clone();
            wait_refusing(&mut jobs, async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => {}
                    _ = retire.cancelled() => {}
                }
            })
            .await;
            if shared.stop.is_cancelled() || slot.retire.is_cancelled() {
                break;
            }
        }

        // STARTING
        slot.set(&reg, |i| {
            i.pid = None;
            i.why = None;
        });
        slot.set_state(&reg, WorkerState::Starting);
        let extra_env = vec![
            (
                "TASKD_WORKER_PROTOCOL".to_string(),
                protocol::VERSION.to_string(),
            ),
            ("TASKD_TASK_FD".to_string(), protocol::TASK_FD.to_string()),
            (
                "TASKD_RESULT_FD".to_string(),
                protocol::RESULT_FD.to_string(),
            ),
            ("TASKD_WORKER_SLOT".to_string(), slot.index.to_string()),
        ];
        let spawned = prepared.worker_spec(&extra_env).and_then(|spec| {
            Proc::spawn(&spec)
                .map_err(|e| spawn_error(&w.argv, &e))
                .map(|p| (spec, p))
        });
        let (spec, mut p) = match spawned {
            Ok(x) => x,
            Err(why) => {
                tracing::warn!(queue = %shared.queue, slot = slot.index, error = %why, "failed to start a worker");
                failed_starts += 1;
                streak += 1;
                slot.set(&reg, |i| {
                    i.last_exit = Some(why);
                    i.last_stderr.clear();
                });
                continue;
            }
        };
        let started = Instant::now();
        slot.set(&reg, |i| {
            i.pid = Some(p.pid);
            i.start_time = p.start_time;
            i.started_ms = Some(now_ms());
            i.tasks_done = 0;
        });
        // Written before the worker can get a task, so that a daemon killed from now on
        // leaves a record of it for the next one.
        reg.write_now();
        tracing::info!(queue = %shared.queue, slot = slot.index, pid = p.pid, "worker starting");

        // Handshake: `ready`, then alive for start_secs.
        let mut idle_out = IdleOutput::new(&shared.queue, slot.index, p.pid);
        let hello = handshake(&mut p, &w, &shared, &slot, &mut jobs, &mut idle_out).await;
        if let Err(end) = hello {
            let st = p
                .stop(spec.kill_grace, &shared.kill_now, |ev| idle_out.event(ev))
                .await;
            let HandshakeEnd::Failed(why) = end else {
                break; // the daemon or the slot stops
            };
            let why = match st {
                Some(st) if !why.contains(&describe(&st)) => {
                    format!("{why} (then {})", describe(&st))
                }
                _ => why,
            };
            let said = idle_out.last_stderr.take();
            tracing::warn!(queue = %shared.queue, slot = slot.index, pid = p.pid, error = %why, stderr = said.last().map(String::as_str).unwrap_or(""), "worker failed to start");
            failed_starts += 1;
            streak += 1;
            slot.set(&reg, |i| {
                i.last_exit = Some(why);
                i.last_stderr = said;
                i.pid = None;
            });
            continue;
        }
        failed_starts = 0;
        // A reload restart is done once its replacement runs: the next worker may go.
        drop(permit.take());
        slot.set_state(&reg, WorkerState::Running);
        tracing::info!(queue = %shared.queue, slot = slot.index, pid = p.pid, after = ?started.elapsed(), "worker running");
        slot.serving.store(true, Ordering::Release);
        slot.idle.store(true, Ordering::Release);
        (shared.kick)();

        let leave = serve(
            &shared,
            &slot,
            &mut p,
            &mut jobs,
            &mut version,
            generation,
            &mut idle_out,
            &mut streak,
        )
        .await;
        slot.serving.store(false, Ordering::Release);
        slot.idle.store(false, Ordering::Release);
        refuse_pending(&mut jobs);
        let (why, failed) = match leave {
            Leave::Recycle(why) => (why, false),
            Leave::Failed(why) => (why, true),
            Leave::Stale(p) => {
                permit = Some(p);
                (
                    "its command, user, env or cwd changed (reload)".to_string(),
                    false,
                )
            }
            Leave::Stop => ("taskd is stopping it".to_string(), false),
        };
        if p.exited.is_none() {
            slot.set_state(&reg, WorkerState::Stopping);
        }
        let st = p
            .stop(spec.kill_grace, &shared.kill_now, |ev| idle_out.event(ev))
            .await;
        idle_out.flush();
        let exit = st.as_ref().map(describe).unwrap_or_else(|| "ended".into());
        let last = format!("{exit}: {why}");
        tracing::info!(queue = %shared.queue, slot = slot.index, pid = p.pid, "worker ended ({last})");
        let said = idle_out.last_stderr.take();
        slot.set(&reg, |i| {
            i.last_exit = Some(last);
            i.last_stderr = said;
            i.pid = None;
        });
        if failed {
            streak += 1;
        }
    }
    slot.idle.store(false, Ordering::Release);
    refuse_pending(&mut jobs);
    jobs.close();
    refuse_pending(&mut jobs);
}

fn spawn_error(argv: &[String], e: &std::io::Error) -> String {
    let program = argv.first().map(String::as_str).unwrap_or("");
    match e.raw_os_error() {
        Some(libc::ENOENT) => format!("program not found: {program}"),
        Some(libc::EACCES) => format!("permission denied (not executable): {program}"),
        _ => format!("failed to start {program}: {e}"),
    }
}

enum HandshakeEnd {
    Failed(String),
    Stop,
}

/// STARTING until the worker said `ready` and has lived `start_secs`.
async fn handshake(
    p: &mut Proc,
    w: &crate::config::WorkerProgram,
    shared: &Shared,
    slot: &Slot,
    jobs: &mut mpsc::Receiver<Job>,
    out: &mut IdleOutput,
) -> Result<(), HandshakeEnd> {
    let began = Instant::now();
    let ready_by = began + READY_TIMEOUT.max(w.start_secs);
    let running_at = began + w.start_secs;
    let mut ready = false;
    loop {
        if ready && Instant::now() >= running_at {
            return Ok(());
        }
        tokio::select! {
            ev = p.next_event() => match ev {
                Event::Line(line) => match protocol::parse(&line) {
                    Ok(WorkerMessage::Ready { protocol: v }) if v == protocol::VERSION => ready = true,
                    Ok(WorkerMessage::Ready { protocol: v }) => {
                        return Err(HandshakeEnd::Failed(format!("it speaks protocol version {v}; this taskd speaks {}", protocol::VERSION)));
                    }
                    Ok(_) => return Err(HandshakeEnd::Failed(format!("it sent {} before `ready`", protocol::show_line(&line)))),
                    Err(why) => {
                        let shown = protocol::show_line(&line);
                        tracing::warn!(queue = %shared.queue, slot = slot.index, pid = p.pid, line = %shown, "worker sent garbage instead of `ready`: {why}");
                        return Err(HandshakeEnd::Failed(format!("protocol error before `ready` ({why}): {shown}")));
                    }
                },
                Event::TooLong(line) => return Err(HandshakeEnd::Failed(format!("a message line over {} bytes: {}", protocol::MAX_LINE, protocol::show_line(&line)))),
                Event::ResultsClosed => return Err(HandshakeEnd::Failed("it closed its result pipe (fd 4) before `ready`".into())),
                Event::Exit(st) => {
                    let what = if ready { "after `ready`, before start_secs" } else { "before `ready`" };
                    return Err(HandshakeEnd::Failed(format!("{} {what}", describe(&st))));
                }
                Event::Gone => return Err(HandshakeEnd::Failed("ended before `ready`".into())),
                ev => out.event(ev),
            },
            _ = tokio::time::sleep_until(running_at), if ready => {}
            _ = tokio::time::sleep_until(ready_by), if !ready => {
                return Err(HandshakeEnd::Failed(format!("no `ready` message within {}", humantime::format_duration(READY_TIMEOUT.max(w.start_secs)))));
            }
            job = jobs.recv() => if let Some(job) = job { let _ = job.reply.send(Outcome::unavailable()); },
            _ = shared.stop.cancelled() => return Err(HandshakeEnd::Stop),
            _ = slot.retire.cancelled() => return Err(HandshakeEnd::Stop),
        }
    }
}

/// Output a worker writes between tasks: to the daemon's log, a line per event.
struct IdleOutput {
    span: tracing::Span,
    out: Lines,
    err: Lines,
    /// What `taskd status` shows of it once the process ends.
    last_stderr: status::LastLines,
}

impl IdleOutput {
    fn new(queue: &QueueName, slot: usize, pid: i32) -> Self {
        IdleOutput {
            span: tracing::info_span!("worker", queue = %queue, slot, pid),
            out: Lines::new("stdout"),
            err: Lines::new("stderr"),
            last_stderr: status::LastLines::default(),
        }
    }

    fn event(&mut self, ev: Event) {
        let _g = self.span.enter();
        match ev {
            Event::Stdout(d) => self.out.push(&d),
            Event::Stderr(d) => {
                self.last_stderr.push(&d);
                self.err.push(&d)
            }
            Event::Line(l) | Event::TooLong(l) => {
                tracing::debug!(line = %protocol::show_line(&l), "worker message while stopping; ignored")
            }
            _ => {}
        }
    }

    fn flush(&mut self) {
        let _g = self.span.enter();
        self.out.flush();
        self.err.flush();
    }
}

/// RUNNING: take tasks one at a time until the worker must go.
#[allow(clippy::too_many_arguments)]
async fn serve(
    shared: &Shared,
    slot: &Slot,
    p: &mut Proc,
    jobs: &mut mpsc::Receiver<Job>,
    version: &mut watch::Receiver<(u64, u64)>,
    generation: u64,
    idle_out: &mut IdleOutput,
    streak: &mut u32,
) -> Leave {
    loop {
        let stale = version.borrow().0 != generation;
        tokio::select! {
            biased;
            job = jobs.recv() => {
                let Some(job) = job else { return Leave::Stop };
                idle_out.flush();
                match run_task(shared, slot, p, job).await {
                    Ok(()) => {
                        *streak = 0;
                    }
                    Err(leave) => return leave,
                }
            }
            ev = p.next_event() => match ev {
                Event::Stdout(_) | Event::Stderr(_) => idle_out.event(ev),
                Event::Exit(st) => return Leave::Failed(format!("exited while idle ({})", describe(&st))),
                Event::Gone => return Leave::Failed("ended while idle".into()),
                Event::ResultsClosed => return Leave::Failed("closed its result pipe (fd 4)".into()),
                Event::Line(l) | Event::TooLong(l) => {
                    let shown = protocol::show_line(&l);
                    tracing::warn!(queue = %shared.queue, slot = slot.index, pid = p.pid, line = %shown, "worker sent a message while idle; restarting it");
                    return Leave::Failed(format!("protocol error: unexpected message while idle: {shown}"));
                }
            },
            _ = version.changed() => {}
            permit = shared.roll.clone().acquire_owned(), if stale => {
                let Ok(permit) = permit else { continue };
                if slot.idle.compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    return Leave::Stale(permit);
                }
                // A task is on its way to this worker: take it first.
            }
            _ = shared.stop.cancelled() => return Leave::Stop,
            _ = slot.retire.cancelled() => return Leave::Stop,
        }
    }
}

/// Runs one task on the worker. `Ok` when the worker answered and may take the next one
/// (it is then idle again, before the answer goes out); `Err` says why it must go.
async fn run_task(shared: &Shared, slot: &Slot, p: &mut Proc, job: Job) -> Result<(), Leave> {
    let (_, prepared) = shared.current();
    let q = &prepared.config;
    let w = q.worker().cloned();
    let task = &job.task;
    let span = tracing::info_span!("task", queue = %q.name, task = %task.id, attempt = job.attempt);
    let started_at_ms = now_ms();
    if let Some(tx) = job.spawned {
        let _ = tx.send(Spawned { pid: p.pid });
    }
    let msg = protocol::TaskMessage {
        kind: "task",
        id: task.id,
        queue: &task.queue,
        attempt: job.attempt,
        max_attempts: q.max_attempts,
        payload: &task.payload,
        args: &task.args,
    };
    let mut line = serde_json::to_vec(&msg).expect("a task message serializes");
    line.push(b'\n');
    let log = q.log_dir.as_ref().map(|dir| {
        (
            crate::executor::open_log(
                &dir.join(format!("{}.{}.out", task.id, job.attempt)),
                q.log_max,
            ),
            crate::executor::open_log(
                &dir.join(format!("{}.{}.err", task.id, job.attempt)),
                q.log_max,
            ),
        )
    });
    let (log_out, log_err) = log.unwrap_or((None, None));
    let mut out = Capture::new(q.output_tail, log_out);
    let mut err = Capture::new(q.output_tail, log_err);
    if q.log_output {
        out.lines = Some(Lines::new("stdout"));
        err.lines = Some(Lines::new("stderr"));
    }
    let deadline = Instant::now().checked_add(q.timeout);
    let stop = job.stop;
    // Why taskd is stopping the worker, and when SIGKILL is due.
    let mut stopping: Option<End> = None;
    let mut kill_at: Option<Instant> = None;
    let mut last_signal = Signal::SIGTERM;
    let mut closed_at: Option<Instant> = None;
    let begin_stop = |p: &Proc, grace: Duration| {
        p.signal(Signal::SIGTERM);
        p.signal(Signal::SIGCONT);
        Instant::now().checked_add(grace)
    };
    // The task line is written beside everything else, so that a worker that reads it slowly
    // (a big payload) can still print, time out or be cancelled meanwhile.
    let mut tx = p.take_tasks();
    let mut written = false;
    let end: End = {
        let write = async {
            if let Some(t) = tx.as_mut() {
                // An error means the worker died: its exit comes next.
                let _ = tokio::io::AsyncWriteExt::write_all(t, &line).await;
            }
        };
        tokio::pin!(write);
        loop {
            tokio::select! {
                biased;
                ev = p.next_event() => match ev {
                    Event::Stdout(d) => span.in_scope(|| out.push(&d)),
                    Event::Stderr(d) => span.in_scope(|| err.push(&d)),
                    Event::Line(l) => {
                        if stopping.is_some() {
                            continue;
                        }
                        match protocol::parse(&l) {
                            Ok(WorkerMessage::Result { id, .. }) if id == task.id && !written => {
                                let shown = protocol::show_line(&l);
                                span.in_scope(|| tracing::warn!(pid = p.pid, line = %shown, "worker answered before it read its whole task; restarting it"));
                                break End::Protocol { line: shown, why: "a result before the whole task was read".into() };
                            }
                            Ok(WorkerMessage::Result { id, status, message }) if id == task.id => {
                                break End::Answered { status, message };
                            }
                            Ok(WorkerMessage::Progress { id, message }) if id == task.id => {
                                span.in_scope(|| tracing::debug!(message = message.as_deref().unwrap_or(""), "progress"));
                            }
                            Ok(other) => {
                                let shown = protocol::show_line(&l);
                                span.in_scope(|| tracing::warn!(pid = p.pid, line = %shown, "worker broke the protocol; restarting it"));
                                let why = match other {
                                    WorkerMessage::Ready { .. } => "`ready` while a task runs".to_string(),
                                    _ => "a message for another task".to_string(),
                                };
                                break End::Protocol { line: shown, why };
                            }
                            Err(why) => {
                                let shown = protocol::show_line(&l);
                                span.in_scope(|| tracing::warn!(pid = p.pid, line = %shown, "worker sent an invalid message ({why}); restarting it"));
                                break End::Protocol { line: shown, why };
                            }
                        }
                    }
                    Event::TooLong(l) => {
                        if stopping.is_some() {
                            continue;
                        }
                        let shown = protocol::show_line(&l);
                        span.in_scope(|| tracing::warn!(pid = p.pid, line = %shown, "worker sent a message line over the limit; restarting it"));
                        break End::Protocol { line: shown, why: format!("a line over {} bytes", protocol::MAX_LINE) };
                    }
                    Event::ResultsClosed => {
                        // Usually the worker is exiting: wait briefly for its status.
                        if stopping.is_none() {
                            closed_at = Instant::now().checked_add(EXIT_AFTER_CLOSE);
                        }
                    }
                    Event::Exit(st) => {
                        use std::os::unix::process::ExitStatusExt;
                        if let Some(end) = stopping.take() {
                            break match end {
                                End::TimedOut { .. } => End::TimedOut { killed_with: last_signal as i32 },
                                other => other,
                            };
                        }
                        break End::Crashed { how: describe(&st), signal: st.signal() };
                    }
                    Event::Gone => break stopping.take().unwrap_or(End::Crashed { how: "ended".into(), signal: None }),
                },
                _ = &mut write, if !written => written = true,
                _ = sleep_opt(closed_at), if closed_at.is_some() && stopping.is_none() => {
                    break End::Crashed { how: "it closed its result pipe (fd 4) without answering".into(), signal: None };
                }
                _ = sleep_opt(deadline), if stopping.is_none() => {
                    stopping = Some(End::TimedOut { killed_with: 15 });
                    kill_at = begin_stop(p, q.kill_grace);
                }
                _ = stop.cancel.cancelled(), if stopping.is_none() => {
                    stopping = Some(End::Cancelled);
                    kill_at = begin_stop(p, q.kill_grace);
                }
                _ = stop.shutdown.cancelled(), if stopping.is_none() => {
                    stopping = Some(End::Interrupted);
                    kill_at = begin_stop(p, q.kill_grace);
                }
                _ = sleep_opt(kill_at), if kill_at.is_some() => {
                    p.signal(Signal::SIGKILL);
                    last_signal = Signal::SIGKILL;
                    kill_at = None;
                }
                _ = stop.kill.cancelled(), if last_signal != Signal::SIGKILL => {
                    if stopping.is_none() {
                        stopping = Some(End::Interrupted);
                    }
                    p.signal(Signal::SIGKILL);
                    last_signal = Signal::SIGKILL;
                    kill_at = None;
                }
            }
        }
    };
    p.restore_tasks(tx);
    // What it printed before answering (or dying) is already in the pipes.
    span.in_scope(|| {
        p.drain_now(|is_err, d| if is_err { err.push(d) } else { out.push(d) });
        out.finish();
        err.finish();
    });
    let answered = matches!(end, End::Answered { .. });
    let mut leave = None;
    if answered {
        let done = {
            let mut info = slot.info.lock().expect("not poisoned");
            info.tasks_done += 1;
            info.tasks_done
        };
        if let Some(w) = &w {
            if w.max_tasks.is_some_and(|m| done >= m) {
                leave = Some(Leave::Recycle(format!(
                    "recycled after {done} tasks (max_tasks_per_worker)"
                )));
            } else if let Some(max) = w.max_memory {
                match p.rss() {
                    Some(rss) if rss > max => {
                        tracing::info!(queue = %q.name, slot = slot.index, pid = p.pid, rss, max, "worker over max_worker_memory; recycling it");
                        leave = Some(Leave::Recycle(format!(
                            "recycled: RSS {} MiB over max_worker_memory {} MiB",
                            rss / (1024 * 1024),
                            max / (1024 * 1024)
                        )));
                    }
                    Some(_) => {}
                    // Once per worker process: /proc hidden (ProtectProc=) or the leader gone.
                    None if done == 1 => {
                        tracing::warn!(queue = %q.name, slot = slot.index, pid = p.pid, "cannot read the worker's memory use from /proc/PID/status; max_worker_memory is not enforced for it")
                    }
                    None => {}
                }
            }
        }
        if leave.is_none() && !shared.stop.is_cancelled() && !slot.retire.is_cancelled() {
            // Idle again before the answer goes out, so the supervisor can hand this worker
            // its next task as soon as it has recorded this one.
            slot.idle.store(true, Ordering::Release);
        }
    } else {
        leave = Some(match &end {
            End::Crashed { how, .. } => {
                Leave::Failed(format!("died while running task {} ({how})", task.id))
            }
            End::Protocol { line, why } => Leave::Failed(format!(
                "protocol error during task {} ({why}): {line}",
                task.id
            )),
            End::TimedOut { .. } => Leave::Recycle(format!("task {} timed out", task.id)),
            End::Cancelled => Leave::Recycle(format!("task {} was cancelled", task.id)),
            _ => Leave::Stop,
        });
    }
    let outcome = Outcome {
        end,
        pid: Some(p.pid),
        started_at_ms,
        ended_at_ms: now_ms(),
        stdout_tail: out.tail.into_vec(),
        stderr_tail: err.tail.into_vec(),
    };
    let _ = job.reply.send(outcome);
    shared.registry.touched();
    match leave {
        None => Ok(()),
        Some(l) => Err(l),
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::config::{Program, WorkerProgram};

    fn queue() -> QueueConfig {
        let mut q = QueueConfig::new(
            "q".parse().expect("a valid name"),
            Program::Worker(WorkerProgram::new(vec!["w".into()])),
        );
        q.max_attempts = 3;
        q
    }

    fn decide_end(attempt: u32, end: End) -> (AttemptRecord, Finish) {
        let o = Outcome {
            end,
            pid: Some(42),
            started_at_ms: 1,
            ended_at_ms: 2,
            stdout_tail: b"out".to_vec(),
            stderr_tail: Vec::new(),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        decide(
            &queue(),
            &crate::supervisor::policy::test_claimed(attempt),
            "n",
            o,
            1_000,
            &mut rng,
        )
    }

    #[test]
    fn answers_map_to_success_failure_and_retry() {
        let ok = End::Answered {
            status: ResultStatus::Ok,
            message: None,
        };
        let (a, f) = decide_end(1, ok);
        assert_eq!(
            (a.reason, f),
            (Some(AttemptReason::Result), Finish::Succeeded)
        );
        assert_eq!(a.stdout_tail, "out");
        let error = End::Answered {
            status: ResultStatus::Error,
            message: Some("bad payload".into()),
        };
        let (a, f) = decide_end(1, error);
        assert_eq!(f, Finish::Failed, "error is not retried");
        assert!(a.error.unwrap().contains("bad payload"));
        let retry = End::Answered {
            status: ResultStatus::Retry,
            message: Some("busy".into()),
        };
        assert!(matches!(
            decide_end(1, retry.clone()).1,
            Finish::Retry { .. }
        ));
        assert_eq!(decide_end(3, retry).1, Finish::Failed, "attempts spent");
    }

    #[test]
    fn crashes_protocol_errors_and_timeouts_are_failed_attempts() {
        let (a, f) = decide_end(
            1,
            End::Crashed {
                how: "killed by SIGKILL".into(),
                signal: Some(9),
            },
        );
        assert_eq!((a.reason, a.signal), (Some(AttemptReason::Crash), Some(9)));
        assert!(a.error.unwrap().contains("(pid 42) died"));
        assert!(matches!(f, Finish::Retry { .. }));
        let (a, f) = decide_end(
            3,
            End::Protocol {
                line: "\"junk\"".into(),
                why: "not JSON".into(),
            },
        );
        assert_eq!(
            (a.reason, f),
            (Some(AttemptReason::Protocol), Finish::Failed)
        );
        assert!(a.error.unwrap().contains("junk"));
        let (a, _) = decide_end(1, End::TimedOut { killed_with: 15 });
        assert_eq!(a.reason, Some(AttemptReason::Timeout));
        let (a, f) = decide_end(3, End::Interrupted);
        assert_eq!(
            (a.reason, f),
            (Some(AttemptReason::Shutdown), Finish::Requeue)
        );
        assert_eq!(decide_end(1, End::Unavailable).1, Finish::Release);
    }

    #[test]
    fn restart_delay_doubles_up_to_a_minute() {
        assert_eq!(restart_delay(1), Duration::from_millis(500));
        assert_eq!(restart_delay(2), Duration::from_secs(1));
        assert_eq!(restart_delay(4), Duration::from_secs(4));
        assert_eq!(restart_delay(30), RESTART_MAX);
    }
}
