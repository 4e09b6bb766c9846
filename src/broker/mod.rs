//! The broker: the system of record for tasks, and the trait every backend implements.
//!
//! The daemon and the CLI are both clients of a [`Broker`]. A backend owns durability,
//! atomic state changes and leases; it never runs processes (that is the executor's job)
//! and never decides policy (the supervisor says whether a failure is retried, and when).
//!
//! Backends: [`sqlite`] (embedded, the default), `redis` (shared by several nodes; built
//! with the `redis` feature, on by default) and [`memory`] (one process's map, for running
//! the supervisor in tests).
//! `postgres` (shared by several nodes, with transactional enqueue from SQL; built with the
//! `postgres` feature, on by default) keeps the same rules; the contract tests in
//! `tests/broker_contract.rs` run against every backend.
//!
//! # What every backend must keep
//!
//! The supervisor, the CLI and the API rely on these; the contract suite checks each one
//! it can observe from outside.
//!
//! 1. **Atomic, never lost.** Every method is one atomic change; none holds a lock across
//!    calls. A task is never lost: a claim moves it between indexes, it never removes the
//!    only copy. `enqueue` is all or nothing, and durable when it returns (a backend whose
//!    settings could lose acknowledged tasks says so in [`Broker::durability_warnings`]).
//! 2. **A claim reserves.** A claimed task stays `queued`, held by the node (its record's
//!    `node`), claimable by no one else, uncharged (`attempts` unchanged), until its
//!    `started`, its `finish` or a `recover`. Claims go by priority, highest first, then
//!    oldest first; due `scheduled`/`retrying` tasks of the queue are promoted first; a
//!    paused queue yields nothing.
//! 3. **Fencing.** Every claim gives the task a new lease token. `started`, `renew` and
//!    `finish` compare `(token, node)` and refuse a stale lease (`LeaseLost`, or listed as
//!    lost by `renew`) without changing anything.
//! 4. **Each run is charged once.** A charged finish leaves `attempts` counting the run
//!    exactly once whether or not its `started` was recorded (or arrives later and is
//!    refused); an uncharged one leaves it as it was before the claim (see
//!    [`Broker::finish`]).
//! 5. **An operator's cancel wins.** A task with a pending cancel request that finishes
//!    with `Retry`, `Requeue` or `Release`, or is recovered, ends `cancelled`.
//! 6. **A finish is queued when [`Broker::finish`] returns**, before the caller awaits the
//!    answer ([`Queued`]), and the results of one node are applied in the order `finish`
//!    was called. The supervisor relies on it: it hands a finished task's slot to the next
//!    held task right after `finish` returns, and that task's `started` must not reach the
//!    store before the result, or the store would show more tasks running than the
//!    queue's concurrency. SQLite keeps it strictly (one writer takes writes in the order
//!    they were queued). Redis sends results and starts over one connection, in order,
//!    except that a result waiting behind a batch still on its way may arrive up to one
//!    round trip after a later `started` (which the supervisor delays by 5 ms anyway).
//! 7. **Counts are honest.** Reserved tasks count as `queued`, only started ones as
//!    `running`; tasks accepted but not yet indexed (the Redis inbox) count as `queued`.
//! 8. **Wake-ups.** After a change another process must act on (work that can be claimed,
//!    a cancel request, a pause, a task waiting for a time), the backend raises the
//!    matching [`Wakeups`] signal in every subscribed daemon, at least once; the
//!    daemon's ticks are only a safety net.
//! 9. **Shared backends** ([`Broker::shared`]) read time from the store's clock for lease
//!    expiry and due times, keep the node registry ([`Broker::heartbeat`],
//!    [`Broker::nodes`]), and are only ever recovered with [`Recover::Expired`].
//! 10. **A schedule's slot is handled once** ([`Broker::schedule_step`]). A `Fire` or `Skip`
//!     whose slot is not after the record's `through`, or whose spec is not the recorded
//!     one, writes nothing and answers `AlreadyHandled`. Otherwise the slot's task (with
//!     its unique key, `schedule` and `slot`), its slot record, the counts and the new
//!     `through` are one atomic change; `overlap`'s check of the previous slot's task is
//!     made inside it. A waiting or running task already holding the slot's unique key is
//!     that slot's task (no second one). Two clients racing for one slot: one fires it.
//! 11. **The audit trail is append-only and bounded.** [`Broker::audit`] adds exactly one
//!     record per call, durable when it returns (as an enqueue), stamped with the store's
//!     clock and an id that orders records as they were taken; it keeps the newest `keep`
//!     records and drops older ones in the same atomic step (never a scan of the keyspace:
//!     SQLite deletes by primary key, Redis trims a capped stream). No other method writes
//!     or removes audit records, and no audit call touches a task. [`Broker::audit_log`]
//!     reads newest first, bounded by its filter (`since`, `before`, `limit`). Records are
//!     never rewritten: a record's id and time stay what they were when it was taken.
//! 12. **A result belongs to its task.** A `Succeeded` finish stores `attempt.result` (when
//!     there is one) with the task, in the same atomic change as the rest of the finish;
//!     every other finish, and [`Broker::note_run`], stores none. The history never holds
//!     it (attempts read back have `result: None`); [`Broker::get`] returns it as
//!     [`TaskDetail::result`]. Whatever deletes a task deletes its result with it.
//! 13. **Dependencies** ([`NewTask::after`]). `enqueue` refuses a task whose parent does
//!     not exist with `NotFound(parent)` (nothing enqueued; a parent earlier in the same
//!     batch counts, on Redis when it is on the same queue). A parent that already
//!     succeeded is done; one already failed or cancelled makes the new task `cancelled` at
//!     once, `last_error` `dependency <ID> failed`. Otherwise the task is `scheduled` until
//!     every parent has succeeded (it is then promoted as any due task, its `run_at`
//!     permitting); when a parent ends `failed` or `cancelled`, by whatever operation
//!     (finish, cancel, recover, expiry), its waiting dependants end `cancelled` with that
//!     reason in the same atomic change, and theirs after them, transitively, across
//!     queues. A blocked dependant is in no index a claim reads (no scan per claim). The
//!     record keeps the parents' ids in `after`, in the order given ([`Broker::parents`]
//!     reads them with their states). Whatever prunes finished tasks keeps a parent while
//!     one of its dependants has not finished. `retry` of a dependant runs it without
//!     waiting again; a retried parent does not revive dependants already cancelled.
//! 14. **Unique keys.** At most one task of a queue that is waiting or running holds a
//!     unique key; a task enqueued with `unique_for` also holds it until that long after it
//!     finished. `enqueue` of a task whose key is held returns the holder's id with
//!     `existing: true` and stores nothing; the check and the insert are one atomic change,
//!     so producers racing with one key (in any number of processes) get one task.
//! 15. **Per-key and rate limits are decided in the claim** ([`Flow`], set per queue by
//!     [`Broker::set_flow`]). A task whose `flow_key` is set counts against that key while
//!     it is held (reserved or running): a claim never takes a task whose key already has
//!     `per_key` holders, across every client of the store, and takes the other keys' tasks
//!     behind it (no head-of-line blocking). With a rate, each task a claim takes is a start
//!     charged to the limit (the queue's, or its `rate_key` value's) by GCRA with the
//!     store's state: over any window, starts never exceed `burst` plus the window over the
//!     interval. A claim never reads the waiting tasks of a blocked key: they are parked
//!     out of the ready index and put back as slots free up, or their rate allows.
//!     [`Broker::flow_wait`] says when a rate refusal ends.
//! 16. **Expiry** ([`NewTask::expires_at`]). A task past its `expires_at` is never started:
//!     a claim neither promotes nor takes it (nor counts it against its `max`: it takes the
//!     ready tasks behind it), and [`Broker::expire`] ends every such task
//!     that waits (`scheduled`, `retrying`, or `queued` and not held) `cancelled` with
//!     `last_error` `expired` (dependants settled as rule 13 says), reading an index by
//!     expiry, never the waiting tasks. A task already held or running is not touched.
//! 17. **A task is lost a bounded number of times.** [`Broker::recover_limited`] counts a
//!     running task's `lost` attempts (the one it records included); past its queue's
//!     `max_lost` ([`LostLimits`]) the task ends `failed` (its last attempt `lost`, its
//!     `last_error` saying so, its unique key freed, its waiting dependants cancelled as
//!     rule 13 says) instead of going back to `queued`. A pending cancel still wins (rule
//!     5). Reserved tasks that never started are not lost runs and are not counted.
//! 18. **Retention deletes exactly what is due, in bounded steps** ([`Broker::prune`]). A
//!     task is due under a [`PruneRule`] when it is in the rule's queue and state
//!     (succeeded, failed or cancelled) and finished strictly before the rule's `before`;
//!     no other task is ever deleted (a waiting or running one, one retried since, one of
//!     another state or queue, one finished at or after `before`). Deleting a task deletes
//!     all that belongs to it in the same atomic step: its attempts with their output
//!     tails, its result, its entries in every index, and its unique-key record (a
//!     finished task holds none, rule of `enqueue`); the audit trail is not touched (rule
//!     11). One call deletes at most `limit` tasks and finds them through an index on
//!     finish time (never a scan of all tasks or of the keyspace), so that it holds the
//!     store for a few milliseconds at most; it says whether more were due.
//!     [`Broker::prunable`] counts the same tasks and deletes nothing.
//!     A parent is kept while one of its dependants has not finished (rule 13), whatever
//!     its own `keep_*`: it is due again once its last dependant finished. A finished task
//!     that still holds its unique key (`unique_for`, rule 14) is kept until the key lapses.
//!     A schedule's slot records follow its queue's retention ([`Broker::prune_slots`]):
//!     those recorded before a cut-off go, except the newest, so that the schedule's last
//!     slot is still shown. Dependency links go with the tasks they link.
//! 19. **Flow state stays the size of what is live** ([`Broker::prune_flow`]). A rate
//!     state whose TAT is at or before now reads as none (a claim takes the later of the
//!     TAT and now, [`RateLimit::take`]), so deleting it changes no decision: `prune_flow`
//!     deletes such states of one queue, at most `limit` per call (bounded work, never a
//!     scan of the keyspace), and never one whose TAT is later. What a task holds of flow
//!     control goes with it: deleting a task (rule 18) also takes it out of its
//!     concurrency key's holder record, so a key whose tasks are all gone leaves nothing;
//!     a parked-key entry is dropped by the claim that finds nothing parked under it.

pub(crate) mod access;
pub(crate) mod flow;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
pub mod schedules;
pub mod sqlite;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::audit::{AuditEntry, AuditFilter, AuditRecord};
use crate::model::{
    AttemptRecord, NewTask, NodeId, QueueName, TaskDetail, TaskId, TaskRecord, TaskState, UnixMs,
};

/// One parent of a dependant (rule 13), as [`Broker::parents`] reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Parent {
    pub id: TaskId,
    /// Its state now; `None` when it is no longer stored.
    pub state: Option<TaskState>,
}
pub use schedules::{
    ScheduleKey, ScheduleState, ScheduleStep, SlotOutcome, SlotRecord, StepAnswer,
};

/// What went wrong inside the broker. A failing *task* is never a `BrokerError`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The store cannot be reached or opened (CLI exit code 3).
    #[error("broker unreachable: {0}")]
    Unavailable(String),
    #[error("no task with id {0}")]
    NotFound(TaskId),
    /// The request does not fit the task's current state.
    #[error("{0}")]
    Conflict(String),
    /// The lease was taken away (expired and reclaimed, or the task was reset).
    #[error("lease on task {0} is no longer held by this node")]
    LeaseLost(TaskId),
    /// The store refused a write or a read (disk full, corruption, I/O error).
    #[error("broker storage error: {0}")]
    Storage(String),
    /// The store is full and refuses writes until memory or space is freed (a Redis server
    /// at its `maxmemory` under the `noeviction` policy). Reads still work.
    #[error("the broker refuses writes: {0}")]
    Full(String),
}

pub(crate) type Result<T, E = BrokerError> = std::result::Result<T, E>;

/// Proof that a node holds a task: the fencing `token` changes with every claim, so a
/// stale holder's `finish` is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub task: TaskId,
    pub token: i64,
    pub node: NodeId,
}

/// A task handed to a node to run.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub task: TaskRecord,
    pub lease: Lease,
    /// This run's attempt number (1 for the first run), `TASKD_ATTEMPT`.
    pub attempt: u32,
}

/// Where a task goes after an attempt. The supervisor decides; the broker records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Succeeded,
    /// Wait in `retrying` until `at`, then run again.
    Retry {
        at: UnixMs,
    },
    /// Attempts exhausted or a permanent failure: the dead set.
    Failed,
    Cancelled,
    /// Back to `queued` without charging the attempt (lost, shutdown).
    Requeue,
    /// The task was claimed but never started (the node held it ahead of a free slot and
    /// is draining, pausing or cancelling): back to `queued` uncharged, nothing recorded.
    Release,
}

/// The answer to enqueueing one task.
#[derive(Clone, Debug, Serialize)]
pub struct Enqueued {
    pub id: TaskId,
    pub state: TaskState,
    /// A waiting or running task with the same unique key already existed; its id is returned.
    pub existing: bool,
    /// When the new task was recorded, and when it becomes ready (for a new task: enough,
    /// with the `NewTask`, to answer with its whole record without reading it back).
    pub created_at: UnixMs,
    pub run_at: UnixMs,
}

/// The answer to a cancel request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// It was waiting and is now `cancelled`.
    Cancelled,
    /// It is running; its node will kill it and mark it `cancelled`.
    Requested,
    /// It had already finished in this state.
    AlreadyFinished(TaskState),
}

impl CancelOutcome {
    /// `entry` (a cancel's audit record) with this answer: done, asked of the node that
    /// runs the task, or refused because it had already finished. The CLI and the API
    /// record a cancel in the same words.
    pub(crate) fn audited(self, entry: AuditEntry) -> AuditEntry {
        match self {
            CancelOutcome::Cancelled => entry.ok("cancelled before it ran"),
            CancelOutcome::Requested => {
                entry.ok("cancel requested: the node running or holding it stops it")
            }
            CancelOutcome::AlreadyFinished(s) => {
                entry.refused(format!("it had already finished ({s}); nothing to cancel"))
            }
        }
    }
}

/// A running task whose node went away: its process group may still be alive.
#[derive(Clone, Debug)]
pub struct Orphan {
    pub task: TaskId,
    pub queue: QueueName,
    pub node: Option<NodeId>,
    pub pid: Option<i32>,
    pub pid_start: Option<u64>,
    /// Lost more often than its queue's `max_lost`: it ended `failed` (rule 17).
    pub failed: bool,
}

/// How many lost runs the tasks of each queue may have (`max_lost`) before the next one
/// fails them ([`Broker::recover_limited`], rule 17). A queue it does not name (one a reload
/// removed) has the `[defaults]` value; [`LostLimits::default`] has no limit at all.
#[derive(Clone, Debug, Default)]
pub struct LostLimits {
    per_queue: BTreeMap<QueueName, u32>,
    otherwise: Option<u32>,
}

impl LostLimits {
    /// The `max_lost` of every queue of `config`, and the built-in default for the rest.
    pub fn of_config(config: &crate::config::Config) -> LostLimits {
        LostLimits::new(
            config
                .queues
                .iter()
                .map(|(name, q)| (name.clone(), q.max_lost))
                .collect(),
        )
    }

    /// These queues' `max_lost`, and the built-in default for the rest.
    pub fn new(per_queue: BTreeMap<QueueName, u32>) -> LostLimits {
        LostLimits {
            per_queue,
            otherwise: Some(crate::config::defaults::MAX_LOST),
        }
    }

    /// `max_lost` for every queue.
    pub fn all(max_lost: u32) -> LostLimits {
        LostLimits {
            per_queue: BTreeMap::new(),
            otherwise: Some(max_lost),
        }
    }

    /// The lost runs a task of `queue` may have; `u32::MAX` without a limit.
    pub fn of(&self, queue: &QueueName) -> u32 {
        self.per_queue
            .get(queue)
            .copied()
            .or(self.otherwise)
            .unwrap_or(u32::MAX)
    }
}

/// A task's stored result read back: its JSON text parsed (`None`: the task has none).
pub(crate) fn stored_result(
    id: impl std::fmt::Display,
    text: Option<String>,
) -> Result<Option<serde_json::Value>> {
    text.map(|text| {
        serde_json::from_str(&text)
            .map_err(|e| BrokerError::Storage(format!("task {id}'s result: {e}")))
    })
    .transpose()
}

/// The `last_error` of a task failed for its lost runs.
pub fn lost_too_often(lost: impl std::fmt::Display, max_lost: u32) -> String {
    format!(
        "lost {lost} times (the daemon or node running it died each time), more than max_lost = {max_lost}: failed, not queued again, as the likely cause"
    )
}

/// Which running tasks to recover.
#[derive(Clone, Debug)]
pub enum Recover {
    /// Every running task: safe only when no other node can hold leases (embedded store,
    /// guarded by the state directory lock).
    All,
    /// Running tasks whose lease expired before this time.
    Expired(UnixMs),
}

/// Which tasks [`Broker::list`] returns. Every field narrows the listing; `limit` 0 means
/// no limit. [`ListFilter::matches`] is the one definition of what matches (a backend may
/// narrow with its indexes first, then must apply it).
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub queue: Option<QueueName>,
    pub state: Option<TaskState>,
    pub limit: usize,
    /// Created at or after this time (ms since the epoch).
    pub since: Option<UnixMs>,
    /// Created before this time.
    pub until: Option<UnixMs>,
    /// This one task.
    pub id: Option<TaskId>,
    /// Tasks with this unique key (waiting, running or finished).
    pub unique_key: Option<String>,
    /// Tasks whose payload has this field with this value.
    pub payload: Option<PayloadMatch>,
    /// Only tasks listed after this one (older than it): the last task of the previous page.
    /// `NotFound` when no task has this id.
    pub after: Option<TaskId>,
}

impl ListFilter {
    /// Whether `task` passes every condition but `limit` and `after` (which are about order).
    pub(crate) fn matches(&self, task: &TaskRecord) -> bool {
        self.queue.as_ref().is_none_or(|q| &task.queue == q)
            && self.state.is_none_or(|s| task.state == s)
            && self.since.is_none_or(|s| task.created_at >= s)
            && self.until.is_none_or(|u| task.created_at < u)
            && self.id.is_none_or(|id| task.id == id)
            && self
                .unique_key
                .as_deref()
                .is_none_or(|k| task.unique_key.as_deref() == Some(k))
            && self
                .payload
                .as_ref()
                .is_none_or(|p| p.matches(&task.payload))
    }
}

/// A condition on one payload field: `payload.user_id = 42`.
///
/// The path is a dotted list of object keys (a number indexes an array). The value matches
/// when the field equals it read as JSON (`42`, `"42"`, `true`, `null`), or when the field is
/// a string equal to the value's text as written (`name = bob`, and `user_id = 42` also
/// matches the string `"42"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadMatch {
    pub path: Vec<String>,
    pub value: String,
}

impl PayloadMatch {
    /// Reads `PATH = VALUE`, with or without a leading `payload.` (`user_id=42`,
    /// `payload.user.id = 42`).
    pub fn parse(text: &str) -> std::result::Result<PayloadMatch, String> {
        let Some((path, value)) = text.split_once('=') else {
            return Err(format!(
                "`{text}` is not a payload condition: write FIELD = VALUE, e.g. `payload.user_id = 42`"
            ));
        };
        let path = path.trim();
        let path = path.strip_prefix("payload.").unwrap_or(path);
        let path: Vec<String> = path.split('.').map(|p| p.trim().to_string()).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "`{text}`: the field path has an empty part; write FIELD = VALUE, e.g. `payload.user.id = 42`"
            ));
        }
        Ok(PayloadMatch {
            path,
            value: value.trim().to_string(),
        })
    }

    /// Whether `payload` has the field, with the value.
    pub(crate) fn matches(&self, payload: &serde_json::Value) -> bool {
        let mut v = payload;
        for key in &self.path {
            v = match v {
                serde_json::Value::Object(m) => match m.get(key) {
                    Some(x) => x,
                    None => return false,
                },
                serde_json::Value::Array(a) => {
                    match key.parse::<usize>().ok().and_then(|i| a.get(i)) {
                        Some(x) => x,
                        None => return false,
                    }
                }
                _ => return false,
            };
        }
        if let serde_json::Value::String(s) = v {
            if *s == self.value {
                return true;
            }
        }
        match serde_json::from_str::<serde_json::Value>(&self.value) {
            Ok(want) => json_eq(v, &want),
            Err(_) => false,
        }
    }

    /// Text every stored payload that matches contains: the last key of the path that is
    /// not a number (a number may be an array index) as JSON, then `:` (payloads are stored
    /// as compact JSON); empty when every part is a number. A cheap first test before
    /// parsing.
    pub(crate) fn needle(&self) -> String {
        match self
            .path
            .iter()
            .rev()
            .find(|k| !k.bytes().all(|b| b.is_ascii_digit()))
        {
            Some(key) => format!("{}:", serde_json::Value::String(key.clone())),
            None => String::new(),
        }
    }
}

/// JSON equality where numbers compare by value (`42` = `42.0`), as far as an f64 tells.
fn json_eq(left: &serde_json::Value, right: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (left, right) {
        (V::Number(x), V::Number(y)) => {
            x.to_string() == y.to_string()
                || matches!((x.as_f64(), y.as_f64()), (Some(p), Some(q)) if p == q)
        }
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, p)| y.get(k).is_some_and(|q| json_eq(p, q)))
        }
        _ => left == right,
    }
}

/// Finished attempts of one queue in one minute: the counters behind the throughput and
/// latency charts. The daemon adds them up as attempts end and writes them to the broker
/// every few seconds ([`Broker::add_stats`]), so they outlive a restart and, on a shared
/// broker, add up over every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatRow {
    pub queue: QueueName,
    /// Minutes since the epoch (ms / 60000).
    pub minute: i64,
    pub succeeded: u64,
    /// Attempts that ended the task `failed`.
    pub failed: u64,
    /// Attempts that failed and will run again.
    pub retried: u64,
    /// Running tasks cancelled.
    pub cancelled: u64,
    /// Attempts with a run time (started processes), and the sum and most of their run
    /// times (ms).
    pub runs: u64,
    pub run_ms_sum: u64,
    pub run_ms_max: u64,
    /// The sum of how long those tasks waited from due (run_at) to start (ms).
    pub wait_ms_sum: u64,
}

impl StatRow {
    /// A row of zeros.
    pub fn new(queue: QueueName, minute: i64) -> StatRow {
        StatRow {
            queue,
            minute,
            succeeded: 0,
            failed: 0,
            retried: 0,
            cancelled: 0,
            runs: 0,
            run_ms_sum: 0,
            run_ms_max: 0,
            wait_ms_sum: 0,
        }
    }

    /// Adds `other`'s counters into this row (same queue and minute).
    pub(crate) fn add(&mut self, other: &StatRow) {
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        self.retried += other.retried;
        self.cancelled += other.cancelled;
        self.runs += other.runs;
        self.run_ms_sum += other.run_ms_sum;
        self.run_ms_max = self.run_ms_max.max(other.run_ms_max);
        self.wait_ms_sum += other.wait_ms_sum;
    }
}

/// How long a backend keeps [`StatRow`]s: the charts look back 24 hours.
pub(crate) const STATS_KEEP_MS: i64 = 26 * 3_600_000;

/// Counts by state for one queue.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QueueCounts {
    pub queue: Option<QueueName>,
    pub counts: BTreeMap<TaskState, u64>,
    pub paused: bool,
    /// Entries producers wrote that were set aside and will never run (Redis: an inbox
    /// entry whose id was taken, or that could not be read; see docs/redis.md).
    pub set_aside: u64,
}

/// One queue as `taskd status` and the API show it: the counts, and whether the config
/// names the queue.
#[derive(Clone, Debug, Default)]
pub(crate) struct QueueRow {
    pub counts: BTreeMap<TaskState, u64>,
    pub paused: bool,
    pub configured: bool,
    pub set_aside: u64,
}

impl QueueRow {
    /// Every count by state, zeros included, in lifecycle order ([`TaskState::ALL`]): what a
    /// table with one column per state shows.
    pub(crate) fn in_order(&self) -> [(TaskState, u64); 7] {
        TaskState::ALL.map(|s| (s, self.counts.get(&s).copied().unwrap_or(0)))
    }

    /// Every count by state, zeros included, keyed by the state's name (for JSON; the map
    /// iterates alphabetically, so a table uses [`Self::in_order`]).
    pub(crate) fn by_state(&self) -> BTreeMap<&'static str, u64> {
        TaskState::ALL
            .iter()
            .map(|s| (s.as_str(), self.counts.get(s).copied().unwrap_or(0)))
            .collect()
    }
}

/// The queues of the config (even without tasks) and of the store (even if not
/// configured), by name.
pub(crate) fn queue_rows<'a>(
    configured: impl Iterator<Item = &'a QueueName>,
    counts: Vec<QueueCounts>,
) -> BTreeMap<String, QueueRow> {
    let mut rows: BTreeMap<String, QueueRow> = configured
        .map(|q| {
            (
                q.to_string(),
                QueueRow {
                    configured: true,
                    ..Default::default()
                },
            )
        })
        .collect();
    for c in counts {
        let name = c.queue.map(|q| q.to_string()).unwrap_or_else(|| "?".into());
        let row = rows.entry(name).or_default();
        row.counts = c.counts;
        row.paused = c.paused;
        row.set_aside = c.set_aside;
    }
    rows
}

/// One retention rule ([`Broker::prune`], rule 18): tasks of `queue` in `state` that
/// finished before `before` (ms since the epoch) are due for deletion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneRule {
    pub queue: QueueName,
    pub state: TaskState,
    pub before: UnixMs,
}

impl PruneRule {
    /// The rules of a queue's `keep_succeeded`, `keep_failed` and `keep_cancelled` at `now`
    /// (none for a state kept forever).
    pub fn for_queue(queue: &crate::config::QueueConfig, now: UnixMs) -> Vec<PruneRule> {
        [
            (TaskState::Succeeded, queue.keep_succeeded),
            (TaskState::Failed, queue.keep_failed),
            (TaskState::Cancelled, queue.keep_cancelled),
        ]
        .into_iter()
        .filter_map(|(state, keep)| {
            keep.cutoff(now).map(|before| PruneRule {
                queue: queue.name.clone(),
                state,
                before,
            })
        })
        .collect()
    }

    /// The cut-off of the slot records of a schedule on `queue` at `now`
    /// ([`Broker::prune_slots`]): the queue's longest `keep_*`, so that a record goes no
    /// sooner than the task it may name; `None` when a state is kept forever.
    pub fn slots_before(queue: &crate::config::QueueConfig, now: UnixMs) -> Option<UnixMs> {
        [
            queue.keep_succeeded,
            queue.keep_failed,
            queue.keep_cancelled,
        ]
        .into_iter()
        .map(|keep| keep.cutoff(now))
        .try_fold(UnixMs::MAX, |low, cut| cut.map(|c| low.min(c)))
    }
}

/// Delete the slot records of every schedule of `config` that its queue's retention lets
/// go ([`PruneRule::slots_before`], [`Broker::prune_slots`]); only the schedules on
/// `queues` when given. Returns how many went.
pub async fn prune_schedule_slots(
    broker: &dyn Broker,
    config: &crate::config::Config,
    queues: Option<&[QueueName]>,
    now: UnixMs,
) -> Result<u64> {
    let mut n = 0;
    for s in config.schedules.values() {
        if queues.is_some_and(|qs| !qs.contains(&s.queue)) {
            continue;
        }
        let Some(q) = config.queues.get(&s.queue) else {
            continue;
        };
        if let Some(before) = PruneRule::slots_before(q, now) {
            let key = ScheduleKey {
                name: s.name.clone(),
                queue: s.queue.clone(),
            };
            n += broker.prune_slots(&key, before).await?;
        }
    }
    Ok(n)
}

/// Delete the lapsed rate states of `queues` (rule 19), [`PRUNE_BATCH`] per broker call;
/// returns how many went.
pub async fn prune_flow_states(
    broker: &dyn Broker,
    queues: &[QueueName],
    now_us: i64,
) -> Result<u64> {
    let mut n = 0;
    for q in queues {
        // Bounded: a pass over a queue's states ends (Redis: its scan's cursor comes back
        // to the start), and a state deleted is not found again.
        for _ in 0..10_000 {
            let (deleted, more) = broker.prune_flow(q, now_us, PRUNE_BATCH).await?;
            n += deleted;
            if !more {
                break;
            }
        }
    }
    Ok(n)
}

/// How many slot records [`prune_schedule_slots`] would delete now, with the same
/// arguments; deletes nothing. (Read through [`Broker::schedule_history`]: a schedule keeps
/// at most a few hundred records.)
pub async fn prunable_schedule_slots(
    broker: &dyn Broker,
    config: &crate::config::Config,
    queues: Option<&[QueueName]>,
    now: UnixMs,
) -> Result<u64> {
    let mut n = 0;
    for s in config.schedules.values() {
        if queues.is_some_and(|qs| !qs.contains(&s.queue)) {
            continue;
        }
        let Some(q) = config.queues.get(&s.queue) else {
            continue;
        };
        if let Some(before) = PruneRule::slots_before(q, now) {
            let key = ScheduleKey {
                name: s.name.clone(),
                queue: s.queue.clone(),
            };
            let records = broker.schedule_history(&key, usize::MAX).await?;
            // Newest first; the newest stays whatever its age.
            n += records.iter().skip(1).filter(|r| r.at < before).count() as u64;
        }
    }
    Ok(n)
}

/// How many tasks [`Broker::prune`] deleted (or [`Broker::prunable`] would delete), by
/// queue and state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub counts: BTreeMap<(QueueName, TaskState), u64>,
    /// More tasks were due than the call's limit let it delete.
    pub more: bool,
}

impl Pruned {
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Adds `count` tasks of `queue` in `state`.
    pub fn add(&mut self, queue: &QueueName, state: TaskState, count: u64) {
        if count > 0 {
            *self.counts.entry((queue.clone(), state)).or_default() += count;
        }
    }

    /// Adds another call's counts into these.
    pub fn merge(&mut self, other: &Pruned) {
        for ((q, s), n) in &other.counts {
            self.add(q, *s, *n);
        }
        self.more = other.more;
    }
}

/// How many tasks one [`Broker::prune`] call of the daemon or `taskd prune` deletes at most:
/// small enough that a call holds the store for a few milliseconds (see
/// docs/performance.md, "Retention").
pub const PRUNE_BATCH: usize = 200;

/// Delete every task `rules` make due, [`PRUNE_BATCH`] at a time, each batch its own call
/// (other writes go between them); `each` sees every batch's counts. Returns the sum.
pub async fn prune_due(
    broker: &dyn Broker,
    rules: &[PruneRule],
    mut each: impl FnMut(&Pruned),
) -> Result<Pruned> {
    let mut all = Pruned::default();
    if rules.is_empty() {
        return Ok(all);
    }
    loop {
        let batch = broker.prune(rules, PRUNE_BATCH).await?;
        each(&batch);
        all.merge(&batch);
        if !batch.more {
            all.more = false;
            return Ok(all);
        }
    }
}

/// The store's size as `taskd status` and `taskd_store_bytes` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoreSize {
    pub bytes: u64,
    /// What was measured: `"file"` (SQLite: the database, its WAL and shared-memory
    /// files), `"memory"` (Redis: the server's `used_memory`, which all its databases share),
    /// `"tables"` (PostgreSQL: the broker schema's tables with their indexes and TOAST).
    pub measure: &'static str,
}

/// The audit record of a change to task `id` that `broker` refused (no such task, a state
/// the action does not apply to), with the task's queue when it exists; `None` for a
/// failure of the store itself, which could not take a record either. For the API and the
/// CLI alike.
pub(crate) async fn refusal(
    broker: &dyn Broker,
    entry: AuditEntry,
    id: TaskId,
    error: &BrokerError,
) -> Option<AuditEntry> {
    let entry = entry.refused(error.to_string());
    match error {
        BrokerError::NotFound(_) => Some(entry),
        BrokerError::Conflict(_) => Some(match broker.get(id).await {
            Ok(Some(d)) => entry.queue(d.task.queue),
            _ => entry,
        }),
        _ => None,
    }
}

/// Signals a backend raises for the daemon: work may have arrived, or a cancel was asked.
#[derive(Clone, Default)]
pub struct Wakeups {
    /// Tasks may be ready to claim.
    pub work: Arc<Notify>,
    /// An operator asked to cancel a running (or held) task.
    pub cancel: Arc<Notify>,
    /// A queue was paused or resumed.
    pub pause: Arc<Notify>,
    /// A task that waits for a time was added: the earliest due time may have moved.
    pub sched: Arc<Notify>,
    /// A schedule was paused or resumed: its record is worth reading again.
    pub schedules: Arc<Notify>,
}

/// One daemon as a shared broker knows it (`taskd status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node id a daemon claims with (`host:pid`).
    pub id: NodeId,
    pub host: String,
    pub pid: u32,
    /// The queues it serves.
    pub queues: Vec<String>,
    /// Tasks it runs or holds now.
    pub running: usize,
    /// When it last wrote this record, by the broker's clock (set by the broker).
    #[serde(default)]
    pub last_heartbeat: UnixMs,
}

/// A write the backend has already queued (rule 6): await it for the store's answer.
/// Dropping it does not withdraw the write; it only gives up on the answer.
#[must_use = "the write is queued; await it to learn whether the store took it"]
pub struct Queued<'a, T>(Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>);

impl<'a, T> Queued<'a, T> {
    /// The answer to a write queued before this call, as `answer` will give it.
    pub fn new(answer: impl Future<Output = Result<T>> + Send + 'a) -> Self {
        Queued(Box::pin(answer))
    }
}

impl<T> Future for Queued<'_, T> {
    type Output = Result<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        self.0.as_mut().poll(cx)
    }
}

/// The flow-control limits a claim applies to one queue, from its config
/// (`concurrency_key`/`concurrency_per_key`, `rate`/`burst`/`rate_key`); rule 15.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// At most this many held tasks per `flow_key` value (the queue has a
    /// `concurrency_key`).
    pub per_key: Option<u32>,
    pub rate: Option<RateLimit>,
}

impl Flow {
    /// The limits `queue`'s config sets.
    pub(crate) fn of(queue: &crate::config::QueueConfig) -> Flow {
        Flow {
            per_key: queue
                .concurrency_key
                .as_ref()
                .map(|_| queue.concurrency_per_key),
            rate: queue.rate.map(|rate| RateLimit {
                rate,
                burst: queue.burst,
                keyed: queue.rate_key.is_some(),
            }),
        }
    }

    /// No limit at all: a claim is the plain one.
    pub fn is_none(&self) -> bool {
        self.per_key.is_none() && self.rate.is_none()
    }
}

/// A rate limit (GCRA): a start is allowed at `now` when `tat - tolerance <= now`, and
/// moves `tat` (the theoretical arrival time) to `max(tat, now) + interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub rate: crate::config::Rate,
    pub burst: u32,
    /// One limit per `rate_key` value; otherwise one for the queue.
    pub keyed: bool,
}

impl RateLimit {
    /// The time between two starts, in µs.
    pub fn interval_us(&self) -> i64 {
        self.rate.period_ms * 1000 / i64::from(self.rate.starts)
    }

    /// How far ahead of now the TAT may be and still allow a start, in µs.
    pub fn tolerance_us(&self) -> i64 {
        self.interval_us() * i64::from(self.burst.saturating_sub(1))
    }

    /// A start at `now_us` against the stored `tat`: `Ok(new tat)`, or `Err(the first µs
    /// a start is allowed)`.
    pub fn take(&self, tat: Option<i64>, now_us: i64) -> Result<i64, i64> {
        let tat = tat.unwrap_or(now_us).max(now_us);
        if tat - self.tolerance_us() <= now_us {
            Ok(tat + self.interval_us())
        } else {
            Err(tat - self.tolerance_us())
        }
    }
}

/// The limits each queue's claims apply ([`Broker::set_flow`]) and when its rate next
/// allows a start ([`Broker::flow_wait`]): the part of flow control a client keeps in its
/// own memory (the state the limits need is in the store).
#[derive(Default)]
pub struct FlowTable(std::sync::Mutex<BTreeMap<QueueName, (Flow, Option<UnixMs>)>>);

impl FlowTable {
    pub fn set(&self, queue: &QueueName, flow: Flow) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.entry(queue.clone()).or_default().0 = flow;
    }

    pub fn get(&self, queue: &QueueName) -> Flow {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.get(queue).map(|e| e.0).unwrap_or_default()
    }

    pub fn set_wait(&self, queue: &QueueName, at: Option<UnixMs>) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = t.get_mut(queue) {
            e.1 = at;
        }
    }

    pub fn wait(&self, queue: &QueueName) -> Option<UnixMs> {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.get(queue).and_then(|e| e.1)
    }
}

/// What `taskd why` reads of a queue's flow-control state for one task.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// The tasks holding the task's `flow_key` (reserved or running), oldest first.
    pub key_holders: Vec<TaskId>,
    /// The task's `flow_key` and `rate_key` values as stored.
    pub flow_key: Option<String>,
    pub rate_key: Option<String>,
    /// The rate limit's TAT for the task's rate key (or the queue's), in µs.
    pub rate_tat_us: Option<i64>,
}

/// The system of record. Every method is atomic; none holds a lock across calls. The rules
/// every implementation keeps are in the [module documentation](self).
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Enqueue tasks atomically: all are durable when this returns, or none is.
    async fn enqueue(&self, tasks: Vec<NewTask>) -> Result<Vec<Enqueued>>;

    /// Claim up to `max` ready tasks of `queue` for `node`, oldest first within priority.
    /// Promotes due scheduled/retrying tasks of the queue first. A paused queue yields none.
    ///
    /// A claim *reserves*: each task stays `queued`, held by `node` (its record's `node` is
    /// set), is no longer claimable by anyone, and is not charged yet (`attempts` unchanged;
    /// [`Claimed::attempt`] is `attempts + 1`, the number its run will have). Every claim
    /// gets a new lease token.
    async fn claim(
        &self,
        node: &NodeId,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>>;

    /// [`Broker::claim`] for tasks a node takes ahead of need, while it still holds others to
    /// start: the backend may answer a little later (SQLite lets it share a commit with the
    /// results being written). The same contract otherwise.
    async fn claim_ahead(
        &self,
        node: &NodeId,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        self.claim(node, queue, max, lease).await
    }

    /// The flow-control limits this client's claims of `queue` apply (rule 15); the
    /// daemon sets them from its config at start and on each reload. None by default.
    fn set_flow(&self, queue: &QueueName, flow: Flow);

    /// After a claim of `queue` that its rate limit cut short: when the rate next allows a
    /// start (the earliest, over its keys), so that the caller can claim again then.
    fn flow_wait(&self, queue: &QueueName) -> Option<UnixMs>;

    /// The flow-control state `taskd why` shows for task `id` of `queue`: the holders of its
    /// key and its rate limit's TAT, as the store has them.
    async fn flow_state(&self, queue: &QueueName, id: TaskId) -> Result<FlowState>;

    /// Record the pid (and its start time) of a task's process group, so that a later
    /// recovery can kill it. A still-held task becomes `running` and its attempt is counted.
    async fn started(&self, lease: &Lease, pid: i32, pid_start: u64) -> Result<()>;

    /// Extend leases of reserved and running tasks; returns the tasks whose lease this node
    /// no longer holds.
    async fn renew(&self, leases: &[Lease], lease: Duration) -> Result<Vec<TaskId>>;

    /// Record an attempt and move the task on. Refused with `LeaseLost` for a stale lease.
    ///
    /// Not `async`: the write is queued before this returns (rule 6), and the [`Queued`]
    /// answer says whether the store took it. A backend that must look something up first
    /// (Redis, for a task this node did not claim) queues it once that is done.
    ///
    /// Accepted for a task the lease holds, reserved (its start not recorded: it could not
    /// be spawned, or the record is still on its way) or running. A charged finish
    /// (`Succeeded`, `Failed`, `Retry`, and `Cancelled` with `attempt.pid` set) leaves
    /// `attempts` counting this run exactly once, whether or not its start was recorded; an
    /// uncharged one (`Requeue`, `Release`, `Cancelled` without a pid) leaves it as it was
    /// before the claim. With `Finish::Release` the attempt is not recorded; every other
    /// finish records it. If an operator asked to cancel the task, a `Retry`, `Requeue` or
    /// `Release` ends it `cancelled` instead (`last_error` "cancelled by an operator").
    /// `Succeeded` keeps `attempt.result` as the task's result (rule 12).
    fn finish<'a>(
        &'a self,
        lease: &'a Lease,
        attempt: AttemptRecord,
        next: Finish,
    ) -> Queued<'a, ()>;

    /// Add `attempt` to the history of task `id` without changing the task (state, attempts,
    /// lease): the record of a run whose result [`Broker::finish`] refused because the lease
    /// had been taken over, so that a task that ran twice shows both runs. `NotFound` when
    /// the task no longer exists.
    async fn note_run(&self, id: TaskId, attempt: AttemptRecord) -> Result<()>;

    /// Cancel a waiting task ([`CancelOutcome::Cancelled`]), or ask the node that runs or
    /// holds it (reserved, not started) to stop it ([`CancelOutcome::Requested`]: it is set
    /// `cancel_requested` and listed by [`Broker::cancel_requested`]).
    async fn cancel(&self, id: TaskId) -> Result<CancelOutcome>;

    /// Put a failed or cancelled task back in `queued` with a fresh attempt budget.
    async fn retry(&self, id: TaskId) -> Result<()>;

    /// Stop or start claiming from a queue; persists across restarts.
    async fn set_paused(&self, queue: &QueueName, paused: bool) -> Result<()>;
    async fn paused(&self) -> Result<BTreeSet<QueueName>>;

    async fn get(&self, id: TaskId) -> Result<Option<TaskDetail>>;

    /// [`Broker::get`] of each of `ids`, answers in their order. The default reads them all
    /// at once (concurrent `get`s, for backends with a pool of connections); SQLite, whose
    /// reads share one connection, reads them in one go on it instead.
    async fn get_many(&self, ids: &[TaskId]) -> Result<Vec<Option<TaskDetail>>> {
        futures_util::future::join_all(ids.iter().map(|id| self.get(*id)))
            .await
            .into_iter()
            .collect()
    }

    /// Cancel the tasks that wait past their expiry (rule 16), by the store's clock; returns
    /// each one's id and queue. The daemon calls it every second.
    async fn expire(&self) -> Result<Vec<(TaskId, QueueName)>>;

    /// The parents of task `id` (rule 13) with their states, in the order given at submit;
    /// empty for a task without any. `NotFound` when `id` is not stored. What `taskd why`
    /// shows for a dependant that waits.
    async fn parents(&self, id: TaskId) -> Result<Vec<Parent>> {
        let task = self.get(id).await?.ok_or(BrokerError::NotFound(id))?;
        let mut out = Vec::with_capacity(task.task.after.len());
        for p in task.task.after {
            let state = self.get(p).await?.map(|d| d.task.state);
            out.push(Parent { id: p, state });
        }
        Ok(out)
    }
    /// Newest first.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>>;
    /// Add finished-attempt counters ([`StatRow`]s, one per queue and minute) to the ones
    /// stored: counters add up, `run_ms_max` keeps the larger. Rows older than
    /// [`STATS_KEEP_MS`] may be dropped.
    async fn add_stats(&self, rows: &[StatRow]) -> Result<()>;

    /// The stored counters of every queue for the minutes from `since` (ms) on, in no
    /// particular order.
    async fn stats(&self, since: UnixMs) -> Result<Vec<StatRow>>;

    /// Counts by state for every queue that has tasks or is paused. Reserved tasks count as
    /// `queued`; only started ones as `running`.
    async fn counts(&self) -> Result<Vec<QueueCounts>>;

    /// The earliest run-at time among scheduled and retrying tasks of queues not paused.
    async fn next_due(&self) -> Result<Option<UnixMs>>;

    /// How many tasks (of every queue) are in `state`; cheap for the small states (running,
    /// retrying, failed), for status lines.
    async fn count_state(&self, state: TaskState) -> Result<u64>;

    /// Running or reserved tasks held by `node` that an operator asked to cancel.
    async fn cancel_requested(&self, node: &NodeId) -> Result<Vec<TaskId>>;

    /// Mark held tasks whose process is known to have started (from a node's own start log)
    /// as `running`, so that [`Broker::recover`] records their run as `lost`. Tasks not held
    /// (already finished, released) are left alone. Returns how many were marked.
    async fn adopt_started(&self, ids: &[TaskId]) -> Result<u64>;

    /// Take back the tasks held (reserved or running) by nodes that went away, and return
    /// them all so their process groups can be killed. A running one gets a `lost` attempt
    /// and its attempt is given back; a reserved one is released silently (no attempt
    /// recorded, `attempts` unchanged). Either goes back to `queued`, or ends `cancelled` if
    /// an operator had asked to cancel it. No limit on lost runs: see
    /// [`Broker::recover_limited`].
    async fn recover(&self, scope: Recover, note: &str) -> Result<Vec<Orphan>> {
        self.recover_limited(scope, note, &LostLimits::default())
            .await
    }

    /// [`Broker::recover`], where a running task lost more often than its queue's
    /// `max_lost` ends `failed` instead (rule 17). The daemon's recoveries use this one.
    async fn recover_limited(
        &self,
        scope: Recover,
        note: &str,
        limits: &LostLimits,
    ) -> Result<Vec<Orphan>>;

    /// Start delivering wake-ups to this process (the daemon calls it once).
    async fn subscribe(&self) -> Result<Wakeups>;

    /// Append `entry` to the audit trail (rule 11): one record, stamped with the store's
    /// clock, durable when this returns; records beyond the newest `keep` (at least 1) are
    /// dropped in the same step.
    async fn audit(&self, entry: &AuditEntry, keep: usize) -> Result<()>;

    /// The audit trail, newest first: at most `filter.limit` records (0: no limit), none
    /// taken before `filter.since`, only those older than the record `filter.before`.
    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>>;

    /// Several daemons may hold leases at once (a shared broker). A daemon then never
    /// recovers with [`Recover::All`]: it reclaims expired leases, and registers itself.
    fn shared(&self) -> bool {
        false
    }

    /// Write this node's record, stamped with the broker's clock. A broker with one node
    /// only keeps no registry.
    async fn heartbeat(&self, _node: &NodeInfo) -> Result<()> {
        Ok(())
    }

    /// Remove a node's record (a clean stop).
    async fn leave(&self, _node: &NodeId) -> Result<()> {
        Ok(())
    }

    /// The nodes registered with this broker, by id; empty for an embedded store.
    async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        Ok(Vec::new())
    }

    /// The records of these schedules, in the same order; one never written reads as
    /// [`ScheduleState::empty`].
    async fn schedule_states(&self, keys: &[ScheduleKey]) -> Result<Vec<ScheduleState>>;

    /// Change a schedule's record by one step, atomically (rule 10): begin it at a spec, fire
    /// a slot, record skipped slots, or enqueue its task with no slot.
    async fn schedule_step(&self, key: &ScheduleKey, step: ScheduleStep) -> Result<StepAnswer>;

    /// A schedule's newest slot records, newest first, at most `limit`.
    async fn schedule_history(&self, key: &ScheduleKey, limit: usize) -> Result<Vec<SlotRecord>>;

    /// Pause or resume a schedule (persists across restarts, like a queue's pause) and
    /// raise the `schedules` wake-up.
    async fn set_schedule_paused(&self, key: &ScheduleKey, paused: bool) -> Result<()>;

    /// Delete up to `limit` tasks that `rules` make due, with everything that belongs to
    /// them (rule 18), oldest finish first within each rule; [`Pruned::more`] says whether
    /// more were due. Callers loop ([`prune_due`]).
    async fn prune(&self, rules: &[PruneRule], limit: usize) -> Result<Pruned>;

    /// How many tasks `rules` make due now, by queue and state; deletes nothing.
    async fn prunable(&self, rules: &[PruneRule]) -> Result<Pruned>;

    /// Delete the slot records of schedule `key` recorded before `before` (ms), all but
    /// its newest one, which stays whatever its age (rule 18); returns how many went.
    async fn prune_slots(&self, key: &ScheduleKey, before: UnixMs) -> Result<u64>;

    /// Delete rate states of `queue` whose TAT is at or before `now_us` (rule 19), at most
    /// `limit`; returns how many went and whether to call again (more may be due: the
    /// call stopped at `limit`, or, on Redis, its pass over the states is not complete).
    /// Callers loop ([`prune_flow_states`]).
    async fn prune_flow(&self, queue: &QueueName, now_us: i64, limit: usize)
        -> Result<(u64, bool)>;

    /// Make ready, before the daemon reports `ready`, what its hot paths will use, so that
    /// its first claims cost what later ones do: on PostgreSQL the pool's connections, each
    /// with the claim, start and finish statements prepared and run once (claiming and
    /// changing nothing). An optimisation: the daemon starts whatever this answers (an
    /// embedded store and Redis have nothing to do).
    async fn warm(&self) -> Result<()> {
        Ok(())
    }

    /// How much room the store takes, when the backend can tell (`None`: an in-memory one).
    async fn store_size(&self) -> Result<Option<StoreSize>> {
        Ok(None)
    }

    /// Settings of the store that could lose acknowledged tasks, one sentence each.
    async fn durability_warnings(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// Open the broker a config names.
pub async fn open(url: &crate::config::BrokerUrl) -> Result<Arc<dyn Broker>> {
    match url {
        crate::config::BrokerUrl::Sqlite { path } => {
            let b = sqlite::SqliteBroker::open(path).await?;
            Ok(Arc::new(b))
        }
        #[cfg(feature = "redis")]
        crate::config::BrokerUrl::Redis { url } => {
            let b = redis::RedisBroker::open(url.expose()).await?;
            Ok(Arc::new(b))
        }
        #[cfg(feature = "postgres")]
        crate::config::BrokerUrl::Postgres { url } => {
            let b = postgres::PgBroker::open(url.expose()).await?;
            Ok(Arc::new(b))
        }
        #[cfg(not(feature = "postgres"))]
        crate::config::BrokerUrl::Postgres { .. } => Err(BrokerError::Unavailable(
            "this taskd was built without the PostgreSQL broker (the `postgres` feature)".into(),
        )),
        // The config refuses a Redis URL in such a build; this is for a `BrokerUrl` made by
        // hand.
        #[cfg(not(feature = "redis"))]
        crate::config::BrokerUrl::Redis { .. } => Err(BrokerError::Unavailable(
            "this taskd was built without the Redis broker (the `redis` feature)".into(),
        )),
    }
}
