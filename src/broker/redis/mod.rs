//! The shared broker: tasks in Redis, one set of queues for several nodes.
//!
//! Every state change is one Lua script (the `.lua` files beside this one), run atomically
//! by the server and timed by the server's clock (`TIME`), so nodes with skewed clocks
//! agree on when a lease expires. A queue's keys share the hash tag `{q:<queue>}`
//! (`taskd:{q:emails}:t:<id>`, `…:ready`, `…:held`, ...), so that each script touches one
//! slot on Redis Cluster. The key schema is documented in `docs/redis.md`.
//!
//! A claim moves index entries only; the task's hash stays where it is, so no pop ever
//! holds the only copy of a task. Each claim bumps the task's fencing token; `started`,
//! `renew` and `finish` are refused for a stale one. Wake-ups travel on the pub/sub channel
//! `taskd:wake`. This module never runs processes and never decides policy.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

mod inbox;
mod results;
mod retention;
mod schedules;

use inbox::{plain, store_all, store_inboxes, STORE_TICK};
use results::{finish_call, finish_loop, Finishing};

use super::{
    Broker, BrokerError, CancelOutcome, Claimed, Enqueued, Finish, Flow, FlowState, FlowTable,
    Lease, ListFilter, LostLimits, NodeInfo, Orphan, QueueCounts, Queued, Recover, Result, StatRow,
    Wakeups,
};
use crate::audit::{AuditEntry, AuditFilter, AuditRecord};
use crate::backoff::Doubling;
use crate::model::{
    now_ms, AttemptRecord, NewTask, NodeId, QueueName, TaskDetail, TaskId, TaskRecord, TaskState,
    UnixMs,
};

/// Adds one [`StatRow`] to its queue's hash of the hour (`…:stats:<hour>`, fields
/// `<minute>:<counter>`), keeps the larger `run_ms_max`, and lets the hash expire a day
/// after its last write.
fn stats_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| {
        Script::new(
            r#"
local m = ARGV[1]
local names = {'succeeded', 'failed', 'retried', 'cancelled', 'runs', 'run_ms_sum', 'wait_ms_sum'}
for i, name in ipairs(names) do
  local v = tonumber(ARGV[2 + i])
  if v > 0 then redis.call('HINCRBY', KEYS[1], m .. ':' .. name, v) end
end
local max = tonumber(ARGV[10])
local cur = tonumber(redis.call('HGET', KEYS[1], m .. ':run_ms_max') or '0')
if max > cur then redis.call('HSET', KEYS[1], m .. ':run_ms_max', max) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 0
"#,
        )
    })
}

/// The set of queue names that ever had a task or a pause.
const QUEUES: &str = "taskd:queues";
/// The node registry: node id → JSON record.
const NODES: &str = "taskd:nodes";
/// The wake-up channel.
const WAKE: &str = "taskd:wake";
/// The audit trail: a stream capped at the newest `audit_keep` entries, each with one field
/// `r` (the entry as JSON); the entry id (`<ms>-<n>`, the server's clock) orders them.
const AUDIT: &str = "taskd:audit";
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one command may wait for its answer before the connection counts as broken.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Node records older than this are not listed (a node that died long ago).
const NODE_FORGET_MS: i64 = 3_600_000;
struct Scripts {
    enqueue: Script,
    push: Script,
    store: Script,
    claim: Script,
    started: Script,
    renew: Script,
    finish: Script,
    cancel: Script,
    retry: Script,
    recover: Script,
    adopt: Script,
    heartbeat: Script,
    note: Script,
    expire: Script,
    flowstate: Script,
}

fn scripts() -> &'static Scripts {
    static S: OnceLock<Scripts> = OnceLock::new();
    S.get_or_init(|| {
        let lib = include_str!("lib.lua");
        let inbox = include_str!("inbox.lua");
        let s = |body: &str| Script::new(&format!("{lib}\n{body}"));
        let with_inbox = |body: &str| Script::new(&format!("{lib}\n{inbox}\n{body}"));
        Scripts {
            enqueue: s(include_str!("enqueue.lua")),
            push: s(include_str!("push.lua")),
            store: with_inbox(include_str!("store.lua")),
            claim: with_inbox(include_str!("claim.lua")),
            flowstate: s(include_str!("flowstate.lua")),
            started: s(include_str!("started.lua")),
            renew: s(include_str!("renew.lua")),
            finish: s(include_str!("finish.lua")),
            cancel: s(include_str!("cancel.lua")),
            retry: s(include_str!("retry.lua")),
            recover: s(include_str!("recover.lua")),
            adopt: s(include_str!("adopt.lua")),
            heartbeat: s(include_str!("heartbeat.lua")),
            note: s(include_str!("note.lua")),
            expire: s(include_str!("expire.lua")),
        }
    })
}

/// The key prefix of one queue; every key of the queue starts with it.
pub(crate) fn prefix(queue: &QueueName) -> String {
    format!("taskd:{{q:{queue}}}:")
}

/// This machine's boot id, stored with every recorded pid (a pid means nothing elsewhere).
fn boot_id() -> &'static str {
    static BOOT: OnceLock<String> = OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// The Redis backend. Cheap to share behind an `Arc`.
pub struct RedisBroker {
    client: redis::Client,
    conn: ConnectionManager,
    /// `host:port`, for messages (never the password).
    addr: String,
    /// Queues this client already added to [`QUEUES`].
    known: Mutex<HashSet<QueueName>>,
    /// Queues whose finished tasks this client knows to be in their `fin:<state>` sets.
    indexed: Mutex<HashSet<QueueName>>,
    /// The queue of each task this client claimed: the hot path never looks one up.
    located: Mutex<HashMap<TaskId, QueueName>>,
    /// Results on their way to [`finish_loop`].
    finisher: tokio::sync::mpsc::UnboundedSender<Finishing>,
    /// Calls sent to the server (a pipeline counts once), for the benchmarks.
    trips: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The flow-control limits of each queue's claims (rule 15).
    flow: FlowTable,
}

impl RedisBroker {
    /// Connect to the server `url` names (`redis://[:password@]host[:port][/db]`, or
    /// `rediss://` for TLS). Unreachable → [`BrokerError::Unavailable`] naming the address.
    pub async fn open(url: &str) -> Result<Self> {
        // rustls needs one process-wide crypto provider for `rediss://`; a second install
        // (another broker in the same process) is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = redis::Client::open(url).map_err(|e| {
            BrokerError::Unavailable(format!(
                "invalid redis URL: {}",
                e.to_string().replace(url, "<url>")
            ))
        })?;
        let addr = client.get_connection_info().addr.to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT)
            .set_number_of_retries(2)
            .set_factor(100)
            .set_max_delay(2_000);
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| {
                BrokerError::Unavailable(format!(
                    "cannot reach the redis server at {addr}: {e}; is it running, and do the address, password and TLS setting in `broker` match it?"
                ))
            })?;
        let (finisher, rx) = tokio::sync::mpsc::unbounded_channel();
        let trips = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        tokio::spawn(finish_loop(conn.clone(), addr.clone(), trips.clone(), rx));
        Ok(RedisBroker {
            client,
            conn,
            addr,
            known: Mutex::new(HashSet::new()),
            indexed: Mutex::new(HashSet::new()),
            located: Mutex::new(HashMap::new()),
            finisher,
            trips,
            flow: FlowTable::default(),
        })
    }

    /// Hands a result to the results writer (`Ok`: where its answer arrives), or gives it
    /// back when the writer is gone (the runtime it ran on shut down).
    fn queue_finish(
        &self,
        queue: QueueName,
        lease: &Lease,
        attempt: &AttemptRecord,
        next: Finish,
    ) -> Result<std::result::Result<tokio::sync::oneshot::Receiver<Result<String>>, Finishing>>
    {
        let (kind, at) = match next {
            Finish::Succeeded => ("succeeded", 0),
            Finish::Retry { at } => ("retry", at),
            Finish::Failed => ("failed", 0),
            Finish::Cancelled => ("cancelled", 0),
            Finish::Requeue => ("requeue", 0),
            Finish::Release => ("release", 0),
        };
        let json =
            serde_json::to_string(attempt).map_err(|e| BrokerError::Storage(e.to_string()))?;
        let (done, answer) = tokio::sync::oneshot::channel();
        let error = attempt
            .error
            .as_ref()
            .map(|e| format!("e:{e}"))
            .unwrap_or_default();
        // Only a success keeps what the run returned (rule 12).
        let result = match (next, &attempt.result) {
            (Finish::Succeeded, Some(v)) => v.to_string(),
            _ => String::new(),
        };
        let args = [
            lease.task.to_string(),
            lease.token.to_string(),
            lease.node.to_string(),
            kind.to_string(),
            at.to_string(),
            if attempt.pid.is_some() { "1" } else { "0" }.to_string(),
            json,
            error,
            result,
        ];
        Ok(match self.finisher.send(Finishing { queue, args, done }) {
            Ok(()) => Ok(answer),
            Err(tokio::sync::mpsc::error::SendError(f)) => Err(f),
        })
    }

    /// The store's answer to a result [`Self::queue_finish`] handled.
    async fn finish_answer(
        &self,
        sent: Result<
            std::result::Result<tokio::sync::oneshot::Receiver<Result<String>>, Finishing>,
        >,
        lease: &Lease,
    ) -> Result<()> {
        let r = match sent? {
            Ok(answer) => answer.await.map_err(|_| {
                BrokerError::Storage("the result writer stopped before answering".into())
            })??,
            // The writer is gone: write this one directly.
            Err(f) => finish_call(&mut self.conn(), &self.addr, &f.queue, &[&f.args])
                .await?
                .pop()
                .unwrap_or_default(),
        };
        match r.as_str() {
            "ok" => {
                self.forget(lease.task);
                Ok(())
            }
            "missing" => Err(BrokerError::NotFound(lease.task)),
            _ => {
                self.forget(lease.task);
                Err(BrokerError::LeaseLost(lease.task))
            }
        }
    }

    fn err(&self, error: RedisError) -> BrokerError {
        broker_error(&self.addr, error)
    }

    fn conn(&self) -> ConnectionManager {
        self.trips
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conn.clone()
    }

    /// How many calls this client sent to the server so far (a pipeline counts once).
    pub fn round_trips(&self) -> u64 {
        self.trips.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn queue_names(&self) -> Result<Vec<QueueName>> {
        let names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(QUEUES)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        let mut out: Vec<QueueName> = names.into_iter().filter_map(|n| n.parse().ok()).collect();
        out.sort();
        Ok(out)
    }

    /// Add `queue` to the queue set once per client.
    async fn know(&self, queue: &QueueName) -> Result<()> {
        if self.known.lock().expect("not poisoned").contains(queue) {
            return Ok(());
        }
        let _: i64 = redis::cmd("SADD")
            .arg(QUEUES)
            .arg(queue.as_str())
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        self.known
            .lock()
            .expect("not poisoned")
            .insert(queue.clone());
        Ok(())
    }

    /// The queue holding task `id`: from memory when this client claimed it, else by asking
    /// every queue (one pipelined round trip). A task still in a queue's inbox is stored
    /// first (in bounded steps, oldest first, up to it), so that callers find it stored.
    async fn locate(&self, id: TaskId) -> Result<Option<QueueName>> {
        if let Some(q) = self.located.lock().expect("not poisoned").get(&id) {
            return Ok(Some(q.clone()));
        }
        let queues = self.queue_names().await?;
        if queues.is_empty() {
            return Ok(None);
        }
        // Asked in this order, a task a node stores meanwhile is seen in one place or the
        // other: first in an inbox (by its count), then stored.
        let found: Vec<Option<u64>> = self
            .pipelined(&queues, |pipe, q| {
                let p = prefix(q);
                pipe.cmd("GET").arg(format!("{p}inn"));
                pipe.cmd("EXISTS").arg(format!("{p}t:{id}"));
            })
            .await?;
        let mut waiting = Vec::new();
        for (q, f) in queues.into_iter().zip(found.chunks(2)) {
            if f[1].unwrap_or(0) > 0 {
                return Ok(Some(q));
            }
            if f[0].unwrap_or(0) > 0 {
                waiting.push(q);
            }
        }
        // Not stored: perhaps still in an inbox. Which one is not known; store them until
        // it shows up.
        let id = id.to_string();
        for q in waiting {
            if store_all(&mut self.conn(), &q, Some(&id))
                .await
                .map_err(|e| self.err(e))?
            {
                return Ok(Some(q));
            }
        }
        Ok(None)
    }

    /// One pipelined round trip: `ask` adds the commands for each item (usually a queue);
    /// the answers, decoded as `T` (usually a flat `Vec`, in order).
    async fn pipelined<I, T: redis::FromRedisValue>(
        &self,
        items: impl IntoIterator<Item = I>,
        mut ask: impl FnMut(&mut redis::Pipeline, I),
    ) -> Result<T> {
        let mut pipe = redis::pipe();
        for i in items {
            ask(&mut pipe, i);
        }
        pipe.query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))
    }

    /// Those of `queues` where the key `<prefix>suffix` exists, in one pipelined round trip.
    async fn queues_having(&self, queues: Vec<QueueName>, suffix: &str) -> Result<Vec<QueueName>> {
        self.queues_where(queues, |pipe, p| {
            pipe.cmd("EXISTS").arg(format!("{p}{suffix}"));
        })
        .await
    }

    /// Those of `queues` for which the command `ask` adds (given the queue's prefix) answers
    /// a number above 0, in one pipelined round trip.
    async fn queues_where(
        &self,
        queues: Vec<QueueName>,
        ask: impl Fn(&mut redis::Pipeline, &str),
    ) -> Result<Vec<QueueName>> {
        let found: Vec<i64> = self
            .pipelined(&queues, |pipe, q| {
                ask(pipe, &prefix(q));
            })
            .await?;
        Ok(queues
            .into_iter()
            .zip(found)
            .filter(|(_, n)| *n > 0)
            .map(|(q, _)| q)
            .collect())
    }

    /// Store what `queue`'s inbox holds now (not what producers add meanwhile), in steps.
    async fn store_inbox(&self, queue: &QueueName) -> Result<()> {
        store_all(&mut self.conn(), queue, None)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Runs `script` on task `id` in its queue; `NotFound` if no queue holds it.
    async fn run_on_task(&self, script: &Script, id: TaskId) -> Result<String> {
        let Some(q) = self.locate(id).await? else {
            return Err(BrokerError::NotFound(id));
        };
        script
            .key(prefix(&q))
            .arg(id.to_string())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))
    }

    /// Push plain tasks of one queue into its inbox (push.lua); their `created_at` (ms).
    async fn push<'a>(
        &self,
        queue: &QueueName,
        tasks: impl Iterator<Item = &'a NewTask> + Clone,
    ) -> Result<UnixMs> {
        let p = prefix(queue);
        let mut inv = scripts().push.key(&p);
        let mut seen = HashSet::new();
        for t in tasks.clone() {
            if !seen.insert(t.id) {
                return Err(BrokerError::Conflict(format!(
                    "a task with id {} is twice in the batch",
                    t.id
                )));
            }
            inv.key(format!("{p}t:{}", t.id));
        }
        for t in tasks {
            let args =
                serde_json::to_string(&t.args).map_err(|e| BrokerError::Storage(e.to_string()))?;
            inv.arg(format!("{}\x1f{args}\x1f{}", t.id, t.payload));
        }
        let now: String = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        let us: UnixMs = now
            .parse()
            .map_err(|_| BrokerError::Storage(format!("push returned {now:?}, not a time")))?;
        Ok(us / 1000)
    }

    fn remember(&self, id: TaskId, queue: &QueueName) {
        self.located
            .lock()
            .expect("not poisoned")
            .insert(id, queue.clone());
    }

    fn forget(&self, id: TaskId) {
        self.located.lock().expect("not poisoned").remove(&id);
    }

    async fn claim_in(
        &self,
        node: &NodeId,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let limits = self.flow.get(queue);
        let mut inv = scripts().claim.key(prefix(queue));
        inv.arg(node.as_str())
            .arg(max)
            .arg(lease.as_millis() as u64);
        if !limits.is_none() {
            let rate = limits.rate;
            inv.arg(limits.per_key.unwrap_or(0))
                .arg(rate.map_or(0, |r| r.interval_us()))
                .arg(rate.map_or(0, |r| r.tolerance_us()))
                .arg(if rate.is_some_and(|r| r.keyed) {
                    "1"
                } else {
                    "0"
                });
        }
        let mut rows: Vec<Vec<String>> = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        if !limits.is_none() {
            // The script's last row says when a refused rate allows a start.
            let wait = match rows.pop() {
                Some(w) if w.first().map(String::as_str) == Some("wait") => {
                    w.get(1).and_then(|t| t.parse().ok())
                }
                _ => {
                    return Err(BrokerError::Storage(
                        "claim.lua answered no wait row".into(),
                    ))
                }
            };
            self.flow.set_wait(queue, wait);
        }
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let h = pairs(row);
            let task = task_from(&h)?;
            let token: i64 = num(&h, "token")?;
            self.remember(task.id, queue);
            out.push(Claimed {
                lease: Lease {
                    task: task.id,
                    token,
                    node: node.clone(),
                },
                attempt: task.attempts + 1,
                task,
            });
        }
        Ok(out)
    }

    async fn recover_in(
        &self,
        queue: &QueueName,
        all: bool,
        delta: i64,
        note: &str,
        max_lost: u32,
    ) -> Result<Vec<Orphan>> {
        let flat: Vec<String> = scripts()
            .recover
            .key(prefix(queue))
            .arg(if all { "1" } else { "0" })
            .arg(delta)
            .arg(note)
            .arg(boot_id())
            .arg(max_lost)
            .arg(super::lost_too_often("{lost}", max_lost))
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for c in flat.chunks(5) {
            let [id, node, pid, pid_start, failed] = c else {
                return Err(BrokerError::Storage("recover returned a short row".into()));
            };
            let task: TaskId = id.parse().map_err(BrokerError::Storage)?;
            self.forget(task);
            out.push(Orphan {
                task,
                queue: queue.clone(),
                node: (!node.is_empty()).then(|| NodeId::from(node.clone())),
                pid: pid.parse().ok(),
                pid_start: pid_start.parse().ok(),
                failed: failed == "1",
            });
        }
        Ok(out)
    }

    /// Up to `limit` tasks of `queue` that pass `filter`, newest first, with their seq;
    /// from the seq `top` down (a score bound: `123` or `(123`) when given. Reads the
    /// queue's state index (or `all`) in batches from the top, within the creation-time
    /// range, and tests each task: what a search costs is the tasks it reads, not the
    /// keyspace. A unique key of a waiting or running task is one lookup (`u`); an id is
    /// one read.
    async fn list_queue(
        &self,
        queue: &QueueName,
        filter: &ListFilter,
        top: Option<String>,
        limit: usize,
    ) -> Result<Vec<(f64, TaskRecord)>> {
        let p = prefix(queue);
        let index = match filter.state {
            Some(s) => format!("{p}st:{s}"),
            None => format!("{p}all"),
        };
        let direct: Option<String> = if let Some(id) = filter.id {
            Some(id.to_string())
        } else if let (Some(key), Some(true)) =
            (&filter.unique_key, filter.state.map(|s| !s.is_terminal()))
        {
            // Only the waiting or running holder of a key can be in a waiting state.
            let holder: Option<String> = redis::cmd("HGET")
                .arg(format!("{p}u"))
                .arg(key)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            match holder {
                Some(h) => Some(h),
                None => return Ok(Vec::new()),
            }
        } else {
            None
        };
        if let Some(id) = direct {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(&index)
                .arg(&id)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            let Some(score) = score else {
                return Ok(Vec::new());
            };
            let below_top = match &top {
                None => true,
                Some(t) => match t.strip_prefix('(') {
                    Some(t) => score < t.parse().unwrap_or(f64::MAX),
                    None => score <= t.parse().unwrap_or(f64::MAX),
                },
            };
            let recs = self.records(&[(queue.clone(), id)]).await?;
            return Ok(recs
                .into_iter()
                .filter(|t| below_top && filter.matches(t))
                .map(|t| (score, t))
                .collect());
        }
        // seq is the server's time in microseconds when the task was stored, close to its
        // created_at: the index's score range narrows the time range (with a minute to spare
        // either side), and `matches` decides exactly.
        const SPARE_US: i64 = 60_000_000;
        let mut max = match (top, filter.until) {
            (Some(t), _) => t,
            (None, Some(u)) => format!("{}", u.saturating_mul(1000).saturating_add(SPARE_US)),
            (None, None) => "+inf".to_string(),
        };
        let min = match filter.since {
            Some(s) => format!("{}", s.saturating_mul(1000).saturating_sub(SPARE_US)),
            None => "-inf".to_string(),
        };
        let batch = limit.clamp(16, 512);
        let mut out = Vec::new();
        loop {
            let page: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(&index)
                .arg(&max)
                .arg(&min)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(batch)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            let Some(last) = page.last().map(|(_, s)| *s) else {
                break;
            };
            let keys: Vec<(QueueName, String)> = page
                .iter()
                .map(|(id, _)| (queue.clone(), id.clone()))
                .collect();
            let scores: HashMap<&str, f64> = page.iter().map(|(id, s)| (id.as_str(), *s)).collect();
            for t in self.records(&keys).await? {
                if filter.matches(&t) {
                    let seq = scores
                        .get(t.id.to_string().as_str())
                        .copied()
                        .unwrap_or(0.0);
                    out.push((seq, t));
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            if page.len() < batch {
                break;
            }
            max = format!("({last}");
        }
        Ok(out)
    }

    /// Run `HGETALL` on many tasks at once.
    async fn records(&self, keys: &[(QueueName, String)]) -> Result<Vec<TaskRecord>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<Vec<String>> = self
            .pipelined(keys, |pipe, (q, id)| {
                pipe.cmd("HGETALL").arg(format!("{}t:{id}", prefix(q)));
            })
            .await?;
        rows.into_iter()
            .filter(|r| !r.is_empty())
            .map(|r| task_from(&pairs(r)))
            .collect()
    }
}

/// What a failed command means to the caller: the server unreachable, a duplicate id, the
/// server out of memory, or anything else the server said.
fn broker_error(addr: &str, error: RedisError) -> BrokerError {
    if error.is_io_error()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
    {
        BrokerError::Unavailable(format!(
            "the redis server at {addr} is unreachable: {error}"
        ))
    } else if error.code() == Some("NOPARENT") {
        // A parent that went away between its lookup and the script.
        match error.detail().and_then(|d| d.trim().parse().ok()) {
            Some(id) => BrokerError::NotFound(id),
            None => BrokerError::Storage(format!("redis at {addr}: {error}")),
        }
    } else if error.code() == Some("DUPLICATE") {
        BrokerError::Conflict(error.detail().unwrap_or("duplicate task id").to_string())
    } else if error.code() == Some("OOM") || error.to_string().contains("OOM command not allowed") {
        // Also inside a script, where the server's error comes back wrapped.
        BrokerError::Full(format!(
            "the redis server at {addr} is out of memory (its maxmemory is reached and its policy evicts nothing): free memory there or raise maxmemory (`CONFIG SET maxmemory`); tasks wait meanwhile. The server said: {error}"
        ))
    } else {
        BrokerError::Storage(format!("redis at {addr}: {error}"))
    }
}

/// A flat `HGETALL` answer as a map.
fn pairs(row: Vec<String>) -> HashMap<String, String> {
    let mut h = HashMap::with_capacity(row.len() / 2);
    let mut it = row.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        h.insert(k, v);
    }
    h
}

fn field<'a>(hash: &'a HashMap<String, String>, key: &str) -> Result<&'a str> {
    hash.get(key)
        .map(String::as_str)
        .ok_or_else(|| BrokerError::Storage(format!("a task record lacks `{key}`")))
}

fn num<T: std::str::FromStr>(hash: &HashMap<String, String>, key: &str) -> Result<T> {
    field(hash, key)?
        .parse()
        .map_err(|_| BrokerError::Storage(format!("a task record's `{key}` is not a number")))
}

fn opt_num<T: std::str::FromStr>(hash: &HashMap<String, String>, key: &str) -> Option<T> {
    hash.get(key).and_then(|v| v.parse().ok())
}

fn task_from(hash: &HashMap<String, String>) -> Result<TaskRecord> {
    let bad = |what: &str, e: String| BrokerError::Storage(format!("a task record's {what}: {e}"));
    let (payload, payload_b64) = crate::model::read_stored_payload(field(hash, "payload")?)
        .map_err(|e| bad("payload", e))?;
    Ok(TaskRecord {
        id: field(hash, "id")?.parse().map_err(|e| bad("id", e))?,
        queue: field(hash, "queue")?.parse().map_err(|e| bad("queue", e))?,
        state: field(hash, "state")?.parse().map_err(|e| bad("state", e))?,
        payload,
        payload_b64,
        args: serde_json::from_str(field(hash, "args")?).map_err(|e| bad("args", e.to_string()))?,
        priority: num(hash, "priority")?,
        unique_key: hash.get("unique_key").cloned(),
        run_at: num(hash, "run_at")?,
        attempts: num(hash, "attempts")?,
        created_at: num(hash, "created_at")?,
        updated_at: num(hash, "updated_at")?,
        finished_at: opt_num(hash, "finished_at"),
        last_error: hash.get("last_error").cloned(),
        cancel_requested: hash.get("cancel_requested").map(String::as_str) == Some("1"),
        node: hash.get("node").cloned().map(NodeId::from),
        schedule: hash.get("schedule").cloned(),
        slot: opt_num(hash, "slot"),
        after: hash
            .get("after")
            .map(|a| crate::model::parse_after(a))
            .transpose()
            .map_err(|e| bad("after", e))?
            .unwrap_or_default(),
        expires_at: opt_num(hash, "expires_at"),
    })
}

const STATES: [TaskState; 7] = TaskState::ALL;

#[async_trait]
impl Broker for RedisBroker {
    async fn enqueue(&self, tasks: Vec<NewTask>) -> Result<Vec<Enqueued>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        // One script per queue: a batch of one queue (the usual case) is all or nothing.
        let mut by_queue: BTreeMap<QueueName, Vec<usize>> = BTreeMap::new();
        for (i, t) in tasks.iter().enumerate() {
            by_queue.entry(t.queue.clone()).or_default().push(i);
        }
        // The queue of every parent (rule 13): the script links a dependant to its parents
        // in their queues' keys. A parent earlier in the batch is looked up there.
        let mut parent_queue: HashMap<TaskId, QueueName> = HashMap::new();
        for t in &tasks {
            for p in &t.after {
                if parent_queue.contains_key(p) {
                    continue;
                }
                let q = match tasks.iter().find(|o| o.id == *p) {
                    Some(o) => o.queue.clone(),
                    None => self.locate(*p).await?.ok_or(BrokerError::NotFound(*p))?,
                };
                parent_queue.insert(*p, q);
            }
        }
        let mut out: Vec<Option<Enqueued>> = vec![None; tasks.len()];
        for (q, idx) in by_queue {
            self.know(&q).await?;
            if idx.iter().all(|&i| plain(&tasks[i])) {
                let created = self.push(&q, idx.iter().map(|&i| &tasks[i])).await?;
                for &i in &idx {
                    out[i] = Some(Enqueued {
                        id: tasks[i].id,
                        state: TaskState::Queued,
                        existing: false,
                        created_at: created,
                        run_at: created,
                    });
                }
                continue;
            }
            let mut inv = scripts().enqueue.key(prefix(&q));
            inv.arg(idx.len());
            for &i in &idx {
                let t = &tasks[i];
                let args = serde_json::to_string(&t.args)
                    .map_err(|e| BrokerError::Storage(e.to_string()))?;
                inv.arg(t.id.to_string())
                    .arg(&t.payload)
                    .arg(args)
                    .arg(t.priority)
                    .arg(
                        t.unique_key
                            .as_ref()
                            .map(|k| format!("k:{k}"))
                            .unwrap_or_default(),
                    )
                    .arg(t.run_at.map(|r| r.to_string()).unwrap_or_default())
                    .arg(t.unique_for.map(|u| u.to_string()).unwrap_or_default())
                    .arg(
                        t.after
                            .iter()
                            .map(|p| format!("{}\x1f{p}", parent_queue[p]))
                            .collect::<Vec<_>>()
                            .join(","),
                    )
                    .arg(schedules::key_arg(&t.flow_key))
                    .arg(schedules::key_arg(&t.rate_key))
                    .arg(t.expires_at.map(|e| e.to_string()).unwrap_or_default());
            }
            let flat: Vec<String> = inv
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            for (&i, c) in idx.iter().zip(flat.chunks(5)) {
                let [id, state, existing, created, run_at] = c else {
                    return Err(BrokerError::Storage("enqueue returned a short row".into()));
                };
                out[i] = Some(Enqueued {
                    id: id.parse().map_err(BrokerError::Storage)?,
                    state: state.parse().map_err(BrokerError::Storage)?,
                    existing: existing == "1",
                    created_at: created.parse().unwrap_or_default(),
                    run_at: run_at.parse().unwrap_or_default(),
                });
            }
        }
        out.into_iter()
            .map(|e| e.ok_or_else(|| BrokerError::Storage("enqueue lost an answer".into())))
            .collect()
    }

    fn set_flow(&self, queue: &QueueName, flow: Flow) {
        self.flow.set(queue, flow);
    }

    fn flow_wait(&self, queue: &QueueName) -> Option<UnixMs> {
        self.flow.wait(queue)
    }

    async fn flow_state(&self, queue: &QueueName, id: TaskId) -> Result<FlowState> {
        let keyed = self.flow.get(queue).rate.is_some_and(|r| r.keyed);
        let r: Vec<String> = scripts()
            .flowstate
            .key(prefix(queue))
            .arg(id.to_string())
            .arg(if keyed { "1" } else { "0" })
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        if r.len() < 3 {
            return Err(BrokerError::NotFound(id));
        }
        let key = |s: &str| s.strip_prefix("k:").map(str::to_string);
        let mut key_holders = Vec::new();
        for h in &r[3..] {
            key_holders.push(h.parse().map_err(BrokerError::Storage)?);
        }
        Ok(FlowState {
            flow_key: key(&r[0]),
            rate_key: key(&r[1]),
            rate_tat_us: r[2].parse().ok(),
            key_holders,
        })
    }

    async fn claim(
        &self,
        node: &NodeId,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        self.claim_in(node, queue, max, lease).await
    }

    async fn expire(&self) -> Result<Vec<(TaskId, QueueName)>> {
        let mut out = Vec::new();
        for q in self.queue_names().await? {
            let ids: Vec<String> = scripts()
                .expire
                .key(prefix(&q))
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            for id in ids {
                out.push((id.parse().map_err(BrokerError::Storage)?, q.clone()));
            }
        }
        Ok(out)
    }

    async fn started(&self, lease: &Lease, pid: i32, pid_start: u64) -> Result<()> {
        let Some(q) = self.locate(lease.task).await? else {
            return Err(BrokerError::NotFound(lease.task));
        };
        let r: String = scripts()
            .started
            .key(prefix(&q))
            .arg(lease.task.to_string())
            .arg(lease.token)
            .arg(lease.node.as_str())
            .arg(pid)
            .arg(pid_start)
            .arg(boot_id())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        match r.as_str() {
            "ok" => Ok(()),
            "missing" => Err(BrokerError::NotFound(lease.task)),
            _ => Err(BrokerError::LeaseLost(lease.task)),
        }
    }

    async fn renew(&self, leases: &[Lease], lease: Duration) -> Result<Vec<TaskId>> {
        let mut lost = Vec::new();
        let mut by_queue: BTreeMap<QueueName, Vec<&Lease>> = BTreeMap::new();
        for l in leases {
            match self.locate(l.task).await? {
                Some(q) => by_queue.entry(q).or_default().push(l),
                None => lost.push(l.task),
            }
        }
        for (q, ls) in by_queue {
            let mut inv = scripts().renew.key(prefix(&q));
            inv.arg(lease.as_millis() as u64);
            for l in ls {
                inv.arg(l.task.to_string())
                    .arg(l.token)
                    .arg(l.node.as_str());
            }
            let ids: Vec<String> = inv
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            for id in ids {
                lost.push(id.parse().map_err(BrokerError::Storage)?);
            }
        }
        Ok(lost)
    }

    fn finish<'a>(
        &'a self,
        lease: &'a Lease,
        attempt: AttemptRecord,
        next: Finish,
    ) -> Queued<'a, ()> {
        // A task this node claimed is located from memory, and its result handed to the
        // results writer now; any other is looked up first.
        let known = self
            .located
            .lock()
            .expect("not poisoned")
            .get(&lease.task)
            .cloned();
        match known {
            Some(q) => {
                let sent = self.queue_finish(q, lease, &attempt, next);
                Queued::new(self.finish_answer(sent, lease))
            }
            None => Queued::new(async move {
                let Some(q) = self.locate(lease.task).await? else {
                    return Err(BrokerError::NotFound(lease.task));
                };
                let sent = self.queue_finish(q, lease, &attempt, next);
                self.finish_answer(sent, lease).await
            }),
        }
    }

    async fn note_run(&self, id: TaskId, attempt: AttemptRecord) -> Result<()> {
        let Some(q) = self.locate(id).await? else {
            return Err(BrokerError::NotFound(id));
        };
        let json =
            serde_json::to_string(&attempt).map_err(|e| BrokerError::Storage(e.to_string()))?;
        let r: String = scripts()
            .note
            .key(prefix(&q))
            .arg(id.to_string())
            .arg(json)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        match r.as_str() {
            "ok" => Ok(()),
            _ => Err(BrokerError::NotFound(id)),
        }
    }

    async fn cancel(&self, id: TaskId) -> Result<CancelOutcome> {
        let r = self.run_on_task(&scripts().cancel, id).await?;
        match r.as_str() {
            "cancelled" => Ok(CancelOutcome::Cancelled),
            "requested" => Ok(CancelOutcome::Requested),
            "missing" => Err(BrokerError::NotFound(id)),
            other => {
                let state = other.strip_prefix("finished:").unwrap_or(other);
                Ok(CancelOutcome::AlreadyFinished(
                    state.parse().map_err(BrokerError::Storage)?,
                ))
            }
        }
    }

    async fn retry(&self, id: TaskId) -> Result<()> {
        let r = self.run_on_task(&scripts().retry, id).await?;
        match r.as_str() {
            "ok" => Ok(()),
            "missing" => Err(BrokerError::NotFound(id)),
            "taken" => Err(BrokerError::Conflict(format!(
                "another waiting or running task of this queue holds task {id}'s unique key"
            ))),
            other => {
                let state = other.strip_prefix("state:").unwrap_or(other);
                Err(BrokerError::Conflict(format!(
                    "task {id} is {state}; only failed or cancelled tasks can be retried"
                )))
            }
        }
    }

    async fn set_paused(&self, queue: &QueueName, paused: bool) -> Result<()> {
        self.know(queue).await?;
        let key = format!("{}paused", prefix(queue));
        let mut pipe = redis::pipe();
        if paused {
            pipe.cmd("SET").arg(&key).arg(now_ms()).ignore();
        } else {
            pipe.cmd("DEL").arg(&key).ignore();
        }
        pipe.cmd("PUBLISH").arg(WAKE).arg("pause").ignore();
        let () = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn paused(&self) -> Result<BTreeSet<QueueName>> {
        let queues = self.queue_names().await?;
        if queues.is_empty() {
            return Ok(BTreeSet::new());
        }
        Ok(self
            .queues_having(queues, "paused")
            .await?
            .into_iter()
            .collect())
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskDetail>> {
        let Some(q) = self.locate(id).await? else {
            return Ok(None);
        };
        let p = prefix(&q);
        let (row, hist, result): (Vec<String>, Vec<String>, Option<String>) = redis::pipe()
            .cmd("HGETALL")
            .arg(format!("{p}t:{id}"))
            .cmd("LRANGE")
            .arg(format!("{p}h:{id}"))
            .arg(0)
            .arg(-1)
            .cmd("GET")
            .arg(format!("{p}r:{id}"))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        if row.is_empty() {
            return Ok(None);
        }
        let task = task_from(&pairs(row))?;
        let history = hist
            .iter()
            .map(|j| {
                serde_json::from_str::<AttemptRecord>(j)
                    .map_err(|e| BrokerError::Storage(format!("an attempt record: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let result = crate::broker::stored_result(id, result)?;
        Ok(Some(TaskDetail::new(task, history, result)))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>> {
        let queues = match &filter.queue {
            Some(q) => vec![q.clone()],
            None => self.queue_names().await?,
        };
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        if matches!(filter.state, None | Some(TaskState::Queued)) {
            // Tasks still in an inbox are queued too: store them so they are listed.
            let waiting = self
                .queues_where(queues.clone(), |pipe, p| {
                    pipe.cmd("LLEN").arg(format!("{p}in"));
                })
                .await?;
            for q in &waiting {
                self.store_inbox(q).await?;
            }
        }
        // The cursor: its queue and its place (seq) in that queue's `all` index.
        let after = match filter.after {
            Some(id) => {
                let q = self.locate(id).await?.ok_or(BrokerError::NotFound(id))?;
                let score: Option<f64> = redis::cmd("ZSCORE")
                    .arg(format!("{}all", prefix(&q)))
                    .arg(id.to_string())
                    .query_async(&mut self.conn())
                    .await
                    .map_err(|e| self.err(e))?;
                Some((q, score.ok_or(BrokerError::NotFound(id))?))
            }
            None => None,
        };
        let limit = if filter.limit == 0 {
            usize::MAX
        } else {
            filter.limit
        };
        let mut found: Vec<(f64, QueueName, TaskRecord)> = Vec::new();
        for q in &queues {
            // Newest first, so the lists of the queues merge into one order: by seq, then
            // (for the same seq) by queue name.
            let top = match &after {
                None => None,
                Some((cq, score)) if q > cq => Some(format!("{score}")),
                Some((_, score)) => Some(format!("({score}")),
            };
            for (seq, t) in self.list_queue(q, filter, top, limit).await? {
                found.push((seq, q.clone(), t));
            }
        }
        found.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        found.truncate(limit);
        Ok(found.into_iter().map(|(_, _, t)| t).collect())
    }

    async fn add_stats(&self, rows: &[StatRow]) -> Result<()> {
        let script = stats_script();
        let keep_s = crate::broker::STATS_KEEP_MS / 1000;
        for r in rows {
            // Read back by queue: the queue must be in the set of queues.
            self.know(&r.queue).await?;
            let () = script
                .key(format!(
                    "{}stats:{}",
                    prefix(&r.queue),
                    r.minute.div_euclid(60)
                ))
                .arg(r.minute)
                .arg(keep_s)
                .arg(
                    &[
                        r.succeeded,
                        r.failed,
                        r.retried,
                        r.cancelled,
                        r.runs,
                        r.run_ms_sum,
                        r.wait_ms_sum,
                        r.run_ms_max,
                    ][..],
                )
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    async fn stats(&self, since: UnixMs) -> Result<Vec<StatRow>> {
        let queues = self.queue_names().await?;
        let from_minute = since.div_euclid(60_000);
        // The hours to read: from `since` to an hour past this node's clock (the server's
        // may be ahead).
        let hours: Vec<i64> =
            (from_minute.div_euclid(60)..=now_ms().div_euclid(3_600_000) + 1).collect();
        let keys: Vec<(QueueName, i64)> = queues
            .iter()
            .flat_map(|q| hours.iter().map(move |h| (q.clone(), *h)))
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let hashes: Vec<Vec<String>> = self
            .pipelined(&keys, |pipe, (q, h)| {
                pipe.cmd("HGETALL").arg(format!("{}stats:{h}", prefix(q)));
            })
            .await?;
        let mut rows: BTreeMap<(i64, QueueName), StatRow> = BTreeMap::new();
        for ((q, _), h) in keys.iter().zip(hashes) {
            for (field, value) in pairs(h) {
                let Some((minute, name)) = field.split_once(':') else {
                    continue;
                };
                let (Ok(minute), Ok(v)) = (minute.parse::<i64>(), value.parse::<u64>()) else {
                    continue;
                };
                if minute < from_minute {
                    continue;
                }
                let r = rows
                    .entry((minute, q.clone()))
                    .or_insert_with(|| StatRow::new(q.clone(), minute));
                match name {
                    "succeeded" => r.succeeded = v,
                    "failed" => r.failed = v,
                    "retried" => r.retried = v,
                    "cancelled" => r.cancelled = v,
                    "runs" => r.runs = v,
                    "run_ms_sum" => r.run_ms_sum = v,
                    "wait_ms_sum" => r.wait_ms_sum = v,
                    "run_ms_max" => r.run_ms_max = v,
                    _ => {}
                }
            }
        }
        Ok(rows.into_values().collect())
    }

    async fn counts(&self) -> Result<Vec<QueueCounts>> {
        let queues = self.queue_names().await?;
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let n: Vec<Option<u64>> = self
            .pipelined(&queues, |pipe, q| {
                let p = prefix(q);
                // The inbox first: a task stored between the two reads is counted twice for
                // a moment rather than not at all.
                pipe.cmd("GET").arg(format!("{p}inn"));
                for s in STATES {
                    pipe.cmd("ZCARD").arg(format!("{p}st:{s}"));
                }
                pipe.cmd("EXISTS").arg(format!("{p}paused"));
                pipe.cmd("LLEN").arg(format!("{p}dup"));
                pipe.cmd("LLEN").arg(format!("{p}bad"));
            })
            .await?;
        let mut out = Vec::new();
        for (q, row) in queues.into_iter().zip(n.chunks(STATES.len() + 4)) {
            let row: Vec<u64> = row.iter().map(|n| n.unwrap_or(0)).collect();
            let (unstored, row) = (row[0], &row[1..]);
            let paused = row[STATES.len()] > 0;
            let mut counts: BTreeMap<TaskState, u64> = STATES
                .iter()
                .zip(row)
                .filter(|(_, n)| **n > 0)
                .map(|(s, n)| (*s, *n))
                .collect();
            // Tasks still in the inbox are queued.
            if unstored > 0 {
                *counts.entry(TaskState::Queued).or_default() += unstored;
            }
            let set_aside = row[STATES.len() + 1] + row[STATES.len() + 2];
            if counts.is_empty() && !paused && set_aside == 0 {
                continue;
            }
            out.push(QueueCounts {
                queue: Some(q),
                counts,
                paused,
                set_aside,
            });
        }
        Ok(out)
    }

    async fn next_due(&self) -> Result<Option<UnixMs>> {
        let queues = self.queue_names().await?;
        if queues.is_empty() {
            return Ok(None);
        }
        let rows: Vec<redis::Value> = self
            .pipelined(&queues, |pipe, q| {
                let p = prefix(q);
                pipe.cmd("EXISTS").arg(format!("{p}paused"));
                pipe.cmd("ZRANGE")
                    .arg(format!("{p}waiting"))
                    .arg(0)
                    .arg(0)
                    .arg("WITHSCORES");
            })
            .await?;
        let mut best: Option<UnixMs> = None;
        for pair in rows.chunks(2) {
            let paused: i64 = redis::from_redis_value(&pair[0]).map_err(|e| self.err(e))?;
            if paused > 0 {
                continue;
            }
            let first: Vec<(String, f64)> =
                redis::from_redis_value(&pair[1]).map_err(|e| self.err(e))?;
            if let Some((_, at)) = first.first() {
                let at = *at as UnixMs;
                best = Some(best.map_or(at, |b| b.min(at)));
            }
        }
        Ok(best)
    }

    async fn count_state(&self, state: TaskState) -> Result<u64> {
        let queues = self.queue_names().await?;
        if queues.is_empty() {
            return Ok(0);
        }
        let n: Vec<Option<u64>> = self
            .pipelined(&queues, |pipe, q| {
                if state == TaskState::Queued {
                    // Tasks still in the inbox are queued (read first, as in `counts`).
                    pipe.cmd("GET").arg(format!("{}inn", prefix(q)));
                }
                pipe.cmd("ZCARD").arg(format!("{}st:{state}", prefix(q)));
            })
            .await?;
        Ok(n.into_iter().flatten().sum())
    }

    async fn cancel_requested(&self, node: &NodeId) -> Result<Vec<TaskId>> {
        let queues = self.queue_names().await?;
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let sets: Vec<Vec<String>> = self
            .pipelined(&queues, |pipe, q| {
                pipe.cmd("SMEMBERS").arg(format!("{}cancel", prefix(q)));
            })
            .await?;
        let asked: Vec<(QueueName, String)> = queues
            .into_iter()
            .zip(sets)
            .flat_map(|(q, ids)| ids.into_iter().map(move |id| (q.clone(), id)))
            .collect();
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        let holders: Vec<Option<String>> = self
            .pipelined(&asked, |pipe, (q, id)| {
                pipe.cmd("HGET")
                    .arg(format!("{}t:{id}", prefix(q)))
                    .arg("node");
            })
            .await?;
        let mut out = Vec::new();
        for ((_, id), holder) in asked.into_iter().zip(holders) {
            if holder.as_deref() == Some(node.as_str()) {
                out.push(id.parse().map_err(BrokerError::Storage)?);
            }
        }
        Ok(out)
    }

    async fn adopt_started(&self, ids: &[TaskId]) -> Result<u64> {
        let mut by_queue: BTreeMap<QueueName, Vec<TaskId>> = BTreeMap::new();
        for id in ids {
            if let Some(q) = self.locate(*id).await? {
                by_queue.entry(q).or_default().push(*id);
            }
        }
        let mut n = 0;
        for (q, ids) in by_queue {
            let mut inv = scripts().adopt.key(prefix(&q));
            for id in ids {
                inv.arg(id.to_string());
            }
            let m: u64 = inv
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            n += m;
        }
        Ok(n)
    }

    async fn recover_limited(
        &self,
        scope: Recover,
        note: &str,
        limits: &LostLimits,
    ) -> Result<Vec<Orphan>> {
        let (all, delta) = match scope {
            Recover::All => (true, 0),
            // The cut-off is the caller's time; the script applies the same distance from
            // now to the server's clock, which decides expiry.
            Recover::Expired(t) => (false, t - now_ms()),
        };
        let mut out = Vec::new();
        for q in self.queue_names().await? {
            out.extend(self.recover_in(&q, all, delta, note, limits.of(&q)).await?);
        }
        Ok(out)
    }

    async fn subscribe(&self) -> Result<Wakeups> {
        let wakeups = Wakeups::default();
        let first = subscribe_once(&self.client, &self.addr).await?;
        // A subscriber is a daemon: it also stores what producers leave in the inboxes,
        // whenever one says `work`, so that its claims and everyone's lookups find them
        // stored. Any number of nodes may do so at once: each step takes distinct entries.
        let store = std::sync::Arc::new(tokio::sync::Notify::new());
        {
            let store = store.clone();
            let mut conn = self.conn();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = store_inboxes(&mut conn).await {
                        tracing::debug!(error = %e, "could not store the queues' inboxes");
                    }
                    tokio::select! {
                        _ = store.notified() => {}
                        _ = tokio::time::sleep(STORE_TICK) => {}
                    }
                }
            });
        }
        let w = wakeups.clone();
        let client = self.client.clone();
        let addr = self.addr.clone();
        tokio::spawn(async move {
            let mut pubsub = Some(first);
            let mut backoff = Doubling::new(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                if let Some(ps) = pubsub.take() {
                    backoff.reset();
                    let mut stream = ps.into_on_message();
                    while let Some(msg) = stream.next().await {
                        match msg.get_payload_bytes() {
                            b"cancel" => w.cancel.notify_one(),
                            b"pause" => w.pause.notify_one(),
                            b"sched" => w.sched.notify_one(),
                            b"schedules" => w.schedules.notify_one(),
                            _ => {
                                w.work.notify_one();
                                store.notify_one();
                            }
                        }
                    }
                    tracing::warn!(redis = %addr, "lost the wake-up subscription; reconnecting");
                }
                tokio::time::sleep(backoff.next_delay()).await;
                match subscribe_once(&client, &addr).await {
                    Ok(ps) => {
                        tracing::info!(redis = %addr, "wake-up subscription back");
                        pubsub = Some(ps);
                        // Anything may have happened meanwhile.
                        w.work.notify_one();
                        store.notify_one();
                        w.cancel.notify_one();
                        w.pause.notify_one();
                        w.sched.notify_one();
                        w.schedules.notify_one();
                    }
                    Err(e) => tracing::debug!(error = %e, "wake-up subscription still down"),
                }
            }
        });
        Ok(wakeups)
    }

    fn shared(&self) -> bool {
        true
    }

    async fn audit(&self, entry: &AuditEntry, keep: usize) -> Result<()> {
        let json = serde_json::to_string(entry).map_err(|e| BrokerError::Storage(e.to_string()))?;
        // Exact trimming (not `~`): the stream holds the newest `keep`, no more. XADD trims
        // in the same command, from the oldest end.
        let _: String = redis::cmd("XADD")
            .arg(AUDIT)
            .arg("MAXLEN")
            .arg(keep.max(1))
            .arg("*")
            .arg("r")
            .arg(json)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let end = match &filter.before {
            Some(b) if stream_id(b).is_some() => format!("({b}"),
            Some(b) => {
                return Err(BrokerError::Conflict(format!(
                    "`{b}` is not an audit record id of this store"
                )))
            }
            None => "+".to_string(),
        };
        let start = match filter.since {
            Some(t) => t.max(0).to_string(),
            None => "-".to_string(),
        };
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(AUDIT).arg(end).arg(start);
        if filter.limit > 0 {
            cmd.arg("COUNT").arg(filter.limit);
        }
        let rows: Vec<(String, Vec<(String, String)>)> = cmd
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        rows.into_iter()
            .map(|(id, fields)| {
                let at = stream_id(&id).map(|(ms, _)| ms).ok_or_else(|| {
                    BrokerError::Storage(format!("{AUDIT}: entry id `{id}` is not a stream id"))
                })?;
                let json = fields
                    .into_iter()
                    .find(|(k, _)| k == "r")
                    .map(|(_, v)| v)
                    .ok_or_else(|| {
                        BrokerError::Storage(format!("{AUDIT}: entry {id} has no `r`"))
                    })?;
                let entry = serde_json::from_str(&json).map_err(|e| {
                    BrokerError::Storage(format!("{AUDIT}: entry {id} cannot be read: {e}"))
                })?;
                Ok(AuditRecord { id, at, entry })
            })
            .collect()
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
        self.store_size_in().await
    }

    async fn heartbeat(&self, node: &NodeInfo) -> Result<()> {
        // The script appends the heartbeat to the record as text: decoding and encoding it in
        // Lua would turn an empty `queues` array into an object.
        let mut record =
            serde_json::to_value(node).map_err(|e| BrokerError::Storage(e.to_string()))?;
        if let Some(m) = record.as_object_mut() {
            m.remove("last_heartbeat");
        }
        let json = record.to_string();
        let _: String = scripts()
            .heartbeat
            .key(NODES)
            .arg(node.id.as_str())
            .arg(json)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn leave(&self, node: &NodeId) -> Result<()> {
        let _: i64 = redis::cmd("HDEL")
            .arg(NODES)
            .arg(node.as_str())
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        let (raw, time): (HashMap<String, String>, Vec<String>) = redis::pipe()
            .cmd("HGETALL")
            .arg(NODES)
            .cmd("TIME")
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        let now = server_ms(&time).unwrap_or_else(now_ms);
        let mut out: Vec<NodeInfo> = raw
            .values()
            .filter_map(|j| serde_json::from_str::<NodeInfo>(j).ok())
            .filter(|n| now - n.last_heartbeat < NODE_FORGET_MS)
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let get = |name: &'static str| {
            let mut c = self.conn();
            async move {
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async::<Vec<String>>(&mut c)
                    .await
            }
        };
        match get("appendonly").await {
            Ok(v) if v.get(1).map(String::as_str) == Some("yes") => {}
            Ok(_) => out.push(format!(
                "the redis server at {} runs with appendonly no: tasks acknowledged since its last snapshot are lost if it restarts; set `appendonly yes`",
                self.addr
            )),
            Err(e) => out.push(format!(
                "could not read the redis server's `appendonly` setting ({e}); make sure it is `yes`"
            )),
        }
        match get("appendfsync").await {
            Ok(v) if v.get(1).map(String::as_str) == Some("no") => out.push(format!(
                "the redis server at {} runs with appendfsync no: a power loss can lose acknowledged tasks; use `everysec` or `always`",
                self.addr
            )),
            _ => {}
        }
        match get("maxmemory-policy").await {
            Ok(v) if v.get(1).map(String::as_str) == Some("noeviction") => {}
            Ok(v) => out.push(format!(
                "the redis server at {} has maxmemory-policy {}: it may evict tasks when memory is full; set `maxmemory-policy noeviction`",
                self.addr,
                v.get(1).map(String::as_str).unwrap_or("unknown")
            )),
            Err(e) => out.push(format!(
                "could not read the redis server's `maxmemory-policy` ({e}); make sure it is `noeviction`"
            )),
        }
        Ok(out)
    }
}

/// A stream entry id, `<ms>-<n>`, as its two numbers.
fn stream_id(id: &str) -> Option<(UnixMs, u64)> {
    let (ms, n) = id.split_once('-')?;
    Some((ms.parse().ok()?, n.parse().ok()?))
}

fn server_ms(time: &[String]) -> Option<UnixMs> {
    let s: i64 = time.first()?.parse().ok()?;
    let us: i64 = time.get(1)?.parse().ok()?;
    Some(s * 1000 + us / 1000)
}

async fn subscribe_once(client: &redis::Client, addr: &str) -> Result<redis::aio::PubSub> {
    let fut = async {
        let mut ps = client.get_async_pubsub().await?;
        ps.subscribe(WAKE).await?;
        Ok::<_, RedisError>(ps)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(Ok(ps)) => Ok(ps),
        Ok(Err(e)) => Err(BrokerError::Unavailable(format!(
            "cannot subscribe to wake-ups on the redis server at {addr}: {e}"
        ))),
        Err(_) => Err(BrokerError::Unavailable(format!(
            "cannot subscribe to wake-ups on the redis server at {addr}: timed out"
        ))),
    }
}
