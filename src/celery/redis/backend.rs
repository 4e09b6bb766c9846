//! Celery's Redis result backend: the meta of task `<id>` at `celery-task-meta-<id>`, set
//! with the backend's expiry and published on the channel of the same name in one step, so
//! that a client waiting in `get()` (subscribed to that channel) returns at once and one
//! that asks later reads the key.

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use crate::celery::message::ResultTo;
use crate::celery::result::{CeleryState, ResultSink};

/// The key (and channel) prefix of Celery's key-value result backends.
pub const KEY_PREFIX: &str = "celery-task-meta-";

/// Sets the meta with its expiry and publishes it, atomically; keeps a stored SUCCESS, and
/// keeps any ready state from being replaced by STARTED.
/// KEYS[1] the key; ARGV[1] expiry in seconds, ARGV[2] "1" for STARTED, ARGV[3] the meta.
const STORE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, meta = pcall(cjson.decode, cur)
  if ok and type(meta) == 'table' then
    local s = meta['status']
    if s == 'SUCCESS' then return 0 end
    if ARGV[2] == '1' and (s == 'FAILURE' or s == 'REVOKED') then return 0 end
  end
end
redis.call('SETEX', KEYS[1], ARGV[1], ARGV[3])
redis.call('PUBLISH', KEYS[1], ARGV[3])
return 1
"#;

/// [`STORE`] for several tasks in one round trip: KEYS their keys; ARGV[1] the expiry in
/// seconds, then for each key its "1"-for-STARTED flag and its meta. Returns how many were
/// written.
const STORE_MANY: &str = r#"
local n = 0
for i = 1, #KEYS do
  local started, meta = ARGV[2 * i], ARGV[2 * i + 1]
  local keep = false
  local cur = redis.call('GET', KEYS[i])
  if cur then
    local ok, m = pcall(cjson.decode, cur)
    if ok and type(m) == 'table' then
      local s = m['status']
      if s == 'SUCCESS' then keep = true end
      if started == '1' and (s == 'FAILURE' or s == 'REVOKED') then keep = true end
    end
  end
  if not keep then
    redis.call('SETEX', KEYS[i], ARGV[1], meta)
    redis.call('PUBLISH', KEYS[i], meta)
    n = n + 1
  end
end
return n
"#;

/// At most this many results in one [`STORE_MANY`] (Redis answers nobody else meanwhile).
const STORE_BATCH: usize = 500;

/// A Redis result backend (`result_backend = "redis://…"`).
pub struct RedisResults {
    conn: ConnectionManager,
    addr: String,
    expires_s: u64,
    script: redis::Script,
    many: redis::Script,
}

impl RedisResults {
    /// Connect to the backend at `url`; results expire after `expires`.
    pub async fn open(url: &str, expires: std::time::Duration) -> Result<RedisResults, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = redis::Client::open(url)
            .map_err(|e| format!("invalid Redis URL: {}", e.to_string().replace(url, "<url>")))?;
        let addr = client.get_connection_info().addr.to_string();
        let conn = ConnectionManager::new(client)
            .await
            .map_err(|e| format!("cannot reach the Celery result backend at {addr}: {e}"))?;
        Ok(RedisResults {
            conn,
            addr,
            expires_s: expires.as_secs().max(1),
            script: redis::Script::new(STORE),
            many: redis::Script::new(STORE_MANY),
        })
    }
}

#[async_trait]
impl ResultSink for RedisResults {
    async fn store(&self, to: &ResultTo, state: &CeleryState) -> Result<(), String> {
        let meta = state.meta(&to.id, crate::model::now_ms()).to_string();
        let mut conn = self.conn.clone();
        let _: i64 = self
            .script
            .key(format!("{KEY_PREFIX}{}", to.id))
            .arg(self.expires_s)
            .arg(if state.is_ready() { "0" } else { "1" })
            .arg(meta)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| format!("redis at {}: {e}", self.addr))?;
        Ok(())
    }

    async fn store_many(&self, items: &[(ResultTo, CeleryState)]) -> Result<(), String> {
        let now = crate::model::now_ms();
        for chunk in items.chunks(STORE_BATCH) {
            let mut invocation = self.many.prepare_invoke();
            invocation.arg(self.expires_s);
            for (to, state) in chunk {
                invocation
                    .key(format!("{KEY_PREFIX}{}", to.id))
                    .arg(if state.is_ready() { "0" } else { "1" })
                    .arg(state.meta(&to.id, now).to_string());
            }
            let mut conn = self.conn.clone();
            let _: i64 = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(|e| format!("redis at {}: {e}", self.addr))?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("redis at {}", self.addr)
    }

    async fn pending_add(&self, ids: &[String]) -> Result<(), String> {
        if ids.is_empty() {
            return Ok(());
        }
        let now = crate::model::now_ms();
        let items: Vec<(i64, &String)> = ids.iter().map(|id| (now, id)).collect();
        let mut conn = self.conn.clone();
        redis::cmd("ZADD")
            .arg(PENDING)
            .arg("NX")
            .arg(&items)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| format!("redis at {}: {e}", self.addr))
    }

    async fn pending_done(&self, ids: &[String]) -> Result<(), String> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        redis::cmd("ZREM")
            .arg(PENDING)
            .arg(ids)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| format!("redis at {}: {e}", self.addr))
    }

    async fn pending_due(
        &self,
        age: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<String>, String> {
        let now = crate::model::now_ms();
        let mut conn = self.conn.clone();
        redis::Script::new(DUE)
            .key(PENDING)
            .arg(now - age.as_millis() as i64)
            .arg(limit)
            .arg(now)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| format!("redis at {}: {e}", self.addr))
    }
}

/// The sorted set of the ids whose final state is owed (score: when last looked at, ms).
pub const PENDING: &str = "taskd-celery-pending";

/// Up to ARGV[2] members of KEYS[1] scored at most ARGV[1], re-scored ARGV[3].
const DUE: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id) end
return ids
"#;
