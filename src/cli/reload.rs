//! `taskd reload`: ask the running daemon to reload its config, and say what changed.

use std::path::PathBuf;
use std::time::Duration;

use super::{config_path, exit, print_json, Failure};

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
    let socket = config.control_socket.clone();
    let reply = crate::control::request_reload(&socket, Duration::from_secs(60))
        .await
        .map_err(|e| {
            let why = match e.kind() {
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
                _ => format!("failed to reach the daemon at {}: {e}", socket.display()),
            };
            Failure::new(exit::FAILURE, why)
        })?;
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
