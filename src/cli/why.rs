//! `taskd why ID`: every reason a task is not running, one line each, with the numbers an
//! operator needs ([`crate::why`]); for a running or finished task, that it is.

use std::path::PathBuf;

use super::{exit, load_config, open_broker, print_json, Failure};
use crate::broker::Flow;
use crate::model::TaskId;
use crate::why::Serving;

#[derive(clap::Args, Debug)]
pub struct WhyArgs {
    /// The task's id, as `submit` printed it.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Print the reasons as JSON, as `GET /api/v1/tasks/{id}/why` answers: `{task, queue,
    /// state, running, reasons: [{kind, text, at, tasks, key, node, count, limit}]}`.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(flag: Option<PathBuf>, args: WhyArgs) -> anyhow::Result<u8> {
    let id: TaskId = args.id.parse().map_err(Failure::usage)?;
    let config = load_config(flag)?;
    let broker = open_broker(&config).await?;
    // The limits a daemon with this config claims with.
    for (name, q) in &config.queues {
        broker.set_flow(name, Flow::of(q));
    }
    let pid = crate::daemon::running_daemon(&config.state_dir);
    let serving = Serving {
        daemon: pid.is_some() || crate::daemon::storelock::holder(&config).is_some(),
        workers: pid
            .and_then(|pid| {
                crate::worker::status::read_status(&config.state_dir)
                    .filter(|f| f.daemon_pid == pid)
            })
            .map(|f| f.workers)
            .unwrap_or_default(),
    };
    let why = crate::why::explain(&config, broker.as_ref(), id, &serving)
        .await?
        .ok_or_else(|| Failure::new(exit::FAILURE, format!("no task with id {id}")))?;
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
