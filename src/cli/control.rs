//! `taskd retry`, `cancel`, `pause`, `resume`: change state through the broker, and record
//! each change in its audit trail (who: this process's user, `local cli`).

use std::path::PathBuf;

use super::{exit, load_config, open_broker, Failure};
use crate::audit::{Action, Actor, AuditEntry};
use crate::broker::{Broker, CancelOutcome};
use crate::config::Config;
use crate::model::{QueueName, TaskId};

#[derive(clap::Args, Debug)]
pub struct IdArgs {
    /// The task's id.
    pub id: String,
}

#[derive(clap::Args, Debug)]
pub struct QueueArgs {
    /// The queue's name, as in the config's `[queues.NAME]`.
    #[arg(value_name = "QUEUE")]
    pub queue: String,
}

/// Records `entry` in the store's audit trail. The change is made by then and stays made
/// if the store cannot take the record: say so on stderr, with what the record said.
pub(super) async fn record(broker: &dyn Broker, config: &Config, entry: AuditEntry) {
    if let Err(e) = broker.audit(&entry, config.audit_keep).await {
        eprintln!(
            "taskd: warning: {} of {} ({}) is done, but the audit trail could not record it: {e}",
            entry.action,
            entry.target(),
            entry.outcome
        );
    }
}

/// The queue of task `id`, for its audit record (`None` when it cannot be read).
async fn queue_of(broker: &dyn Broker, id: TaskId) -> Option<QueueName> {
    broker.get(id).await.ok().flatten().map(|d| d.task.queue)
}

pub async fn retry(flag: Option<PathBuf>, args: IdArgs) -> anyhow::Result<u8> {
    let id: TaskId = args.id.parse().map_err(Failure::usage)?;
    let config = load_config(flag)?;
    let broker = open_broker(&config).await?;
    let entry = AuditEntry::new(Actor::local_cli(), Action::Retry).task(id);
    if let Err(e) = broker.retry(id).await {
        if let Some(refused) = crate::broker::refusal(broker.as_ref(), entry, id, &e).await {
            record(broker.as_ref(), &config, refused).await;
        }
        return Err(e.into());
    }
    let mut entry = entry.ok("queued again with a fresh attempt budget");
    entry.queue = queue_of(broker.as_ref(), id).await;
    record(broker.as_ref(), &config, entry).await;
    println!("task {id} queued again with a fresh attempt budget");
    Ok(exit::OK)
}

pub async fn cancel(flag: Option<PathBuf>, args: IdArgs) -> anyhow::Result<u8> {
    let id: TaskId = args.id.parse().map_err(Failure::usage)?;
    let config = load_config(flag)?;
    let broker = open_broker(&config).await?;
    let entry = AuditEntry::new(Actor::local_cli(), Action::Cancel).task(id);
    let outcome = match broker.cancel(id).await {
        Ok(o) => o,
        Err(e) => {
            if let Some(refused) = crate::broker::refusal(broker.as_ref(), entry, id, &e).await {
                record(broker.as_ref(), &config, refused).await;
            }
            return Err(e.into());
        }
    };
    let mut entry = outcome.audited(entry);
    entry.queue = queue_of(broker.as_ref(), id).await;
    record(broker.as_ref(), &config, entry).await;
    match outcome {
        CancelOutcome::Cancelled => println!("task {id} cancelled"),
        CancelOutcome::Requested => {
            println!("task {id} is running: its process group is being stopped")
        }
        CancelOutcome::AlreadyFinished(s) => {
            eprintln!("taskd: task {id} had already finished ({s}); nothing to cancel");
            return Ok(exit::FAILURE);
        }
    }
    Ok(exit::OK)
}

pub async fn pause(flag: Option<PathBuf>, args: QueueArgs, paused: bool) -> anyhow::Result<u8> {
    let config = load_config(flag)?;
    let queue = super::submit::find_queue(&config, &args.queue)?
        .name
        .clone();
    let broker = open_broker(&config).await?;
    broker.set_paused(&queue, paused).await?;
    let (action, detail) = if paused {
        (Action::Pause, "paused: no task starts until it is resumed")
    } else {
        (Action::Resume, "resumed")
    };
    let entry = AuditEntry::new(Actor::local_cli(), action)
        .queue(queue.clone())
        .ok(detail);
    record(broker.as_ref(), &config, entry).await;
    if paused {
        println!("queue {queue} paused: running tasks finish, no new ones start (persists across restarts)");
    } else {
        println!("queue {queue} resumed");
    }
    Ok(exit::OK)
}
