//! `taskd result ID`: what a task returned, for scripts: the result alone on stdout, the
//! outcome in the exit code.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::submit::{Remote, RemoteArgs};
use super::visible::{json_line, visible};
use super::{exit, load_config, open_broker, print_json, Failure};
use crate::backoff::Doubling;
use crate::broker::Broker;
use crate::model::{TaskDetail, TaskId, TaskState};

#[derive(clap::Args, Debug)]
pub struct ResultArgs {
    /// The task's id, as `submit` printed it.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Wait until the task has finished (succeeded, failed or cancelled), however long
    /// that takes, unless --timeout says otherwise.
    #[arg(long)]
    pub wait: bool,
    /// Wait at most this long ("30s", "5m"; implies --wait); exit 1 if the task has not
    /// finished by then.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Print a JSON object instead: the task's id, state, result and error.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Where the task is read from: the broker, or a daemon's API.
enum Source {
    Broker(Arc<dyn Broker>),
    Api(Remote),
}

impl Source {
    async fn get(&self, id: TaskId) -> anyhow::Result<Option<TaskDetail>> {
        match self {
            Source::Broker(b) => Ok(b.get(id).await?),
            Source::Api(remote) => {
                match remote.fetch("GET", &format!("/api/v1/tasks/{id}"), None) {
                    Ok(v) => Ok(Some(serde_json::from_value(v).map_err(|e| {
                        Failure::new(exit::FAILURE, format!("{}: not a task: {e}", remote.base()))
                    })?)),
                    Err((Some(404), _)) => Ok(None),
                    Err((_, f)) => Err(f.into()),
                }
            }
        }
    }

    /// How often a wait looks again: a local store is cheap to read; an API is a round trip.
    fn pace(&self) -> Doubling {
        match self {
            Source::Broker(_) => {
                Doubling::new(Duration::from_millis(5), Duration::from_millis(200))
            }
            Source::Api(_) => Doubling::new(Duration::from_millis(20), Duration::from_millis(500)),
        }
    }
}

pub async fn run(flag: Option<PathBuf>, args: ResultArgs) -> anyhow::Result<u8> {
    let id: TaskId = args.id.parse().map_err(Failure::usage)?;
    let timeout = args
        .timeout
        .as_deref()
        .map(|t| {
            humantime::parse_duration(t).map_err(|e| {
                Failure::usage(format!(
                    "--timeout {t:?}: {e} (write it like \"30s\", \"5m\" or \"1h 30m\")"
                ))
            })
        })
        .transpose()?;
    let wait = args.wait || timeout.is_some();
    let source = match Remote::new(&args.remote) {
        Some(remote) => Source::Api(remote),
        None => Source::Broker(open_broker(&load_config(flag)?).await?),
    };
    let give_up = timeout.and_then(|t| Instant::now().checked_add(t));
    let mut pace = source.pace();
    let detail = loop {
        let Some(detail) = source.get(id).await? else {
            // A mistyped id: the caller's error, not the task's.
            return Err(Failure::usage(format!("no task with id {id}")).into());
        };
        if detail.task.state.is_terminal() || !wait {
            break detail;
        }
        if give_up.is_some_and(|at| Instant::now() >= at) {
            break detail;
        }
        let mut delay = pace.next_delay();
        if let Some(at) = give_up {
            delay = delay.min(at.saturating_duration_since(Instant::now()));
        }
        tokio::time::sleep(delay).await;
    };
    report(&detail, &args, timeout)
}

/// Prints what `detail` returned (or why it has nothing to return) and gives the exit code.
fn report(detail: &TaskDetail, args: &ResultArgs, timeout: Option<Duration>) -> anyhow::Result<u8> {
    let t = &detail.task;
    let error = match t.state {
        TaskState::Failed | TaskState::Cancelled => t.last_error.clone(),
        _ => None,
    };
    if args.json {
        print_json(&crate::view::ResultView {
            id: t.id,
            state: t.state,
            result: detail.result.clone(),
            error: error.clone(),
        })?;
    }
    match t.state {
        TaskState::Succeeded => {
            if let (Some(v), false) = (&detail.result, args.json) {
                println!("{}", json_line(v));
            }
            Ok(exit::OK)
        }
        TaskState::Failed | TaskState::Cancelled => {
            let why = error
                .map(|e| format!(": {}", visible(&e)))
                .unwrap_or_default();
            eprintln!(
                "taskd: task {} {} after {} attempt(s){why}",
                t.id, t.state, t.attempts
            );
            Ok(exit::TASK_FAILED)
        }
        state => {
            let hint = match timeout {
                Some(d) => format!(
                    "after waiting {} (--timeout)",
                    humantime::format_duration(d)
                ),
                None => "(--wait waits for it)".to_string(),
            };
            eprintln!(
                "taskd: task {} has not finished: it is {state} {hint}",
                t.id
            );
            Ok(exit::FAILURE)
        }
    }
}
