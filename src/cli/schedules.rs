//! `taskd schedules`: the config's schedules with their records in the broker, one's slot
//! records (`show`), and `fire`, `pause`, `resume`. Straight through the broker: no daemon
//! is needed (a running one hears of a pause or resume at once). `fire`, `pause` and
//! `resume` are recorded in the audit trail (who: `local cli`, this process's user).

use std::path::PathBuf;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use super::visible::visible;
use super::{exit, fmt_time, load_config, open_broker, print_json, Failure};
use crate::audit::{Action as Audited, Actor, AuditEntry};
use crate::broker::schedules::{states_with_tasks, task_states};
use crate::broker::{ScheduleKey, ScheduleStep, StepAnswer};
use crate::config::{Config, ScheduleConfig};
use crate::model::now_ms;
use crate::view;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SchedulesArgs {
    /// Print the schedules as JSON (the API's `GET /api/v1/schedules`).
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: Option<Action>,
}

#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// One schedule and its newest slot records (fired, caught up, skipped and why).
    Show(ShowArgs),
    /// Enqueue the schedule's task now and print its id. Not a slot: the schedule's slots
    /// and record are untouched; the task has `schedule` set and no `slot`. Recorded in
    /// the audit trail.
    Fire(FireArgs),
    /// Stop firing a schedule (persists across restarts, like a queue's pause). Recorded
    /// in the audit trail.
    Pause(NameArgs),
    /// Fire a paused schedule again; the slots it slept through are missed slots
    /// (`missed` decides whether they run). Recorded in the audit trail.
    Resume(NameArgs),
}

#[derive(clap::Args, Debug)]
pub struct NameArgs {
    /// The schedule's name, as in the config's `[schedules.NAME]`.
    #[arg(value_name = "NAME")]
    pub name: String,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The schedule's name, as in the config's `[schedules.NAME]`.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Show at most N slot records, newest first (the broker keeps 500).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub limit: usize,
    /// Print the schedule and its slot records as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct FireArgs {
    /// The schedule's name, as in the config's `[schedules.NAME]`.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Print the enqueued task as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(flag: Option<PathBuf>, args: SchedulesArgs) -> anyhow::Result<u8> {
    let config = load_config(flag)?;
    match args.action {
        None => list(&config, args.json).await,
        Some(Action::Show(a)) => show(&config, a).await,
        Some(Action::Fire(a)) => fire(&config, a).await,
        Some(Action::Pause(a)) => pause(&config, &a.name, true).await,
        Some(Action::Resume(a)) => pause(&config, &a.name, false).await,
    }
}

/// The schedule `name` of the config; exit 2 naming the known ones otherwise.
pub fn find<'a>(config: &'a Config, name: &str) -> Result<&'a ScheduleConfig, Failure> {
    config.schedules.get(name).map(|s| &**s).ok_or_else(|| {
        let known: Vec<&str> = config.schedules.keys().map(String::as_str).collect();
        Failure::usage(format!(
            "unknown schedule `{name}` in {}; known schedules: {}",
            config.path.display(),
            if known.is_empty() {
                "(none)".to_string()
            } else {
                known.join(", ")
            }
        ))
    })
}

fn key(schedule: &ScheduleConfig) -> ScheduleKey {
    ScheduleKey {
        name: schedule.name.clone(),
        queue: schedule.queue.clone(),
    }
}

async fn list(config: &Config, json: bool) -> anyhow::Result<u8> {
    let broker = open_broker(config).await?;
    let keys: Vec<ScheduleKey> = config.schedules.values().map(|s| key(s)).collect();
    let states = states_with_tasks(broker.as_ref(), &keys).await?;
    let now = now_ms();
    let views: Vec<view::ScheduleView> = config
        .schedules
        .values()
        .zip(&states)
        .map(|(cfg, (st, ts))| view::ScheduleView::new(cfg, st, *ts, now))
        .collect();
    if json {
        print_json(&view::Schedules { schedules: views })?;
        return Ok(exit::OK);
    }
    if views.is_empty() {
        println!(
            "no schedules in {} (add a [schedules.NAME] table: see docs/config.md, \"Schedules\")",
            config.path.display()
        );
        return Ok(exit::OK);
    }
    println!("{}", schedules_table(&views));
    Ok(exit::OK)
}

/// `taskd schedules`: one row per schedule.
pub fn schedules_table(views: &[view::ScheduleView]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "schedule",
        "queue",
        "spec",
        "time zone",
        "next (local)",
        "next (UTC)",
        "last slot",
        "last task",
        "fired",
        "caught up",
        "skipped",
        "state",
    ]);
    for v in views {
        let (last_slot, last_task) = match &v.last {
            None => ("-".to_string(), "-".to_string()),
            Some(l) => (
                format!("{} {}", l.slot_utc, l.outcome.as_str()),
                match (&l.task, l.task_state) {
                    (Some(_), Some(s)) if l.outcome != crate::broker::SlotOutcome::Skipped => {
                        s.to_string()
                    }
                    (Some(_), None) if l.outcome != crate::broker::SlotOutcome::Skipped => {
                        "gone".to_string()
                    }
                    _ => "-".to_string(),
                },
            ),
        };
        table.add_row(vec![
            v.schedule.clone(),
            v.queue.clone(),
            v.spec.clone(),
            v.timezone.clone(),
            v.next_local.clone().unwrap_or_else(|| "-".into()),
            v.next_utc.clone().unwrap_or_else(|| "-".into()),
            last_slot,
            last_task,
            v.fired.to_string(),
            v.caught_up.to_string(),
            v.skipped.to_string(),
            state_of(v),
        ]);
    }
    table
}

/// `enabled`, `PAUSED` or `disabled` (in the config).
fn state_of(schedule: &view::ScheduleView) -> String {
    if !schedule.enabled {
        "disabled".into()
    } else if schedule.paused {
        "PAUSED".into()
    } else {
        "enabled".into()
    }
}

async fn show(config: &Config, args: ShowArgs) -> anyhow::Result<u8> {
    let cfg = find(config, &args.name)?;
    let broker = open_broker(config).await?;
    let k = key(cfg);
    let (st, ts) = states_with_tasks(broker.as_ref(), std::slice::from_ref(&k))
        .await?
        .remove(0);
    let records = broker.schedule_history(&k, args.limit).await?;
    let states = task_states(broker.as_ref(), &records).await?;
    let detail = view::ScheduleDetail {
        schedule: view::ScheduleView::new(cfg, &st, ts, now_ms()),
        history: records
            .iter()
            .zip(states)
            .map(|(r, s)| view::SlotView::new(r, s))
            .collect(),
    };
    if args.json {
        print_json(&detail)?;
        return Ok(exit::OK);
    }
    let v = &detail.schedule;
    println!("schedule  {}", v.schedule);
    println!("queue     {}", v.queue);
    println!("spec      {} in {}", v.spec, v.timezone);
    println!("state     {}", state_of(v));
    println!(
        "policies  missed = \"{}\", overlap = \"{}\"",
        v.missed, v.overlap
    );
    match (&v.next_local, &v.next_utc) {
        (Some(l), Some(u)) => println!("next      {l} ({u})"),
        _ => println!("next      -"),
    }
    match v.handled_through {
        Some(t) => println!("handled   every slot up to {}", fmt_time(t)),
        None => println!("handled   nothing yet (no daemon has run it)"),
    }
    println!(
        "counts    {} fired, {} caught up, {} skipped",
        v.fired, v.caught_up, v.skipped
    );
    if detail.history.is_empty() {
        return Ok(exit::OK);
    }
    println!();
    println!("{}", history_table(&detail.history));
    Ok(exit::OK)
}

/// `taskd schedules show NAME`: one row per slot record, newest first.
pub fn history_table(history: &[view::SlotView]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "slot (UTC)",
        "outcome",
        "slots",
        "task",
        "task state",
        "reason",
        "node",
    ]);
    for r in history {
        let slot = if r.count > 1 {
            format!("{} … {}", crate::slots::show_utc(r.first), r.slot_utc)
        } else {
            r.slot_utc.clone()
        };
        table.add_row(vec![
            slot,
            r.outcome.as_str().to_string(),
            r.count.to_string(),
            r.task.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
            r.task_state
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into()),
            visible(r.reason.as_deref().unwrap_or("")).into_owned(),
            visible(&r.node).into_owned(),
        ]);
    }
    table
}

async fn fire(config: &Config, args: FireArgs) -> anyhow::Result<u8> {
    let cfg = find(config, &args.name)?;
    let broker = open_broker(config).await?;
    let task = cfg.task();
    let answer = broker
        .schedule_step(&key(cfg), ScheduleStep::Manual { task })
        .await?;
    let StepAnswer::Manual { task: id } = answer else {
        return Err(Failure::new(
            exit::FAILURE,
            format!("the broker answered {answer:?} to a manual fire"),
        )
        .into());
    };
    let entry = AuditEntry::new(Actor::local_cli(), Audited::ScheduleFire)
        .schedule(cfg.name.clone())
        .queue(cfg.queue.clone())
        .task(id)
        .ok("enqueued now, outside its slots");
    super::control::record(broker.as_ref(), config, entry).await;
    if args.json {
        let task = broker
            .get(id)
            .await?
            .map(|d| d.task)
            .ok_or_else(|| Failure::new(exit::FAILURE, format!("task {id} vanished")))?;
        print_json(&view::ScheduleFired {
            schedule: cfg.name.clone(),
            task,
        })?;
    } else {
        println!("{id}");
    }
    Ok(exit::OK)
}

async fn pause(config: &Config, name: &str, paused: bool) -> anyhow::Result<u8> {
    let cfg = find(config, name)?;
    let broker = open_broker(config).await?;
    broker.set_schedule_paused(&key(cfg), paused).await?;
    let entry = AuditEntry::schedule_paused(
        Actor::local_cli(),
        &cfg.name,
        cfg.queue.clone(),
        paused,
        cfg.missed.as_str(),
    );
    super::control::record(broker.as_ref(), config, entry).await;
    if paused {
        println!(
            "schedule {name} paused: it fires no slot until `taskd schedules resume {name}` (persists across restarts)"
        );
    } else {
        println!(
            "schedule {name} resumed: the slots it slept through are missed slots (missed = \"{}\")",
            cfg.missed.as_str()
        );
    }
    Ok(exit::OK)
}
