//! The Celery bridge: the tasks Celery producers publish to their broker become taskd
//! tasks, and each one's end is written where Celery's client reads it (docs/celery.md for
//! users, docs/architecture.md, "The Celery bridge", for the design).
//!
//! The core here knows no broker protocol. A *transport* (the Redis one in `redis`; an AMQP
//! one beside it) receives messages and hands each one to [`Bridge::ingest`] as a
//! [`Delivery`]; it acknowledges the message to its broker only once `ingest` returned `Ok`:
//! the task is then durable in taskd's store, or the message was refused and its failure is
//! written. A *result sink* ([`ResultSink`]) writes states to a Celery result backend; the
//! daemon calls [`Bridge::started`] and [`Bridge::ended`] as tasks start and end, and
//! [`Bridge::revoke`] cancels tasks by id (a transport's revoke broadcast).

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod ingest;
pub mod message;
#[cfg(feature = "redis")]
pub mod redis;
pub mod result;
pub mod revoked;

use std::sync::Arc;

use serde_json::Value;

use crate::broker::{Broker, BrokerError, CancelOutcome, Finish};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::{AttemptReason, AttemptRecord, TaskDetail, TaskId, TaskRecord, TaskState};

pub use ingest::{Ingested, PriorityOrder};
pub use message::{parse, Delivery, ResultTo};
pub use result::{CeleryState, ResultSink};

/// Why a message could not be ingested now; the transport leaves it unacknowledged and
/// tries again later (it is delivered again if this node goes away meanwhile).
#[derive(Clone, Debug, thiserror::Error)]
pub enum IngestError {
    #[error("taskd's broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("the Celery result backend: {0}")]
    Sink(String),
}

/// How often the bridge looks for final states its ends missed ([`Bridge::sweep`]).
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The bridge's state in one daemon: its config, taskd's broker, the result sink.
pub struct Bridge {
    config: std::sync::RwLock<Arc<Config>>,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) sink: Option<Arc<dyn ResultSink>>,
    metrics: Arc<Metrics>,
    /// Revokes of ids not ingested yet.
    revoked: revoked::RevokedSet,
}

impl Bridge {
    /// A bridge for `config` (which must have a `[celery]` table) writing results to `sink`.
    pub fn new(
        config: Arc<Config>,
        broker: Arc<dyn Broker>,
        sink: Option<Arc<dyn ResultSink>>,
        metrics: Arc<Metrics>,
    ) -> Bridge {
        let keep = config
            .celery
            .as_ref()
            .map_or(std::time::Duration::from_secs(86_400), |c| c.result_expires);
        let revoked = revoked::RevokedSet::open(config.state_dir.join(revoked::FILE), keep);
        Bridge {
            config: std::sync::RwLock::new(config),
            broker,
            sink,
            metrics,
            revoked,
        }
    }

    /// The config in force (a reload replaces it).
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Use `config` from now on (a reload: new routes, new queues).
    pub fn set_config(&self, config: Arc<Config>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// Write `state` for `to`, unless the producer asked for no result or there is no sink.
    pub async fn store(&self, to: &ResultTo, state: &CeleryState) -> Result<(), IngestError> {
        match &self.sink {
            Some(sink) if !to.ignore_result => {
                sink.store(to, state).await.map_err(IngestError::Sink)
            }
            _ => Ok(()),
        }
    }

    /// Task `task` started on this node: STARTED, when its route tracks starts.
    pub async fn started(&self, task: &TaskRecord, pid: u32) {
        let Some(meta) = CeleryMeta::of(&task.payload) else {
            return;
        };
        if !meta.track_started {
            return;
        }
        let state = CeleryState::Started {
            hostname: crate::model::host_name().unwrap_or("localhost").to_string(),
            pid,
        };
        if let Err(e) = self.store(&meta.result_to, &state).await {
            tracing::warn!(task = %task.id, error = %e, "could not write a Celery task's STARTED state");
        }
    }

    /// Task `detail` ended (succeeded, failed or cancelled, as the store has it): its
    /// Celery state. A task that is not a Celery one, or not ended, is left alone.
    pub async fn ended(&self, detail: &TaskDetail) -> Result<(), IngestError> {
        let Some(meta) = CeleryMeta::of(&detail.task.payload) else {
            return Ok(());
        };
        let Some(state) = final_state(detail) else {
            return Ok(());
        };
        self.store(&meta.result_to, &state).await?;
        if let Some(sink) = &self.sink {
            sink.pending_done(std::slice::from_ref(&meta.result_to.id))
                .await
                .map_err(IngestError::Sink)?;
        }
        Ok(())
    }

    /// The final states owed for tasks known by id, read from the store in one go: for
    /// each ended Celery task, where its state goes and what it is (tasks not ended, not
    /// Celery ones, or gone are left out).
    pub async fn final_states(
        &self,
        ids: &[TaskId],
    ) -> Result<Vec<(ResultTo, CeleryState)>, IngestError> {
        let details = self.broker.get_many(ids).await?;
        Ok(details
            .iter()
            .flatten()
            .filter_map(|detail| {
                let to = CeleryMeta::result_to(&detail.task.payload)?;
                Some((to, final_state(detail)?))
            })
            .collect())
    }

    /// Write the final states of tasks that ended together in one go
    /// ([`ResultSink::store_many`]; those whose producer asked for no result are left
    /// out), then forget them as owed in one go.
    pub async fn write_final(&self, items: &[(ResultTo, CeleryState)]) -> Result<(), IngestError> {
        let Some(sink) = &self.sink else {
            return Ok(());
        };
        if items.is_empty() {
            return Ok(());
        }
        if items.iter().any(|(to, _)| to.ignore_result) {
            let wanted: Vec<_> = items
                .iter()
                .filter(|(to, _)| !to.ignore_result)
                .cloned()
                .collect();
            if !wanted.is_empty() {
                sink.store_many(&wanted).await.map_err(IngestError::Sink)?;
            }
        } else {
            sink.store_many(items).await.map_err(IngestError::Sink)?;
        }
        let done: Vec<String> = items.iter().map(|(to, _)| to.id.clone()).collect();
        sink.pending_done(&done).await.map_err(IngestError::Sink)
    }

    /// A message no transport could read as kombu's (nothing to fail): counted.
    pub fn refused_unreadable(&self) {
        self.metrics
            .celery_refused(message::Reason::Malformed.as_str());
    }

    /// Write the final states the ends missed (a node that died between a task's end and
    /// its write, a cancel from `taskd cancel` or the API, an expiry a claim found): every
    /// [`SWEEP_EVERY`], the tasks ingested at least that long ago whose state is still owed
    /// are read, and the ended ones written. Runs until `stop`.
    pub async fn sweep(&self, stop: tokio_util::sync::CancellationToken) {
        let Some(sink) = self.sink.clone() else {
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
                _ = stop.cancelled() => return,
            }
            let due = match sink.pending_due(SWEEP_EVERY, 500).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "Celery bridge: cannot read the results owed");
                    continue;
                }
            };
            for id in due {
                let Ok(task) = id.parse::<TaskId>() else {
                    let _ = sink.pending_done(std::slice::from_ref(&id)).await;
                    continue;
                };
                match self.broker.get(task).await {
                    Ok(Some(detail)) => {
                        if let Err(e) = self.ended(&detail).await {
                            tracing::warn!(task = %task, error = %e, "Celery bridge: cannot write a task's final state");
                        }
                    }
                    // Pruned, or never stored: nothing more to write.
                    Ok(None) => {
                        let _ = sink.pending_done(std::slice::from_ref(&id)).await;
                    }
                    Err(e) => {
                        tracing::warn!(task = %task, error = %e, "Celery bridge: cannot read a task");
                    }
                }
            }
        }
    }

    /// [`Bridge::ended`] for a task known by id (read from the store first).
    pub async fn ended_id(&self, id: TaskId) -> Result<(), IngestError> {
        match self.broker.get(id).await? {
            Some(detail) => self.ended(&detail).await,
            None => Ok(()),
        }
    }

    /// Celery's `revoke(id)`: cancel the task, waiting or running (`terminate` or not: a
    /// taskd cancel stops a running task either way). The cancel is stored, so it holds
    /// across restarts. A waiting task's REVOKED is written at once; a running one's when
    /// its node has stopped it. An id taskd has no task of is kept ([`revoked`]): its
    /// message is revoked when it arrives.
    pub async fn revoke(&self, id: TaskId) -> Result<(), IngestError> {
        match self.broker.cancel(id).await {
            Ok(CancelOutcome::Cancelled) => {
                tracing::info!(task = %id, "Celery revoke: cancelled the waiting task");
                self.ended_id(id).await
            }
            Ok(CancelOutcome::Requested) => {
                tracing::info!(task = %id, "Celery revoke: asked the node running the task to stop it");
                Ok(())
            }
            Ok(CancelOutcome::AlreadyFinished(_)) => Ok(()),
            Err(BrokerError::NotFound(_)) => {
                // Its message has not arrived yet: revoked when it does.
                match self.revoked.add(&[id.to_string()]) {
                    Ok(()) => {
                        tracing::info!(task = %id, "Celery revoke of a task taskd has not received; kept until its message arrives")
                    }
                    Err(e) => {
                        tracing::warn!(task = %id, error = %e, "Celery revoke of a task taskd has not received; cannot write the kept revokes, kept in memory only")
                    }
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// What the bridge kept of a Celery task in its payload's `celery` object.
#[derive(Clone, Debug, PartialEq)]
pub struct CeleryMeta {
    pub name: String,
    pub result_to: ResultTo,
    pub track_started: bool,
}

impl CeleryMeta {
    /// The Celery metadata of a task's payload; `None` for a task the bridge did not make.
    pub fn of(payload: &Value) -> Option<CeleryMeta> {
        Some(CeleryMeta {
            name: payload.get("task").and_then(Value::as_str)?.to_string(),
            result_to: CeleryMeta::result_to(payload)?,
            track_started: CeleryMeta::tracks_started(payload),
        })
    }

    /// Where a Celery task's states go (its [`CeleryMeta::of`]'s `result_to`, read alone);
    /// `None` for a task the bridge did not make.
    pub fn result_to(payload: &Value) -> Option<ResultTo> {
        payload.get("task").and_then(Value::as_str)?;
        let c = payload.get(ingest::META)?.as_object()?;
        let text = |k: &str| c.get(k).and_then(Value::as_str).map(str::to_string);
        Some(ResultTo {
            id: text("id")?,
            reply_to: text("reply_to"),
            correlation_id: text("correlation_id"),
            ignore_result: c
                .get("ignore_result")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    /// Whether a task's payload asks for STARTED (a Celery task of a route with
    /// `track_started`), read without copying anything.
    pub fn tracks_started(payload: &Value) -> bool {
        payload
            .get(ingest::META)
            .and_then(|c| c.get("track_started"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// The Celery state of an ended task; `None` while it has not ended.
pub fn final_state(detail: &TaskDetail) -> Option<CeleryState> {
    let task = &detail.task;
    match task.state {
        TaskState::Succeeded => Some(CeleryState::Success(
            detail.result.clone().unwrap_or(Value::Null),
        )),
        TaskState::Cancelled => {
            let reason = match task.last_error.as_deref() {
                Some(crate::model::EXPIRED) => "expired",
                _ if detail
                    .history
                    .last()
                    .is_some_and(|a| a.reason == Some(AttemptReason::Cancelled)) =>
                {
                    "terminated"
                }
                _ => "revoked",
            };
            Some(CeleryState::Revoked(reason.to_string()))
        }
        TaskState::Failed => {
            let last = detail.history.last();
            Some(failure(
                task.last_error.as_deref(),
                last.and_then(|a| a.reason),
                last.map_or("", |a| a.stderr_tail.as_str()),
            ))
        }
        _ => None,
    }
}

/// The Celery state a task ends in when the broker recorded its last attempt `attempt`
/// with `finish`, as [`final_state`] would read it back from the store, for the ends whose
/// record the store keeps as given: a success (its result is the attempt's) and a failure
/// (its error, reason and stderr are the attempt's). `None` for the others (a retry, a
/// cancel, a requeue): the store may record them otherwise (an operator's cancel that came
/// meanwhile turns a retry into a cancel), so their state is read from it.
pub fn recorded_state(attempt: &AttemptRecord, finish: Finish) -> Option<CeleryState> {
    match finish {
        Finish::Succeeded => Some(CeleryState::Success(
            attempt.result.clone().unwrap_or(Value::Null),
        )),
        Finish::Failed => Some(failure(
            attempt.error.as_deref(),
            attempt.reason,
            &attempt.stderr_tail,
        )),
        _ => None,
    }
}

/// FAILURE for a task whose last error is `error`, its last attempt's reason `reason` and
/// stderr `stderr_tail`: `builtins.RuntimeError(error)`, or `TimeLimitExceeded` for a
/// timeout, with the stderr as the traceback.
fn failure(error: Option<&str>, reason: Option<AttemptReason>, stderr_tail: &str) -> CeleryState {
    let (module, class) = match reason {
        Some(AttemptReason::Timeout) => ("celery.exceptions", "TimeLimitExceeded"),
        _ => ("builtins", "RuntimeError"),
    };
    let tail = stderr_tail.trim_end();
    CeleryState::Failure {
        module: module.into(),
        class: class.into(),
        message: error.unwrap_or("the task failed").to_string(),
        traceback: (!tail.is_empty()).then(|| format!("{tail}\n")),
    }
}

#[cfg(test)]
mod tests;
