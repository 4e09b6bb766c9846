//! The broker contract: what every [`Broker`] backend must do, whatever stores its tasks.
//!
//! The suite is generic over the backend. A backend provides one opener,
//! `async fn open_xxx() -> Option<(Arc<dyn Broker>, Box<dyn Guard>)>`, that returns a fresh,
//! empty store and a guard that keeps it alive (a temp dir, a server process) and can open
//! further clients of the same store, as separate processes would. `None` means the backend
//! cannot run here (for example no `redis-server`): the opener prints why, and every test of
//! that backend returns early. Adding a backend is then one line:
//!
//! ```ignore
//! contract_tests!(redis, open_redis);
//! ```
//!
//! which expands every contract case as a `#[tokio::test]` in a module named after the
//! backend (`sqlite::claim_priority_then_fifo`, `redis::claim_priority_then_fifo`, ...).
//! The cases live in [`cases`]; backend-specific checks live in `sqlite_specific` (journal
//! mode, scale) and `redis_specific` (the node registry).
//!
//! Rules the cases follow: each one starts from an empty store; nothing waits for an outcome
//! with a fixed sleep (outcomes are polled with a deadline); a case that waits for time to
//! pass (a run-at, a retry time) polls the clock the broker uses.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use taskd::audit::{Action, Actor, AuditEntry, AuditFilter, Outcome, Via};
use taskd::broker::memory::MemoryBroker;
#[cfg(feature = "redis")]
use taskd::broker::redis::RedisBroker;
use taskd::broker::sqlite::SqliteBroker;
use taskd::broker::{
    Broker, BrokerError, CancelOutcome, Claimed, Finish, Lease, ListFilter, LostLimits,
    PayloadMatch, PruneRule, QueueCounts, Recover, StatRow,
};
use taskd::model::{
    now_ms, AttemptReason, AttemptRecord, NewTask, NodeId, QueueName, TaskDetail, TaskId, TaskState,
};

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// Keeps a backend's store alive for the length of a test, and opens more clients of it.
#[async_trait]
pub trait Guard: Send + Sync + 'static {
    /// Another client of the same store, opened the way a separate process (a CLI call, a
    /// second daemon) would open it: it shares nothing in memory with the first broker.
    async fn connect(&self) -> Arc<dyn Broker>;

    /// Why this backend cannot run contract case `case`, if it cannot (the case is then
    /// skipped, saying why). Only for what the backend cannot be, never for a bug.
    fn cannot_run(&self, _case: &str) -> Option<&'static str> {
        None
    }
}

pub type Opened = (Arc<dyn Broker>, Box<dyn Guard>);

/// SQLite: a database file in its own temp dir.
pub struct SqliteGuard {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

#[async_trait]
impl Guard for SqliteGuard {
    async fn connect(&self) -> Arc<dyn Broker> {
        let b = SqliteBroker::open(&self.path)
            .await
            .unwrap_or_else(|e| panic!("reopening {}: {e}", self.path.display()));
        Arc::new(b)
    }
}

pub async fn sqlite_fixture() -> (Arc<dyn Broker>, SqliteGuard) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state").join("taskd.db");
    let b = SqliteBroker::open(&path)
        .await
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    (Arc::new(b), SqliteGuard { path, _dir: dir })
}

/// In memory: one process's store. Its "other clients" are clients in the same process
/// (the store cannot be shared with another one, or outlive it).
pub struct MemoryGuard {
    broker: Arc<dyn Broker>,
}

#[async_trait]
impl Guard for MemoryGuard {
    async fn connect(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }

    fn cannot_run(&self, case: &str) -> Option<&'static str> {
        (case == "reopen_keeps_tasks")
            .then_some("an in-memory store dies with its process: there is nothing to reopen")
    }
}

pub async fn open_memory() -> Option<Opened> {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    Some((broker.clone(), Box::new(MemoryGuard { broker })))
}

pub async fn open_sqlite() -> Option<Opened> {
    let (b, g) = sqlite_fixture().await;
    Some((b, Box::new(g)))
}

mod common;
#[path = "broker_contract/model.rs"]
mod model;
#[cfg(feature = "redis")]
#[path = "common/redis.rs"]
mod redis_server;

/// Redis: a private `redis-server` on a free port, in its own temp dir.
#[cfg(feature = "redis")]
pub struct RedisGuard {
    pub server: redis_server::RedisServer,
}

#[cfg(feature = "redis")]
#[async_trait]
impl Guard for RedisGuard {
    async fn connect(&self) -> Arc<dyn Broker> {
        let url = self.server.url();
        let b = RedisBroker::open(&url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        Arc::new(b)
    }
}

#[cfg(feature = "redis")]
pub async fn open_redis() -> Option<Opened> {
    let server = redis_server::RedisServer::start("the redis broker contract")?;
    let g = RedisGuard { server };
    Some((g.connect().await, Box::new(g)))
}

#[cfg(feature = "postgres")]
#[path = "common/postgres.rs"]
mod pg_server;

/// PostgreSQL: a database of its own on the test binary's private server.
#[cfg(feature = "postgres")]
pub struct PgGuard {
    pub server: Arc<pg_server::PgServer>,
    pub url: String,
}

#[cfg(feature = "postgres")]
#[async_trait]
impl Guard for PgGuard {
    async fn connect(&self) -> Arc<dyn Broker> {
        let b = taskd::broker::postgres::PgBroker::open(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url));
        Arc::new(b)
    }
}

#[cfg(feature = "postgres")]
pub async fn open_postgres() -> Option<Opened> {
    let server = pg_server::shared("the postgres broker contract")?;
    let db = server.new_db();
    let g = PgGuard {
        url: server.url(&db),
        server,
    };
    Some((g.connect().await, Box::new(g)))
}

/// Expands every contract case as a test of one backend, in a module named `$backend`.
macro_rules! contract_tests {
    ($backend:ident, $open:path) => {
        mod $backend {
            contract_tests!(@cases $open; current_thread;
                enqueue_one_round_trips,
                enqueue_future_run_at_is_scheduled,
                enqueue_batch_of_1000,
                enqueue_batch_is_atomic,
                enqueue_batch_mixes_plain_keyed_and_dependent_tasks,
                unique_key_returns_existing_on_same_queue,
                unique_key_is_per_queue,
                unique_key_is_free_after_finish,
                claim_respects_max,
                claim_priority_then_fifo,
                claim_only_named_queue,
                claim_first_attempt_is_1,
                claim_reserves_without_charging,
                started_marks_running_and_counts_the_attempt,
                started_with_a_stale_lease_is_refused,
                claim_paused_queue_yields_nothing_until_resumed,
                claim_scheduled_only_when_due,
                claim_lease_tokens_differ,
                finish_succeeded,
                finish_succeeded_keeps_the_result,
                get_many_answers_each_id_in_order,
                only_a_success_keeps_a_result,
                finish_failed,
                finish_cancelled,
                finish_retry_waits_until_at,
                finish_requeue_does_not_charge,
                finish_release_records_nothing,
                finish_without_started_counts_the_attempt_once,
                output_tails_keep_nul_bytes,
                finish_charges_each_run_at_most_once,
                finish_stale_token_is_refused,
                note_run_adds_history_and_changes_nothing_else,
                finish_after_recover_and_reclaim_is_refused,
                finish_is_queued_when_the_call_returns,
                started_pid_is_returned_by_recover,
                renew_extends_valid_and_reports_lost,
                recover_all_requeues_uncharged,
                recover_expired_only_takes_expired,
                recover_reserved_task_leaves_no_trace,
                cancel_waiting_task,
                cancel_running_task_is_requested,
                cancel_reserved_task_is_requested,
                cancel_request_outweighs_retry_requeue_release,
                cancel_finished_task,
                cancel_unknown_task,
                cancel_request_survives_recover,
                retry_failed_task,
                retry_refuses_waiting_running_succeeded,
                retry_refuses_when_unique_key_is_taken,
                retry_unknown_task,
                list_filters_limit_newest_first,
                list_search_by_id_unique_key_and_payload,
                list_time_range_and_cursor_pages,
                stats_add_up_and_keep_the_larger_max,
                counts_by_queue_and_state,
                next_due_is_earliest_waiting,
                next_due_ignores_paused_queues,
                reopen_keeps_tasks,
                adopted_start_is_recovered_as_lost,
                lost_more_than_max_lost_times_fails,
                claim_ahead_reserves_like_claim,
                audit_appends_one_record_per_call_newest_first,
                audit_keeps_the_newest_keep,
                audit_log_pages_by_cursor_and_since,
                audit_is_apart_from_tasks,
                schedule_steps_handle_each_slot_once,
                schedule_overlap_skips_while_the_previous_task_waits,
                schedule_unique_key_is_a_second_guard,
                schedule_manual_fire_leaves_the_record,
                schedule_pause_persists_and_wakes,
                schedule_history_is_bounded,
                prune_slots_deletes_old_records_but_the_newest,
                dependants_wait_for_every_parent_across_queues,
                a_failed_parent_cancels_its_dependants_transitively,
                enqueue_after_unknown_or_finished_parents,
                unique_for_holds_the_key_after_the_task_finished,
                an_expired_task_is_never_claimed_and_expire_cancels_it,
                expired_tasks_at_the_head_do_not_hold_back_a_claim,
                a_retried_task_keeps_its_expiry,
                renew_reports_a_stale_lease_beside_the_current_one,
                flow_key_limits_holders_and_lets_others_flow,
                flow_key_limit_of_two,
                flow_parked_tasks_cancel_retry_and_unlimit,
                flow_rate_key_limits_each_key,
                flow_state_names_key_holders,
                flow_prune_deletes_only_lapsed_rate_states,
                prune_deletes_exactly_what_is_due,
                prune_goes_in_bounded_batches,
                prune_keeps_parents_until_their_dependants_finish,
            );
            contract_tests!(@cases $open; multi_thread;
                claim_concurrent_each_task_once,
                subscribe_work_from_another_client,
                subscribe_cancel_of_running_task,
                many_producers_one_consumer,
                schedule_racing_clients_fire_each_slot_once,
                flow_rate_spreads_starts_across_clients,
                model_random_operations,
            );
        }
    };
    (@cases $open:path; current_thread; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let Some((broker, guard)) = $open().await else { return };
                if let Some(why) = guard.cannot_run(stringify!($case)) {
                    eprintln!("{}: does not apply to this backend: {why}", stringify!($case));
                    return;
                }
                $crate::cases::$case(broker, guard).await;
            }
        )*
    };
    (@cases $open:path; multi_thread; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((broker, guard)) = $open().await else { return };
                if let Some(why) = guard.cannot_run(stringify!($case)) {
                    eprintln!("{}: does not apply to this backend: {why}", stringify!($case));
                    return;
                }
                $crate::cases::$case(broker, guard).await;
            }
        )*
    };
}

contract_tests!(sqlite, crate::open_sqlite);
contract_tests!(memory, crate::open_memory);
// Built with the `redis` feature (the default); `--no-default-features` leaves it out.
#[cfg(feature = "redis")]
contract_tests!(redis, crate::open_redis);
#[cfg(feature = "postgres")]
contract_tests!(postgres, crate::open_postgres);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

type B = Arc<dyn Broker>;
type G = Box<dyn Guard>;

const NODE: &str = "node-a";
const LEASE: Duration = Duration::from_secs(60);
/// How long any awaited outcome may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);

fn qn(s: &str) -> QueueName {
    s.parse().expect("valid queue name")
}

fn task(queue: &str) -> NewTask {
    NewTask::new(qn(queue), r#"{"k":"v"}"#.into())
}

fn tasks(queue: &str, n: usize) -> Vec<NewTask> {
    (0..n)
        .map(|i| NewTask::new(qn(queue), format!(r#"{{"i":{i}}}"#)))
        .collect()
}

/// Leases a node does not hold, for `held`'s task: a newer and an older token, another node.
fn stale_leases(held: &Lease) -> [Lease; 3] {
    [
        Lease {
            token: held.token + 1,
            ..held.clone()
        },
        Lease {
            token: held.token - 1,
            ..held.clone()
        },
        Lease {
            node: "node-z".into(),
            ..held.clone()
        },
    ]
}

async fn enqueue1(b: &B, t: NewTask) -> TaskId {
    let out = b.enqueue(vec![t.clone()]).await.expect("enqueue");
    assert_eq!(out.len(), 1, "one Enqueued per task");
    assert_eq!(out[0].id, t.id);
    assert!(!out[0].existing);
    t.id
}

async fn get(b: &B, id: TaskId) -> TaskDetail {
    b.get(id)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("task {id} should exist"))
}

/// The whole stored view of a task, to check that a refused call changed nothing.
async fn snapshot(b: &B, id: TaskId) -> serde_json::Value {
    serde_json::to_value(get(b, id).await).expect("serialize")
}

async fn claim(b: &B, queue: &str, max: usize) -> Vec<Claimed> {
    b.claim(&NODE.into(), &qn(queue), max, LEASE)
        .await
        .expect("claim")
}

/// Claim exactly one task of `queue` and check it is `id`. The task is only reserved
/// (`queued`, held by NODE); [`run_id`] also records its start.
async fn claim_id(b: &B, queue: &str, id: TaskId) -> Claimed {
    let mut c = claim(b, queue, 1).await;
    assert_eq!(
        c.len(),
        1,
        "expected task {id} to be claimable from {queue}"
    );
    let c = c.remove(0);
    assert_eq!(c.task.id, id, "claimed the wrong task");
    assert_eq!(c.lease.task, id);
    assert_eq!(c.lease.node, NODE);
    assert_eq!(
        c.task.state,
        TaskState::Queued,
        "a claimed task stays queued until it starts"
    );
    assert_eq!(
        c.task.node.as_ref().map(NodeId::as_str),
        Some(NODE),
        "a claimed task is held by its node"
    );
    assert_eq!(
        c.attempt,
        c.task.attempts + 1,
        "the claim is not charged yet; its run has the next attempt number"
    );
    c
}

/// The pid and start time `start` records.
const PID: i32 = 4321;
const PID_START: u64 = 987_654_321;

/// Record that a claimed task's process started: from here on the task is `running`.
async fn start(b: &B, c: &Claimed) {
    b.started(&c.lease, PID, PID_START)
        .await
        .unwrap_or_else(|e| panic!("started({}): {e}", c.task.id));
}

/// Claim `id` (see [`claim_id`]) and record its start: the task is running.
async fn run_id(b: &B, queue: &str, id: TaskId) -> Claimed {
    let c = claim_id(b, queue, id).await;
    start(b, &c).await;
    c
}

/// Fail unless `r` is `LeaseLost` for task `id`.
fn assert_lease_lost<T: std::fmt::Debug>(r: Result<T, BrokerError>, id: TaskId, what: &str) {
    assert!(
        matches!(r, Err(BrokerError::LeaseLost(x)) if x == id),
        "{what}: expected LeaseLost({id}), got {r:?}"
    );
}

fn attempt_of(c: &Claimed, reason: AttemptReason, error: Option<&str>) -> AttemptRecord {
    let now = now_ms();
    AttemptRecord {
        number: c.attempt,
        node: c.lease.node.clone(),
        pid: Some(31337),
        started_at: now - 5,
        ended_at: now,
        exit_code: Some(if reason == AttemptReason::Exit && error.is_none() {
            0
        } else {
            3
        }),
        signal: None,
        reason: Some(reason),
        error: error.map(str::to_string),
        stdout_tail: "out line 1\nout ✓ line 2\n".into(),
        stderr_tail: "err \"quoted\"\n".into(),
        // What the attempt's cgroup counted: kept by every backend, beyond 32 bits too.
        memory_peak: Some(5 << 30),
        cpu_usec: Some(1_234_567),
        result: None,
    }
}

fn same_attempt(got: &AttemptRecord, want: &AttemptRecord) {
    assert_eq!(
        serde_json::to_value(got).unwrap(),
        serde_json::to_value(want).unwrap(),
        "attempt history does not hold what finish() was given"
    );
}

/// Call `f` until it returns `Some`, or fail after `DEADLINE`.
async fn poll<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn count(c: &QueueCounts, s: TaskState) -> u64 {
    c.counts.get(&s).copied().unwrap_or(0)
}

fn ids_of(v: &[taskd::model::TaskRecord]) -> Vec<TaskId> {
    v.iter().map(|t| t.id).collect()
}

// ---------------------------------------------------------------------------------------------
// The contract
// ---------------------------------------------------------------------------------------------

pub mod cases {
    use super::*;
    pub use crate::flow_cases::*;
    pub use crate::limit_cases::*;
    pub use crate::schedule_cases::*;

    // --- the contract as a state machine (broker_contract/model.rs) ----------------------------

    /// Random sequences of operations against a model of every task's state.
    pub async fn model_random_operations(b: B, _g: G) {
        let rt = tokio::runtime::Handle::current();
        let run = tokio::task::spawn_blocking(move || crate::model::run(b, rt)).await;
        if let Err(e) = run {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    // --- enqueue ------------------------------------------------------------------------------

    pub async fn enqueue_one_round_trips(b: B, _g: G) {
        let mut t = NewTask::new(
            qn("emails.v2"),
            r#"{"to":"a@example.com","n":[1,2.5,{"x":null}],"s":"é\n\"q\"","big":12345678901234}"#
                .into(),
        );
        t.args = vec![
            "--flag".into(),
            "with space".into(),
            String::new(),
            "ünï$(x)".into(),
        ];
        t.priority = -7;
        t.unique_key = Some("user-42".into());
        let before = now_ms();
        let out = b.enqueue(vec![t.clone()]).await.expect("enqueue");
        let after = now_ms();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id, t.id);
        assert_eq!(out[0].state, TaskState::Queued);
        assert!(!out[0].existing);

        let d = get(&b, t.id).await;
        let r = &d.task;
        assert_eq!(r.id, t.id);
        assert_eq!(r.queue, t.queue);
        assert_eq!(r.state, TaskState::Queued);
        assert_eq!(
            r.payload,
            serde_json::from_str::<serde_json::Value>(&t.payload).unwrap()
        );
        assert_eq!(r.args, t.args);
        assert_eq!(r.priority, -7);
        assert_eq!(r.unique_key.as_deref(), Some("user-42"));
        assert_eq!(r.attempts, 0);
        assert!(
            r.created_at >= before && r.created_at <= after,
            "created_at {} not in [{before}, {after}]",
            r.created_at
        );
        assert!(
            r.run_at >= before && r.run_at <= after,
            "run_at None means now; got {}",
            r.run_at
        );
        assert!(r.updated_at >= r.created_at);
        assert_eq!(r.finished_at, None);
        assert_eq!(r.last_error, None);
        assert!(!r.cancel_requested);
        assert_eq!(r.node, None);
        assert!(d.history.is_empty());

        // Defaults round-trip too: no args, priority 0, no key.
        let plain = task("emails.v2");
        enqueue1(&b, plain.clone()).await;
        let p = get(&b, plain.id).await.task;
        assert!(p.args.is_empty());
        assert_eq!(p.priority, 0);
        assert_eq!(p.unique_key, None);
        assert!(
            b.get(TaskId::new()).await.expect("get").is_none(),
            "unknown id is None"
        );
    }

    pub async fn enqueue_future_run_at_is_scheduled(b: B, _g: G) {
        let at = now_ms() + 3_600_000;
        let mut t = task("later");
        t.run_at = Some(at);
        let out = b.enqueue(vec![t.clone()]).await.expect("enqueue");
        assert_eq!(out[0].state, TaskState::Scheduled);
        let r = get(&b, t.id).await.task;
        assert_eq!(r.state, TaskState::Scheduled);
        assert_eq!(r.run_at, at);
        assert!(
            claim(&b, "later", 10).await.is_empty(),
            "a scheduled task is not claimable"
        );

        // A run_at in the past is simply ready.
        let mut past = task("later");
        past.run_at = Some(now_ms() - 60_000);
        let out = b.enqueue(vec![past.clone()]).await.expect("enqueue");
        assert_eq!(out[0].state, TaskState::Queued);
        assert_eq!(get(&b, past.id).await.task.state, TaskState::Queued);
    }

    pub async fn enqueue_batch_of_1000(b: B, _g: G) {
        let batch = tasks("bulk", 1000);
        let out = b.enqueue(batch.clone()).await.expect("enqueue batch");
        assert_eq!(out.len(), 1000);
        for (t, e) in batch.iter().zip(&out) {
            assert_eq!(e.id, t.id, "Enqueued answers are in input order");
            assert_eq!(e.state, TaskState::Queued);
            assert!(!e.existing);
        }
        let listed = b
            .list(&ListFilter {
                queue: Some(qn("bulk")),
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(listed.len(), 1000);
        let want: BTreeSet<TaskId> = batch.iter().map(|t| t.id).collect();
        let got: BTreeSet<TaskId> = listed.iter().map(|t| t.id).collect();
        assert_eq!(got, want);
        for r in &listed {
            let i = batch.iter().position(|t| t.id == r.id).unwrap();
            assert_eq!(r.payload, serde_json::json!({ "i": i }));
            assert_eq!(r.state, TaskState::Queued);
        }
    }

    pub async fn enqueue_batch_is_atomic(b: B, _g: G) {
        // Two tasks with the same id in one batch: the whole batch fails, nothing is stored.
        let mut batch = tasks("atomic", 10);
        let mut dup = task("atomic");
        dup.id = batch[3].id;
        batch.push(dup);
        let r = b.enqueue(batch.clone()).await;
        assert!(
            r.is_err(),
            "a batch with a duplicate id must fail, got {r:?}"
        );
        for t in &batch {
            assert!(
                b.get(t.id).await.expect("get").is_none(),
                "task {} of a failed batch was stored",
                t.id
            );
        }
        assert!(b
            .list(&ListFilter::default())
            .await
            .expect("list")
            .is_empty());

        // A batch colliding with an already stored id: also all or nothing, and the stored
        // task is untouched.
        let first = task("atomic");
        enqueue1(&b, first.clone()).await;
        let before = snapshot(&b, first.id).await;
        let mut batch = tasks("atomic", 5);
        let mut clash = NewTask::new(qn("atomic"), r#"{"overwritten":true}"#.into());
        clash.id = first.id;
        batch.push(clash);
        batch.extend(tasks("atomic", 5));
        let r = b.enqueue(batch.clone()).await;
        assert!(
            r.is_err(),
            "a batch reusing a stored id must fail, got {r:?}"
        );
        for t in batch.iter().filter(|t| t.id != first.id) {
            assert!(
                b.get(t.id).await.expect("get").is_none(),
                "task {} of a failed batch was stored",
                t.id
            );
        }
        assert_eq!(
            snapshot(&b, first.id).await,
            before,
            "a failed batch changed a stored task"
        );
        assert_eq!(b.list(&ListFilter::default()).await.expect("list").len(), 1);
    }

    pub async fn enqueue_batch_mixes_plain_keyed_and_dependent_tasks(b: B, _g: G) {
        // Plain tasks, two with one unique key (the second answered with the first), one
        // after an earlier task of the same batch and one for later: each answered and stored
        // as if enqueued one by one, in the batch's order.
        let q = "mixed";
        let mut batch = tasks(q, 3);
        let mut k1 = task(q);
        k1.unique_key = Some("mk".into());
        batch.insert(1, k1.clone());
        let mut k2 = task(q);
        k2.unique_key = Some("mk".into());
        batch.insert(3, k2.clone());
        let mut after = task(q);
        after.after = vec![batch[2].id];
        batch.push(after.clone());
        let mut later = task(q);
        later.run_at = Some(now_ms() + 3_600_000);
        batch.push(later.clone());
        batch.extend(tasks(q, 2));
        let out = b.enqueue(batch.clone()).await.expect("enqueue");
        assert_eq!(out.len(), batch.len(), "one answer per task");
        for (i, (t, e)) in batch.iter().zip(&out).enumerate() {
            if t.id == k2.id {
                assert_eq!(
                    (e.id, e.existing),
                    (k1.id, true),
                    "answer {i}: the key's holder"
                );
                assert!(
                    b.get(k2.id).await.expect("get").is_none(),
                    "the duplicate was stored"
                );
                continue;
            }
            assert_eq!((e.id, e.existing), (t.id, false), "answer {i}");
            let want = if t.id == after.id || t.id == later.id {
                TaskState::Scheduled
            } else {
                TaskState::Queued
            };
            assert_eq!(e.state, want, "answer {i}");
            assert_eq!(get(&b, t.id).await.task.state, want, "task {i} as stored");
        }
        let claimed: Vec<TaskId> = claim(&b, q, 100).await.iter().map(|c| c.task.id).collect();
        let ready: Vec<TaskId> = batch
            .iter()
            .map(|t| t.id)
            .filter(|id| ![k2.id, after.id, later.id].contains(id))
            .collect();
        assert_eq!(claimed, ready, "claimed in the batch's order");

        // A batch refused at its end (an id already stored) stores nothing of it, neither
        // its plain tasks nor its keyed one, whose key stays free.
        let mut failing = tasks(q, 4);
        let mut k3 = task(q);
        k3.unique_key = Some("mk3".into());
        failing.insert(2, k3.clone());
        let mut clash = task(q);
        clash.id = batch[0].id;
        failing.push(clash);
        let r = b.enqueue(failing.clone()).await;
        assert!(
            r.is_err(),
            "a batch reusing a stored id must fail, got {r:?}"
        );
        for t in &failing[..failing.len() - 1] {
            assert!(
                b.get(t.id).await.expect("get").is_none(),
                "task {} of a failed batch was stored",
                t.id
            );
        }
        let mut k4 = task(q);
        k4.unique_key = Some("mk3".into());
        enqueue1(&b, k4).await;
    }

    // --- unique keys --------------------------------------------------------------------------

    pub async fn unique_key_returns_existing_on_same_queue(b: B, _g: G) {
        let mut a = task("uq");
        a.unique_key = Some("k1".into());
        enqueue1(&b, a.clone()).await;

        let mut again = task("uq");
        again.unique_key = Some("k1".into());
        let out = b.enqueue(vec![again.clone()]).await.expect("enqueue");
        assert_eq!(out[0].id, a.id, "the first task's id is returned");
        assert!(out[0].existing);
        assert_eq!(out[0].state, TaskState::Queued);
        assert!(
            b.get(again.id).await.expect("get").is_none(),
            "the duplicate was stored"
        );

        // Still held while reserved by a node, and while running.
        let c = claim_id(&b, "uq", a.id).await;
        let mut third = task("uq");
        third.unique_key = Some("k1".into());
        let out = b.enqueue(vec![third.clone()]).await.expect("enqueue");
        assert_eq!(
            (out[0].id, out[0].existing, out[0].state),
            (a.id, true, TaskState::Queued)
        );
        assert!(b.get(third.id).await.expect("get").is_none());
        start(&b, &c).await;
        let mut fourth = task("uq");
        fourth.unique_key = Some("k1".into());
        let out = b.enqueue(vec![fourth.clone()]).await.expect("enqueue");
        assert_eq!(
            (out[0].id, out[0].existing, out[0].state),
            (a.id, true, TaskState::Running)
        );
        assert!(b.get(fourth.id).await.expect("get").is_none());

        // Twice in one batch: the second answer points at the first.
        let mut x = task("uq");
        x.unique_key = Some("k2".into());
        let mut y = task("uq");
        y.unique_key = Some("k2".into());
        let out = b
            .enqueue(vec![x.clone(), y.clone()])
            .await
            .expect("enqueue");
        assert_eq!((out[0].id, out[0].existing), (x.id, false));
        assert_eq!((out[1].id, out[1].existing), (x.id, true));
        assert!(b.get(y.id).await.expect("get").is_none());

        assert_eq!(b.list(&ListFilter::default()).await.expect("list").len(), 2);
        drop(c);
    }

    pub async fn unique_key_is_per_queue(b: B, _g: G) {
        let mut a = task("uq-a");
        a.unique_key = Some("same".into());
        let mut o = task("uq-b");
        o.unique_key = Some("same".into());
        enqueue1(&b, a.clone()).await;
        let out = b.enqueue(vec![o.clone()]).await.expect("enqueue");
        assert_eq!(out[0].id, o.id, "another queue's key is another key");
        assert!(!out[0].existing);
        assert_eq!(get(&b, o.id).await.task.queue, qn("uq-b"));
    }

    pub async fn unique_key_is_free_after_finish(b: B, _g: G) {
        let mut a = task("uq");
        a.unique_key = Some("k".into());
        enqueue1(&b, a.clone()).await;
        let c = run_id(&b, "uq", a.id).await;
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish");

        let mut again = task("uq");
        again.unique_key = Some("k".into());
        let out = b.enqueue(vec![again.clone()]).await.expect("enqueue");
        assert_eq!(
            out[0].id, again.id,
            "a succeeded task no longer holds its key"
        );
        assert!(!out[0].existing);
        assert_eq!(get(&b, again.id).await.task.state, TaskState::Queued);
        assert_eq!(get(&b, a.id).await.task.state, TaskState::Succeeded);

        // A cancelled task frees its key as well.
        assert_eq!(
            b.cancel(again.id).await.expect("cancel"),
            CancelOutcome::Cancelled
        );
        let mut third = task("uq");
        third.unique_key = Some("k".into());
        let out = b.enqueue(vec![third.clone()]).await.expect("enqueue");
        assert_eq!((out[0].id, out[0].existing), (third.id, false));
    }

    // --- claim --------------------------------------------------------------------------------

    pub async fn claim_respects_max(b: B, _g: G) {
        b.enqueue(tasks("m", 5)).await.expect("enqueue");
        assert!(claim(&b, "m", 0).await.is_empty(), "max 0 claims nothing");
        let two = claim(&b, "m", 2).await;
        assert_eq!(two.len(), 2);
        let three = claim(&b, "m", 10).await;
        assert_eq!(three.len(), 3);
        assert!(claim(&b, "m", 10).await.is_empty());
        let ids: BTreeSet<TaskId> = two.iter().chain(&three).map(|c| c.task.id).collect();
        assert_eq!(ids.len(), 5, "a task was claimed twice");
        // All five are reserved by the node: still queued, none running yet.
        let queued = b
            .list(&ListFilter {
                state: Some(TaskState::Queued),
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(queued.len(), 5);
        assert!(
            queued
                .iter()
                .all(|t| t.node.as_ref().map(NodeId::as_str) == Some(NODE)),
            "{queued:?}"
        );
        let running = b
            .list(&ListFilter {
                state: Some(TaskState::Running),
                ..Default::default()
            })
            .await
            .expect("list");
        assert!(running.is_empty(), "a claim alone does not start a task");
    }

    pub async fn claim_priority_then_fifo(b: B, _g: G) {
        // Enqueued one by one, so the enqueue order is unambiguous.
        let prios = [0, 5, 0, 5, -1, 10, 0];
        let mut ids = Vec::new();
        for p in prios {
            let mut t = task("one");
            t.priority = p;
            ids.push(enqueue1(&b, t).await);
        }
        let want = vec![ids[5], ids[1], ids[3], ids[0], ids[2], ids[6], ids[4]];
        let mut got = Vec::new();
        for _ in 0..prios.len() {
            let c = claim(&b, "one", 1).await;
            assert_eq!(c.len(), 1);
            got.push(c[0].task.id);
        }
        assert_eq!(
            got, want,
            "claim order is priority (higher first) then FIFO"
        );

        // The same order inside one multi-task claim, and inside one batch enqueue.
        let mut batch = Vec::new();
        for p in prios {
            let mut t = task("many");
            t.priority = p;
            batch.push(t);
        }
        let ids: Vec<TaskId> = batch.iter().map(|t| t.id).collect();
        b.enqueue(batch).await.expect("enqueue");
        let want = vec![ids[5], ids[1], ids[3], ids[0], ids[2], ids[6], ids[4]];
        let got: Vec<TaskId> = claim(&b, "many", 100)
            .await
            .iter()
            .map(|c| c.task.id)
            .collect();
        assert_eq!(got, want);
    }

    pub async fn claim_only_named_queue(b: B, _g: G) {
        let a = tasks("qa", 3);
        let o = tasks("qb", 3);
        b.enqueue(a.clone()).await.expect("enqueue");
        b.enqueue(o.clone()).await.expect("enqueue");
        let got: BTreeSet<TaskId> = claim(&b, "qa", 100)
            .await
            .iter()
            .map(|c| c.task.id)
            .collect();
        assert_eq!(got, a.iter().map(|t| t.id).collect());
        assert!(
            claim(&b, "qc", 100).await.is_empty(),
            "an unknown queue has nothing"
        );
        for t in &a {
            assert_eq!(
                get(&b, t.id).await.task.node.as_ref().map(NodeId::as_str),
                Some(NODE)
            );
        }
        for t in &o {
            let r = get(&b, t.id).await.task;
            assert_eq!(r.state, TaskState::Queued);
            assert_eq!(r.node, None, "a task of another queue was reserved");
        }
        assert_eq!(claim(&b, "qb", 100).await.len(), 3);
    }

    pub async fn claim_first_attempt_is_1(b: B, _g: G) {
        let id = enqueue1(&b, task("a1")).await;
        let c = claim_id(&b, "a1", id).await;
        assert_eq!(c.attempt, 1, "the first run is attempt 1");
        assert_eq!(c.task.attempts, 0, "a claim is not charged");
        start(&b, &c).await;
        let r = get(&b, id).await.task;
        assert_eq!(r.state, TaskState::Running);
        assert_eq!(r.attempts, 1, "the started run is attempt 1");
        assert_eq!(r.node.as_ref().map(NodeId::as_str), Some(NODE));
        assert!(
            claim(&b, "a1", 10).await.is_empty(),
            "a running task is not claimed again"
        );
    }

    /// A claim reserves: the task stays `queued`, held by the node, uncharged, and nobody
    /// (not this node, not another client) can claim it again.
    pub async fn claim_reserves_without_charging(b: B, g: G) {
        let id = enqueue1(&b, task("rs")).await;
        let other = enqueue1(&b, task("rs")).await;
        let before = now_ms();
        let c = claim_id(&b, "rs", id).await;
        assert_eq!(c.attempt, 1);
        assert_eq!(c.task.attempts, 0);
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Queued, "a reserved task is queued");
        assert_eq!(
            d.task.node.as_ref().map(NodeId::as_str),
            Some(NODE),
            "its node holds it"
        );
        assert_eq!(d.task.attempts, 0, "a claim alone is not charged");
        assert_eq!(d.task.finished_at, None);
        assert!(!d.task.cancel_requested);
        assert!(d.task.updated_at >= before);
        assert!(d.history.is_empty(), "a claim is not an attempt");

        // Not claimable again, by anyone: the next claim gets the next task.
        let b2 = g.connect().await;
        let got = b2
            .claim(&"node-b".into(), &qn("rs"), 10, LEASE)
            .await
            .expect("claim");
        assert_eq!(
            got.iter().map(|c| c.task.id).collect::<Vec<_>>(),
            vec![other],
            "a reserved task was claimed again"
        );
        assert_eq!(
            got[0].task.node.as_ref().map(NodeId::as_str),
            Some("node-b")
        );
        assert!(claim(&b, "rs", 10).await.is_empty());
        assert_eq!(
            get(&b, id).await.task.node.as_ref().map(NodeId::as_str),
            Some(NODE)
        );

        // Claiming with attempts already charged: the run has the next number, still uncharged.
        let c2 = &got[0];
        b2.started(&c2.lease, PID, PID_START)
            .await
            .expect("started");
        b2.finish(
            &c2.lease,
            attempt_of(c2, AttemptReason::Exit, Some("exit code 1")),
            Finish::Retry { at: now_ms() },
        )
        .await
        .expect("retry");
        let c3 = claim_id(&b, "rs", other).await;
        assert_eq!((c3.task.attempts, c3.attempt), (1, 2));
        assert_eq!(get(&b, other).await.task.attempts, 1);
    }

    /// `started` turns a reservation into a run: `running`, the attempt counted, the pid kept.
    pub async fn started_marks_running_and_counts_the_attempt(b: B, _g: G) {
        let id = enqueue1(&b, task("sm")).await;
        let c = claim_id(&b, "sm", id).await;
        let before = now_ms();
        b.started(&c.lease, 777, 4_000_000_001)
            .await
            .expect("started");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Running);
        assert_eq!(d.task.attempts, 1, "started counts the attempt");
        assert_eq!(d.task.attempts, c.attempt);
        assert_eq!(d.task.node.as_ref().map(NodeId::as_str), Some(NODE));
        assert!(d.task.updated_at >= before);
        assert!(d.history.is_empty(), "a run is recorded when it ends");
        assert!(claim(&b, "sm", 10).await.is_empty());
        // The renewal and the finish still take the claim's lease.
        assert!(b
            .renew(std::slice::from_ref(&c.lease), LEASE)
            .await
            .expect("renew")
            .is_empty());
        let orphans = b.recover(Recover::All, "restart").await.expect("recover");
        assert_eq!(orphans.len(), 1);
        assert_eq!(
            (orphans[0].pid, orphans[0].pid_start),
            (Some(777), Some(4_000_000_001)),
            "started recorded the pid"
        );

        // A second run: the attempt goes from 1 (a failure) to 2 on start, not on claim.
        let c = run_id(&b, "sm", id).await;
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, Some("exit code 1")),
            Finish::Retry { at: now_ms() },
        )
        .await
        .expect("retry");
        assert_eq!(get(&b, id).await.task.attempts, 1);
        let c2 = claim_id(&b, "sm", id).await;
        assert_eq!(c2.attempt, 2);
        assert_eq!(get(&b, id).await.task.attempts, 1, "not charged on claim");
        start(&b, &c2).await;
        let t = get(&b, id).await.task;
        assert_eq!((t.state, t.attempts), (TaskState::Running, 2));
    }

    /// `started` with a lease the node does not hold changes nothing.
    pub async fn started_with_a_stale_lease_is_refused(b: B, _g: G) {
        let id = enqueue1(&b, task("ss")).await;
        let c = claim_id(&b, "ss", id).await;
        let before = snapshot(&b, id).await;
        for bad in stale_leases(&c.lease) {
            assert_lease_lost(
                b.started(&bad, 1, 1).await,
                id,
                &format!("started({bad:?})"),
            );
        }
        let r = b
            .started(
                &Lease {
                    task: TaskId::new(),
                    ..c.lease.clone()
                },
                1,
                1,
            )
            .await;
        assert!(r.is_err(), "started on an unknown task: {r:?}");
        assert_eq!(
            snapshot(&b, id).await,
            before,
            "a refused started changed the task"
        );
        start(&b, &c).await;
        assert_eq!(get(&b, id).await.task.state, TaskState::Running);
    }

    pub async fn claim_paused_queue_yields_nothing_until_resumed(b: B, g: G) {
        let id = enqueue1(&b, task("p")).await;
        let other = enqueue1(&b, task("np")).await;
        b.set_paused(&qn("p"), true).await.expect("pause");
        b.set_paused(&qn("p"), true)
            .await
            .expect("pausing twice is fine");
        assert_eq!(b.paused().await.expect("paused"), BTreeSet::from([qn("p")]));
        assert!(
            claim(&b, "p", 10).await.is_empty(),
            "a paused queue yields nothing"
        );
        claim_id(&b, "np", other).await;

        // Pausing is stored, not remembered by this client: another client sees it.
        let b2 = g.connect().await;
        assert_eq!(
            b2.paused().await.expect("paused"),
            BTreeSet::from([qn("p")])
        );
        assert!(b2
            .claim(&"node-b".into(), &qn("p"), 10, LEASE)
            .await
            .expect("claim")
            .is_empty());
        assert_eq!(get(&b, id).await.task.state, TaskState::Queued);

        b.set_paused(&qn("p"), false).await.expect("resume");
        assert!(b.paused().await.expect("paused").is_empty());
        claim_id(&b, "p", id).await;
    }

    pub async fn claim_scheduled_only_when_due(b: B, _g: G) {
        let at = now_ms() + 250;
        let mut t = task("s");
        t.run_at = Some(at);
        enqueue1(&b, t.clone()).await;
        let early_misses = std::cell::Cell::new(0);
        let early = &early_misses;
        let c = poll("the scheduled task to become claimable", || {
            let b = b.clone();
            async move {
                let mut c = claim(&b, "s", 1).await;
                // Only a call that ended before run_at proves anything.
                if c.is_empty() && now_ms() < at {
                    early.set(early.get() + 1);
                }
                c.pop()
            }
        })
        .await;
        let early_misses = early_misses.get();
        assert_eq!(c.task.id, t.id);
        assert!(now_ms() >= at, "claimed before its run_at");
        assert!(
            early_misses > 0,
            "no claim attempt finished before run_at; the test proved nothing"
        );
        assert_eq!(c.attempt, 1);
    }

    pub async fn claim_lease_tokens_differ(b: B, _g: G) {
        let id = enqueue1(&b, task("t")).await;
        let mut tokens = Vec::new();
        let c1 = claim_id(&b, "t", id).await;
        tokens.push(c1.lease.token);
        b.finish(
            &c1.lease,
            attempt_of(&c1, AttemptReason::Shutdown, None),
            Finish::Requeue,
        )
        .await
        .expect("requeue");
        let c2 = claim_id(&b, "t", id).await;
        tokens.push(c2.lease.token);
        b.recover(Recover::All, "restart").await.expect("recover");
        let c3 = claim_id(&b, "t", id).await;
        tokens.push(c3.lease.token);
        let distinct: HashSet<i64> = tokens.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            3,
            "every claim of a task gets a new token: {tokens:?}"
        );
    }

    pub async fn claim_concurrent_each_task_once(b: B, g: G) {
        let all = tasks("conc", 500);
        b.enqueue(all.clone()).await.expect("enqueue");
        let b2 = g.connect().await;
        let mut handles = Vec::new();
        for w in 0..4usize {
            // Two claimers share the first client, two the second (another process).
            let b = if w % 2 == 0 { b.clone() } else { b2.clone() };
            handles.push(tokio::spawn(async move {
                let node = NodeId::from(format!("node-{w}"));
                let mut mine = Vec::new();
                let start = Instant::now();
                loop {
                    let got = b
                        .claim(&node, &qn("conc"), w % 3 + 1, LEASE)
                        .await
                        .expect("claim");
                    if got.is_empty() {
                        break;
                    }
                    for c in got {
                        assert_eq!(
                            c.attempt, 1,
                            "task {} claimed with attempt {}",
                            c.task.id, c.attempt
                        );
                        mine.push(c.task.id);
                        b.started(&c.lease, PID, PID_START).await.expect("started");
                        b.finish(
                            &c.lease,
                            attempt_of(&c, AttemptReason::Exit, None),
                            Finish::Succeeded,
                        )
                        .await
                        .expect("finish");
                    }
                    assert!(start.elapsed() < DEADLINE * 3, "claimer {w} is stuck");
                }
                mine
            }));
        }
        let mut seen: BTreeMap<TaskId, usize> = BTreeMap::new();
        let mut per_worker = Vec::new();
        for h in handles {
            let mine = h.await.expect("claimer panicked");
            per_worker.push(mine.len());
            for id in mine {
                *seen.entry(id).or_default() += 1;
            }
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "claimed more than once: {twice:?}");
        let want: BTreeSet<TaskId> = all.iter().map(|t| t.id).collect();
        let got: BTreeSet<TaskId> = seen.keys().copied().collect();
        assert_eq!(got.len(), 500, "claims per worker: {per_worker:?}");
        assert_eq!(got, want);
        let done = b
            .list(&ListFilter {
                state: Some(TaskState::Succeeded),
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(done.len(), 500);
        assert!(
            done.iter().all(|t| t.attempts == 1),
            "every task ran once and was charged once"
        );
    }

    // --- finish -------------------------------------------------------------------------------

    async fn finish_terminal(
        b: B,
        next: Finish,
        want: TaskState,
        reason: AttemptReason,
        error: Option<&str>,
    ) {
        let id = enqueue1(&b, task("f")).await;
        let c = run_id(&b, "f", id).await;
        let a = attempt_of(&c, reason, error);
        let before = now_ms();
        b.finish(&c.lease, a.clone(), next).await.expect("finish");
        let after = now_ms();
        let d = get(&b, id).await;
        assert_eq!(d.task.state, want);
        let fin = d.task.finished_at.expect("finished_at is set");
        assert!(
            fin >= before && fin <= after,
            "finished_at {fin} not in [{before}, {after}]"
        );
        assert_eq!(d.task.attempts, 1);
        assert_eq!(d.task.node, None, "a finished task has no node");
        assert!(d.task.updated_at >= before);
        assert_eq!(d.history.len(), 1);
        same_attempt(&d.history[0], &a);
        if want == TaskState::Succeeded {
            assert_eq!(d.task.last_error, None);
        } else {
            assert_eq!(d.task.last_error.as_deref(), error);
        }
        assert!(
            claim(&b, "f", 10).await.is_empty(),
            "a finished task is not claimable"
        );
        let before = snapshot(&b, id).await;
        let r = b.finish(&c.lease, a, Finish::Succeeded).await;
        assert_lease_lost(r, id, "finishing twice");
        assert_lease_lost(
            b.started(&c.lease, PID, PID_START).await,
            id,
            "started after finish",
        );
        assert_eq!(
            snapshot(&b, id).await,
            before,
            "a refused call changed a finished task"
        );
    }

    /// Rule 6 of the trait: `finish` queues the write before it returns. The supervisor
    /// hands the slot on right after the call, before it awaits the answer; a result that
    /// waited for its first poll would let the next task's start overtake it. Here the
    /// answer is never awaited at all, and the result is recorded anyway.
    pub async fn finish_is_queued_when_the_call_returns(b: B, _g: G) {
        let id = enqueue1(&b, task("q")).await;
        let c = run_id(&b, "q", id).await;
        let attempt = attempt_of(&c, AttemptReason::Exit, None);
        drop(b.finish(&c.lease, attempt, Finish::Succeeded));
        poll("the dropped finish to be recorded", || async {
            (get(&b, id).await.task.state == TaskState::Succeeded).then_some(())
        })
        .await;
        let d = get(&b, id).await;
        assert_eq!(d.history.len(), 1, "the attempt was recorded: {d:?}");
        assert_eq!(d.task.attempts, 1, "and charged once");
    }

    pub async fn finish_succeeded(b: B, _g: G) {
        finish_terminal(
            b,
            Finish::Succeeded,
            TaskState::Succeeded,
            AttemptReason::Exit,
            None,
        )
        .await;
    }

    /// Rule 12: a `Succeeded` finish stores what the run returned with the task, as it
    /// was (numbers beyond 64 bits, any text, a megabyte), outside the history; it outlives
    /// a reopen.
    pub async fn get_many_answers_each_id_in_order(b: B, _g: G) {
        let ids = [
            enqueue1(&b, task("many")).await,
            enqueue1(&b, task("many")).await,
            enqueue1(&b, task("many")).await,
        ];
        let c = run_id(&b, "many", ids[0]).await;
        let mut a = attempt_of(&c, AttemptReason::Exit, None);
        a.result = Some(serde_json::json!({"n": 1}));
        b.finish(&c.lease, a, Finish::Succeeded)
            .await
            .expect("finish");
        let unknown = TaskId::new();
        let asked = [ids[2], unknown, ids[0], ids[1], ids[2]];
        let many = b.get_many(&asked).await.expect("get_many");
        assert_eq!(many.len(), asked.len(), "one answer per id");
        for (id, answer) in asked.iter().zip(&many) {
            let one = b.get(*id).await.expect("get");
            assert_eq!(
                answer.as_ref().map(|d| serde_json::to_value(d).unwrap()),
                one.as_ref().map(|d| serde_json::to_value(d).unwrap()),
                "get_many answers for {id} what get does"
            );
        }
        assert!(many[1].is_none(), "an unknown id is None");
        assert_eq!(
            many[2].as_ref().and_then(|d| d.result.clone()),
            Some(serde_json::json!({"n": 1})),
            "with its result"
        );
        assert!(b.get_many(&[]).await.expect("none asked").is_empty());
    }

    pub async fn finish_succeeded_keeps_the_result(b: B, g: G) {
        let value: serde_json::Value = serde_json::from_str(
            r#"{"big":123456789012345678901234567890,"text":"é ✓ \u0000 \"q\"","list":[1,2.5,null,true]}"#,
        )
        .unwrap();
        let big = serde_json::Value::String("x".repeat(1024 * 1024));
        let mut ids = Vec::new();
        for v in [
            value.clone(),
            serde_json::json!("plain text"),
            serde_json::json!(0),
            big.clone(),
        ] {
            let id = enqueue1(&b, task("res")).await;
            let c = run_id(&b, "res", id).await;
            let mut a = attempt_of(&c, AttemptReason::Exit, None);
            a.result = Some(v.clone());
            b.finish(&c.lease, a.clone(), Finish::Succeeded)
                .await
                .expect("finish");
            let d = get(&b, id).await;
            assert_eq!(d.task.state, TaskState::Succeeded);
            assert_eq!(d.result.as_ref(), Some(&v), "the result is the task's");
            assert_eq!(d.history.len(), 1);
            assert_eq!(d.history[0].result, None, "the history does not hold it");
            same_attempt(&d.history[0], &a);
            ids.push((id, v));
        }
        let b = g.connect().await;
        for (id, v) in &ids {
            assert_eq!(
                get(&b, *id).await.result.as_ref(),
                Some(v),
                "kept across a reopen"
            );
        }
        assert_eq!(
            serde_json::to_string(&get(&b, ids[0].0).await.result).unwrap(),
            serde_json::to_string(&value).unwrap(),
            "numbers keep their digits"
        );
        // A listing does not carry results (pages of tasks stay small).
        let listed = serde_json::to_value(
            b.list(&ListFilter {
                queue: Some(qn("res")),
                ..Default::default()
            })
            .await
            .expect("list"),
        )
        .unwrap();
        assert!(!listed.to_string().contains("plain text"), "{listed}");
    }

    /// Rule 12: a failure, a retry, a requeue, a cancel or a noted run keeps no result; a
    /// success with none has none; an operator's cancel does not take a success's result.
    pub async fn only_a_success_keeps_a_result(b: B, _g: G) {
        let returned = |c: &Claimed, reason, error| {
            let mut a = attempt_of(c, reason, error);
            a.result = Some(serde_json::json!({"partial": true}));
            a
        };
        let id = enqueue1(&b, task("rn")).await;
        let c = run_id(&b, "rn", id).await;
        b.finish(
            &c.lease,
            returned(&c, AttemptReason::Exit, Some("exit code 3")),
            Finish::Retry { at: now_ms() },
        )
        .await
        .expect("retry");
        assert_eq!(
            get(&b, id).await.result,
            None,
            "a retried attempt keeps none"
        );
        let c = poll("the retried task to be claimable", || async {
            claim(&b, "rn", 1).await.pop()
        })
        .await;
        start(&b, &c).await;
        b.note_run(id, returned(&c, AttemptReason::Lost, Some("lost")))
            .await
            .expect("note_run");
        assert_eq!(get(&b, id).await.result, None, "a noted run keeps none");
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish");
        let d = get(&b, id).await;
        assert_eq!((d.task.state, d.result), (TaskState::Succeeded, None));

        for next in [Finish::Failed, Finish::Cancelled, Finish::Requeue] {
            let id = enqueue1(&b, task("rn2")).await;
            let c = run_id(&b, "rn2", id).await;
            b.finish(
                &c.lease,
                returned(&c, AttemptReason::Exit, Some("no")),
                next,
            )
            .await
            .expect("finish");
            assert_eq!(get(&b, id).await.result, None, "{next:?} keeps no result");
            if next == Finish::Requeue {
                let c = claim_id(&b, "rn2", id).await;
                b.finish(
                    &c.lease,
                    attempt_of(&c, AttemptReason::Exit, None),
                    Finish::Failed,
                )
                .await
                .expect("finish");
            }
        }

        // Cancelled while it ran, it succeeded anyway: the success and its result stand.
        let id = enqueue1(&b, task("rc")).await;
        let c = run_id(&b, "rc", id).await;
        b.cancel(id).await.expect("cancel");
        b.finish(
            &c.lease,
            returned(&c, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Succeeded);
        assert_eq!(d.result, Some(serde_json::json!({"partial": true})));
    }

    pub async fn finish_failed(b: B, _g: G) {
        finish_terminal(
            b,
            Finish::Failed,
            TaskState::Failed,
            AttemptReason::Exit,
            Some("exit code 3"),
        )
        .await;
    }

    pub async fn finish_cancelled(b: B, _g: G) {
        finish_terminal(
            b,
            Finish::Cancelled,
            TaskState::Cancelled,
            AttemptReason::Cancelled,
            Some("cancelled by operator"),
        )
        .await;
    }

    pub async fn finish_retry_waits_until_at(b: B, _g: G) {
        let id = enqueue1(&b, task("r")).await;
        let c = run_id(&b, "r", id).await;
        let at = now_ms() + 250;
        let a = attempt_of(&c, AttemptReason::Exit, Some("exit code 3"));
        b.finish(&c.lease, a.clone(), Finish::Retry { at })
            .await
            .expect("finish");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Retrying);
        assert_eq!(d.task.run_at, at);
        assert_eq!(d.task.finished_at, None);
        assert_eq!(d.task.attempts, 1);
        assert_eq!(d.task.last_error.as_deref(), Some("exit code 3"));
        same_attempt(&d.history[0], &a);
        assert_eq!(b.next_due().await.expect("next_due"), Some(at));

        let early_misses = std::cell::Cell::new(0);
        let early = &early_misses;
        let c2 = poll("the retrying task to become claimable", || {
            let b = b.clone();
            async move {
                let mut c = claim(&b, "r", 1).await;
                if c.is_empty() && now_ms() < at {
                    early.set(early.get() + 1);
                }
                c.pop()
            }
        })
        .await;
        let early_misses = early_misses.get();
        assert!(now_ms() >= at, "claimed before its retry time");
        assert!(
            early_misses > 0,
            "no claim attempt finished before the retry time; the test proved nothing"
        );
        assert_eq!(c2.task.id, id);
        assert_eq!(c2.attempt, 2, "the retry is attempt 2");
        assert_ne!(c2.lease.token, c.lease.token);
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Queued, "claimed, not started yet");
        assert_eq!(d.task.node.as_ref().map(NodeId::as_str), Some(NODE));
        assert_eq!(d.task.attempts, 1);
        start(&b, &c2).await;
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Running);
        assert_eq!(d.task.attempts, 2);

        // The second run succeeds: the earlier attempt's error is no longer the task's.
        let a2 = attempt_of(&c2, AttemptReason::Exit, None);
        b.finish(&c2.lease, a2.clone(), Finish::Succeeded)
            .await
            .expect("finish");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Succeeded);
        assert_eq!(
            d.task.last_error, None,
            "a succeeded task keeps an old error"
        );
        assert!(d.task.finished_at.is_some());
        assert_eq!(d.history.len(), 2);
        same_attempt(&d.history[0], &a);
        same_attempt(&d.history[1], &a2);
    }

    pub async fn finish_requeue_does_not_charge(b: B, _g: G) {
        let id = enqueue1(&b, task("rq")).await;
        let c1 = run_id(&b, "rq", id).await;
        b.finish(
            &c1.lease,
            attempt_of(&c1, AttemptReason::Exit, Some("exit code 1")),
            Finish::Retry { at: now_ms() },
        )
        .await
        .expect("retry");
        let c2 = run_id(&b, "rq", id).await;
        assert_eq!(c2.attempt, 2);
        assert_eq!(get(&b, id).await.task.attempts, 2);
        let a = attempt_of(&c2, AttemptReason::Shutdown, Some("daemon shutting down"));
        b.finish(&c2.lease, a.clone(), Finish::Requeue)
            .await
            .expect("requeue");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Queued);
        assert_eq!(d.task.attempts, 1, "a requeued attempt is not charged");
        assert_eq!(d.task.finished_at, None);
        assert_eq!(d.task.node, None);
        assert_eq!(d.history.len(), 2);
        same_attempt(&d.history[1], &a);
        let c3 = claim_id(&b, "rq", id).await;
        assert_eq!(
            c3.attempt, 2,
            "the run after a requeue has the same attempt number"
        );
        assert_ne!(c3.lease.token, c2.lease.token);

        // Requeued before it started (the node shut down with the run's start unrecorded):
        // recorded, still not charged.
        let a3 = attempt_of(&c3, AttemptReason::Shutdown, Some("daemon shutting down"));
        b.finish(&c3.lease, a3.clone(), Finish::Requeue)
            .await
            .expect("requeue a reserved task");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Queued);
        assert_eq!(d.task.node, None);
        assert_eq!(d.task.attempts, 1, "a requeued reservation is not charged");
        assert_eq!(d.history.len(), 3, "a requeue is recorded");
        same_attempt(&d.history[2], &a3);
        assert_lease_lost(
            b.started(&c3.lease, PID, PID_START).await,
            id,
            "started after requeue",
        );
        assert_eq!(get(&b, id).await.task.attempts, 1);
        assert_eq!(claim_id(&b, "rq", id).await.attempt, 2);
    }

    /// A task claimed ahead but never started goes back uncharged, and leaves no trace in
    /// the history or in last_error.
    pub async fn finish_release_records_nothing(b: B, _g: G) {
        let id = enqueue1(&b, task("rl")).await;
        let c1 = claim_id(&b, "rl", id).await;
        b.finish(
            &c1.lease,
            attempt_of(&c1, AttemptReason::Shutdown, Some("should not be recorded")),
            Finish::Release,
        )
        .await
        .expect("release");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Queued);
        assert_eq!(d.task.attempts, 0, "a released claim is not charged");
        assert!(
            d.history.is_empty(),
            "a released claim is not an attempt: {:?}",
            d.history
        );
        assert_eq!(d.task.last_error, None);
        assert_eq!(d.task.finished_at, None);
        assert_eq!(d.task.node, None);
        let r = b
            .finish(
                &c1.lease,
                attempt_of(&c1, AttemptReason::Exit, None),
                Finish::Succeeded,
            )
            .await;
        assert!(
            matches!(r, Err(BrokerError::LeaseLost(x)) if x == id),
            "{r:?}"
        );

        // After a real failed attempt: the release keeps its error and its attempt count.
        let c2 = run_id(&b, "rl", id).await;
        assert_eq!(c2.attempt, 1);
        assert_ne!(c2.lease.token, c1.lease.token);
        let failed = attempt_of(&c2, AttemptReason::Exit, Some("exit code 3"));
        b.finish(&c2.lease, failed.clone(), Finish::Retry { at: now_ms() })
            .await
            .expect("retry");
        let c3 = claim_id(&b, "rl", id).await;
        assert_eq!(c3.attempt, 2);
        b.finish(
            &c3.lease,
            attempt_of(&c3, AttemptReason::Shutdown, None),
            Finish::Release,
        )
        .await
        .expect("release");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Queued);
        assert_eq!(d.task.node, None);
        assert_eq!(d.task.attempts, 1);
        assert_eq!(d.task.last_error.as_deref(), Some("exit code 3"));
        assert_eq!(d.history.len(), 1);
        same_attempt(&d.history[0], &failed);
        assert_lease_lost(
            b.started(&c3.lease, PID, PID_START).await,
            id,
            "started after release",
        );
        assert_eq!(get(&b, id).await.task.attempts, 1);
        let c4 = claim_id(&b, "rl", id).await;
        assert_eq!(
            c4.attempt, 2,
            "the run after a release has the same attempt number"
        );
    }

    /// A task's output may hold any byte a program writes, NUL included (`head -c N
    /// /dev/zero`): its tails are kept as they were, and a message quoting a program's NUL
    /// is kept too (PostgreSQL's `text` cannot hold NUL: there it reads U+FFFD). A store that
    /// refused them would refuse the finish for ever.
    pub async fn output_tails_keep_nul_bytes(b: B, _g: G) {
        let id = enqueue1(&b, task("nul")).await;
        let c = run_id(&b, "nul", id).await;
        let a = AttemptRecord {
            stdout_tail: "\0\0\0 zeros\n\u{1b}[2J".into(),
            stderr_tail: "a\0b".into(),
            ..attempt_of(&c, AttemptReason::Exit, Some("worker said: bad\0byte"))
        };
        b.finish(&c.lease, a.clone(), Finish::Failed)
            .await
            .expect("a finish with NUL in its tails and error");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Failed);
        let h = &d.history[0];
        assert_eq!(h.stdout_tail, a.stdout_tail);
        assert_eq!(h.stderr_tail, a.stderr_tail);
        let error = h.error.as_deref().expect("the error");
        assert!(
            error == "worker said: bad\0byte" || error == "worker said: bad\u{FFFD}byte",
            "{error:?}"
        );
    }

    /// The program could not be spawned (or its start is still on its way to the store): a
    /// charged finish of a reserved task counts the run exactly once, and a `started` arriving
    /// after it is refused without counting it again.
    pub async fn finish_without_started_counts_the_attempt_once(b: B, _g: G) {
        let spawn_failed = |c: &Claimed| AttemptRecord {
            pid: None,
            exit_code: None,
            ..attempt_of(c, AttemptReason::Spawn, Some("No such file or directory"))
        };
        let ran = |c: &Claimed| attempt_of(c, AttemptReason::Exit, Some("exit code 3"));
        type Rec = fn(&Claimed) -> AttemptRecord;
        let cases: [(Finish, TaskState, Rec); 6] = [
            (Finish::Failed, TaskState::Failed, spawn_failed),
            (
                Finish::Retry {
                    at: now_ms() + 3_600_000,
                },
                TaskState::Retrying,
                spawn_failed,
            ),
            (Finish::Succeeded, TaskState::Succeeded, ran),
            (Finish::Failed, TaskState::Failed, ran),
            (
                Finish::Retry {
                    at: now_ms() + 3_600_000,
                },
                TaskState::Retrying,
                ran,
            ),
            // A run whose process existed and was cancelled is charged.
            (Finish::Cancelled, TaskState::Cancelled, ran),
        ];
        for (i, (next, want, rec)) in cases.into_iter().enumerate() {
            let q = format!("ns{i}");
            let id = enqueue1(&b, task(&q)).await;
            let c = claim_id(&b, &q, id).await;
            let a = rec(&c);
            b.finish(&c.lease, a.clone(), next)
                .await
                .unwrap_or_else(|e| panic!("{next:?} of a reserved task: {e}"));
            let d = get(&b, id).await;
            assert_eq!(d.task.state, want, "{next:?}");
            assert_eq!(d.task.attempts, 1, "{next:?} of a reserved task, {a:?}");
            assert_eq!(d.task.node, None, "{next:?}");
            assert_eq!(d.history.len(), 1, "{next:?}");
            same_attempt(&d.history[0], &a);
            // The start record arrives late: refused, and the run is not counted twice.
            let before = snapshot(&b, id).await;
            assert_lease_lost(
                b.started(&c.lease, PID, PID_START).await,
                id,
                &format!("started after {next:?}"),
            );
            assert_eq!(
                snapshot(&b, id).await,
                before,
                "a late started changed the task"
            );
        }

        // A spawn failure on a later attempt counts that one attempt, no more.
        let id = enqueue1(&b, task("ns-later")).await;
        let c1 = run_id(&b, "ns-later", id).await;
        b.finish(
            &c1.lease,
            attempt_of(&c1, AttemptReason::Exit, Some("exit code 1")),
            Finish::Retry { at: now_ms() },
        )
        .await
        .expect("retry");
        let c2 = claim_id(&b, "ns-later", id).await;
        assert_eq!(c2.attempt, 2);
        b.finish(&c2.lease, spawn_failed(&c2), Finish::Failed)
            .await
            .expect("fail");
        let d = get(&b, id).await;
        assert_eq!(d.task.attempts, 2);
        assert_eq!(
            d.history.iter().map(|h| h.number).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    /// Every way a run can end, started or not, from a task that already has one charged
    /// attempt: a charged finish leaves it at 2, an uncharged one at 1; only `Release` leaves
    /// no attempt row.
    pub async fn finish_charges_each_run_at_most_once(b: B, _g: G) {
        let cases = [
            // (next, pid given, charged, state after)
            (Finish::Succeeded, true, true, TaskState::Succeeded),
            (Finish::Failed, true, true, TaskState::Failed),
            (Finish::Failed, false, true, TaskState::Failed),
            (
                Finish::Retry {
                    at: now_ms() + 3_600_000,
                },
                true,
                true,
                TaskState::Retrying,
            ),
            (Finish::Cancelled, true, true, TaskState::Cancelled),
            (Finish::Cancelled, false, false, TaskState::Cancelled),
            (Finish::Requeue, true, false, TaskState::Queued),
            (Finish::Requeue, false, false, TaskState::Queued),
            (Finish::Release, false, false, TaskState::Queued),
        ];
        let mut n = 0;
        for started in [true, false] {
            for (next, with_pid, charged, want) in cases {
                n += 1;
                let what = format!("{next:?}, pid given: {with_pid}, started: {started}");
                let q = format!("ch{n}");
                let id = enqueue1(&b, task(&q)).await;
                let c1 = run_id(&b, &q, id).await;
                b.finish(
                    &c1.lease,
                    attempt_of(&c1, AttemptReason::Exit, Some("exit code 1")),
                    Finish::Retry { at: now_ms() },
                )
                .await
                .expect("retry");
                let c = claim_id(&b, &q, id).await;
                assert_eq!(c.attempt, 2);
                if started {
                    start(&b, &c).await;
                    assert_eq!(get(&b, id).await.task.attempts, 2, "{what}");
                } else {
                    assert_eq!(get(&b, id).await.task.attempts, 1, "{what}");
                }
                let a = AttemptRecord {
                    pid: with_pid.then_some(PID),
                    ..attempt_of(&c, AttemptReason::Exit, Some("the end"))
                };
                b.finish(&c.lease, a.clone(), next)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let d = get(&b, id).await;
                assert_eq!(d.task.state, want, "{what}");
                assert_eq!(d.task.node, None, "{what}");
                assert_eq!(
                    d.task.attempts,
                    if charged { 2 } else { 1 },
                    "{what}: attempts after the finish"
                );
                if next == Finish::Release {
                    assert_eq!(d.history.len(), 1, "{what}: a release is not recorded");
                } else {
                    assert_eq!(d.history.len(), 2, "{what}");
                    same_attempt(&d.history[1], &a);
                }
                if matches!(want, TaskState::Queued) {
                    let again = claim_id(&b, &q, id).await;
                    assert_eq!(
                        again.attempt, 2,
                        "{what}: the next run has the uncharged run's number"
                    );
                }
            }
        }
    }

    /// A run whose result was refused (the lease was taken over) is still recorded in the
    /// history, and nothing else about the task changes.
    pub async fn note_run_adds_history_and_changes_nothing_else(b: B, _g: G) {
        let id = enqueue1(&b, task("nr")).await;
        let c = claim_id(&b, "nr", id).await;
        start(&b, &c).await;
        let before = get(&b, id).await;
        let a = attempt_of(
            &c,
            AttemptReason::Lost,
            Some("this node ran the task while its lease was taken over"),
        );
        b.note_run(id, a.clone()).await.expect("note_run");
        let after = get(&b, id).await;
        assert_eq!(
            serde_json::to_value(&after.history).expect("serialize"),
            serde_json::to_value(vec![a]).expect("serialize"),
            "the run is in the history"
        );
        assert_eq!(
            serde_json::to_value(&after.task).expect("serialize"),
            serde_json::to_value(&before.task).expect("serialize"),
            "note_run changed the task"
        );
        let r = b
            .note_run(TaskId::new(), attempt_of(&c, AttemptReason::Lost, None))
            .await;
        assert!(matches!(r, Err(BrokerError::NotFound(_))), "{r:?}");
    }

    pub async fn finish_stale_token_is_refused(b: B, _g: G) {
        let id = enqueue1(&b, task("st")).await;
        let c = claim_id(&b, "st", id).await;
        let a = attempt_of(&c, AttemptReason::Exit, None);
        // Refused while the task is reserved, and again once it runs.
        for started in [false, true] {
            if started {
                start(&b, &c).await;
            }
            let before = snapshot(&b, id).await;
            for bad in stale_leases(&c.lease) {
                for next in [
                    Finish::Succeeded,
                    Finish::Failed,
                    Finish::Requeue,
                    Finish::Release,
                    Finish::Retry { at: 0 },
                    Finish::Cancelled,
                ] {
                    let r = b.finish(&bad, a.clone(), next).await;
                    assert!(
                        matches!(r, Err(BrokerError::LeaseLost(x)) if x == id),
                        "started: {started}, {bad:?} {next:?}: {r:?}"
                    );
                }
            }
            let r = b
                .finish(
                    &Lease {
                        task: TaskId::new(),
                        ..c.lease.clone()
                    },
                    a.clone(),
                    Finish::Succeeded,
                )
                .await;
            assert!(r.is_err(), "finishing an unknown task: {r:?}");
            assert_eq!(
                snapshot(&b, id).await,
                before,
                "a refused finish changed the task (started: {started})"
            );
        }
        b.finish(&c.lease, a, Finish::Succeeded)
            .await
            .expect("the real lease still works");
        assert_eq!(get(&b, id).await.task.attempts, 1);
    }

    pub async fn finish_after_recover_and_reclaim_is_refused(b: B, _g: G) {
        let id = enqueue1(&b, task("st")).await;
        let old = run_id(&b, "st", id).await;
        let orphans = b
            .recover(Recover::All, "node restarted")
            .await
            .expect("recover");
        assert_eq!(orphans.len(), 1);
        let a = attempt_of(&old, AttemptReason::Exit, None);

        // Recovered, not yet re-claimed.
        let before = snapshot(&b, id).await;
        let r = b.finish(&old.lease, a.clone(), Finish::Succeeded).await;
        assert!(
            matches!(r, Err(BrokerError::LeaseLost(x)) if x == id),
            "{r:?}"
        );
        assert_lease_lost(
            b.started(&old.lease, PID, PID_START).await,
            id,
            "started after recover",
        );
        assert_eq!(
            snapshot(&b, id).await,
            before,
            "a refused finish changed the task"
        );

        // Re-claimed by the same node: the old lease is still stale.
        let new = claim_id(&b, "st", id).await;
        let before = snapshot(&b, id).await;
        for next in [
            Finish::Succeeded,
            Finish::Failed,
            Finish::Requeue,
            Finish::Release,
            Finish::Cancelled,
        ] {
            let r = b.finish(&old.lease, a.clone(), next).await;
            assert!(
                matches!(r, Err(BrokerError::LeaseLost(x)) if x == id),
                "{next:?}: {r:?}"
            );
        }
        // The old run's start record arriving now must not start the new claim.
        assert_lease_lost(
            b.started(&old.lease, PID, PID_START).await,
            id,
            "started with the lease of before the recovery",
        );
        assert_eq!(
            snapshot(&b, id).await,
            before,
            "a refused call changed the task"
        );
        assert_eq!(get(&b, id).await.task.state, TaskState::Queued);
        start(&b, &new).await;
        b.finish(
            &new.lease,
            attempt_of(&new, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("the new lease works");
        assert_eq!(get(&b, id).await.task.state, TaskState::Succeeded);
    }

    // --- leases, renewal, recovery ------------------------------------------------------------

    /// Rule 17: a task lost more often than its queue's `max_lost` ends `failed`; a run
    /// that never started is not a lost run; the other queues keep their own limit.
    pub async fn lost_more_than_max_lost_times_fails(b: B, _g: G) {
        let limits = LostLimits::new(BTreeMap::from([(qn("poison"), 2)]));
        let mut t = task("poison");
        t.unique_key = Some("pk".into());
        let id = enqueue1(&b, t).await;
        let other = enqueue1(&b, task("fine")).await;
        // Waits for the poison task, on another queue: cancelled when it fails (rule 13).
        let dependant = enqueue1(&b, super::flow_cases::child("poison-next", &[id])).await;
        // Reserved only: recovered without a lost run, not counted.
        let _reserved = claim_id(&b, "poison", id).await;
        let orphans = b
            .recover_limited(Recover::All, "restart", &limits)
            .await
            .expect("recover");
        assert!(orphans.iter().all(|o| !o.failed), "{orphans:?}");
        assert_eq!(get(&b, id).await.lost, 0);
        for n in 1..=3u32 {
            let c = claim_id(&b, "poison", id).await;
            b.started(&c.lease, 4242, 1).await.expect("started");
            if n == 1 {
                let c2 = claim_id(&b, "fine", other).await;
                b.started(&c2.lease, 4343, 1).await.expect("started");
            }
            let orphans = b
                .recover_limited(Recover::All, "restart", &limits)
                .await
                .expect("recover");
            let o = orphans.iter().find(|o| o.task == id).expect("recovered");
            let d = get(&b, id).await;
            assert_eq!(d.lost, n, "{d:?}");
            assert_eq!(
                d.history.last().and_then(|a| a.reason),
                Some(AttemptReason::Lost)
            );
            assert_eq!(d.task.attempts, 0, "lost runs are not charged");
            if n <= 2 {
                assert!(!o.failed, "lost {n} times of max_lost 2");
                assert_eq!(d.task.state, TaskState::Queued);
                assert_eq!(d.task.finished_at, None);
            } else {
                assert!(o.failed, "lost 3 times, more than max_lost 2");
                assert_eq!(d.task.state, TaskState::Failed);
                assert!(d.task.finished_at.is_some());
                assert_eq!(d.task.node, None);
                let e = d.task.last_error.clone().unwrap_or_default();
                assert!(
                    e.contains("lost 3 times") && e.contains("max_lost = 2"),
                    "{e}"
                );
            }
        }
        // Failed: nothing to claim, its dependant cancelled, and its unique key free again.
        assert!(claim(&b, "poison", 1).await.is_empty());
        let t = get(&b, dependant).await.task;
        assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
        assert_eq!(
            t.last_error.as_deref(),
            Some(format!("dependency {id} failed").as_str())
        );
        assert!(claim(&b, "poison-next", 1).await.is_empty());
        let mut again = task("poison");
        again.unique_key = Some("pk".into());
        enqueue1(&b, again).await;
        // `fine` (not named: the default, 3) was lost once and is queued again.
        let d = get(&b, other).await;
        assert_eq!((d.task.state, d.lost), (TaskState::Queued, 1));
        // Without limits (`recover`) nothing ever fails.
        for _ in 0..4 {
            let c = claim_id(&b, "fine", other).await;
            b.started(&c.lease, 4343, 1).await.expect("started");
            b.recover(Recover::All, "restart").await.expect("recover");
        }
        let d = get(&b, other).await;
        assert_eq!((d.task.state, d.lost), (TaskState::Queued, 5));
    }

    pub async fn started_pid_is_returned_by_recover(b: B, _g: G) {
        let a = enqueue1(&b, task("pid")).await;
        let o = enqueue1(&b, task("pid")).await;
        let ca = claim_id(&b, "pid", a).await;
        let _co = claim_id(&b, "pid", o).await;
        b.started(&ca.lease, 4242, 1_234_567_890_123)
            .await
            .expect("started");
        let orphans = b.recover(Recover::All, "restart").await.expect("recover");
        assert_eq!(orphans.len(), 2);
        let oa = orphans
            .iter()
            .find(|x| x.task == a)
            .expect("task a recovered");
        assert_eq!(oa.pid, Some(4242));
        assert_eq!(oa.pid_start, Some(1_234_567_890_123));
        assert_eq!(oa.queue, qn("pid"));
        assert_eq!(oa.node.as_ref().map(NodeId::as_str), Some(NODE));
        let oo = orphans
            .iter()
            .find(|x| x.task == o)
            .expect("task o (reserved, never started) recovered");
        assert_eq!(
            (oo.pid, oo.pid_start),
            (None, None),
            "no pid was recorded for o"
        );
        assert_eq!(oo.node.as_ref().map(NodeId::as_str), Some(NODE));
        let d = get(&b, a).await;
        assert_eq!(d.history.len(), 1);
        assert_eq!(
            d.history[0].pid,
            Some(4242),
            "the lost attempt keeps the pid"
        );

        // A new claim starts with no pid: recovering it again must not report the old one.
        let c = claim_id(&b, "pid", a).await;
        let orphans = b.recover(Recover::All, "restart").await.expect("recover");
        let oa = orphans
            .iter()
            .find(|x| x.task == a)
            .expect("recovered again");
        assert_eq!(oa.pid, None, "a pid leaked from a previous run: {oa:?}");
        assert_eq!(
            oa.pid_start, None,
            "a pid start leaked from a previous run: {oa:?}"
        );
        // ... and once it starts again, the new pid is the one reported.
        let c2 = claim_id(&b, "pid", a).await;
        b.started(&c2.lease, 5151, 42).await.expect("started");
        let orphans = b.recover(Recover::All, "restart").await.expect("recover");
        let oa = orphans.iter().find(|x| x.task == a).expect("recovered");
        assert_eq!((oa.pid, oa.pid_start), (Some(5151), Some(42)));
        drop(c);
    }

    /// Renewing a task's old lease beside its current one (the same node claimed it again
    /// after a requeue) reports the old one lost and keeps the current one: leases are told
    /// apart by token, not by task id (PostgreSQL kept both, found by the model test).
    pub async fn renew_reports_a_stale_lease_beside_the_current_one(b: B, _g: G) {
        let id = enqueue1(&b, task("rs")).await;
        let c1 = run_id(&b, "rs", id).await;
        b.finish(
            &c1.lease,
            attempt_of(&c1, AttemptReason::Shutdown, Some("daemon shutting down")),
            Finish::Requeue,
        )
        .await
        .expect("requeue");
        let c2 = claim_id(&b, "rs", id).await;
        assert_ne!(c1.lease.token, c2.lease.token);
        let lost = b
            .renew(&[c1.lease.clone(), c2.lease.clone()], LEASE)
            .await
            .expect("renew");
        assert_eq!(lost, vec![id], "the old lease is lost, the new one kept");
        let lost = b
            .renew(std::slice::from_ref(&c2.lease), LEASE)
            .await
            .expect("renew");
        assert!(lost.is_empty(), "the current lease still holds: {lost:?}");
    }

    pub async fn renew_extends_valid_and_reports_lost(b: B, _g: G) {
        let ids = [
            enqueue1(&b, task("rn")).await,
            enqueue1(&b, task("rn")).await,
            enqueue1(&b, task("rn")).await,
            enqueue1(&b, task("rn")).await,
        ];
        let reserved = enqueue1(&b, task("rn")).await;
        let short = Duration::from_millis(1000);
        let mut cs = Vec::new();
        for id in ids.into_iter().chain([reserved]) {
            let mut c = b
                .claim(&NODE.into(), &qn("rn"), 1, short)
                .await
                .expect("claim");
            assert_eq!(c.len(), 1);
            assert_eq!(c[0].task.id, id);
            cs.push(c.remove(0));
        }
        for c in &cs[..4] {
            start(&b, c).await;
        }
        // cs[0]: running, renewed. cs[1]: running, not renewed. cs[2]: finished. cs[3]:
        // another node's token. cs[4]: reserved (never started), renewed.
        b.finish(
            &cs[2].lease,
            attempt_of(&cs[2], AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish");
        let wrong_token = Lease {
            token: cs[3].lease.token + 7,
            ..cs[3].lease.clone()
        };
        let wrong_node = Lease {
            node: "node-z".into(),
            ..cs[3].lease.clone()
        };
        let unknown = Lease {
            task: TaskId::new(),
            token: 1,
            node: NODE.into(),
        };
        let lost = b
            .renew(
                &[
                    cs[0].lease.clone(),
                    cs[2].lease.clone(),
                    wrong_token,
                    wrong_node,
                    unknown.clone(),
                    cs[4].lease.clone(),
                ],
                Duration::from_secs(600),
            )
            .await
            .expect("renew");
        let lost: BTreeSet<TaskId> = lost.into_iter().collect();
        assert_eq!(
            lost,
            BTreeSet::from([cs[2].task.id, cs[3].task.id, unknown.task]),
            "renew reports exactly the leases this node no longer holds"
        );
        assert!(b.renew(&[], LEASE).await.expect("renew nothing").is_empty());

        // Everything expiring within the next 30 s: the unrenewed short leases, not the
        // renewed one.
        let orphans = b
            .recover(Recover::Expired(now_ms() + 30_000), "lease expired")
            .await
            .expect("recover");
        let got: BTreeSet<TaskId> = orphans.iter().map(|o| o.task).collect();
        assert!(
            !got.contains(&cs[0].task.id),
            "a renewed lease was recovered"
        );
        assert!(
            !got.contains(&cs[4].task.id),
            "a renewed reservation was recovered"
        );
        assert_eq!(got, BTreeSet::from([cs[1].task.id, cs[3].task.id]));
        assert_eq!(get(&b, cs[0].task.id).await.task.state, TaskState::Running);
        let r = get(&b, cs[4].task.id).await.task;
        assert_eq!(
            (r.state, r.node.as_ref().map(NodeId::as_str)),
            (TaskState::Queued, Some(NODE))
        );

        // The renewed leases are still good; the recovered ones are now lost.
        let lost = b
            .renew(
                &[
                    cs[0].lease.clone(),
                    cs[1].lease.clone(),
                    cs[4].lease.clone(),
                ],
                LEASE,
            )
            .await
            .expect("renew");
        assert_eq!(lost, vec![cs[1].task.id]);
        b.finish(
            &cs[0].lease,
            attempt_of(&cs[0], AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish after renew");
        start(&b, &cs[4]).await;
        b.finish(
            &cs[4].lease,
            attempt_of(&cs[4], AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish a renewed reservation");
        assert_eq!(get(&b, cs[4].task.id).await.task.attempts, 1);
    }

    pub async fn recover_all_requeues_uncharged(b: B, _g: G) {
        let r1 = enqueue1(&b, task("ra")).await;
        let r2 = enqueue1(&b, task("rb")).await;
        let waiting = enqueue1(&b, task("ra")).await;
        let c1 = run_id(&b, "ra", r1).await;
        let c2 = claim_id(&b, "rb", r2).await;
        b.started(&c2.lease, 777, 99).await.expect("started");
        // Held by another node: `All` takes every node's tasks.
        let r3 = enqueue1(&b, task("rc")).await;
        let c3 = b
            .claim(&"node-b".into(), &qn("rc"), 1, LEASE)
            .await
            .expect("claim")
            .remove(0);
        b.started(&c3.lease, 31, 32).await.expect("started");
        let waiting_before = snapshot(&b, waiting).await;
        let before = now_ms();

        let orphans = b
            .recover(Recover::All, "daemon restarted")
            .await
            .expect("recover");
        let got: BTreeSet<TaskId> = orphans.iter().map(|o| o.task).collect();
        assert_eq!(
            got,
            BTreeSet::from([r1, r2, r3]),
            "only running tasks are recovered"
        );
        let o3 = orphans.iter().find(|o| o.task == r3).unwrap();
        assert_eq!(o3.node.as_ref().map(NodeId::as_str), Some("node-b"));
        let o2 = orphans.iter().find(|o| o.task == r2).unwrap();
        assert_eq!(
            (o2.pid, o2.pid_start, o2.node.as_ref().map(NodeId::as_str)),
            (Some(777), Some(99), Some(NODE))
        );
        assert_eq!(o2.queue, qn("rb"));

        for (id, c) in [(r1, &c1), (r2, &c2), (r3, &c3)] {
            let d = get(&b, id).await;
            assert_eq!(d.task.state, TaskState::Queued);
            assert_eq!(d.task.attempts, 0, "a lost attempt is not charged");
            assert_eq!(d.task.node, None);
            assert_eq!(d.history.len(), 1, "the lost attempt is in the history");
            let h = &d.history[0];
            assert_eq!(h.reason, Some(AttemptReason::Lost));
            assert_eq!(h.number, c.attempt);
            assert_eq!(h.node, c.lease.node);
            assert_eq!(h.error.as_deref(), Some("daemon restarted"));
            assert!(h.ended_at >= before);
        }
        assert_eq!(
            snapshot(&b, waiting).await,
            waiting_before,
            "a queued task was touched"
        );
        assert!(b
            .recover(Recover::All, "again")
            .await
            .expect("recover")
            .is_empty());

        // The next run has the same attempt number as the lost one.
        let again = claim(&b, "ra", 1).await;
        assert_eq!(
            again[0].task.id, r1,
            "a recovered task keeps its place in the queue"
        );
        assert_eq!(again[0].attempt, 1);
    }

    pub async fn recover_expired_only_takes_expired(b: B, _g: G) {
        let s = enqueue1(&b, task("re")).await;
        let l = enqueue1(&b, task("re")).await;
        let cs = b
            .claim(&NODE.into(), &qn("re"), 1, Duration::from_millis(1))
            .await
            .expect("claim");
        assert_eq!(cs[0].task.id, s);
        let cl = b
            .claim(&NODE.into(), &qn("re"), 1, Duration::from_secs(3600))
            .await
            .expect("claim");
        assert_eq!(cl[0].task.id, l);
        start(&b, &cs[0]).await;
        start(&b, &cl[0]).await;

        // A cut-off in the past takes nothing.
        assert!(b
            .recover(Recover::Expired(now_ms() - 60_000), "expired")
            .await
            .expect("recover")
            .is_empty());

        let orphans = b
            .recover(Recover::Expired(now_ms() + 60_000), "lease expired")
            .await
            .expect("recover");
        let got: Vec<TaskId> = orphans.iter().map(|o| o.task).collect();
        assert_eq!(got, vec![s], "only the expired lease is recovered");
        let d = get(&b, s).await;
        assert_eq!(d.task.state, TaskState::Queued);
        assert_eq!(d.task.attempts, 0);
        assert_eq!(d.history.len(), 1);
        assert_eq!(d.history[0].reason, Some(AttemptReason::Lost));
        assert_eq!(d.history[0].error.as_deref(), Some("lease expired"));
        assert_eq!(get(&b, l).await.task.state, TaskState::Running);
        assert!(get(&b, l).await.history.is_empty());
    }

    /// A reserved task whose node went away goes back silently: no `lost` attempt (it never
    /// ran), its attempt count as it was, its stale lease refused.
    pub async fn claim_ahead_reserves_like_claim(b: B, _g: G) {
        let a = enqueue1(&b, task("ca")).await;
        let c = enqueue1(&b, task("ca")).await;
        let got = b
            .claim_ahead(&NODE.into(), &qn("ca"), 1, LEASE)
            .await
            .expect("claim_ahead");
        assert_eq!(
            got.iter().map(|x| x.task.id).collect::<Vec<_>>(),
            vec![a],
            "oldest first"
        );
        assert_eq!(got[0].attempt, 1);
        let d = get(&b, a).await;
        assert_eq!(
            (d.task.state, d.task.node.as_ref().map(NodeId::as_str)),
            (TaskState::Queued, Some(NODE))
        );
        let next = b
            .claim(&NODE.into(), &qn("ca"), 5, LEASE)
            .await
            .expect("claim");
        assert_eq!(
            next.iter().map(|x| x.task.id).collect::<Vec<_>>(),
            vec![c],
            "a held task is not handed out twice"
        );
    }

    pub async fn adopted_start_is_recovered_as_lost(b: B, _g: G) {
        // A held task whose start never reached the store, but which a node's start log says
        // was started: adopting it makes recovery record the run as lost, uncharged.
        let id = enqueue1(&b, task("ad")).await;
        let other = enqueue1(&b, task("ad")).await;
        let c = claim_id(&b, "ad", id).await;
        assert_eq!(c.attempt, 1);
        let n = b.adopt_started(&[id, other]).await.expect("adopt");
        assert_eq!(n, 1, "only the held task is adopted, not a waiting one");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Running);
        assert_eq!(d.task.attempts, 1);
        assert_eq!(get(&b, other).await.task.state, TaskState::Queued);
        let orphans = b.recover(Recover::All, "restart").await.expect("recover");
        assert_eq!(orphans.iter().map(|o| o.task).collect::<Vec<_>>(), vec![id]);
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Queued);
        assert_eq!(d.task.attempts, 0, "a lost run is not charged");
        assert_eq!(d.history.len(), 1);
        assert_eq!(d.history[0].reason, Some(AttemptReason::Lost));
    }

    pub async fn recover_reserved_task_leaves_no_trace(b: B, _g: G) {
        // One charged attempt first, so "unchanged" is distinguishable from "given back".
        let id = enqueue1(&b, task("rr")).await;
        let c1 = run_id(&b, "rr", id).await;
        let failed = attempt_of(&c1, AttemptReason::Exit, Some("exit code 1"));
        b.finish(&c1.lease, failed.clone(), Finish::Retry { at: now_ms() })
            .await
            .expect("retry");
        let c = claim_id(&b, "rr", id).await;
        assert_eq!(c.attempt, 2);

        let orphans = b.recover(Recover::All, "restart").await.expect("recover");
        assert_eq!(
            orphans.iter().map(|o| o.task).collect::<Vec<_>>(),
            vec![id],
            "a reserved task is recovered"
        );
        assert_eq!(orphans[0].node.as_ref().map(NodeId::as_str), Some(NODE));
        assert_eq!((orphans[0].pid, orphans[0].pid_start), (None, None));
        assert_eq!(orphans[0].queue, qn("rr"));
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Queued);
        assert_eq!(d.task.node, None);
        assert_eq!(
            d.task.attempts, 1,
            "a recovered reservation changes no attempt count"
        );
        assert_eq!(
            d.history.len(),
            1,
            "a reservation that never started left an attempt row: {:?}",
            d.history
        );
        same_attempt(&d.history[0], &failed);
        assert_eq!(d.task.last_error.as_deref(), Some("exit code 1"));
        assert_lease_lost(
            b.started(&c.lease, PID, PID_START).await,
            id,
            "started after recover",
        );
        assert_lease_lost(
            b.finish(
                &c.lease,
                attempt_of(&c, AttemptReason::Exit, None),
                Finish::Succeeded,
            )
            .await,
            id,
            "finish after recover",
        );
        assert_eq!(get(&b, id).await.task.attempts, 1);

        // By expiry: a reservation whose lease ran out is taken, a live one is not.
        let exp = enqueue1(&b, task("rr2")).await;
        let live = enqueue1(&b, task("rr2")).await;
        let ce = b
            .claim(&NODE.into(), &qn("rr2"), 1, Duration::from_millis(1))
            .await
            .expect("claim");
        assert_eq!(ce[0].task.id, exp);
        let cl = b
            .claim(&NODE.into(), &qn("rr2"), 1, Duration::from_secs(3600))
            .await
            .expect("claim");
        assert_eq!(cl[0].task.id, live);
        let orphans = b
            .recover(Recover::Expired(now_ms() + 60_000), "lease expired")
            .await
            .expect("recover");
        assert_eq!(
            orphans.iter().map(|o| o.task).collect::<Vec<_>>(),
            vec![exp]
        );
        let d = get(&b, exp).await;
        assert_eq!((d.task.state, d.task.attempts), (TaskState::Queued, 0));
        assert!(d.history.is_empty(), "{:?}", d.history);
        let l = get(&b, live).await.task;
        assert_eq!(
            (l.state, l.node.as_ref().map(NodeId::as_str)),
            (TaskState::Queued, Some(NODE))
        );

        // The recovered tasks run again with the attempt number they were claimed with.
        assert_eq!(claim_id(&b, "rr", id).await.attempt, 2);
        assert_eq!(claim_id(&b, "rr2", exp).await.attempt, 1);
    }

    // --- cancel -------------------------------------------------------------------------------

    pub async fn cancel_waiting_task(b: B, _g: G) {
        let q = enqueue1(&b, task("c")).await;
        let mut st = task("c");
        st.run_at = Some(now_ms() + 3_600_000);
        let s = enqueue1(&b, st).await;
        let r = enqueue1(&b, task("c2")).await;
        let cr = run_id(&b, "c2", r).await;
        b.finish(
            &cr.lease,
            attempt_of(&cr, AttemptReason::Exit, Some("exit code 1")),
            Finish::Retry {
                at: now_ms() + 3_600_000,
            },
        )
        .await
        .expect("retry");
        for id in [q, s, r] {
            let before = now_ms();
            assert_eq!(
                b.cancel(id).await.expect("cancel"),
                CancelOutcome::Cancelled,
                "{id}"
            );
            let t = get(&b, id).await.task;
            assert_eq!(t.state, TaskState::Cancelled);
            assert!(t.finished_at.expect("finished_at") >= before);
        }
        assert!(
            claim(&b, "c", 10).await.is_empty(),
            "a cancelled task is not claimable"
        );
        assert!(claim(&b, "c2", 10).await.is_empty());
        assert_eq!(
            b.next_due().await.expect("next_due"),
            None,
            "cancelled tasks are not due"
        );
    }

    pub async fn cancel_running_task_is_requested(b: B, _g: G) {
        let id = enqueue1(&b, task("cr")).await;
        let c = run_id(&b, "cr", id).await;
        assert!(b
            .cancel_requested(&NODE.into())
            .await
            .expect("cancel_requested")
            .is_empty());
        assert_eq!(
            b.cancel(id).await.expect("cancel"),
            CancelOutcome::Requested
        );
        let t = get(&b, id).await.task;
        assert_eq!(
            t.state,
            TaskState::Running,
            "a running task stays running until its node stops it"
        );
        assert!(t.cancel_requested);
        assert_eq!(
            b.cancel_requested(&NODE.into())
                .await
                .expect("cancel_requested"),
            vec![id]
        );
        assert!(b
            .cancel_requested(&"node-z".into())
            .await
            .expect("cancel_requested")
            .is_empty());
        assert_eq!(
            b.cancel(id).await.expect("cancel again"),
            CancelOutcome::Requested
        );

        let a = attempt_of(&c, AttemptReason::Cancelled, Some("killed by SIGTERM"));
        b.finish(&c.lease, a.clone(), Finish::Cancelled)
            .await
            .expect("finish");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Cancelled);
        assert!(d.task.finished_at.is_some());
        assert!(!d.task.cancel_requested);
        assert_eq!(d.task.node, None);
        assert_eq!(d.task.attempts, 1, "a run that was killed is charged");
        assert_eq!(
            d.task.last_error.as_deref(),
            Some("cancelled by an operator")
        );
        assert_eq!(d.history.len(), 1);
        same_attempt(&d.history[0], &a);
        assert!(b
            .cancel_requested(&NODE.into())
            .await
            .expect("cancel_requested")
            .is_empty());
        assert_eq!(
            b.cancel(id).await.expect("cancel"),
            CancelOutcome::AlreadyFinished(TaskState::Cancelled)
        );
    }

    /// A task its node holds but has not started is cancelled through that node, like a
    /// running one; ended without a process, it is not charged.
    pub async fn cancel_reserved_task_is_requested(b: B, _g: G) {
        // One charged attempt first, so "unchanged" is distinguishable from "given back".
        let id = enqueue1(&b, task("ck")).await;
        let c1 = run_id(&b, "ck", id).await;
        let failed = attempt_of(&c1, AttemptReason::Exit, Some("exit code 1"));
        b.finish(&c1.lease, failed.clone(), Finish::Retry { at: now_ms() })
            .await
            .expect("retry");
        let c = claim_id(&b, "ck", id).await;
        assert_eq!(c.attempt, 2);

        assert_eq!(
            b.cancel(id).await.expect("cancel"),
            CancelOutcome::Requested,
            "a reserved task is cancelled by its node"
        );
        let t = get(&b, id).await.task;
        assert_eq!(t.state, TaskState::Queued, "still reserved: {t:?}");
        assert_eq!(t.node.as_ref().map(NodeId::as_str), Some(NODE));
        assert!(t.cancel_requested);
        assert_eq!(t.finished_at, None);
        assert_eq!(
            b.cancel_requested(&NODE.into())
                .await
                .expect("cancel_requested"),
            vec![id]
        );
        assert!(b
            .cancel_requested(&"node-z".into())
            .await
            .expect("cancel_requested")
            .is_empty());
        assert!(claim(&b, "ck", 10).await.is_empty(), "claimed again");
        assert_eq!(
            b.cancel(id).await.expect("cancel again"),
            CancelOutcome::Requested
        );
        assert!(
            b.renew(std::slice::from_ref(&c.lease), LEASE)
                .await
                .expect("renew")
                .is_empty(),
            "a cancel request does not take the lease away"
        );

        // The node drops it before starting it.
        let now = now_ms();
        let a = AttemptRecord {
            number: c.attempt,
            node: NODE.into(),
            pid: None,
            started_at: now,
            ended_at: now,
            reason: Some(AttemptReason::Cancelled),
            error: Some("cancelled before it started".into()),
            ..Default::default()
        };
        b.finish(&c.lease, a.clone(), Finish::Cancelled)
            .await
            .expect("finish");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Cancelled);
        assert!(d.task.finished_at.is_some());
        assert!(!d.task.cancel_requested);
        assert_eq!(d.task.node, None);
        assert_eq!(
            d.task.attempts, 1,
            "a run that never started is not charged"
        );
        assert_eq!(
            d.task.last_error.as_deref(),
            Some("cancelled by an operator")
        );
        assert_eq!(d.history.len(), 2);
        same_attempt(&d.history[0], &failed);
        same_attempt(&d.history[1], &a);
        assert!(b
            .cancel_requested(&NODE.into())
            .await
            .expect("cancel_requested")
            .is_empty());

        // Its start record, had the process been spawned meanwhile, is refused.
        let before = snapshot(&b, id).await;
        assert_lease_lost(
            b.started(&c.lease, PID, PID_START).await,
            id,
            "started after cancel and finish",
        );
        assert_eq!(
            snapshot(&b, id).await,
            before,
            "a refused started changed the task"
        );
        assert_eq!(
            b.cancel(id).await.expect("cancel"),
            CancelOutcome::AlreadyFinished(TaskState::Cancelled)
        );
        assert!(claim(&b, "ck", 10).await.is_empty());
    }

    /// Once an operator's cancel is accepted, the node's retry, requeue or release of the task
    /// ends it `cancelled` instead: it must not run again.
    pub async fn cancel_request_outweighs_retry_requeue_release(b: B, _g: G) {
        // Whether the run is charged follows from `next` and the pid under either reading of
        // the rules, except for a retried run with no pid (a spawn failure): the contract does
        // not say whether it is charged as a retry or uncharged as a pid-less cancel (None).
        let cases = [
            // (next, started, pid given, charged)
            (Finish::Retry { at: now_ms() }, true, true, Some(true)),
            (Finish::Retry { at: now_ms() }, false, true, Some(true)),
            (Finish::Retry { at: now_ms() }, false, false, None),
            (Finish::Requeue, true, false, Some(false)),
            (Finish::Requeue, false, false, Some(false)),
            (Finish::Release, false, false, Some(false)),
        ];
        for (i, (next, started, with_pid, charged)) in cases.into_iter().enumerate() {
            let what = format!("{next:?}, started: {started}");
            let q = format!("co{i}");
            let id = enqueue1(&b, task(&q)).await;
            let c = claim_id(&b, &q, id).await;
            if started {
                start(&b, &c).await;
            }
            assert_eq!(
                b.cancel(id).await.expect("cancel"),
                CancelOutcome::Requested,
                "{what}"
            );
            let a = AttemptRecord {
                pid: with_pid.then_some(PID),
                ..attempt_of(&c, AttemptReason::Exit, Some("exit code 1"))
            };
            b.finish(&c.lease, a.clone(), next)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let d = get(&b, id).await;
            assert_eq!(d.task.state, TaskState::Cancelled, "{what}: {:?}", d.task);
            assert!(d.task.finished_at.is_some(), "{what}");
            assert!(!d.task.cancel_requested, "{what}");
            assert_eq!(d.task.node, None, "{what}");
            assert_eq!(
                d.task.last_error.as_deref(),
                Some("cancelled by an operator"),
                "{what}"
            );
            if let Some(charged) = charged {
                assert_eq!(d.task.attempts, u32::from(charged), "{what}");
            } else {
                assert!(d.task.attempts <= 1, "{what}: counted twice");
            }
            if next == Finish::Release {
                assert!(d.history.is_empty(), "{what}: {:?}", d.history);
            } else {
                assert_eq!(d.history.len(), 1, "{what}");
                same_attempt(&d.history[0], &a);
            }
            assert!(claim(&b, &q, 10).await.is_empty(), "{what}: ran again");
        }
        assert_eq!(b.next_due().await.expect("next_due"), None);
    }

    pub async fn cancel_finished_task(b: B, _g: G) {
        for (next, state) in [
            (Finish::Succeeded, TaskState::Succeeded),
            (Finish::Failed, TaskState::Failed),
            (Finish::Cancelled, TaskState::Cancelled),
        ] {
            let id = enqueue1(&b, task("cf")).await;
            let c = run_id(&b, "cf", id).await;
            b.finish(
                &c.lease,
                attempt_of(&c, AttemptReason::Exit, Some("x")),
                next,
            )
            .await
            .expect("finish");
            let before = snapshot(&b, id).await;
            assert_eq!(
                b.cancel(id).await.expect("cancel"),
                CancelOutcome::AlreadyFinished(state)
            );
            assert_eq!(
                snapshot(&b, id).await,
                before,
                "cancelling a {state} task changed it"
            );
        }
    }

    pub async fn cancel_unknown_task(b: B, _g: G) {
        let id = TaskId::new();
        let r = b.cancel(id).await;
        assert!(
            matches!(r, Err(BrokerError::NotFound(x)) if x == id),
            "{r:?}"
        );
    }

    /// An operator cancels a running task; its node dies before acting on it. Recovery must
    /// still kill the process group (the task is an orphan), and the accepted cancel must not
    /// be forgotten: the task ends `cancelled` instead of running again.
    pub async fn cancel_request_survives_recover(b: B, _g: G) {
        let id = enqueue1(&b, task("cx")).await;
        let c = claim_id(&b, "cx", id).await;
        b.started(&c.lease, 4242, 7).await.expect("started");
        assert_eq!(
            b.cancel(id).await.expect("cancel"),
            CancelOutcome::Requested
        );
        // The same for a task the node held but had not started.
        let held = enqueue1(&b, task("cy")).await;
        let ch = claim_id(&b, "cy", held).await;
        assert_eq!(
            b.cancel(held).await.expect("cancel"),
            CancelOutcome::Requested
        );
        let orphans = b.recover(Recover::All, "node died").await.expect("recover");
        assert_eq!(
            orphans.iter().map(|o| o.task).collect::<BTreeSet<_>>(),
            BTreeSet::from([id, held]),
            "still orphans to kill"
        );
        let o = orphans.iter().find(|o| o.task == id).unwrap();
        assert_eq!(o.pid, Some(4242));
        let h = get(&b, held).await;
        assert_eq!(
            h.task.state,
            TaskState::Cancelled,
            "after recovery: {:?}",
            h.task
        );
        assert_eq!(h.task.attempts, 0);
        assert!(h.history.is_empty(), "{:?}", h.history);
        assert!(claim(&b, "cy", 10).await.is_empty());
        assert_lease_lost(
            b.started(&ch.lease, PID, PID_START).await,
            held,
            "started after recover",
        );
        let again = claim(&b, "cx", 10).await;
        assert!(
            again.is_empty(),
            "a task whose cancel was accepted ran again after recovery (claimed as attempt {}, cancel_requested={})",
            again[0].attempt,
            again[0].task.cancel_requested
        );
        let d = get(&b, id).await;
        let t = &d.task;
        assert_eq!(t.state, TaskState::Cancelled, "after recovery: {t:?}");
        assert!(t.finished_at.is_some());
        assert!(!t.cancel_requested);
        assert_eq!(t.node, None);
        assert_eq!(t.last_error.as_deref(), Some("cancelled by an operator"));
        assert_eq!(t.attempts, 0, "the lost run is given back");
        assert_eq!(d.history.len(), 1, "the lost run is recorded");
        assert_eq!(d.history[0].reason, Some(AttemptReason::Lost));
        assert_eq!(d.history[0].pid, Some(4242));
        assert_lease_lost(
            b.finish(
                &c.lease,
                attempt_of(&c, AttemptReason::Cancelled, None),
                Finish::Cancelled,
            )
            .await,
            id,
            "finish after recover",
        );
    }

    // --- retry --------------------------------------------------------------------------------

    pub async fn retry_failed_task(b: B, _g: G) {
        let id = enqueue1(&b, task("rt")).await;
        let c = run_id(&b, "rt", id).await;
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, Some("exit code 2")),
            Finish::Failed,
        )
        .await
        .expect("fail");
        b.retry(id).await.expect("retry");
        let d = get(&b, id).await;
        assert_eq!(d.task.state, TaskState::Queued);
        assert_eq!(d.task.attempts, 0, "retry gives a fresh attempt budget");
        assert_eq!(d.task.finished_at, None);
        assert_eq!(d.history.len(), 1, "the history is kept");
        let c2 = claim_id(&b, "rt", id).await;
        assert_eq!(c2.attempt, 1);

        // A cancelled task can be retried too.
        let x = enqueue1(&b, task("rt")).await;
        b.cancel(x).await.expect("cancel");
        b.retry(x).await.expect("retry cancelled");
        assert_eq!(get(&b, x).await.task.state, TaskState::Queued);
        assert_eq!(get(&b, x).await.task.finished_at, None);
    }

    pub async fn retry_refuses_waiting_running_succeeded(b: B, _g: G) {
        let reserved = enqueue1(&b, task("rc")).await;
        let running = enqueue1(&b, task("rc")).await;
        let succeeded = enqueue1(&b, task("rc")).await;
        let cr = claim_id(&b, "rc", reserved).await;
        let c = run_id(&b, "rc", running).await;
        let cs = run_id(&b, "rc", succeeded).await;
        b.finish(
            &cs.lease,
            attempt_of(&cs, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish");
        let q2 = enqueue1(&b, task("rc")).await;
        for id in [q2, reserved, running, succeeded] {
            let before = snapshot(&b, id).await;
            let r = b.retry(id).await;
            assert!(
                matches!(r, Err(BrokerError::Conflict(_))),
                "retry of {id}: {r:?}"
            );
            assert_eq!(
                snapshot(&b, id).await,
                before,
                "a refused retry changed the task"
            );
        }
        drop((c, cr));
    }

    /// Retrying a failed task whose unique key a newer waiting task now holds would make two
    /// waiting tasks with one key: refused, and nothing changes.
    pub async fn retry_refuses_when_unique_key_is_taken(b: B, _g: G) {
        let mut a = task("rk");
        a.unique_key = Some("k".into());
        enqueue1(&b, a.clone()).await;
        let c = run_id(&b, "rk", a.id).await;
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, Some("x")),
            Finish::Failed,
        )
        .await
        .expect("fail");
        let mut n = task("rk");
        n.unique_key = Some("k".into());
        enqueue1(&b, n.clone()).await;
        let before = snapshot(&b, a.id).await;
        let r = b.retry(a.id).await;
        assert!(matches!(r, Err(BrokerError::Conflict(_))), "{r:?}");
        assert_eq!(snapshot(&b, a.id).await, before);
        // Once the holder is gone, the retry goes through.
        b.cancel(n.id).await.expect("cancel");
        b.retry(a.id).await.expect("retry");
        assert_eq!(get(&b, a.id).await.task.state, TaskState::Queued);
    }

    pub async fn retry_unknown_task(b: B, _g: G) {
        let id = TaskId::new();
        let r = b.retry(id).await;
        assert!(
            matches!(r, Err(BrokerError::NotFound(x)) if x == id),
            "{r:?}"
        );
    }

    // --- the audit trail (rule 10) -------------------------------------------------------------

    fn entry(action: Action, detail: &str) -> AuditEntry {
        AuditEntry::new(Actor::local_cli(), action).ok(detail)
    }

    /// Every record in the trail, newest first.
    async fn trail(b: &B) -> Vec<taskd::audit::AuditRecord> {
        b.audit_log(&AuditFilter::default())
            .await
            .expect("audit_log")
    }

    pub async fn audit_appends_one_record_per_call_newest_first(b: B, g: G) {
        assert!(trail(&b).await.is_empty(), "a fresh store has no trail");
        let before = now_ms();
        let id = TaskId::new();
        let cancel = AuditEntry::new(Actor::local_cli(), Action::Cancel)
            .task(id)
            .queue(qn("emails"))
            .ok("cancelled before it ran");
        let api = AuditEntry::new(
            Actor::api(Some("ci".into()), Some("127.0.0.1:4242".into())),
            Action::Retry,
        )
        .task(id)
        .refused("task is queued; only failed or cancelled tasks can be retried");
        let bulk = AuditEntry::bulk(
            Actor::api(Some("ops".into()), None),
            Action::BulkRetry,
            BTreeMap::from([
                ("queue".to_string(), "emails".to_string()),
                ("state".to_string(), "failed".to_string()),
            ]),
            12,
        )
        .ok("12 tasks queued again");
        for e in [&cancel, &api, &bulk] {
            b.audit(e, 100).await.expect("audit");
        }
        let after = now_ms();
        // Another client of the store (another process) reads what this one wrote.
        let other = g.connect().await;
        let got = trail(&other).await;
        assert_eq!(
            got.iter().map(|r| r.entry.clone()).collect::<Vec<_>>(),
            vec![bulk.clone(), api.clone(), cancel.clone()],
            "one record per call, newest first, each as written"
        );
        let ids: BTreeSet<&str> = got.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), 3, "ids are unique: {got:?}");
        for r in &got {
            assert!(
                (before - 1000..=after + 1000).contains(&r.at),
                "stamped with the store's clock, now: {r:?}"
            );
        }
        assert!(got[0].at >= got[1].at && got[1].at >= got[2].at, "{got:?}");
        assert_eq!(got[1].entry.outcome, Outcome::Refused);
        assert_eq!(got[1].entry.actor.via, Via::Api);
        assert_eq!(got[1].entry.actor.token.as_deref(), Some("ci"));
        assert_eq!(got[0].entry.count, Some(12));
    }

    pub async fn audit_keeps_the_newest_keep(b: B, _g: G) {
        for i in 0..7 {
            b.audit(&entry(Action::Pause, &format!("n{i}")), 3)
                .await
                .expect("audit");
        }
        let details = |rs: Vec<taskd::audit::AuditRecord>| -> Vec<String> {
            rs.into_iter().map(|r| r.entry.detail).collect()
        };
        assert_eq!(details(trail(&b).await), ["n6", "n5", "n4"], "the newest 3");
        // A larger bound keeps what is there and grows; a smaller one trims at once.
        b.audit(&entry(Action::Resume, "n7"), 10)
            .await
            .expect("audit");
        assert_eq!(details(trail(&b).await), ["n7", "n6", "n5", "n4"]);
        b.audit(&entry(Action::Resume, "n8"), 2)
            .await
            .expect("audit");
        assert_eq!(details(trail(&b).await), ["n8", "n7"]);
        // `keep` 0 is taken as 1: a record is never dropped by its own call.
        b.audit(&entry(Action::Resume, "n9"), 0)
            .await
            .expect("audit");
        assert_eq!(details(trail(&b).await), ["n9"]);
    }

    pub async fn audit_log_pages_by_cursor_and_since(b: B, _g: G) {
        for i in 0..5 {
            b.audit(&entry(Action::Retry, &format!("r{i}")), 100)
                .await
                .expect("audit");
        }
        let page = |before: Option<String>| {
            let b = b.clone();
            async move {
                b.audit_log(&AuditFilter {
                    since: None,
                    before,
                    limit: 2,
                })
                .await
                .expect("audit_log")
            }
        };
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let p = page(cursor.clone()).await;
            assert!(p.len() <= 2, "limit: {p:?}");
            if p.is_empty() {
                break;
            }
            cursor = p.last().map(|r| r.id.clone());
            seen.extend(p.into_iter().map(|r| r.entry.detail));
        }
        assert_eq!(seen, ["r4", "r3", "r2", "r1", "r0"], "pages, newest first");
        // `since` by the store's clock: everything is newer than a minute ago, nothing is
        // newer than a minute from now.
        let all = b
            .audit_log(&AuditFilter {
                since: Some(now_ms() - 60_000),
                before: None,
                limit: 0,
            })
            .await
            .expect("audit_log");
        assert_eq!(all.len(), 5);
        let none = b
            .audit_log(&AuditFilter {
                since: Some(now_ms() + 60_000),
                before: None,
                limit: 0,
            })
            .await
            .expect("audit_log");
        assert!(none.is_empty(), "{none:?}");
        // A cursor is a position, not a lookup: one older than every record gives nothing,
        // and a cursor that is not an id of the store is refused, not read as "no cursor".
        let oldest = all.last().expect("records").id.clone();
        assert!(page(Some(oldest)).await.is_empty());
        let r = b
            .audit_log(&AuditFilter {
                since: None,
                before: Some("not-an-id".into()),
                limit: 2,
            })
            .await;
        assert!(matches!(r, Err(BrokerError::Conflict(_))), "{r:?}");
    }

    /// Audit records are not tasks: they change no count, list or queue, and cancelling,
    /// retrying or pausing never writes a record by itself (the caller does).
    pub async fn audit_is_apart_from_tasks(b: B, _g: G) {
        let id = enqueue1(&b, task("apart")).await;
        b.set_paused(&qn("apart"), true).await.expect("pause");
        b.cancel(id).await.expect("cancel");
        b.retry(id).await.expect("retry");
        assert!(
            trail(&b).await.is_empty(),
            "the broker's own operations record nothing: the caller knows who asked"
        );
        let counts_before = b.counts().await.expect("counts");
        let list_before = b.list(&ListFilter::default()).await.expect("list");
        b.audit(&entry(Action::Reload, "nothing changed"), 10)
            .await
            .expect("audit");
        let counts_after = b.counts().await.expect("counts");
        assert_eq!(
            format!("{counts_before:?}"),
            format!("{counts_after:?}"),
            "an audit record is not a task"
        );
        assert_eq!(
            b.list(&ListFilter::default()).await.expect("list").len(),
            list_before.len()
        );
        assert_eq!(trail(&b).await.len(), 1);
    }

    // --- reads --------------------------------------------------------------------------------

    pub async fn list_filters_limit_newest_first(b: B, _g: G) {
        assert!(
            b.list(&ListFilter::default())
                .await
                .expect("list")
                .is_empty(),
            "a fresh store is empty"
        );
        let mut order = Vec::new(); // enqueue order
        for q in ["la", "lb", "la", "la", "lb", "la"] {
            order.push((q, enqueue1(&b, task(q)).await));
        }
        let running = claim(&b, "la", 2).await; // the two oldest of la
        for c in &running {
            start(&b, c).await;
        }
        let newest_first: Vec<TaskId> = order.iter().rev().map(|(_, id)| *id).collect();
        let of = |q: &str| -> Vec<TaskId> {
            order
                .iter()
                .rev()
                .filter(|(x, _)| *x == q)
                .map(|(_, id)| *id)
                .collect()
        };

        let all = b.list(&ListFilter::default()).await.expect("list");
        assert_eq!(
            ids_of(&all),
            newest_first,
            "limit 0 lists everything, newest first"
        );
        let la = b
            .list(&ListFilter {
                queue: Some(qn("la")),
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(ids_of(&la), of("la"));
        let lim = b
            .list(&ListFilter {
                limit: 2,
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(ids_of(&lim), newest_first[..2].to_vec());
        let run = b
            .list(&ListFilter {
                state: Some(TaskState::Running),
                ..Default::default()
            })
            .await
            .expect("list");
        let want: Vec<TaskId> = of("la").into_iter().rev().take(2).rev().collect();
        assert_eq!(ids_of(&run), want);
        assert_eq!(running.len(), 2);
        let q_la = b
            .list(&ListFilter {
                queue: Some(qn("la")),
                state: Some(TaskState::Queued),
                limit: 1,
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(ids_of(&q_la), vec![of("la")[0]]);
        let q_lb = b
            .list(&ListFilter {
                queue: Some(qn("lb")),
                state: Some(TaskState::Running),
                limit: 0,
                ..Default::default()
            })
            .await
            .expect("list");
        assert!(q_lb.is_empty());
        let none = b
            .list(&ListFilter {
                queue: Some(qn("nope")),
                ..Default::default()
            })
            .await
            .expect("list");
        assert!(none.is_empty());
    }

    /// Searches: by id, by unique key (waiting or finished), by a payload field; each with
    /// the other conditions, newest first.
    pub async fn list_search_by_id_unique_key_and_payload(b: B, _g: G) {
        let mk = |q: &str, payload: &str, key: Option<&str>| {
            let mut t = NewTask::new(qn(q), payload.into());
            t.unique_key = key.map(str::to_string);
            t
        };
        let a = enqueue1(&b, mk("sa", r#"{"user_id":42,"name":"ann"}"#, Some("k1"))).await;
        let bb = enqueue1(&b, mk("sa", r#"{"user_id":"42","name":"bob"}"#, None)).await;
        let c = enqueue1(
            &b,
            mk("sb", r#"{"user":{"id":42},"user_id":7}"#, Some("k1")),
        )
        .await;
        let d = enqueue1(
            &b,
            mk("sb", r#"{"user_id":42.0,"tags":["x","y"]}"#, Some("k2")),
        )
        .await;
        // a finishes: its unique key is free, but a search still finds it.
        let ca = run_id(&b, "sa", a).await;
        b.finish(
            &ca.lease,
            attempt_of(&ca, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish");
        let list = |f: ListFilter| {
            let b = b.clone();
            async move { ids_of(&b.list(&f).await.expect("list")) }
        };
        let pm = |t: &str| Some(PayloadMatch::parse(t).expect("a payload condition"));
        assert_eq!(
            list(ListFilter {
                id: Some(c),
                ..Default::default()
            })
            .await,
            vec![c]
        );
        assert_eq!(
            list(ListFilter {
                id: Some(c),
                queue: Some(qn("sa")),
                ..Default::default()
            })
            .await,
            Vec::<TaskId>::new(),
            "an id in another queue"
        );
        assert_eq!(
            list(ListFilter {
                id: Some(TaskId::new()),
                ..Default::default()
            })
            .await,
            Vec::<TaskId>::new()
        );
        assert_eq!(
            list(ListFilter {
                unique_key: Some("k1".into()),
                ..Default::default()
            })
            .await,
            vec![c, a],
            "the waiting holder and the finished one"
        );
        assert_eq!(
            list(ListFilter {
                unique_key: Some("k1".into()),
                state: Some(TaskState::Queued),
                ..Default::default()
            })
            .await,
            vec![c]
        );
        assert_eq!(
            list(ListFilter {
                unique_key: Some("k1".into()),
                state: Some(TaskState::Succeeded),
                ..Default::default()
            })
            .await,
            vec![a]
        );
        assert_eq!(
            list(ListFilter {
                unique_key: Some("nope".into()),
                ..Default::default()
            })
            .await,
            Vec::<TaskId>::new()
        );
        // 42 matches the number 42, 42.0, and the string "42"; not 7, not a nested id.
        assert_eq!(
            list(ListFilter {
                payload: pm("payload.user_id = 42"),
                ..Default::default()
            })
            .await,
            vec![d, bb, a]
        );
        assert_eq!(
            list(ListFilter {
                payload: pm("user_id=42"),
                limit: 2,
                ..Default::default()
            })
            .await,
            vec![d, bb],
            "a limit counts matches"
        );
        assert_eq!(
            list(ListFilter {
                payload: pm(r#"user_id = "42""#),
                ..Default::default()
            })
            .await,
            vec![bb],
            "a quoted value is a JSON string"
        );
        assert_eq!(
            list(ListFilter {
                payload: pm("payload.user.id = 42"),
                ..Default::default()
            })
            .await,
            vec![c]
        );
        assert_eq!(
            list(ListFilter {
                payload: pm("name = bob"),
                ..Default::default()
            })
            .await,
            vec![bb]
        );
        assert_eq!(
            list(ListFilter {
                payload: pm("tags.1 = y"),
                ..Default::default()
            })
            .await,
            vec![d]
        );
        assert_eq!(
            list(ListFilter {
                payload: pm("user_id = 42"),
                queue: Some(qn("sa")),
                state: Some(TaskState::Queued),
                ..Default::default()
            })
            .await,
            vec![bb]
        );
        assert_eq!(
            list(ListFilter {
                payload: pm("missing = 1"),
                ..Default::default()
            })
            .await,
            Vec::<TaskId>::new()
        );
    }

    /// A creation-time range, and pages that follow a cursor (the previous page's last
    /// task) across queues, whatever happened to that task meanwhile.
    pub async fn list_time_range_and_cursor_pages(b: B, _g: G) {
        let t0 = now_ms();
        let mut ids = Vec::new(); // oldest first
        for i in 0..7 {
            let q = if i % 2 == 0 { "pa" } else { "pb" };
            ids.push(enqueue1(&b, task(q)).await);
        }
        let newest_first: Vec<TaskId> = ids.iter().rev().copied().collect();
        let all = b.list(&ListFilter::default()).await.expect("list");
        assert_eq!(ids_of(&all), newest_first);
        // Pages of 3 by cursor.
        let mut pages = Vec::new();
        let mut after = None;
        loop {
            let page = b
                .list(&ListFilter {
                    limit: 3,
                    after,
                    ..Default::default()
                })
                .await
                .expect("page");
            if page.is_empty() {
                break;
            }
            after = page.last().map(|t| t.id);
            pages.push(ids_of(&page));
        }
        assert_eq!(pages.concat(), newest_first, "pages: {pages:?}");
        assert_eq!(pages.len(), 3);
        // The cursor's task moves on (cancelled): the next page is the same.
        let cursor = newest_first[2];
        b.cancel(cursor).await.expect("cancel");
        let next = b
            .list(&ListFilter {
                limit: 3,
                after: Some(cursor),
                ..Default::default()
            })
            .await
            .expect("page");
        assert_eq!(ids_of(&next), newest_first[3..6].to_vec());
        // With a state filter the cursor still places the page.
        let queued_after = b
            .list(&ListFilter {
                after: Some(newest_first[1]),
                state: Some(TaskState::Queued),
                queue: Some(qn("pa")),
                ..Default::default()
            })
            .await
            .expect("page");
        let want: Vec<TaskId> = newest_first[2..]
            .iter()
            .copied()
            .filter(|i| *i != cursor && ids.iter().position(|x| x == i).unwrap_or(1) % 2 == 0)
            .collect();
        assert_eq!(ids_of(&queued_after), want);
        match b
            .list(&ListFilter {
                after: Some(TaskId::new()),
                ..Default::default()
            })
            .await
        {
            Err(BrokerError::NotFound(_)) => {}
            other => panic!("a cursor no task has: {other:?}"),
        }
        // Time ranges by creation time.
        let t1 = now_ms() + 1;
        let recs = b.list(&ListFilter::default()).await.expect("list");
        let mid = recs[3].created_at;
        let since = b
            .list(&ListFilter {
                since: Some(mid),
                ..Default::default()
            })
            .await
            .expect("list");
        assert!(!since.is_empty() && since.iter().all(|t| t.created_at >= mid));
        assert_eq!(
            since.len(),
            recs.iter().filter(|t| t.created_at >= mid).count()
        );
        let until = b
            .list(&ListFilter {
                until: Some(mid),
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(
            until.len(),
            recs.iter().filter(|t| t.created_at < mid).count()
        );
        assert_eq!(until.len() + since.len(), 7);
        let window = b
            .list(&ListFilter {
                since: Some(t0),
                until: Some(t1),
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(window.len(), 7);
        let none = b
            .list(&ListFilter {
                since: Some(t1 + 3_600_000),
                ..Default::default()
            })
            .await
            .expect("list");
        assert!(none.is_empty());
        let old = b
            .list(&ListFilter {
                until: Some(t0 - 3_600_000),
                ..Default::default()
            })
            .await
            .expect("list");
        assert!(old.is_empty());
    }

    /// Throughput counters: added up per queue and minute, the larger run time kept, read
    /// back from a time on (and by another client, as after a restart).
    pub async fn stats_add_up_and_keep_the_larger_max(b: B, g: G) {
        let now = now_ms();
        let m = now.div_euclid(60_000);
        let row = |q: &str, minute: i64, ok: u64, max: u64| {
            let mut r = StatRow::new(qn(q), minute);
            r.succeeded = ok;
            r.failed = 1;
            r.runs = ok + 1;
            r.run_ms_sum = 10 * (ok + 1);
            r.run_ms_max = max;
            r.wait_ms_sum = 5;
            r
        };
        assert!(b.stats(now - 3_600_000).await.expect("stats").is_empty());
        b.add_stats(&[
            row("sa", m, 2, 30),
            row("sb", m, 1, 10),
            row("sa", m - 90, 4, 99),
        ])
        .await
        .expect("add");
        b.add_stats(&[row("sa", m, 3, 20)]).await.expect("add");
        let other = g.connect().await;
        let mut got = other.stats(now - 3_600_000).await.expect("stats");
        got.sort_by(|x, y| (x.minute, x.queue.as_str()).cmp(&(y.minute, y.queue.as_str())));
        let mut want_sa = row("sa", m, 5, 30);
        want_sa.failed = 2;
        want_sa.runs = 7;
        want_sa.run_ms_sum = 70;
        want_sa.wait_ms_sum = 10;
        assert_eq!(got, vec![want_sa, row("sb", m, 1, 10)], "the last hour");
        let day = other.stats(now - 2 * 3_600_000).await.expect("stats");
        assert_eq!(
            day.len(),
            3,
            "90 minutes ago is in the last two hours: {day:?}"
        );
    }

    pub async fn counts_by_queue_and_state(b: B, _g: G) {
        assert!(
            b.counts().await.expect("counts").is_empty(),
            "a fresh store has no queues"
        );
        // ca: 1 succeeded, 1 failed, 1 running, 2 queued (one of them reserved by a node, not
        // started), 1 scheduled. cb: 1 queued (paused). idle: no tasks (paused).
        for _ in 0..5 {
            enqueue1(&b, task("ca")).await;
        }
        let mut s = task("ca");
        s.run_at = Some(now_ms() + 3_600_000);
        enqueue1(&b, s).await;
        let cs = claim(&b, "ca", 4).await;
        assert_eq!(cs.len(), 4);
        for c in &cs[..3] {
            start(&b, c).await;
        }
        b.finish(
            &cs[0].lease,
            attempt_of(&cs[0], AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .unwrap();
        b.finish(
            &cs[1].lease,
            attempt_of(&cs[1], AttemptReason::Exit, Some("x")),
            Finish::Failed,
        )
        .await
        .unwrap();
        enqueue1(&b, task("cb")).await;
        b.set_paused(&qn("cb"), true).await.expect("pause");
        b.set_paused(&qn("idle"), true).await.expect("pause");

        let counts = b.counts().await.expect("counts");
        let by: BTreeMap<String, &QueueCounts> = counts
            .iter()
            .map(|c| {
                (
                    c.queue.as_ref().map(|q| q.to_string()).unwrap_or_default(),
                    c,
                )
            })
            .collect();
        assert_eq!(
            by.keys().cloned().collect::<Vec<_>>(),
            vec!["ca", "cb", "idle"],
            "{counts:?}"
        );
        let ca = by["ca"];
        let want_ca = [
            (TaskState::Scheduled, 1),
            (TaskState::Queued, 2),
            (TaskState::Running, 1),
            (TaskState::Retrying, 0),
            (TaskState::Succeeded, 1),
            (TaskState::Failed, 1),
            (TaskState::Cancelled, 0),
        ];
        for (s, n) in want_ca {
            assert_eq!(count(ca, s), n, "queue ca, state {s}: {ca:?}");
        }
        assert!(!ca.paused);
        let cb = by["cb"];
        assert!(cb.paused);
        for s in TaskState::ALL {
            assert_eq!(
                count(cb, s),
                u64::from(s == TaskState::Queued),
                "queue cb, state {s}"
            );
        }
        let idle = by["idle"];
        assert!(
            idle.paused,
            "a paused queue with no tasks is listed as paused"
        );
        for s in TaskState::ALL {
            assert_eq!(count(idle, s), 0, "queue idle, state {s}");
        }

        // Resuming an empty queue removes it from the counts.
        b.set_paused(&qn("idle"), false).await.expect("resume");
        let counts = b.counts().await.expect("counts");
        assert!(
            counts.iter().all(|c| c.queue != Some(qn("idle"))),
            "{counts:?}"
        );
    }

    pub async fn next_due_is_earliest_waiting(b: B, _g: G) {
        assert_eq!(b.next_due().await.expect("next_due"), None);
        let now = now_ms();
        enqueue1(&b, task("nd")).await; // ready now: not "due later"
        let mut late = task("nd");
        late.run_at = Some(now + 50_000);
        enqueue1(&b, late).await;
        let mut early = task("nd2");
        early.run_at = Some(now + 20_000);
        let early_id = enqueue1(&b, early).await;
        assert_eq!(b.next_due().await.expect("next_due"), Some(now + 20_000));

        // A retrying task that is due sooner, in another queue.
        let r = enqueue1(&b, task("nd3")).await;
        let c = run_id(&b, "nd3", r).await;
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, Some("x")),
            Finish::Retry { at: now + 10_000 },
        )
        .await
        .expect("retry");
        assert_eq!(b.next_due().await.expect("next_due"), Some(now + 10_000));
        b.cancel(r).await.expect("cancel");
        assert_eq!(b.next_due().await.expect("next_due"), Some(now + 20_000));
        b.cancel(early_id).await.expect("cancel");
        assert_eq!(b.next_due().await.expect("next_due"), Some(now + 50_000));
    }

    /// A paused queue's waiting tasks are not due: the daemon would wake for a task it may
    /// not claim.
    pub async fn next_due_ignores_paused_queues(b: B, g: G) {
        let now = now_ms();
        let mut soon = task("np1");
        soon.run_at = Some(now + 10_000);
        enqueue1(&b, soon).await;
        let r = enqueue1(&b, task("np2")).await;
        let c = run_id(&b, "np2", r).await;
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, Some("x")),
            Finish::Retry { at: now + 20_000 },
        )
        .await
        .expect("retry");
        let mut late = task("np3");
        late.run_at = Some(now + 30_000);
        enqueue1(&b, late).await;
        assert_eq!(b.next_due().await.expect("next_due"), Some(now + 10_000));

        b.set_paused(&qn("np1"), true).await.expect("pause");
        assert_eq!(
            b.next_due().await.expect("next_due"),
            Some(now + 20_000),
            "a paused queue's scheduled task is due"
        );
        b.set_paused(&qn("np2"), true).await.expect("pause");
        assert_eq!(
            b.next_due().await.expect("next_due"),
            Some(now + 30_000),
            "a paused queue's retrying task is due"
        );
        // Paused by another client (the CLI): the store decides, not this client's memory.
        let cli = g.connect().await;
        cli.set_paused(&qn("np3"), true).await.expect("pause");
        assert_eq!(b.next_due().await.expect("next_due"), None);
        // A paused queue with nothing waiting changes nothing.
        b.set_paused(&qn("empty"), true).await.expect("pause");
        assert_eq!(b.next_due().await.expect("next_due"), None);

        b.set_paused(&qn("np2"), false).await.expect("resume");
        assert_eq!(b.next_due().await.expect("next_due"), Some(now + 20_000));
        b.set_paused(&qn("np1"), false).await.expect("resume");
        assert_eq!(b.next_due().await.expect("next_due"), Some(now + 10_000));
    }

    // --- wake-ups -----------------------------------------------------------------------------

    pub async fn subscribe_work_from_another_client(b: B, g: G) {
        let w = b.subscribe().await.expect("subscribe");
        let producer = g.connect().await;
        producer.enqueue(vec![task("w")]).await.expect("enqueue");
        tokio::time::timeout(DEADLINE, w.work.notified())
            .await
            .expect("an enqueue by another client did not fire `work`");
    }

    pub async fn subscribe_cancel_of_running_task(b: B, g: G) {
        let w = b.subscribe().await.expect("subscribe");
        let id = enqueue1(&b, task("w")).await;
        let _c = run_id(&b, "w", id).await;
        let held = enqueue1(&b, task("w")).await;
        let _h = claim_id(&b, "w", held).await;
        let cli = g.connect().await;
        assert_eq!(
            cli.cancel(id).await.expect("cancel"),
            CancelOutcome::Requested
        );
        tokio::time::timeout(DEADLINE, w.cancel.notified())
            .await
            .expect("cancelling a running task did not fire `cancel`");
        assert_eq!(
            b.cancel_requested(&NODE.into())
                .await
                .expect("cancel_requested"),
            vec![id]
        );
        // A reserved task's node must hear of it as well.
        assert_eq!(
            cli.cancel(held).await.expect("cancel"),
            CancelOutcome::Requested
        );
        tokio::time::timeout(DEADLINE, w.cancel.notified())
            .await
            .expect("cancelling a reserved task did not fire `cancel`");
        let asked: BTreeSet<TaskId> = b
            .cancel_requested(&NODE.into())
            .await
            .expect("cancel_requested")
            .into_iter()
            .collect();
        assert_eq!(asked, BTreeSet::from([id, held]));
    }

    // --- durability and several clients ------------------------------------------------------

    pub async fn reopen_keeps_tasks(b: B, g: G) {
        let mut t = task("d");
        t.args = vec!["x".into()];
        enqueue1(&b, t.clone()).await;
        let u = enqueue1(&b, task("d")).await;
        let c = run_id(&b, "d", t.id).await;
        let cu = claim_id(&b, "d", u).await; // reserved, not started
        let r = enqueue1(&b, task("d")).await;
        b.set_paused(&qn("d"), true).await.expect("pause");
        let audited = AuditEntry::new(Actor::local_cli(), Action::Pause)
            .queue(qn("d"))
            .ok("paused");
        b.audit(&audited, 10).await.expect("audit");
        let trail_before = b
            .audit_log(&AuditFilter::default())
            .await
            .expect("audit_log");
        let before = (
            snapshot(&b, t.id).await,
            snapshot(&b, u).await,
            snapshot(&b, r).await,
        );
        drop(b);

        let b = g.connect().await;
        let after = (
            snapshot(&b, t.id).await,
            snapshot(&b, u).await,
            snapshot(&b, r).await,
        );
        assert_eq!(
            after, before,
            "the store lost or changed tasks across a reopen"
        );
        assert_eq!(b.paused().await.expect("paused"), BTreeSet::from([qn("d")]));
        assert_eq!(
            b.audit_log(&AuditFilter::default())
                .await
                .expect("audit_log"),
            trail_before,
            "the audit trail is durable"
        );
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("a lease survives a reopen");
        start(&b, &cu).await;
        assert_eq!(get(&b, u).await.task.state, TaskState::Running);
    }

    pub async fn many_producers_one_consumer(b: B, g: G) {
        const PRODUCERS: usize = 8;
        const EACH: usize = 200;
        let g: Arc<dyn Guard> = Arc::from(g);
        let mut producers = Vec::new();
        for p in 0..PRODUCERS {
            let g = g.clone();
            producers.push(tokio::spawn(async move {
                // Each producer is its own client, as a CLI process would be.
                let client = g.connect().await;
                let mut ids = Vec::with_capacity(EACH);
                for i in 0..EACH {
                    let t = NewTask::new(qn("mp"), format!(r#"{{"p":{p},"i":{i}}}"#));
                    match client.enqueue(vec![t.clone()]).await {
                        Ok(out) => {
                            assert_eq!(out[0].id, t.id);
                            ids.push(t.id);
                        }
                        Err(e) => return Err(format!("producer {p}, task {i}: {e}")),
                    }
                }
                Ok(ids)
            }));
        }
        let consumer = {
            let b = b.clone();
            tokio::spawn(async move {
                let mut claimed: Vec<TaskId> = Vec::new();
                let start = Instant::now();
                while claimed.len() < PRODUCERS * EACH {
                    if start.elapsed() > DEADLINE * 6 {
                        return Err(format!("consumer timed out with {} claimed", claimed.len()));
                    }
                    let got = b
                        .claim(&"consumer".into(), &qn("mp"), 16, LEASE)
                        .await
                        .map_err(|e| e.to_string())?;
                    if got.is_empty() {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue;
                    }
                    for c in got {
                        claimed.push(c.task.id);
                        b.started(&c.lease, PID, PID_START)
                            .await
                            .map_err(|e| e.to_string())?;
                        b.finish(
                            &c.lease,
                            attempt_of(&c, AttemptReason::Exit, None),
                            Finish::Succeeded,
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    }
                }
                Ok::<_, String>(claimed)
            })
        };
        let mut enqueued = BTreeSet::new();
        for h in producers {
            let ids = h.await.expect("producer panicked").expect("producer error");
            enqueued.extend(ids);
        }
        assert_eq!(enqueued.len(), PRODUCERS * EACH);
        let claimed = consumer
            .await
            .expect("consumer panicked")
            .expect("consumer error");
        let unique: BTreeSet<TaskId> = claimed.iter().copied().collect();
        assert_eq!(unique.len(), claimed.len(), "a task was claimed twice");
        assert_eq!(unique, enqueued, "claimed and enqueued sets differ");
        let all = b
            .list(&ListFilter {
                queue: Some(qn("mp")),
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(all.len(), PRODUCERS * EACH);
        assert!(all
            .iter()
            .all(|t| t.state == TaskState::Succeeded && t.attempts == 1));
    }
}

// ---------------------------------------------------------------------------------------------
// Flow control: dependencies (rule 13) and unique keys held after the finish (rule 14)
// ---------------------------------------------------------------------------------------------

pub mod flow_cases {
    use super::*;

    pub(crate) fn child(queue: &str, after: &[TaskId]) -> NewTask {
        let mut t = task(queue);
        t.after = after.to_vec();
        t
    }

    async fn end(b: &B, queue: &str, id: TaskId, next: Finish) {
        let c = run_id(b, queue, id).await;
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, Some("exit code 1")),
            next,
        )
        .await
        .expect("finish");
    }

    async fn states(b: &B, id: TaskId) -> Vec<(TaskId, Option<TaskState>)> {
        b.parents(id)
            .await
            .expect("parents")
            .into_iter()
            .map(|p| (p.id, p.state))
            .collect()
    }

    pub async fn dependants_wait_for_every_parent_across_queues(b: B, _g: G) {
        let p1 = enqueue1(&b, task("dq-a")).await;
        let p2 = enqueue1(&b, task("dq-b")).await;
        let c = enqueue1(&b, child("dq-c", &[p1, p2])).await;
        let rec = get(&b, c).await.task;
        assert_eq!(rec.state, TaskState::Scheduled, "a dependant waits");
        assert_eq!(rec.after, vec![p1, p2], "its parents, in the order given");
        assert_eq!(
            states(&b, c).await,
            vec![(p1, Some(TaskState::Queued)), (p2, Some(TaskState::Queued))]
        );
        assert!(
            claim(&b, "dq-c", 10).await.is_empty(),
            "not claimable while it waits"
        );

        end(&b, "dq-a", p1, Finish::Succeeded).await;
        assert!(
            claim(&b, "dq-c", 10).await.is_empty(),
            "one parent is not all of them"
        );
        assert_eq!(get(&b, c).await.task.state, TaskState::Scheduled);
        assert_eq!(
            states(&b, c).await,
            vec![
                (p1, Some(TaskState::Succeeded)),
                (p2, Some(TaskState::Queued))
            ]
        );

        end(&b, "dq-b", p2, Finish::Succeeded).await;
        let got = claim(&b, "dq-c", 10).await;
        assert_eq!(got.len(), 1, "every parent succeeded: the dependant runs");
        assert_eq!(got[0].task.id, c);
        assert_eq!(
            got[0].task.after,
            vec![p1, p2],
            "the claim carries the parents"
        );
        assert!(b.parents(p1).await.expect("parents").is_empty());
        assert!(matches!(
            b.parents(TaskId::new()).await,
            Err(BrokerError::NotFound(_))
        ));
    }

    pub async fn a_failed_parent_cancels_its_dependants_transitively(b: B, _g: G) {
        // parent -> kid -> grandkid, each on its own queue; `other` waits on parent and
        // on a second parent that succeeds.
        let parent = enqueue1(&b, task("df-a")).await;
        let second = enqueue1(&b, task("df-b")).await;
        let kid = enqueue1(&b, child("df-b", &[parent])).await;
        let grandkid = enqueue1(&b, child("df-c", &[kid])).await;
        let other = enqueue1(&b, child("df-c", &[second, parent])).await;
        let bystander = enqueue1(&b, child("df-c", &[second])).await;
        end(&b, "df-b", second, Finish::Succeeded).await;
        end(&b, "df-a", parent, Finish::Failed).await;
        for (id, cause) in [(kid, parent), (grandkid, kid), (other, parent)] {
            let t = get(&b, id).await.task;
            assert_eq!(t.state, TaskState::Cancelled, "task {id}");
            assert_eq!(
                t.last_error.as_deref(),
                Some(format!("dependency {cause} failed").as_str()),
                "task {id}"
            );
            assert!(t.finished_at.is_some());
        }
        let got = claim(&b, "df-c", 10).await;
        assert_eq!(
            got.iter().map(|c| c.task.id).collect::<Vec<_>>(),
            vec![bystander],
            "only the dependant of the parent that succeeded runs"
        );

        // A parent cancelled while it waits cancels its dependants too.
        let waiting = enqueue1(&b, task("df-a")).await;
        let after_waiting = enqueue1(&b, child("df-b", &[waiting])).await;
        assert_eq!(
            b.cancel(waiting).await.expect("cancel"),
            CancelOutcome::Cancelled
        );
        let t = get(&b, after_waiting).await.task;
        assert_eq!(t.state, TaskState::Cancelled);
        assert_eq!(
            t.last_error.as_deref(),
            Some(format!("dependency {waiting} failed").as_str())
        );
        // And one whose run is stopped by an operator's cancel.
        let running = enqueue1(&b, task("df-a")).await;
        let after_running = enqueue1(&b, child("df-b", &[running])).await;
        let c = run_id(&b, "df-a", running).await;
        assert_eq!(
            b.cancel(running).await.expect("cancel"),
            CancelOutcome::Requested
        );
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Cancelled, Some("cancelled")),
            Finish::Cancelled,
        )
        .await
        .expect("finish");
        assert_eq!(
            get(&b, after_running).await.task.state,
            TaskState::Cancelled
        );
    }

    pub async fn enqueue_after_unknown_or_finished_parents(b: B, _g: G) {
        let unknown = TaskId::new();
        let before = b.list(&ListFilter::default()).await.expect("list").len();
        let t = child("de", &[unknown]);
        match b.enqueue(vec![task("de"), t.clone()]).await {
            Err(BrokerError::NotFound(id)) => assert_eq!(id, unknown, "the error names the parent"),
            other => panic!("an unknown parent must be refused, got {other:?}"),
        }
        assert_eq!(
            b.list(&ListFilter::default()).await.expect("list").len(),
            before,
            "nothing of the batch was stored"
        );

        let done = enqueue1(&b, task("de")).await;
        end(&b, "de", done, Finish::Succeeded).await;
        let failed = enqueue1(&b, task("de")).await;
        end(&b, "de", failed, Finish::Failed).await;

        let ready = enqueue1(&b, child("de-2", &[done])).await;
        assert_eq!(
            get(&b, ready).await.task.state,
            TaskState::Queued,
            "a parent that already succeeded counts as done"
        );
        let doomed = child("de-2", &[done, failed]);
        let out = b.enqueue(vec![doomed.clone()]).await.expect("enqueue");
        assert_eq!(out[0].state, TaskState::Cancelled);
        let t = get(&b, doomed.id).await.task;
        assert_eq!(
            t.state,
            TaskState::Cancelled,
            "a failed parent cancels it at once"
        );
        assert_eq!(
            t.last_error.as_deref(),
            Some(format!("dependency {failed} failed").as_str())
        );
        assert_eq!(t.after, vec![done, failed]);
        let got = claim(&b, "de-2", 10).await;
        assert_eq!(
            got.iter().map(|c| c.task.id).collect::<Vec<_>>(),
            vec![ready]
        );
    }

    /// Calls `expire` until it has cancelled `want` (at most the deadline).
    async fn expire_until(b: &B, want: &[TaskId]) -> Vec<TaskId> {
        let start = Instant::now();
        let mut got = Vec::new();
        while !want.iter().all(|w| got.contains(w)) {
            assert!(
                start.elapsed() < DEADLINE,
                "expire never cancelled {want:?}: got {got:?}"
            );
            got.extend(
                b.expire()
                    .await
                    .expect("expire")
                    .into_iter()
                    .map(|(id, _)| id),
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        got
    }

    /// Expired tasks ahead of ready ones in the claim order are passed over, never counted
    /// against `max`: a claim of one still takes the ready task behind them (the model test
    /// found Redis answering nothing while the expired head waited for `expire`).
    pub async fn expired_tasks_at_the_head_do_not_hold_back_a_claim(b: B, _g: G) {
        let mut stale = Vec::new();
        for priority in [5, 5, 0] {
            let mut t = task("exh");
            t.priority = priority;
            t.expires_at = Some(now_ms() - 1);
            stale.push(enqueue1(&b, t).await);
        }
        let ready = enqueue1(&b, task("exh")).await;
        let later = enqueue1(&b, task("exh")).await;
        let got = claim(&b, "exh", 1).await;
        assert_eq!(
            got.iter().map(|c| c.task.id).collect::<Vec<_>>(),
            vec![ready],
            "claim(max 1) behind three expired tasks"
        );
        let got = claim(&b, "exh", 5).await;
        assert_eq!(
            got.iter().map(|c| c.task.id).collect::<Vec<_>>(),
            vec![later]
        );
        let mut expired: Vec<TaskId> = b
            .expire()
            .await
            .expect("expire")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        expired.sort();
        stale.sort();
        assert_eq!(
            expired, stale,
            "the expired tasks are still cancelled by `expire`"
        );
    }

    /// A task cancelled by its expiry and then retried by hand waits under the same deadline:
    /// past it, `expire` cancels it again and no claim takes it (Redis used to forget the
    /// deadline at the retry, found by the model test).
    pub async fn a_retried_task_keeps_its_expiry(b: B, _g: G) {
        let mut t = task("rex");
        t.expires_at = Some(now_ms() - 1);
        let id = enqueue1(&b, t).await;
        let first: Vec<TaskId> = b
            .expire()
            .await
            .expect("expire")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(first, vec![id]);
        b.retry(id).await.expect("retry the expired task");
        let again: Vec<TaskId> = b
            .expire()
            .await
            .expect("expire")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(
            again,
            vec![id],
            "a retried task past its expiry is cancelled again"
        );
        assert!(
            claim(&b, "rex", 5).await.is_empty(),
            "claimed past its expiry"
        );
    }

    pub async fn an_expired_task_is_never_claimed_and_expire_cancels_it(b: B, _g: G) {
        let expiring = |queue: &str, at: i64| {
            let mut t = task(queue);
            t.expires_at = Some(at);
            t
        };
        // Ready, already past its expiry: no claim takes it; `expire` cancels it, and its
        // dependant with it.
        let stale = enqueue1(&b, expiring("ex", now_ms() - 1)).await;
        let kid = enqueue1(&b, child("ex-2", &[stale])).await;
        let fresh = enqueue1(&b, expiring("ex", now_ms() + 3_600_000)).await;
        let got = claim(&b, "ex", 10).await;
        assert_eq!(
            got.iter().map(|c| c.task.id).collect::<Vec<_>>(),
            vec![fresh]
        );
        assert_eq!(got[0].task.expires_at.map(|e| e > now_ms()), Some(true));
        let expired = b.expire().await.expect("expire");
        assert_eq!(expired, vec![(stale, qn("ex"))]);
        let t = get(&b, stale).await.task;
        assert_eq!(t.state, TaskState::Cancelled);
        assert_eq!(t.last_error.as_deref(), Some("expired"));
        assert!(t.finished_at.is_some());
        assert_eq!(get(&b, kid).await.task.state, TaskState::Cancelled);
        assert!(
            b.expire().await.expect("expire").is_empty(),
            "each task expires once"
        );

        // Held or running past its expiry: left alone, it finishes as it would.
        let held_until = now_ms() + 300;
        let held = enqueue1(&b, expiring("ex-h", held_until)).await;
        let c = run_id(&b, "ex-h", held).await;
        // Scheduled (due later than its expiry) and retrying tasks expire while they wait.
        let later = {
            let mut t = expiring("ex-w", now_ms() + 300);
            t.run_at = Some(now_ms() + 3_600_000);
            enqueue1(&b, t).await
        };
        let flaky = enqueue1(&b, expiring("ex-r", now_ms() + 300)).await;
        let r = run_id(&b, "ex-r", flaky).await;
        b.finish(
            &r.lease,
            attempt_of(&r, AttemptReason::Exit, Some("exit code 1")),
            Finish::Retry {
                at: now_ms() + 3_600_000,
            },
        )
        .await
        .expect("finish");
        let got = expire_until(&b, &[later, flaky]).await;
        assert!(!got.contains(&held), "a running task never expires");
        assert!(now_ms() >= held_until);
        for id in [later, flaky] {
            let t = get(&b, id).await.task;
            assert_eq!(
                (t.state, t.last_error.as_deref()),
                (TaskState::Cancelled, Some("expired"))
            );
        }
        assert_eq!(get(&b, flaky).await.task.attempts, 1, "not run again");
        assert_eq!(get(&b, held).await.task.state, TaskState::Running);
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("a task that started before its expiry finishes as usual");
        // A retrying task due again, but past its expiry: no claim runs it again.
        let until = now_ms() + 200;
        let late = enqueue1(&b, expiring("ex-p", until)).await;
        let r = run_id(&b, "ex-p", late).await;
        b.finish(
            &r.lease,
            attempt_of(&r, AttemptReason::Exit, Some("exit code 1")),
            Finish::Retry { at: now_ms() + 100 },
        )
        .await
        .expect("finish");
        while now_ms() <= until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            claim(&b, "ex-p", 10).await.is_empty(),
            "a retry past its expiry never runs"
        );
        expire_until(&b, &[late]).await;
        assert_eq!(
            get(&b, late).await.task.last_error.as_deref(),
            Some("expired")
        );
    }

    pub async fn unique_for_holds_the_key_after_the_task_finished(b: B, _g: G) {
        const HOLD: i64 = 1_500;
        let keyed = |hold: Option<i64>| {
            let mut t = task("uf");
            t.unique_key = Some("reindex:42".into());
            t.unique_for = hold;
            t
        };
        let first = enqueue1(&b, keyed(Some(HOLD))).await;
        end(&b, "uf", first, Finish::Succeeded).await;
        let finished = get(&b, first).await.task.finished_at.expect("finished");
        // Within the window the finished task holds the key: its id comes back.
        let dup = keyed(None);
        let out = b.enqueue(vec![dup.clone()]).await.expect("enqueue");
        assert!(
            now_ms() < finished + HOLD,
            "the machine was too slow to test the window"
        );
        assert_eq!((out[0].id, out[0].existing), (first, true));
        assert_eq!(out[0].state, TaskState::Succeeded);
        assert!(
            b.get(dup.id).await.expect("get").is_none(),
            "the duplicate was stored"
        );
        // Past it the key is free again.
        let started = Instant::now();
        let fresh = loop {
            let t = keyed(None);
            let out = b.enqueue(vec![t.clone()]).await.expect("enqueue");
            if !out[0].existing {
                break t.id;
            }
            assert_eq!(out[0].id, first);
            assert!(started.elapsed() < DEADLINE, "the key stayed taken");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(now_ms() >= finished + HOLD, "freed before its time");
        assert_eq!(get(&b, fresh).await.task.state, TaskState::Queued);
        // Without unique_for a finished task frees the key at once.
        end(&b, "uf", fresh, Finish::Failed).await;
        let out = b.enqueue(vec![keyed(None)]).await.expect("enqueue");
        assert!(!out[0].existing);
    }
}

// ---------------------------------------------------------------------------------------------
// Schedules (rule 10): each slot handled once, whoever asks and however often
// ---------------------------------------------------------------------------------------------

pub mod schedule_cases {
    use super::*;
    use taskd::broker::{ScheduleKey, ScheduleStep, SlotOutcome, StepAnswer};

    const SPEC: &str = "every 1s";
    /// A slot time well in the past (whole seconds, as slots are).
    const T0: i64 = 1_700_000_000_000;

    fn key(queue: &str) -> ScheduleKey {
        ScheduleKey {
            name: "nightly".into(),
            queue: qn(queue),
        }
    }

    fn slot_task(queue: &str, slot: i64) -> NewTask {
        let mut t = task(queue);
        t.unique_key = Some(format!("schedule:nightly@{slot}"));
        t
    }

    fn fire(queue: &str, slot: i64, skip_if_running: bool) -> ScheduleStep {
        ScheduleStep::Fire {
            spec: SPEC.into(),
            slot,
            task: slot_task(queue, slot),
            caught_up: false,
            skip_if_running,
            node: NODE.into(),
        }
    }

    async fn step(b: &B, k: &ScheduleKey, s: ScheduleStep) -> StepAnswer {
        b.schedule_step(k, s).await.expect("schedule_step")
    }

    async fn begin(b: &B, k: &ScheduleKey) {
        let begun = step(
            b,
            k,
            ScheduleStep::Begin {
                spec: SPEC.into(),
                through: T0,
            },
        )
        .await;
        assert_eq!(begun, StepAnswer::Begun(true));
    }

    async fn state(b: &B, k: &ScheduleKey) -> taskd::broker::ScheduleState {
        b.schedule_states(std::slice::from_ref(k))
            .await
            .expect("schedule_states")
            .remove(0)
    }

    pub async fn schedule_steps_handle_each_slot_once(b: B, g: G) {
        let k = key("s");
        let empty = state(&b, &k).await;
        assert_eq!((empty.spec.as_str(), empty.through), ("", 0));
        begin(&b, &k).await;
        let again = ScheduleStep::Begin {
            spec: SPEC.into(),
            through: T0 + 60_000,
        };
        assert_eq!(step(&b, &k, again).await, StepAnswer::Begun(false));
        assert_eq!(
            state(&b, &k).await.through,
            T0,
            "a Begin at the same spec moves nothing"
        );
        // Slots up to `through` are handled: refused, nothing enqueued.
        assert!(matches!(
            step(&b, &k, fire("s", T0, false)).await,
            StepAnswer::AlreadyHandled { through: T0, .. }
        ));
        let s1 = T0 + 1000;
        let StepAnswer::Fired {
            task: t1,
            existing: false,
        } = step(&b, &k, fire("s", s1, false)).await
        else {
            panic!("slot 1 did not fire");
        };
        let d = get(&b, t1).await;
        assert_eq!(d.task.schedule.as_deref(), Some("nightly"));
        assert_eq!(d.task.slot, Some(s1));
        assert_eq!(d.task.state, TaskState::Queued);
        assert_eq!(
            d.task.unique_key.as_deref(),
            Some(format!("schedule:nightly@{s1}").as_str())
        );
        // The same slot again, from this client or another: refused, no second task.
        let other = g.connect().await;
        for c in [&b, &other] {
            assert!(matches!(
                step(c, &k, fire("s", s1, false)).await,
                StepAnswer::AlreadyHandled { through, .. } if through == s1
            ));
        }
        // Another spec is not this record's: refused, and told which spec it is.
        let foreign = ScheduleStep::Skip {
            spec: "every 2s".into(),
            first: s1 + 1000,
            last: s1 + 1000,
            count: 1,
            reason: "r".into(),
            node: NODE.into(),
        };
        assert_eq!(
            step(&b, &k, foreign).await,
            StepAnswer::AlreadyHandled {
                through: s1,
                spec: SPEC.into()
            }
        );
        // A run of skipped slots, then a caught-up one.
        let skip = ScheduleStep::Skip {
            spec: SPEC.into(),
            first: s1 + 1000,
            last: s1 + 5000,
            count: 5,
            reason: "missed".into(),
            node: NODE.into(),
        };
        assert_eq!(
            step(&b, &k, skip).await,
            StepAnswer::Skipped { running: None }
        );
        let s7 = s1 + 6000;
        let late = ScheduleStep::Fire {
            spec: SPEC.into(),
            slot: s7,
            task: slot_task("s", s7),
            caught_up: true,
            skip_if_running: false,
            node: NODE.into(),
        };
        let StepAnswer::Fired { task: t7, .. } = step(&b, &k, late).await else {
            panic!("slot 7 did not fire");
        };
        let st = state(&other, &k).await;
        assert_eq!(st.spec, SPEC);
        assert_eq!(st.through, s7);
        assert_eq!((st.fired, st.caught_up, st.skipped), (1, 1, 5));
        assert_eq!(st.last_task, Some(t7));
        let last = st.last.expect("a last record");
        assert_eq!(
            (last.slot, last.outcome, last.task),
            (s7, SlotOutcome::CaughtUp, Some(t7))
        );
        let h = b.schedule_history(&k, 10).await.expect("history");
        let seen: Vec<(i64, i64, u64, SlotOutcome)> = h
            .iter()
            .map(|r| (r.first, r.slot, r.count, r.outcome))
            .collect();
        assert_eq!(
            seen,
            [
                (s7, s7, 1, SlotOutcome::CaughtUp),
                (s1 + 1000, s1 + 5000, 5, SlotOutcome::Skipped),
                (s1, s1, 1, SlotOutcome::Fired),
            ]
        );
        assert_eq!(h[1].reason.as_deref(), Some("missed"));
        assert_eq!(h[2].task, Some(t1));
        assert_eq!(h[0].node, NODE);
        // A new spec starts afresh: every slot up to its `through` is handled.
        let restart = ScheduleStep::Begin {
            spec: "every 2s".into(),
            through: s7 + 60_000,
        };
        assert_eq!(step(&b, &k, restart).await, StepAnswer::Begun(true));
        let st = state(&b, &k).await;
        assert_eq!((st.spec.as_str(), st.through), ("every 2s", s7 + 60_000));
        // Exactly two tasks exist for the schedule.
        let all = b
            .list(&ListFilter {
                queue: Some(qn("s")),
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(
            ids_of(&all).into_iter().collect::<BTreeSet<_>>(),
            BTreeSet::from([t1, t7])
        );
    }

    pub async fn schedule_overlap_skips_while_the_previous_task_waits(b: B, _g: G) {
        let k = key("o");
        begin(&b, &k).await;
        let StepAnswer::Fired { task: t1, .. } = step(&b, &k, fire("o", T0 + 1000, true)).await
        else {
            panic!("the first slot did not fire");
        };
        // Waiting, then running: the next slots are skipped, naming it.
        assert_eq!(
            step(&b, &k, fire("o", T0 + 2000, true)).await,
            StepAnswer::Skipped { running: Some(t1) }
        );
        let c = run_id(&b, "o", t1).await;
        assert_eq!(
            step(&b, &k, fire("o", T0 + 3000, true)).await,
            StepAnswer::Skipped { running: Some(t1) }
        );
        let rec = b.schedule_history(&k, 1).await.expect("history").remove(0);
        assert_eq!((rec.outcome, rec.task), (SlotOutcome::Skipped, Some(t1)));
        assert!(
            rec.reason.as_deref().unwrap_or("").contains("overlap"),
            "{rec:?}"
        );
        // `allow` fires beside it.
        let StepAnswer::Fired { task: t4, .. } = step(&b, &k, fire("o", T0 + 4000, false)).await
        else {
            panic!("overlap allowed, yet the slot did not fire");
        };
        // Once the previous one (now t4) ended, the next slot fires.
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish");
        let c4 = run_id(&b, "o", t4).await;
        b.finish(
            &c4.lease,
            attempt_of(&c4, AttemptReason::Exit, None),
            Finish::Failed,
        )
        .await
        .expect("finish");
        assert!(matches!(
            step(&b, &k, fire("o", T0 + 5000, true)).await,
            StepAnswer::Fired {
                existing: false,
                ..
            }
        ));
        let st = state(&b, &k).await;
        assert_eq!((st.fired, st.skipped, st.through), (3, 2, T0 + 5000));
    }

    pub async fn schedule_unique_key_is_a_second_guard(b: B, _g: G) {
        // A task already holds the slot's key (as if enqueued for the slot by other means):
        // the slot takes it as its task, and no second one is made.
        let k = key("u");
        begin(&b, &k).await;
        let held = enqueue1(&b, slot_task("u", T0 + 1000)).await;
        assert_eq!(
            step(&b, &k, fire("u", T0 + 1000, false)).await,
            StepAnswer::Fired {
                task: held,
                existing: true
            }
        );
        let st = state(&b, &k).await;
        assert_eq!((st.through, st.last_task), (T0 + 1000, Some(held)));
        let counts = b.counts().await.expect("counts");
        let q = counts
            .iter()
            .find(|c| c.queue == Some(qn("u")))
            .expect("queue u");
        assert_eq!(count(q, TaskState::Queued), 1);
    }

    pub async fn schedule_manual_fire_leaves_the_record(b: B, _g: G) {
        let k = key("m");
        begin(&b, &k).await;
        let before = state(&b, &k).await;
        let t = task("m");
        let answer = step(&b, &k, ScheduleStep::Manual { task: t.clone() }).await;
        assert_eq!(answer, StepAnswer::Manual { task: t.id });
        let d = get(&b, t.id).await;
        assert_eq!(
            (d.task.schedule.as_deref(), d.task.slot),
            (Some("nightly"), None)
        );
        assert_eq!(d.task.state, TaskState::Queued);
        assert_eq!(
            state(&b, &k).await,
            before,
            "a manual fire changes no record"
        );
    }

    pub async fn schedule_pause_persists_and_wakes(b: B, g: G) {
        let w = b.subscribe().await.expect("subscribe");
        let k = key("p");
        let cli = g.connect().await;
        cli.set_schedule_paused(&k, true).await.expect("pause");
        tokio::time::timeout(DEADLINE, w.schedules.notified())
            .await
            .expect("pausing a schedule did not fire `schedules`");
        assert!(state(&b, &k).await.paused);
        // Begin keeps the flag; resume clears it.
        begin(&b, &k).await;
        assert!(state(&b, &k).await.paused);
        cli.set_schedule_paused(&k, false).await.expect("resume");
        tokio::time::timeout(DEADLINE, w.schedules.notified())
            .await
            .expect("resuming a schedule did not fire `schedules`");
        let st = state(&g.connect().await, &k).await;
        assert!(!st.paused);
        assert_eq!(st.spec, SPEC);
    }

    /// A finished task of `queue` in `state` (succeeded with a result and a unique key,
    /// failed after a run, cancelled before it ran), and its finish time as stored.
    async fn finished_task(b: &B, queue: &str, state: TaskState) -> (TaskId, i64) {
        let mut t = task(queue);
        t.unique_key = Some(format!("uk-{}", t.id));
        let id = enqueue1(b, t).await;
        match state {
            TaskState::Cancelled => {
                assert_eq!(
                    b.cancel(id).await.expect("cancel"),
                    CancelOutcome::Cancelled
                );
            }
            _ => {
                let c = run_id(b, queue, id).await;
                let mut a = attempt_of(&c, AttemptReason::Exit, None);
                let next = if state == TaskState::Succeeded {
                    a.result = Some(serde_json::json!({"kept": "until pruned"}));
                    Finish::Succeeded
                } else {
                    a.error = Some("exit code 3".into());
                    Finish::Failed
                };
                b.finish(&c.lease, a, next).await.expect("finish");
            }
        }
        let d = get(b, id).await;
        assert_eq!(d.task.state, state);
        let at = d
            .task
            .finished_at
            .expect("a finished task has a finish time");
        (id, at)
    }

    /// One cycle of tasks with all that can belong to a task, through to their deletion:
    /// on queue `rc` a parent holding a unique key past its finish (`unique_for`), with an
    /// expiry, a result and output tails; on `rc2` its dependant with a unique key, and a
    /// failed and a cancelled task. All finish; then everything due is pruned (the parent
    /// only once its dependant finished and its key lapsed). For the backend-specific
    /// tests that look at what the store holds afterwards.
    pub async fn retention_cycle(b: &B, i: usize, bulk: usize) {
        use TaskState::{Cancelled, Failed, Succeeded};
        // Bulk beside the linked tasks: `bulk` tasks of 4 KiB on `rc`, cancelled.
        let pad = "p".repeat(4096);
        let many: Vec<NewTask> = (0..bulk)
            .map(|j| NewTask::new(qn("rc"), format!(r#"{{"j":{j},"pad":"{pad}"}}"#)))
            .collect();
        if bulk > 0 {
            for e in b.enqueue(many).await.expect("enqueue") {
                b.cancel(e.id).await.expect("cancel");
            }
        }
        let mut p = task("rc");
        p.unique_key = Some(format!("cycle-{i}"));
        p.unique_for = Some(1);
        p.expires_at = Some(now_ms() + 3_600_000);
        let parent = enqueue1(b, p).await;
        let mut c = task("rc2");
        c.after = vec![parent];
        c.unique_key = Some(format!("child-{i}"));
        let child = enqueue1(b, c).await;
        for (queue, id) in [("rc", parent), ("rc2", child)] {
            let c = run_id(b, queue, id).await;
            let mut a = attempt_of(&c, AttemptReason::Exit, None);
            a.result = Some(serde_json::json!({"cycle": i}));
            b.finish(&c.lease, a, Finish::Succeeded)
                .await
                .expect("finish");
        }
        let (_, f_at) = finished_task(b, "rc2", Failed).await;
        let (_, c_at) = finished_task(b, "rc", Cancelled).await;
        let latest = get(b, child).await.task.finished_at.expect("finished");
        clock_past(latest.max(f_at).max(c_at)).await;
        let before = now_ms();
        let rules: Vec<PruneRule> = ["rc", "rc2"]
            .iter()
            .flat_map(|q| [Succeeded, Failed, Cancelled].map(|s| rule(q, s, before)))
            .collect();
        let done = taskd::broker::prune_due(&**b, &rules, |_| {})
            .await
            .expect("prune");
        assert_eq!(
            done.counts,
            pruned_of(&[
                ("rc", Succeeded, 1),
                ("rc", Cancelled, 1 + bulk as u64),
                ("rc2", Succeeded, 1),
                ("rc2", Failed, 1)
            ]),
            "cycle {i}: every task of the cycle was due"
        );
        assert!(b.get(parent).await.expect("get").is_none());
    }

    /// [`finished_task`], for the backend-specific tests.
    pub async fn finished_task_pub(b: &B, queue: &str, state: TaskState) -> (TaskId, i64) {
        finished_task(b, queue, state).await
    }

    /// Wait until the broker's clock (this machine's: every test store runs here) is past
    /// `at`, so that what finishes next finishes strictly later.
    async fn clock_past(at: i64) {
        poll("the clock to move past a finish time", || async {
            (now_ms() > at + 1).then_some(())
        })
        .await;
    }

    fn rule(queue: &str, state: TaskState, before: i64) -> PruneRule {
        PruneRule {
            queue: qn(queue),
            state,
            before,
        }
    }

    fn pruned_of(list: &[(&str, TaskState, u64)]) -> BTreeMap<(QueueName, TaskState), u64> {
        list.iter().map(|(q, s, n)| ((qn(q), *s), *n)).collect()
    }

    pub async fn prune_deletes_exactly_what_is_due(b: B, g: G) {
        use TaskState::{Cancelled, Failed, Succeeded};
        // Finished early: due under their rule, unless no rule names their state or queue.
        let (s_old, _) = finished_task(&b, "keep", Succeeded).await;
        let (f_old, f_old_at) = finished_task(&b, "keep", Failed).await;
        let (c_old, _) = finished_task(&b, "keep", Cancelled).await;
        let (o_old, _) = finished_task(&b, "other", Succeeded).await;
        // Failed early, then retried (below): waiting again, never due.
        let (retried, retried_at) = finished_task(&b, "keep", Failed).await;
        clock_past(retried_at.max(f_old_at)).await;
        // Finished late: the cut-off is their own finish time, which is not *before* it.
        let (s_new, s_new_at) = finished_task(&b, "keep", Succeeded).await;
        let (f_new, f_new_at) = finished_task(&b, "keep", Failed).await;
        let (c_new, _) = finished_task(&b, "keep", Cancelled).await;
        b.retry(retried).await.expect("retry");
        // Alive: a running task and a retrying one (the retried one waits too).
        let running = enqueue1(&b, task("live")).await;
        run_id(&b, "live", running).await;
        let waiting = enqueue1(&b, task("live")).await;
        let cw = run_id(&b, "live", waiting).await;
        b.finish(
            &cw.lease,
            attempt_of(&cw, AttemptReason::Exit, Some("exit code 1")),
            Finish::Retry {
                at: now_ms() + 3_600_000,
            },
        )
        .await
        .expect("retry later");

        // keep_succeeded and keep_failed end between the early and the late tasks (the
        // failed one's exactly at the late task's finish); keep_cancelled is "forever"
        // (no rule); "other" keeps everything; "live" has rules but nothing finished.
        let far = now_ms() + 3_600_000;
        let rules = vec![
            rule("keep", Succeeded, s_new_at),
            rule("keep", Failed, f_new_at),
            rule("live", Succeeded, far),
            rule("live", Failed, far),
            rule("live", Cancelled, far),
        ];
        let want = pruned_of(&[("keep", Succeeded, 1), ("keep", Failed, 1)]);
        let dry = b.prunable(&rules).await.expect("prunable");
        assert_eq!(dry.counts, want, "what a dry run counts");
        assert!(
            get(&b, s_old).await.task.state == Succeeded,
            "a dry run deletes nothing"
        );

        let done = b.prune(&rules, 100).await.expect("prune");
        assert_eq!(done.counts, want, "what prune deleted");
        assert!(!done.more, "nothing more was due");
        for id in [s_old, f_old] {
            assert!(
                b.get(id).await.expect("get").is_none(),
                "task {id} was due and is gone"
            );
        }
        for id in [c_old, o_old, retried, s_new, f_new, c_new, running, waiting] {
            b.get(id)
                .await
                .expect("get")
                .unwrap_or_else(|| panic!("task {id} was not due and must be kept"));
        }
        assert!(
            get(&b, s_new).await.result.is_some(),
            "a kept task keeps its result"
        );
        // Gone from every index: lists, searches by unique key, counts.
        let listed = ids_of(
            &b.list(&ListFilter {
                queue: Some(qn("keep")),
                ..Default::default()
            })
            .await
            .expect("list"),
        );
        assert!(
            !listed.contains(&s_old) && !listed.contains(&f_old),
            "{listed:?}"
        );
        assert_eq!(
            listed.len(),
            5,
            "c_old, retried, s_new, f_new, c_new: {listed:?}"
        );
        let by_key = b
            .list(&ListFilter {
                unique_key: Some(format!("uk-{s_old}")),
                ..Default::default()
            })
            .await
            .expect("list by unique key");
        assert!(by_key.is_empty(), "its unique-key record went with it");
        let counts = b.counts().await.expect("counts");
        let keep = counts
            .iter()
            .find(|c| c.queue == Some(qn("keep")))
            .expect("queue keep counted");
        assert_eq!(
            (
                count(keep, Succeeded),
                count(keep, Failed),
                count(keep, Cancelled)
            ),
            (1, 1, 2),
            "counts no longer see the deleted tasks"
        );
        // The unique key is free for a new task.
        let mut again = task("keep");
        again.unique_key = Some(format!("uk-{s_old}"));
        let e = b.enqueue(vec![again.clone()]).await.expect("enqueue");
        assert!(!e[0].existing);

        // Nothing is due twice, from another client too; a rule ending one millisecond
        // after a task's finish makes it due.
        let b2 = g.connect().await;
        assert_eq!(b2.prune(&rules, 100).await.expect("prune").total(), 0);
        let later = vec![rule("keep", Failed, f_new_at + 1)];
        let done = b2.prune(&later, 100).await.expect("prune");
        assert_eq!(done.counts, pruned_of(&[("keep", Failed, 1)]));
        assert!(b2.get(f_new).await.expect("get").is_none());
        assert!(
            b2.get(retried).await.expect("get").is_some(),
            "retried: waiting"
        );
    }

    pub async fn prune_keeps_parents_until_their_dependants_finish(b: B, _g: G) {
        use TaskState::{Failed, Succeeded};
        // A parent that succeeds while its dependant waits for it.
        let parent = enqueue1(&b, task("dp")).await;
        let mut t = task("dc");
        t.after = vec![parent];
        let child = enqueue1(&b, t).await;
        let c = run_id(&b, "dp", parent).await;
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish parent");
        // A parent that fails: its dependant is cancelled with it, and finished.
        let (lost, _) = finished_task(&b, "dp", Failed).await;
        let _ = lost;
        let failing = enqueue1(&b, task("dp")).await;
        let mut t = task("dc");
        t.after = vec![failing];
        let cancelled_kid = enqueue1(&b, t).await;
        let c = run_id(&b, "dp", failing).await;
        let mut a = attempt_of(&c, AttemptReason::Exit, Some("exit code 3"));
        a.exit_code = Some(3);
        b.finish(&c.lease, a, Finish::Failed).await.expect("fail");
        assert_eq!(
            get(&b, cancelled_kid).await.task.state,
            TaskState::Cancelled
        );
        // A finished task whose unique key holds for an hour more.
        let mut t = task("dp");
        t.unique_key = Some("debounced".into());
        t.unique_for = Some(3_600_000);
        let held = enqueue1(&b, t).await;
        let c = run_id(&b, "dp", held).await;
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish");
        let latest = get(&b, held).await.task.finished_at.expect("finished");
        clock_past(latest).await;

        let rules = vec![
            rule("dp", Succeeded, now_ms()),
            rule("dp", Failed, now_ms()),
        ];
        let dry = b.prunable(&rules).await.expect("prunable");
        assert_eq!(
            dry.counts,
            pruned_of(&[("dp", Failed, 2)]),
            "the failed parents are due; the one with a waiting dependant and the one holding its key are not"
        );
        let done = b.prune(&rules, 100).await.expect("prune");
        assert_eq!(done.counts, pruned_of(&[("dp", Failed, 2)]));
        assert!(!done.more, "a kept task does not count as more");
        assert!(
            b.get(parent).await.expect("get").is_some(),
            "its dependant waits"
        );
        assert!(
            b.get(held).await.expect("get").is_some(),
            "its unique key holds"
        );
        assert!(b.get(failing).await.expect("get").is_none());
        // The dependant runs and finishes: its parent is due from then on.
        let c = run_id(&b, "dc", child).await;
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish child");
        let rules = vec![rule("dp", Succeeded, now_ms() + 1)];
        let done = b.prune(&rules, 100).await.expect("prune");
        assert_eq!(done.counts, pruned_of(&[("dp", Succeeded, 1)]));
        assert!(
            b.get(parent).await.expect("get").is_none(),
            "due once its dependant finished"
        );
        assert!(b.get(held).await.expect("get").is_some());
    }

    pub async fn prune_goes_in_bounded_batches(b: B, _g: G) {
        use TaskState::{Cancelled, Succeeded};
        let mut last = 0;
        for _ in 0..14 {
            last = last.max(finished_task(&b, "batch", Succeeded).await.1);
        }
        for _ in 0..6 {
            last = last.max(finished_task(&b, "batch", Cancelled).await.1);
        }
        let rules = vec![
            rule("batch", Succeeded, last + 1),
            rule("batch", Cancelled, last + 1),
        ];
        let first = b.prune(&rules, 10).await.expect("prune");
        assert_eq!(first.total(), 10, "at most the limit");
        assert!(first.more, "ten more were due");
        let second = b.prune(&rules, 10).await.expect("prune");
        assert_eq!(second.total(), 10);
        assert!(!second.more, "the last due tasks were deleted");
        let mut all = first.clone();
        all.merge(&second);
        assert_eq!(
            all.counts,
            pruned_of(&[("batch", Succeeded, 14), ("batch", Cancelled, 6)])
        );
        assert_eq!(b.prunable(&rules).await.expect("prunable").total(), 0);
        // The helper the daemon and `taskd prune` use loops until nothing is due.
        for _ in 0..5 {
            last = last.max(finished_task(&b, "batch", Succeeded).await.1);
        }
        let rules = vec![rule("batch", Succeeded, last + 1)];
        let mut calls = 0;
        let sum = taskd::broker::prune_due(&*b, &rules, |_| calls += 1)
            .await
            .expect("prune_due");
        assert_eq!(sum.counts, pruned_of(&[("batch", Succeeded, 5)]));
        assert!(calls >= 1);
    }

    /// Slot records follow retention (rule 18): those recorded before the cut-off go,
    /// oldest first, the newer ones stay, and the newest stays whatever its age.
    pub async fn prune_slots_deletes_old_records_but_the_newest(b: B, g: G) {
        let k = key("ps");
        begin(&b, &k).await;
        let skip = |i: i64| ScheduleStep::Skip {
            spec: SPEC.into(),
            first: T0 + i * 1000,
            last: T0 + i * 1000,
            count: 1,
            reason: "r".into(),
            node: NODE.into(),
        };
        for i in 1..=3 {
            step(&b, &k, skip(i)).await;
        }
        let old_at = b.schedule_history(&k, 10).await.expect("history")[0].at;
        clock_past(old_at).await;
        let cut = now_ms();
        clock_past(cut).await;
        for i in 4..=5 {
            step(&b, &k, skip(i)).await;
        }
        // Another schedule on the queue is not touched.
        let other = ScheduleKey {
            name: "other".into(),
            queue: qn("ps"),
        };
        begin(&b, &other).await;
        step(&b, &other, skip(1)).await;

        assert_eq!(b.prune_slots(&k, cut).await.expect("prune_slots"), 3);
        let slots = |h: Vec<taskd::broker::SlotRecord>| -> Vec<i64> {
            h.iter().map(|r| (r.slot - T0) / 1000).collect()
        };
        let h = g
            .connect()
            .await
            .schedule_history(&k, 10)
            .await
            .expect("history");
        assert_eq!(slots(h), [5, 4], "the ones recorded after the cut-off stay");
        assert_eq!(b.prune_slots(&k, cut).await.expect("again"), 0);
        // A cut-off after every record: all but the newest go.
        let late = now_ms() + 60_000;
        assert_eq!(b.prune_slots(&k, late).await.expect("prune_slots"), 1);
        let h = b.schedule_history(&k, 10).await.expect("history");
        assert_eq!(slots(h), [5], "the newest stays");
        assert_eq!(b.prune_slots(&k, late).await.expect("again"), 0);
        assert_eq!(
            slots(b.schedule_history(&other, 10).await.expect("history")),
            [1]
        );
        let st = state(&b, &k).await;
        assert_eq!(st.skipped, 5, "the schedule's counts keep every slot");
        // An unknown schedule has nothing to delete.
        assert_eq!(b.prune_slots(&key("none"), late).await.expect("none"), 0);
    }

    pub async fn schedule_history_is_bounded(b: B, _g: G) {
        use taskd::broker::schedules::SLOT_HISTORY;
        let k = key("h");
        begin(&b, &k).await;
        let n = SLOT_HISTORY as i64 + 5;
        for i in 1..=n {
            let s = ScheduleStep::Skip {
                spec: SPEC.into(),
                first: T0 + i * 1000,
                last: T0 + i * 1000,
                count: 1,
                reason: "r".into(),
                node: NODE.into(),
            };
            step(&b, &k, s).await;
        }
        let h = b.schedule_history(&k, 10_000).await.expect("history");
        assert_eq!(h.len(), SLOT_HISTORY);
        assert_eq!(h[0].slot, T0 + n * 1000, "newest first");
        assert_eq!(
            h[SLOT_HISTORY - 1].slot,
            T0 + 6 * 1000,
            "the oldest ones dropped"
        );
        assert_eq!(
            state(&b, &k).await.skipped,
            n as u64,
            "counts keep every slot"
        );
    }

    pub async fn schedule_racing_clients_fire_each_slot_once(b: B, g: G) {
        const SLOTS: i64 = 30;
        let k = key("r");
        begin(&b, &k).await;
        let other = g.connect().await;
        let racer = |c: B| {
            let k = k.clone();
            tokio::spawn(async move {
                let mut fired = Vec::new();
                for i in 1..=SLOTS {
                    let slot = T0 + i * 1000;
                    let answer = c.schedule_step(&k, fire("r", slot, false)).await?;
                    if let StepAnswer::Fired { task, existing } = answer {
                        assert!(!existing, "slot {i}: fired with an existing task");
                        fired.push((slot, task));
                    }
                }
                Ok::<_, BrokerError>(fired)
            })
        };
        let (x, y) = (racer(b.clone()), racer(other));
        let mut fired = x.await.expect("racer").expect("racer's broker");
        fired.extend(y.await.expect("racer").expect("racer's broker"));
        fired.sort();
        let slots: Vec<i64> = fired.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            slots,
            (1..=SLOTS).map(|i| T0 + i * 1000).collect::<Vec<_>>(),
            "every slot fired exactly once"
        );
        let all = b
            .list(&ListFilter {
                queue: Some(qn("r")),
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(all.len(), SLOTS as usize, "one task per slot");
        let st = state(&b, &k).await;
        assert_eq!((st.fired, st.through), (SLOTS as u64, T0 + SLOTS * 1000));
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite only
// ---------------------------------------------------------------------------------------------

mod sqlite_specific {
    use super::*;

    /// Retention leaves nothing of a task behind (attempts, results, dependency links),
    /// and a store cycling tasks through enqueue → run → prune reuses its pages: it does
    /// not grow after the first cycles.
    #[tokio::test]
    async fn cycles_of_enqueue_run_prune_leave_nothing_and_reuse_the_space() {
        let (b, g) = sqlite_fixture().await;
        let rows = |table: &str| -> i64 {
            let conn = rusqlite::Connection::open(&g.path).expect("open the database directly");
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .expect(table)
        };
        let pages = || -> i64 {
            let conn = rusqlite::Connection::open(&g.path).expect("open the database directly");
            conn.query_row("PRAGMA page_count", [], |r| r.get(0))
                .expect("page_count")
        };
        let mut sizes = Vec::new();
        for i in 0..6 {
            schedule_cases::retention_cycle(&b, i, 200).await;
            for table in ["tasks", "attempts", "results", "deps"] {
                assert_eq!(rows(table), 0, "cycle {i}: `{table}` keeps nothing");
            }
            sizes.push(pages());
        }
        // The first cycle sizes the file; the next ones fit in the pages it freed.
        assert!(
            sizes[1..].iter().all(|p| *p <= sizes[0] + 8),
            "pages after each cycle: {sizes:?}"
        );
    }

    /// A new store is created with `auto_vacuum = INCREMENTAL`; pruning gives the pages of
    /// deleted tasks back a bounded step at a time, keeping a quarter of the file free for
    /// the next tasks, and the due tasks are found through the `tasks_finished` index.
    #[tokio::test]
    async fn prune_gives_pages_back_through_the_finish_index() {
        let (b, g) = sqlite_fixture().await;
        let pragma = |name: &str| -> i64 {
            let conn = rusqlite::Connection::open(&g.path).expect("open the database directly");
            conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
                .expect(name)
        };
        assert_eq!(pragma("auto_vacuum"), 2, "a new store is INCREMENTAL");
        let big = "x".repeat(8 * 1024);
        let batch: Vec<NewTask> = (0..400)
            .map(|i| NewTask::new(qn("fat"), format!(r#"{{"i":{i},"pad":"{big}"}}"#)))
            .collect();
        let ids: Vec<TaskId> = b
            .enqueue(batch)
            .await
            .expect("enqueue")
            .iter()
            .map(|e| e.id)
            .collect();
        for id in &ids {
            b.cancel(*id).await.expect("cancel");
        }
        let before = pragma("page_count");
        assert!(before > 800, "400 tasks of 8 KiB take {before} pages");
        let rules = vec![PruneRule {
            queue: qn("fat"),
            state: TaskState::Cancelled,
            before: now_ms() + 1000,
        }];
        let plan = {
            let conn = rusqlite::Connection::open(&g.path).expect("open");
            let mut s = conn
                .prepare(
                    "EXPLAIN QUERY PLAN SELECT seq FROM tasks INDEXED BY tasks_finished
                     WHERE queue = 'fat' AND state = 'cancelled' AND finished_at IS NOT NULL
                     AND finished_at < 1 ORDER BY finished_at LIMIT 10",
                )
                .expect("plan");
            let rows: Vec<String> = s
                .query_map([], |r| r.get::<_, String>(3))
                .expect("plan rows")
                .collect::<rusqlite::Result<_>>()
                .expect("plan rows");
            rows.join("; ")
        };
        assert!(
            plan.contains("tasks_finished") && !plan.contains("TEMP B-TREE"),
            "an index range read in finish order: {plan}"
        );
        let sum = taskd::broker::prune_due(&*b, &rules, |_| {})
            .await
            .expect("prune");
        assert_eq!(sum.total(), 400);
        let after = pragma("page_count");
        assert!(
            after < before,
            "the file gave pages back: {before} → {after} pages"
        );
        // Later passes (nothing due) go on until a quarter of the file is left free.
        for _ in 0..4 {
            assert_eq!(b.prune(&rules, 10).await.expect("prune").total(), 0);
        }
        let (end, free) = (pragma("page_count"), pragma("freelist_count"));
        assert!(end < after, "{after} → {end} pages");
        assert!(
            free <= end / 3 + 1,
            "about a quarter of the file left free: {free} of {end}"
        );
    }

    /// A pid recorded on another boot is not handed to recovery to kill: after a reboot the
    /// number may lead someone else's process group.
    #[tokio::test]
    async fn a_pid_from_another_boot_is_not_returned_by_recover() {
        let (b, g) = sqlite_fixture().await;
        let same = enqueue1(&b, task("pb")).await;
        let other = enqueue1(&b, task("pb")).await;
        for id in [same, other] {
            let c = claim_id(&b, "pb", id).await;
            b.started(&c.lease, 4242, 77).await.expect("started");
        }
        {
            let conn = rusqlite::Connection::open(&g.path).expect("open the database directly");
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .unwrap();
            conn.execute(
                "UPDATE tasks SET pid_boot = 'another-boot' WHERE id = ?1",
                [other.to_string()],
            )
            .expect("rewrite the boot");
        }
        let orphans = b.recover(Recover::All, "reboot").await.expect("recover");
        let pid_of = |id| {
            orphans
                .iter()
                .find(|o| o.task == id)
                .map(|o| (o.pid, o.pid_start))
        };
        assert_eq!(pid_of(same), Some((Some(4242), Some(77))), "{orphans:?}");
        assert_eq!(pid_of(other), Some((None, None)), "{orphans:?}");
    }

    /// WAL journal and the schema version table, read straight from the file.
    #[tokio::test]
    async fn wal_and_schema_version() {
        let (b, g) = sqlite_fixture().await;
        enqueue1(&b, task("d")).await;
        drop(b);
        // Reopening must not re-run or re-record the migration.
        let b = g.connect().await;
        drop(b);
        let conn = rusqlite::Connection::open(&g.path).expect("open the database directly");
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode.to_ascii_lowercase(), "wal");
        let versions: Vec<i64> = conn
            .prepare("SELECT version FROM schema_version ORDER BY version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(versions, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let n: i64 = conn
            .query_row("SELECT count(*) FROM tasks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    /// What schema version 9 (retention) added, taken away again: a version 8 store.
    const UNDO_9: &str = "DROP INDEX tasks_finished; DELETE FROM schema_version WHERE version = 9;";

    /// What schema version 7 (flow control) added, taken away again: a version 6 store.
    const UNDO_7: &str = "
        DROP TRIGGER tasks_parent_succeeded; DROP TRIGGER tasks_parent_failed;
        DROP TRIGGER tasks_dependant_finished; DROP TABLE deps;
        DROP INDEX tasks_due; DROP INDEX tasks_unique_key; DROP INDEX tasks_expiry;
        ALTER TABLE tasks DROP COLUMN after_ids; ALTER TABLE tasks DROP COLUMN blocked;
        ALTER TABLE tasks DROP COLUMN unique_for; ALTER TABLE tasks DROP COLUMN expires_at;
        CREATE INDEX tasks_waiting ON tasks(run_at) WHERE state IN ('scheduled', 'retrying');
        DELETE FROM schema_version WHERE version = 7;";

    /// A store from before the cgroup counters (schema version 9) gains them when opened:
    /// its attempts read back without them, and a new attempt keeps them.
    #[tokio::test]
    async fn a_store_from_before_cgroup_counters_is_migrated() {
        let (b, g) = sqlite_fixture().await;
        let old = enqueue1(&b, task("u")).await;
        let c = run_id(&b, "u", old).await;
        b.finish(
            &c.lease,
            attempt_of(&c, AttemptReason::Exit, Some("exit code 3")),
            Finish::Failed,
        )
        .await
        .expect("finish");
        drop(b);
        {
            let conn = rusqlite::Connection::open(&g.path).expect("open the database directly");
            conn.execute_batch(UNDO_USAGE)
                .expect("make it a version 9 store");
        }
        let b = g.connect().await;
        let h = get(&b, old).await.history;
        assert_eq!((h[0].memory_peak, h[0].cpu_usec), (None, None));
        let id = enqueue1(&b, task("u2")).await;
        let c = run_id(&b, "u2", id).await;
        let a = attempt_of(&c, AttemptReason::Exit, None);
        b.finish(&c.lease, a.clone(), Finish::Succeeded)
            .await
            .expect("finish");
        let h = get(&b, id).await.history;
        assert_eq!(
            (h[0].memory_peak, h[0].cpu_usec),
            (a.memory_peak, a.cpu_usec)
        );
    }

    /// A store from before flow control (schema version 6) gains dependencies when opened:
    /// its waiting tasks stay due (none is blocked), and a new dependant waits on an old task.
    #[tokio::test]
    async fn a_store_from_before_flow_control_is_migrated() {
        let (b, g) = sqlite_fixture().await;
        let mut later = task("m");
        later.run_at = Some(now_ms() + 300);
        let old = enqueue1(&b, later).await;
        drop(b);
        {
            let conn = rusqlite::Connection::open(&g.path).expect("open the database directly");
            conn.execute_batch(UNDO_USAGE)
                .expect("make it a version 9 store");
            conn.execute_batch(UNDO_9)
                .expect("make it a version 8 store");
            conn.execute_batch(UNDO_FLOW)
                .expect("make it a version 7 store");
            conn.execute_batch(UNDO_7)
                .expect("make it a version 6 store");
        }
        let b = g.connect().await;
        assert_eq!(get(&b, old).await.task.state, TaskState::Scheduled);
        let kid = enqueue1(&b, {
            let mut t = task("m2");
            t.after = vec![old];
            t
        })
        .await;
        let start = Instant::now();
        let c = loop {
            if let Some(c) = claim(&b, "m", 1).await.pop() {
                break c;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the old scheduled task never came due"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(c.task.id, old);
        start_and_succeed(&b, &c).await;
        assert_eq!(claim(&b, "m2", 1).await.pop().map(|c| c.task.id), Some(kid));
    }

    async fn start_and_succeed(b: &B, c: &Claimed) {
        start(b, c).await;
        b.finish(
            &c.lease,
            attempt_of(c, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish");
    }

    /// A store made before results (schema version 5) gets the results table when a taskd
    /// that keeps them opens it; its tasks are untouched.
    #[tokio::test]
    async fn a_store_from_before_results_is_migrated() {
        let (b, g) = sqlite_fixture().await;
        let old = enqueue1(&b, task("m")).await;
        drop(b);
        {
            let conn = rusqlite::Connection::open(&g.path).expect("open the database directly");
            conn.execute_batch(UNDO_USAGE)
                .expect("make it a version 9 store");
            conn.execute_batch(UNDO_9)
                .expect("make it a version 8 store");
            conn.execute_batch(UNDO_FLOW)
                .expect("make it a version 7 store");
            conn.execute_batch(UNDO_7)
                .expect("make it a version 6 store");
            conn.execute_batch("DROP TABLE results; DELETE FROM schema_version WHERE version = 6")
                .expect("make it a version 5 store");
        }
        let b = g.connect().await;
        assert_eq!(get(&b, old).await.task.state, TaskState::Queued);
        let id = enqueue1(&b, task("m2")).await;
        let c = run_id(&b, "m2", id).await;
        let mut a = attempt_of(&c, AttemptReason::Exit, None);
        a.result = Some(serde_json::json!([1, 2, 3]));
        b.finish(&c.lease, a, Finish::Succeeded)
            .await
            .expect("finish");
        assert_eq!(get(&b, id).await.result, Some(serde_json::json!([1, 2, 3])));
    }

    /// A store written by a taskd without the audit trail (schema 4) gains it when opened,
    /// keeping its tasks; the trail's columns can be read with sqlite3.
    #[tokio::test]
    async fn an_older_store_gains_the_audit_table() {
        let (b, g) = sqlite_fixture().await;
        let id = enqueue1(&b, task("old")).await;
        drop(b);
        {
            let conn = rusqlite::Connection::open(&g.path).expect("open the database directly");
            conn.execute_batch(UNDO_USAGE)
                .expect("make it a version 9 store");
            conn.execute_batch(UNDO_9)
                .expect("make it a version 8 store");
            conn.execute_batch(UNDO_FLOW)
                .expect("make it a version 7 store");
            conn.execute_batch(UNDO_7)
                .expect("make it a version 6 store");
            conn.execute_batch(
                "DROP TABLE audit; DROP TABLE results; DELETE FROM schema_version WHERE version >= 5",
            )
            .expect("make it a schema 4 store");
        }
        let b = g.connect().await;
        assert_eq!(get(&b, id).await.task.queue, qn("old"));
        let e = AuditEntry::new(Actor::local_cli(), Action::Cancel)
            .task(id)
            .queue(qn("old"))
            .refused("no such task");
        b.audit(&e, 10).await.expect("audit");
        drop(b);
        let conn = rusqlite::Connection::open(&g.path).expect("open the database directly");
        let row: (String, String, String, String) = conn
            .query_row("SELECT action, task, queue, outcome FROM audit", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .expect("one audit row");
        assert_eq!(
            row,
            (
                "cancel".to_string(),
                id.to_string(),
                "old".to_string(),
                "refused".to_string()
            )
        );
    }

    /// Claiming stays cheap however many tasks wait. Prints timings; asserts only results.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claim_oldest_among_100k() {
        const N: usize = 100_000;
        let (b, _g) = sqlite_fixture().await;
        let start = Instant::now();
        let mut first = None;
        for chunk in 0..(N / 10_000) {
            let batch = tasks("big", 10_000);
            if chunk == 0 {
                first = Some(batch[0].id);
            }
            b.enqueue(batch).await.expect("enqueue");
        }
        let enqueue_time = start.elapsed();
        let mut times = Vec::new();
        let t = Instant::now();
        let c = claim(&b, "big", 1).await;
        let first_time = t.elapsed();
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0].task.id,
            first.unwrap(),
            "claim returns the oldest task"
        );
        for _ in 0..20 {
            let t = Instant::now();
            let c = claim(&b, "big", 1).await;
            times.push(t.elapsed());
            assert_eq!(c.len(), 1);
        }
        // A high-priority task enqueued last still comes first.
        let mut urgent = task("big");
        urgent.priority = 9;
        let uid = enqueue1(&b, urgent).await;
        let t = Instant::now();
        let c = claim(&b, "big", 1).await;
        let urgent_time = t.elapsed();
        assert_eq!(c[0].task.id, uid);
        let t = Instant::now();
        let counts = b.counts().await.expect("counts");
        let counts_time = t.elapsed();
        // The 22 claimed tasks are reserved, not started: they still count as queued.
        assert_eq!(count(&counts[0], TaskState::Queued) as usize, N + 1);
        assert_eq!(count(&counts[0], TaskState::Running), 0);
        times.sort();
        eprintln!(
            "scale: enqueue {N} in 10 batches: {enqueue_time:?} ({:.0} tasks/s); claim 1 of {N}: \
             first {first_time:?}, next 20 median {:?} max {:?}; high-priority claim {urgent_time:?}; \
             counts {counts_time:?}",
            N as f64 / enqueue_time.as_secs_f64(),
            times[times.len() / 2],
            times[times.len() - 1],
        );
    }

    /// 100,000 due but unpromoted tasks (scheduled, in a paused queue) must not make claims on
    /// other queues slow. Prints timings; asserts only results.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claim_beside_100k_due_in_paused_queue() {
        const N: usize = 100_000;
        let (b, _g) = sqlite_fixture().await;
        b.set_paused(&qn("held"), true).await.expect("pause");
        // Each batch falls due a few seconds after it is stored (inserting one takes a while
        // in a debug build, more on a loaded machine, so one run-at for all would find the
        // later batches already due).
        let mut at = 0;
        for _ in 0..(N / 10_000) {
            at = now_ms() + 5_000;
            let mut batch = tasks("held", 10_000);
            for t in &mut batch {
                t.run_at = Some(at);
            }
            let out = b.enqueue(batch).await.expect("enqueue");
            assert!(
                out.iter().all(|e| e.state == TaskState::Scheduled),
                "a batch took over 5 s to store"
            );
        }
        // Wait until they are all due (the clock is the subject here).
        poll("the held tasks to fall due", || async move {
            (now_ms() > at).then_some(())
        })
        .await;
        let ids: Vec<TaskId> = {
            let batch = tasks("live", 21);
            let ids = batch.iter().map(|t| t.id).collect();
            b.enqueue(batch).await.expect("enqueue");
            ids
        };
        let mut times = Vec::new();
        for id in &ids {
            let t = Instant::now();
            let c = claim(&b, "live", 1).await;
            times.push(t.elapsed());
            assert_eq!(c[0].task.id, *id);
        }
        times.sort();
        eprintln!(
            "scale: claim 1 from a small queue beside {N} due tasks of a paused queue: median {:?}, max {:?}",
            times[times.len() / 2],
            times[times.len() - 1]
        );
        let held = b
            .list(&ListFilter {
                queue: Some(qn("held")),
                state: Some(TaskState::Scheduled),
                limit: 0,
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(
            held.len(),
            N,
            "a paused queue's due tasks are not promoted by other queues' claims"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Redis only
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "redis")]
mod redis_specific {
    use super::*;
    use taskd::broker::NodeInfo;

    /// A Redis broker beside the private server it talks to (for looking at keys).
    async fn redis_pair(test: &str) -> Option<(B, RedisGuard)> {
        let server = redis_server::RedisServer::start(test)?;
        let g = RedisGuard { server };
        Some((g.connect().await, g))
    }

    fn int(g: &RedisGuard, args: &[&str]) -> u64 {
        let out = g.server.cli(args);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{args:?} answered {out:?}"))
    }

    /// Rule 19 on Redis: a pruned task leaves its concurrency key's holder set (a claim
    /// trims it only when it reads the key again), and a pass over the rate states deletes
    /// the lapsed ones and its own cursor: a key whose tasks are gone leaves no key behind.
    #[tokio::test]
    async fn prune_leaves_no_flow_keys_behind() {
        use taskd::broker::{Flow, RateLimit};
        let Some((b, g)) = redis_pair("redis flow prune").await else {
            return;
        };
        b.set_flow(
            &qn("rf"),
            Flow {
                per_key: Some(1),
                rate: Some(RateLimit {
                    rate: taskd::config::Rate::parse("1000/s").unwrap(),
                    burst: 1,
                    keyed: true,
                }),
            },
        );
        let mut t = task("rf");
        t.flow_key = Some("cust-1".into());
        t.rate_key = Some("cust-1".into());
        enqueue1(&b, t).await;
        let c = b.claim(&NODE.into(), &qn("rf"), 10, LEASE).await.unwrap();
        assert_eq!(c.len(), 1);
        b.finish(
            &c[0].lease,
            attempt_of(&c[0], AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .unwrap();
        assert_eq!(
            int(&g, &["SCARD", "taskd:{q:rf}:kh:cust-1"]),
            1,
            "the claim's record"
        );
        assert_eq!(
            int(&g, &["HLEN", "taskd:{q:rf}:rate"]),
            1,
            "the key's rate state"
        );
        let rules = [PruneRule {
            queue: qn("rf"),
            state: TaskState::Succeeded,
            before: now_ms() + 1000,
        }];
        let done = taskd::broker::prune_due(&*b, &rules, |_| {}).await.unwrap();
        assert_eq!(done.total(), 1);
        assert_eq!(int(&g, &["EXISTS", "taskd:{q:rf}:kh:cust-1"]), 0);
        let n = taskd::broker::prune_flow_states(&*b, &[qn("rf")], now_ms() * 1000 + 10_000_000)
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(int(&g, &["EXISTS", "taskd:{q:rf}:rate"]), 0);
        assert_eq!(
            int(&g, &["EXISTS", "taskd:{q:rf}:rate:scan"]),
            0,
            "the cursor goes"
        );
    }

    /// Retention leaves no key of a task behind: after cycles of linked tasks (a unique
    /// key held past the finish, a dependant on another queue, an expiry, results, output
    /// tails) run and pruned, the keyspace is the queues' own keys, the same after every
    /// cycle, and their indexes and key records are empty.
    #[tokio::test]
    async fn cycles_of_enqueue_run_prune_leave_no_key_behind() {
        let Some((b, g)) = redis_pair("redis prune cycles").await else {
            return;
        };
        let keys = || -> Vec<String> {
            let mut k: Vec<String> = g
                .server
                .cli(&["KEYS", "taskd:{q:rc*"])
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            k.sort();
            k
        };
        schedule_cases::retention_cycle(&b, 0, 20).await;
        let first = keys();
        assert!(
            !first.iter().any(|k| k.contains(":t:")
                || k.contains(":h:")
                || k.contains(":r:")
                || k.contains(":kids:")),
            "no task's keys are left: {first:#?}"
        );
        for i in 1..5 {
            schedule_cases::retention_cycle(&b, i, 20).await;
            assert_eq!(keys(), first, "cycle {i} left the same keys");
        }
        for (key, what) in [
            ("uf", "unique_for records"),
            ("pin", "pins"),
            ("u", "unique keys"),
        ] {
            assert_eq!(
                int(&g, &["HLEN", &format!("taskd:{{q:rc}}:{key}")]),
                0,
                "{what} of `rc`"
            );
        }
        assert_eq!(int(&g, &["HLEN", "taskd:{q:rc2}:u"]), 0);
        assert_eq!(int(&g, &["ZCARD", "taskd:{q:rc}:exp"]), 0, "expiry entries");
        assert_eq!(int(&g, &["ZCARD", "taskd:{q:rc}:all"]), 0);
        assert_eq!(int(&g, &["ZCARD", "taskd:{q:rc2}:all"]), 0);
    }

    /// Pruning deletes every key of a task (hash, history, result) and its index entries,
    /// reading only the queue's `fin:<state>` set; a store whose finished tasks predate
    /// those sets is indexed first, so they are pruned too.
    #[tokio::test]
    async fn prune_deletes_every_key_of_a_task_and_indexes_old_stores() {
        let Some((b, g)) = redis_pair("redis prune keys").await else {
            return;
        };
        let (old, _) = cases::finished_task_pub(&b, "rq", TaskState::Succeeded).await;
        let (kept, kept_at) = cases::finished_task_pub(&b, "rq", TaskState::Failed).await;
        let p = "taskd:{q:rq}:";
        for k in ["t:", "h:", "r:"] {
            assert_eq!(int(&g, &["EXISTS", &format!("{p}{k}{old}")]), 1, "{k}");
        }
        assert_eq!(int(&g, &["ZCARD", &format!("{p}fin:succeeded")]), 1);
        // As a store written before retention: no `fin:` sets.
        g.server.cli(&[
            "DEL",
            &format!("{p}fin:succeeded"),
            &format!("{p}fin:failed"),
        ]);
        let rules = vec![PruneRule {
            queue: qn("rq"),
            state: TaskState::Succeeded,
            before: kept_at + 1,
        }];
        let fresh = g.connect().await;
        let done = fresh.prune(&rules, 10).await.expect("prune");
        assert_eq!(done.total(), 1, "the old task was found after indexing");
        for k in ["t:", "h:", "r:"] {
            assert_eq!(
                int(&g, &["EXISTS", &format!("{p}{k}{old}")]),
                0,
                "{k} deleted"
            );
        }
        assert_eq!(int(&g, &["ZCARD", &format!("{p}st:succeeded")]), 0);
        assert_eq!(int(&g, &["ZCARD", &format!("{p}fin:succeeded")]), 0);
        assert_eq!(
            int(&g, &["ZCARD", &format!("{p}fin:failed")]),
            1,
            "indexed, kept"
        );
        assert!(b.get(kept).await.expect("get").is_some());
        assert!(b.get(old).await.expect("get").is_none());
    }

    /// Plain tasks wait in the queue's inbox: counted as queued at once, and stored oldest
    /// first, a bounded step at a time, when a reader needs one of them.
    #[tokio::test]
    async fn plain_tasks_wait_in_the_inbox_until_a_reader_stores_them() {
        let Some((b, g)) = redis_pair("plain_tasks_wait_in_the_inbox").await else {
            return;
        };
        let batch = tasks("ib", 600);
        let out = b.enqueue(batch.clone()).await.expect("enqueue");
        let inbox = ["LLEN", "taskd:{q:ib}:in"];
        assert_eq!(int(&g, &inbox), 1 + 600, "the batch's time and its tasks");
        assert_eq!(int(&g, &["GET", "taskd:{q:ib}:inn"]), 600);
        assert_eq!(int(&g, &["ZCARD", "taskd:{q:ib}:st:queued"]), 0);
        let other = g.connect().await;
        let counts = other.counts().await.expect("counts");
        assert_eq!(count(&counts[0], TaskState::Queued), 600);
        assert_eq!(
            other.count_state(TaskState::Queued).await.expect("count"),
            600
        );

        // Task 300 is stored by the second step of 256 entries (the first entry is the
        // batch's time): the rest stay in the inbox.
        let d = get(&other, batch[300].id).await;
        assert_eq!(d.task.state, TaskState::Queued);
        assert_eq!(
            d.task.created_at, out[300].created_at,
            "created when pushed"
        );
        assert_eq!(d.task.payload, serde_json::json!({ "i": 300 }));
        assert_eq!(int(&g, &inbox), 600 - 511);
        assert_eq!(int(&g, &["GET", "taskd:{q:ib}:inn"]), 600 - 511);
        let counts = other.counts().await.expect("counts");
        assert_eq!(count(&counts[0], TaskState::Queued), 600);

        // Stored in the order they were pushed: claims take them first to last.
        let got = claim(&b, "ib", 600).await;
        let ids: Vec<TaskId> = got.iter().map(|c| c.task.id).collect();
        assert_eq!(ids, batch.iter().map(|t| t.id).collect::<Vec<_>>());
        assert_eq!(int(&g, &inbox), 0);
    }

    /// A claim chooses among the inbox's tasks too: by priority, then age.
    #[tokio::test]
    async fn claims_weigh_inbox_tasks_by_priority() {
        let Some((b, _g)) = redis_pair("claims_weigh_inbox_tasks_by_priority").await else {
            return;
        };
        let mut low = task("pr");
        low.priority = -1;
        let low = enqueue1(&b, low).await;
        let plain = tasks("pr", 10);
        b.enqueue(plain.clone()).await.expect("enqueue");
        let mut high = task("pr");
        high.priority = 5;
        let high = enqueue1(&b, high).await;

        assert_eq!(claim(&b, "pr", 1).await[0].task.id, high);
        let got: Vec<TaskId> = claim(&b, "pr", 10)
            .await
            .iter()
            .map(|c| c.task.id)
            .collect();
        assert_eq!(got, plain.iter().map(|t| t.id).collect::<Vec<_>>());
        assert_eq!(claim(&b, "pr", 5).await[0].task.id, low);
    }

    /// Results finished at once go to the server together: one `finish` call for many,
    /// each answered on its own (a stale lease among them is refused, the others are
    /// recorded).
    #[tokio::test]
    async fn results_finished_together_share_one_call() {
        let Some(server) = redis_server::RedisServer::start("results_finished_together") else {
            return;
        };
        let url = server.url();
        let b = Arc::new(RedisBroker::open(&url).await.expect("open"));
        let bb: B = b.clone();
        b.enqueue(tasks("fin", 50)).await.expect("enqueue");
        let got = claim(&bb, "fin", 50).await;
        assert_eq!(got.len(), 50);
        let stale = got[7].clone();
        let mut stale_lease = stale.lease.clone();
        stale_lease.token -= 1;
        let before = b.round_trips();
        let results = futures_util::future::join_all(got.iter().map(|c| {
            let lease = if c.task.id == stale.task.id {
                stale_lease.clone()
            } else {
                c.lease.clone()
            };
            let a = attempt_of(c, AttemptReason::Exit, None);
            let b = bb.clone();
            async move { b.finish(&lease, a, Finish::Succeeded).await }
        }))
        .await;
        let calls = b.round_trips() - before;
        assert!(calls <= 3, "50 results ready at once took {calls} calls");
        for (c, r) in got.iter().zip(&results) {
            if c.task.id == stale.task.id {
                assert_lease_lost(r.clone(), c.task.id, "a stale finish in a batch");
            } else {
                assert!(r.is_ok(), "{r:?}");
                assert_eq!(get(&bb, c.task.id).await.task.state, TaskState::Succeeded);
            }
        }
        assert_eq!(get(&bb, stale.task.id).await.task.state, TaskState::Queued);
    }

    /// A task pushed to the inbox keeps its place by push time: a task stored directly
    /// after it (here: with a unique key) comes after it in FIFO order and in lists, though
    /// it was stored first.
    #[tokio::test]
    async fn inbox_tasks_keep_their_place_by_push_time() {
        let Some((b, _g)) = redis_pair("inbox_tasks_keep_their_place").await else {
            return;
        };
        let a = enqueue1(&b, task("order")).await;
        let mut direct = task("order");
        direct.unique_key = Some("k".into());
        let d = enqueue1(&b, direct).await;
        let listed = b.list(&ListFilter::default()).await.expect("list");
        assert_eq!(ids_of(&listed), vec![d, a], "newest first");
        let got: Vec<TaskId> = claim(&b, "order", 2)
            .await
            .iter()
            .map(|c| c.task.id)
            .collect();
        assert_eq!(got, vec![a, d], "oldest first");
        assert!(get(&b, a).await.task.created_at <= get(&b, d).await.task.created_at);
    }

    /// push.lua refuses an entry it could not store; an unreadable entry written into an
    /// inbox by hand is set aside in `bad` instead of blocking the queue.
    #[tokio::test]
    async fn malformed_inbox_entries_never_block_a_queue() {
        let Some((b, g)) = redis_pair("malformed_inbox_entries").await else {
            return;
        };
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/redis/push.lua");
        let script = script.to_str().expect("utf-8 path");
        let id = TaskId::new().to_string();
        let key = format!("taskd:{{q:bad}}:t:{id}");
        for (what, keys, entry) in [
            ("no separators", vec![key.clone()], id.clone()),
            (
                "an empty id",
                vec!["taskd:{q:bad}:t:".to_string()],
                "\x1f[]\x1f{}".to_string(),
            ),
            ("no key", vec![], format!("{id}\x1f[]\x1f{{}}")),
            (
                "an id that reads as a time",
                vec!["taskd:{q:bad}:t:@1".to_string()],
                "@1\x1f[]\x1f{}".to_string(),
            ),
        ] {
            let mut args = vec!["--eval", script, "taskd:{q:bad}:"];
            args.extend(keys.iter().map(String::as_str));
            args.extend([",", entry.as_str()]);
            let out = g.server.cli(&args);
            assert!(out.contains("ERR push"), "{what}: {out}");
        }
        assert_eq!(
            int(&g, &["LLEN", "taskd:{q:bad}:in"]),
            0,
            "nothing was pushed"
        );

        // Written by hand, bypassing push.lua: set aside when stored, the queue goes on.
        g.server
            .cli(&["RPUSH", "taskd:{q:bad}:in", "garbage", "@x:1"]);
        g.server.cli(&["INCRBY", "taskd:{q:bad}:inn", "2"]);
        g.server.cli(&["SADD", "taskd:queues", "bad"]);
        let good = enqueue1(&b, task("bad")).await;
        let got = claim(&b, "bad", 5).await;
        assert_eq!(
            got.iter().map(|c| c.task.id).collect::<Vec<_>>(),
            vec![good]
        );
        assert_eq!(
            g.server
                .cli(&["LRANGE", "taskd:{q:bad}:bad", "0", "-1"])
                .trim(),
            "garbage\n@x:1"
        );
        assert_eq!(int(&g, &["GET", "taskd:{q:bad}:inn"]), 0);
        assert_eq!(int(&g, &["LLEN", "taskd:{q:bad}:in"]), 0);
        let counts = b.counts().await.expect("counts");
        assert_eq!(counts[0].set_aside, 2, "{counts:?}");
    }

    /// A caller that reuses the id of a task still in the inbox (taskd never does: its ids
    /// are new UUIDs) does not overwrite the task stored first under it: the entry stored
    /// later is set aside in the queue's `dup` list, intact.
    #[tokio::test]
    async fn a_reused_id_never_overwrites_a_stored_task() {
        let Some((b, g)) = redis_pair("a_reused_id_never_overwrites_a_stored_task").await else {
            return;
        };
        let first = task("dup");
        enqueue1(&b, first.clone()).await;
        let mut direct = NewTask::new(qn("dup"), r#"{"second":true}"#.into());
        direct.id = first.id;
        direct.priority = 1;
        enqueue1(&b, direct).await;
        assert_eq!(
            get(&b, first.id).await.task.payload,
            serde_json::json!({ "second": true })
        );
        b.list(&ListFilter::default()).await.expect("list");
        assert_eq!(int(&g, &["LLEN", "taskd:{q:dup}:in"]), 0);
        assert_eq!(int(&g, &["GET", "taskd:{q:dup}:inn"]), 0);
        let aside = g.server.cli(&["LRANGE", "taskd:{q:dup}:dup", "0", "-1"]);
        assert!(
            aside.starts_with(&first.id.to_string()) && aside.contains(r#"{"k":"v"}"#),
            "the later entry is kept aside: {aside:?}"
        );
        assert_eq!(
            get(&b, first.id).await.task.payload,
            serde_json::json!({ "second": true })
        );
        let counts = b.counts().await.expect("counts");
        assert_eq!(counts[0].set_aside, 1, "{counts:?}");
    }

    /// The node registry: records stamped with the server's clock, listed by id, removed on
    /// leave. (The embedded store keeps none.)
    #[tokio::test]
    async fn nodes_register_heartbeat_and_leave() {
        let Some((b, g)) = open_redis().await else {
            return;
        };
        let (s, _g) = sqlite_fixture().await;
        assert!(s.nodes().await.expect("nodes").is_empty());
        assert!(!s.shared() && b.shared());
        let a = NodeInfo {
            id: "h1:10".into(),
            host: "h1".into(),
            pid: 10,
            queues: vec!["q1".into(), "q2".into()],
            running: 3,
            last_heartbeat: 0,
        };
        let idle = NodeInfo {
            id: "h2:20".into(),
            host: "h2".into(),
            pid: 20,
            queues: Vec::new(),
            running: 0,
            last_heartbeat: 0,
        };
        let before = now_ms();
        b.heartbeat(&a).await.expect("heartbeat");
        b.heartbeat(&idle).await.expect("heartbeat");
        let other = g.connect().await;
        let got = other.nodes().await.expect("nodes");
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].id, "h1:10");
        assert_eq!(got[0].queues, a.queues);
        assert_eq!((got[0].running, got[0].pid), (3, 10));
        assert!(got[1].queues.is_empty(), "{got:?}");
        for n in &got {
            assert!(n.last_heartbeat >= before - 1000, "{n:?}");
        }
        b.leave(&"h1:10".into()).await.expect("leave");
        let got = other.nodes().await.expect("nodes");
        assert_eq!(
            got.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
            vec!["h2:20"]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Flow control: per-key and rate limits (rule 15)
// ---------------------------------------------------------------------------------------------

pub mod limit_cases {
    use super::*;
    use taskd::broker::{Flow, RateLimit};
    use taskd::config::Rate;

    fn keyed(queue: &str, key: Option<&str>) -> NewTask {
        let mut t = task(queue);
        t.flow_key = key.map(str::to_string);
        t
    }

    fn per_key(n: u32) -> Flow {
        Flow {
            per_key: Some(n),
            rate: None,
        }
    }

    fn rate(text: &str, burst: u32, keyed: bool) -> Flow {
        Flow {
            per_key: None,
            rate: Some(RateLimit {
                rate: Rate::parse(text).unwrap(),
                burst,
                keyed,
            }),
        }
    }

    async fn claim_on(b: &B, node: &str, queue: &str, max: usize) -> Vec<TaskId> {
        b.claim(&node.into(), &qn(queue), max, LEASE)
            .await
            .expect("claim")
            .into_iter()
            .map(|c| c.task.id)
            .collect()
    }

    async fn succeed(b: &B, c: &Claimed) {
        b.finish(
            &c.lease,
            attempt_of(c, AttemptReason::Exit, None),
            Finish::Succeeded,
        )
        .await
        .expect("finish");
    }

    /// A key at its limit holds none of the others back, for this client or another one;
    /// a finish frees its slot for the key's next task, oldest first.
    pub async fn flow_key_limits_holders_and_lets_others_flow(b: B, g: G) {
        let other = g.connect().await;
        b.set_flow(&qn("fk"), per_key(1));
        other.set_flow(&qn("fk"), per_key(1));
        let a1 = enqueue1(&b, keyed("fk", Some("a"))).await;
        let a2 = enqueue1(&b, keyed("fk", Some("a"))).await;
        let b1 = enqueue1(&b, keyed("fk", Some("b"))).await;
        let a3 = enqueue1(&b, keyed("fk", Some("a"))).await;
        let free = enqueue1(&b, keyed("fk", None)).await;
        let c1 = enqueue1(&b, keyed("fk", Some("c"))).await;
        let first = b.claim(&NODE.into(), &qn("fk"), 10, LEASE).await.unwrap();
        let got: Vec<TaskId> = first.iter().map(|c| c.task.id).collect();
        assert_eq!(
            got,
            vec![a1, b1, free, c1],
            "one task per key, and the unkeyed one"
        );
        assert!(
            claim_on(&other, "node-b", "fk", 10).await.is_empty(),
            "another client sees key a held"
        );
        start(&b, &first[0]).await;
        assert!(claim_on(&other, "node-b", "fk", 10).await.is_empty());
        succeed(&b, &first[0]).await;
        assert_eq!(
            claim_on(&other, "node-b", "fk", 10).await,
            vec![a2],
            "the key's next task, once its holder finished"
        );
        assert!(
            claim_on(&b, NODE, "fk", 10).await.is_empty(),
            "a2 holds key a"
        );
        let counts = b.counts().await.unwrap();
        let fk = counts
            .iter()
            .find(|c| c.queue.as_ref() == Some(&qn("fk")))
            .unwrap();
        assert_eq!(
            count(fk, TaskState::Queued),
            5,
            "parked tasks are still queued"
        );
        let _ = a3;
    }

    /// `per_key = 2`: two holders at most, in claim order, and a released task gives its
    /// slot back.
    pub async fn flow_key_limit_of_two(b: B, _g: G) {
        b.set_flow(&qn("fk2"), per_key(2));
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(enqueue1(&b, keyed("fk2", Some("k"))).await);
        }
        let c = b.claim(&NODE.into(), &qn("fk2"), 10, LEASE).await.unwrap();
        assert_eq!(c.iter().map(|c| c.task.id).collect::<Vec<_>>(), ids[..2]);
        b.finish(
            &c[1].lease,
            attempt_of(&c[1], AttemptReason::Exit, None),
            Finish::Release,
        )
        .await
        .unwrap();
        assert_eq!(
            claim_on(&b, NODE, "fk2", 10).await,
            vec![ids[1]],
            "the released task, oldest first"
        );
        succeed(&b, &c[0]).await;
        assert_eq!(claim_on(&b, NODE, "fk2", 10).await, vec![ids[2]]);
    }

    /// A parked task can be cancelled, then retried; and a limit removed puts every parked
    /// task back.
    pub async fn flow_parked_tasks_cancel_retry_and_unlimit(b: B, _g: G) {
        b.set_flow(&qn("fkp"), per_key(1));
        let a1 = enqueue1(&b, keyed("fkp", Some("a"))).await;
        let a2 = enqueue1(&b, keyed("fkp", Some("a"))).await;
        let a3 = enqueue1(&b, keyed("fkp", Some("a"))).await;
        let first = b.claim(&NODE.into(), &qn("fkp"), 10, LEASE).await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].task.id, a1);
        assert_eq!(b.cancel(a2).await.unwrap(), CancelOutcome::Cancelled);
        succeed(&b, &first[0]).await;
        assert_eq!(
            claim_on(&b, NODE, "fkp", 10).await,
            vec![a3],
            "a2 was cancelled"
        );
        b.retry(a2).await.unwrap();
        assert!(
            claim_on(&b, NODE, "fkp", 10).await.is_empty(),
            "a3 holds key a"
        );
        b.set_flow(&qn("fkp"), Flow::default());
        assert_eq!(
            claim_on(&b, NODE, "fkp", 10).await,
            vec![a2],
            "without the limit, the retried task runs beside a3"
        );
    }

    /// A rate's starts are spread: the burst at once, then one per interval, across two
    /// clients of the store; `flow_wait` says when the next start is allowed.
    pub async fn flow_rate_spreads_starts_across_clients(b: B, g: G) {
        let other = g.connect().await;
        let limit = rate("20/s", 2, false);
        b.set_flow(&qn("rt"), limit);
        other.set_flow(&qn("rt"), limit);
        b.enqueue(tasks("rt", 40)).await.unwrap();
        let began = Instant::now();
        let first = claim_on(&b, NODE, "rt", 10).await;
        assert_eq!(first.len(), 2, "the burst at once");
        let wait = b.flow_wait(&qn("rt")).expect("a refused rate says when");
        assert!(
            wait > now_ms() - 1000 && wait <= now_ms() + 200,
            "the next start within one interval: {wait} vs now {}",
            now_ms()
        );
        assert!(
            claim_on(&other, "node-b", "rt", 10).await.is_empty()
                || began.elapsed() > Duration::from_millis(40)
        );
        let mut total = first.len();
        let mut turn = false;
        // At least 600 ms of claims, and on until five starts (a loaded machine may spend
        // most of the 600 ms in the first calls); the bound below is on the time it took.
        while began.elapsed() < Duration::from_millis(600)
            || (total < 5 && began.elapsed() < Duration::from_secs(10))
        {
            let client = if turn { &b } else { &other };
            turn = !turn;
            total += claim_on(client, "node-x", "rt", 10).await.len();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = began.elapsed().as_secs_f64();
        let most = 2.0 + secs * 20.0;
        assert!(
            (total as f64) <= most + 0.001,
            "{total} starts in {secs:.3}s; the rate allows at most {most:.1}"
        );
        assert!(
            total >= 5,
            "starts keep coming at the rate: {total} in {secs:.3}s"
        );
    }

    /// `rate_key`: one limit per key value; a key that must wait is parked, the others flow.
    pub async fn flow_rate_key_limits_each_key(b: B, _g: G) {
        b.set_flow(&qn("rk"), rate("1/m", 1, true));
        let mut ids = Vec::new();
        for k in ["x", "x", "y", "x", "z"] {
            let mut t = task("rk");
            t.rate_key = Some(k.into());
            ids.push(enqueue1(&b, t).await);
        }
        assert_eq!(
            claim_on(&b, NODE, "rk", 10).await,
            vec![ids[0], ids[2], ids[4]],
            "one start per key"
        );
        assert!(claim_on(&b, NODE, "rk", 10).await.is_empty());
        let wait = b.flow_wait(&qn("rk")).expect("when key x may start again");
        assert!(
            wait >= now_ms() + 50_000,
            "a minute after the first start: {wait}"
        );
        let state = b.flow_state(&qn("rk"), ids[1]).await.unwrap();
        assert_eq!(state.rate_key.as_deref(), Some("x"));
        assert!(state
            .rate_tat_us
            .is_some_and(|t| t / 1000 >= now_ms() + 50_000));
    }

    /// `flow_state` names the holders of a task's key, oldest first, not the task itself.
    pub async fn flow_state_names_key_holders(b: B, _g: G) {
        b.set_flow(&qn("fs"), per_key(2));
        let h1 = enqueue1(&b, keyed("fs", Some("cust-7"))).await;
        let h2 = enqueue1(&b, keyed("fs", Some("cust-7"))).await;
        let waiting = enqueue1(&b, keyed("fs", Some("cust-7"))).await;
        let c = b.claim(&NODE.into(), &qn("fs"), 10, LEASE).await.unwrap();
        assert_eq!(c.len(), 2);
        start(&b, &c[0]).await;
        let s = b.flow_state(&qn("fs"), waiting).await.unwrap();
        assert_eq!(s.flow_key.as_deref(), Some("cust-7"));
        assert_eq!(s.key_holders, vec![h1, h2]);
        succeed(&b, &c[0]).await;
        let s = b.flow_state(&qn("fs"), waiting).await.unwrap();
        assert_eq!(s.key_holders, vec![h2]);
    }

    /// Rule 19: rate states whose TAT has passed go, at most `limit` a call; one whose TAT
    /// is ahead stays; a key seen again starts afresh.
    pub async fn flow_prune_deletes_only_lapsed_rate_states(b: B, _g: G) {
        b.set_flow(&qn("rp"), rate("1000/s", 1, true));
        b.set_flow(&qn("rl"), rate("1/m", 1, true));
        let keyed_rate = |queue: &str, key: &str| {
            let mut t = task(queue);
            t.rate_key = Some(key.into());
            t
        };
        let mut fast = Vec::new();
        for k in ["a", "b", "c"] {
            fast.push(enqueue1(&b, keyed_rate("rp", k)).await);
        }
        let slow = enqueue1(&b, keyed_rate("rl", "z")).await;
        assert_eq!(claim_on(&b, NODE, "rp", 10).await.len(), 3);
        assert_eq!(claim_on(&b, NODE, "rl", 10).await, vec![slow]);
        let tat = |queue: &'static str, id: TaskId| {
            let b = b.clone();
            async move { b.flow_state(&qn(queue), id).await.unwrap().rate_tat_us }
        };
        let now_us = now_ms() * 1000;
        // A second ago every TAT was ahead: nothing goes.
        assert_eq!(
            b.prune_flow(&qn("rp"), now_us - 1_000_000, 10)
                .await
                .unwrap()
                .0,
            0
        );
        for id in &fast {
            assert!(tat("rp", *id).await.is_some(), "a live state stays");
        }
        // Ten seconds on, the 1 ms TATs have passed; the minute's has not.
        let later = now_us + 10_000_000;
        let (first, _) = b.prune_flow(&qn("rp"), later, 2).await.unwrap();
        assert!(first <= 2, "at most the limit per call: {first}");
        let rest = taskd::broker::prune_flow_states(&*b, &[qn("rp"), qn("rl")], later)
            .await
            .unwrap();
        assert_eq!(first + rest, 3, "the three lapsed states, once each");
        for id in &fast {
            assert_eq!(tat("rp", *id).await, None, "a lapsed state is gone");
        }
        assert!(
            tat("rl", slow).await.is_some_and(|t| t > later),
            "a TAT ahead is kept"
        );
        assert_eq!(
            taskd::broker::prune_flow_states(&*b, &[qn("rp")], later)
                .await
                .unwrap(),
            0,
            "nothing twice"
        );
        // The key starts afresh: its next task may start at once.
        let again = enqueue1(&b, keyed_rate("rp", "a")).await;
        assert!(poll_claim(&b, "rp", again).await, "key a starts again");
    }

    /// Claims `id` on `queue` within a second (a 1000/s rate frees its key within 1 ms).
    async fn poll_claim(b: &B, queue: &str, id: TaskId) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if claim_on(b, NODE, queue, 10).await.contains(&id) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }
}

/// Takes schema 10 (an attempt's cgroup counters) out of a store, to make it an older one.
const UNDO_USAGE: &str = "ALTER TABLE attempts DROP COLUMN memory_peak;
    ALTER TABLE attempts DROP COLUMN cpu_usec; DELETE FROM schema_version WHERE version = 10;";

/// Takes schema 7 (flow control) out of a store, to make it an older one.
const UNDO_FLOW: &str = "DROP TABLE parked_keys; DROP TABLE rate_state; DROP INDEX tasks_key_held;
    DROP INDEX tasks_parked_key; DROP INDEX tasks_parked_rate; DROP INDEX tasks_ready;
    CREATE INDEX tasks_ready ON tasks(queue, priority DESC, seq) WHERE state = 'queued' AND lease_node IS NULL;
    ALTER TABLE tasks DROP COLUMN parked; ALTER TABLE tasks DROP COLUMN flow_key;
    ALTER TABLE tasks DROP COLUMN rate_key; DELETE FROM schema_version WHERE version = 8;";
