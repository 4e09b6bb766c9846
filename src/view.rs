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

use crate::broker::{CancelOutcome, NodeInfo, QueueRow, ScheduleState, SlotOutcome, SlotRecord};
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
}

/// `taskd status --json`: the API's [`Overview`] plus what only this machine knows.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub daemon: Option<DaemonView>,
    pub state_dir: PathBuf,
    #[serde(flatten)]
    pub overview: Overview,
}

/// `POST /api/v1/queues/{queue}/tasks`: the task record, and whether it already existed.
#[derive(Clone, Debug, Serialize)]
pub struct EnqueuedTask {
    #[serde(flatten)]
    pub task: TaskRecord,
    /// A waiting or running task held the same unique key: this is that task.
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
    pub fn new(r: &SlotRecord, task_state: Option<TaskState>) -> SlotView {
        SlotView {
            slot: r.slot,
            slot_utc: crate::slots::show_utc(r.slot),
            first: r.first,
            count: r.count,
            outcome: r.outcome,
            task: r.task,
            task_state,
            reason: r.reason.clone(),
            at: r.at,
            node: r.node.clone(),
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
