//! The embedded broker: one SQLite file in WAL mode with `synchronous = FULL`.
//!
//! Writes go through one writer thread per process that batches whatever is waiting into a
//! single transaction (group commit): the daemon's claims and completions share one fsync,
//! and an `.await` never holds a transaction. Each write runs inside its own savepoint, so
//! one refused write does not undo its neighbours in the batch. Reads use a separate
//! connection (WAL lets them run beside the writer).
//!
//! Several processes may use the file at once (the daemon and any number of CLI calls):
//! `BEGIN IMMEDIATE` waits on the busy timeout and is retried, so contention is never
//! surfaced as an error. Producers wake the daemon with a datagram on a Unix socket next
//! to the database (`<db>.wake`); losing one only delays a task until the daemon's next
//! periodic check.
//!
//! One file per concern, as for Redis: `schema.rs` (the migrations), `conn.rs` (opening
//! connections, the read path, waiting out another process's write lock), `writer.rs` (the
//! group-commit writer thread and how a write reaches it), `wake.rs` (the wake-up socket),
//! `rows.rs` (row mapping and the statements several operations share), `schedules.rs` (the
//! schedule records and slot steps) and `flow.rs` (per-key and rate limits in the claim);
//! this file holds the broker itself and its `Broker` operations.

mod conn;
mod flow;
mod retention;
mod rows;
mod schedules;
mod schema;
mod wake;
mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use self::conn::{open_writer, storage};
use self::rows::{
    boot_id, insert_attempt, insert_task, mark_running, row_to_task, task_seq, TASK_COLS,
};
use self::writer::{answer, writer_loop, Job};
use super::{
    Broker, BrokerError, CancelOutcome, Claimed, Enqueued, Finish, Flow, FlowState, FlowTable,
    Lease, ListFilter, LostLimits, Orphan, QueueCounts, Queued, Recover, Result, StatRow, Wakeups,
};
use crate::audit::{AuditEntry, AuditFilter, AuditRecord};
use crate::model::{
    now_ms, AttemptReason, AttemptRecord, NewTask, NodeId, QueueName, TaskDetail, TaskId,
    TaskRecord, TaskState, UnixMs,
};

/// The SQLite backend. Cheap to share behind an `Arc`.
pub struct SqliteBroker {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    /// Opened on the first read: a producer that only enqueues never needs it.
    reader: Arc<Mutex<Option<Connection>>>,
    wake_path: PathBuf,
    wake_tx: Mutex<Option<UnixDatagram>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Why this process may only read the store (`None`: it may write).
    read_only: Option<String>,
    /// The flow-control limits of each queue's claims (rule 13).
    flow: FlowTable,
}

impl Drop for SqliteBroker {
    /// Close the database cleanly: the writer thread ends when its channel closes and drops
    /// its connection. A last connection that closes checkpoints the WAL and removes it; one
    /// that is never closed (a process that just exits) leaves the WAL for the next opener to
    /// read through in full, which makes every later `taskd submit` slower.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Ok(mut r) = self.reader.lock() {
            r.take();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl SqliteBroker {
    /// Open (creating when missing) the database at `path` and start its writer thread.
    pub async fn open(path: &Path) -> Result<Self> {
        // Opened on this thread: it is a one-off at start-up, and a short-lived CLI call
        // should not pay for starting a blocking thread pool.
        // A store this process may not use fails with SQLite's "unable to open database
        // file"; say which file and what to do instead.
        let writer = open_writer(path)
            .map_err(|e| super::access::problem(path).map_or(e, BrokerError::Unavailable))?;
        // SQLite opens a file it may only read read-only, silently: reads work, and every
        // write would fail. Refuse writes up front with the reason.
        let read_only = writer
            .is_readonly(rusqlite::DatabaseName::Main)
            .unwrap_or(false)
            .then(|| {
                super::access::problem(path)
                    .unwrap_or_else(|| format!("{} is read-only to this process", path.display()))
            });
        let (tx, rx) = mpsc::channel::<Job>();
        let wake_path = wake::socket_path(path);
        let writer_wake = wake_path.clone();
        let writer = std::thread::Builder::new()
            .name("taskd-sqlite-writer".into())
            .spawn(move || writer_loop(writer, rx, writer_wake))
            .map_err(|e| BrokerError::Storage(format!("failed to start the writer thread: {e}")))?;
        Ok(SqliteBroker {
            path: path.to_path_buf(),
            jobs: tx,
            reader: Arc::new(Mutex::new(None)),
            wake_path,
            wake_tx: Mutex::new(None),
            writer: Some(writer),
            read_only,
            flow: FlowTable::default(),
        })
    }

    async fn claim_as(
        &self,
        urgent: bool,
        node: &NodeId,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let node = node.clone();
        let queue = queue.clone();
        let lease_ms = lease.as_millis() as i64;
        let limits = self.flow.get(&queue);
        if !limits.is_none() {
            let q = queue.clone();
            let (claimed, wait) = self
                .write_as(urgent, move |conn| {
                    let now = now_ms();
                    if is_paused(conn, &q)? {
                        return Ok((Vec::new(), None));
                    }
                    promote(conn, &q, now)?;
                    flow::claim(conn, &node, &q, max, now, lease_ms, limits)
                })
                .await?;
            self.flow.set_wait(&queue, wait);
            return Ok(claimed);
        }
        self.write_as(urgent, move |conn| {
            let now = now_ms();
            if is_paused(conn, &queue)? {
                return Ok(Vec::new());
            }
            promote(conn, &queue, now)?;
            // Tasks parked under limits since removed (a reload, a restart) are put back by
            // the flow walk, without limits.
            let parked: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM parked_keys WHERE queue = ?1)")
                .and_then(|mut s| s.query_row([queue.as_str()], |r| r.get(0)))
                .map_err(storage)?;
            if parked {
                let free = flow::claim(conn, &node, &queue, max, now, lease_ms, Flow::default())?;
                return Ok(free.0);
            }
            let mut stmt = conn
                .prepare_cached(&format!(
                    "UPDATE tasks SET lease_node = ?1, lease_token = lease_token + 1, lease_expires = ?2,
                        updated_at = ?3, pid = NULL, pid_start = NULL
                     WHERE seq IN (SELECT seq FROM tasks WHERE queue = ?4 AND state = 'queued' AND lease_node IS NULL AND parked = 0
                                   AND (expires_at IS NULL OR expires_at > ?3)
                                   ORDER BY priority DESC, seq LIMIT ?5)
                     RETURNING {TASK_COLS}, seq"
                ))
                .map_err(storage)?;
            let mut rows: Vec<(i64, Claimed)> = stmt
                .query_map(params![node.as_str(), now + lease_ms, now, queue.as_str(), max as i64], |r| {
                    let task = row_to_task(r)?;
                    let token: i64 = r.get("lease_token")?;
                    let seq: i64 = r.get("seq")?;
                    Ok((
                        seq,
                        Claimed {
                            lease: Lease {
                                task: task.id,
                                token,
                                node: node.clone(),
                            },
                            attempt: task.attempts + 1,
                            task,
                        },
                    ))
                })
                .and_then(|it| it.collect())
                .map_err(storage)?;
            rows.sort_by_key(|(seq, c)| (-c.task.priority, *seq));
            Ok(rows.into_iter().map(|(_, c)| c).collect())
        })
        .await
    }
}
fn is_paused(conn: &Connection, queue: &QueueName) -> Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM paused_queues WHERE queue = ?1)")
        .and_then(|mut s| s.query_row([queue.as_str()], |r| r.get(0)))
        .map_err(storage)
}

/// Due scheduled and retrying tasks of `queue` become queued (a claim's first step).
fn promote(conn: &Connection, queue: &QueueName, now: UnixMs) -> Result<()> {
    conn.prepare_cached(
        "UPDATE tasks SET state = 'queued', updated_at = ?2
         WHERE state IN ('scheduled', 'retrying') AND blocked = 0 AND run_at <= ?2 AND queue = ?1
           AND (expires_at IS NULL OR expires_at > ?2)",
    )
    .and_then(|mut s| s.execute(params![queue.as_str(), now]))
    .map_err(storage)?;
    Ok(())
}

#[async_trait]
impl Broker for SqliteBroker {
    async fn enqueue(&self, tasks: Vec<NewTask>) -> Result<Vec<Enqueued>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        // A task that waits for its time moves the daemon's timer; a ready one only needs
        // its queue looked at. The writer sends the wake-up after the commit.
        let now = now_ms();
        let later = tasks.iter().any(|t| t.run_at.is_some_and(|r| r > now));
        let kind: &'static [u8] = if later { b"sched" } else { b"work" };
        let out: Vec<Enqueued> = self
            .send(true, Some(kind), move |conn| {
                let now = now_ms();
                tasks.iter().map(|t| insert_task(conn, t, now)).collect()
            })
            .await?;
        Ok(out)
    }

    async fn claim(
        &self,
        node: &NodeId,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        self.claim_as(true, node, queue, max, lease).await
    }

    async fn claim_ahead(
        &self,
        node: &NodeId,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        self.claim_as(false, node, queue, max, lease).await
    }

    fn set_flow(&self, queue: &QueueName, flow: Flow) {
        self.flow.set(queue, flow);
    }

    fn flow_wait(&self, queue: &QueueName) -> Option<UnixMs> {
        self.flow.wait(queue)
    }

    async fn flow_state(&self, queue: &QueueName, id: TaskId) -> Result<FlowState> {
        let queue = queue.clone();
        let keyed = self.flow.get(&queue).rate.is_some_and(|r| r.keyed);
        self.read(move |conn| flow::state(conn, &queue, id, keyed))
            .await
    }

    async fn started(&self, lease: &Lease, pid: i32, pid_start: u64) -> Result<()> {
        let lease = lease.clone();
        // The process already runs; nobody waits on this record, so it may share a commit.
        self.write_as(false, move |conn| {
            mark_running(conn, &lease, Some((pid, pid_start)))
        })
        .await
    }

    async fn renew(&self, leases: &[Lease], lease: Duration) -> Result<Vec<TaskId>> {
        let leases = leases.to_vec();
        let lease_ms = lease.as_millis() as i64;
        self.write(move |conn| {
            let until = now_ms() + lease_ms;
            let mut lost = Vec::new();
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE tasks SET lease_expires = ?1
                     WHERE id = ?2 AND lease_token = ?3 AND lease_node = ?4 AND state IN ('queued', 'running')",
                )
                .map_err(storage)?;
            for l in &leases {
                let n = stmt
                    .execute(params![until, l.task.to_string(), l.token, l.node.as_str()])
                    .map_err(storage)?;
                if n == 0 {
                    lost.push(l.task);
                }
            }
            Ok(lost)
        })
        .await
    }

    async fn note_run(&self, id: TaskId, attempt: AttemptRecord) -> Result<()> {
        self.write_as(false, move |conn| {
            let (seq, _) = task_seq(conn, id)?;
            insert_attempt(conn, seq, &attempt)
        })
        .await
    }

    fn finish<'a>(
        &'a self,
        lease: &'a Lease,
        attempt: AttemptRecord,
        next: Finish,
    ) -> Queued<'a, ()> {
        let held = lease.clone();
        // Serialized here, not on the writer's thread. Only a success keeps it (rule 12).
        let result = match next {
            Finish::Succeeded => attempt.result.as_ref().map(|v| v.to_string()),
            _ => None,
        };
        // Nobody waits on a result to go on: it may share a commit with its neighbours. No
        // savepoint of its own (one per task was a good part of the writer's work): its only
        // refusal, a lost lease, comes before it writes anything.
        let queued = self.queue_bare(false, None, move |conn| {
                let now = now_ms();
                // With the row: whether a dependant waits on this task (read in the same
                // statement, before the update's triggers count it down).
                let row: Option<(i64, bool, String, bool)> = conn
                    .prepare_cached(
                        "SELECT seq, cancel_requested, state,
                                EXISTS (SELECT 1 FROM deps JOIN tasks AS child ON child.seq = deps.child
                                        WHERE deps.parent = tasks.seq AND child.blocked > 0)
                         FROM tasks
                         WHERE id = ?1 AND lease_token = ?2 AND lease_node = ?3 AND state IN ('queued', 'running')",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![held.task.to_string(), held.token, held.node.as_str()], |r| {
                            Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?, r.get(3)?))
                        })
                        .optional()
                    })
                    .map_err(storage)?;
                let (seq, cancel_requested, state, dependants) =
                    row.ok_or(BrokerError::LeaseLost(held.task))?;
                // `started` counts the attempt when it is recorded; a task finished before that
                // record (it never started, or the record is still on its way) is counted here.
                let counted = state == "running";
                if next != Finish::Release {
                    insert_attempt(conn, seq, &attempt)?;
                }
                // An operator's cancel that arrived while the task ran outweighs a retry or
                // a requeue: it must not silently run again.
                let next = match next {
                    Finish::Retry { .. } | Finish::Requeue | Finish::Release if cancel_requested => Finish::Cancelled,
                    n => n,
                };
                // Not charged: a run put back, or a cancel of a task that never started.
                let charged = match next {
                    Finish::Requeue | Finish::Release => false,
                    Finish::Cancelled => attempt.pid.is_some(),
                    _ => true,
                };
                // The change to `attempts`: +1 for a charged attempt `started` did not count,
                // -1 for an uncharged one it did.
                let delta: i64 = match (charged, counted) {
                    (true, false) => 1,
                    (false, true) => -1,
                    _ => 0,
                };
                let (state, run_at, finished) = match next {
                    Finish::Succeeded => (TaskState::Succeeded, None, Some(now)),
                    Finish::Retry { at } => (TaskState::Retrying, Some(at), None),
                    Finish::Failed => (TaskState::Failed, None, Some(now)),
                    Finish::Cancelled => (TaskState::Cancelled, None, Some(now)),
                    Finish::Requeue | Finish::Release => (TaskState::Queued, None, None),
                };
                // A success that unblocks dependants is work for whichever daemon serves them.
                let unblocks = next == Finish::Succeeded && dependants;
                let error = match next {
                    Finish::Succeeded | Finish::Release => None,
                    Finish::Cancelled if cancel_requested => Some("cancelled by an operator".to_string()),
                    _ => attempt.error.clone(),
                };
                conn.prepare_cached(
                    "UPDATE tasks SET state = ?2, run_at = coalesce(?3, run_at), finished_at = ?4,
                        attempts = max(attempts + ?5, 0), last_error = CASE WHEN ?8 THEN last_error ELSE ?6 END,
                        updated_at = ?7,
                        lease_node = NULL, lease_expires = NULL, cancel_requested = 0, pid = NULL, pid_start = NULL
                     WHERE seq = ?1",
                )
                .and_then(|mut s| {
                    s.execute(params![seq, state.as_str(), run_at, finished, delta, error, now, next == Finish::Release])
                })
                .map_err(storage)?;
                if let Some(value) = &result {
                    conn.prepare_cached("INSERT OR REPLACE INTO results (task_seq, value) VALUES (?1, ?2)")
                        .and_then(|mut s| s.execute(params![seq, value]))
                        .map_err(storage)?;
                }
                Ok(unblocks || matches!(next, Finish::Requeue | Finish::Release | Finish::Retry { .. }))
            });
        Queued::new(async move {
            if answer(queued?).await? {
                self.wake(b"work");
            }
            Ok(())
        })
    }

    async fn cancel(&self, id: TaskId) -> Result<CancelOutcome> {
        let out = self
            .write(move |conn| {
                let (seq, state) = task_seq(conn, id)?;
                let now = now_ms();
                let held: bool = conn
                    .query_row("SELECT lease_node IS NOT NULL FROM tasks WHERE seq = ?1", [seq], |r| r.get(0))
                    .map_err(storage)?;
                match state {
                    // Running, or claimed by a node that is about to start it: that node stops it.
                    TaskState::Running | TaskState::Queued if state == TaskState::Running || held => {
                        conn.execute(
                            "UPDATE tasks SET cancel_requested = 1, updated_at = ?2 WHERE seq = ?1",
                            params![seq, now],
                        )
                        .map_err(storage)?;
                        Ok(CancelOutcome::Requested)
                    }
                    s if s.is_terminal() => Ok(CancelOutcome::AlreadyFinished(s)),
                    _ => {
                        conn.execute(
                            "UPDATE tasks SET state = 'cancelled', finished_at = ?2, updated_at = ?2,
                                last_error = 'cancelled before it ran', parked = 0 WHERE seq = ?1",
                            params![seq, now],
                        )
                        .map_err(storage)?;
                        Ok(CancelOutcome::Cancelled)
                    }
                }
            })
            .await?;
        if out == CancelOutcome::Requested {
            self.wake(b"cancel");
        }
        Ok(out)
    }

    async fn retry(&self, id: TaskId) -> Result<()> {
        self.write(move |conn| {
            let (seq, state) = task_seq(conn, id)?;
            if !matches!(state, TaskState::Failed | TaskState::Cancelled) {
                return Err(BrokerError::Conflict(format!(
                    "task {id} is {state}; only failed or cancelled tasks can be retried"
                )));
            }
            let now = now_ms();
            conn.execute(
                "UPDATE tasks SET state = 'queued', attempts = 0, run_at = ?2, finished_at = NULL,
                    last_error = NULL, cancel_requested = 0, parked = 0, updated_at = ?2 WHERE seq = ?1",
                params![seq, now],
            )
            .map_err(|e| match e.sqlite_error_code() {
                Some(ErrorCode::ConstraintViolation) => BrokerError::Conflict(format!(
                    "another waiting or running task of this queue holds task {id}'s unique key"
                )),
                _ => storage(e),
            })?;
            Ok(())
        })
        .await?;
        self.wake(b"work");
        Ok(())
    }

    async fn set_paused(&self, queue: &QueueName, paused: bool) -> Result<()> {
        let queue = queue.clone();
        self.write(move |conn| {
            if paused {
                conn.execute(
                    "INSERT INTO paused_queues (queue, paused_at) VALUES (?1, ?2) ON CONFLICT (queue) DO NOTHING",
                    params![queue.as_str(), now_ms()],
                )
            } else {
                conn.execute("DELETE FROM paused_queues WHERE queue = ?1", [queue.as_str()])
            }
            .map_err(storage)?;
            Ok(())
        })
        .await?;
        self.wake(b"pause");
        Ok(())
    }

    async fn paused(&self) -> Result<BTreeSet<QueueName>> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT queue FROM paused_queues")
                .map_err(storage)?;
            let names: Vec<String> = stmt
                .query_map([], |r| r.get(0))
                .and_then(|it| it.collect())
                .map_err(storage)?;
            Ok(names.into_iter().filter_map(|n| n.parse().ok()).collect())
        })
        .await
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskDetail>> {
        self.read(move |conn| read_detail(conn, id)).await
    }

    async fn get_many(&self, ids: &[TaskId]) -> Result<Vec<Option<TaskDetail>>> {
        let ids = ids.to_vec();
        self.read(move |conn| ids.into_iter().map(|id| read_detail(conn, id)).collect())
            .await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>> {
        let filter = filter.clone();
        self.read(move |conn| {
            use rusqlite::types::Value as V;
            let mut sql = format!("SELECT {TASK_COLS} FROM tasks WHERE 1 = 1");
            let mut args: Vec<V> = Vec::new();
            let mut cond = |sql_part: &str, v: V| {
                args.push(v);
                sql.push_str(&format!(" AND {sql_part} ?{}", args.len()));
            };
            if let Some(q) = &filter.queue {
                cond("queue =", V::Text(q.as_str().to_string()));
            }
            if let Some(st) = filter.state {
                cond("state =", V::Text(st.as_str().to_string()));
            }
            if let Some(t) = filter.since {
                cond("created_at >=", V::Integer(t));
            }
            if let Some(t) = filter.until {
                cond("created_at <", V::Integer(t));
            }
            if let Some(id) = filter.id {
                cond("id =", V::Text(id.to_string()));
            }
            if let Some(k) = &filter.unique_key {
                cond("unique_key =", V::Text(k.clone()));
            }
            if let Some(after) = filter.after {
                let seq = task_seq(conn, after)?.0;
                cond("seq <", V::Integer(seq));
            }
            if let Some(p) = &filter.payload {
                // Only payloads that contain the field's key are parsed (compact JSON).
                args.push(V::Text(p.needle()));
                sql.push_str(&format!(" AND instr(payload, ?{}) > 0", args.len()));
            }
            sql.push_str(" ORDER BY seq DESC");
            let limit = if filter.limit == 0 {
                usize::MAX
            } else {
                filter.limit
            };
            if filter.payload.is_none() && filter.limit > 0 {
                sql.push_str(&format!(" LIMIT {limit}"));
            }
            let mut stmt = conn.prepare_cached(&sql).map_err(storage)?;
            let mut rows = stmt
                .query(rusqlite::params_from_iter(args))
                .map_err(storage)?;
            let mut out = Vec::new();
            // With a payload condition the rows are read one by one until `limit` match.
            while out.len() < limit {
                let Some(r) = rows.next().map_err(storage)? else {
                    break;
                };
                let t = row_to_task(r).map_err(storage)?;
                if filter.matches(&t) {
                    out.push(t);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn add_stats(&self, rows: &[StatRow]) -> Result<()> {
        let rows = rows.to_vec();
        self.write_as(false, move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "INSERT INTO stats (minute, queue, succeeded, failed, retried, cancelled, runs, run_ms_sum, run_ms_max, wait_ms_sum)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (minute, queue) DO UPDATE SET
                       succeeded = succeeded + excluded.succeeded, failed = failed + excluded.failed,
                       retried = retried + excluded.retried, cancelled = cancelled + excluded.cancelled,
                       runs = runs + excluded.runs, run_ms_sum = run_ms_sum + excluded.run_ms_sum,
                       run_ms_max = max(run_ms_max, excluded.run_ms_max),
                       wait_ms_sum = wait_ms_sum + excluded.wait_ms_sum",
                )
                .map_err(storage)?;
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            for r in &rows {
                stmt.execute(params![
                    r.minute,
                    r.queue.as_str(),
                    n(r.succeeded),
                    n(r.failed),
                    n(r.retried),
                    n(r.cancelled),
                    n(r.runs),
                    n(r.run_ms_sum),
                    n(r.run_ms_max),
                    n(r.wait_ms_sum)
                ])
                .map_err(storage)?;
            }
            conn.execute(
                "DELETE FROM stats WHERE minute < ?1",
                [(now_ms() - crate::broker::STATS_KEEP_MS) / 60_000],
            )
            .map_err(storage)?;
            Ok(())
        })
        .await
    }

    async fn stats(&self, since: UnixMs) -> Result<Vec<StatRow>> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT minute, queue, succeeded, failed, retried, cancelled, runs, run_ms_sum, run_ms_max, wait_ms_sum FROM stats WHERE minute >= ?1",
                )
                .map_err(storage)?;
            let rows = stmt
                .query_map([since.div_euclid(60_000)], |r| {
                    let u = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        [u(2)?, u(3)?, u(4)?, u(5)?, u(6)?, u(7)?, u(8)?, u(9)?],
                    ))
                })
                .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(storage)?;
            Ok(rows
                .into_iter()
                .filter_map(|(minute, q, c)| {
                    Some(StatRow {
                        queue: q.parse().ok()?,
                        minute,
                        succeeded: c[0],
                        failed: c[1],
                        retried: c[2],
                        cancelled: c[3],
                        runs: c[4],
                        run_ms_sum: c[5],
                        run_ms_max: c[6],
                        wait_ms_sum: c[7],
                    })
                })
                .collect())
        })
        .await
    }

    async fn counts(&self) -> Result<Vec<QueueCounts>> {
        self.read(|conn| {
            let mut by_queue: BTreeMap<String, QueueCounts> = BTreeMap::new();
            let mut stmt = conn
                .prepare_cached("SELECT queue, state, count(*) FROM tasks GROUP BY state, queue")
                .map_err(storage)?;
            let rows: Vec<(String, String, i64)> = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .and_then(|it| it.collect())
                .map_err(storage)?;
            for (q, s, n) in rows {
                let entry = by_queue.entry(q.clone()).or_insert_with(|| QueueCounts {
                    queue: q.parse().ok(),
                    ..Default::default()
                });
                if let Ok(state) = s.parse::<TaskState>() {
                    entry.counts.insert(state, n as u64);
                }
            }
            let mut stmt = conn
                .prepare_cached("SELECT queue FROM paused_queues")
                .map_err(storage)?;
            let paused: Vec<String> = stmt
                .query_map([], |r| r.get(0))
                .and_then(|it| it.collect())
                .map_err(storage)?;
            for q in paused {
                by_queue
                    .entry(q.clone())
                    .or_insert_with(|| QueueCounts {
                        queue: q.parse().ok(),
                        ..Default::default()
                    })
                    .paused = true;
            }
            Ok(by_queue.into_values().collect())
        })
        .await
    }

    async fn next_due(&self) -> Result<Option<UnixMs>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT run_at FROM tasks INDEXED BY tasks_due WHERE state IN ('scheduled', 'retrying') AND blocked = 0
                   AND queue NOT IN (SELECT queue FROM paused_queues) ORDER BY run_at LIMIT 1",
            )
                .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
                .map_err(storage)
        })
        .await
    }

    async fn count_state(&self, state: TaskState) -> Result<u64> {
        self.read(move |conn| {
            conn.prepare_cached("SELECT count(*) FROM tasks WHERE state = ?1")
                .and_then(|mut s| s.query_row([state.as_str()], |r| r.get::<_, i64>(0)))
                .map(|n| n as u64)
                .map_err(storage)
        })
        .await
    }

    async fn cancel_requested(&self, node: &NodeId) -> Result<Vec<TaskId>> {
        let node = node.to_string();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id FROM tasks WHERE cancel_requested = 1 AND lease_node = ?1",
                )
                .map_err(storage)?;
            let ids: Vec<String> = stmt
                .query_map([node], |r| r.get(0))
                .and_then(|it| it.collect())
                .map_err(storage)?;
            Ok(ids.into_iter().filter_map(|s| s.parse().ok()).collect())
        })
        .await
    }

    async fn adopt_started(&self, ids: &[TaskId]) -> Result<u64> {
        let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        self.write(move |conn| {
            let now = now_ms();
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE tasks SET state = 'running', attempts = attempts + 1, started_at = ?2, updated_at = ?2
                     WHERE id = ?1 AND state = 'queued' AND lease_node IS NOT NULL",
                )
                .map_err(storage)?;
            let mut n = 0;
            for id in &ids {
                n += stmt.execute(params![id, now]).map_err(storage)? as u64;
            }
            Ok(n)
        })
        .await
    }

    async fn recover_limited(
        &self,
        scope: Recover,
        note: &str,
        limits: &LostLimits,
    ) -> Result<Vec<Orphan>> {
        let note = note.to_string();
        let limits = limits.clone();
        let out = self
            .write(move |conn| {
                let now = now_ms();
                let (cond, bound) = match scope {
                    Recover::All => ("lease_node IS NOT NULL", i64::MAX),
                    Recover::Expired(t) => ("lease_node IS NOT NULL AND lease_expires < ?1", t),
                };
                let sql = format!(
                    // A pid recorded on another boot (or machine) is not returned: it could
                    // name an unrelated process group now.
                    "SELECT seq, id, queue, lease_node,
                            CASE WHEN pid_boot = ?2 THEN pid END, CASE WHEN pid_boot = ?2 THEN pid_start END,
                            started_at, attempts, cancel_requested, state
                     FROM tasks WHERE {cond} AND state IN ('queued', 'running') AND ?1 = ?1"
                );
                let mut stmt = conn.prepare(&sql).map_err(storage)?;
                type R = (i64, String, String, Option<String>, Option<i32>, Option<i64>, Option<i64>, u32, bool, String);
                let rows: Vec<R> = stmt
                    .query_map(params![bound, boot_id()], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                            r.get(7)?,
                            r.get::<_, i64>(8)? != 0,
                            r.get(9)?,
                        ))
                    })
                    .and_then(|it| it.collect())
                    .map_err(storage)?;
                let mut orphans = Vec::with_capacity(rows.len());
                for (seq, id, queue, node, pid, pid_start, started_at, attempts, cancel_requested, state) in rows {
                    let node = node.map(NodeId::from);
                    let started = state == "running";
                    if started {
                        // It ran: the history says it was lost, and the attempt is given back.
                        let attempt = AttemptRecord::lost(
                            attempts,
                            node.clone().unwrap_or_default(),
                            pid,
                            started_at.unwrap_or(now),
                            now,
                            note.clone(),
                        );
                        insert_attempt(conn, seq, &attempt)?;
                    }
                    let queue: QueueName = queue.parse().map_err(BrokerError::Storage)?;
                    let max_lost = limits.of(&queue);
                    let lost: u32 = if started && !cancel_requested {
                        conn.prepare_cached(
                            "SELECT count(*) FROM attempts WHERE task_seq = ?1 AND reason = 'lost'",
                        )
                        .and_then(|mut s| s.query_row([seq], |r| r.get(0)))
                        .map_err(storage)?
                    } else {
                        0
                    };
                    let failed = lost > max_lost;
                    // A held task that was never recorded as started leaves no history: if its
                    // process did start, it is killed and the run did not count.
                    if failed {
                        // Lost too often: the likely cause of its daemons' deaths (rule 17).
                        conn.execute(
                            "UPDATE tasks SET state = 'failed', finished_at = ?2, updated_at = ?2,
                                last_error = ?3, attempts = max(attempts - 1, 0),
                                lease_node = NULL, lease_expires = NULL, pid = NULL, pid_start = NULL
                             WHERE seq = ?1",
                            params![seq, now, super::lost_too_often(lost, max_lost)],
                        )
                    } else if cancel_requested {
                        // The operator asked to cancel it before its node went away: honour it.
                        conn.execute(
                            "UPDATE tasks SET state = 'cancelled', finished_at = ?2, updated_at = ?2,
                                last_error = 'cancelled by an operator', cancel_requested = 0,
                                attempts = max(attempts - ?3, 0),
                                lease_node = NULL, lease_expires = NULL, pid = NULL, pid_start = NULL
                             WHERE seq = ?1",
                            params![seq, now, started as i64],
                        )
                    } else {
                        conn.execute(
                            "UPDATE tasks SET state = 'queued', attempts = max(attempts - ?3, 0), updated_at = ?2,
                                lease_node = NULL, lease_expires = NULL, pid = NULL, pid_start = NULL
                             WHERE seq = ?1",
                            params![seq, now, started as i64],
                        )
                    }
                    .map_err(storage)?;
                    orphans.push(Orphan {
                        task: id.parse().map_err(BrokerError::Storage)?,
                        queue,
                        node,
                        pid,
                        pid_start: pid_start.map(|p| p as u64),
                        failed,
                    });
                }
                Ok(orphans)
            })
            .await?;
        if !out.is_empty() {
            self.wake(b"work");
        }
        Ok(out)
    }

    async fn expire(&self) -> Result<Vec<(TaskId, QueueName)>> {
        // Read first: the common answer is "none", which then costs no write.
        let now = now_ms();
        let any: bool = self
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM tasks INDEXED BY tasks_expiry
                     WHERE expires_at <= ?1 AND state IN ('scheduled', 'queued', 'retrying'))",
                )
                .and_then(|mut s| s.query_row([now], |r| r.get(0)))
                .map_err(storage)
            })
            .await?;
        if !any {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String)> = self
            .write(move |conn| {
                let now = now_ms();
                conn.prepare_cached(
                    "UPDATE tasks SET state = 'cancelled', last_error = 'expired', finished_at = ?1, updated_at = ?1
                     WHERE seq IN (SELECT seq FROM tasks INDEXED BY tasks_expiry
                                   WHERE expires_at <= ?1 AND state IN ('scheduled', 'queued', 'retrying')
                                     AND lease_node IS NULL LIMIT 10000)
                     RETURNING id, queue",
                )
                .and_then(|mut s| {
                    s.query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))
                        .and_then(|it| it.collect())
                })
                .map_err(storage)
            })
            .await?;
        rows.into_iter()
            .map(|(id, q)| {
                Ok((
                    id.parse().map_err(BrokerError::Storage)?,
                    q.parse().map_err(BrokerError::Storage)?,
                ))
            })
            .collect()
    }

    async fn subscribe(&self) -> Result<Wakeups> {
        wake::listen(&self.wake_path)
    }

    async fn audit(&self, entry: &AuditEntry, keep: usize) -> Result<()> {
        let record =
            serde_json::to_string(entry).map_err(|e| BrokerError::Storage(e.to_string()))?;
        let action = entry.action.as_str();
        let outcome = entry.outcome.as_str();
        let task = entry.task.map(|t| t.to_string());
        let queue = entry.queue.as_ref().map(|q| q.as_str().to_string());
        let keep = keep.max(1) as i64;
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO audit (at, action, task, queue, outcome, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| s.execute(params![now_ms(), action, task, queue, outcome, record]))
            .map_err(storage)?;
            // `seq` has no gaps among the records kept (AUTOINCREMENT, and only the oldest
            // are ever deleted): the newest `keep` are those above this one's seq − keep.
            let seq = conn.last_insert_rowid();
            conn.prepare_cached("DELETE FROM audit WHERE seq <= ?1")
                .and_then(|mut s| s.execute([seq - keep]))
                .map_err(storage)?;
            Ok(())
        })
        .await
    }

    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let before: Option<i64> = match &filter.before {
            Some(b) => Some(b.parse().map_err(|_| {
                BrokerError::Conflict(format!("`{b}` is not an audit record id of this store"))
            })?),
            None => None,
        };
        let since = filter.since;
        let limit = if filter.limit == 0 {
            -1
        } else {
            filter.limit as i64
        };
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, at, record FROM audit
                     WHERE (?1 IS NULL OR at >= ?1) AND (?2 IS NULL OR seq < ?2)
                     ORDER BY seq DESC LIMIT ?3",
                )
                .map_err(storage)?;
            let rows = stmt
                .query_map(params![since, before, limit], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(storage)?;
            rows.into_iter()
                .map(|(seq, at, record)| {
                    let entry = serde_json::from_str(&record).map_err(|e| {
                        BrokerError::Storage(format!("audit record {seq} cannot be read: {e}"))
                    })?;
                    Ok(AuditRecord {
                        id: seq.to_string(),
                        at,
                        entry,
                    })
                })
                .collect()
        })
        .await
    }

    async fn schedule_states(
        &self,
        keys: &[super::ScheduleKey],
    ) -> Result<Vec<super::ScheduleState>> {
        self.schedule_states_in(keys).await
    }

    async fn schedule_step(
        &self,
        key: &super::ScheduleKey,
        step: super::ScheduleStep,
    ) -> Result<super::StepAnswer> {
        self.schedule_step_in(key, step).await
    }

    async fn schedule_history(
        &self,
        key: &super::ScheduleKey,
        limit: usize,
    ) -> Result<Vec<super::SlotRecord>> {
        self.schedule_history_in(key, limit).await
    }

    async fn set_schedule_paused(&self, key: &super::ScheduleKey, paused: bool) -> Result<()> {
        self.set_schedule_paused_in(key, paused).await
    }

    async fn prune(&self, rules: &[super::PruneRule], limit: usize) -> Result<super::Pruned> {
        self.prune_in(rules, limit).await
    }

    async fn prunable(&self, rules: &[super::PruneRule]) -> Result<super::Pruned> {
        self.prunable_in(rules).await
    }

    async fn prune_slots(&self, key: &super::ScheduleKey, before: UnixMs) -> Result<u64> {
        self.prune_slots_in(key, before).await
    }

    async fn prune_flow(
        &self,
        queue: &QueueName,
        now_us: i64,
        limit: usize,
    ) -> Result<(u64, bool)> {
        self.prune_flow_in(queue, now_us, limit).await
    }

    async fn store_size(&self) -> Result<Option<super::StoreSize>> {
        Ok(Some(self.store_size_now()))
    }
}

/// A task with its attempts and result, as [`Broker::get`] answers.
fn read_detail(conn: &Connection, id: TaskId) -> Result<Option<TaskDetail>> {
    let row: Option<(i64, TaskRecord)> = conn
        .prepare_cached(&format!("SELECT {TASK_COLS}, seq FROM tasks WHERE id = ?1"))
        .and_then(|mut s| {
            s.query_row([id.to_string()], |r| Ok((r.get("seq")?, row_to_task(r)?)))
                .optional()
        })
        .map_err(storage)?;
    let Some((seq, task)) = row else {
        return Ok(None);
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT number, node, pid, started_at, ended_at, exit_code, signal, reason, error,
                    stdout_tail, stderr_tail, memory_peak, cpu_usec
             FROM attempts WHERE task_seq = ?1 ORDER BY n",
        )
        .map_err(storage)?;
    let history = stmt
        .query_map([seq], |r| {
            let reason: Option<String> = r.get(7)?;
            Ok(AttemptRecord {
                number: r.get(0)?,
                node: NodeId::from(r.get::<_, String>(1)?),
                pid: r.get(2)?,
                started_at: r.get(3)?,
                ended_at: r.get(4)?,
                exit_code: r.get(5)?,
                signal: r.get(6)?,
                reason: reason.and_then(|s| s.parse::<AttemptReason>().ok()),
                error: r.get(8)?,
                stdout_tail: r.get(9)?,
                stderr_tail: r.get(10)?,
                memory_peak: r.get::<_, Option<i64>>(11)?.map(|n| n.max(0) as u64),
                cpu_usec: r.get::<_, Option<i64>>(12)?.map(|n| n.max(0) as u64),
                result: None,
            })
        })
        .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(storage)?;
    let result: Option<String> = conn
        .prepare_cached("SELECT value FROM results WHERE task_seq = ?1")
        .and_then(|mut s| s.query_row([seq], |r| r.get(0)).optional())
        .map_err(storage)?;
    let result = crate::broker::stored_result(id, result)?;
    Ok(Some(TaskDetail::new(task, history, result)))
}
