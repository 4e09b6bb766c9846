//! Retention (broker rule 18) on Redis: each finished task is also in its queue's
//! `fin:<state>` sorted set, scored by finish time (kept by `move_state` in `lib.lua`, in
//! the script that finishes the task); `prune.lua` reads the due ones with ZRANGEBYSCORE
//! LIMIT and deletes each task's hash, history (attempts and output tails), result and
//! index entries. A store written before the sets existed is indexed first, in bounded
//! steps (`backfill.lua`). The store's size is the server's `used_memory`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use redis::Script;

use super::{prefix, RedisBroker};
use crate::broker::{PruneRule, Pruned, Result, StoreSize};
use crate::model::{QueueName, TaskState};

fn prune_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| {
        Script::new(&format!(
            "{}\n{}",
            include_str!("lib.lua"),
            include_str!("prune.lua")
        ))
    })
}

fn backfill_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(include_str!("backfill.lua")))
}

/// The rules by queue, in their order, terminal states only.
fn by_queue(rules: &[PruneRule]) -> BTreeMap<QueueName, Vec<&PruneRule>> {
    let mut out: BTreeMap<QueueName, Vec<&PruneRule>> = BTreeMap::new();
    for r in rules.iter().filter(|r| r.state.is_terminal()) {
        out.entry(r.queue.clone()).or_default().push(r);
    }
    out
}

const FINISHED: [TaskState; 3] = [
    TaskState::Succeeded,
    TaskState::Failed,
    TaskState::Cancelled,
];

impl RedisBroker {
    /// Make sure `queue`'s finished tasks are all in its `fin:<state>` sets (once per
    /// client and queue; a store that never lacked them answers at the first call).
    async fn finish_index(&self, queue: &QueueName) -> Result<()> {
        if self.indexed.lock().expect("not poisoned").contains(queue) {
            return Ok(());
        }
        loop {
            let mut inv = backfill_script().key(prefix(queue));
            for s in FINISHED {
                inv.arg(s.as_str());
            }
            let done: i64 = inv
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            if done == 1 {
                break;
            }
        }
        self.indexed
            .lock()
            .expect("not poisoned")
            .insert(queue.clone());
        Ok(())
    }

    pub(super) async fn prune_in(&self, rules: &[PruneRule], limit: usize) -> Result<Pruned> {
        let mut pruned = Pruned::default();
        let mut left = limit;
        for (queue, rules) in by_queue(rules) {
            if left == 0 {
                pruned.more = true;
                break;
            }
            self.finish_index(&queue).await?;
            let mut inv = prune_script().key(prefix(&queue));
            inv.arg(left);
            for r in &rules {
                inv.arg(r.state.as_str()).arg(r.before);
            }
            let out: Vec<i64> = inv
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            for (r, n) in rules.iter().zip(&out) {
                pruned.add(&queue, r.state, *n as u64);
                left = left.saturating_sub(*n as usize);
            }
            if out.last() == Some(&1) {
                pruned.more = true;
                break;
            }
        }
        Ok(pruned)
    }

    /// Rule 19: the queue's rate states (`rate`, a hash of TATs by key) whose TAT has
    /// passed. The hash is walked with HSCAN, `limit` fields a call, from a cursor kept in
    /// `rate:scan` between calls (deleted once a pass is complete); never a scan of the
    /// keyspace. At most `limit` fields are deleted per call.
    pub(super) async fn prune_flow_in(
        &self,
        queue: &QueueName,
        now_us: i64,
        limit: usize,
    ) -> Result<(u64, bool)> {
        static S: OnceLock<Script> = OnceLock::new();
        let script = S.get_or_init(|| {
            Script::new(
                r"
local p, now, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local cur = redis.call('GET', p .. 'rate:scan') or '0'
local r = redis.call('HSCAN', p .. 'rate', cur, 'COUNT', limit)
local n = 0
for i = 1, #r[2], 2 do
  if n < limit and tonumber(r[2][i + 1]) <= now then
    redis.call('HDEL', p .. 'rate', r[2][i])
    n = n + 1
  end
end
if r[1] == '0' then
  redis.call('DEL', p .. 'rate:scan')
  return {n, 0}
end
redis.call('SET', p .. 'rate:scan', r[1])
return {n, 1}",
            )
        });
        let (n, more): (u64, i64) = script
            .key(prefix(queue))
            .arg(now_us)
            .arg(limit)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        Ok((n, more == 1))
    }

    pub(super) async fn prunable_in(&self, rules: &[PruneRule]) -> Result<Pruned> {
        let mut pruned = Pruned::default();
        for (queue, rules) in by_queue(rules) {
            self.finish_index(&queue).await?;
            let p = prefix(&queue);
            let mut pipe = redis::pipe();
            for r in &rules {
                pipe.cmd("ZCOUNT")
                    .arg(format!("{p}fin:{}", r.state))
                    .arg("-inf")
                    .arg(format!("({}", r.before));
            }
            let counts: Vec<u64> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            for (r, n) in rules.iter().zip(counts) {
                pruned.add(&queue, r.state, n);
            }
        }
        Ok(pruned)
    }

    /// The server's `used_memory` (every database of the server counts in it).
    pub(super) async fn store_size_in(&self) -> Result<Option<StoreSize>> {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .map(|bytes| StoreSize {
                bytes,
                measure: "memory",
            }))
    }
}
