//! Schedules on Redis: each schedule's record (`sch:<name>`, a hash) and slot records
//! (`schlog:<name>`, a list of JSON, newest first) live under its queue's hash tag, beside
//! the queue's tasks, so that one script (`schedule.lua`) checks the record, stores the
//! slot's task and moves the record on atomically (rule 10 of the trait), on one Cluster slot.

use std::sync::OnceLock;

use redis::Script;
use serde::Deserialize;

use super::{prefix, RedisBroker};
use crate::broker::schedules::SLOT_HISTORY;
use crate::broker::{
    BrokerError, Result, ScheduleKey, ScheduleState, ScheduleStep, SlotOutcome, SlotRecord,
    StepAnswer,
};
use crate::model::{NewTask, UnixMs};

fn script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| {
        Script::new(&format!(
            "{}\n{}",
            include_str!("lib.lua"),
            include_str!("schedule.lua")
        ))
    })
}

fn record_key(key: &ScheduleKey) -> String {
    format!("{}sch:{}", prefix(&key.queue), key.name)
}

fn log_key(key: &ScheduleKey) -> String {
    format!("{}schlog:{}", prefix(&key.queue), key.name)
}

/// A slot record as the script writes it (every value a string).
#[derive(Deserialize)]
struct Raw {
    slot: String,
    first: String,
    count: String,
    outcome: String,
    task: Option<String>,
    reason: Option<String>,
    at: String,
    node: String,
}

fn record(json: &str) -> Result<SlotRecord> {
    let bad = |e: String| BrokerError::Storage(format!("a schedule's slot record: {e}"));
    let r: Raw = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let n = |s: &str| s.parse::<i64>().map_err(|e| bad(e.to_string()));
    Ok(SlotRecord {
        slot: n(&r.slot)?,
        first: n(&r.first)?,
        count: n(&r.count)? as u64,
        outcome: SlotOutcome::parse(&r.outcome).ok_or_else(|| bad(r.outcome.clone()))?,
        task: r.task.map(|t| t.parse()).transpose().map_err(bad)?,
        reason: r.reason,
        at: n(&r.at)?,
        node: r.node,
    })
}

/// A key for a script: '' for none, else `k:` and the key (so that an empty key is one).
pub(super) fn key_arg(key: &Option<String>) -> String {
    key.as_ref().map(|k| format!("k:{k}")).unwrap_or_default()
}

fn task_args(task: &NewTask) -> Result<[String; 4]> {
    let args =
        serde_json::to_string(&task.args).map_err(|e| BrokerError::Storage(e.to_string()))?;
    Ok([
        task.id.to_string(),
        task.payload.clone(),
        args,
        task.priority.to_string(),
    ])
}

impl RedisBroker {
    pub(super) async fn schedule_states_in(
        &self,
        keys: &[ScheduleKey],
    ) -> Result<Vec<ScheduleState>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(std::collections::HashMap<String, String>, Option<String>)> = self
            .pipelined(keys, |pipe, k| {
                pipe.cmd("HGETALL").arg(record_key(k));
                pipe.cmd("LINDEX").arg(log_key(k)).arg(0);
            })
            .await
            .map(|flat: Vec<redis::Value>| {
                flat.chunks(2)
                    .map(|c| {
                        (
                            redis::from_redis_value(&c[0]).unwrap_or_default(),
                            redis::from_redis_value(&c[1]).unwrap_or_default(),
                        )
                    })
                    .collect()
            })?;
        keys.iter()
            .zip(rows)
            .map(|(k, (h, last))| {
                let mut st = ScheduleState::empty(k.clone());
                let num = |f: &str| h.get(f).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                st.spec = h.get("spec").cloned().unwrap_or_default();
                st.through = num("through");
                st.last_task = h.get("last_task").and_then(|t| t.parse().ok());
                st.fired = num("fired") as u64;
                st.caught_up = num("caught_up") as u64;
                st.skipped = num("skipped") as u64;
                st.paused = h.get("paused").map(String::as_str) == Some("1");
                st.last = last.as_deref().map(record).transpose()?;
                Ok(st)
            })
            .collect()
    }

    pub(super) async fn schedule_step_in(
        &self,
        key: &ScheduleKey,
        step: ScheduleStep,
    ) -> Result<StepAnswer> {
        self.know(&key.queue).await?;
        let mut inv = script().key(prefix(&key.queue));
        match &step {
            ScheduleStep::Begin { spec, through } => {
                inv.arg("begin").arg(&key.name).arg(spec).arg(*through);
            }
            ScheduleStep::Fire {
                spec,
                slot,
                task,
                caught_up,
                skip_if_running,
                node,
            } => {
                inv.arg("fire")
                    .arg(&key.name)
                    .arg(spec)
                    .arg(*slot)
                    .arg(if *caught_up { "1" } else { "0" })
                    .arg(if *skip_if_running { "1" } else { "0" })
                    .arg(node);
                for a in task_args(task)? {
                    inv.arg(a);
                }
                inv.arg(task.unique_key.clone().unwrap_or_default());
                inv.arg(key_arg(&task.flow_key))
                    .arg(key_arg(&task.rate_key));
            }
            ScheduleStep::Skip {
                spec,
                first,
                last,
                count,
                reason,
                node,
            } => {
                inv.arg("skip")
                    .arg(&key.name)
                    .arg(spec)
                    .arg(*first)
                    .arg(*last)
                    .arg(*count)
                    .arg(reason)
                    .arg(node);
            }
            ScheduleStep::Manual { task } => {
                inv.arg("manual").arg(&key.name);
                for a in task_args(task)? {
                    inv.arg(a);
                }
                inv.arg(key_arg(&task.flow_key))
                    .arg(key_arg(&task.rate_key));
            }
        }
        let r: Vec<String> = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        let id = |s: &str| {
            s.parse()
                .map_err(|e: String| BrokerError::Storage(format!("schedule.lua: {e}")))
        };
        match r.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["begun", b] => Ok(StepAnswer::Begun(*b == "1")),
            ["fired", t, existing] => Ok(StepAnswer::Fired {
                task: id(t)?,
                existing: *existing == "1",
            }),
            ["skipped", t] => Ok(StepAnswer::Skipped {
                running: (!t.is_empty()).then(|| id(t)).transpose()?,
            }),
            ["handled", through, spec] => Ok(StepAnswer::AlreadyHandled {
                through: through.parse().unwrap_or_default(),
                spec: spec.to_string(),
            }),
            ["manual", t] => Ok(StepAnswer::Manual { task: id(t)? }),
            other => Err(BrokerError::Storage(format!(
                "schedule.lua answered {other:?}"
            ))),
        }
    }

    pub(super) async fn schedule_history_in(
        &self,
        key: &ScheduleKey,
        limit: usize,
    ) -> Result<Vec<SlotRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stop = limit.min(SLOT_HISTORY) as i64 - 1;
        let rows: Vec<String> = redis::cmd("LRANGE")
            .arg(log_key(key))
            .arg(0)
            .arg(stop)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        rows.iter().map(|r| record(r)).collect()
    }

    /// Retention of slot records (rule 18): the list is newest first, so the old ones are
    /// popped from its tail while they are older than `before`, never the last one; at
    /// most the schedule's 500 records are read.
    pub(super) async fn prune_slots_in(&self, key: &ScheduleKey, before: UnixMs) -> Result<u64> {
        static S: OnceLock<Script> = OnceLock::new();
        let script = S.get_or_init(|| {
            Script::new(
                r"
local n = 0
while redis.call('LLEN', KEYS[1]) > 1 do
  local r = cjson.decode(redis.call('LINDEX', KEYS[1], -1))
  if tonumber(r.at) >= tonumber(ARGV[1]) then break end
  redis.call('RPOP', KEYS[1])
  n = n + 1
end
return n",
            )
        });
        let n: u64 = script
            .key(log_key(key))
            .arg(before)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        Ok(n)
    }

    pub(super) async fn set_schedule_paused_in(
        &self,
        key: &ScheduleKey,
        paused: bool,
    ) -> Result<()> {
        self.know(&key.queue).await?;
        let _: () = redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(record_key(key))
            .arg("paused")
            .arg(if paused { "1" } else { "0" })
            .ignore()
            .cmd("PUBLISH")
            .arg("taskd:wake")
            .arg("schedules")
            .ignore()
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}
