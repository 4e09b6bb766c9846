//! `taskd check`: validate a config file and summarise its queues.

use std::path::PathBuf;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use super::{config_path, exit, print_json};
use crate::config::{Program, QueueConfig};
use crate::model::QueueName;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Print the validated config as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `taskd check --json`: the validated config, as the daemon would run it.
#[derive(serde::Serialize)]
struct Checked {
    config: PathBuf,
    state_dir: PathBuf,
    broker: String,
    queues: Vec<CheckedQueue>,
}

/// One queue of `taskd check --json`, durations in seconds.
#[derive(serde::Serialize)]
struct CheckedQueue {
    name: QueueName,
    concurrency: usize,
    /// The program as `taskd check` prints it.
    program: String,
    timeout_secs: f64,
    max_attempts: u32,
    backoff: CheckedBackoff,
    kill_grace_secs: f64,
    user: Option<String>,
}

#[derive(serde::Serialize)]
struct CheckedBackoff {
    kind: &'static str,
    base_secs: f64,
    max_secs: f64,
    jitter: bool,
}

impl CheckedQueue {
    fn new(queue: &QueueConfig) -> Self {
        CheckedQueue {
            name: queue.name.clone(),
            concurrency: queue.concurrency,
            program: program_text(&queue.program),
            timeout_secs: queue.timeout.as_secs_f64(),
            max_attempts: queue.max_attempts,
            backoff: CheckedBackoff {
                kind: queue.backoff.kind.as_str(),
                base_secs: queue.backoff.base.as_secs_f64(),
                max_secs: queue.backoff.max.as_secs_f64(),
                jitter: queue.backoff.jitter,
            },
            kill_grace_secs: queue.kill_grace.as_secs_f64(),
            user: queue.user.clone(),
        }
    }
}

pub fn run(flag: Option<PathBuf>, args: CheckArgs) -> anyhow::Result<u8> {
    let path = config_path(flag)?;
    let Some(config) = crate::cli::load_or_report(&path, "nothing was started")? else {
        return Ok(exit::CONFIG);
    };
    if args.json {
        print_json(&Checked {
            config: config.path.clone(),
            state_dir: config.state_dir.clone(),
            broker: broker_text(&config.broker),
            queues: config.queues.values().map(CheckedQueue::new).collect(),
        })?;
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

pub fn broker_text(url: &crate::config::BrokerUrl) -> String {
    match url {
        crate::config::BrokerUrl::Sqlite { path } => format!("sqlite://{}", path.display()),
        crate::config::BrokerUrl::Redis { .. } | crate::config::BrokerUrl::Postgres { .. } => {
            url.to_string()
        }
    }
}

pub fn program_text(program: &Program) -> String {
    match program {
        Program::Command(argv) => argv
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        Program::Shell(s) => format!("sh -c {s:?}"),
        Program::Worker(w) => format!("worker {}", w.argv.join(" ")),
    }
}
