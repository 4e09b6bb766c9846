//! A Celery message → a durable taskd task ([`Bridge::ingest`]), or its failure written.
//!
//! The task's id is the Celery id: `taskd show <celery id>` finds it, and a message
//! delivered twice (restored after a consumer died, or seen by two nodes) is one task: the
//! store refuses a second task with a stored id, and the bridge then answers
//! [`Ingested::Existing`].
//!
//! The payload (what the program reads on stdin, and a worker's `payload`) is a JSON
//! object: `task` (the Celery name), `args` (the positional arguments), `kwargs` (the
//! keyword arguments), `celery` (the message's metadata, [`META`]), and each keyword
//! argument again as a top-level field (so that `{user_id}` placeholders and
//! `$TASKD_ARG_user_id` see it) unless its name is one of those four.

use serde_json::{Map, Value};

use super::message::{self, CeleryTask, Delivery, Reason, Refused};
use super::{Bridge, CeleryState, IngestError};
use crate::broker::BrokerError;
use crate::config::celery::CeleryConfig;
use crate::model::{now_ms, NewTask, QueueName, TaskId};

/// The payload field holding the Celery metadata.
pub const META: &str = "celery";

/// The payload's own fields: a keyword argument of one of these names is only in `kwargs`.
const RESERVED: [&str; 4] = ["task", "args", "kwargs", META];

/// Which way a transport's priorities go: kombu's Redis transport serves priority 0 first,
/// AMQP serves the highest first. taskd runs the highest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PriorityOrder {
    /// Redis: 0 is served first; taskd's priority is the negated number (0 stays 0, the
    /// default of both, and 9 becomes -9).
    LowerFirst,
    /// AMQP: the highest is served first; taskd's priority is the number.
    HigherFirst,
}

impl PriorityOrder {
    pub fn taskd_priority(self, celery: Option<u8>) -> i32 {
        let p = i32::from(celery.unwrap_or(0));
        match self {
            PriorityOrder::LowerFirst => -p,
            PriorityOrder::HigherFirst => p,
        }
    }
}

/// What became of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// A new task of this queue.
    Task(TaskId, QueueName),
    /// The task was already stored (a message delivered again).
    Existing(TaskId),
    /// Its `expires` had passed: REVOKED written, nothing enqueued.
    Expired(TaskId),
    /// Refused: its failure is written (where an id and a backend allowed), counted, logged.
    Refused(Reason),
}

impl Bridge {
    /// Make `delivery` a durable taskd task, or write why it cannot be one. `Ok` means the
    /// transport may acknowledge the message; `Err` that it must not (it is tried again).
    pub async fn ingest(
        &self,
        delivery: &Delivery,
        order: PriorityOrder,
    ) -> Result<Ingested, IngestError> {
        let config = self.config();
        let Some(celery) = config.celery.as_ref() else {
            return Err(IngestError::Sink("the config has no [celery] table".into()));
        };
        let task = match message::parse(delivery) {
            Ok(t) => t,
            Err(refused) => return self.refuse(*refused).await,
        };
        let now = now_ms();
        if task.expires.is_some_and(|at| at <= now) {
            self.store(&task.result_to, &CeleryState::Revoked("expired".into()))
                .await?;
            tracing::info!(task = %task.id, name = %task.name, "Celery task expired before taskd received it");
            return Ok(Ingested::Expired(task.id));
        }
        let new = match new_task(&config, celery, &task, order, now) {
            Ok(t) => t,
            Err(refused) => return self.refuse(refused).await,
        };
        let queue = new.queue.clone();
        let answer = match self.broker.enqueue(vec![new]).await {
            Ok(_) => {
                self.metrics.celery_ingested(&queue);
                self.metrics.enqueued(&queue, 1);
                Ingested::Task(task.id, queue)
            }
            Err(BrokerError::Conflict(why)) => match self.broker.get(task.id).await? {
                Some(_) => Ingested::Existing(task.id),
                None => return Err(BrokerError::Conflict(why).into()),
            },
            Err(e) => return Err(e.into()),
        };
        // Its final state is owed from now on: the sweep writes it if its end is missed.
        if let Some(sink) = self.sink.as_ref().filter(|_| !task.result_to.ignore_result) {
            sink.pending_add(std::slice::from_ref(&task.result_to.id))
                .await
                .map_err(IngestError::Sink)?;
        }
        Ok(answer)
    }

    /// A refused message: its FAILURE written for each id it owes a result, then counted
    /// and logged.
    async fn refuse(&self, refused: Refused) -> Result<Ingested, IngestError> {
        let (module, class) = refused.reason.exception();
        let state = CeleryState::Failure {
            module: module.into(),
            class: class.into(),
            message: refused.detail.clone(),
            traceback: None,
        };
        for to in &refused.results {
            self.store(to, &state).await?;
        }
        self.metrics.celery_refused(refused.reason.as_str());
        tracing::warn!(
            reason = refused.reason.as_str(),
            name = refused.name.as_deref().unwrap_or(""),
            id = refused.results.first().map(|r| r.id.as_str()).unwrap_or(""),
            detail = %refused.detail,
            "Celery message refused; its task failed"
        );
        Ok(Ingested::Refused(refused.reason))
    }
}

/// The taskd task of `task`, or why its queue cannot run it.
fn new_task(
    config: &crate::config::Config,
    celery: &CeleryConfig,
    task: &CeleryTask,
    order: PriorityOrder,
    now: i64,
) -> Result<NewTask, Refused> {
    let refused = |reason, detail: String| Refused {
        reason,
        detail,
        name: Some(task.name.clone()),
        results: vec![task.result_to.clone()],
    };
    let Some(route) = celery.route(&task.name) else {
        return Err(refused(
            Reason::Unmapped,
            format!(
                "no entry of [celery.tasks] in {} matches the task name \"{}\": add `\"{}\" = \"QUEUE\"` (or a pattern) there",
                config.path.display(),
                task.name,
                task.name
            ),
        ));
    };
    let Some(queue) = config.queues.get(&route.queue) else {
        return Err(refused(
            Reason::Unmapped,
            format!("the queue `{}` is not defined", route.queue),
        ));
    };
    let text = payload(task, route.track_started).to_string();
    let stored = crate::submission::parse_payload(config, queue, &text, &[])
        .map_err(|e| refused(Reason::Invalid, e.to_string()))?;
    let mut new = crate::submission::new_task(queue, stored);
    new.id = task.id;
    new.priority = order.taskd_priority(task.priority);
    new.run_at = task.eta.filter(|at| *at > now);
    new.expires_at = task.expires;
    Ok(new)
}

/// The payload of `task` (module documentation).
pub fn payload(task: &CeleryTask, track_started: bool) -> Value {
    let mut out = Map::new();
    for (k, v) in &task.kwargs {
        if !RESERVED.contains(&k.as_str()) {
            out.insert(k.clone(), v.clone());
        }
    }
    out.insert("task".into(), Value::String(task.name.clone()));
    out.insert("args".into(), Value::Array(task.args.clone()));
    out.insert("kwargs".into(), Value::Object(task.kwargs.clone()));
    let opt = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
    let time = |t: Option<i64>| t.map_or(Value::Null, |ms| super::result::iso_time(ms).into());
    let limit = |l: Option<f64>| {
        l.and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number)
    };
    let mut meta = Map::new();
    meta.insert("id".into(), Value::String(task.result_to.id.clone()));
    meta.insert("retries".into(), Value::from(task.retries));
    meta.insert("eta".into(), time(task.eta));
    meta.insert("expires".into(), time(task.expires));
    meta.insert(
        "timelimit".into(),
        Value::Array(vec![limit(task.timelimit[0]), limit(task.timelimit[1])]),
    );
    meta.insert("root_id".into(), opt(&task.root_id));
    meta.insert("parent_id".into(), opt(&task.parent_id));
    meta.insert("group".into(), opt(&task.group));
    meta.insert("reply_to".into(), opt(&task.result_to.reply_to));
    meta.insert("correlation_id".into(), opt(&task.result_to.correlation_id));
    meta.insert(
        "ignore_result".into(),
        Value::Bool(task.result_to.ignore_result),
    );
    meta.insert("track_started".into(), Value::Bool(track_started));
    out.insert(META.into(), Value::Object(meta));
    Value::Object(out)
}
