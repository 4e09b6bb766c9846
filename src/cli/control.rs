//! `taskd retry`, `cancel`, `pause`, `resume`: change state through the broker.

use std::path::PathBuf;

use super::{exit, load_config, open_broker, Failure};
use crate::broker::CancelOutcome;
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

pub async fn retry(flag: Option<PathBuf>, args: IdArgs) -> anyhow::Result<u8> {
    let id: TaskId = args.id.parse().map_err(Failure::usage)?;
    let config = load_config(flag)?;
    let broker = open_broker(&config).await?;
    broker.retry(id).await?;
    println!("task {id} queued again with a fresh attempt budget");
    Ok(exit::OK)
}

pub async fn cancel(flag: Option<PathBuf>, args: IdArgs) -> anyhow::Result<u8> {
    let id: TaskId = args.id.parse().map_err(Failure::usage)?;
    let config = load_config(flag)?;
    let broker = open_broker(&config).await?;
    match broker.cancel(id).await? {
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
    let queue: QueueName = args.queue.parse().map_err(|e: String| Failure::usage(e))?;
    if !config.queues.contains_key(&queue) {
        let known: Vec<String> = config.queues.keys().map(|q| q.to_string()).collect();
        return Err(Failure::usage(format!(
            "unknown queue `{queue}` in {}; known queues: {}",
            config.path.display(),
            known.join(", ")
        ))
        .into());
    }
    let broker = open_broker(&config).await?;
    broker.set_paused(&queue, paused).await?;
    if paused {
        println!("queue {queue} paused: running tasks finish, no new ones start (persists across restarts)");
    } else {
        println!("queue {queue} resumed");
    }
    Ok(exit::OK)
}
