//! The inbox: plain tasks wait in a list per queue until stored (see inbox.lua and
//! docs/redis.md, "The inbox"). Storing goes in bounded steps, by whoever needs it.

use std::time::Duration;

use redis::aio::ConnectionManager;

use super::{prefix, scripts, QUEUES};
use crate::model::{NewTask, QueueName};

/// How many inbox entries one script stores: about 5 ms of the server's time, so that
/// storing a long inbox never holds up other clients for long.
const STORE_STEP: usize = 256;
/// How often a subscribed client (a daemon) looks for inboxes to store when no wake-up
/// said so.
pub(super) const STORE_TICK: Duration = Duration::from_secs(5);

/// A task the inbox can take: due now, priority 0, no unique key, no parents (the others
/// need the stored indexes at once).
pub(super) fn plain(task: &NewTask) -> bool {
    task.priority == 0
        && task.run_at.is_none()
        && task.unique_key.is_none()
        && task.flow_key.is_none()
        && task.rate_key.is_none()
        && task.after.is_empty()
        && task.expires_at.is_none()
}

/// Store up to [`STORE_STEP`] entries of `queue`'s inbox: (taken, left, whether task `id` is
/// stored now).
pub(super) async fn store_step(
    conn: &mut ConnectionManager,
    queue: &QueueName,
    id: Option<&str>,
) -> redis::RedisResult<(u64, u64, bool)> {
    let mut inv = scripts().store.key(prefix(queue));
    inv.arg(STORE_STEP);
    if let Some(id) = id {
        inv.arg(id);
    }
    let (took, left, stored): (u64, u64, u8) = inv.invoke_async(conn).await?;
    Ok((took, left, stored > 0))
}

/// Store what `queue`'s inbox holds now, in steps, or only until task `id` is stored (then
/// `true`). Entries producers add meanwhile are left to the next call: a steady stream of
/// them would otherwise keep this going forever.
pub(super) async fn store_all(
    conn: &mut ConnectionManager,
    queue: &QueueName,
    id: Option<&str>,
) -> redis::RedisResult<bool> {
    let mut budget: Option<u64> = None;
    loop {
        let (took, left, stored) = store_step(conn, queue, id).await?;
        if stored {
            return Ok(true);
        }
        let b = budget.get_or_insert(took + left);
        *b = b.saturating_sub(took);
        if left == 0 || took == 0 || *b == 0 {
            return Ok(false);
        }
    }
}

/// Store the inboxes of every queue: what a daemon does whenever a producer says `work`
/// (and every [`STORE_TICK`]), so that claims, lookups and lists rarely have to.
pub(super) async fn store_inboxes(conn: &mut ConnectionManager) -> redis::RedisResult<()> {
    let names: Vec<String> = redis::cmd("SMEMBERS").arg(QUEUES).query_async(conn).await?;
    let queues: Vec<QueueName> = names.into_iter().filter_map(|n| n.parse().ok()).collect();
    if queues.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for q in &queues {
        pipe.cmd("LLEN").arg(format!("{}in", prefix(q)));
    }
    let lens: Vec<u64> = pipe.query_async(conn).await?;
    for (q, n) in queues.iter().zip(lens) {
        if n > 0 {
            store_all(conn, q, None).await?;
        }
    }
    Ok(())
}
