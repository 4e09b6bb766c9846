//! `taskd reload` and `taskd restart`: ask the running daemon, over its control socket, to
//! reload its config (and say what changed) or to restart a queue's long-lived workers.

use std::path::PathBuf;
use std::time::Duration;

use super::{config_path, exit, load_config, print_json, Failure};
use crate::config::Config;
use crate::control::{ReloadReply, Request};

#[derive(clap::Args, Debug)]
pub struct ReloadArgs {
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(flag: Option<PathBuf>, args: ReloadArgs) -> anyhow::Result<u8> {
    let path = config_path(flag)?;
    // Check the file here first: the same diagnostics, without bothering the daemon.
    let Some(config) = crate::cli::load_or_report(&path, "the running daemon keeps its config")?
    else {
        return Ok(exit::CONFIG);
    };
    let reply = ask(&config, &Request::Reload).await?;
    if args.json {
        print_json(&reply)?;
    } else if reply.ok {
        if reply.changes.is_empty() {
            println!("reloaded: nothing changed");
        } else {
            println!("reloaded:");
            for c in &reply.changes {
                println!("  {c}");
            }
        }
    } else {
        for e in &reply.errors {
            eprintln!("{e}");
        }
        eprintln!("taskd: the daemon refused the new config and keeps the old one");
    }
    Ok(if reply.ok { exit::OK } else { exit::CONFIG })
}

#[derive(clap::Args, Debug)]
pub struct RestartArgs {
    /// The `worker` queue whose workers restart, as in the config's `[queues.NAME]`.
    #[arg(value_name = "QUEUE")]
    pub queue: String,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn restart(flag: Option<PathBuf>, args: RestartArgs) -> anyhow::Result<u8> {
    let config = load_config(flag)?;
    let queue = &args.queue;
    // The file's view first, for a message that names it; the daemon checks its own.
    match config.queues.iter().find(|(n, _)| n.as_str() == queue) {
        None => {
            let known: Vec<String> = config.queues.keys().map(|q| q.to_string()).collect();
            return Err(Failure::usage(format!(
                "cannot restart `{queue}`: no such queue in {}; known queues: {}",
                config.path.display(),
                known.join(", ")
            ))
            .into());
        }
        Some((_, q)) if q.worker().is_none() => {
            return Err(Failure::usage(format!(
                "cannot restart `{queue}`: it runs a new process per task (`command` or `shell` in {}), not long-lived workers, so its next task already runs the new code",
                config.path.display()
            ))
            .into());
        }
        Some(_) => {}
    }
    let reply = ask(
        &config,
        &Request::Restart {
            queue: queue.clone(),
        },
    )
    .await?;
    if args.json {
        print_json(&reply)?;
    } else if reply.ok {
        for c in &reply.changes {
            println!("{c}; `taskd status` shows the progress");
        }
    } else {
        for e in &reply.errors {
            eprintln!("taskd: cannot restart `{queue}`: {e}");
        }
    }
    Ok(if reply.ok { exit::OK } else { exit::USAGE })
}

/// Sends `req` to the daemon of `config` and returns its answer; an unreachable daemon is
/// an error that says why.
async fn ask(config: &Config, req: &Request) -> anyhow::Result<ReloadReply> {
    let reply = crate::control::request(&config.control_socket, req, Duration::from_secs(60))
        .await
        .map_err(|e| unreachable(config, &e))?;
    Ok(reply)
}

/// Why the daemon of `config` could not be reached over its control socket.
pub(super) fn unreachable(config: &Config, error: &std::io::Error) -> Failure {
    let socket = &config.control_socket;
    let why = match error.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            format!(
                "no taskd daemon is running for the state directory {}",
                config.state_dir.display()
            )
        }
        std::io::ErrorKind::PermissionDenied => {
            format!(
                "permission denied on {}: run as the daemon's user (normally root)",
                socket.display()
            )
        }
        _ => format!(
            "failed to reach the daemon at {}: {error}",
            socket.display()
        ),
    };
    Failure::new(exit::FAILURE, why)
}
