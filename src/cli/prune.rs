//! `taskd prune`: delete now the finished tasks whose `keep_succeeded`, `keep_failed` or
//! `keep_cancelled` ran out (what the daemon does every few seconds), or with `--dry-run`
//! count them. Straight against the store, like `submit`: no daemon needed.

use std::path::PathBuf;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use super::{exit, load_config, open_broker, print_json};
use crate::audit::{Action, Actor, AuditEntry};
use crate::broker::{
    prunable_schedule_slots, prune_due, prune_flow_states, prune_schedule_slots, PruneRule, Pruned,
};
use crate::config::QueueConfig;
use crate::model::{now_ms, Keep, QueueName, TaskState};
use crate::view;

#[derive(clap::Args, Debug)]
pub struct PruneArgs {
    /// Count the tasks (and schedules' slot records) that are due and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Only this queue (as in the config's `[queues.NAME]`).
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// Print the counts as JSON.
    #[arg(long)]
    pub json: bool,
}

const STATES: [TaskState; 3] = [
    TaskState::Succeeded,
    TaskState::Failed,
    TaskState::Cancelled,
];

fn keep_of(queue: &QueueConfig, state: TaskState) -> Keep {
    match state {
        TaskState::Succeeded => queue.keep_succeeded,
        TaskState::Failed => queue.keep_failed,
        _ => queue.keep_cancelled,
    }
}

/// `7d`, `36h`, `90m`, `30s`, or `forever`: the keep time as a config would write it.
fn show_keep(keep: Keep) -> String {
    match keep {
        Keep::Forever => "forever".into(),
        Keep::For(d) => {
            let s = d.as_secs();
            let ms = d.as_millis();
            if ms % 1000 != 0 {
                format!("{ms}ms")
            } else if s % 86_400 == 0 {
                format!("{}d", s / 86_400)
            } else if s % 3600 == 0 {
                format!("{}h", s / 3600)
            } else if s % 60 == 0 {
                format!("{}m", s / 60)
            } else {
                format!("{s}s")
            }
        }
    }
}

pub async fn run(flag: Option<PathBuf>, args: PruneArgs) -> anyhow::Result<u8> {
    let config = load_config(flag)?;
    let queues: Vec<&QueueConfig> = match &args.queue {
        Some(name) => vec![super::submit::find_queue(&config, name)?],
        None => config.queues.values().collect(),
    };
    let now = now_ms();
    let rules: Vec<PruneRule> = queues
        .iter()
        .flat_map(|q| PruneRule::for_queue(q, now))
        .collect();
    let broker = open_broker(&config).await?;
    let counts: Pruned = if args.dry_run {
        broker.prunable(&rules).await?
    } else {
        prune_due(broker.as_ref(), &rules, |_| {}).await?
    };
    // Schedules' slot records follow their queue's retention; a dry run counts them.
    let names: Vec<QueueName> = queues.iter().map(|q| q.name.clone()).collect();
    let slots = if args.dry_run {
        prunable_schedule_slots(broker.as_ref(), &config, Some(&names), now).await?
    } else {
        prune_schedule_slots(broker.as_ref(), &config, Some(&names), now).await?
    };
    // Rate states whose time has passed carry nothing: they go with any real prune.
    let rate_states = if args.dry_run {
        0
    } else {
        prune_flow_states(broker.as_ref(), &names, now * 1000).await?
    };
    if !args.dry_run {
        let mut entry = AuditEntry::new(Actor::local_cli(), Action::Prune).ok(detail(&counts));
        entry.count = Some(counts.total());
        if let Some(q) = queues.first().filter(|_| args.queue.is_some()) {
            entry = entry.queue(q.name.clone());
        }
        if let Err(e) = broker.audit(&entry, config.audit_keep).await {
            eprintln!(
                "taskd: warning: the tasks were deleted, but the audit trail could not record it: {e}"
            );
        }
    }
    let rows: Vec<view::PruneRow> = queues
        .iter()
        .flat_map(|q| {
            let counts = &counts;
            STATES.iter().map(move |s| view::PruneRow {
                queue: q.name.to_string(),
                state: *s,
                keep: show_keep(keep_of(q, *s)),
                count: counts
                    .counts
                    .get(&(q.name.clone(), *s))
                    .copied()
                    .unwrap_or(0),
            })
        })
        .collect();
    if args.json {
        print_json(&view::PruneReport {
            dry_run: args.dry_run,
            total: counts.total(),
            rows,
            slot_records: slots,
            rate_states,
        })?;
        return Ok(exit::OK);
    }
    let mut table = Table::new();
    let column = if args.dry_run { "due" } else { "deleted" };
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_header(vec!["queue", "state", "keep", column]);
    for r in &rows {
        table.add_row(vec![
            r.queue.clone(),
            r.state.to_string(),
            r.keep.clone(),
            r.count.to_string(),
        ]);
    }
    println!("{table}");
    let n = counts.total();
    let tasks = if n == 1 { "task" } else { "tasks" };
    let records = if slots == 1 { "record" } else { "records" };
    if args.dry_run {
        println!("dry run: {n} finished {tasks} past their keep time; nothing deleted");
        if slots > 0 {
            println!(
                "dry run: {slots} slot {records} of schedules older than their queue's longest keep time would be deleted"
            );
        }
    } else {
        println!("deleted {n} finished {tasks} past their keep time");
        if slots > 0 {
            println!(
                "deleted {slots} slot {records} of schedules older than their queue's longest keep time"
            );
        }
        if rate_states > 0 {
            let states = if rate_states == 1 { "state" } else { "states" };
            println!("deleted {rate_states} rate {states} whose time had passed");
        }
    }
    Ok(exit::OK)
}

/// The audit record's detail: `deleted 3 (emails succeeded 2, emails failed 1)`.
fn detail(counts: &Pruned) -> String {
    let parts: Vec<String> = counts
        .counts
        .iter()
        .map(|((q, s), n)| format!("{q} {s} {n}"))
        .collect();
    if parts.is_empty() {
        "deleted 0 finished tasks: none was past its keep time".into()
    } else {
        format!(
            "deleted {} finished tasks past their keep time ({})",
            counts.total(),
            parts.join(", ")
        )
    }
}
