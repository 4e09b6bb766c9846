//! `taskd check`: validate a config file and summarise its queues.

use std::path::PathBuf;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use super::{config_path, exit, print_json};
use crate::config::Program;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Print the validated config as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(flag: Option<PathBuf>, args: CheckArgs) -> anyhow::Result<u8> {
    let path = config_path(flag)?;
    let Some(config) = crate::cli::load_or_report(&path, "nothing was started")? else {
        return Ok(exit::CONFIG);
    };
    if args.json {
        let queues: Vec<_> = config
            .queues
            .values()
            .map(|q| {
                serde_json::json!({
                    "name": q.name,
                    "concurrency": q.concurrency,
                    "program": program_text(&q.program),
                    "timeout_secs": q.timeout.as_secs_f64(),
                    "max_attempts": q.max_attempts,
                    "backoff": {
                        "kind": q.backoff.kind.as_str(),
                        "base_secs": q.backoff.base.as_secs_f64(),
                        "max_secs": q.backoff.max.as_secs_f64(),
                        "jitter": q.backoff.jitter,
                    },
                    "kill_grace_secs": q.kill_grace.as_secs_f64(),
                    "user": q.user,
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "config": config.path,
            "state_dir": config.state_dir,
            "broker": broker_text(&config.broker),
            "queues": queues,
        }))?;
        return Ok(exit::OK);
    }
    println!("{}: ok", path.display());
    println!("  broker:    {}", broker_text(&config.broker));
    println!("  state_dir: {}", config.state_dir.display());
    if config.queues.is_empty() {
        println!("  warning: no queues are defined; add a [queues.NAME] table");
        return Ok(exit::OK);
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "queue",
        "concurrency",
        "timeout",
        "attempts",
        "backoff",
        "runs",
    ]);
    for q in config.queues.values() {
        table.add_row(vec![
            q.name.to_string(),
            q.concurrency.to_string(),
            humantime::format_duration(q.timeout).to_string(),
            q.max_attempts.to_string(),
            format!(
                "{} → {}",
                humantime::format_duration(q.backoff.base),
                humantime::format_duration(q.backoff.max)
            ),
            program_text(&q.program),
        ]);
    }
    println!("{table}");
    Ok(exit::OK)
}

pub fn broker_text(b: &crate::config::BrokerUrl) -> String {
    match b {
        crate::config::BrokerUrl::Sqlite { path } => format!("sqlite://{}", path.display()),
        crate::config::BrokerUrl::Redis { .. } => b.to_string(),
    }
}

pub fn program_text(p: &Program) -> String {
    match p {
        Program::Command(argv) => argv
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        Program::Shell(s) => format!("sh -c {s:?}"),
        Program::Worker(w) => format!("worker {}", w.argv.join(" ")),
    }
}
