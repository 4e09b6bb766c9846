//! The supervisor: owns a daemon's runtime state and turns claimed tasks into runs.
//!
//! One dispatcher per queue claims up to the queue's free slots whenever it is kicked (a
//! producer's wake-up, a finished task, a due scheduled task, a fallback tick), and starts
//! one run per task. A run asks [`prepare`] for the executor spec, hands it to the
//! [`crate::executor`], turns the outcome into an attempt record and a [`Finish`] with
//! [`policy`], and records it in the broker. The supervisor never touches SQLite or a
//! process directly: it speaks the broker trait and the executor API.
//!
//! Halting ([`Supervisor::halt`], by [`Halt`] cause): while the store is gone or the broker
//! refuses writes, dispatchers claim and start nothing, so that results waiting to be
//! written stay bounded by the running tasks; `taskd status` shows why.
//!
//! Draining (first SIGTERM): dispatchers stop claiming; runs finish on their own until the
//! grace ends, then are interrupted and put back as `queued` without charging an attempt.

mod claim;
pub mod policy;
pub mod prepare;
pub mod startlog;
pub mod tasklog;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Doubling;
use crate::broker::{Broker, BrokerError, Claimed, Finish, Lease, Queued, Wakeups};
use crate::config::{Config, LogTasks};
use crate::executor::live::{EndInfo, Live, LiveOutput};
use crate::executor::{self, Stop};
use crate::model::{now_ms, AttemptReason, AttemptRecord, NodeId, QueueName, TaskId, TaskRecord};
use crate::worker;
use prepare::Prepared;

/// How long a claim holds a task before another node may take it over; renewed every third.
/// The default; a daemon on a shared broker sets a shorter one ([`Supervisor::set_lease`]).
pub const LEASE: Duration = Duration::from_secs(60);
/// The safety net behind wake-ups: a dispatcher looks at its queue at least this often.
const FALLBACK_TICK: Duration = Duration::from_secs(2);
/// How long a task runs before its start is recorded on its own (see `run_one`).
const START_RECORD_DELAY: Duration = Duration::from_millis(5);

struct QueueRt {
    name: QueueName,
    prepared: Mutex<Arc<Prepared>>,
    /// Processes of this queue alive now.
    running: AtomicUsize,
    kick: Notify,
    /// The queue left the config: stop claiming, let its runs finish.
    removed: CancellationToken,
    /// Tasks claimed ahead of a free slot while the queue has a backlog, so that a finishing
    /// task is replaced at once instead of after a round trip to the store.
    held: Mutex<VecDeque<Claimed>>,
    /// The last claim got all it asked for: more tasks are probably waiting.
    backlog: AtomicBool,
    /// How long the queue's last task ran: short tasks are worth claiming further ahead.
    last_run_ms: AtomicU64,
    /// The long-lived workers of a `worker` queue: tasks start only on an idle one.
    pool: Mutex<Option<Arc<worker::Pool>>>,
}

impl QueueRt {
    fn prepared(&self) -> Arc<Prepared> {
        self.prepared
            .lock()
            .expect("queue config lock is never poisoned")
            .clone()
    }

    fn pool(&self) -> Option<Arc<worker::Pool>> {
        self.pool.lock().expect("not poisoned").clone()
    }
}

/// What the queue's dispatcher would claim now ([`claim::plan`] of what it holds and runs).
fn claim_plan(queue: &QueueRt) -> claim::ClaimPlan {
    let prepared = queue.prepared();
    // A queue with a rate holds nothing ahead: each claim is charged as a start, so it must
    // be one.
    let rated = prepared.config.rate.is_some();
    claim::plan(claim::QueueLoad {
        concurrency: prepared.config.concurrency,
        running: queue.running.load(Ordering::Acquire),
        held: queue.held.lock().expect("not poisoned").len(),
        idle_workers: queue.pool().map(|p| p.available()),
        backlog: queue.backlog.load(Ordering::Acquire) && !rated,
        last_run_ms: queue.last_run_ms.load(Ordering::Relaxed),
    })
}

/// Why a node stops claiming (see [`Supervisor::halt`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Halt {
    /// The embedded store's file was deleted or replaced: for good, until a restart.
    StoreGone,
    /// The broker refuses writes (Redis at `maxmemory`): until a write passes.
    BrokerFull,
}

struct HeldTask {
    queue: QueueName,
    lease: Lease,
    cancel: CancellationToken,
    /// Until when the lease surely holds by this node's monotonic clock: the claim's or
    /// the last successful renewal's sending time plus the lease. A task held past it is
    /// not started before the broker confirms the lease (see `lease_confirmed`).
    valid_until: tokio::time::Instant,
}

/// What changed between two versions of a queue's config, one phrase per setting, for
/// `taskd reload` and the log ("concurrency 1 → 4"). Running tasks keep the settings they
/// started with; the next task of the queue takes the new ones.
pub fn queue_diff(
    old: &crate::config::QueueConfig,
    new: &crate::config::QueueConfig,
) -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! field {
        ($name:literal, $f:ident, $show:expr) => {
            if old.$f != new.$f {
                let show = $show;
                out.push(format!("{} {} → {}", $name, show(&old.$f), show(&new.$f)));
            }
        };
    }
    let dur = |d: &Duration| humantime::format_duration(*d).to_string();
    let dbg = |v: &dyn std::fmt::Debug| format!("{v:?}");
    field!("concurrency", concurrency, |v: &usize| v.to_string());
    field!("timeout", timeout, dur);
    field!("kill_grace", kill_grace, dur);
    field!("max_attempts", max_attempts, |v: &u32| v.to_string());
    field!("max_lost", max_lost, |v: &u32| v.to_string());
    field!("max_crashes", max_crashes, |v: &u32| v.to_string());
    field!("output_tail", output_tail, |v: &usize| v.to_string());
    field!("log_max", log_max, |v: &u64| v.to_string());
    field!(
        "max_result",
        max_result,
        |v: &u64| crate::config::show_size(*v)
    );
    field!("allow_dash_values", allow_dash_values, |v: &bool| v
        .to_string());
    field!("backoff", backoff, |v: &crate::config::Backoff| dbg(v));
    field!("fail_exit_codes", fail_exit_codes, |v: &Vec<i32>| dbg(v));
    field!("cwd", cwd, |v: &Option<std::path::PathBuf>| dbg(v));
    field!("user", user, |v: &Option<String>| dbg(v));
    field!("group", group, |v: &Option<String>| dbg(v));
    field!("log_dir", log_dir, |v: &Option<std::path::PathBuf>| dbg(v));
    field!("umask", umask, |v: &Option<u32>| match v {
        Some(m) => format!("{m:03o}"),
        None => "inherited".to_string(),
    });
    field!("env_inherit", env_inherit, |v: &Vec<String>| dbg(v));
    if old.limits != new.limits {
        out.push(format!("limits {:?} → {:?}", old.limits, new.limits));
    }
    if old.env != new.env {
        out.push("env changed".to_string());
    }
    if old.program != new.program {
        out.push("command changed".to_string());
    }
    if out.is_empty() && old != new {
        out.push("settings changed".to_string());
    }
    out
}

/// A snapshot for logs and status lines.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub queues: usize,
    pub running: usize,
}

pub struct Supervisor {
    broker: Arc<dyn Broker>,
    node: NodeId,
    queues: Mutex<HashMap<QueueName, Arc<QueueRt>>>,
    /// Every task this node holds a lease on: claimed and waiting in a queue's `held`
    /// buffer, or running. Renewed together; cancelled through their tokens. Taken after a
    /// queue's `held` lock when both are held.
    leases: Mutex<HashMap<TaskId, HeldTask>>,
    /// Stop claiming (drain).
    draining: CancellationToken,
    /// Stop running tasks (end of the grace, or a second signal): TERM, grace, KILL.
    interrupt: CancellationToken,
    /// A second signal: SIGKILL running tasks without waiting for their kill_grace.
    kill_now: CancellationToken,
    /// Every run, so that shutdown waits for their results to be recorded.
    runs: TaskTracker,
    /// A retry or scheduled task may have moved the next due time earlier.
    reschedule: Notify,
    /// Queues paused in the broker, refreshed on every wake-up: claimed-ahead tasks of a
    /// paused queue are released rather than started.
    paused: Mutex<BTreeSet<QueueName>>,
    /// Why this node claims and starts nothing now, by cause (its store vanished; the broker
    /// refuses writes), for the log and `taskd status`; empty while it works. See
    /// [`Self::halt`].
    halted: Mutex<std::collections::BTreeMap<Halt, String>>,
    start_log: startlog::StartLog,
    /// The lease claims ask for, in ms ([`LEASE`] unless set).
    lease_ms: AtomicU64,
    /// Counters for `/metrics`: attempts started, finished by outcome, their durations.
    metrics: Arc<crate::metrics::Metrics>,
    /// Every long-lived worker, for `state_dir/workers.json`.
    workers: Arc<worker::Registry>,
    /// `[taskd] log_tasks`, set by [`Self::apply`] (a reload changes it); `None` before.
    log_tasks: Mutex<Option<LogTasks>>,
    /// The directory of the tasks' result files, in the state directory (`None` without
    /// one: tasks then get no `TASKD_RESULT_FILE`).
    results: Option<Arc<executor::ResultDir>>,
    /// The live output of the attempts running here, for followers (`taskd logs --follow`).
    live: Arc<Live>,
    /// The daemon's cgroup subtree, set before [`Self::start`] ([`Self::set_containment`]);
    /// `None`: process groups only.
    containment: Mutex<Option<Arc<executor::cgroup::Containment>>>,
    /// Told of starts and ends ([`Self::set_observer`]); `None`: nobody listens.
    observer: Mutex<Option<Arc<dyn TaskObserver>>>,
}

/// Told when tasks start and end on this node, and when waiting tasks expire: the daemon
/// writes the Celery state of the bridge's tasks from there. Called on the supervisor's
/// tasks: an implementation hands the work on and returns at once.
pub trait TaskObserver: Send + Sync {
    /// Whether [`TaskObserver::started`] wants to hear of `task`'s start (asked as its run
    /// begins, so that a task nobody watches is not kept for it).
    fn watches_start(&self, _task: &TaskRecord) -> bool {
        true
    }
    /// `task`'s process `pid` started (an attempt; once per run).
    fn started(&self, task: &TaskRecord, pid: u32);
    /// An attempt of `task` ended and the broker has its result (the task may be waiting to
    /// run again; the store says). `recorded`: the attempt and the finish the broker
    /// accepted for it, as this node asked (`None` when the broker's answer may differ: its
    /// lease was lost meanwhile; read the store).
    fn ended(&self, task: &TaskRecord, recorded: Option<(&AttemptRecord, Finish)>);
    /// Task `id`, waiting, was cancelled because it expired.
    fn expired(&self, id: TaskId);
}

impl Supervisor {
    pub fn new(
        broker: Arc<dyn Broker>,
        node: NodeId,
        start_log: startlog::StartLog,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        let workers = worker::Registry::new(start_log.dir());
        let results = start_log.dir().map(executor::ResultDir::at);
        Arc::new(Supervisor {
            results,
            metrics,
            workers,
            broker,
            node,
            queues: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            draining: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            kill_now: CancellationToken::new(),
            runs: TaskTracker::new(),
            reschedule: Notify::new(),
            paused: Mutex::new(BTreeSet::new()),
            halted: Mutex::new(std::collections::BTreeMap::new()),
            start_log,
            lease_ms: AtomicU64::new(LEASE.as_millis() as u64),
            log_tasks: Mutex::new(None),
            live: Live::new(),
            containment: Mutex::new(None),
            observer: Mutex::new(None),
        })
    }

    /// Tell `observer` of starts and ends. Set before [`Self::start`].
    pub fn set_observer(&self, observer: Arc<dyn TaskObserver>) {
        *self.observer.lock().expect("not poisoned") = Some(observer);
    }

    fn observer(&self) -> Option<Arc<dyn TaskObserver>> {
        self.observer.lock().expect("not poisoned").clone()
    }

    /// Run each task and worker in a cgroup of `containment`'s. Set before [`Self::start`].
    pub fn set_containment(&self, containment: Option<Arc<executor::cgroup::Containment>>) {
        *self.containment.lock().expect("not poisoned") = containment;
    }

    /// The live output of the attempts running on this node (and of those that just ended).
    pub fn live(&self) -> Arc<Live> {
        self.live.clone()
    }

    /// Claim with leases of `lease`, renewed every third of it. Set before [`Self::start`].
    pub fn set_lease(&self, lease: Duration) {
        self.lease_ms
            .store(lease.as_millis() as u64, Ordering::Relaxed);
    }

    fn log_tasks(&self) -> LogTasks {
        self.log_tasks
            .lock()
            .expect("not poisoned")
            .unwrap_or_default()
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(Ordering::Relaxed))
    }

    /// The queues this node serves, by name.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .queues
            .lock()
            .expect("not poisoned")
            .keys()
            .map(|q| q.to_string())
            .collect();
        names.sort();
        names
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// A worker died running this task: at its queue's `max_crashes`-th death on it (its
    /// history says how many came before), the task fails instead of being retried.
    async fn limit_crashes(
        &self,
        config: &crate::config::QueueConfig,
        claimed: &Claimed,
        mut record: AttemptRecord,
        finish: Finish,
    ) -> (AttemptRecord, Finish) {
        if record.reason != Some(AttemptReason::Crash) || !matches!(finish, Finish::Retry { .. }) {
            return (record, finish);
        }
        let before = match self.broker.get(claimed.task.id).await {
            Ok(Some(d)) => d
                .history
                .iter()
                .filter(|a| a.reason == Some(AttemptReason::Crash))
                .count() as u32,
            // Unknown: retry as the policy says; the next crash is counted again.
            _ => 0,
        };
        let finish = policy::limit_crashes(config, before, &mut record, finish);
        (record, finish)
    }

    /// Each served queue's `max_lost` as configured now (a reload changes it), for the
    /// recovery of expired leases.
    pub fn lost_limits(&self) -> crate::broker::LostLimits {
        crate::broker::LostLimits::new(
            self.queues
                .lock()
                .expect("not poisoned")
                .iter()
                .map(|(name, q)| (name.clone(), q.prepared().config.max_lost))
                .collect(),
        )
    }

    pub fn snapshot(&self) -> Snapshot {
        let queues = self.queues.lock().expect("not poisoned");
        Snapshot {
            queues: queues.len(),
            running: queues
                .values()
                .map(|q| q.running.load(Ordering::Acquire))
                .sum(),
        }
    }

    /// Stop claiming and starting tasks for `cause`, because `why` (said in `taskd status`):
    /// running tasks go on and their results are kept. True when `cause` was not set before.
    pub fn halt(&self, cause: Halt, why: &str) -> bool {
        self.halted
            .lock()
            .expect("not poisoned")
            .insert(cause, why.to_string())
            .is_none()
    }

    /// `cause` is over: claim again unless another cause holds. True when it was set.
    pub fn unhalt(&self, cause: Halt) -> bool {
        let was = self
            .halted
            .lock()
            .expect("not poisoned")
            .remove(&cause)
            .is_some();
        if was {
            self.kick_all();
        }
        was
    }

    /// Why this node claims nothing now, if it does not.
    pub fn halted(&self) -> Option<String> {
        let h = self.halted.lock().expect("not poisoned");
        (!h.is_empty()).then(|| h.values().cloned().collect::<Vec<_>>().join("; "))
    }

    /// The broker refused a write because it is full: stop claiming until a write passes,
    /// so that results buffered here stay bounded by the tasks already running.
    pub fn broker_full(&self, error: &str) {
        let why = format!(
            "{error}; results of finished tasks are kept here and written once it takes writes again"
        );
        if self.halt(Halt::BrokerFull, &why) {
            tracing::error!("not claiming tasks: {why}");
        }
    }

    /// A write passed: a full broker has room again.
    pub fn broker_writes(&self) {
        if self.unhalt(Halt::BrokerFull) {
            tracing::info!("the broker takes writes again; claiming tasks again");
        }
    }

    /// Start the dispatchers and background loops for `config` and the broker's wake-ups.
    pub fn start(self: &Arc<Self>, config: &Config, wakeups: Wakeups) {
        // Long-lived workers a killed daemon left behind: their groups, from workers.json
        // (the tasks they ran were recovered with the others).
        if let Some(dir) = self.start_log.dir() {
            let killed = worker::kill_leftovers(dir);
            if killed > 0 {
                tracing::warn!(
                    process_groups_killed = killed,
                    "killed the long-lived workers a previous daemon left behind"
                );
            }
        }
        self.workers.spawn_writer(self.interrupt.clone());
        self.apply(config);
        let me = self.clone();
        tokio::spawn(async move { me.wake_loop(wakeups).await });
        let me = self.clone();
        tokio::spawn(async move { me.schedule_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.lease_loop().await });
    }

    /// Apply a (new) config: changed queues take the new settings for their next task,
    /// new queues start, removed queues drain. Running tasks are left alone.
    pub fn apply(self: &Arc<Self>, config: &Config) -> Vec<String> {
        let mut changes = Vec::new();
        {
            let mut log_tasks = self.log_tasks.lock().expect("not poisoned");
            if let Some(old) = log_tasks.filter(|old| *old != config.log_tasks) {
                changes.push(format!(
                    "log_tasks {} → {}",
                    old.as_str(),
                    config.log_tasks.as_str()
                ));
            }
            *log_tasks = Some(config.log_tasks);
        }
        let mut queues = self.queues.lock().expect("not poisoned");
        for (name, qc) in &config.queues {
            // Per-key and rate limits are applied by the broker's claims (its rule 13).
            self.broker.set_flow(name, crate::broker::Flow::of(qc));
            let prepared = Arc::new(Prepared::new(
                Arc::new(qc.clone()),
                self.results.clone(),
                self.containment.lock().expect("not poisoned").clone(),
            ));
            match queues.get(name) {
                Some(rt) => {
                    let old = rt.prepared();
                    let diff = queue_diff(&old.config, qc);
                    if !diff.is_empty() {
                        changes.push(format!("queue {name}: {}", diff.join(", ")));
                    }
                    *rt.prepared.lock().expect("not poisoned") = prepared.clone();
                    if let Some(why) = self.apply_pool(rt, prepared) {
                        changes.push(format!(
                            "queue {name}: workers restart one at a time: {why}"
                        ));
                    }
                    rt.kick.notify_one();
                }
                None => {
                    let rt = Arc::new(QueueRt {
                        name: name.clone(),
                        prepared: Mutex::new(prepared.clone()),
                        running: AtomicUsize::new(0),
                        kick: Notify::new(),
                        removed: CancellationToken::new(),
                        held: Mutex::new(VecDeque::new()),
                        backlog: AtomicBool::new(false),
                        last_run_ms: AtomicU64::new(u64::MAX),
                        pool: Mutex::new(None),
                    });
                    let _ = self.apply_pool(&rt, prepared);
                    rt.kick.notify_one();
                    queues.insert(name.clone(), rt.clone());
                    let me = self.clone();
                    tokio::spawn(async move { me.dispatch(rt).await });
                    changes.push(format!("queue {name}: started"));
                }
            }
        }
        let gone: Vec<QueueName> = queues
            .keys()
            .filter(|n| !config.queues.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(rt) = queues.remove(&name) {
                rt.removed.cancel();
                if let Some(pool) = rt.pool.lock().expect("not poisoned").take() {
                    pool.retire();
                }
                changes.push(format!("queue {name}: removed (its running tasks finish)"));
            }
        }
        changes
    }

    /// `taskd restart QUEUE`: restart the queue's long-lived workers one at a time (each after
    /// its current task, the next once the previous replacement is RUNNING). `Err` says why
    /// not: an unknown queue, or one that runs a new process per task.
    pub fn restart_workers(&self, queue: &str) -> Result<String, String> {
        let queues = self.queues.lock().expect("not poisoned");
        let Some(rt) = queues
            .iter()
            .find(|(n, _)| n.as_str() == queue)
            .map(|(_, rt)| rt)
        else {
            let mut known: Vec<String> = queues.keys().map(|q| q.to_string()).collect();
            known.sort();
            return Err(format!(
                "unknown queue `{queue}` (the running daemon has: {}); nothing restarted",
                known.join(", ")
            ));
        };
        let Some(pool) = rt.pool() else {
            return Err(format!(
                "queue `{queue}` runs a new process per task (`command` or `shell`), not long-lived workers: its next task already runs the new code; nothing to restart"
            ));
        };
        let n = pool.restart();
        Ok(format!(
            "queue {queue}: restarting {n} worker{} one at a time, each after its current task",
            if n == 1 { "" } else { "s" }
        ))
    }

    /// Start, update or stop the queue's long-lived workers for its (new) settings.
    fn apply_pool(self: &Arc<Self>, rt: &Arc<QueueRt>, prepared: Arc<Prepared>) -> Option<String> {
        let mut pool = rt.pool.lock().expect("not poisoned");
        let is_worker_queue = prepared.config.worker().is_some();
        let settings = || {
            Arc::new(worker::Settings {
                config: prepared.config.clone(),
                spec: prepared.worker_spec(),
            })
        };
        match (is_worker_queue, pool.as_ref()) {
            (true, Some(p)) => return p.apply(settings()),
            (true, None) => {
                let weak = Arc::downgrade(rt);
                let kick = Box::new(move || {
                    if let Some(rt) = weak.upgrade() {
                        rt.kick.notify_one();
                    }
                });
                *pool = Some(worker::Pool::new(
                    settings(),
                    self.workers.clone(),
                    self.kill_now.clone(),
                    kick,
                ));
            }
            (false, Some(_)) => {
                if let Some(p) = pool.take() {
                    p.retire();
                }
            }
            (false, None) => {}
        }
        None
    }

    fn kick_all(&self) {
        for rt in self.queues.lock().expect("not poisoned").values() {
            rt.kick.notify_one();
        }
    }

    /// One queue's claim loop. It claims enough to fill the free slots and, while the queue
    /// has a backlog, up to `concurrency` more held ready (see [`QueueRt::held`]); finishing
    /// runs start the held tasks themselves, and kick this loop to top the buffer up.
    async fn dispatch(self: Arc<Self>, queue: Arc<QueueRt>) {
        let mut error_backoff = Doubling::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut claim_failing = false;
        loop {
            if self.draining.is_cancelled() || queue.removed.is_cancelled() {
                self.release_held(&queue).await;
                return;
            }
            if self.is_paused(&queue.name) {
                // Paused as this node last read it: give back what it holds, and claim
                // nothing until news (the resume's wake-up kicks every queue). The store may
                // already be resumed; a claim then would only be released again on the next
                // turn, a loop that never waits when the broker answers at once.
                self.release_held(&queue).await;
                self.wait_for_news(&queue).await;
                continue;
            }
            if self.halted().is_some() {
                // Held tasks stay held (their release would be a write too); `unhalt`
                // kicks the queue.
                self.wait_for_news(&queue).await;
                continue;
            }
            self.start_held(&queue);
            let rated = queue.prepared().config.rate.is_some();
            if let claim::ClaimPlan::Claim { want, now } = claim_plan(&queue) {
                let asked = tokio::time::Instant::now();
                let claimed = if now {
                    self.broker
                        .claim(&self.node, &queue.name, want, self.lease())
                        .await
                } else {
                    self.broker
                        .claim_ahead(&self.node, &queue.name, want, self.lease())
                        .await
                };
                match claimed {
                    Ok(claimed) => {
                        if claim_failing {
                            tracing::info!(queue = %queue.name, "claiming tasks again");
                            claim_failing = false;
                        }
                        error_backoff.reset();
                        let got = claimed.len();
                        queue.backlog.store(got == want, Ordering::Release);
                        if got > 0 {
                            {
                                let mut held = queue.held.lock().expect("not poisoned");
                                let mut leases = self.leases.lock().expect("not poisoned");
                                for c in claimed {
                                    leases.insert(
                                        c.task.id,
                                        HeldTask {
                                            queue: queue.name.clone(),
                                            lease: c.lease.clone(),
                                            cancel: CancellationToken::new(),
                                            valid_until: asked + self.lease(),
                                        },
                                    );
                                    held.push_back(c);
                                }
                            }
                            continue; // start them, and look again
                        }
                    }
                    Err(BrokerError::Full(e)) => {
                        // Halted until a write passes (a result, or the node's heartbeat).
                        self.broker_full(&e);
                        continue;
                    }
                    Err(e) => {
                        // Once per outage: the broker's own loss is logged by the cluster
                        // loop and the connection, and a retry every few seconds would
                        // bury the rest of the log.
                        if claim_failing {
                            tracing::debug!(queue = %queue.name, error = %e, "still failing to claim tasks; retrying");
                        } else {
                            tracing::error!(queue = %queue.name, error = %e, "failed to claim tasks; retrying with backoff (up to 10 s) until the broker answers");
                            claim_failing = true;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(error_backoff.next_delay()) => {}
                            _ = self.draining.cancelled() => {}
                        }
                        continue;
                    }
                }
            }
            // The queue is dry, or every slot is busy and the buffer is full, or its rate
            // refused a start: then look again when the rate allows the next one.
            let rate_wait = if rated {
                self.broker
                    .flow_wait(&queue.name)
                    .map(|at| Duration::from_millis((at - now_ms()).max(1) as u64))
            } else {
                None
            };
            self.wait_for_news_or(&queue, rate_wait).await;
        }
    }

    /// Until the queue is kicked (a wake-up, a finished task that leaves it something to
    /// claim, a resume, an unhalt), the
    /// fallback tick, a drain or the queue's removal.
    async fn wait_for_news(&self, queue: &QueueRt) {
        self.wait_for_news_or(queue, None).await
    }

    /// [`Self::wait_for_news`], or `within` if sooner.
    async fn wait_for_news_or(&self, queue: &QueueRt, within: Option<Duration>) {
        let tick = within.map_or(FALLBACK_TICK, |w| w.min(FALLBACK_TICK));
        tokio::select! {
            _ = queue.kick.notified() => {}
            _ = tokio::time::sleep(tick) => {}
            _ = self.draining.cancelled() => {}
            _ = queue.removed.cancelled() => {}
        }
    }

    fn is_paused(&self, queue: &QueueName) -> bool {
        self.paused.lock().expect("not poisoned").contains(queue)
    }

    /// Start held tasks while the queue has free slots.
    fn start_held(self: &Arc<Self>, queue: &Arc<QueueRt>) {
        if self.draining.is_cancelled()
            || queue.removed.is_cancelled()
            || self.is_paused(&queue.name)
            || self.halted().is_some()
        {
            return;
        }
        let conc = queue.prepared().config.concurrency;
        let pool = queue.pool();
        loop {
            if queue.running.load(Ordering::Acquire) >= conc {
                return;
            }
            if queue.held.lock().expect("not poisoned").is_empty() {
                return;
            }
            let reserved = match &pool {
                Some(p) => match p.reserve() {
                    Some(r) => Some(r),
                    None => return,
                },
                None => None,
            };
            let Some(c) = queue.held.lock().expect("not poisoned").pop_front() else {
                return;
            };
            self.launch(queue, c, reserved);
        }
    }

    /// Give held (claimed, never started) tasks back to the broker.
    async fn release_held(&self, queue: &QueueRt) {
        let held: Vec<Claimed> = queue.held.lock().expect("not poisoned").drain(..).collect();
        for c in held {
            self.leases.lock().expect("not poisoned").remove(&c.task.id);
            self.record(&c.lease, AttemptRecord::default(), Finish::Release)
                .await;
        }
    }

    fn launch(
        self: &Arc<Self>,
        queue: &Arc<QueueRt>,
        claimed: Claimed,
        reserved: Option<worker::Reserved>,
    ) {
        queue.running.fetch_add(1, Ordering::AcqRel);
        let cancel = self
            .leases
            .lock()
            .expect("not poisoned")
            .get(&claimed.task.id)
            .map(|e| e.cancel.clone())
            .unwrap_or_default();
        let me = self.clone();
        let q = queue.clone();
        // Every log line about this run carries its queue, task id and attempt, and only
        // this run's: `launch` is often called from the end of the previous run, whose span
        // must not become this one's parent (lines read `task{…}:task{…}` otherwise).
        let span = tracing::info_span!(parent: None, "task", queue = %q.name, task = %claimed.task.id, attempt = claimed.attempt);
        self.runs.spawn(tracing::Instrument::instrument(
            async move { me.run_one(q, claimed, cancel, reserved).await },
            span,
        ));
    }

    /// Run one attempt of one claimed task and record its result.
    async fn run_one(
        self: Arc<Self>,
        queue: Arc<QueueRt>,
        claimed: Claimed,
        cancel: CancellationToken,
        reserved: Option<worker::Reserved>,
    ) {
        let prepared = queue.prepared();
        let config = prepared.config.clone();
        let started_at = now_ms();
        let mut ran = None;
        let mut live: Option<Arc<LiveOutput>> = None;
        let spec = match reserved {
            Some(r) => Ok(Run::Worker(r)),
            None => prepared
                .spec(&claimed.task, claimed.attempt)
                .map(|s| Run::Exec(Box::new(s))),
        };
        let (record, finish) = match spec {
            Err(message) => {
                let attempt = AttemptRecord {
                    number: claimed.attempt,
                    node: self.node.clone(),
                    started_at,
                    ended_at: now_ms(),
                    reason: Some(AttemptReason::Invalid),
                    error: Some(message),
                    ..Default::default()
                };
                (attempt, Finish::Failed)
            }
            Ok(spec) => {
                let stop = Stop {
                    cancel,
                    shutdown: self.interrupt.clone(),
                    kill: self.kill_now.clone(),
                };
                // The start is recorded once the process exists, without holding the run up
                // (it shares a commit with others); the start log covers the moment between.
                // A lease lost meanwhile (an operator cancelled the held task) stops the run.
                // A task that cannot be noted (a full disk) waits here, held, until it can:
                // started now, a crash before its start reached the broker would leave its
                // run without a trace (found by the chaos suite: a full disk, then kill -9).
                let mut delay = Doubling::new(Duration::from_millis(100), Duration::from_secs(5));
                let mut warned = false;
                while let Err(e) = self.start_log.note(claimed.task.id, || {
                    self.leases
                        .lock()
                        .expect("not poisoned")
                        .keys()
                        .copied()
                        .collect()
                }) {
                    if !warned {
                        tracing::warn!(error = %e, "cannot write the start log; the task waits until it can (a full disk?)");
                        warned = true;
                    }
                    if stop.cancel.is_cancelled() || stop.shutdown.is_cancelled() {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay.next_delay()) => {}
                        _ = stop.cancel.cancelled() => {}
                        _ = stop.shutdown.cancelled() => {}
                    }
                }
                // A claim this node held past its lease without renewing it (the node was
                // frozen, or cut off from the broker) may have been taken back and run to its
                // end elsewhere: it starts only once the broker confirms the lease (found by
                // the chaos suite: a node frozen with tasks claimed ahead started them on
                // waking, after another node had finished them).
                if !stop.cancel.is_cancelled() && !self.lease_confirmed(&claimed.lease, &stop).await
                {
                    stop.cancel.cancel();
                }
                // A task that ends within START_RECORD_DELAY never gets a separate start record:
                // its result records the run (and counts the attempt) by itself, which halves
                // the store's work for short tasks.
                let (tx, rx) = tokio::sync::oneshot::channel::<executor::Spawned>();
                let broker = self.broker.clone();
                let lease = claimed.lease.clone();
                let stop_it = stop.cancel.clone();
                let ended = CancellationToken::new();
                let ended_too = ended.clone();
                let me = self.clone();
                let observed = self
                    .observer()
                    .filter(|o| o.watches_start(&claimed.task))
                    .map(|o| (o, claimed.task.clone()));
                tokio::spawn(async move {
                    let Ok(s) = rx.await else { return };
                    if let Some((o, task)) = observed {
                        o.started(&task, s.pid as u32);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(START_RECORD_DELAY) => {}
                        _ = ended_too.cancelled() => return,
                    }
                    match broker.started(&lease, s.pid, s.start_time()).await {
                        Ok(()) => {}
                        Err(BrokerError::LeaseLost(_)) => stop_it.cancel(),
                        Err(BrokerError::Full(e)) => me.broker_full(&e),
                        Err(e) => {
                            tracing::warn!(task = %lease.task, error = %e, "failed to record a task's start")
                        }
                    }
                });
                let began = std::time::Instant::now();
                self.metrics.started(&queue.name);
                // Registered before the process starts: a follower sees its first byte.
                let out = self.live.start(
                    claimed.task.id,
                    &queue.name,
                    claimed.attempt,
                    self.node.as_str(),
                );
                live = Some(out.clone());
                let outcome = match spec {
                    // Stopped before it began (its lease is gone, or an operator cancelled
                    // it while held): nothing is started, a long-lived worker included.
                    _ if stop.cancel.is_cancelled() => {
                        executor::Outcome::not_started(executor::Status::Cancelled, now_ms())
                    }
                    Run::Exec(mut spec) => {
                        spec.live = Some(out);
                        executor::run(*spec, stop, Some(tx)).await
                    }
                    Run::Worker(r) => {
                        let log = prepared.log_spec(claimed.task.id, claimed.attempt);
                        r.run(
                            claimed.task.clone(),
                            claimed.attempt,
                            log,
                            Some(out),
                            stop,
                            Some(tx),
                        )
                        .await
                    }
                };
                let mut rng = rand::thread_rng();
                let decided =
                    policy::decide(&config, &claimed, &self.node, outcome, now_ms(), &mut rng);
                ended.cancel();
                ran = Some(began.elapsed());
                queue
                    .last_run_ms
                    .store(began.elapsed().as_millis() as u64, Ordering::Relaxed);
                decided
            }
        };
        let (record, finish) = self.limit_crashes(&config, &claimed, record, finish).await;
        let log_tasks = self.log_tasks();
        if log_tasks == LogTasks::None
            && matches!(
                record.reason,
                Some(AttemptReason::Spawn) | Some(AttemptReason::Invalid)
            )
        {
            // Even with task ends unlogged, a program that cannot start is a configuration
            // problem the operator must see.
            tracing::warn!(
                error = record.error.as_deref().unwrap_or(""),
                "task cannot run"
            );
        }
        tasklog::log_end(log_tasks, config.max_attempts, &record, &finish);
        {
            use crate::metrics::FinishOutcome as O;
            let outcome = match finish {
                Finish::Succeeded => O::Succeeded,
                Finish::Retry { .. } => O::Retry,
                Finish::Failed => O::Failed,
                Finish::Cancelled => O::Cancelled,
                Finish::Requeue | Finish::Release => O::Requeued,
            };
            let waited = ran.map(|_| {
                Duration::from_millis((record.started_at - claimed.task.run_at).max(0) as u64)
            });
            self.metrics.finished(&queue.name, outcome, ran, waited);
            if record.reason == Some(crate::model::AttemptReason::Oom) {
                self.metrics.oom_killed(&queue.name);
            }
        }
        // Queue the result first, then give the slot to the next task: its start is recorded
        // after this result (the broker's rule 6), so the store never shows more tasks
        // running than the concurrency. The two usually share a commit.
        let queued = self.broker.finish(&claimed.lease, record.clone(), finish);
        queue.running.fetch_sub(1, Ordering::AcqRel);
        self.start_held(&queue);
        // The dispatcher is woken only when it would claim: a wake-up per finished task that
        // found the held buffer full enough cost a turn of its loop (and a timer) each.
        if claim_plan(&queue) != claim::ClaimPlan::Wait {
            queue.kick.notify_one();
        }
        let end = live.as_ref().map(|_| end_info(&record, finish));
        let recorded = self.settle(queued, &claimed.lease, record, finish).await;
        if finish != Finish::Release {
            if let Some(o) = self.observer() {
                o.ended(&claimed.task, recorded.as_ref().map(|a| (a, finish)));
            }
        }
        // Followers learn the end once the broker has it: what they read next agrees.
        if let (Some(out), Some(end)) = (live, end) {
            self.live.end(&out, end);
        }
        self.leases
            .lock()
            .expect("not poisoned")
            .remove(&claimed.task.id);
        if let Finish::Retry { .. } = finish {
            self.reschedule.notify_one();
        }
    }

    /// Record an attempt, retrying while the broker refuses writes (a full disk, a broker
    /// that went away): the result is not dropped while the daemon lives.
    async fn record(&self, lease: &Lease, attempt: AttemptRecord, finish: Finish) {
        let queued = self.broker.finish(lease, attempt.clone(), finish);
        let _ = self.settle(queued, lease, attempt, finish).await;
    }

    /// Wait for the answer to a queued result; while the broker refuses it, queue it again
    /// with backoff. A refusal for a lease no longer held goes to [`Self::lease_lost`].
    /// Returns the attempt once the broker has recorded it with `finish` (`None`: the lease
    /// was lost, and what the store holds is [`Self::lease_lost`]'s doing).
    async fn settle(
        &self,
        queued: Queued<'_, ()>,
        lease: &Lease,
        attempt: AttemptRecord,
        finish: Finish,
    ) -> Option<AttemptRecord> {
        let mut delay = Doubling::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut answer = queued.await;
        loop {
            match answer {
                Ok(()) => {
                    self.broker_writes();
                    return Some(attempt);
                }
                Err(BrokerError::Full(e)) => {
                    self.broker_full(&e);
                    tracing::debug!(task = %lease.task, "the broker is full; the result waits");
                    tokio::time::sleep(delay.next_delay()).await;
                    answer = self.broker.finish(lease, attempt.clone(), finish).await;
                }
                Err(BrokerError::LeaseLost(_)) => {
                    self.lease_lost(lease, attempt, finish).await;
                    return None;
                }
                Err(e) => {
                    tracing::error!(task = %lease.task, error = %e, "failed to record a task's result; retrying");
                    tokio::time::sleep(delay.next_delay()).await;
                    answer = self.broker.finish(lease, attempt.clone(), finish).await;
                }
            }
        }
    }

    /// The broker refused a result because this node no longer holds the task's lease. Two
    /// causes look alike from here: an earlier try of this same write was applied and its
    /// answer lost (the broker went away meanwhile), so the retry found the lease spent by
    /// the write itself; or the lease was really taken over (it ran out while this node was
    /// frozen or cut off from the broker, and the task was queued again, possibly before
    /// its start was ever recorded). The history tells them apart. In the second case the
    /// run still happened: it is added to the history, so a task that ran twice shows both.
    async fn lease_lost(&self, lease: &Lease, attempt: AttemptRecord, finish: Finish) {
        let id = lease.task;
        if finish == Finish::Release {
            tracing::debug!(task = %id, "a reserved task's lease was taken over before it started; nothing ran");
            return;
        }
        if attempt.pid.is_none() {
            // Stopped (the lease found gone) or refused before any process existed: nothing
            // ran, so there is no run to add to the history (it used to be added, as a run
            // that "may have run twice", though it never ran at all).
            tracing::debug!(task = %id, "the task's lease was taken over before its run began; nothing ran");
            return;
        }
        let same_run = |a: &AttemptRecord| {
            a.node == attempt.node
                && a.number == attempt.number
                && a.started_at == attempt.started_at
                && a.ended_at == attempt.ended_at
        };
        match self.broker.get(id).await {
            Ok(Some(d)) if d.history.iter().any(same_run) => {
                tracing::info!(task = %id, "the result was recorded by an earlier try whose answer was lost on the way back; nothing was dropped");
                return;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(BrokerError::NotFound(_)) => {
                tracing::warn!(task = %id, "the task's lease was taken over and the task no longer exists; this run's result is dropped");
                return;
            }
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "the task's lease was taken over; this run's result is dropped, and the history could not be read to record the run");
                return;
            }
        }
        // A run stopped here because the lease was found gone ends as "cancelled"; say so.
        let ended = match (attempt.reason, &attempt.error) {
            (Some(AttemptReason::Cancelled), _) => {
                "this node stopped it on finding its lease gone".to_string()
            }
            (_, Some(e)) => e.clone(),
            (_, None) => "it succeeded".to_string(),
        };
        let mut noted = attempt;
        noted.reason = Some(AttemptReason::Lost);
        noted.error = Some(format!(
            "this node ran the task while its lease was taken over (the node was frozen or cut off from the broker past the lease), so the task was queued again and may have run twice; this run's result was not applied ({ended})"
        ));
        match self.broker.note_run(id, noted).await {
            Ok(()) => tracing::warn!(
                task = %id,
                "the task's lease was taken over while this node ran it: its result is not applied, and the run is added to the task's history"
            ),
            Err(e) => tracing::warn!(
                task = %id,
                error = %e,
                "the task's lease was taken over while this node ran it: its result is dropped, and the run could not be added to the history"
            ),
        }
    }

    /// Broker wake-ups: new work kicks every queue; cancel requests are looked up.
    async fn wake_loop(self: Arc<Self>, wakeups: Wakeups) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = wakeups.work.notified() => self.kick_all(),
                _ = wakeups.pause.notified() => {
                    self.refresh_paused().await;
                    self.kick_all();
                }
                _ = wakeups.sched.notified() => self.reschedule.notify_one(),
                _ = wakeups.cancel.notified() => self.check_cancels().await,
                _ = tick.tick() => {
                    // The safety net behind the wake-ups (a lost datagram, another node).
                    self.refresh_paused().await;
                    self.check_cancels().await;
                    self.expire().await;
                }
                _ = self.interrupt.cancelled() => return,
            }
        }
    }

    /// Cancel the tasks that wait past their expiry (broker rule 16), counting them.
    async fn expire(&self) {
        match self.broker.expire().await {
            Ok(expired) => {
                for (id, queue) in expired {
                    tracing::info!(task = %id, queue = %queue, "the task expired before it started: cancelled");
                    self.metrics.expired(&queue, 1);
                    if let Some(o) = self.observer() {
                        o.expired(id);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "failed to cancel expired tasks"),
        }
    }

    async fn refresh_paused(&self) {
        match self.broker.paused().await {
            Ok(p) => *self.paused.lock().expect("not poisoned") = p,
            Err(e) => tracing::warn!(error = %e, "failed to read paused queues"),
        }
    }

    async fn check_cancels(&self) {
        if self.leases.lock().expect("not poisoned").is_empty() {
            return;
        }
        match self.broker.cancel_requested(&self.node).await {
            Ok(ids) => {
                let leases = self.leases.lock().expect("not poisoned");
                for id in ids {
                    if let Some(entry) = leases.get(&id) {
                        if !entry.cancel.is_cancelled() {
                            tracing::info!(task = %id, queue = %entry.queue, "cancelling a running task");
                            entry.cancel.cancel();
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "failed to look up cancel requests"),
        }
        // Held tasks that were never started are cancelled here, not when a slot frees.
        let queues: Vec<Arc<QueueRt>> = self
            .queues
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        for q in queues {
            let cancelled: Vec<Claimed> = {
                // A queue's `held` before `leases`, as everywhere both are taken.
                let mut held = q.held.lock().expect("not poisoned");
                let leases = self.leases.lock().expect("not poisoned");
                let (gone, keep): (Vec<Claimed>, Vec<Claimed>) = held.drain(..).partition(|c| {
                    leases
                        .get(&c.task.id)
                        .is_some_and(|e| e.cancel.is_cancelled())
                });
                held.extend(keep);
                gone
            };
            for c in cancelled {
                let now = now_ms();
                let attempt = AttemptRecord {
                    number: c.attempt,
                    node: self.node.clone(),
                    started_at: now,
                    ended_at: now,
                    reason: Some(AttemptReason::Cancelled),
                    error: Some("cancelled by an operator before it started".into()),
                    ..Default::default()
                };
                let span = tracing::info_span!(parent: None, "task", queue = %q.name, task = %c.task.id, attempt = c.attempt);
                span.in_scope(|| {
                    tasklog::log_end(
                        self.log_tasks(),
                        q.prepared().config.max_attempts,
                        &attempt,
                        &Finish::Cancelled,
                    )
                });
                self.record(&c.lease, attempt, Finish::Cancelled).await;
                self.leases.lock().expect("not poisoned").remove(&c.task.id);
            }
        }
    }

    /// Kick the queues when the earliest scheduled or retrying task comes due.
    async fn schedule_loop(self: Arc<Self>) {
        let mut due_again = false;
        loop {
            let wait = match self.broker.next_due().await {
                Ok(Some(at)) => Duration::from_millis((at - now_ms()).max(0) as u64),
                Ok(None) => Duration::from_secs(60),
                Err(e) => {
                    tracing::warn!(error = %e, "failed to read the next due time");
                    Duration::from_secs(1)
                }
            };
            // A due task still reported on the next look belongs to a queue that cannot claim
            // it (paused, or not in this config): look again only at the fallback pace.
            let wait = if wait.is_zero() {
                if due_again {
                    FALLBACK_TICK
                } else {
                    due_again = true;
                    self.kick_all();
                    Duration::from_millis(5)
                }
            } else {
                due_again = false;
                wait
            };
            tokio::select! {
                _ = tokio::time::sleep(wait.min(Duration::from_secs(60))) => self.kick_all(),
                _ = self.reschedule.notified() => {}
                _ = self.draining.cancelled() => return,
            }
        }
    }

    /// Whether `lease` still holds, so that its task may start. True at once while the lease
    /// is within the time this node last secured it for; past that, the broker is asked
    /// (a renewal of this one lease): false when another node took the task back. While the
    /// broker cannot answer, the task waits, held (starting it could run it twice); a stop
    /// or shutdown ends the wait.
    async fn lease_confirmed(&self, lease: &Lease, stop: &Stop) -> bool {
        let valid_until = self
            .leases
            .lock()
            .expect("not poisoned")
            .get(&lease.task)
            .filter(|e| e.lease.token == lease.token)
            .map(|e| e.valid_until);
        match valid_until {
            Some(until) if tokio::time::Instant::now() < until => return true,
            None => return true,
            Some(_) => {}
        }
        let mut delay = Doubling::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut warned = false;
        loop {
            let sent = tokio::time::Instant::now();
            match self
                .broker
                .renew(std::slice::from_ref(lease), self.lease())
                .await
            {
                Ok(lost) if lost.contains(&lease.task) => {
                    tracing::warn!(
                        "the lease on this claimed task lapsed (this node could not renew it: it was frozen or cut off from the broker) and another node took the task back: not starting it here"
                    );
                    return false;
                }
                Ok(_) => {
                    let mut leases = self.leases.lock().expect("not poisoned");
                    if let Some(entry) = leases.get_mut(&lease.task) {
                        if entry.lease.token == lease.token {
                            entry.valid_until = sent + self.lease();
                        }
                    }
                    return true;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cannot confirm the lapsed lease of a claimed task; it waits, held, until the broker answers");
                        warned = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay.next_delay()) => {}
                _ = stop.cancel.cancelled() => return false,
                _ = stop.shutdown.cancelled() => return true,
            }
        }
    }

    /// Keep this node's leases alive.
    async fn lease_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.lease() / 3) => {}
                _ = self.interrupt.cancelled() => return,
            }
            let leases: Vec<Lease> = self
                .leases
                .lock()
                .expect("not poisoned")
                .values()
                .map(|e| e.lease.clone())
                .collect();
            if leases.is_empty() {
                continue;
            }
            let sent = tokio::time::Instant::now();
            match self.broker.renew(&leases, self.lease()).await {
                Ok(lost) => {
                    // Taken back by another node (on a shared broker, after this node could
                    // not renew for a whole lease): it runs there now, so stop it here. Its
                    // result would be refused anyway.
                    let mut current = self.leases.lock().expect("not poisoned");
                    for l in &leases {
                        if lost.contains(&l.task) {
                            continue;
                        }
                        if let Some(entry) = current.get_mut(&l.task) {
                            if entry.lease.token == l.token {
                                entry.valid_until = sent + self.lease();
                            }
                        }
                    }
                    let lost =
                        still_held(&leases, lost, |id| current.get(&id).map(|e| e.lease.token));
                    for id in lost {
                        if let Some(entry) = current.get(&id) {
                            if !entry.cancel.is_cancelled() {
                                tracing::warn!(task = %id, queue = %entry.queue, "lost the lease on a task; stopping it here");
                                entry.cancel.cancel();
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "failed to renew leases"),
            }
        }
    }

    /// Claim and start nothing more, at once: the first step of [`Self::drain`], taken by the
    /// daemon as soon as it says "draining", before it records its stop in the store (a
    /// round trip to a networked broker, during which a finishing task started a held one).
    pub fn stop_starting(&self) {
        self.draining.cancel();
    }

    /// Drain: stop claiming, give running tasks `grace` to finish, then interrupt them and
    /// put them back. Returns once every result is recorded. `force` ends the grace early.
    pub async fn drain(&self, grace: Duration, force: CancellationToken) {
        self.draining.cancel();
        self.runs.close();
        let queues: Vec<Arc<QueueRt>> = self
            .queues
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        for q in &queues {
            self.release_held(q).await;
        }
        let running = self.snapshot().running;
        if running > 0 {
            tracing::info!(running, grace = %humantime::format_duration(grace), "draining: waiting for running tasks");
        }
        tokio::select! {
            _ = self.runs.wait() => {}
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(running = self.snapshot().running, "shutdown grace over: stopping running tasks and putting them back");
            }
            _ = force.cancelled() => {
                tracing::warn!("second signal: killing running tasks now and putting them back");
                self.kill_now.cancel();
            }
        }
        self.interrupt.cancel();
        // A second signal during the tasks' kill_grace still ends it at once.
        let pools: Vec<Arc<worker::Pool>> = queues.iter().filter_map(|q| q.pool()).collect();
        let stopped = async {
            self.runs.wait().await;
            // Then the long-lived workers, each SIGTERM → kill_grace → SIGKILL.
            for p in &pools {
                p.shutdown().await;
            }
        };
        tokio::select! {
            _ = stopped => {}
            _ = force.cancelled() => {
                if !self.kill_now.is_cancelled() {
                    tracing::warn!("second signal: killing running tasks now and putting them back");
                }
                self.kill_now.cancel();
                self.runs.wait().await;
                for p in &pools {
                    p.shutdown().await;
                }
            }
        }
        self.workers.remove_file();
    }
}

/// Of the tasks a renewal of `sent` answered as lost, those whose current claim here is the
/// one that was sent (`current`: the token this node holds the task with now, if any). The
/// answer can come after the task ended here and was claimed again under a new token (a
/// retry claimed by this node while the renewal waited on a slow or returning broker): it
/// says nothing about the new claim, and stopping that run would end it for nothing (as
/// `cancelled`, since its own lease is valid and its result applied).
fn still_held(
    sent: &[Lease],
    lost: Vec<TaskId>,
    current: impl Fn(TaskId) -> Option<i64>,
) -> Vec<TaskId> {
    lost.into_iter()
        .filter(|id| {
            let token = sent.iter().find(|l| l.task == *id).map(|l| l.token);
            token.is_some() && current(*id) == token
        })
        .collect()
}

/// How an attempt ended and what became of its task, for its followers.
fn end_info(record: &AttemptRecord, finish: Finish) -> EndInfo {
    use crate::model::TaskState;
    let (state, run_at) = match finish {
        Finish::Succeeded => (TaskState::Succeeded, None),
        Finish::Retry { at } => (TaskState::Retrying, Some(at)),
        Finish::Failed => (TaskState::Failed, None),
        Finish::Cancelled => (TaskState::Cancelled, None),
        Finish::Requeue | Finish::Release => (TaskState::Queued, None),
    };
    EndInfo {
        ran: finish != Finish::Release,
        reason: record.reason,
        exit_code: record.exit_code,
        signal: record.signal,
        error: record.error.clone(),
        started_at: record.started_at,
        ended_at: record.ended_at,
        state,
        run_at,
    }
}

/// What one claimed task runs as.
enum Run {
    /// A process of its own.
    Exec(Box<executor::Spec>),
    /// A task for an idle long-lived worker.
    Worker(worker::Reserved),
}
