//! The PostgreSQL broker: several daemons share one database (`postgres://`), and an
//! application can enqueue a task inside its own transaction with the SQL function
//! `taskd.enqueue` (docs/postgres.md).
//!
//! Every object lives in the broker's schema (`taskd`, or the URL's `schema=`), created and
//! brought up to date by versioned migrations when a client opens the store (`taskd start`,
//! `taskd migrate`); a database whose schema is newer than this taskd is refused. Each
//! connection's `search_path` is that schema, so the statements here name no schema.
//!
//! Operations run on pooled connections (deadpool), one transaction each. A claim is one
//! round trip in the common case: a plain prepared statement ([`CLAIM_SQL`]: pause check,
//! probes for parked keys and due waiting tasks, `FOR UPDATE SKIP LOCKED`), and a second one,
//! the `claim` SQL function (which also releases parked tasks and promotes due ones), when
//! the probes find either; claims under per-key or rate limits take an advisory lock on
//! their queue instead. A
//! claim's commit waits for its WAL flush (migration 4 says why an unflushed claim was
//! tried and undone), and its lease token is at least the server's clock in µs.
//! Results and starts go through one ordered writer per client (`writer.rs`, rule 6).
//! Wake-ups are `LISTEN`/`NOTIFY` on one channel (`wake.rs`), raised by triggers and by the
//! operations themselves inside their transactions. Times come from the store's clock
//! (`conn::Clock`, rule 9). Leases carry fencing tokens as on SQLite and Redis; any live
//! node reclaims a dead node's expired leases (`recover` with `Recover::Expired`), taking
//! the rows with `SKIP LOCKED`, so there is no leader.
//!
//! One file per concern: `conn.rs` (URL, TLS, pool, errors, clock), `schema.rs` (the
//! migrations), `rows.rs` (row mapping, shared statements), `writer.rs`, `wake.rs`,
//! `flow.rs` (limits in the claim), `schedules.rs` and `retention.rs`; this file holds the
//! broker and its `Broker` operations.

mod conn;
mod flow;
mod retention;
mod rows;
mod schedules;
mod schema;
mod wake;
mod writer;

pub use crate::config::postgres_url::{
    parse_url, Settings, DEFAULT_POOL, DEFAULT_SCHEMA, DEFAULT_STATEMENT_TIMEOUT,
};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;

use self::conn::{pg, pool_error, Clock};
use self::rows::{
    boot_id, exec, history, insert_attempt, insert_plain, insert_task, is_plain, one, opt,
    row_to_claimed, row_to_task, rows, task_seq, PLAIN_CHUNK, TASK_COLS,
};
use self::writer::{Job, Write};
use super::{
    Broker, BrokerError, CancelOutcome, Claimed, Enqueued, Finish, Flow, FlowState, FlowTable,
    Lease, ListFilter, LostLimits, NodeInfo, Orphan, QueueCounts, Queued, Recover, Result, StatRow,
    Wakeups,
};
use crate::audit::{AuditEntry, AuditFilter, AuditRecord};
use crate::model::{
    now_ms, AttemptRecord, NewTask, NodeId, QueueName, TaskDetail, TaskId, TaskRecord, TaskState,
    UnixMs,
};

/// A claim in one plain statement, prepared once per connection: the same work as the
/// `claim` SQL function (schema.rs) when the queue needs none of its first steps, which is
/// the common case, for about half the server's time (a PL/pgSQL call and its statements
/// cost about 1 ms a claim, this statement about 0.6 ms). Three index probes decide:
/// the queue paused (`paused_queues`' key), tasks parked under limits (`parked_keys`' key),
/// or due waiting tasks to promote (`tasks_due`). It answers one row at least, whose first
/// column is `NULL` when the queue is paused (nothing is claimed), `false` when it has parked
/// keys or due waiting tasks (nothing is claimed; the caller calls the function, which
/// releases and promotes them first), and `true` when it claimed: then each claimed task is
/// a row (`seq` and the task's columns), or a single row of `NULL`s for none. The pick and
/// the lease are the function's own: `FOR UPDATE SKIP LOCKED` over `tasks_ready`, a new
/// token at least the server's clock in µs. It needs nothing of the schema that migration 5
/// has not, so daemons of either kind share a database.
pub const CLAIM_SQL: &str = "WITH ok AS (
        SELECT CASE WHEN EXISTS (SELECT 1 FROM paused_queues WHERE queue = $1::text) THEN NULL
                    ELSE NOT EXISTS (SELECT 1 FROM parked_keys WHERE queue = $1::text)
                         AND NOT EXISTS (SELECT 1 FROM tasks
                                          WHERE queue = $1::text AND state IN ('scheduled', 'retrying')
                                            AND blocked = 0 AND run_at <= $4::bigint
                                            AND (expires_at IS NULL OR expires_at > $4::bigint))
               END AS fast),
      picked AS (
        SELECT seq FROM tasks
         WHERE queue = $1::text AND state = 'queued' AND lease_node IS NULL AND parked = 0
           AND (expires_at IS NULL OR expires_at > $4::bigint) AND (SELECT fast FROM ok)
         ORDER BY priority DESC, seq LIMIT $3::bigint
         FOR UPDATE SKIP LOCKED),
      claimed AS (
        UPDATE tasks t SET lease_node = $2::text,
               lease_token = greatest(t.lease_token + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
               lease_expires = $4::bigint + $5::bigint, updated_at = $4::bigint, pid = NULL, pid_start = NULL
          FROM picked WHERE t.seq = picked.seq
        RETURNING t.*)
    SELECT ok.fast, claimed.* FROM ok LEFT JOIN claimed ON true";

/// A node not heard from for this long is no longer listed.
const NODE_FORGET_MS: i64 = 3_600_000;

/// The longest [`Broker::warm`] may take: past it the daemon starts without the rest (a
/// connection not opened yet opens on first use, as it would have without warming).
const WARM_TIMEOUT: Duration = Duration::from_secs(5);

/// Most expired leases one recovery transaction takes back (see `recover_limited`).
const RECOVER_BATCH: i64 = 256;

/// The PostgreSQL backend. Cheap to share behind an `Arc`.
pub struct PgBroker {
    settings: Settings,
    pool: deadpool_postgres::Pool,
    writes: mpsc::UnboundedSender<Job>,
    clock: Arc<Clock>,
    flow: FlowTable,
}

/// What `taskd migrate` did: the schema's version before and after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migrated {
    pub before: i64,
    pub after: i64,
}

impl PgBroker {
    /// Connect to the database `url` names, bring its schema up to date and start the
    /// ordered writer.
    pub async fn open(url: &str) -> Result<Self> {
        let settings = parse_url(url).map_err(BrokerError::Unavailable)?;
        let clock = Arc::new(Clock::default());
        let pool = conn::pool(&settings)?;
        {
            // The pool's first connection, kept for the operation that follows: a CLI call
            // (`taskd submit`, `taskd status`) then opens one connection, not two (each is
            // a new server process).
            let mut client = pool.get().await.map_err(|e| match e {
                deadpool_postgres::PoolError::Backend(e) => {
                    conn::unreachable_at(&settings.addr, &e)
                }
                other => pool_error(&settings.addr, other),
            })?;
            clock.sync(&client).await?;
            let have = schema::version(&client, &settings.schema).await?;
            if have != schema::newest() {
                schema::migrate(&mut client, &settings.schema, &settings.addr).await?;
            }
        }
        let writes = writer::start(pool.clone(), settings.addr.clone(), clock.clone());
        Ok(PgBroker {
            settings,
            pool,
            writes,
            clock,
            flow: FlowTable::default(),
        })
    }

    /// Apply the migrations `url`'s schema lacks (`taskd migrate`); a re-run changes nothing.
    pub async fn migrate(url: &str) -> Result<Migrated> {
        let settings = parse_url(url).map_err(BrokerError::Unavailable)?;
        let mut client = conn::connect(&settings).await?;
        let (before, after) =
            schema::migrate(&mut client, &settings.schema, &settings.addr).await?;
        Ok(Migrated { before, after })
    }

    /// The schema version this taskd brings a database to.
    pub fn schema_version() -> i64 {
        schema::newest()
    }

    /// `host:port/database`, for messages.
    pub fn addr(&self) -> &str {
        &self.settings.addr
    }

    /// Open the whole pool, side by side, and on each connection prepare the statements
    /// every task goes through and run them once over nothing: the claim (at most 0 tasks)
    /// and the writer's start and finish (no rows). A new connection is a new server
    /// process, and its first run of a statement pays the preparation and the catalog reads
    /// of the first plan (several ms for the claim). The whole pool, not only the
    /// connections the claims and the writer need: the daemon's own start (heartbeat,
    /// expired leases, schedules, statistics, the audit trail) opens most of it anyway (6 of
    /// the default 8 at `ready` on an idle daemon of one queue), and the pool hands its
    /// connections out in turn, so a claim soon meets any connection left cold.
    async fn warm_pool(&self) -> Result<usize> {
        let wanted = self.settings.pool_size.max(1);
        // All taken before any is given back, so that the pool opens `wanted` of them.
        let clients =
            futures_util::future::try_join_all((0..wanted).map(|_| self.client())).await?;
        futures_util::future::try_join_all(clients.iter().map(|c| self.warm_one(c))).await?;
        Ok(clients.len())
    }

    /// Prepare and run the hot statements once on `client`, claiming and changing nothing.
    async fn warm_one(&self, client: &deadpool_postgres::Object) -> Result<()> {
        let now = self.now();
        writer::warm(client, now).await?;
        let none: i64 = 0;
        rows(client, CLAIM_SQL, &[&"", &"", &none, &now, &none]).await?;
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| pool_error(&self.settings.addr, e))
    }

    fn now(&self) -> UnixMs {
        self.clock.now()
    }

    /// Raise wake-up `what` in every subscribed daemon when `tx` commits.
    async fn notify<C: deadpool_postgres::GenericClient>(&self, tx: &C, what: &str) -> Result<()> {
        exec(
            tx,
            "SELECT pg_notify($1, $2)",
            &[&self.settings.schema, &what],
        )
        .await?;
        Ok(())
    }

    async fn claim_flow(
        &self,
        node: &NodeId,
        queue: &QueueName,
        max: usize,
        lease_ms: i64,
        limits: Flow,
    ) -> Result<Vec<Claimed>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let now = self.now();
        let paused: bool = one(
            &tx,
            "SELECT EXISTS (SELECT 1 FROM paused_queues WHERE queue = $1)",
            &[&queue.as_str()],
        )
        .await?
        .get(0);
        if paused {
            return Ok(Vec::new());
        }
        exec(
            &tx,
            "UPDATE tasks SET state = 'queued', updated_at = $2
             WHERE seq IN (SELECT seq FROM tasks
                            WHERE queue = $1 AND state IN ('scheduled', 'retrying') AND blocked = 0
                              AND run_at <= $2 AND (expires_at IS NULL OR expires_at > $2)
                            FOR UPDATE SKIP LOCKED)",
            &[&queue.as_str(), &now],
        )
        .await?;
        let (claimed, wait) = flow::claim(&tx, node, queue, max, now, lease_ms, limits).await?;
        tx.commit().await.map_err(pg)?;
        self.flow.set_wait(queue, wait);
        Ok(claimed)
    }

    /// One batch of [`Broker::recover_limited`]: at most [`RECOVER_BATCH`] tasks.
    async fn recover_batch(
        &self,
        scope: Recover,
        note: &str,
        limits: &LostLimits,
    ) -> Result<Vec<Orphan>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let now = self.now();
        // `Expired` is read in this process's clock: the same instant in the store's.
        let bound = match scope {
            Recover::All => i64::MAX,
            Recover::Expired(t) => t.saturating_add(now - now_ms()),
        };
        // A pid recorded on another boot (or machine) is not returned: it could name an
        // unrelated process group now. Rows another node is recovering are skipped.
        let found = rows(
            &tx,
            "SELECT seq, id, queue, lease_node,
                    CASE WHEN pid_boot = $2 THEN pid END, CASE WHEN pid_boot = $2 THEN pid_start END,
                    started_at, attempts, cancel_requested, state
             FROM tasks WHERE lease_node IS NOT NULL AND lease_expires < $1
               AND state IN ('queued', 'running')
             LIMIT $3 FOR UPDATE SKIP LOCKED",
            &[&bound, &boot_id(), &RECOVER_BATCH],
        )
        .await?;
        let mut orphans = Vec::with_capacity(found.len());
        for r in &found {
            let seq: i64 = r.get(0);
            let id: String = r.get(1);
            let queue: String = r.get(2);
            let node: Option<NodeId> = r.get::<_, Option<String>>(3).map(NodeId::from);
            let pid: Option<i32> = r.get(4);
            let pid_start: Option<i64> = r.get(5);
            let started_at: Option<i64> = r.get(6);
            let attempts: i32 = r.get(7);
            let cancel_requested: bool = r.get(8);
            let started = r.get::<_, String>(9) == "running";
            if started {
                let attempt = AttemptRecord::lost(
                    attempts.max(0) as u32,
                    node.clone().unwrap_or_default(),
                    pid,
                    started_at.unwrap_or(now),
                    now,
                    note.to_string(),
                );
                insert_attempt(&tx, seq, &attempt).await?;
            }
            let queue: QueueName = queue.parse().map_err(BrokerError::Storage)?;
            let max_lost = limits.of(&queue);
            let lost: u32 = if started && !cancel_requested {
                let n: i64 = one(
                    &tx,
                    "SELECT count(*) FROM attempts WHERE task_seq = $1 AND reason = 'lost'",
                    &[&seq],
                )
                .await?
                .get(0);
                n.max(0) as u32
            } else {
                0
            };
            let failed = lost > max_lost;
            let back = i32::from(started);
            if failed {
                exec(
                    &tx,
                    "UPDATE tasks SET state = 'failed', finished_at = $2, updated_at = $2,
                        last_error = $3, attempts = greatest(attempts - 1, 0),
                        lease_node = NULL, lease_expires = NULL, pid = NULL, pid_start = NULL
                     WHERE seq = $1",
                    &[&seq, &now, &super::lost_too_often(lost, max_lost)],
                )
                .await?;
            } else if cancel_requested {
                exec(
                    &tx,
                    "UPDATE tasks SET state = 'cancelled', finished_at = $2, updated_at = $2,
                        last_error = 'cancelled by an operator', cancel_requested = false,
                        attempts = greatest(attempts - $3, 0),
                        lease_node = NULL, lease_expires = NULL, pid = NULL, pid_start = NULL
                     WHERE seq = $1",
                    &[&seq, &now, &back],
                )
                .await?;
            } else {
                exec(
                    &tx,
                    "UPDATE tasks SET state = 'queued', attempts = greatest(attempts - $3, 0), updated_at = $2,
                        lease_node = NULL, lease_expires = NULL, pid = NULL, pid_start = NULL
                     WHERE seq = $1",
                    &[&seq, &now, &back],
                )
                .await?;
            }
            orphans.push(Orphan {
                task: id.parse().map_err(BrokerError::Storage)?,
                queue,
                node,
                pid,
                pid_start: pid_start.map(|p| p as u64),
                failed,
            });
        }
        tx.commit().await.map_err(pg)?;
        Ok(orphans)
    }
}

#[async_trait]
impl Broker for PgBroker {
    async fn enqueue(&self, tasks: Vec<NewTask>) -> Result<Vec<Enqueued>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let now = self.now();
        // Runs of plain tasks go in one statement each (a round trip per row was most of a
        // batch's time); a task with a unique key or parents takes its own statements, after
        // the tasks before it are stored, so that it sees them (a parent or a key holder
        // earlier in the batch).
        let mut out = Vec::with_capacity(tasks.len());
        let mut plain: Vec<&NewTask> = Vec::new();
        for t in &tasks {
            if is_plain(t) {
                plain.push(t);
                if plain.len() == PLAIN_CHUNK {
                    out.extend(insert_plain(&tx, &plain, now).await?);
                    plain.clear();
                }
                continue;
            }
            if !plain.is_empty() {
                out.extend(insert_plain(&tx, &plain, now).await?);
                plain.clear();
            }
            out.push(insert_task(&tx, t, now).await?);
        }
        if !plain.is_empty() {
            out.extend(insert_plain(&tx, &plain, now).await?);
        }
        tx.commit().await.map_err(pg)?;
        Ok(out)
    }

    async fn claim(
        &self,
        node: &NodeId,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let lease_ms = lease.as_millis() as i64;
        let limits = self.flow.get(queue);
        if !limits.is_none() {
            return self.claim_flow(node, queue, max, lease_ms, limits).await;
        }
        let c = self.client().await?;
        let now = self.now();
        let max = max.min(i32::MAX as usize);
        let fast = rows(
            &c,
            CLAIM_SQL,
            &[
                &queue.as_str(),
                &node.as_str(),
                &(max as i64),
                &now,
                &lease_ms,
            ],
        )
        .await?;
        // The statement answers one row at least: its first column says whether it applied
        // (`NULL`: the queue is paused, nothing to claim; `false`: the queue has parked keys
        // or due waiting tasks, which the `claim` function handles).
        let applied: Option<bool> = fast.first().and_then(|r| r.get(0));
        let found = match applied {
            None => return Ok(Vec::new()),
            Some(true) => fast,
            Some(false) => {
                rows(
                    &c,
                    "SELECT * FROM claim($1, $2, $3, $4, $5)",
                    &[
                        &queue.as_str(),
                        &node.as_str(),
                        &(max as i32),
                        &now,
                        &lease_ms,
                    ],
                )
                .await?
            }
        };
        let mut claimed = found
            .iter()
            .filter(|r| r.get::<_, Option<i64>>("seq").is_some())
            .map(|r| row_to_claimed(r, node))
            .collect::<Result<Vec<_>>>()?;
        claimed.sort_by_key(|(seq, c)| (-c.task.priority, *seq));
        Ok(claimed.into_iter().map(|(_, c)| c).collect())
    }

    fn set_flow(&self, queue: &QueueName, flow: Flow) {
        self.flow.set(queue, flow);
    }

    async fn warm(&self) -> Result<()> {
        let begun = std::time::Instant::now();
        match tokio::time::timeout(WARM_TIMEOUT, self.warm_pool()).await {
            Ok(Ok(opened)) => {
                tracing::debug!(
                    connections = opened,
                    took_ms = begun.elapsed().as_millis() as u64,
                    "PostgreSQL pool warmed"
                );
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BrokerError::Unavailable(format!(
                "warming the connection pool took longer than {}",
                humantime::format_duration(WARM_TIMEOUT)
            ))),
        }
    }

    fn flow_wait(&self, queue: &QueueName) -> Option<UnixMs> {
        self.flow.wait(queue)
    }

    async fn flow_state(&self, queue: &QueueName, id: TaskId) -> Result<FlowState> {
        let keyed = self.flow.get(queue).rate.is_some_and(|r| r.keyed);
        let c = self.client().await?;
        flow::state(&c, queue, id, keyed).await
    }

    async fn started(&self, lease: &Lease, pid: i32, pid_start: u64) -> Result<()> {
        let (answer, rx) = oneshot::channel();
        let job = Job {
            write: Write::Started {
                lease: lease.clone(),
                pid,
                pid_start,
            },
            answer,
        };
        self.writes
            .send(job)
            .map_err(|_| BrokerError::Unavailable("the broker's writer has stopped".into()))?;
        rx.await
            .map_err(|_| BrokerError::Unavailable("the broker's writer has stopped".into()))?
    }

    async fn renew(&self, leases: &[Lease], lease: Duration) -> Result<Vec<TaskId>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let until = self.now() + lease.as_millis() as i64;
        let ids: Vec<String> = leases.iter().map(|l| l.task.to_string()).collect();
        let tokens: Vec<i64> = leases.iter().map(|l| l.token).collect();
        let nodes: Vec<String> = leases.iter().map(|l| l.node.to_string()).collect();
        let c = self.client().await?;
        // Rows another transaction holds are skipped, not waited for: this node's own writer
        // holds the rows of the results it is storing (a batch of hundreds after an outage),
        // and a renewal that waited on them let every other lease of the node run out
        // meanwhile (three nodes under load took each other's tasks back by the hundred).
        // A skipped row is neither kept nor lost this round: its finish is being stored, or
        // another node is taking it back, which the next renewal reports. A row that is gone
        // is lost.
        let found = rows(
            &c,
            "WITH l AS (SELECT * FROM unnest($2::text[], $3::bigint[], $4::text[]) AS l(id, token, node)),
                  locked AS (SELECT t.seq, t.id FROM tasks t WHERE t.id IN (SELECT id FROM l)
                             FOR UPDATE SKIP LOCKED),
                  kept AS (UPDATE tasks t SET lease_expires = $1
                             FROM l, locked
                            WHERE t.seq = locked.seq AND l.id = locked.id
                              AND t.lease_token = l.token AND t.lease_node = l.node
                              AND t.state IN ('queued', 'running')
                           RETURNING t.id, t.lease_token)
             SELECT id, lease_token, true FROM kept
             UNION ALL SELECT id, NULL, false FROM locked
             UNION ALL SELECT id, NULL, false FROM l
                        WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = l.id)",
            &[&until, &ids, &tokens, &nodes],
        )
        .await?;
        // By id and token: a stale lease of a task this node holds again under a newer token
        // is lost, though the task's id is among those kept.
        let mut kept: BTreeSet<(String, i64)> = BTreeSet::new();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for r in &found {
            let id: String = r.get(0);
            if r.get::<_, bool>(2) {
                kept.insert((id, r.get(1)));
            } else {
                seen.insert(id);
            }
        }
        Ok(leases
            .iter()
            .filter(|l| {
                let id = l.task.to_string();
                seen.contains(&id) && !kept.contains(&(id, l.token))
            })
            .map(|l| l.task)
            .collect())
    }

    fn finish<'a>(
        &'a self,
        lease: &'a Lease,
        attempt: AttemptRecord,
        next: Finish,
    ) -> Queued<'a, ()> {
        // Serialized here; only a success keeps it (rule 12).
        let result = match next {
            Finish::Succeeded => attempt.result.as_ref().map(|v| v.to_string()),
            _ => None,
        };
        let (answer, rx) = oneshot::channel();
        let job = Job {
            write: Write::Finish {
                lease: lease.clone(),
                attempt: Box::new(attempt),
                next,
                result,
            },
            answer,
        };
        let sent = self.writes.send(job);
        Queued::new(async move {
            sent.map_err(|_| BrokerError::Unavailable("the broker's writer has stopped".into()))?;
            rx.await
                .map_err(|_| BrokerError::Unavailable("the broker's writer has stopped".into()))?
        })
    }

    async fn note_run(&self, id: TaskId, attempt: AttemptRecord) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let (seq, _) = task_seq(&tx, id).await?;
        insert_attempt(&tx, seq, &attempt).await?;
        tx.commit().await.map_err(pg)
    }

    async fn cancel(&self, id: TaskId) -> Result<CancelOutcome> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let row = opt(
            &tx,
            "SELECT seq, state, lease_node IS NOT NULL FROM tasks WHERE id = $1 FOR UPDATE",
            &[&id.to_string()],
        )
        .await?
        .ok_or(BrokerError::NotFound(id))?;
        let seq: i64 = row.get(0);
        let state: TaskState = row
            .get::<_, String>(1)
            .parse()
            .map_err(BrokerError::Storage)?;
        let held: bool = row.get(2);
        let now = self.now();
        let out = match state {
            TaskState::Running | TaskState::Queued if state == TaskState::Running || held => {
                exec(
                    &tx,
                    "UPDATE tasks SET cancel_requested = true, updated_at = $2 WHERE seq = $1",
                    &[&seq, &now],
                )
                .await?;
                CancelOutcome::Requested
            }
            s if s.is_terminal() => CancelOutcome::AlreadyFinished(s),
            _ => {
                exec(
                    &tx,
                    "UPDATE tasks SET state = 'cancelled', finished_at = $2, updated_at = $2,
                        last_error = 'cancelled before it ran', parked = 0 WHERE seq = $1",
                    &[&seq, &now],
                )
                .await?;
                CancelOutcome::Cancelled
            }
        };
        tx.commit().await.map_err(pg)?;
        Ok(out)
    }

    async fn retry(&self, id: TaskId) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let row = opt(
            &tx,
            "SELECT seq, state FROM tasks WHERE id = $1 FOR UPDATE",
            &[&id.to_string()],
        )
        .await?
        .ok_or(BrokerError::NotFound(id))?;
        let seq: i64 = row.get(0);
        let state: TaskState = row
            .get::<_, String>(1)
            .parse()
            .map_err(BrokerError::Storage)?;
        if !matches!(state, TaskState::Failed | TaskState::Cancelled) {
            return Err(BrokerError::Conflict(format!(
                "task {id} is {state}; only failed or cancelled tasks can be retried"
            )));
        }
        let now = self.now();
        let st = tx
            .prepare_cached(
                "UPDATE tasks SET state = 'queued', attempts = 0, run_at = $2, finished_at = NULL,
                    last_error = NULL, cancel_requested = false, parked = 0, updated_at = $2 WHERE seq = $1",
            )
            .await
            .map_err(pg)?;
        tx.execute(&st, &[&seq, &now]).await.map_err(|e| {
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                BrokerError::Conflict(format!(
                    "another waiting or running task of this queue holds task {id}'s unique key"
                ))
            } else {
                pg(e)
            }
        })?;
        tx.commit().await.map_err(pg)
    }

    async fn set_paused(&self, queue: &QueueName, paused: bool) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        if paused {
            exec(
                &tx,
                "INSERT INTO paused_queues (queue, paused_at) VALUES ($1, $2) ON CONFLICT (queue) DO NOTHING",
                &[&queue.as_str(), &self.now()],
            )
            .await?;
        } else {
            exec(
                &tx,
                "DELETE FROM paused_queues WHERE queue = $1",
                &[&queue.as_str()],
            )
            .await?;
        }
        self.notify(&tx, "pause").await?;
        tx.commit().await.map_err(pg)
    }

    async fn paused(&self) -> Result<BTreeSet<QueueName>> {
        let c = self.client().await?;
        let found = rows(&c, "SELECT queue FROM paused_queues", &[]).await?;
        Ok(found
            .iter()
            .filter_map(|r| r.get::<_, String>(0).parse().ok())
            .collect())
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskDetail>> {
        let mut c = self.client().await?;
        // One snapshot for the task, its history and its result.
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let Some(row) = opt(
            &tx,
            &format!("SELECT {TASK_COLS} FROM tasks WHERE id = $1"),
            &[&id.to_string()],
        )
        .await?
        else {
            return Ok(None);
        };
        let seq: i64 = row.get("seq");
        let task = row_to_task(&row)?;
        let attempts = history(&tx, seq).await?;
        let result: Option<String> = opt(
            &tx,
            "SELECT value FROM results WHERE task_seq = $1",
            &[&seq],
        )
        .await?
        .map(|r| r.get(0));
        tx.commit().await.map_err(pg)?;
        let result = crate::broker::stored_result(id, result)?;
        Ok(Some(TaskDetail::new(task, attempts, result)))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>> {
        let c = self.client().await?;
        let mut sql = format!("SELECT {TASK_COLS} FROM tasks WHERE true");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut cond = |part: &str, v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            sql.push_str(&format!(" AND {part} ${}", args.len()));
        };
        if let Some(q) = &filter.queue {
            cond("queue =", Box::new(q.as_str().to_string()));
        }
        if let Some(st) = filter.state {
            cond("state =", Box::new(st.as_str().to_string()));
        }
        if let Some(t) = filter.since {
            cond("created_at >=", Box::new(t));
        }
        if let Some(t) = filter.until {
            cond("created_at <", Box::new(t));
        }
        if let Some(id) = filter.id {
            cond("id =", Box::new(id.to_string()));
        }
        if let Some(k) = &filter.unique_key {
            cond("unique_key =", Box::new(k.clone()));
        }
        if let Some(after) = filter.after {
            let seq = task_seq(&c, after).await?.0;
            cond("seq <", Box::new(seq));
        }
        if let Some(p) = &filter.payload {
            // Only payloads that contain the field's key are parsed.
            args.push(Box::new(p.needle()));
            sql.push_str(&format!(" AND strpos(payload, ${}) > 0", args.len()));
        }
        sql.push_str(" ORDER BY seq DESC");
        if filter.payload.is_none() && filter.limit > 0 {
            sql.push_str(&format!(" LIMIT {}", filter.limit));
        }
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|b| &**b as _).collect();
        let found = rows(&c, &sql, &params).await?;
        let limit = if filter.limit == 0 {
            usize::MAX
        } else {
            filter.limit
        };
        let mut out = Vec::new();
        for r in &found {
            if out.len() >= limit {
                break;
            }
            let t = row_to_task(r)?;
            if filter.matches(&t) {
                out.push(t);
            }
        }
        Ok(out)
    }

    async fn add_stats(&self, stat_rows: &[StatRow]) -> Result<()> {
        if stat_rows.is_empty() {
            return Ok(());
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for r in stat_rows {
            exec(
                &tx,
                "INSERT INTO stats (minute, queue, succeeded, failed, retried, cancelled, runs, run_ms_sum, run_ms_max, wait_ms_sum)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (minute, queue) DO UPDATE SET
                   succeeded = stats.succeeded + excluded.succeeded, failed = stats.failed + excluded.failed,
                   retried = stats.retried + excluded.retried, cancelled = stats.cancelled + excluded.cancelled,
                   runs = stats.runs + excluded.runs, run_ms_sum = stats.run_ms_sum + excluded.run_ms_sum,
                   run_ms_max = greatest(stats.run_ms_max, excluded.run_ms_max),
                   wait_ms_sum = stats.wait_ms_sum + excluded.wait_ms_sum",
                &[
                    &r.minute,
                    &r.queue.as_str(),
                    &n(r.succeeded),
                    &n(r.failed),
                    &n(r.retried),
                    &n(r.cancelled),
                    &n(r.runs),
                    &n(r.run_ms_sum),
                    &n(r.run_ms_max),
                    &n(r.wait_ms_sum),
                ],
            )
            .await?;
        }
        exec(
            &tx,
            "DELETE FROM stats WHERE minute < $1",
            &[&((self.now() - crate::broker::STATS_KEEP_MS) / 60_000)],
        )
        .await?;
        tx.commit().await.map_err(pg)
    }

    async fn stats(&self, since: UnixMs) -> Result<Vec<StatRow>> {
        let c = self.client().await?;
        let found = rows(
            &c,
            "SELECT minute, queue, succeeded, failed, retried, cancelled, runs, run_ms_sum, run_ms_max, wait_ms_sum
               FROM stats WHERE minute >= $1",
            &[&since.div_euclid(60_000)],
        )
        .await?;
        Ok(found
            .iter()
            .filter_map(|r| {
                let u = |i: usize| r.get::<_, i64>(i).max(0) as u64;
                Some(StatRow {
                    queue: r.get::<_, String>(1).parse().ok()?,
                    minute: r.get(0),
                    succeeded: u(2),
                    failed: u(3),
                    retried: u(4),
                    cancelled: u(5),
                    runs: u(6),
                    run_ms_sum: u(7),
                    run_ms_max: u(8),
                    wait_ms_sum: u(9),
                })
            })
            .collect())
    }

    async fn counts(&self) -> Result<Vec<QueueCounts>> {
        let c = self.client().await?;
        let mut by_queue: BTreeMap<String, QueueCounts> = BTreeMap::new();
        let found = rows(
            &c,
            "SELECT queue, state, count(*) FROM tasks GROUP BY state, queue",
            &[],
        )
        .await?;
        for r in &found {
            let q: String = r.get(0);
            let s: String = r.get(1);
            let n: i64 = r.get(2);
            let entry = by_queue.entry(q.clone()).or_insert_with(|| QueueCounts {
                queue: q.parse().ok(),
                ..Default::default()
            });
            if let Ok(state) = s.parse::<TaskState>() {
                entry.counts.insert(state, n as u64);
            }
        }
        for r in rows(&c, "SELECT queue FROM paused_queues", &[]).await? {
            let q: String = r.get(0);
            by_queue
                .entry(q.clone())
                .or_insert_with(|| QueueCounts {
                    queue: q.parse().ok(),
                    ..Default::default()
                })
                .paused = true;
        }
        Ok(by_queue.into_values().collect())
    }

    async fn next_due(&self) -> Result<Option<UnixMs>> {
        let c = self.client().await?;
        let at = opt(
            &c,
            "SELECT run_at FROM tasks WHERE state IN ('scheduled', 'retrying') AND blocked = 0
               AND queue NOT IN (SELECT queue FROM paused_queues) ORDER BY run_at LIMIT 1",
            &[],
        )
        .await?
        .map(|r| r.get::<_, i64>(0));
        Ok(at)
    }

    async fn count_state(&self, state: TaskState) -> Result<u64> {
        let c = self.client().await?;
        let n: i64 = one(
            &c,
            "SELECT count(*) FROM tasks WHERE state = $1",
            &[&state.as_str()],
        )
        .await?
        .get(0);
        Ok(n as u64)
    }

    async fn cancel_requested(&self, node: &NodeId) -> Result<Vec<TaskId>> {
        let c = self.client().await?;
        let found = rows(
            &c,
            "SELECT id FROM tasks WHERE cancel_requested AND lease_node = $1",
            &[&node.as_str()],
        )
        .await?;
        Ok(found
            .iter()
            .filter_map(|r| r.get::<_, String>(0).parse().ok())
            .collect())
    }

    async fn adopt_started(&self, ids: &[TaskId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let c = self.client().await?;
        exec(
            &c,
            "UPDATE tasks SET state = 'running', attempts = attempts + 1, started_at = $2, updated_at = $2
             WHERE id = ANY($1) AND state = 'queued' AND lease_node IS NOT NULL",
            &[&ids, &self.now()],
        )
        .await
    }

    async fn recover_limited(
        &self,
        scope: Recover,
        note: &str,
        limits: &LostLimits,
    ) -> Result<Vec<Orphan>> {
        // In batches, each its own transaction: a transaction taking back a dead node's
        // thousands of tasks held their rows (and the live writers and renewals that
        // touched them) for seconds under load.
        let mut all = Vec::new();
        loop {
            let batch = self.recover_batch(scope.clone(), note, limits).await?;
            let more = batch.len() as i64 == RECOVER_BATCH;
            all.extend(batch);
            if !more {
                return Ok(all);
            }
        }
    }

    async fn expire(&self) -> Result<Vec<(TaskId, QueueName)>> {
        let c = self.client().await?;
        let found = rows(
            &c,
            "UPDATE tasks SET state = 'cancelled', last_error = 'expired', finished_at = $1, updated_at = $1
             WHERE seq IN (SELECT seq FROM tasks
                            WHERE expires_at <= $1 AND expires_at IS NOT NULL
                              AND state IN ('scheduled', 'queued', 'retrying') AND lease_node IS NULL
                            LIMIT 10000 FOR UPDATE SKIP LOCKED)
             RETURNING id, queue",
            &[&self.now()],
        )
        .await?;
        found
            .iter()
            .map(|r| {
                Ok((
                    r.get::<_, String>(0)
                        .parse()
                        .map_err(BrokerError::Storage)?,
                    r.get::<_, String>(1)
                        .parse()
                        .map_err(BrokerError::Storage)?,
                ))
            })
            .collect()
    }

    async fn subscribe(&self) -> Result<Wakeups> {
        wake::subscribe(self.settings.clone()).await
    }

    async fn audit(&self, entry: &AuditEntry, keep: usize) -> Result<()> {
        let record =
            serde_json::to_string(entry).map_err(|e| BrokerError::Storage(e.to_string()))?;
        let task = entry.task.map(|t| t.to_string());
        let queue = entry.queue.as_ref().map(|q| q.as_str().to_string());
        let keep = keep.max(1) as i64;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        // One writer at a time: ids follow each other without gaps, in commit order.
        exec(
            &tx,
            "SELECT pg_advisory_xact_lock(hashtextextended('taskd audit', 0))",
            &[],
        )
        .await?;
        let seq: i64 = one(
            &tx,
            "INSERT INTO audit (seq, at, action, task, queue, outcome, record)
             VALUES ((SELECT coalesce(max(seq), 0) + 1 FROM audit), $1, $2, $3, $4, $5, $6)
             RETURNING seq",
            &[
                &self.now(),
                &entry.action.as_str(),
                &task,
                &queue,
                &entry.outcome.as_str(),
                &record,
            ],
        )
        .await?
        .get(0);
        exec(&tx, "DELETE FROM audit WHERE seq <= $1", &[&(seq - keep)]).await?;
        tx.commit().await.map_err(pg)
    }

    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let before: Option<i64> = match &filter.before {
            Some(b) => Some(b.parse().map_err(|_| {
                BrokerError::Conflict(format!("`{b}` is not an audit record id of this store"))
            })?),
            None => None,
        };
        let limit: Option<i64> = (filter.limit > 0).then_some(rows::sql_limit(filter.limit));
        let c = self.client().await?;
        let found = rows(
            &c,
            "SELECT seq, at, record FROM audit
             WHERE ($1::bigint IS NULL OR at >= $1) AND ($2::bigint IS NULL OR seq < $2)
             ORDER BY seq DESC LIMIT $3",
            &[&filter.since, &before, &limit],
        )
        .await?;
        found
            .iter()
            .map(|r| {
                let seq: i64 = r.get(0);
                let record: String = r.get(2);
                let entry = serde_json::from_str(&record).map_err(|e| {
                    BrokerError::Storage(format!("audit record {seq} cannot be read: {e}"))
                })?;
                Ok(AuditRecord {
                    id: seq.to_string(),
                    at: r.get(1),
                    entry,
                })
            })
            .collect()
    }

    fn shared(&self) -> bool {
        true
    }

    async fn heartbeat(&self, node: &NodeInfo) -> Result<()> {
        let mut record =
            serde_json::to_value(node).map_err(|e| BrokerError::Storage(e.to_string()))?;
        if let Some(m) = record.as_object_mut() {
            m.remove("last_heartbeat");
        }
        let c = self.client().await?;
        // A chance to follow the server's clock if either clock was stepped.
        let _ = self.clock.sync(&c).await;
        exec(
            &c,
            "INSERT INTO nodes (id, record, last_heartbeat) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET record = excluded.record, last_heartbeat = excluded.last_heartbeat",
            &[&node.id.as_str(), &record.to_string(), &self.now()],
        )
        .await?;
        Ok(())
    }

    async fn leave(&self, node: &NodeId) -> Result<()> {
        let c = self.client().await?;
        exec(&c, "DELETE FROM nodes WHERE id = $1", &[&node.as_str()]).await?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        let c = self.client().await?;
        let found = rows(
            &c,
            "SELECT record, last_heartbeat FROM nodes WHERE last_heartbeat > $1 ORDER BY id",
            &[&(self.now() - NODE_FORGET_MS)],
        )
        .await?;
        Ok(found
            .iter()
            .filter_map(|r| {
                let mut n: NodeInfo = serde_json::from_str(&r.get::<_, String>(0)).ok()?;
                n.last_heartbeat = r.get(1);
                Some(n)
            })
            .collect())
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
        let c = self.client().await?;
        flow::prune(&c, queue, now_us, limit).await
    }

    async fn store_size(&self) -> Result<Option<super::StoreSize>> {
        self.store_size_in().await
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        let c = self.client().await?;
        let mut out = Vec::new();
        let fsync: String = one(&c, "SELECT current_setting('fsync')", &[])
            .await?
            .get(0);
        if fsync == "off" {
            out.push(format!(
                "the PostgreSQL server at {} runs with fsync = off: a crash of its machine can lose acknowledged tasks or corrupt the database; set `fsync = on`",
                self.settings.addr
            ));
        }
        let sync: String = one(&c, "SELECT current_setting('synchronous_commit')", &[])
            .await?
            .get(0);
        if sync == "off" {
            out.push(format!(
                "the PostgreSQL server at {} runs with synchronous_commit = off: a crash can lose the last acknowledged tasks; set it to `on`",
                self.settings.addr
            ));
        }
        Ok(out)
    }
}
