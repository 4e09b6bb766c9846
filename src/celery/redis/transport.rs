//! kombu's Redis transport, consumed the way a Celery worker consumes it, so that Celery
//! workers and taskd nodes can share one Redis and restore each other's messages:
//!
//! - a queue `Q` is the list `Q` plus one list per priority step (`Q\x06\x163`,
//!   `Q\x06\x166`, `Q\x06\x169`); producers `LPUSH`, consumers pop the other end; the
//!   steps are served lowest first, the queues in turn within a step (kombu's BRPOP order);
//! - a taken message is recorded in `unacked` (hash: delivery tag → `[envelope, exchange,
//!   routing key]`) and `unacked_index` (sorted set: tag → time taken) — here in the same
//!   Lua script as the pop, so that no crash can lose it between the two — and removed from
//!   both once acknowledged, which taskd does only after the task is durable in its store;
//! - anyone may put back a message whose record is older than the visibility timeout (its
//!   consumer died): `RPUSH` to its queue's list for its priority, so it is served next.
//!   taskd sweeps at start and every [`RESTORE_EVERY`], as kombu does;
//! - `_kombu.binding.Q` holds `Q\x06\x16\x06\x16Q` for every consumed queue (a producer that
//!   publishes through the `celery` exchange finds its queue there);
//! - revoke: `app.control.revoke(id)` publishes a kombu message on the channel
//!   `/<db>.celery.pidbox`, whose body is `{"method": "revoke", "arguments": {"task_id": …}}`.
//!
//! One consumer per node: the script pops atomically, so several nodes (and Celery workers)
//! never take one message twice.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde_json::Value;

use crate::backoff::Doubling;
use crate::celery::ingest::PriorityOrder;
use crate::celery::message::{from_kombu_envelope, read_kombu_envelope, Delivery};
use crate::celery::{Bridge, Ingested};
use crate::model::TaskId;

/// kombu's separator between a queue's name and its priority step.
pub const SEP: &str = "\x06\x16";
/// kombu's default priority steps.
const STEPS: [u8; 4] = [0, 3, 6, 9];
/// How many messages one take moves at most (and one store write holds): enough that the
/// store's commit, which waits for the disk, is paid by many messages; few enough that the
/// take (one script, during which Redis answers nobody else) stays within milliseconds.
const BATCH: usize = 500;
/// How often abandoned messages are looked for (kombu's sweep is about as often).
pub const RESTORE_EVERY: Duration = Duration::from_secs(10);

/// Pops up to ARGV[2] messages from KEYS (in order), recording each in `unacked` and
/// `unacked_index` (ARGV[1]: the time, s). Returns the messages popped.
const TAKE: &str = r#"
local out = {}
local want = tonumber(ARGV[2])
for i = 1, #KEYS do
  while #out < want do
    local m = redis.call('RPOP', KEYS[i])
    if not m then break end
    local ok, env = pcall(cjson.decode, m)
    local props = ok and type(env) == 'table' and env['properties'] or nil
    local tag = type(props) == 'table' and props['delivery_tag'] or nil
    if type(tag) == 'string' then
      local info = props['delivery_info']
      local ex, rk = '', KEYS[i]
      if type(info) == 'table' then
        if type(info['exchange']) == 'string' then ex = info['exchange'] end
        if type(info['routing_key']) == 'string' then rk = info['routing_key'] end
      end
      redis.call('ZADD', 'unacked_index', ARGV[1], tag)
      redis.call('HSET', 'unacked', tag, '[' .. m .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']')
    end
    out[#out + 1] = m
  end
end
return out
"#;

/// Puts back one abandoned message if its record is still ARGV[1] (nobody restored or
/// acknowledged it meanwhile): removes the record and RPUSHes ARGV[2] to KEYS[1].
const RESTORE: &str = r#"
if redis.call('HGET', 'unacked', ARGV[3]) ~= ARGV[1] then return 0 end
redis.call('ZREM', 'unacked_index', ARGV[3])
redis.call('HDEL', 'unacked', ARGV[3])
redis.call('RPUSH', KEYS[1], ARGV[2])
return 1
"#;

/// The list a message of `queue` with `priority` is pushed to (kombu's `_q_for_pri`).
pub fn queue_key(queue: &str, priority: u8) -> String {
    let step = STEPS
        .iter()
        .rev()
        .find(|s| **s <= priority.min(9))
        .copied()
        .unwrap_or(0);
    if step == 0 {
        queue.to_string()
    } else {
        format!("{queue}{SEP}{step}")
    }
}

/// The lists to take from, in kombu's order: each priority step, each queue in it.
fn take_keys(queues: &[String]) -> Vec<String> {
    STEPS
        .iter()
        .flat_map(|p| queues.iter().map(move |q| queue_key(q, *p)))
        .collect()
}

fn now_s() -> f64 {
    crate::model::now_ms() as f64 / 1000.0
}

/// The Redis transport of one daemon.
pub struct RedisTransport {
    client: redis::Client,
    conn: ConnectionManager,
    addr: String,
    db: i64,
    queues: Vec<String>,
    visibility: Duration,
}

impl RedisTransport {
    /// Connect to the Celery broker at `url`, consuming `queues`.
    pub async fn open(
        url: &str,
        queues: Vec<String>,
        visibility: Duration,
    ) -> Result<RedisTransport, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = redis::Client::open(url)
            .map_err(|e| format!("invalid Redis URL: {}", e.to_string().replace(url, "<url>")))?;
        let addr = client.get_connection_info().addr.to_string();
        let db = client.get_connection_info().redis.db;
        let conn = ConnectionManager::new(client.clone())
            .await
            .map_err(|e| format!("cannot reach the Celery broker at {addr}: {e}"))?;
        Ok(RedisTransport {
            client,
            conn,
            addr,
            db,
            queues,
            visibility,
        })
    }

    /// Where it reads, for people (no password).
    pub fn describe(&self) -> String {
        format!("redis at {} (db {})", self.addr, self.db)
    }

    /// Run until `stop`: bind the queues, restore abandoned messages, take and ingest
    /// messages, listen for revokes. Errors are logged and retried with backoff.
    pub async fn run(
        self: Arc<Self>,
        bridge: Arc<Bridge>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let revokes = tokio::spawn(self.clone().revokes(bridge.clone(), stop.clone()));
        let restore = tokio::spawn(self.clone().restore_loop(stop.clone()));
        self.consume(&bridge, &stop).await;
        let _ = revokes.await;
        let _ = restore.await;
    }

    async fn bind(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for q in &self.queues {
            pipe.sadd(format!("_kombu.binding.{q}"), format!("{q}{SEP}{SEP}{q}"))
                .ignore();
        }
        pipe.query_async(&mut conn).await
    }

    /// Take, ingest, acknowledge, until `stop`. The next batch is taken while the last one
    /// is being stored (a store write waits for its disk, a take for Redis: overlapped,
    /// neither waits for the other), so at most two batches are taken and not acknowledged.
    async fn consume(&self, bridge: &Bridge, stop: &tokio_util::sync::CancellationToken) {
        let script = redis::Script::new(TAKE);
        let mut queues = self.queues.clone();
        let mut idle = Doubling::new(Duration::from_millis(2), Duration::from_millis(100));
        let mut failing = Doubling::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut bound = false;
        let mut taken: Vec<String> = Vec::new();
        while !stop.is_cancelled() {
            if !bound {
                match self.bind().await {
                    Ok(()) => bound = true,
                    Err(e) => {
                        tracing::warn!(broker = %self.describe(), error = %e, "Celery bridge: cannot bind its queues; retrying");
                        pause(stop, failing.next_delay()).await;
                        continue;
                    }
                }
            }
            let next = if taken.is_empty() {
                self.take(&script, &queues).await
            } else {
                let batch = std::mem::take(&mut taken);
                let (_, next) = tokio::join!(self.ingest_all(bridge, batch, stop), async {
                    if stop.is_cancelled() {
                        Ok(Vec::new())
                    } else {
                        self.take(&script, &queues).await
                    }
                });
                next
            };
            match next {
                Ok(t) => {
                    failing.reset();
                    taken = t;
                }
                Err(e) => {
                    tracing::warn!(broker = %self.describe(), error = %e, "Celery bridge: cannot take messages; retrying");
                    pause(stop, failing.next_delay()).await;
                    continue;
                }
            }
            if taken.is_empty() {
                pause(stop, idle.next_delay()).await;
                continue;
            }
            idle.reset();
            // Serve the queues in turn (kombu's round robin).
            queues.rotate_left(1);
        }
        if !taken.is_empty() {
            // Taken as `stop` came: stored and acknowledged like the others.
            self.ingest_all(bridge, taken, stop).await;
        }
    }

    /// Up to [`BATCH`] messages off `queues`' lists, recorded as taken.
    async fn take(
        &self,
        script: &redis::Script,
        queues: &[String],
    ) -> redis::RedisResult<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut invocation = script.prepare_invoke();
        for k in take_keys(queues) {
            invocation.key(k);
        }
        invocation.arg(now_s()).arg(BATCH);
        invocation.invoke_async(&mut conn).await
    }

    /// Ingest `taken` (one store write for all of their tasks), then acknowledge each one
    /// that is durable; one that is not stays in `unacked` and is
    /// tried again until it is.
    async fn ingest_all(
        &self,
        bridge: &Bridge,
        taken: Vec<String>,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        // Each envelope read once: its delivery (or why it is none) and its tag.
        let mut pending: Vec<(Result<Delivery, String>, Option<String>)> =
            taken.iter().map(|m| read_kombu_envelope(m)).collect();
        let mut failing = Doubling::new(Duration::from_millis(200), Duration::from_secs(10));
        while !pending.is_empty() {
            // Every kombu envelope in one store write; one that is not (no id can be read)
            // is refused alone: nothing to fail.
            let mut results: Vec<Option<Result<Ingested, crate::celery::IngestError>>> =
                vec![None; pending.len()];
            let mut readable = Vec::new();
            let mut deliveries = Vec::new();
            for (i, (d, _)) in pending.iter().enumerate() {
                match d {
                    Ok(d) => {
                        readable.push(i);
                        deliveries.push(d.clone());
                    }
                    Err(why) => {
                        tracing::warn!(reason = "malformed", detail = %why, "Celery message refused: not a kombu message; dropped");
                        bridge.refused_unreadable();
                        results[i] = Some(Ok(Ingested::Refused(
                            crate::celery::message::Reason::Malformed,
                        )));
                    }
                }
            }
            let answers = bridge
                .ingest_batch(&deliveries, PriorityOrder::LowerFirst)
                .await;
            for (i, a) in readable.iter().zip(answers) {
                results[*i] = Some(a);
            }
            let results = results
                .into_iter()
                .map(|r| r.expect("every message answered"));
            let mut acks = Vec::new();
            let mut again = Vec::new();
            for ((d, tag), r) in pending.into_iter().zip(results) {
                match r {
                    Ok(_) => acks.extend(tag),
                    Err(e) => {
                        tracing::warn!(error = %e, "Celery bridge: a message could not be ingested yet; retrying");
                        again.push((d, tag));
                    }
                }
            }
            self.ack(&acks).await;
            pending = again;
            if !pending.is_empty() {
                if stop.is_cancelled() {
                    // Left in `unacked`: restored after the visibility timeout.
                    return;
                }
                pause(stop, failing.next_delay()).await;
            }
        }
    }

    /// Remove the records of acknowledged messages, retrying while Redis does not answer.
    async fn ack(&self, tags: &[String]) {
        if tags.is_empty() {
            return;
        }
        let mut failing = Doubling::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..20 {
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<()> = redis::pipe()
                .atomic()
                .zrem("unacked_index", tags)
                .ignore()
                .hdel("unacked", tags)
                .ignore()
                .query_async(&mut conn)
                .await;
            match r {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "Celery bridge: cannot acknowledge messages; retrying");
                    tokio::time::sleep(failing.next_delay()).await;
                }
            }
        }
        // Given up: the records stay, and the messages are delivered again after the
        // visibility timeout, when ingest finds their tasks stored (one task each).
    }

    async fn restore_loop(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            match self.restore().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    count = n,
                    "Celery bridge: restored messages a consumer took and never acknowledged"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "Celery bridge: cannot restore unacknowledged messages")
                }
            }
            if pause(&stop, RESTORE_EVERY).await {
                return;
            }
        }
    }

    /// Put back the messages taken longer ago than the visibility timeout and never
    /// acknowledged (kombu's `restore_visible`); returns how many.
    pub async fn restore(&self) -> redis::RedisResult<usize> {
        let mut conn = self.conn.clone();
        let ceiling = now_s() - self.visibility.as_secs_f64();
        let tags: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg("unacked_index")
            .arg("-inf")
            .arg(ceiling)
            .arg("LIMIT")
            .arg(0)
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        let script = redis::Script::new(RESTORE);
        let mut n = 0;
        for tag in tags {
            let record: Option<String> = redis::cmd("HGET")
                .arg("unacked")
                .arg(&tag)
                .query_async(&mut conn)
                .await?;
            let Some(record) = record else {
                // Acknowledged meanwhile, or a record without its entry: drop the index.
                let _: () = redis::cmd("ZREM")
                    .arg("unacked_index")
                    .arg(&tag)
                    .query_async(&mut conn)
                    .await?;
                continue;
            };
            let Some((key, message)) = self.restored(&record, &mut conn).await else {
                continue;
            };
            let done: i64 = script
                .key(key)
                .arg(&record)
                .arg(message)
                .arg(&tag)
                .invoke_async(&mut conn)
                .await?;
            n += done as usize;
        }
        Ok(n)
    }

    /// The list to put a record's message back on, and the message marked redelivered.
    async fn restored(
        &self,
        record: &str,
        conn: &mut ConnectionManager,
    ) -> Option<(String, String)> {
        let v: Value = serde_json::from_str(record).ok()?;
        let mut envelope = v.get(0)?.clone();
        let exchange = v.get(1).and_then(Value::as_str).unwrap_or("");
        let routing_key = v.get(2).and_then(Value::as_str).unwrap_or("");
        let queue = if exchange.is_empty() {
            routing_key.to_string()
        } else {
            // Through the exchange's bindings, as the producer's publish went.
            let members: Vec<String> = redis::cmd("SMEMBERS")
                .arg(format!("_kombu.binding.{exchange}"))
                .query_async(conn)
                .await
                .ok()?;
            members
                .iter()
                .filter_map(|m| {
                    let mut parts = m.split(SEP);
                    let (rk, _pattern, q) = (parts.next()?, parts.next()?, parts.next()?);
                    (rk == routing_key).then(|| q.to_string())
                })
                .next()
                .unwrap_or_else(|| routing_key.to_string())
        };
        let priority = envelope
            .pointer("/properties/priority")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .min(9) as u8;
        if let Some(h) = envelope.get_mut("headers").and_then(Value::as_object_mut) {
            h.insert("redelivered".into(), Value::Bool(true));
        }
        if let Some(i) = envelope
            .pointer_mut("/properties/delivery_info")
            .and_then(Value::as_object_mut)
        {
            i.insert("redelivered".into(), Value::Bool(true));
        }
        Some((queue_key(&queue, priority), envelope.to_string()))
    }

    /// Revokes broadcast on `/<db>.celery.pidbox`, until `stop`.
    async fn revokes(
        self: Arc<Self>,
        bridge: Arc<Bridge>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let channel = format!("/{}.celery.pidbox", self.db);
        let mut failing = Doubling::new(Duration::from_millis(200), Duration::from_secs(10));
        while !stop.is_cancelled() {
            let mut pubsub = match self.client.get_async_pubsub().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "Celery bridge: cannot subscribe to revokes; retrying");
                    pause(&stop, failing.next_delay()).await;
                    continue;
                }
            };
            if let Err(e) = pubsub.subscribe(&channel).await {
                tracing::warn!(error = %e, "Celery bridge: cannot subscribe to revokes; retrying");
                pause(&stop, failing.next_delay()).await;
                continue;
            }
            failing.reset();
            let mut messages = pubsub.on_message();
            loop {
                let msg = tokio::select! {
                    m = futures_util::StreamExt::next(&mut messages) => m,
                    _ = stop.cancelled() => return,
                };
                let Some(msg) = msg else { break };
                let Ok(text) = msg.get_payload::<String>() else {
                    continue;
                };
                for id in revoked_ids(&text) {
                    if let Err(e) = bridge.revoke(id).await {
                        tracing::warn!(task = %id, error = %e, "Celery revoke: could not cancel the task");
                    }
                }
            }
            tracing::warn!("Celery bridge: the revoke subscription ended; subscribing again");
        }
    }
}

/// The task ids a control message revokes (`revoke` with `task_id` an id or a list).
pub fn revoked_ids(envelope: &str) -> Vec<TaskId> {
    let Ok(d) = from_kombu_envelope(envelope) else {
        return Vec::new();
    };
    let Ok(body) = serde_json::from_slice::<Value>(&d.body) else {
        return Vec::new();
    };
    if body.get("method").and_then(Value::as_str) != Some("revoke") {
        return Vec::new();
    }
    let ids = match body.pointer("/arguments/task_id") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    ids.iter().filter_map(|s| s.parse().ok()).collect()
}

/// Sleep `delay` unless `stop` comes first; true when stopped.
async fn pause(stop: &tokio_util::sync::CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_broadcasts_of_the_real_celery_name_their_ids() {
        let all: Value =
            serde_json::from_str(include_str!("../testdata/redis-messages.json")).unwrap();
        let ids = |name: &str| -> Vec<String> {
            revoked_ids(all[name]["message"].as_str().unwrap())
                .iter()
                .map(|i| i.to_string())
                .collect()
        };
        assert_eq!(ids("revoke"), vec!["7b726186-6317-4ca4-aa02-1542521a9aaf"]);
        assert_eq!(
            ids("revoke_list_terminate"),
            vec![
                "11111111-2222-4333-8444-555555555555",
                "66666666-7777-4888-9999-aaaaaaaaaaaa"
            ]
        );
        // A task message is no revoke.
        assert!(revoked_ids(all["delay"]["message"].as_str().unwrap()).is_empty());
    }

    #[test]
    fn priorities_go_to_kombus_steps_in_its_order() {
        assert_eq!(queue_key("celery", 0), "celery");
        assert_eq!(queue_key("celery", 2), "celery");
        assert_eq!(queue_key("celery", 5), "celery\x06\x163");
        assert_eq!(queue_key("a", 8), "a\x06\x166");
        assert_eq!(queue_key("a", 9), "a\x06\x169");
        assert_eq!(queue_key("a", 200), "a\x06\x169");
        assert_eq!(
            take_keys(&["celery".into(), "alerts".into()]),
            vec![
                "celery",
                "alerts",
                "celery\x06\x163",
                "alerts\x06\x163",
                "celery\x06\x166",
                "alerts\x06\x166",
                "celery\x06\x169",
                "alerts\x06\x169"
            ]
        );
    }
}
