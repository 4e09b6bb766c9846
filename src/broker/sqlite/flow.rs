//! Flow control in a claim (broker rule 15; docs/architecture.md, "Flow control"): per-key
//! concurrency and rate limits, index-driven. Tasks of a blocked key are parked out of
//! `tasks_ready` (`parked` 1: the key is full, 2: its rate waits) and their key listed in
//! `parked_keys`; each claim first puts back what may run now, then walks the ready index,
//! taking or parking each task it reads. Nothing here reads a parked task until its key
//! may run.

use rusqlite::{params, Connection, OptionalExtension};

use super::conn::storage;
use super::rows::{row_to_task, TASK_COLS};
use crate::broker::flow::{room, FlowStep, FlowWalk, KEY_FULL};
use crate::broker::{Claimed, Flow, FlowState, Lease, Result};
use crate::model::{NodeId, QueueName, TaskId, UnixMs};

/// A claim of up to `max` tasks of `queue` under `flow`, inside the writer's transaction
/// (due tasks already promoted). Returns the claimed tasks and, when a rate refused a start,
/// the first ms another is allowed.
#[allow(clippy::too_many_arguments)]
pub(super) fn claim(
    conn: &Connection,
    node: &NodeId,
    queue: &QueueName,
    max: usize,
    now: UnixMs,
    lease_ms: i64,
    flow: Flow,
) -> Result<(Vec<Claimed>, Option<UnixMs>)> {
    let q = queue.as_str();
    refill(conn, q, now, flow)?;
    let mut walk = FlowWalk::new(flow, now);
    let mut out = Vec::new();
    'walk: while out.len() < max {
        let want = (max - out.len()) as i64 + 16;
        let batch: Vec<(i64, Option<String>, Option<String>)> = conn
            .prepare_cached(
                "SELECT seq, flow_key, rate_key FROM tasks
                 WHERE queue = ?1 AND state = 'queued' AND lease_node IS NULL AND parked = 0
                   AND (expires_at IS NULL OR expires_at > ?3)
                 ORDER BY priority DESC, seq LIMIT ?2",
            )
            .and_then(|mut s| {
                s.query_map(params![q, want, now], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect()
            })
            .map_err(storage)?;
        if batch.is_empty() {
            break;
        }
        for (seq, fk, rk) in batch {
            if out.len() >= max {
                break 'walk;
            }
            loop {
                match walk.step(fk.as_deref(), rk.as_deref()) {
                    FlowStep::Holders(k) => {
                        let n = held_with_key(conn, q, &k)?;
                        walk.held(k, n);
                    }
                    FlowStep::Tat(k) => {
                        let t = read_tat(conn, q, &k)?;
                        walk.tat(k, t);
                    }
                    FlowStep::Park { kind, key, until } => {
                        park(conn, q, seq, kind, &key, until)?;
                        break;
                    }
                    FlowStep::Take { tat } => {
                        if let Some((key, tat)) = tat {
                            write_tat(conn, q, &key, tat)?;
                        }
                        out.push(take(conn, node, seq, now, lease_ms)?);
                        break;
                    }
                    FlowStep::Stop => break 'walk,
                }
            }
        }
    }
    let parked_until: Option<i64> = if walk.wants_parked_until() {
        conn.prepare_cached("SELECT min(until) FROM parked_keys WHERE queue = ?1 AND kind = 2")
            .and_then(|mut s| s.query_row([q], |r| r.get(0)))
            .map_err(storage)?
    } else {
        None
    };
    Ok((out, walk.wait(parked_until)))
}

/// Put back the parked tasks that may run now: as many of a full key's oldest as it has
/// free slots, a rate key's whose time has come (up to its burst). A key with none left
/// parked is dropped from `parked_keys`. Costs one step per parked key, never per task.
fn refill(conn: &Connection, queue: &str, now: UnixMs, flow: Flow) -> Result<()> {
    let keys: Vec<(i16, String, i64)> = conn
        .prepare_cached("SELECT kind, key, until FROM parked_keys WHERE queue = ?1")
        .and_then(|mut s| {
            s.query_map([queue], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .map_err(storage)?;
    for (kind, key, until) in keys {
        let held = match (kind, flow.per_key) {
            (KEY_FULL, Some(_)) => Some(held_with_key(conn, queue, &key)?),
            _ => None,
        };
        let free = room(flow, kind, until, now, held);
        if free <= 0 {
            continue;
        }
        let column = if kind == KEY_FULL {
            "flow_key"
        } else {
            "rate_key"
        };
        let moved = conn
            .prepare_cached(&format!(
                "UPDATE tasks SET parked = 0 WHERE seq IN (
                    SELECT seq FROM tasks WHERE queue = ?1 AND {column} = ?2 AND parked = ?3
                    ORDER BY priority DESC, seq LIMIT ?4)"
            ))
            .and_then(|mut s| s.execute(params![queue, key, kind, free]))
            .map_err(storage)? as i64;
        if moved < free {
            conn.prepare_cached(
                "DELETE FROM parked_keys WHERE queue = ?1 AND kind = ?2 AND key = ?3",
            )
            .and_then(|mut s| s.execute(params![queue, kind, key]))
            .map_err(storage)?;
        }
    }
    Ok(())
}

fn held_with_key(conn: &Connection, queue: &str, key: &str) -> Result<u32> {
    conn.prepare_cached(
        "SELECT count(*) FROM tasks WHERE queue = ?1 AND flow_key = ?2 AND lease_node IS NOT NULL",
    )
    .and_then(|mut s| s.query_row(params![queue, key], |r| r.get(0)))
    .map_err(storage)
}

fn park(
    conn: &Connection,
    queue: &str,
    seq: i64,
    kind: i16,
    key: &str,
    until: UnixMs,
) -> Result<()> {
    conn.prepare_cached("UPDATE tasks SET parked = ?2 WHERE seq = ?1")
        .and_then(|mut s| s.execute(params![seq, kind]))
        .map_err(storage)?;
    conn.prepare_cached(
        "INSERT INTO parked_keys (queue, kind, key, until) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (queue, kind, key) DO UPDATE SET until = excluded.until",
    )
    .and_then(|mut s| s.execute(params![queue, kind, key, until]))
    .map_err(storage)?;
    Ok(())
}

fn read_tat(conn: &Connection, queue: &str, key: &str) -> Result<Option<i64>> {
    conn.prepare_cached("SELECT tat FROM rate_state WHERE queue = ?1 AND key = ?2")
        .and_then(|mut s| s.query_row(params![queue, key], |r| r.get(0)).optional())
        .map_err(storage)
}

fn write_tat(conn: &Connection, queue: &str, key: &str, tat: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO rate_state (queue, key, tat) VALUES (?1, ?2, ?3)
         ON CONFLICT (queue, key) DO UPDATE SET tat = excluded.tat",
    )
    .and_then(|mut s| s.execute(params![queue, key, tat]))
    .map_err(storage)?;
    Ok(())
}

fn take(conn: &Connection, node: &NodeId, seq: i64, now: UnixMs, lease_ms: i64) -> Result<Claimed> {
    conn.prepare_cached(&format!(
        "UPDATE tasks SET lease_node = ?1, lease_token = lease_token + 1, lease_expires = ?2,
            updated_at = ?3, pid = NULL, pid_start = NULL
         WHERE seq = ?4 RETURNING {TASK_COLS}"
    ))
    .and_then(|mut s| {
        s.query_row(params![node.as_str(), now + lease_ms, now, seq], |r| {
            let task = row_to_task(r)?;
            let token: i64 = r.get("lease_token")?;
            Ok(Claimed {
                lease: Lease {
                    task: task.id,
                    token,
                    node: node.clone(),
                },
                attempt: task.attempts + 1,
                task,
            })
        })
    })
    .map_err(storage)
}

/// What `taskd why` shows of task `id`'s flow control.
pub(super) fn state(
    conn: &Connection,
    queue: &QueueName,
    id: TaskId,
    keyed_rate: bool,
) -> Result<FlowState> {
    let q = queue.as_str();
    let keys: Option<(Option<String>, Option<String>)> = conn
        .prepare_cached("SELECT flow_key, rate_key FROM tasks WHERE id = ?1")
        .and_then(|mut s| {
            s.query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(storage)?;
    let Some((flow_key, rate_key)) = keys else {
        return Err(crate::broker::BrokerError::NotFound(id));
    };
    let mut key_holders = Vec::new();
    if let Some(k) = &flow_key {
        let ids: Vec<String> = conn
            .prepare_cached(
                "SELECT id FROM tasks WHERE queue = ?1 AND flow_key = ?2 AND lease_node IS NOT NULL
                 AND id != ?3 ORDER BY seq",
            )
            .and_then(|mut s| {
                s.query_map(params![q, k, id.to_string()], |r| r.get(0))?
                    .collect()
            })
            .map_err(storage)?;
        for i in ids {
            key_holders.push(i.parse().map_err(crate::broker::BrokerError::Storage)?);
        }
    }
    let rk = if keyed_rate {
        rate_key.clone().unwrap_or_default()
    } else {
        String::new()
    };
    Ok(FlowState {
        key_holders,
        rate_tat_us: read_tat(conn, q, &rk)?,
        flow_key,
        rate_key,
    })
}

impl super::SqliteBroker {
    /// Rule 19: rate states of `queue` whose TAT has passed, at most `limit`, in one short
    /// write. Only the queue's states are read (its primary key's range), and after a pass
    /// only the live ones (TAT still ahead, which a rate keeps few of) remain to be read.
    pub(super) async fn prune_flow_in(
        &self,
        queue: &QueueName,
        now_us: i64,
        limit: usize,
    ) -> Result<(u64, bool)> {
        let queue = queue.to_string();
        let limit = limit as i64;
        self.write_as(false, move |conn| {
            let n = conn
                .prepare_cached(
                    "DELETE FROM rate_state WHERE queue = ?1 AND key IN
                       (SELECT key FROM rate_state WHERE queue = ?1 AND tat <= ?2 LIMIT ?3)",
                )
                .and_then(|mut s| s.execute(params![queue, now_us, limit]))
                .map_err(storage)? as i64;
            Ok((n as u64, n == limit))
        })
        .await
    }
}
