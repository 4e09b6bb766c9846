//! Rows: the columns a task is read with and their mapping to a [`TaskRecord`], and the
//! statements several operations share (inserting a task or an attempt, marking a task
//! running, finding a task's row). Each runs on the connection it is given, inside the
//! caller's transaction.

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row};

use super::conn::storage;
use crate::broker::{BrokerError, Enqueued, Lease, Result};
use crate::model::{now_ms, AttemptRecord, NewTask, NodeId, TaskId, TaskRecord, TaskState, UnixMs};

/// This machine's boot id (`/proc/sys/kernel/random/boot_id`), stored with every recorded pid.
pub(super) fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// The columns [`row_to_task`] reads, in its order.
pub(super) const TASK_COLS: &str =
    "id, queue, state, payload, args, priority, unique_key, run_at, attempts, \
     created_at, updated_at, finished_at, last_error, cancel_requested, lease_node, lease_token, \
     schedule, slot, after_ids, expires_at";

pub(super) fn row_to_task(row: &Row<'_>) -> rusqlite::Result<TaskRecord> {
    let id: String = row.get(0)?;
    let queue: String = row.get(1)?;
    let state: String = row.get(2)?;
    let payload: String = row.get(3)?;
    let args: String = row.get(4)?;
    let conv = |what: &str, e: String| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("{what}: {e}").into(),
        )
    };
    let (payload, payload_b64) =
        crate::model::read_stored_payload(&payload).map_err(|e| conv("payload", e))?;
    Ok(TaskRecord {
        id: id.parse().map_err(|e| conv("id", e))?,
        queue: queue.parse().map_err(|e| conv("queue", e))?,
        state: state.parse().map_err(|e| conv("state", e))?,
        payload,
        payload_b64,
        args: serde_json::from_str(&args).map_err(|e| conv("args", e.to_string()))?,
        priority: row.get(5)?,
        unique_key: row.get(6)?,
        run_at: row.get(7)?,
        attempts: row.get(8)?,
        created_at: row.get(9)?,
        updated_at: row.get(10)?,
        finished_at: row.get(11)?,
        last_error: row.get(12)?,
        cancel_requested: row.get::<_, i64>(13)? != 0,
        node: row.get::<_, Option<String>>(14)?.map(NodeId::from),
        schedule: row.get(16)?,
        slot: row.get(17)?,
        after: row
            .get::<_, Option<String>>(18)?
            .map(|a| crate::model::parse_after(&a))
            .transpose()
            .map_err(|e| conv("after", e))?
            .unwrap_or_default(),
        expires_at: row.get(19)?,
    })
}

/// The states in which a task is not finished (a unique key holds only among these).
const ACTIVE: &str = "('scheduled', 'queued', 'running', 'retrying')";

pub(super) fn insert_task(conn: &Connection, task: &NewTask, now: UnixMs) -> Result<Enqueued> {
    if let Some(key) = &task.unique_key {
        // The key is held by a waiting or running task, or by one that finished less than
        // its `unique_for` ago (rule 14).
        let existing: Option<(String, String, i64, i64)> = conn
            .prepare_cached(&format!(
                "SELECT id, state, created_at, run_at FROM tasks INDEXED BY tasks_unique_key
                 WHERE queue = ?1 AND unique_key = ?2
                   AND (state IN {ACTIVE} OR finished_at + unique_for > ?3)
                 ORDER BY state IN {ACTIVE} DESC, seq DESC LIMIT 1"
            ))
            .and_then(|mut s| {
                s.query_row(params![task.queue.as_str(), key, now], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()
            })
            .map_err(storage)?;
        if let Some((id, state, created_at, run_at)) = existing {
            return Ok(Enqueued {
                id: id.parse().map_err(BrokerError::Storage)?,
                state: state.parse().map_err(BrokerError::Storage)?,
                existing: true,
                created_at,
                run_at,
            });
        }
    }
    // Parents (rule 13): each must exist. One already succeeded is done; one already
    // failed or cancelled cancels the new task at once; the others block it.
    let mut waits_for = Vec::new();
    let mut failed_parent = None;
    for parent in &task.after {
        let (seq, state) = task_seq(conn, *parent)?;
        match state {
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
    let blocked = if failed_parent.is_some() {
        0
    } else {
        waits_for.len() as i64
    };
    let after = (!task.after.is_empty()).then(|| crate::model::join_after(&task.after));
    let args =
        serde_json::to_string(&task.args).map_err(|e| BrokerError::Storage(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO tasks (id, queue, state, payload, args, priority, unique_key, run_at, created_at, updated_at,
                            finished_at, last_error, after_ids, blocked, unique_for, flow_key, rate_key, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )
    .and_then(|mut s| {
        s.execute(params![
            task.id.to_string(),
            task.queue.as_str(),
            state.as_str(),
            task.payload,
            args,
            task.priority,
            task.unique_key,
            run_at,
            now,
            finished_at,
            last_error,
            after,
            blocked,
            task.unique_for,
            task.flow_key,
            task.rate_key,
            task.expires_at,
        ])
    })
    .map_err(|e| match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => {
            BrokerError::Conflict(format!("a task with id {} already exists", task.id))
        }
        _ => storage(e),
    })?;
    if blocked > 0 {
        let child = conn.last_insert_rowid();
        let mut link = conn
            .prepare_cached("INSERT OR IGNORE INTO deps (parent, child) VALUES (?1, ?2)")
            .map_err(storage)?;
        for parent in waits_for {
            link.execute(params![parent, child]).map_err(storage)?;
        }
    }
    Ok(Enqueued {
        id: task.id,
        state,
        existing: false,
        created_at: now,
        run_at,
    })
}

pub(super) fn task_seq(conn: &Connection, id: TaskId) -> Result<(i64, TaskState)> {
    let row: Option<(i64, String)> = conn
        .prepare_cached("SELECT seq, state FROM tasks WHERE id = ?1")
        .and_then(|mut s| {
            s.query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(storage)?;
    let (seq, state) = row.ok_or(BrokerError::NotFound(id))?;
    Ok((seq, state.parse().map_err(BrokerError::Storage)?))
}

pub(super) fn insert_attempt(conn: &Connection, seq: i64, attempt: &AttemptRecord) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO attempts (task_seq, n, number, node, pid, started_at, ended_at, exit_code, signal,
                               reason, error, stdout_tail, stderr_tail, memory_peak, cpu_usec)
         VALUES (?1, (SELECT coalesce(max(n), 0) + 1 FROM attempts WHERE task_seq = ?1),
                 ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )
    .and_then(|mut s| {
        s.execute(params![
            seq,
            attempt.number,
            attempt.node.as_str(),
            attempt.pid,
            attempt.started_at,
            attempt.ended_at,
            attempt.exit_code,
            attempt.signal,
            attempt.reason.map(|r| r.as_str()),
            attempt.error,
            attempt.stdout_tail,
            attempt.stderr_tail,
            attempt.memory_peak.and_then(|n| i64::try_from(n).ok()),
            attempt.cpu_usec.and_then(|n| i64::try_from(n).ok())
        ])
    })
    .map_err(storage)?;
    Ok(())
}

/// Mark a held task running (counting its attempt once) and/or record its pid.
pub(super) fn mark_running(
    conn: &Connection,
    lease: &Lease,
    pid: Option<(i32, u64)>,
) -> Result<()> {
    let now = now_ms();
    let (pid, pid_start) = match pid {
        Some((p, s)) => (Some(p), Some(s as i64)),
        None => (None, None),
    };
    let n = conn
        .prepare_cached(
            "UPDATE tasks SET attempts = attempts + (state = 'queued'), state = 'running',
                started_at = CASE WHEN state = 'queued' THEN ?5 ELSE started_at END,
                updated_at = ?5, pid = coalesce(?1, pid), pid_start = coalesce(?2, pid_start),
                pid_boot = CASE WHEN ?1 IS NULL THEN pid_boot ELSE ?7 END
             WHERE id = ?3 AND lease_token = ?4 AND lease_node = ?6 AND state IN ('queued', 'running')",
        )
        .and_then(|mut s| {
            s.execute(params![pid, pid_start, lease.task.to_string(), lease.token, now, lease.node.as_str(), boot_id()])
        })
        .map_err(storage)?;
    if n == 0 {
        return Err(BrokerError::LeaseLost(lease.task));
    }
    Ok(())
}
