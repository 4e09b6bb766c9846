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

use super::message::{self, CeleryTask, Delivery, Reason, Refused, ResultTo};
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
    /// Revoked before it arrived ([`super::revoked`]): REVOKED written, nothing enqueued.
    Revoked(TaskId),
    /// Refused: its failure is written (where an id and a backend allowed), counted, logged.
    Refused(Reason),
}

/// What one message comes to before taskd's store is written: an answer already (refused,
/// expired, revoked), or a task to store.
enum Step {
    Done(Ingested),
    New(Box<NewTask>, ResultTo),
}

impl Bridge {
    /// Make `delivery` a durable taskd task, or write why it cannot be one. `Ok` means the
    /// transport may acknowledge the message; `Err` that it must not (it is tried again).
    pub async fn ingest(
        &self,
        delivery: &Delivery,
        order: PriorityOrder,
    ) -> Result<Ingested, IngestError> {
        self.ingest_batch(std::slice::from_ref(delivery), order)
            .await
            .pop()
            .expect("one answer per message")
    }

    /// [`Bridge::ingest`] for several messages at once, with one write to taskd's store for
    /// all their tasks (all or none durable); one answer per message, in their order. A
    /// batch holding a task already stored (a message delivered again) is written one task
    /// at a time instead.
    pub async fn ingest_batch(
        &self,
        deliveries: &[Delivery],
        order: PriorityOrder,
    ) -> Vec<Result<Ingested, IngestError>> {
        let config = self.config();
        let Some(celery) = config.celery.as_ref() else {
            let e = IngestError::Sink("the config has no [celery] table".into());
            return deliveries.iter().map(|_| Err(e.clone())).collect();
        };
        let now = now_ms();
        let mut out: Vec<Option<Result<Ingested, IngestError>>> = vec![None; deliveries.len()];
        let mut new = Vec::new();
        for (i, d) in deliveries.iter().enumerate() {
            match self.prepare(&config, celery, d, order, now).await {
                Ok(Step::Done(answer)) => out[i] = Some(Ok(answer)),
                Ok(Step::New(task, to)) => new.push((i, *task, to)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        for (i, answer) in self.commit(new).await {
            out[i] = Some(answer);
        }
        out.into_iter()
            .map(|a| a.expect("every message answered"))
            .collect()
    }

    async fn prepare(
        &self,
        config: &crate::config::Config,
        celery: &CeleryConfig,
        delivery: &Delivery,
        order: PriorityOrder,
        now: i64,
    ) -> Result<Step, IngestError> {
        let task = match message::parse(delivery) {
            Ok(t) => t,
            Err(refused) => return self.refuse(*refused).await.map(Step::Done),
        };
        if self.revoked.contains(&task.result_to.id) {
            self.store(&task.result_to, &CeleryState::Revoked("revoked".into()))
                .await?;
            tracing::info!(task = %task.id, name = %task.name, "Celery task revoked before taskd received it; not run");
            return Ok(Step::Done(Ingested::Revoked(task.id)));
        }
        if task.expires.is_some_and(|at| at <= now) {
            self.store(&task.result_to, &CeleryState::Revoked("expired".into()))
                .await?;
            tracing::info!(task = %task.id, name = %task.name, "Celery task expired before taskd received it");
            return Ok(Step::Done(Ingested::Expired(task.id)));
        }
        match new_task(config, celery, &task, order, now) {
            Ok(t) => Ok(Step::New(Box::new(t), task.result_to.clone())),
            Err(refused) => self.refuse(refused).await.map(Step::Done),
        }
    }

    /// Store `new` in one write; each task's answer by its message's index.
    async fn commit(
        &self,
        new: Vec<(usize, NewTask, ResultTo)>,
    ) -> Vec<(usize, Result<Ingested, IngestError>)> {
        if new.is_empty() {
            return Vec::new();
        }
        let tasks: Vec<NewTask> = new.iter().map(|(_, t, _)| t.clone()).collect();
        match self.broker.enqueue(tasks).await {
            Ok(_) => {
                // Counted per queue, not per task: a batch is mostly one queue's.
                let mut counts: Vec<(&QueueName, u64)> = Vec::new();
                for (_, t, _) in &new {
                    match counts.iter_mut().find(|(q, _)| *q == &t.queue) {
                        Some((_, n)) => *n += 1,
                        None => counts.push((&t.queue, 1)),
                    }
                }
                for (queue, n) in counts {
                    self.metrics.celery_ingested(queue, n);
                    self.metrics.enqueued(queue, n);
                }
                let owed = self.owe(new.iter().map(|(_, _, to)| to)).await;
                new.into_iter()
                    .map(|(i, t, _)| (i, owed.clone().map(|()| Ingested::Task(t.id, t.queue))))
                    .collect()
            }
            Err(BrokerError::Conflict(_)) if new.len() > 1 => {
                let mut out = Vec::new();
                for (i, t, to) in new {
                    out.push((i, self.commit_one(t, &to).await));
                }
                out
            }
            Err(BrokerError::Conflict(why)) => {
                let (i, t, to) = new.into_iter().next().expect("one task");
                let answer = match self.broker.get(t.id).await {
                    Ok(Some(_)) => self
                        .owe([&to].into_iter())
                        .await
                        .map(|()| Ingested::Existing(t.id)),
                    Ok(None) => Err(BrokerError::Conflict(why).into()),
                    Err(e) => Err(e.into()),
                };
                vec![(i, answer)]
            }
            Err(e) => new
                .into_iter()
                .map(|(i, ..)| (i, Err(e.clone().into())))
                .collect(),
        }
    }

    /// One task of a batch that could not be stored as one.
    async fn commit_one(&self, task: NewTask, to: &ResultTo) -> Result<Ingested, IngestError> {
        let (id, queue) = (task.id, task.queue.clone());
        match self.broker.enqueue(vec![task]).await {
            Ok(_) => {
                self.metrics.celery_ingested(&queue, 1);
                self.metrics.enqueued(&queue, 1);
                self.owe([to].into_iter()).await?;
                Ok(Ingested::Task(id, queue))
            }
            Err(BrokerError::Conflict(why)) => match self.broker.get(id).await? {
                Some(_) => {
                    self.owe([to].into_iter()).await?;
                    Ok(Ingested::Existing(id))
                }
                None => Err(BrokerError::Conflict(why).into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// The final states of these tasks are owed from now on: the sweep writes one if its
    /// task's end is missed.
    async fn owe<'a>(&self, to: impl Iterator<Item = &'a ResultTo>) -> Result<(), IngestError> {
        let Some(sink) = self.sink.as_ref() else {
            return Ok(());
        };
        let ids: Vec<String> = to
            .filter(|t| !t.ignore_result)
            .map(|t| t.id.clone())
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        sink.pending_add(&ids).await.map_err(IngestError::Sink)
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
    let value = payload(task, route.track_started);
    let text = value.to_string();
    let stored = crate::submission::check_payload_value(config, queue, &value, text)
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
