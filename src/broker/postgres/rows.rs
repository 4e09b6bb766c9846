//! Rows: the columns a task is read with and their mapping to a [`TaskRecord`], the
//! statements several operations share (inserting a task or an attempt, finding a task's
//! row) and small helpers over prepared, cached statements. Each
//! runs on the connection or transaction it is given.

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::conn::pg;
use crate::broker::{BrokerError, Enqueued, Lease, Result};
use crate::model::{
    AttemptReason, AttemptRecord, NewTask, NodeId, TaskId, TaskRecord, TaskState, UnixMs,
};

pub(super) type P<'a> = &'a (dyn ToSql + Sync);

pub(super) async fn rows<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &[P<'_>],
) -> Result<Vec<Row>> {
    let st = client.prepare_cached(sql).await.map_err(pg)?;
    client.query(&st, params).await.map_err(pg)
}

pub(super) async fn opt<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &[P<'_>],
) -> Result<Option<Row>> {
    let st = client.prepare_cached(sql).await.map_err(pg)?;
    client.query_opt(&st, params).await.map_err(pg)
}

pub(super) async fn one<C: GenericClient>(client: &C, sql: &str, params: &[P<'_>]) -> Result<Row> {
    let st = client.prepare_cached(sql).await.map_err(pg)?;
    client.query_one(&st, params).await.map_err(pg)
}

pub(super) async fn exec<C: GenericClient>(client: &C, sql: &str, params: &[P<'_>]) -> Result<u64> {
    let st = client.prepare_cached(sql).await.map_err(pg)?;
    client.execute(&st, params).await.map_err(pg)
}

/// A count for SQL's `LIMIT`: callers say "no limit" with `usize::MAX`, which `as i64`
/// would turn into -1 (refused by PostgreSQL: "LIMIT must not be negative").
pub(super) fn sql_limit(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// This machine's boot id (`/proc/sys/kernel/random/boot_id`), stored with every recorded pid.
pub(super) fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// The columns [`row_to_task`] reads.
pub(super) const TASK_COLS: &str =
    "seq, id, queue, state, payload, args, priority, unique_key, run_at, attempts, \
     created_at, updated_at, finished_at, last_error, cancel_requested, lease_node, lease_token, \
     schedule, slot, after_ids, expires_at";

fn conv(what: &str, error: impl std::fmt::Display) -> BrokerError {
    BrokerError::Storage(format!("a stored task's {what} cannot be read: {error}"))
}

pub(super) fn row_to_task(row: &Row) -> Result<TaskRecord> {
    let get = |e: tokio_postgres::Error| BrokerError::Storage(format!("a task row: {e}"));
    let id: String = row.try_get("id").map_err(get)?;
    let queue: String = row.try_get("queue").map_err(get)?;
    let state: String = row.try_get("state").map_err(get)?;
    let payload: String = row.try_get("payload").map_err(get)?;
    let args: String = row.try_get("args").map_err(get)?;
    let (payload, payload_b64) =
        crate::model::read_stored_payload(&payload).map_err(|e| conv("payload", e))?;
    let after: Option<String> = row.try_get("after_ids").map_err(get)?;
    Ok(TaskRecord {
        id: id.parse().map_err(|e| conv("id", e))?,
        queue: queue.parse().map_err(|e| conv("queue", e))?,
        state: state.parse().map_err(|e| conv("state", e))?,
        payload,
        payload_b64,
        args: serde_json::from_str(&args).map_err(|e| conv("args", e))?,
        priority: row.try_get("priority").map_err(get)?,
        unique_key: row.try_get("unique_key").map_err(get)?,
        run_at: row.try_get("run_at").map_err(get)?,
        attempts: row.try_get::<_, i32>("attempts").map_err(get)?.max(0) as u32,
        created_at: row.try_get("created_at").map_err(get)?,
        updated_at: row.try_get("updated_at").map_err(get)?,
        finished_at: row.try_get("finished_at").map_err(get)?,
        last_error: row.try_get("last_error").map_err(get)?,
        cancel_requested: row.try_get("cancel_requested").map_err(get)?,
        node: row
            .try_get::<_, Option<String>>("lease_node")
            .map_err(get)?
            .map(NodeId::from),
        schedule: row.try_get("schedule").map_err(get)?,
        slot: row.try_get("slot").map_err(get)?,
        after: after
            .map(|a| crate::model::parse_after(&a))
            .transpose()
            .map_err(|e| conv("after", e))?
            .unwrap_or_default(),
        expires_at: row.try_get("expires_at").map_err(get)?,
    })
}

/// A claimed row: the task and its lease for `node`.
pub(super) fn row_to_claimed(row: &Row, node: &NodeId) -> Result<(i64, crate::broker::Claimed)> {
    let task = row_to_task(row)?;
    let token: i64 = row.get("lease_token");
    let seq: i64 = row.get("seq");
    Ok((
        seq,
        crate::broker::Claimed {
            lease: Lease {
                task: task.id,
                token,
                node: node.clone(),
            },
            attempt: task.attempts + 1,
            task,
        },
    ))
}

/// The states in which a task is not finished (a unique key holds only among these).
const ACTIVE: &str = "('scheduled', 'queued', 'running', 'retrying')";

/// Serialise writers of one unique key (of one queue) until the transaction ends, so that
/// the check and the insert are one atomic change across clients (rule 14).
pub(super) async fn lock_unique<C: GenericClient>(
    client: &C,
    queue: &str,
    key: &str,
) -> Result<()> {
    let name = format!("taskd unique {queue}\u{1f}{key}");
    exec(
        client,
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&name],
    )
    .await?;
    Ok(())
}

pub(super) async fn insert_task<C: GenericClient>(
    client: &C,
    task: &NewTask,
    now: UnixMs,
) -> Result<Enqueued> {
    let queue = task.queue.as_str();
    if let Some(key) = &task.unique_key {
        lock_unique(client, queue, key).await?;
        // The key is held by a waiting or running task, or by one that finished less than
        // its `unique_for` ago (rule 14).
        let existing = opt(
            client,
            &format!(
                "SELECT id, state, created_at, run_at FROM tasks
                 WHERE queue = $1 AND unique_key = $2
                   AND (state IN {ACTIVE} OR finished_at + unique_for > $3)
                 ORDER BY state IN {ACTIVE} DESC, seq DESC LIMIT 1"
            ),
            &[&queue, key, &now],
        )
        .await?;
        if let Some(r) = existing {
            let id: String = r.get(0);
            let state: String = r.get(1);
            return Ok(Enqueued {
                id: id.parse().map_err(BrokerError::Storage)?,
                state: state.parse().map_err(BrokerError::Storage)?,
                existing: true,
                created_at: r.get(2),
                run_at: r.get(3),
            });
        }
    }
    // Parents (rule 13): each must exist. One already succeeded is done; one already failed
    // or cancelled cancels the new task at once; the others block it. Their rows are
    // locked (FOR SHARE) so that none ends before the links below are written.
    let mut waits_for = Vec::new();
    let mut failed_parent = None;
    for parent in &task.after {
        let row = opt(
            client,
            "SELECT seq, state FROM tasks WHERE id = $1 FOR SHARE",
            &[&parent.to_string()],
        )
        .await?
        .ok_or(BrokerError::NotFound(*parent))?;
        let seq: i64 = row.get(0);
        let state: String = row.get(1);
        match state.parse::<TaskState>().map_err(BrokerError::Storage)? {
            TaskState::Succeeded => {}
            TaskState::Failed | TaskState::Cancelled => {
                failed_parent.get_or_insert(*parent);
            }
            _ => waits_for.push(seq),
        }
    }
    waits_for.sort_unstable();
    waits_for.dedup();
    let run_at = task.run_at.unwrap_or(now);
    let state = if failed_parent.is_some() {
        TaskState::Cancelled
    } else if run_at > now || !waits_for.is_empty() {
        TaskState::Scheduled
    } else {
        TaskState::Queued
    };
    let (finished_at, last_error) = match failed_parent {
        Some(p) => (Some(now), Some(crate::model::dependency_failed(p))),
        None => (None, None),
    };
    let blocked: i32 = if failed_parent.is_some() {
        0
    } else {
        waits_for.len() as i32
    };
    let after = (!task.after.is_empty()).then(|| crate::model::join_after(&task.after));
    let args =
        serde_json::to_string(&task.args).map_err(|e| BrokerError::Storage(e.to_string()))?;
    let id = task.id.to_string();
    let row = opt(
        client,
        "INSERT INTO tasks (id, queue, state, payload, args, priority, unique_key, run_at, created_at, updated_at,
                            finished_at, last_error, after_ids, blocked, unique_for, flow_key, rate_key, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11, $12, $13, $14, $15, $16, $17)
         ON CONFLICT (id) DO NOTHING RETURNING seq",
        &[
            &id,
            &queue,
            &state.as_str(),
            &task.payload,
            &args,
            &task.priority,
            &task.unique_key,
            &run_at,
            &now,
            &finished_at,
            &last_error,
            &after,
            &blocked,
            &task.unique_for,
            &task.flow_key,
            &task.rate_key,
            &task.expires_at,
        ],
    )
    .await?
    .ok_or_else(|| BrokerError::Conflict(format!("a task with id {} already exists", task.id)))?;
    if blocked > 0 {
        let child: i64 = row.get(0);
        exec(
            client,
            "INSERT INTO deps (parent, child) SELECT unnest($1::bigint[]), $2 ON CONFLICT DO NOTHING",
            &[&waits_for, &child],
        )
        .await?;
    }
    Ok(Enqueued {
        id: task.id,
        state,
        existing: false,
        created_at: now,
        run_at,
    })
}

/// Whether [`insert_plain`] may store `task`: it has no unique key to check and no parents
/// to look up, so nothing about it depends on other rows.
pub(super) fn is_plain(task: &NewTask) -> bool {
    task.unique_key.is_none() && task.after.is_empty()
}

/// Most rows one [`insert_plain`] statement carries.
pub(super) const PLAIN_CHUNK: usize = 2_000;

/// Insert plain tasks (see [`is_plain`]) with one statement, in their order (their `seq`s
/// follow it, as a row per statement would). An id already stored, or twice among them, is
/// refused with the same error as [`insert_task`]'s, naming the first task that fails.
pub(super) async fn insert_plain<C: GenericClient>(
    client: &C,
    tasks: &[&NewTask],
    now: UnixMs,
) -> Result<Vec<Enqueued>> {
    let n = tasks.len();
    let mut ids = Vec::with_capacity(n);
    let mut queues = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut args = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut run_ats = Vec::with_capacity(n);
    let mut unique_fors = Vec::with_capacity(n);
    let mut flow_keys = Vec::with_capacity(n);
    let mut rate_keys = Vec::with_capacity(n);
    let mut expires = Vec::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        let run_at = t.run_at.unwrap_or(now);
        let state = if run_at > now {
            TaskState::Scheduled
        } else {
            TaskState::Queued
        };
        ids.push(t.id.to_string());
        queues.push(t.queue.as_str());
        states.push(state.as_str());
        payloads.push(t.payload.as_str());
        args.push(serde_json::to_string(&t.args).map_err(|e| BrokerError::Storage(e.to_string()))?);
        priorities.push(t.priority);
        run_ats.push(run_at);
        unique_fors.push(t.unique_for);
        flow_keys.push(t.flow_key.as_deref());
        rate_keys.push(t.rate_key.as_deref());
        expires.push(t.expires_at);
        out.push(Enqueued {
            id: t.id,
            state,
            existing: false,
            created_at: now,
            run_at,
        });
    }
    let stored = rows(
        client,
        "INSERT INTO tasks (id, queue, state, payload, args, priority, run_at, created_at, updated_at,
                            unique_for, flow_key, rate_key, expires_at)
         SELECT r.id, r.queue, r.state, r.payload, r.args, r.priority, r.run_at, $12, $12,
                r.unique_for, r.flow_key, r.rate_key, r.expires_at
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
                       $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::bigint[])
                WITH ORDINALITY AS r(id, queue, state, payload, args, priority, run_at,
                                     unique_for, flow_key, rate_key, expires_at, n)
          ORDER BY r.n
         ON CONFLICT (id) DO NOTHING RETURNING id",
        &[
            &ids,
            &queues,
            &states,
            &payloads,
            &args,
            &priorities,
            &run_ats,
            &unique_fors,
            &flow_keys,
            &rate_keys,
            &expires,
            &now,
        ],
    )
    .await?;
    if stored.len() < n {
        // The first id not stored by this statement (a second copy of one it stored counts
        // as not stored): what a row per statement would have failed on.
        let mut inserted: std::collections::HashMap<String, usize> =
            std::collections::HashMap::with_capacity(stored.len());
        for r in &stored {
            *inserted.entry(r.get::<_, String>(0)).or_default() += 1;
        }
        for (t, id) in tasks.iter().zip(&ids) {
            match inserted.get_mut(id) {
                Some(k) if *k > 0 => *k -= 1,
                _ => {
                    return Err(BrokerError::Conflict(format!(
                        "a task with id {} already exists",
                        t.id
                    )))
                }
            }
        }
    }
    Ok(out)
}

pub(super) async fn task_seq<C: GenericClient>(client: &C, id: TaskId) -> Result<(i64, TaskState)> {
    let row = opt(
        client,
        "SELECT seq, state FROM tasks WHERE id = $1",
        &[&id.to_string()],
    )
    .await?
    .ok_or(BrokerError::NotFound(id))?;
    let state: String = row.get(1);
    Ok((row.get(0), state.parse().map_err(BrokerError::Storage)?))
}

pub(super) async fn insert_attempt<C: GenericClient>(
    client: &C,
    seq: i64,
    attempt: &AttemptRecord,
) -> Result<()> {
    exec(
        client,
        "INSERT INTO attempts (task_seq, n, number, node, pid, started_at, ended_at, exit_code, signal,
                               reason, error, stdout_tail, stderr_tail, memory_peak, cpu_usec)
         VALUES ($1, (SELECT coalesce(max(n), 0) + 1 FROM attempts WHERE task_seq = $1),
                 $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        &[
            &seq,
            &(attempt.number as i32),
            &attempt.node.as_str(),
            &attempt.pid,
            &attempt.started_at,
            &attempt.ended_at,
            &attempt.exit_code,
            &attempt.signal,
            &attempt.reason.map(|r| r.as_str()),
            &attempt.error.as_deref().map(text),
            &attempt.stdout_tail.as_bytes(),
            &attempt.stderr_tail.as_bytes(),
            &attempt.memory_peak.and_then(|n| i64::try_from(n).ok()),
            &attempt.cpu_usec.and_then(|n| i64::try_from(n).ok()),
        ],
    )
    .await?;
    Ok(())
}

/// `s` as a `text` value: PostgreSQL's text cannot hold NUL, which a message quoting a
/// program's words may carry (a worker's error line); each becomes U+FFFD. Output tails,
/// which keep every byte, are `bytea` instead (migration 2).
pub(super) fn text(message: &str) -> std::borrow::Cow<'_, str> {
    if message.contains('\0') {
        std::borrow::Cow::Owned(message.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(message)
    }
}

/// An output tail as stored (the bytes of a string taskd wrote, so UTF-8 unless someone
/// else wrote the row: then lossily).
fn tail(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A task's history, oldest first.
pub(super) async fn history<C: GenericClient>(client: &C, seq: i64) -> Result<Vec<AttemptRecord>> {
    let rows = rows(
        client,
        "SELECT number, node, pid, started_at, ended_at, exit_code, signal, reason, error,
                stdout_tail, stderr_tail, memory_peak, cpu_usec
         FROM attempts WHERE task_seq = $1 ORDER BY n",
        &[&seq],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let reason: Option<String> = r.get(7);
            AttemptRecord {
                number: r.get::<_, i32>(0).max(0) as u32,
                node: NodeId::from(r.get::<_, String>(1)),
                pid: r.get(2),
                started_at: r.get(3),
                ended_at: r.get(4),
                exit_code: r.get(5),
                signal: r.get(6),
                reason: reason.and_then(|s| s.parse::<AttemptReason>().ok()),
                error: r.get(8),
                stdout_tail: tail(r.get(9)),
                stderr_tail: tail(r.get(10)),
                memory_peak: r.get::<_, Option<i64>>(11).map(|n| n.max(0) as u64),
                cpu_usec: r.get::<_, Option<i64>>(12).map(|n| n.max(0) as u64),
                result: None,
            }
        })
        .collect())
}
