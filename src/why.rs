//! Why a task is not running (`taskd why ID`, `GET /api/v1/tasks/{id}/why`, the dashboard's
//! task page): every reason, one line each, with the numbers an operator needs; for a
//! running or finished task, that it is. Read-only: it reads the task, its queue's config
//! and state, its flow-control state in the broker and the nodes sharing it; what only the
//! caller knows (whether a daemon serves an embedded store, that daemon's workers) is
//! handed in as [`Serving`].

use crate::broker::{Broker, Flow, ListFilter};
use crate::config::Config;
use crate::model::{fmt_duration_ms, fmt_time, now_ms, TaskId, TaskState, UnixMs};
use crate::view::{WhyReason, WhyView};
use crate::worker::status::{WorkerInfo, WorkerState};

/// What the caller knows of the daemon that serves the store on this machine.
#[derive(Clone, Debug, Default)]
pub struct Serving {
    /// A daemon serves the embedded store (for a shared broker the nodes it lists say who
    /// serves what, and this is not read).
    pub daemon: bool,
    /// That daemon's long-lived workers (its `workers.json`).
    pub workers: Vec<WorkerInfo>,
}

fn when(at: UnixMs, now: UnixMs) -> String {
    if at > now {
        format!("{} (in {})", fmt_time(at), fmt_duration_ms(at - now))
    } else {
        fmt_time(at)
    }
}

fn plural(count: usize) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

/// Why task `id` is not running; `None` for an unknown task. The broker's flow limits must
/// be set for the task's queue ([`Broker::set_flow`]), as a daemon's are.
pub async fn explain(
    config: &Config,
    broker: &dyn Broker,
    id: TaskId,
    serving: &Serving,
) -> crate::broker::Result<Option<WhyView>> {
    let Some(detail) = broker.get(id).await? else {
        return Ok(None);
    };
    let t = &detail.task;
    let now = now_ms();
    let mut reasons = Vec::new();
    match t.state {
        TaskState::Running => {
            let node = t.node.as_ref().map(|n| n.as_str().to_string());
            let mut r = WhyReason::new(
                "running",
                format!(
                    "it is running (attempt {}) on node {}",
                    t.attempts,
                    node.as_deref().unwrap_or("?")
                ),
            );
            r.node = node;
            reasons.push(r);
        }
        s if s.is_terminal() => {
            let at = t.finished_at.unwrap_or(t.updated_at);
            let mut r = WhyReason::new(
                "finished",
                format!(
                    "it has finished: {s} at {}{}",
                    fmt_time(at),
                    t.last_error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ),
            );
            r.at = Some(at);
            reasons.push(r);
        }
        _ => waiting(config, broker, &detail.task, serving, now, &mut reasons).await?,
    }
    Ok(Some(WhyView {
        task: id,
        queue: t.queue.to_string(),
        state: t.state,
        running: t.state == TaskState::Running,
        reasons,
    }))
}

/// The reasons a waiting task (scheduled, queued, retrying) does not run.
async fn waiting(
    config: &Config,
    broker: &dyn Broker,
    task: &crate::model::TaskRecord,
    serving: &Serving,
    now: UnixMs,
    reasons: &mut Vec<WhyReason>,
) -> crate::broker::Result<()> {
    let t = task;
    if t.state == TaskState::Retrying {
        let mut r = WhyReason::new(
            "retry_at",
            format!(
                "it waits to retry at {} after attempt {} failed{}",
                when(t.run_at, now),
                t.attempts,
                t.last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        );
        r.at = Some(t.run_at);
        reasons.push(r);
    } else if t.run_at > now {
        let mut r = WhyReason::new(
            "run_at",
            format!("its run-at time is in the future: {}", when(t.run_at, now)),
        );
        r.at = Some(t.run_at);
        reasons.push(r);
    }
    let parents = broker.parents(t.id).await?;
    let pending: Vec<_> = parents
        .iter()
        .filter(|p| p.state != Some(TaskState::Succeeded))
        .collect();
    if !pending.is_empty() {
        let mut r = WhyReason::new(
            "parents",
            format!(
                "it waits for {} of its {} parent{}: {}",
                pending.len(),
                parents.len(),
                plural(parents.len()),
                pending
                    .iter()
                    .map(|p| format!(
                        "{} ({})",
                        p.id,
                        p.state.map_or("no longer stored", |s| s.as_str())
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        r.tasks = pending.iter().map(|p| p.id).collect();
        r.count = Some(pending.len() as u64);
        r.limit = Some(parents.len() as u64);
        reasons.push(r);
    }
    if broker.paused().await?.contains(&t.queue) {
        reasons.push(WhyReason::new(
            "paused",
            format!(
                "its queue `{}` is paused (`taskd resume {}`)",
                t.queue, t.queue
            ),
        ));
    }
    let Some(qc) = config.queues.get(&t.queue) else {
        reasons.push(WhyReason::new(
            "not_configured",
            format!(
                "its queue `{}` is not in the config {}: no daemon with this config serves it",
                t.queue,
                config.path.display()
            ),
        ));
        return Ok(());
    };
    if let Some(node) = &t.node {
        let mut r = WhyReason::new(
            "held",
            format!("it is held by node {node}, which will start it next"),
        );
        r.node = Some(node.as_str().to_string());
        reasons.push(r);
    }
    let running = broker
        .list(&ListFilter {
            queue: Some(t.queue.clone()),
            state: Some(TaskState::Running),
            limit: 0,
            ..Default::default()
        })
        .await?;
    let nodes = broker.nodes().await?;
    let serving_nodes: Vec<_> = nodes
        .iter()
        .filter(|n| n.queues.iter().any(|q| q == t.queue.as_str()))
        .collect();
    let slots = qc.concurrency * serving_nodes.len().max(1);
    if running.len() >= slots {
        let oldest = running.iter().min_by_key(|r| r.updated_at);
        let mut r = WhyReason::new(
            "slots_full",
            format!(
                "the queue's slots are full: {} of {slots} running{}",
                running.len(),
                oldest
                    .map(|o| format!(
                        "; the oldest is {} (since {})",
                        o.id,
                        fmt_time(o.updated_at)
                    ))
                    .unwrap_or_default()
            ),
        );
        r.tasks = oldest.map(|o| o.id).into_iter().collect();
        r.count = Some(running.len() as u64);
        r.limit = Some(slots as u64);
        reasons.push(r);
    }
    let flow = Flow::of(qc);
    let state = broker.flow_state(&t.queue, t.id).await?;
    if let (Some(limit), Some(key)) = (flow.per_key, &state.flow_key) {
        if t.node.is_none() && state.key_holders.len() >= limit as usize {
            let mut r = WhyReason::new(
                "key_limit",
                format!(
                    "its key `{key}` is at its limit ({} of {limit}): held by {}",
                    state.key_holders.len(),
                    state
                        .key_holders
                        .iter()
                        .map(|h| h.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            r.tasks = state.key_holders.clone();
            r.key = Some(key.clone());
            r.count = Some(state.key_holders.len() as u64);
            r.limit = Some(u64::from(limit));
            reasons.push(r);
        }
    }
    if let (Some(rate), Some(tat)) = (flow.rate, state.rate_tat_us) {
        let next = (tat - rate.tolerance_us() + 999) / 1000;
        if next > now && t.node.is_none() {
            let key = state.rate_key.clone().filter(|_| rate.keyed);
            let mut r = WhyReason::new(
                "rate_limit",
                format!(
                    "the rate limit ({}{}) allows the next start at {}",
                    rate.rate,
                    key.as_ref()
                        .map(|k| format!(" for key `{k}`"))
                        .unwrap_or_default(),
                    when(next, now)
                ),
            );
            r.at = Some(next);
            r.key = key;
            reasons.push(r);
        }
    }
    if broker.shared() {
        if nodes.is_empty() {
            reasons.push(WhyReason::new(
                "no_daemon",
                "no daemon is running: no node is registered with the broker (start one: `taskd start`)".into(),
            ));
        } else if serving_nodes.is_empty() {
            let mut r = WhyReason::new(
                "no_daemon",
                format!(
                    "no node serves queue `{}`: {} node{} {} the broker, none with it in its config",
                    t.queue,
                    nodes.len(),
                    plural(nodes.len()),
                    if nodes.len() == 1 { "shares" } else { "share" }
                ),
            );
            r.count = Some(0);
            reasons.push(r);
        }
    } else if !serving.daemon {
        reasons.push(WhyReason::new(
            "no_daemon",
            format!(
                "no daemon is running for {} (start it: `taskd start`)",
                config.path.display()
            ),
        ));
    }
    if qc.worker().is_some() {
        let workers: Vec<_> = serving
            .workers
            .iter()
            .filter(|w| w.queue == t.queue)
            .collect();
        if !workers.is_empty() && workers.iter().all(|w| w.state == WorkerState::Fatal) {
            let mut r = WhyReason::new(
                "workers_fatal",
                format!(
                    "its queue's {} worker{} {} FATAL: {}",
                    workers.len(),
                    plural(workers.len()),
                    if workers.len() == 1 { "is" } else { "are" },
                    workers[0].why.as_deref().unwrap_or("they keep dying")
                ),
            );
            r.count = Some(workers.len() as u64);
            reasons.push(r);
        }
    }
    if reasons.is_empty() {
        reasons.push(WhyReason::new(
            "ready",
            "it is ready: nothing holds it back; it starts when a daemon claims it (older or higher-priority tasks of its queue go first)".into(),
        ));
    }
    Ok(())
}
