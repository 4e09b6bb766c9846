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
//! What it must not do: see the broker or the supervisor. A pool is handed its queue's
//! config and the built spec of its worker process ([`Settings`]); a reserved worker is
//! handed a task and reports an executor [`Outcome`], as a process of its own would. The
//! supervisor claims tasks (only while a worker is idle: [`Pool::reserve`]), records starts
//! and results, and its policy turns the outcome into task state.

mod fork;
mod process;
mod program;
pub mod protocol;
pub mod status;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Doubling;
use crate::config::{QueueConfig, WorkerProgram};
use crate::executor::live::{LiveOutput, Stream};
use crate::executor::output::{Capture, Lines};
use crate::executor::{
    open_log, sleep_until_opt, Escalation, LogSpec, Outcome, Returned, Runner, Spawned, Spec,
    Status, Stop, StopWhy, Verdict,
};
use crate::model::{now_ms, QueueName, TaskId, TaskRecord};
use process::{describe, Event, Proc, Wiring};
use protocol::{ResultStatus, WorkerMessage};
pub use status::{kill_leftovers, Registry, WorkerInfo, WorkerState};

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
    Doubling::new(RESTART_BASE, RESTART_MAX).nth(streak)
}

/// What a pool runs: the queue's settings and the spec of its worker process (`Err` says
/// why no worker can start, e.g. a user that does not exist), built by the caller.
pub struct Settings {
    pub config: Arc<QueueConfig>,
    pub spec: Result<Spec, String>,
}

/// The answer for a task that no worker took: nothing ran, so it goes back uncharged.
fn unavailable() -> Outcome {
    let mut o = Outcome::not_started(Status::Unavailable, now_ms());
    o.ran_on = Runner::Worker;
    o
}

impl From<ResultStatus> for Verdict {
    fn from(status: ResultStatus) -> Verdict {
        match status {
            ResultStatus::Ok => Verdict::Ok,
            ResultStatus::Error => Verdict::Error,
            ResultStatus::Retry => Verdict::Retry,
        }
    }
}

/// One task handed to a slot.
struct Job {
    task: TaskRecord,
    attempt: u32,
    /// The attempt's full-output files, if the queue keeps them.
    log: Option<LogSpec>,
    /// The attempt's live ring, for followers.
    live: Option<Arc<LiveOutput>>,
    stop: Stop,
    spawned: Option<oneshot::Sender<Spawned>>,
    reply: oneshot::Sender<Outcome>,
    /// The caller's span (the supervisor's `task{queue, task, attempt}` of this run), for
    /// the log lines of the run; none when the caller had none.
    span: tracing::Span,
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
    fn set(&self, registry: &Registry, change: impl FnOnce(&mut WorkerInfo)) {
        {
            let mut info = self.info.lock().expect("not poisoned");
            change(&mut info);
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
fn identity(queue: &QueueConfig) -> impl PartialEq + '_ {
    (
        queue.worker().map(|w| (&w.argv, w.fork)),
        &queue.env,
        &queue.cwd,
        &queue.user,
        &queue.group,
        queue.umask,
        queue.limits,
        &queue.env_inherit,
    )
}

struct Shared {
    queue: QueueName,
    /// The queue's current settings and their generation (bumped when a worker must restart).
    current: Mutex<(u64, Arc<Settings>)>,
    /// (generation, reloads): slots watch it to restart stale workers and leave FATAL.
    version: watch::Sender<(u64, u64)>,
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Wakes the queue's dispatcher when a worker becomes RUNNING.
    kick: Box<dyn Fn() + Send + Sync>,
    registry: Arc<Registry>,
    /// One rolling restart at a time (reload, `taskd restart`, a changed program file).
    roll: Arc<Semaphore>,
    /// Why the workers of an older generation restart: their last exit says so.
    roll_why: Mutex<String>,
    stop: CancellationToken,
    kill_now: CancellationToken,
    loops: TaskTracker,
    /// With `worker_fork`: the loaded parent the slots fork their workers from (the current
    /// generation's, once one was started). Locked while one starts, so that the slots
    /// starting together share it.
    fork: tokio::sync::Mutex<Option<Arc<fork::ForkServer>>>,
}

impl Shared {
    fn current(&self) -> (u64, Arc<Settings>) {
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
    /// Runs the task on the reserved worker. `spawned` receives the worker's pid at once;
    /// the task's output goes to `live` too.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        mut self,
        task: TaskRecord,
        attempt: u32,
        log: Option<LogSpec>,
        live: Option<Arc<LiveOutput>>,
        stop: Stop,
        spawned: Option<oneshot::Sender<Spawned>>,
    ) -> Outcome {
        let Some(slot) = self.slot.take() else {
            return unavailable();
        };
        let (reply, rx) = oneshot::channel();
        let job = Job {
            task,
            attempt,
            log,
            live,
            stop,
            spawned,
            reply,
            span: tracing::Span::current(),
        };
        if slot.jobs.send(job).await.is_err() {
            return unavailable();
        }
        rx.await.unwrap_or_else(|_| unavailable())
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
        settings: Arc<Settings>,
        registry: Arc<Registry>,
        kill_now: CancellationToken,
        kick: Box<dyn Fn() + Send + Sync>,
    ) -> Arc<Pool> {
        let (version, _) = watch::channel((0, 0));
        let shared = Arc::new(Shared {
            queue: settings.config.name.clone(),
            current: Mutex::new((0, settings.clone())),
            version,
            slots: Mutex::new(Vec::new()),
            kick,
            registry: registry.clone(),
            roll: Arc::new(Semaphore::new(1)),
            roll_why: Mutex::new(String::new()),
            stop: CancellationToken::new(),
            kill_now,
            loops: TaskTracker::new(),
            fork: tokio::sync::Mutex::new(None),
        });
        registry.add(&shared);
        let pool = Arc::new(Pool { shared });
        pool.resize(settings.config.concurrency);
        pool
    }

    fn resize(&self, count: usize) {
        let mut slots = self.shared.slots.lock().expect("not poisoned");
        while slots.len() > count {
            if let Some(s) = slots.pop() {
                s.retire.cancel();
            }
        }
        while slots.len() < count {
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
    /// changed, or (with `restart_on_change`) whose program file changed since the oldest
    /// of them started, restart one at a time; FATAL workers try again; concurrency is
    /// applied. Returns why the workers restart, if they do.
    pub fn apply(&self, settings: Arc<Settings>) -> Option<String> {
        let n = settings.config.concurrency;
        let why = {
            let cur = self.shared.current.lock().expect("not poisoned");
            if identity(&cur.1.config) != identity(&settings.config) {
                Some("its command, user, env or cwd changed (reload)".to_string())
            } else {
                self.changed_program(&settings)
            }
        };
        {
            let mut cur = self.shared.current.lock().expect("not poisoned");
            cur.1 = settings;
        }
        self.roll(why.as_deref());
        self.resize(n);
        why
    }

    /// `taskd restart`: every worker restarts with nothing changed, by the reload's rolling
    /// restart: one at a time, each after its current task, the next once the previous
    /// replacement is RUNNING. Returns how many workers restart.
    pub fn restart(&self) -> usize {
        self.roll(Some("restarted (taskd restart)"));
        self.shared.slots.lock().expect("not poisoned").len()
    }

    /// Starts a new generation when `why` is set (every older worker restarts, saying
    /// `why`), and gives FATAL slots a new chance.
    fn roll(&self, why: Option<&str>) {
        let mut cur = self.shared.current.lock().expect("not poisoned");
        if let Some(why) = why {
            cur.0 += 1;
            *self.shared.roll_why.lock().expect("not poisoned") = why.to_string();
        }
        let generation = cur.0;
        self.shared
            .version
            .send_modify(|v| *v = (generation, v.1 + 1));
    }

    /// With `restart_on_change`: the program file of the queue's workers that was modified
    /// after the oldest running worker started, as a reason to restart them.
    fn changed_program(&self, settings: &Settings) -> Option<String> {
        let w = settings.config.worker()?;
        if !w.restart_on_change {
            return None;
        }
        let spec = settings.spec.as_ref().ok()?;
        let oldest = self
            .shared
            .slots
            .lock()
            .expect("not poisoned")
            .iter()
            .filter_map(|s| {
                let info = s.info.lock().expect("not poisoned");
                info.pid.and(info.started_ms)
            })
            .min()?;
        let (path, mtime) = program::newest(&spec.argv, spec.cwd.as_deref(), &spec.env)?;
        (mtime > oldest).then(|| {
            format!(
                "its program file {} changed (restart_on_change)",
                path.display()
            )
        })
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
        // The workers are gone (their parent reported how they ended): now the parent.
        let server = self.shared.fork.lock().await.take();
        if let Some(server) = server {
            server.shutdown().await;
        }
        self.shared.registry.changed();
    }

    /// Stops the workers without waiting (the queue left the config or runs a command now).
    pub fn retire(&self) {
        self.shared.stop.cancel();
        self.shared.loops.close();
        // The parent goes once its last worker is gone (the workers hold it too).
        if let Ok(mut server) = self.shared.fork.try_lock() {
            server.take();
        }
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
        let _ = job.reply.send(unavailable());
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
                Some(job) => { let _ = job.reply.send(unavailable()); }
                None => { until.await; return; }
            },
        }
    }
}

/// One slot: keeps one worker process alive and serving, through FATAL, BACKOFF, STARTING,
/// RUNNING and its stop, until the daemon or the slot stops.
async fn slot_loop(shared: Arc<Shared>, slot: Arc<Slot>, mut jobs: mpsc::Receiver<Job>) {
    let mut version = shared.version.subscribe();
    // Failed starts in a row (toward start_retries) and unexpected ends in a row (backoff).
    let mut failed_starts = 0u32;
    let mut streak = 0u32;
    let mut permit: Option<OwnedSemaphorePermit> = None;
    loop {
        if stopping(&shared, &slot) {
            break;
        }
        let (generation, settings) = shared.current();
        let Some(w) = settings.config.worker().cloned() else {
            break;
        };
        if failed_starts >= w.start_retries {
            wait_fatal(&shared, &slot, &mut jobs, &mut version, failed_starts, &w).await;
            failed_starts = 0;
            streak = 0;
            continue;
        }
        if streak > 0 {
            wait_backoff(&shared, &slot, &mut jobs, restart_delay(streak)).await;
            if stopping(&shared, &slot) {
                break;
            }
        }
        let (mut p, mut idle_out, kill_grace) =
            match start_worker(&shared, &slot, &mut jobs, &settings, &w, generation).await {
                Ok(started) => started,
                Err(StartEnd::Stop) => break,
                Err(StartEnd::Failed { why, said }) => {
                    failed_starts += 1;
                    streak += 1;
                    slot.set(&shared.registry, |i| {
                        i.last_exit = Some(why);
                        i.last_stderr = said;
                        i.pid = None;
                    });
                    continue;
                }
            };
        failed_starts = 0;
        // A reload restart is done once its replacement runs: the next worker may go.
        drop(permit.take());
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
        let (why, failed) = match leave {
            Leave::Recycle(why) => (why, false),
            Leave::Failed(why) => (why, true),
            Leave::Stale(p) => {
                permit = Some(p);
                (shared.roll_why.lock().expect("not poisoned").clone(), false)
            }
            Leave::Stop => ("taskd is stopping it".to_string(), false),
        };
        stop_worker(&shared, &slot, &mut jobs, p, idle_out, kill_grace, &why).await;
        if failed {
            streak += 1;
        }
    }
    slot.idle.store(false, Ordering::Release);
    refuse_pending(&mut jobs);
    jobs.close();
    refuse_pending(&mut jobs);
}

/// The daemon stops, or this slot is no longer wanted.
fn stopping(shared: &Shared, slot: &Slot) -> bool {
    shared.stop.is_cancelled() || slot.retire.is_cancelled()
}

/// FATAL: `failed_starts` starts in a row failed. Waits for a reload (or the end),
/// refusing tasks meanwhile. A reload restart whose new worker cannot start keeps the
/// rolling permit: the rollout stops here, and the other workers keep their old settings.
async fn wait_fatal(
    shared: &Shared,
    slot: &Slot,
    jobs: &mut mpsc::Receiver<Job>,
    version: &mut watch::Receiver<(u64, u64)>,
    failed_starts: u32,
    program: &WorkerProgram,
) {
    let reg = &shared.registry;
    slot.set(reg, |i| {
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
            program.start_retries,
            i.last_exit.as_deref().unwrap_or("unknown")
        ));
    });
    slot.set_state(reg, WorkerState::Fatal);
    tracing::error!(queue = %shared.queue, slot = slot.index, failed_starts, "worker is FATAL: it failed to start {} times in a row; its tasks wait until a reload", failed_starts);
    let seen = version.borrow_and_update().1;
    let stop = shared.stop.clone();
    let retire = slot.retire.clone();
    let mut v = version.clone();
    wait_refusing(jobs, async move {
        tokio::select! {
            _ = v.wait_for(|x| x.1 != seen) => {}
            _ = stop.cancelled() => {}
            _ = retire.cancelled() => {}
        }
    })
    .await;
}

/// BACKOFF: waits `delay` before the next start (or the end), refusing tasks meanwhile.
async fn wait_backoff(
    shared: &Shared,
    slot: &Slot,
    jobs: &mut mpsc::Receiver<Job>,
    delay: Duration,
) {
    slot.set_state(&shared.registry, WorkerState::Backoff);
    let stop = shared.stop.clone();
    let retire = slot.retire.clone();
    wait_refusing(jobs, async move {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => {}
            _ = retire.cancelled() => {}
        }
    })
    .await;
}

/// Why a worker did not become RUNNING.
enum StartEnd {
    /// It failed to start (counts toward `start_retries`): why, for `last_exit`, and the
    /// last lines it wrote on stderr, if it ran at all.
    Failed { why: String, said: Vec<String> },
    /// The daemon or the slot stops.
    Stop,
}

/// The environment the protocol gives a worker on top of its queue's.
fn protocol_env(slot: usize) -> [(String, String); 5] {
    [
        (
            "TASKD_WORKER_PROTOCOL".to_string(),
            protocol::VERSION.to_string(),
        ),
        (
            "TASKD_WORKER_PROTOCOL_MINOR".to_string(),
            protocol::MINOR.to_string(),
        ),
        ("TASKD_TASK_FD".to_string(), protocol::TASK_FD.to_string()),
        (
            "TASKD_RESULT_FD".to_string(),
            protocol::RESULT_FD.to_string(),
        ),
        ("TASKD_WORKER_SLOT".to_string(), slot.to_string()),
    ]
}

/// STARTING: spawns a worker and waits for its handshake. On success the worker is RUNNING
/// and idle; returned with its idle-output logger and the grace its stop will get.
async fn start_worker(
    shared: &Shared,
    slot: &Slot,
    jobs: &mut mpsc::Receiver<Job>,
    settings: &Settings,
    program: &WorkerProgram,
    generation: u64,
) -> Result<(Proc, IdleOutput, Duration), StartEnd> {
    let reg = &shared.registry;
    slot.set(reg, |i| {
        i.pid = None;
        i.why = None;
    });
    slot.set_state(reg, WorkerState::Starting);
    let spawned = match settings.spec.clone() {
        Err(why) => Err(why),
        Ok(spec) if program.fork => {
            let server = fork_server(shared, slot, settings, program, generation).await?;
            Proc::fork(&server, slot.index, spec.cgroup.as_ref())
                .await
                .map_err(|e| {
                    format!(
                        "failed to fork a worker from the worker parent (pid {}): {e}",
                        server.pid
                    )
                })
                .map(|p| (spec.kill_grace, p))
        }
        Ok(mut spec) => {
            spec.env.extend(protocol_env(slot.index));
            Proc::spawn(&spec, Wiring::Protocol)
                .map_err(|e| spawn_error(&program.argv, &e))
                .map(|p| (spec.kill_grace, p))
        }
    };
    let (kill_grace, mut p) = spawned.map_err(|why| {
        tracing::warn!(queue = %shared.queue, slot = slot.index, error = %why, "failed to start a worker");
        StartEnd::Failed {
            why,
            said: Vec::new(),
        }
    })?;
    let started = Instant::now();
    slot.set(reg, |i| {
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
    if let Err(end) = handshake(&mut p, program, shared, slot, jobs, &mut idle_out).await {
        let st = p
            .stop(kill_grace, &shared.kill_now, |ev| idle_out.event(ev))
            .await;
        let HandshakeEnd::Failed(why) = end else {
            return Err(StartEnd::Stop);
        };
        let why = match st {
            Some(st) if !why.contains(&describe(&st)) => {
                format!("{why} (then {})", describe(&st))
            }
            _ => why,
        };
        let said = idle_out.last_stderr.take();
        tracing::warn!(queue = %shared.queue, slot = slot.index, pid = p.pid, error = %why, stderr = said.last().map(String::as_str).unwrap_or(""), "worker failed to start");
        return Err(StartEnd::Failed { why, said });
    }
    slot.set_state(reg, WorkerState::Running);
    tracing::info!(queue = %shared.queue, slot = slot.index, pid = p.pid, after = ?started.elapsed(), "worker running");
    slot.serving.store(true, Ordering::Release);
    slot.idle.store(true, Ordering::Release);
    (shared.kick)();
    Ok((p, idle_out, kill_grace))
}

/// With `worker_fork`: the parent of this generation, started if there is none (or it died).
/// A parent that fails to start fails this slot's start, with its reason and last words.
async fn fork_server(
    shared: &Shared,
    slot: &Slot,
    settings: &Settings,
    program: &WorkerProgram,
    generation: u64,
) -> Result<Arc<fork::ForkServer>, StartEnd> {
    let mut current = tokio::select! {
        c = shared.fork.lock() => c,
        _ = shared.stop.cancelled() => return Err(StartEnd::Stop),
        _ = slot.retire.cancelled() => return Err(StartEnd::Stop),
    };
    if let Some(s) = current.as_ref() {
        if s.generation == generation && s.alive() {
            return Ok(s.clone());
        }
    }
    // An older generation's parent goes once its last worker is replaced.
    *current = None;
    let Ok(spec) = settings.spec.as_ref() else {
        return Err(StartEnd::Failed {
            why: "no worker spec".into(),
            said: Vec::new(),
        });
    };
    let stop = shared.stop.child_token();
    let retire = slot.retire.clone();
    let stop_on_retire = stop.clone();
    let watch = tokio::spawn(async move {
        retire.cancelled().await;
        stop_on_retire.cancel();
    });
    let started = fork::ForkServer::start(
        spec,
        &shared.queue,
        generation,
        READY_TIMEOUT.max(program.start_secs),
        &stop,
        &shared.kill_now,
    )
    .await;
    watch.abort();
    match started {
        Ok(Some(server)) => {
            *current = Some(server.clone());
            Ok(server)
        }
        Ok(None) => Err(StartEnd::Stop),
        Err(f) => {
            let why = format!("its worker parent failed to start: {}", f.why);
            tracing::warn!(queue = %shared.queue, slot = slot.index, error = %why, "failed to start a worker");
            Err(StartEnd::Failed { why, said: f.said })
        }
    }
}

/// After RUNNING: takes the worker out of service, stops it (task pipe closed, SIGTERM →
/// `kill_grace` → SIGKILL) and records how it ended and `why`.
async fn stop_worker(
    shared: &Shared,
    slot: &Slot,
    jobs: &mut mpsc::Receiver<Job>,
    mut process: Proc,
    mut idle_out: IdleOutput,
    kill_grace: Duration,
    why: &str,
) {
    slot.serving.store(false, Ordering::Release);
    slot.idle.store(false, Ordering::Release);
    refuse_pending(jobs);
    if process.exited.is_none() {
        slot.set_state(&shared.registry, WorkerState::Stopping);
    }
    let st = process
        .stop(kill_grace, &shared.kill_now, |ev| idle_out.event(ev))
        .await;
    idle_out.flush();
    let exit = st.as_ref().map(describe).unwrap_or_else(|| "ended".into());
    let last = format!("{exit}: {why}");
    tracing::info!(queue = %shared.queue, slot = slot.index, pid = process.pid, "worker ended ({last})");
    let said = idle_out.last_stderr.take();
    slot.set(&shared.registry, |i| {
        i.last_exit = Some(last);
        i.last_stderr = said;
        i.pid = None;
    });
}

fn spawn_error(argv: &[String], error: &std::io::Error) -> String {
    let program = argv.first().map(String::as_str).unwrap_or("");
    match error.raw_os_error() {
        Some(libc::ENOENT) => format!("program not found: {program}"),
        Some(libc::EACCES) => format!("permission denied (not executable): {program}"),
        _ => format!("failed to start {program}: {error}"),
    }
}

enum HandshakeEnd {
    Failed(String),
    Stop,
}

/// STARTING until the worker said `ready` and has lived `start_secs`.
async fn handshake(
    process: &mut Proc,
    program: &WorkerProgram,
    shared: &Shared,
    slot: &Slot,
    jobs: &mut mpsc::Receiver<Job>,
    out: &mut IdleOutput,
) -> Result<(), HandshakeEnd> {
    let began = Instant::now();
    let ready_by = began + READY_TIMEOUT.max(program.start_secs);
    let running_at = began + program.start_secs;
    let mut ready = false;
    loop {
        if ready && Instant::now() >= running_at {
            return Ok(());
        }
        tokio::select! {
            ev = process.next_event() => match ev {
                Event::Line(line) => match protocol::parse(&line) {
                    Ok(WorkerMessage::Ready { protocol: v }) if v == protocol::VERSION => ready = true,
                    Ok(WorkerMessage::Ready { protocol: v }) => {
                        return Err(HandshakeEnd::Failed(format!("it speaks protocol version {v}; this taskd speaks {}", protocol::VERSION)));
                    }
                    Ok(_) => return Err(HandshakeEnd::Failed(format!("it sent {} before `ready`", protocol::show_line(&line)))),
                    Err(why) => {
                        let shown = protocol::show_line(&line);
                        tracing::warn!(queue = %shared.queue, slot = slot.index, pid = process.pid, line = %shown, "worker sent garbage instead of `ready`: {why}");
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
                return Err(HandshakeEnd::Failed(format!("no `ready` message within {}", humantime::format_duration(READY_TIMEOUT.max(program.start_secs)))));
            }
            job = jobs.recv() => if let Some(job) = job { let _ = job.reply.send(unavailable()); },
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

    /// A worker parent's output (`worker_fork`), which it writes while it loads and forks.
    fn parent(queue: &QueueName, pid: i32) -> Self {
        IdleOutput {
            span: tracing::info_span!("worker_parent", queue = %queue, pid),
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
    process: &mut Proc,
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
                match run_task(shared, slot, process, job).await {
                    Ok(()) => {
                        *streak = 0;
                    }
                    Err(leave) => return leave,
                }
            }
            ev = process.next_event() => match ev {
                Event::Stdout(_) | Event::Stderr(_) => idle_out.event(ev),
                Event::Exit(st) => return Leave::Failed(format!("exited while idle ({})", describe(&st))),
                Event::Gone => return Leave::Failed("ended while idle".into()),
                Event::ResultsClosed => return Leave::Failed("closed its result pipe (fd 4)".into()),
                Event::Line(l) | Event::TooLong(l) => {
                    let shown = protocol::show_line(&l);
                    tracing::warn!(queue = %shared.queue, slot = slot.index, pid = process.pid, line = %shown, "worker sent a message while idle; restarting it");
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
async fn run_task(shared: &Shared, slot: &Slot, process: &mut Proc, job: Job) -> Result<(), Leave> {
    let (_, settings) = shared.current();
    let q = &settings.config;
    let task = &job.task;
    // The supervisor's span of this run names the same queue, task and attempt: taken
    // over rather than a second one made and formatted for every task.
    let span = if job.span.is_none() {
        tracing::info_span!("task", queue = %q.name, task = %task.id, attempt = job.attempt)
    } else {
        job.span.clone()
    };
    let started_at_ms = now_ms();
    if let Some(tx) = job.spawned {
        let _ = tx.send(Spawned { pid: process.pid });
    }
    let line = task_line(task, job.attempt, q.max_attempts);
    let (mut out, mut err) = captures(q, job.log.as_ref());
    out.follow(job.live.as_ref(), Stream::Stdout);
    err.follow(job.live.as_ref(), Stream::Stderr);
    process.set_max_line(max_line(q));
    let (status, returned) = converse(
        process,
        &line,
        task.id,
        task.timeout(q.timeout),
        &job.stop,
        q,
        &span,
        &mut out,
        &mut err,
    )
    .await;
    // What it printed before answering (or dying) is already in the pipes.
    span.in_scope(|| {
        process.drain_now(|is_err, d| if is_err { err.push(d) } else { out.push(d) });
        out.finish();
        err.finish();
    });
    let leave = match &status {
        Status::Answered { .. } => {
            let leave = after_answer(slot, process, q);
            if leave.is_none() && !stopping(shared, slot) {
                // Idle again before the answer goes out, so the supervisor can hand this
                // worker its next task as soon as it has recorded this one.
                slot.idle.store(true, Ordering::Release);
            }
            leave
        }
        other => Some(leave_after(other, task.id)),
    };
    let outcome = Outcome {
        returned,
        ..Outcome::ran(Runner::Worker, status, process.pid, started_at_ms, out, err)
    };
    let _ = job.reply.send(outcome);
    shared.registry.touched();
    match leave {
        None => Ok(()),
        Some(l) => Err(l),
    }
}

/// The longest message line a worker of `queue` may send while it runs a task: the protocol's
/// limit, plus the queue's `max_result` for the result an `ok` answer carries.
fn max_line(queue: &QueueConfig) -> usize {
    protocol::MAX_LINE.saturating_add(usize::try_from(queue.max_result).unwrap_or(usize::MAX))
}

/// The task's line for fd 3.
fn task_line(task: &TaskRecord, attempt: u32, max_attempts: u32) -> Vec<u8> {
    let msg = protocol::TaskMessage {
        kind: "task",
        id: task.id,
        queue: &task.queue,
        attempt,
        max_attempts,
        payload: &task.payload,
        args: &task.args,
        after: &task.after,
        payload_b64: task.payload_b64.as_deref(),
    };
    let mut line = serde_json::to_vec(&msg).expect("a task message serializes");
    line.push(b'\n');
    line
}

/// The task's stdout and stderr captures: tails, log files and log lines, as in exec mode.
fn captures(queue: &QueueConfig, log: Option<&LogSpec>) -> (Capture, Capture) {
    let (log_out, log_err) = match log {
        Some(l) => (
            open_log(&l.stdout_path, l.max_bytes),
            open_log(&l.stderr_path, l.max_bytes),
        ),
        None => (None, None),
    };
    let mut out = Capture::new(queue.output_tail, log_out);
    let mut err = Capture::new(queue.output_tail, log_err);
    if queue.log_output {
        out.lines = Some(Lines::new("stdout"));
        err.lines = Some(Lines::new("stderr"));
    }
    (out, err)
}

/// Writes the task line and follows the worker until the task ends: its answer (with what
/// an `ok` returned), its death, a protocol error, or a stop by taskd (`timeout`, cancel,
/// shutdown: SIGTERM → `kill_grace` → SIGKILL to its group). Output goes to the captures
/// meanwhile.
#[allow(clippy::too_many_arguments)]
async fn converse(
    process: &mut Proc,
    line: &[u8],
    task: TaskId,
    timeout: std::time::Duration,
    stop: &Stop,
    queue: &QueueConfig,
    span: &tracing::Span,
    out: &mut Capture,
    err: &mut Capture,
) -> (Status, Returned) {
    let deadline = Instant::now().checked_add(timeout);
    let mut returned = Returned::Nothing;
    let mut esc = Escalation::new(process.pid).with_cgroup(process.cgroup.clone());
    // When a worker that closed its result pipe counts as crashed if it has not exited.
    let mut closed_at: Option<Instant> = None;
    // The task line is written beside everything else, so that a worker that reads it slowly
    // (a big payload) can still print, time out or be cancelled meanwhile.
    let mut tx = process.take_tasks();
    let mut written = false;
    let status = {
        let write = async {
            if let Some(t) = tx.as_mut() {
                // An error means the worker died: its exit comes next.
                let _ = tokio::io::AsyncWriteExt::write_all(t, line).await;
            }
        };
        tokio::pin!(write);
        loop {
            let stopped = esc.why().is_some();
            tokio::select! {
                biased;
                ev = process.next_event() => match ev {
                    Event::Stdout(d) => span.in_scope(|| out.push(&d)),
                    Event::Stderr(d) => span.in_scope(|| err.push(&d)),
                    Event::Line(l) => {
                        if stopped {
                            continue;
                        }
                        if let Some((status, r)) = span.in_scope(|| read_message(&l, task, written, process.pid, queue.max_result)) {
                            returned = r;
                            break status;
                        }
                    }
                    Event::TooLong(l) => {
                        if stopped {
                            continue;
                        }
                        let shown = protocol::show_line(&l);
                        span.in_scope(|| tracing::warn!(pid = process.pid, line = %shown, "worker sent a message line over the limit; restarting it"));
                        break Status::Protocol { line: shown, why: format!("a line over {} bytes", process.max_line()) };
                    }
                    Event::ResultsClosed => {
                        // Usually the worker is exiting: wait briefly for its status.
                        if !stopped {
                            closed_at = Instant::now().checked_add(EXIT_AFTER_CLOSE);
                        }
                    }
                    Event::Exit(st) => {
                        use std::os::unix::process::ExitStatusExt;
                        break stopped_status(&esc).unwrap_or_else(|| Status::Crashed { how: describe(&st), signal: st.signal() });
                    }
                    Event::Gone => break stopped_status(&esc).unwrap_or(Status::Crashed { how: "ended".into(), signal: None }),
                },
                _ = &mut write, if !written => written = true,
                _ = sleep_until_opt(closed_at), if closed_at.is_some() && !stopped => {
                    break Status::Crashed { how: "it closed its result pipe (fd 4) without answering".into(), signal: None };
                }
                _ = esc.step(stop, deadline, queue.kill_grace) => {}
            }
        }
    };
    process.restore_tasks(tx);
    (status, returned)
}

/// A message line read while a task runs: its end (an answer with what an `ok` returned,
/// bounded by `max_result`; or a protocol error), or `None` for progress.
fn read_message(
    line: &[u8],
    task: TaskId,
    written: bool,
    pid: i32,
    max_result: u64,
) -> Option<(Status, Returned)> {
    match protocol::parse(line) {
        Ok(WorkerMessage::Result { id, .. }) if id == task && !written => {
            let shown = protocol::show_line(line);
            tracing::warn!(pid, line = %shown, "worker answered before it read its whole task; restarting it");
            Some((
                Status::Protocol {
                    line: shown,
                    why: "a result before the whole task was read".into(),
                },
                Returned::Nothing,
            ))
        }
        Ok(WorkerMessage::Result {
            id,
            status,
            message,
            result,
        }) if id == task => {
            let returned = match status {
                ResultStatus::Ok => Returned::from_answer(result, max_result),
                ResultStatus::Error | ResultStatus::Retry => Returned::Nothing,
            };
            Some((
                Status::Answered {
                    verdict: status.into(),
                    message,
                },
                returned,
            ))
        }
        Ok(WorkerMessage::Progress { id, message }) if id == task => {
            tracing::debug!(message = message.as_deref().unwrap_or(""), "progress");
            None
        }
        Ok(other) => {
            let shown = protocol::show_line(line);
            tracing::warn!(pid, line = %shown, "worker broke the protocol; restarting it");
            let why = match other {
                WorkerMessage::Ready { .. } => "`ready` while a task runs".to_string(),
                _ => "a message for another task".to_string(),
            };
            Some((Status::Protocol { line: shown, why }, Returned::Nothing))
        }
        Err(why) => {
            let shown = protocol::show_line(line);
            tracing::warn!(pid, line = %shown, "worker sent an invalid message ({why}); restarting it");
            Some((Status::Protocol { line: shown, why }, Returned::Nothing))
        }
    }
}

/// How a task ends once taskd stopped its worker, if it did.
fn stopped_status(esc: &Escalation) -> Option<Status> {
    Some(match esc.why()? {
        StopWhy::Timeout => Status::TimedOut {
            killed_with: esc.last_signal().map_or(15, |s| s as i32),
        },
        StopWhy::Cancel => Status::Cancelled,
        StopWhy::Shutdown => Status::Interrupted,
    })
}

/// After an answer: counts the task and says whether the worker must be recycled
/// (`max_tasks_per_worker`, `max_worker_memory`).
fn after_answer(slot: &Slot, process: &Proc, queue: &QueueConfig) -> Option<Leave> {
    let done = {
        let mut info = slot.info.lock().expect("not poisoned");
        info.tasks_done += 1;
        info.tasks_done
    };
    let w = queue.worker()?;
    // /proc is read only when a memory limit is set and the task count did not decide.
    let rss = match (w.max_memory, w.max_tasks) {
        (Some(_), m) if m.is_none_or(|m| done < m) => process.rss(),
        _ => None,
    };
    match recycle_reason(w, done, rss) {
        Recycle::Keep => None,
        Recycle::Tasks(why) => Some(Leave::Recycle(why)),
        Recycle::Memory { rss, max, why } => {
            tracing::info!(queue = %queue.name, slot = slot.index, pid = process.pid, rss, max, "worker over max_worker_memory; recycling it");
            Some(Leave::Recycle(why))
        }
        Recycle::MemoryUnknown => {
            // Once per worker process: /proc hidden (ProtectProc=) or the leader gone.
            if done == 1 {
                tracing::warn!(queue = %queue.name, slot = slot.index, pid = process.pid, "cannot read the worker's memory use from /proc/PID/status; max_worker_memory is not enforced for it");
            }
            None
        }
    }
}

/// Whether a worker stays after answering its `done`-th task.
#[derive(Debug, PartialEq, Eq)]
enum Recycle {
    Keep,
    /// `max_tasks_per_worker` reached.
    Tasks(String),
    /// Its resident set is over `max_worker_memory`.
    Memory {
        rss: u64,
        max: u64,
        why: String,
    },
    /// A memory limit is set but the worker's RSS could not be read.
    MemoryUnknown,
}

/// The recycling rule: `max_tasks_per_worker` first, then `max_worker_memory` against the
/// worker's resident set `rss` (bytes; `None` when unreadable).
fn recycle_reason(program: &WorkerProgram, done: u64, rss: Option<u64>) -> Recycle {
    if program.max_tasks.is_some_and(|m| done >= m) {
        return Recycle::Tasks(format!(
            "recycled after {done} tasks (max_tasks_per_worker)"
        ));
    }
    let Some(max) = program.max_memory else {
        return Recycle::Keep;
    };
    match rss {
        Some(rss) if rss > max => Recycle::Memory {
            rss,
            max,
            why: format!(
                "recycled: RSS {} MiB over max_worker_memory {} MiB",
                rss / (1024 * 1024),
                max / (1024 * 1024)
            ),
        },
        Some(_) => Recycle::Keep,
        None => Recycle::MemoryUnknown,
    }
}

/// Why the worker goes after a task that ended without an answer.
fn leave_after(status: &Status, task: TaskId) -> Leave {
    match status {
        Status::Crashed { how, .. } => {
            Leave::Failed(format!("died while running task {task} ({how})"))
        }
        Status::Protocol { line, why } => {
            Leave::Failed(format!("protocol error during task {task} ({why}): {line}"))
        }
        Status::TimedOut { .. } => Leave::Recycle(format!("task {task} timed out")),
        Status::Cancelled => Leave::Recycle(format!("task {task} was cancelled")),
        _ => Leave::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(max_tasks: Option<u64>, max_memory: Option<u64>) -> WorkerProgram {
        let mut w = WorkerProgram::new(vec!["w".into()]);
        w.max_tasks = max_tasks;
        w.max_memory = max_memory;
        w
    }

    #[test]
    fn a_worker_is_recycled_after_max_tasks_then_over_max_memory() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(
            recycle_reason(&worker(None, None), 1_000, None),
            Recycle::Keep
        );
        assert_eq!(
            recycle_reason(&worker(Some(3), None), 2, None),
            Recycle::Keep
        );
        assert_eq!(
            recycle_reason(&worker(Some(3), Some(MIB)), 3, Some(2 * MIB)),
            Recycle::Tasks("recycled after 3 tasks (max_tasks_per_worker)".into()),
            "the task count decides first"
        );
        assert_eq!(
            recycle_reason(&worker(None, Some(100 * MIB)), 1, Some(300 * MIB)),
            Recycle::Memory {
                rss: 300 * MIB,
                max: 100 * MIB,
                why: "recycled: RSS 300 MiB over max_worker_memory 100 MiB".into()
            }
        );
        assert_eq!(
            recycle_reason(&worker(None, Some(100 * MIB)), 1, Some(100 * MIB)),
            Recycle::Keep,
            "at the limit is not over it"
        );
        assert_eq!(
            recycle_reason(&worker(None, Some(MIB)), 1, None),
            Recycle::MemoryUnknown
        );
    }

    #[test]
    fn a_task_that_ends_without_an_answer_decides_how_its_worker_goes() {
        let id = TaskId::new();
        let crashed = Status::Crashed {
            how: "killed by SIGKILL".into(),
            signal: Some(9),
        };
        assert!(
            matches!(leave_after(&crashed, id), Leave::Failed(why) if why == format!("died while running task {id} (killed by SIGKILL)"))
        );
        assert!(matches!(
            leave_after(&Status::TimedOut { killed_with: 15 }, id),
            Leave::Recycle(_)
        ));
        assert!(matches!(
            leave_after(&Status::Cancelled, id),
            Leave::Recycle(_)
        ));
        assert!(matches!(leave_after(&Status::Interrupted, id), Leave::Stop));
    }

    #[test]
    fn restart_delay_doubles_up_to_a_minute() {
        assert_eq!(restart_delay(1), Duration::from_millis(500));
        assert_eq!(restart_delay(2), Duration::from_secs(1));
        assert_eq!(restart_delay(4), Duration::from_secs(4));
        assert_eq!(restart_delay(30), RESTART_MAX);
    }
}
