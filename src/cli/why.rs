//! `taskd why ID`: every reason a task is not running, one line each, with the numbers an
//! operator needs; for a running or finished task, that it is. Read-only: it reads the
//! task, its queue's config and state, its flow-control state in the broker, the nodes or
//! the daemon serving the store, and the daemon's workers.

use std::path::PathBuf;

use serde::Serialize;

use super::{exit, fmt_duration_ms, fmt_time, load_config, open_broker, print_json, Failure};
use crate::broker::{Flow, ListFilter};
use crate::model::{now_ms, TaskId, TaskState};

#[derive(clap::Args, Debug)]
pub struct WhyArgs {
    /// The task's id, as `submit` printed it.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Print the reasons as JSON: `{task, state, running, reasons: [{kind, text}]}`.
    #[arg(long)]
    pub json: bool,
}

/// One reason, as `--json` prints it: a stable `kind` and the line people read.
#[derive(Debug, Serialize)]
pub struct Reason {
    pub kind: &'static str,
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct Why {
    pub task: TaskId,
    pub state: TaskState,
    /// It runs now.
    pub running: bool,
    pub reasons: Vec<Reason>,
}

fn reason(kind: &'static str, text: String) -> Reason {
    Reason { kind, text }
}

fn when(at: i64, now: i64) -> String {
    if at > now {
        format!("{} (in {})", fmt_time(at), fmt_duration_ms(at - now))
    } else {
        fmt_time(at)
    }
}

pub async fn run(flag: Option<PathBuf>, args: WhyArgs) -> anyhow::Result<u8> {
    let id: TaskId = args.id.parse().map_err(Failure::usage)?;
    let config = load_config(flag)?;
    let broker = open_broker(&config).await?;
    let detail = broker
        .get(id)
        .await?
        .ok_or_else(|| Failure::new(exit::FAILURE, format!("no task with id {id}")))?;
    let t = &detail.task;
    let now = now_ms();
    let mut reasons = Vec::new();
    let qc = config.queues.get(&t.queue);
    match t.state {
        TaskState::Running => reasons.push(reason(
            "running",
            format!(
                "it is running (attempt {}) on node {}",
                t.attempts,
                t.node.as_ref().map(|n| n.as_str()).unwrap_or("?")
            ),
        )),
        s if s.is_terminal() => reasons.push(reason(
            "finished",
            format!(
                "it has finished: {s} at {}{}",
                fmt_time(t.finished_at.unwrap_or(t.updated_at)),
                t.last_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
        )),
        _ => {}
    }
    let waiting = !t.state.is_terminal() && t.state != TaskState::Running;
    if waiting {
        if t.state == TaskState::Retrying {
            reasons.push(reason(
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
            ));
        } else if t.run_at > now {
            reasons.push(reason(
                "run_at",
                format!("its run-at time is in the future: {}", when(t.run_at, now)),
            ));
        }
        let parents = broker.parents(id).await?;
        let pending: Vec<String> = parents
            .iter()
            .filter(|p| p.state != Some(TaskState::Succeeded))
            .map(|p| {
                format!(
                    "{} ({})",
                    p.id,
                    p.state.map_or("no longer stored", |s| s.as_str())
                )
            })
            .collect();
        if !pending.is_empty() {
            reasons.push(reason(
                "parents",
                format!(
                    "it waits for {} of its {} parent{}: {}",
                    pending.len(),
                    parents.len(),
                    if parents.len() == 1 { "" } else { "s" },
                    pending.join(", ")
                ),
            ));
        }
        if broker.paused().await?.contains(&t.queue) {
            reasons.push(reason(
                "paused",
                format!(
                    "its queue `{}` is paused (`taskd resume {}`)",
                    t.queue, t.queue
                ),
            ));
        }
        match qc {
            None => reasons.push(reason(
                "not_configured",
                format!(
                    "its queue `{}` is not in the config {}: no daemon with this config serves it",
                    t.queue,
                    config.path.display()
                ),
            )),
            Some(qc) => {
                if let Some(node) = &t.node {
                    reasons.push(reason(
                        "held",
                        format!("it is held by node {node}, which will start it next"),
                    ));
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
                let daemons = nodes.len().max(1);
                if running.len() >= qc.concurrency * daemons {
                    let oldest = running.iter().min_by_key(|r| r.updated_at);
                    reasons.push(reason(
                        "slots_full",
                        format!(
                            "the queue's slots are full: {} of {} running{}",
                            running.len(),
                            qc.concurrency * daemons,
                            oldest
                                .map(|o| format!(
                                    "; the oldest is {} (since {})",
                                    o.id,
                                    fmt_time(o.updated_at)
                                ))
                                .unwrap_or_default()
                        ),
                    ));
                }
                let flow = Flow::of(qc);
                broker.set_flow(&t.queue, flow);
                let state = broker.flow_state(&t.queue, id).await?;
                if let (Some(limit), Some(key)) = (flow.per_key, &state.flow_key) {
                    if t.node.is_none() && state.key_holders.len() >= limit as usize {
                        let holders: Vec<String> =
                            state.key_holders.iter().map(|h| h.to_string()).collect();
                        reasons.push(reason(
                            "key_limit",
                            format!(
                                "its key `{key}` is at its limit ({} of {limit}): held by {}",
                                state.key_holders.len(),
                                holders.join(", ")
                            ),
                        ));
                    }
                }
                if let (Some(rate), Some(tat)) = (flow.rate, state.rate_tat_us) {
                    let next = (tat - rate.tolerance_us() + 999) / 1000;
                    if next > now && t.node.is_none() {
                        reasons.push(reason(
                            "rate_limit",
                            format!(
                                "the rate limit ({}{}) allows the next start at {}",
                                rate.rate,
                                match (&state.rate_key, rate.keyed) {
                                    (Some(k), true) => format!(" for key `{k}`"),
                                    _ => String::new(),
                                },
                                when(next, now)
                            ),
                        ));
                    }
                }
                if broker.shared() {
                    let serving: Vec<_> = nodes
                        .iter()
                        .filter(|n| n.queues.iter().any(|q| q == t.queue.as_str()))
                        .collect();
                    if nodes.is_empty() {
                        reasons.push(reason(
                            "no_daemon",
                            "no daemon is running: no node is registered with the broker (start one: `taskd start`)".into(),
                        ));
                    } else if serving.is_empty() {
                        reasons.push(reason(
                            "no_daemon",
                            format!(
                                "no node serves queue `{}`: {} node{} share the broker, none has it in its config",
                                t.queue,
                                nodes.len(),
                                if nodes.len() == 1 { "" } else { "s" }
                            ),
                        ));
                    }
                } else if crate::daemon::storelock::holder(&config).is_none()
                    && crate::daemon::running_daemon(&config.state_dir).is_none()
                {
                    reasons.push(reason(
                        "no_daemon",
                        format!(
                            "no daemon is running for {} (start it: `taskd start`)",
                            config.path.display()
                        ),
                    ));
                }
                if qc.worker().is_some() {
                    let workers: Vec<_> = crate::daemon::running_daemon(&config.state_dir)
                        .and_then(|pid| {
                            crate::worker::status::read_status(&config.state_dir)
                                .filter(|f| f.daemon_pid == pid)
                        })
                        .map(|f| f.workers)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|w| w.queue == t.queue)
                        .collect();
                    if !workers.is_empty()
                        && workers
                            .iter()
                            .all(|w| w.state == crate::worker::status::WorkerState::Fatal)
                    {
                        reasons.push(reason(
                            "workers_fatal",
                            format!(
                                "its queue's workers are FATAL: {}",
                                workers[0].why.as_deref().unwrap_or("they keep dying")
                            ),
                        ));
                    }
                }
            }
        }
        if reasons.is_empty() {
            reasons.push(reason(
                "ready",
                "it is ready: nothing holds it back; it starts when a daemon claims it (older or higher-priority tasks of its queue go first)".into(),
            ));
        }
    }
    let why = Why {
        task: id,
        state: t.state,
        running: t.state == TaskState::Running,
        reasons,
    };
    if args.json {
        print_json(&why)?;
    } else {
        println!("task {} is {}", why.task, why.state);
        for r in &why.reasons {
            println!("- {}", r.text);
        }
    }
    Ok(exit::OK)
}
