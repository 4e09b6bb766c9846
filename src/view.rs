//! The JSON shapes taskd answers with, defined once for the HTTP API and the CLI's `--json`:
//! a queue, a worker, a page of tasks, an enqueue's answer. Where the API and the CLI show
//! the same thing they serialize the same struct, so they cannot drift apart; the OpenAPI
//! document (`api::openapi`) is checked against these structs by a test.
//!
//! Plain data and the conversions into it: it must not read a broker, a file or a clock
//! other than for a worker's uptime, and must not print.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::audit::{Action, Actor, AuditRecord, Outcome};
use crate::broker::{CancelOutcome, NodeInfo, QueueRow, ScheduleState, SlotOutcome, SlotRecord};
use crate::config::Config;
use crate::model::{QueueName, TaskId, TaskRecord, TaskState, UnixMs};
use crate::worker::status::WorkerInfo;

/// `GET /healthz`.
#[derive(Clone, Debug, Serialize)]
pub struct Health {
    pub status: &'static str,
}

/// One queue: its counts by state (every state, zeros included) and flags. `taskd status
/// --server` reads it back from the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueView {
    pub queue: String,
    pub paused: bool,
    /// The config names it (a queue only in the store runs nothing).
    pub configured: bool,
    /// Its slots, from the config (`None` for a queue only in the store).
    pub concurrency: Option<usize>,
    /// Inbox entries set aside, never to run (Redis).
    pub set_aside: u64,
    pub counts: BTreeMap<String, u64>,
}

impl QueueView {
    pub fn new(name: &str, row: &QueueRow, concurrency: Option<usize>) -> Self {
        QueueView {
            queue: name.to_string(),
            paused: row.paused,
            configured: row.configured,
            concurrency,
            set_aside: row.set_aside,
            counts: row
                .by_state()
                .into_iter()
                .map(|(s, n)| (s.to_string(), n))
                .collect(),
        }
    }

    /// Every queue of `rows` ([`crate::broker::queue_rows`]), each with its concurrency
    /// when `config` has it: `GET /api/v1/queues` and `status --json` alike.
    pub fn all(rows: &BTreeMap<String, QueueRow>, config: &Config) -> Vec<Self> {
        rows.iter()
            .map(|(name, row)| {
                let concurrency = name
                    .parse::<QueueName>()
                    .ok()
                    .and_then(|q| config.queues.get(&q).map(|c| c.concurrency));
                QueueView::new(name, row, concurrency)
            })
            .collect()
    }
}

/// One long-lived worker: its `workers.json` record and how long its process has run.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerView {
    #[serde(flatten)]
    pub info: WorkerInfo,
    /// Seconds since the current process started (`None` without a process).
    pub uptime_s: Option<i64>,
    /// The process's resident memory in bytes, read from /proc by whoever made this view
    /// (`None` without a process, or when it cannot be read).
    pub rss_bytes: Option<u64>,
}

impl WorkerView {
    pub fn new(info: WorkerInfo, now: UnixMs, rss_bytes: Option<u64>) -> Self {
        let uptime_s = match (info.pid, info.started_ms) {
            (Some(_), Some(t)) => Some((now - t).max(0) / 1000),
            _ => None,
        };
        WorkerView {
            info,
            uptime_s,
            rss_bytes: rss_bytes.filter(|_| uptime_s.is_some()),
        }
    }
}

/// `GET /api/v1/queues`: the queues, this daemon's workers, the nodes sharing its broker.
#[derive(Clone, Debug, Serialize)]
pub struct Overview {
    pub queues: Vec<QueueView>,
    pub workers: Vec<WorkerView>,
    pub nodes: Vec<NodeInfo>,
}

/// The daemon `taskd status` found on this machine.
#[derive(Clone, Debug, Serialize)]
pub struct DaemonView {
    pub pid: u32,
    /// Why it claims no tasks, if it does not.
    pub halted: Option<String>,
    /// How it contains its tasks: a cgroup per task (where, with which limits), or
    /// process groups only and why.
    pub containment: Option<String>,
}

/// `taskd status --json`: the API's [`Overview`] plus what only this machine knows.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub daemon: Option<DaemonView>,
    pub state_dir: PathBuf,
    /// The store's size (`null` when the backend cannot tell).
    pub store: Option<crate::broker::StoreSize>,
    #[serde(flatten)]
    pub overview: Overview,
}

/// `POST /api/v1/queues/{queue}/tasks`: the task record, and whether it already existed.
#[derive(Clone, Debug, Serialize)]
pub struct EnqueuedTask {
    #[serde(flatten)]
    pub task: TaskRecord,
    /// A waiting or running task held the same unique key (or one that finished less than
    /// its `unique_for` ago): this is that task, and nothing was enqueued.
    pub existing: bool,
}

/// `taskd submit --json` (locally and with `--server`).
#[derive(Clone, Debug, Serialize)]
pub struct Submitted {
    pub existing: bool,
    pub task: TaskRecord,
}

/// `POST /api/v1/queues/{queue}/tasks/batch` and `taskd submit --batch --json`.
#[derive(Clone, Debug, Serialize)]
pub struct BatchEnqueued {
    pub enqueued: usize,
    /// How many of them held a unique key already taken (their ids are the existing tasks').
    pub existing: usize,
    pub ids: Vec<TaskId>,
}

/// `GET /api/v1/tasks`: a page, newest first.
#[derive(Clone, Debug, Serialize)]
pub struct TaskPage {
    pub tasks: Vec<TaskRecord>,
    /// The id of the page's last task, when more follow.
    pub next_cursor: Option<String>,
}

/// `taskd result ID --json`: how a task ended and what it returned.
#[derive(Clone, Debug, Serialize)]
pub struct ResultView {
    pub id: TaskId,
    pub state: TaskState,
    /// What it returned, once succeeded (`None`: not finished, failed, or no result).
    pub result: Option<serde_json::Value>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
}

/// `POST /api/v1/tasks/{id}/cancel`.
#[derive(Clone, Debug, Serialize)]
pub struct CancelView {
    pub outcome: CancelOutcome,
    pub task: TaskRecord,
}

/// `POST /api/v1/queues/{queue}/pause` and `resume`.
#[derive(Clone, Debug, Serialize)]
pub struct PauseView {
    pub queue: QueueName,
    pub paused: bool,
}

/// `POST /api/v1/queues/{queue}/restart`: the rolling restart of the queue's workers began.
#[derive(Clone, Debug, Serialize)]
pub struct RestartView {
    pub queue: QueueName,
    pub restarting: bool,
    /// What restarts ("queue w: restarting 2 workers one at a time, …").
    pub message: String,
}

/// One record of the audit trail (`GET /api/v1/audit`, `taskd audit --json`): the entry as
/// recorded, plus `who` and `target` as people read them (what `taskd audit` prints).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditView {
    /// Opaque; the cursor for records older than this one.
    pub id: String,
    /// When the store took the record, ms since the epoch (the store's clock).
    pub at: UnixMs,
    /// Who, for people: `local cli uid 1000 (alice)`, `api token "ci" from 10.0.0.5:41234`.
    pub who: String,
    pub actor: Actor,
    pub action: Action,
    /// The target, for people: `task ID (queue Q)`, `queue Q`, `queue=q state=failed (12
    /// tasks)`, `schedule S (queue Q)`, `schedule S, task ID (queue Q)`, or `-`.
    pub target: String,
    pub task: Option<TaskId>,
    pub queue: Option<QueueName>,
    /// The schedule acted on (`schedule_fire`, `schedule_pause`, `schedule_resume`).
    pub schedule: Option<String>,
    /// A bulk operation's filter.
    pub filter: Option<BTreeMap<String, String>>,
    /// A bulk operation: how many tasks it changed.
    pub count: Option<u64>,
    pub outcome: Outcome,
    pub detail: String,
}

impl From<AuditRecord> for AuditView {
    fn from(record: AuditRecord) -> AuditView {
        let e = record.entry;
        AuditView {
            id: record.id,
            at: record.at,
            who: e.actor.describe(),
            target: e.target(),
            actor: e.actor,
            action: e.action,
            task: e.task,
            queue: e.queue,
            schedule: e.schedule,
            filter: e.filter,
            count: e.count,
            outcome: e.outcome,
            detail: e.detail,
        }
    }
}

/// `GET /api/v1/audit`: a page of the trail, newest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditPage {
    pub records: Vec<AuditView>,
    /// The id of the page's last record, when older ones follow: pass it as `cursor`.
    pub next_cursor: Option<String>,
}

/// `POST /api/v1/tasks/bulk`: what a bulk retry or cancel matched, and what it did.
#[derive(Clone, Debug, Serialize)]
pub struct BulkView {
    pub action: BulkAction,
    /// Nothing was changed: `matched` is what the action would apply to.
    pub dry_run: bool,
    /// Tasks the filter matched that the action applies to (cancel: waiting or running;
    /// retry: failed or cancelled).
    pub matched: usize,
    /// Retried; or cancelled, or asked to stop (running).
    pub done: usize,
    /// Tasks that had moved on meanwhile (finished before the cancel, or retried already).
    pub skipped: usize,
    /// The tasks the action was refused for, and why (at most 100 listed).
    pub errors: Vec<BulkFailure>,
}

/// One task a bulk action was refused for.
#[derive(Clone, Debug, Serialize)]
pub struct BulkFailure {
    pub id: TaskId,
    pub error: String,
}

/// What a bulk operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BulkAction {
    Retry,
    Cancel,
}

/// `GET /api/v1/stats`: finished attempts per time bucket (throughput and latency), from
/// the counters the daemon keeps in the broker.
#[derive(Clone, Debug, Serialize)]
pub struct StatsView {
    /// `1h` or `24h`.
    pub window: String,
    /// The queue the figures are for (`None`: every queue).
    pub queue: Option<String>,
    /// Bucket width in seconds.
    pub bucket_s: u64,
    /// The first bucket's start and the last one's end (ms since the epoch).
    pub from: UnixMs,
    pub to: UnixMs,
    /// Oldest first; every bucket of the window, empty ones included.
    pub buckets: Vec<StatBucket>,
    /// The sums over the window.
    pub total: StatBucket,
}

/// Finished attempts in one time bucket.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StatBucket {
    /// The bucket's start (ms since the epoch).
    pub start: UnixMs,
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    pub cancelled: u64,
    /// Attempts that ran a process, and their mean and longest run time (ms; `None`
    /// without runs).
    pub runs: u64,
    pub run_ms_mean: Option<u64>,
    pub run_ms_max: Option<u64>,
    /// How long those tasks waited from due to start, on average (ms).
    pub wait_ms_mean: Option<u64>,
}

impl StatBucket {
    /// The bucket starting at `start` that sums `rows`.
    pub fn sum<'a>(
        start: UnixMs,
        rows: impl IntoIterator<Item = &'a crate::broker::StatRow>,
    ) -> Self {
        let mut r = crate::broker::StatRow::new("all".parse().expect("a valid queue name"), 0);
        for x in rows {
            r.add(x);
        }
        let mean = |sum: u64| (r.runs > 0).then(|| sum / r.runs);
        StatBucket {
            start,
            succeeded: r.succeeded,
            failed: r.failed,
            retried: r.retried,
            cancelled: r.cancelled,
            runs: r.runs,
            run_ms_mean: mean(r.run_ms_sum),
            run_ms_max: (r.runs > 0).then_some(r.run_ms_max),
            wait_ms_mean: mean(r.wait_ms_sum),
        }
    }
}

/// One of a task's output streams, in [`OutputEvent`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutStream {
    Stdout,
    Stderr,
}

/// One event of a task's (or a queue's) output stream: a line of `taskd logs --json`, of
/// the control socket's follow answer, and the `data` of an event of the API's
/// `text/event-stream` (whose `event:` is the `event` field and whose `id:` is `id`).
///
/// `run` numbers a task's runs in order, as `taskd show` does (`attempt` is the
/// `TASKD_ATTEMPT` the run had); it is `null` in a queue's stream, which does not read the
/// history. `id`, where set, is the follower's position after the event: give it back
/// (`Last-Event-ID`, or `from=`) to resume after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum OutputEvent {
    /// A run begins (`live`: it runs on the daemon answering, and its output follows as it
    /// is written) or a finished run's stored output follows (`live: false`).
    Attempt {
        id: Option<String>,
        task: TaskId,
        queue: QueueName,
        run: Option<u32>,
        attempt: u32,
        node: Option<String>,
        started_at: UnixMs,
        live: bool,
    },
    /// Text the task wrote on one stream (UTF-8; a byte that is not becomes U+FFFD).
    Output {
        id: Option<String>,
        task: TaskId,
        run: Option<u32>,
        stream: OutStream,
        data: String,
    },
    /// This follower fell behind what the daemon holds: `bytes` of `stream` are not shown.
    Skipped {
        id: Option<String>,
        task: TaskId,
        run: Option<u32>,
        stream: OutStream,
        bytes: u64,
    },
    /// A run ended: how, and what became of the task (`state`, and `run_at` for a retry;
    /// `null` for an earlier run of the history, whose next state is not kept).
    AttemptEnd {
        id: Option<String>,
        task: TaskId,
        run: Option<u32>,
        attempt: u32,
        reason: Option<crate::model::AttemptReason>,
        exit_code: Option<i32>,
        signal: Option<i32>,
        error: Option<String>,
        started_at: UnixMs,
        ended_at: UnixMs,
        state: Option<crate::model::TaskState>,
        run_at: Option<UnixMs>,
    },
    /// Something the follower should know (where the task runs, what it waits for).
    Notice {
        task: Option<TaskId>,
        message: String,
    },
    /// The task ended for good (succeeded, failed or cancelled): the stream closes.
    End {
        id: String,
        task: TaskId,
        state: crate::model::TaskState,
        attempts: u32,
        error: Option<String>,
    },
    /// Without `follow`: what exists now was sent, and the task has not ended (`state`).
    Snapshot {
        task: TaskId,
        state: crate::model::TaskState,
    },
    /// A queue's stream: `count` tasks started and ended faster than this follower looked,
    /// and are not shown.
    TasksSkipped { count: u64 },
}

impl OutputEvent {
    /// The SSE event name (the `event` field).
    pub fn name(&self) -> &'static str {
        match self {
            OutputEvent::Attempt { .. } => "attempt",
            OutputEvent::Output { .. } => "output",
            OutputEvent::Skipped { .. } => "skipped",
            OutputEvent::AttemptEnd { .. } => "attempt_end",
            OutputEvent::Notice { .. } => "notice",
            OutputEvent::End { .. } => "end",
            OutputEvent::Snapshot { .. } => "snapshot",
            OutputEvent::TasksSkipped { .. } => "tasks_skipped",
        }
    }

    /// The follower's position after this event, if it moves it.
    pub fn id(&self) -> Option<&str> {
        match self {
            OutputEvent::Attempt { id, .. }
            | OutputEvent::Output { id, .. }
            | OutputEvent::Skipped { id, .. }
            | OutputEvent::AttemptEnd { id, .. } => id.as_deref(),
            OutputEvent::End { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// One slot record of a schedule, with its task's state now (`null` without a task, or when
/// the task is gone).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SlotView {
    /// The slot (the newest of a run of skipped slots), ms since the epoch.
    pub slot: UnixMs,
    /// The slot in RFC 3339 UTC (its task's unique key ends with it).
    pub slot_utc: String,
    /// The oldest slot of a run of skipped slots (`slot` otherwise), and how many.
    pub first: UnixMs,
    pub count: u64,
    pub outcome: SlotOutcome,
    pub task: Option<TaskId>,
    pub task_state: Option<TaskState>,
    pub reason: Option<String>,
    /// When it was recorded, and by which node.
    pub at: UnixMs,
    pub node: String,
}

impl SlotView {
    pub fn new(record: &SlotRecord, task_state: Option<TaskState>) -> SlotView {
        SlotView {
            slot: record.slot,
            slot_utc: crate::slots::show_utc(record.slot),
            first: record.first,
            count: record.count,
            outcome: record.outcome,
            task: record.task,
            task_state,
            reason: record.reason.clone(),
            at: record.at,
            node: record.node.clone(),
        }
    }
}

/// One schedule: its config, when it fires next, and its record in the broker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScheduleView {
    pub schedule: String,
    pub queue: String,
    /// `cron "0 3 * * *"` or `every "10m"`.
    pub spec: String,
    /// The zone `cron` is read in (the machine's unless `timezone` is set).
    pub timezone: String,
    pub enabled: bool,
    /// Paused by `taskd schedules pause` (persisted in the broker).
    pub paused: bool,
    pub missed: String,
    pub overlap: String,
    /// The next slot (`null` while disabled or paused), ms since the epoch, and as a local
    /// time in its zone and in UTC.
    pub next: Option<UnixMs>,
    pub next_local: Option<String>,
    pub next_utc: Option<String>,
    /// Every slot up to this instant is handled (`null` before a daemon first ran it).
    pub handled_through: Option<UnixMs>,
    pub fired: u64,
    pub caught_up: u64,
    pub skipped: u64,
    /// The newest slot record.
    pub last: Option<SlotView>,
}

impl ScheduleView {
    /// `cfg` with its `state` in the broker; `last_state` is the state of the last record's
    /// task.
    pub fn new(
        cfg: &crate::config::ScheduleConfig,
        state: &ScheduleState,
        last_state: Option<TaskState>,
        now: UnixMs,
    ) -> ScheduleView {
        let next = (cfg.enabled && !state.paused)
            .then(|| cfg.calendar.next_after(now))
            .flatten();
        ScheduleView {
            schedule: cfg.name.clone(),
            queue: cfg.queue.to_string(),
            spec: cfg.spec(),
            timezone: cfg.calendar.zone.name().to_string(),
            enabled: cfg.enabled,
            paused: state.paused,
            missed: cfg.missed.as_str().to_string(),
            overlap: cfg.overlap.as_str().to_string(),
            next,
            next_local: next.map(|t| cfg.calendar.zone.show(t)),
            next_utc: next.map(crate::slots::show_utc),
            handled_through: (state.through > 0).then_some(state.through),
            fired: state.fired,
            caught_up: state.caught_up,
            skipped: state.skipped,
            last: state.last.as_ref().map(|r| SlotView::new(r, last_state)),
        }
    }
}

/// `GET /api/v1/schedules` and `taskd schedules --json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Schedules {
    pub schedules: Vec<ScheduleView>,
}

/// `GET /api/v1/schedules/{name}` and `taskd schedules show NAME --json`: the schedule and
/// its newest slot records, newest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScheduleDetail {
    pub schedule: ScheduleView,
    pub history: Vec<SlotView>,
}

/// `POST /api/v1/schedules/{name}/fire` and `taskd schedules fire NAME --json`: the task
/// enqueued now (no slot).
#[derive(Clone, Debug, Serialize)]
pub struct ScheduleFired {
    pub schedule: String,
    pub task: TaskRecord,
}

/// `POST /api/v1/schedules/{name}/pause` and `resume`.
#[derive(Clone, Debug, Serialize)]
pub struct SchedulePaused {
    pub schedule: String,
    pub paused: bool,
}

/// `GET /api/v1/tasks/{id}/why` and `taskd why ID --json`: why a task is not running,
/// every reason, each as the line people read and as data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WhyView {
    pub task: TaskId,
    pub queue: String,
    pub state: TaskState,
    /// It runs now.
    pub running: bool,
    pub reasons: Vec<WhyReason>,
}

/// Every `kind` a [`WhyReason`] can have.
pub const WHY_KINDS: &[&str] = &[
    "running",
    "finished",
    "run_at",
    "retry_at",
    "parents",
    "paused",
    "not_configured",
    "held",
    "slots_full",
    "key_limit",
    "rate_limit",
    "no_daemon",
    "workers_fatal",
    "ready",
];

/// One reason: a stable `kind` (one of [`WHY_KINDS`]), the line people read, and the
/// numbers it names.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WhyReason {
    pub kind: String,
    pub text: String,
    /// The time it names (run-at, retry, the rate limit's next start, the end), ms since
    /// the epoch.
    pub at: Option<UnixMs>,
    /// The tasks it names: parents not yet succeeded, the holders of the key, the oldest
    /// running task of the queue.
    pub tasks: Vec<TaskId>,
    /// The key at its limit, or the rate limit's key.
    pub key: Option<String>,
    /// The node running or holding the task.
    pub node: Option<String>,
    /// How many hold what is full (running tasks, key holders, parents waited for) ...
    pub count: Option<u64>,
    /// ... of how many allowed (slots, `concurrency_per_key`, parents in all).
    pub limit: Option<u64>,
}

impl WhyReason {
    pub fn new(kind: &'static str, text: String) -> WhyReason {
        debug_assert!(WHY_KINDS.contains(&kind), "{kind}");
        WhyReason {
            kind: kind.to_string(),
            text,
            at: None,
            tasks: Vec::new(),
            key: None,
            node: None,
            count: None,
            limit: None,
        }
    }
}

/// A size for people: `812 B`, `4.0 KiB`, `12.3 MiB`, `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (factor, unit) in UNITS {
        if bytes >= factor {
            return format!("{:.1} {unit}", bytes as f64 / factor as f64);
        }
    }
    format!("{bytes} B")
}

/// `taskd status`'s line about the store's size.
pub fn store_line(size: &crate::broker::StoreSize, broker: &str) -> String {
    match size.measure {
        "memory" => format!(
            "store: {} of memory on the Redis server ({broker}, its used_memory)",
            human_bytes(size.bytes)
        ),
        "tables" => format!(
            "store: {} in PostgreSQL ({broker}, the schema's tables with their indexes)",
            human_bytes(size.bytes)
        ),
        _ => format!(
            "store: {} on disk ({broker}, with its WAL)",
            human_bytes(size.bytes)
        ),
    }
}

/// `taskd prune --json`: what was deleted (or, in a dry run, is due), by queue and state.
#[derive(Clone, Debug, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub total: u64,
    pub rows: Vec<PruneRow>,
    /// Schedules' slot records deleted (in a dry run: that would be deleted now).
    pub slot_records: u64,
    /// Rate states deleted because their time had passed (0 in a dry run: they carry
    /// nothing, so there is nothing to review).
    pub rate_states: u64,
}

/// One queue and state of [`PruneReport`].
#[derive(Clone, Debug, Serialize)]
pub struct PruneRow {
    pub queue: String,
    pub state: crate::model::TaskState,
    /// The queue's `keep_*` for the state: `7d`, `12h`, `forever`.
    pub keep: String,
    pub count: u64,
}
