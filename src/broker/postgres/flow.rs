//! Flow control in a claim (broker rule 15; docs/architecture.md, "Flow control"), as on
//! SQLite: tasks of a blocked key are parked out of `tasks_ready` (`parked` 1: the key is
//! full, 2: its rate waits) and their key listed in `parked_keys`; each claim first puts
//! back what may run now, then walks the ready index, taking or parking each task it reads.
//! Claims of a queue with limits take an advisory lock on the queue for their transaction:
//! the holders of a key and a rate's TAT are read and changed by one client at a time.

use deadpool_postgres::Transaction;

use super::rows::{exec, one, opt, row_to_claimed, rows, sql_limit, TASK_COLS};
use crate::broker::flow::{room, FlowStep, FlowWalk, KEY_FULL};
use crate::broker::{BrokerError, Claimed, Flow, FlowState, Result};
use crate::model::{NodeId, QueueName, TaskId, UnixMs};

/// Serialise the flow-limited claims of `queue` until the transaction ends.
pub(super) async fn lock_queue(tx: &Transaction<'_>, queue: &str) -> Result<()> {
    let name = format!("taskd flow {queue}");
    exec(
        tx,
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&name],
    )
    .await?;
    Ok(())
}

/// A claim of up to `max` tasks of `queue` under `flow` (due tasks already promoted).
/// Returns the claimed tasks and, when a rate refused a start, the first ms another is
/// allowed.
#[allow(clippy::too_many_arguments)]
pub(super) async fn claim(
    tx: &Transaction<'_>,
    node: &NodeId,
    queue: &QueueName,
    max: usize,
    now: UnixMs,
    lease_ms: i64,
    flow: Flow,
) -> Result<(Vec<Claimed>, Option<UnixMs>)> {
    let q = queue.as_str();
    lock_queue(tx, q).await?;
    refill(tx, q, now, flow).await?;
    let mut walk = FlowWalk::new(flow, now);
    let mut out = Vec::new();
    'walk: while out.len() < max {
        let want = (max - out.len()) as i64 + 16;
        let batch = rows(
            tx,
            "SELECT seq, flow_key, rate_key FROM tasks
             WHERE queue = $1 AND state = 'queued' AND lease_node IS NULL AND parked = 0
               AND (expires_at IS NULL OR expires_at > $3)
             ORDER BY priority DESC, seq LIMIT $2",
            &[&q, &want, &now],
        )
        .await?;
        if batch.is_empty() {
            break;
        }
        for r in batch {
            if out.len() >= max {
                break 'walk;
            }
            let seq: i64 = r.get(0);
            let fk: Option<String> = r.get(1);
            let rk: Option<String> = r.get(2);
            loop {
                match walk.step(fk.as_deref(), rk.as_deref()) {
                    FlowStep::Holders(k) => {
                        let n = held_with_key(tx, q, &k).await?;
                        walk.held(k, n);
                    }
                    FlowStep::Tat(k) => {
                        let t = read_tat(tx, q, &k).await?;
                        walk.tat(k, t);
                    }
                    FlowStep::Park { kind, key, until } => {
                        park(tx, q, seq, kind, &key, until).await?;
                        break;
                    }
                    FlowStep::Take { tat } => {
                        if let Some((key, tat)) = tat {
                            write_tat(tx, q, &key, tat).await?;
                        }
                        out.push(take(tx, node, seq, now, lease_ms).await?);
                        break;
                    }
                    FlowStep::Stop => break 'walk,
                }
            }
        }
    }
    let parked_until: Option<i64> = if walk.wants_parked_until() {
        one(
            tx,
            "SELECT min(until) FROM parked_keys WHERE queue = $1 AND kind = 2",
            &[&q],
        )
        .await?
        .get(0)
    } else {
        None
    };
    Ok((out, walk.wait(parked_until)))
}

/// Put back the parked tasks that may run now; a key with none left parked is dropped.
async fn refill(tx: &Transaction<'_>, queue: &str, now: UnixMs, flow: Flow) -> Result<()> {
    let keys = rows(
        tx,
        "SELECT kind, key, until FROM parked_keys WHERE queue = $1",
        &[&queue],
    )
    .await?;
    for r in keys {
        let kind: i16 = r.get(0);
        let key: String = r.get(1);
        let until: i64 = r.get(2);
        let held = match (kind, flow.per_key) {
            (KEY_FULL, Some(_)) => Some(held_with_key(tx, queue, &key).await?),
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
        let moved = exec(
            tx,
            &format!(
                "UPDATE tasks SET parked = 0 WHERE seq IN (
                    SELECT seq FROM tasks WHERE queue = $1 AND {column} = $2 AND parked = $3
                    ORDER BY priority DESC, seq LIMIT $4)"
            ),
            &[&queue, &key, &kind, &free],
        )
        .await? as i64;
        if moved < free {
            exec(
                tx,
                "DELETE FROM parked_keys WHERE queue = $1 AND kind = $2 AND key = $3",
                &[&queue, &kind, &key],
            )
            .await?;
        }
    }
    Ok(())
}

async fn held_with_key(tx: &Transaction<'_>, queue: &str, key: &str) -> Result<u32> {
    let n: i64 = one(
        tx,
        "SELECT count(*) FROM tasks WHERE queue = $1 AND flow_key = $2 AND lease_node IS NOT NULL",
        &[&queue, &key],
    )
    .await?
    .get(0);
    Ok(n as u32)
}

async fn park(
    tx: &Transaction<'_>,
    queue: &str,
    seq: i64,
    kind: i16,
    key: &str,
    until: UnixMs,
) -> Result<()> {
    exec(
        tx,
        "UPDATE tasks SET parked = $2 WHERE seq = $1",
        &[&seq, &kind],
    )
    .await?;
    exec(
        tx,
        "INSERT INTO parked_keys (queue, kind, key, until) VALUES ($1, $2, $3, $4)
         ON CONFLICT (queue, kind, key) DO UPDATE SET until = excluded.until",
        &[&queue, &kind, &key, &until],
    )
    .await?;
    Ok(())
}

async fn read_tat<C: deadpool_postgres::GenericClient>(
    client: &C,
    queue: &str,
    key: &str,
) -> Result<Option<i64>> {
    Ok(opt(
        client,
        "SELECT tat FROM rate_state WHERE queue = $1 AND key = $2",
        &[&queue, &key],
    )
    .await?
    .map(|r| r.get(0)))
}

async fn write_tat(tx: &Transaction<'_>, queue: &str, key: &str, tat: i64) -> Result<()> {
    exec(
        tx,
        "INSERT INTO rate_state (queue, key, tat) VALUES ($1, $2, $3)
         ON CONFLICT (queue, key) DO UPDATE SET tat = excluded.tat",
        &[&queue, &key, &tat],
    )
    .await?;
    Ok(())
}

async fn take(
    tx: &Transaction<'_>,
    node: &NodeId,
    seq: i64,
    now: UnixMs,
    lease_ms: i64,
) -> Result<Claimed> {
    let row = one(
        tx,
        &format!(
            "UPDATE tasks SET lease_node = $1, lease_expires = $2,
                lease_token = greatest(lease_token + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
                updated_at = $3, pid = NULL, pid_start = NULL
             WHERE seq = $4 RETURNING {TASK_COLS}"
        ),
        &[&node.as_str(), &(now + lease_ms), &now, &seq],
    )
    .await?;
    Ok(row_to_claimed(&row, node)?.1)
}

/// What `taskd why` shows of task `id`'s flow control.
pub(super) async fn state<C: deadpool_postgres::GenericClient>(
    client: &C,
    queue: &QueueName,
    id: TaskId,
    keyed_rate: bool,
) -> Result<FlowState> {
    let q = queue.as_str();
    let keys = opt(
        client,
        "SELECT flow_key, rate_key FROM tasks WHERE id = $1",
        &[&id.to_string()],
    )
    .await?
    .ok_or(BrokerError::NotFound(id))?;
    let flow_key: Option<String> = keys.get(0);
    let rate_key: Option<String> = keys.get(1);
    let mut key_holders = Vec::new();
    if let Some(k) = &flow_key {
        let ids = rows(
            client,
            "SELECT id FROM tasks WHERE queue = $1 AND flow_key = $2 AND lease_node IS NOT NULL
             AND id <> $3 ORDER BY seq",
            &[&q, k, &id.to_string()],
        )
        .await?;
        for r in ids {
            let i: String = r.get(0);
            key_holders.push(i.parse().map_err(BrokerError::Storage)?);
        }
    }
    let rk = if keyed_rate {
        rate_key.clone().unwrap_or_default()
    } else {
        String::new()
    };
    Ok(FlowState {
        key_holders,
        rate_tat_us: read_tat(client, q, &rk).await?,
        flow_key,
        rate_key,
    })
}

/// Delete rate states of `queue` whose TAT has passed (rule 19), at most `limit`, through
/// the primary key's prefix; whether to call again.
pub(super) async fn prune<C: deadpool_postgres::GenericClient>(
    client: &C,
    queue: &QueueName,
    now_us: i64,
    limit: usize,
) -> Result<(u64, bool)> {
    let limit = sql_limit(limit);
    let n = exec(
        client,
        "DELETE FROM rate_state WHERE queue = $1 AND key IN
           (SELECT key FROM rate_state WHERE queue = $1 AND tat <= $2 LIMIT $3 FOR UPDATE SKIP LOCKED)",
        &[&queue.as_str(), &now_us, &limit],
    )
    .await? as i64;
    Ok((n as u64, n == limit))
}
