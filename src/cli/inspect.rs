//! `taskd status`, `taskd tasks`, `taskd show`: read state, as tables or `--json`.

use std::path::PathBuf;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use super::visible::{json_line, visible};
use super::{exit, fmt_duration_ms, fmt_time, load_config, open_broker, print_json, Failure};
use crate::broker::ListFilter;
use crate::model::{now_ms, TaskDetail, TaskId, TaskRecord, TaskState};
use crate::view;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print queues, workers and nodes as JSON: the API's `GET /api/v1/queues`, plus the
    /// local daemon (`daemon`) and `state_dir`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: super::submit::RemoteArgs,
}

#[derive(clap::Args, Debug)]
pub struct TasksArgs {
    /// Only tasks of this queue.
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// Only tasks in this state: scheduled, queued, running, retrying, succeeded, failed or
    /// cancelled (`failed` is the dead set).
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// Only tasks created at or after WHEN: a duration back from now (`2h`, `1d`), a time
    /// (RFC 3339, `2026-12-01T03:00:00Z`) or Unix seconds.
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Only tasks created before WHEN (same forms as --since).
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// Only the tasks with this unique key (waiting, running or finished).
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Only tasks whose payload has this field with this value: `payload.user_id = 42`
    /// (nested: `payload.user.id = 42`; `42` also matches the string "42").
    #[arg(long = "where", value_name = "COND")]
    pub condition: Option<String>,
    /// List at most N tasks, newest first.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub limit: usize,
    /// The next page: only tasks older than task ID (the last one a previous listing
    /// printed, with the same filter).
    #[arg(long, value_name = "ID")]
    pub after: Option<String>,
    /// Print the task records as a JSON array.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: super::submit::RemoteArgs,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The task's id, as `submit` printed it.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Print the task and its attempts as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: super::submit::RemoteArgs,
}

pub async fn status(flag: Option<PathBuf>, args: StatusArgs) -> anyhow::Result<u8> {
    if let Some(remote) = super::submit::Remote::new(&args.remote) {
        return status_remote(&remote, args.json);
    }
    let config = load_config(flag)?;
    let broker = open_broker(&config).await?;
    let counts = broker.counts().await?;
    let rows = crate::broker::queue_rows(config.queues.keys(), counts);
    let workers = daemon_workers(&config.state_dir);
    // The daemon serving this store answers on its store lock even when its state directory
    // is gone; it also says why it claims nothing, if it does not.
    let holder = crate::daemon::storelock::holder(&config);
    let halted = holder.as_ref().and_then(|h| h.halted.clone());
    let containment = holder.as_ref().and_then(|h| h.containment.clone());
    let daemon =
        crate::daemon::running_daemon(&config.state_dir).or(holder.as_ref().map(|h| h.pid));
    // The nodes sharing this broker (empty for the embedded store).
    let nodes = broker.nodes().await?;
    let store = broker.store_size().await?;
    let now = now_ms();
    if args.json {
        // The API's shape (`GET /api/v1/queues`) plus what only this machine knows.
        let queues = view::QueueView::all(&rows, &config);
        print_json(&view::Status {
            daemon: daemon.map(|pid| view::DaemonView {
                pid,
                halted: halted.clone(),
                containment: containment.clone(),
            }),
            state_dir: config.state_dir.clone(),
            store: store.clone(),
            overview: view::Overview {
                queues,
                workers: workers
                    .iter()
                    .map(|w| {
                        let rss = w.pid.and_then(crate::worker::status::rss_bytes);
                        view::WorkerView::new(w.clone(), now, rss)
                    })
                    .collect(),
                nodes,
            },
        })?;
        return Ok(exit::OK);
    }
    match daemon {
        Some(pid) if halted.is_some() => println!(
            "daemon: running (pid {pid}), state in {}, but NOT CLAIMING TASKS: {}",
            config.state_dir.display(),
            halted.as_deref().unwrap_or_default()
        ),
        Some(pid) => println!(
            "daemon: running (pid {pid}), state in {}",
            config.state_dir.display()
        ),
        None if !nodes.is_empty() => println!(
            "daemon: not running on this machine (state in {}); {} sharing the broker",
            config.state_dir.display(),
            if nodes.len() == 1 {
                "1 node is".to_string()
            } else {
                format!("{} nodes are", nodes.len())
            }
        ),
        None => println!(
            "daemon: not running (state in {}); tasks wait until `taskd start`",
            config.state_dir.display()
        ),
    }
    if let (Some(_), Some(c)) = (daemon, &containment) {
        println!("containment: {c}");
    }
    if let Some(size) = &store {
        println!("{}", view::store_line(size, &config.broker.to_string()));
    }
    let mut table = queues_table();
    for (name, r) in &rows {
        let mut row = vec![name.clone()];
        row.extend(r.in_order().iter().map(|(_, n)| n.to_string()));
        let mut notes = queue_notes(r.paused, r.configured, r.set_aside);
        if workers.iter().any(|w| {
            w.queue.as_str() == name && w.state == crate::worker::status::WorkerState::Fatal
        }) {
            notes.push("workers FATAL (see below): tasks wait".into());
        }
        row.push(notes.join(", "));
        table.add_row(row);
    }
    println!("{table}");
    if !workers.is_empty() {
        println!("{}", workers_table(&workers));
        print_workers_stderr(&workers);
    }
    let worker_queues = config
        .queues
        .values()
        .filter(|q| q.worker().is_some())
        .count();
    if worker_queues > 0 && daemon.is_none() {
        println!("workers: none running (the daemon is not running)");
    }
    if !nodes.is_empty() {
        println!("nodes sharing {}:", config.broker);
        println!("{}", nodes_table(&nodes, now));
    }
    Ok(exit::OK)
}

/// The queues table of `taskd status` (local and `--server`), without rows: the queue, one
/// column per state in lifecycle order, notes. Rows must give counts in the same order.
fn queues_table() -> Table {
    let mut table = Table::new();
    let mut header = vec!["queue".to_string()];
    header.extend(TaskState::ALL.iter().map(|s| s.to_string()));
    header.push("notes".into());
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    table
}

/// The notes column of a queue's row in `taskd status`.
fn queue_notes(paused: bool, configured: bool, set_aside: u64) -> Vec<String> {
    let mut notes = Vec::new();
    if paused {
        notes.push("PAUSED".to_string());
    }
    if !configured {
        notes.push("not in config: its tasks will not run".into());
    }
    if set_aside > 0 {
        let entries = if set_aside == 1 { "entry" } else { "entries" };
        notes.push(format!(
            "{set_aside} inbox {entries} set aside, never to run (reused id or unreadable; see docs/redis.md)"
        ));
    }
    notes
}

/// The nodes sharing a broker, and how long ago each was last heard from.
fn nodes_table(nodes: &[crate::broker::NodeInfo], now: i64) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "node",
        "host",
        "pid",
        "queues",
        "running",
        "last heartbeat",
    ]);
    for n in nodes {
        table.add_row(vec![
            visible(n.id.as_str()).into_owned(),
            visible(&n.host).into_owned(),
            n.pid.to_string(),
            n.queues.join(" "),
            n.running.to_string(),
            format!("{} ago", fmt_duration_ms((now - n.last_heartbeat).max(0))),
        ]);
    }
    table
}

/// `taskd status --server URL`: the queues as the daemon's API reports them.
fn status_remote(remote: &super::submit::Remote, json: bool) -> anyhow::Result<u8> {
    let v = remote.call("GET", "/api/v1/queues", None)?;
    if json {
        print_json(&v)?;
        return Ok(exit::OK);
    }
    let queues: Vec<view::QueueView> =
        serde_json::from_value(v["queues"].clone()).map_err(|e| {
            Failure::new(
                exit::FAILURE,
                format!("{}/api/v1/queues: not a list of queues: {e}", remote.base()),
            )
        })?;
    let mut table = queues_table();
    for q in &queues {
        let mut row = vec![q.queue.clone()];
        row.extend(
            TaskState::ALL
                .iter()
                .map(|s| q.counts.get(s.as_str()).copied().unwrap_or(0).to_string()),
        );
        let notes = queue_notes(q.paused, q.configured, q.set_aside);
        row.push(notes.join(", "));
        table.add_row(row);
    }
    println!("daemon: answering at {}", remote.base());
    println!("{table}");
    let workers: Vec<crate::worker::status::WorkerInfo> =
        serde_json::from_value(v["workers"].clone()).unwrap_or_default();
    if !workers.is_empty() {
        println!("{}", workers_table(&workers));
        print_workers_stderr(&workers);
    }
    let nodes: Vec<crate::broker::NodeInfo> =
        serde_json::from_value(v["nodes"].clone()).unwrap_or_default();
    if !nodes.is_empty() {
        println!("nodes sharing its broker:");
        println!("{}", nodes_table(&nodes, now_ms()));
    }
    Ok(exit::OK)
}

pub async fn tasks(flag: Option<PathBuf>, args: TasksArgs) -> anyhow::Result<u8> {
    let filter = list_filter(&args, now_ms())?;
    let list = match super::submit::Remote::new(&args.remote) {
        Some(remote) => list_remote(&remote, &filter, &args)?,
        None => {
            let config = load_config(flag)?;
            let broker = open_broker(&config).await?;
            match broker.list(&filter).await {
                Err(crate::broker::BrokerError::NotFound(_)) if filter.after.is_some() => {
                    return Err(Failure::usage(format!(
                        "--after {}: no task has this id (pass the last id a previous listing printed)",
                        args.after.as_deref().unwrap_or_default()
                    ))
                    .into())
                }
                r => r?,
            }
        }
    };
    if args.json {
        print_json(&list)?;
        return Ok(exit::OK);
    }
    if list.is_empty() {
        println!("no tasks match");
        return Ok(exit::OK);
    }
    let now = now_ms();
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "id",
        "queue",
        "state",
        "attempts",
        "age",
        "last error",
    ]);
    for t in &list {
        let mut err = t.last_error.clone().unwrap_or_default();
        if err.chars().count() > 60 {
            err = format!("{}…", err.chars().take(59).collect::<String>());
        }
        table.add_row(vec![
            t.id.to_string(),
            t.queue.to_string(),
            t.state.to_string(),
            t.attempts.to_string(),
            fmt_duration_ms(now - t.created_at),
            visible(&err).into_owned(),
        ]);
    }
    println!("{table}");
    Ok(exit::OK)
}

/// The broker's filter for `taskd tasks`' options; a bad value is a usage error naming its
/// option.
fn list_filter(args: &TasksArgs, now: i64) -> anyhow::Result<ListFilter> {
    fn opt<T>(
        flag: &str,
        value: &Option<String>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> anyhow::Result<Option<T>> {
        value
            .as_deref()
            .map(|s| parse(s).map_err(|e| Failure::usage(format!("{flag}: {e}")).into()))
            .transpose()
    }
    let when = |s: &str| crate::audit::parse_since(s, now);
    Ok(ListFilter {
        queue: opt("--queue", &args.queue, |q| q.parse())?,
        state: opt("--state", &args.state, |s| s.parse())?,
        limit: args.limit,
        since: opt("--since", &args.since, when)?,
        until: opt("--until", &args.until, when)?,
        id: None,
        unique_key: args.key.clone(),
        payload: opt(
            "--where",
            &args.condition,
            crate::broker::PayloadMatch::parse,
        )?,
        after: opt("--after", &args.after, |i| {
            i.parse::<TaskId>().map_err(|e| e.to_string())
        })?,
    })
}

/// A query-string value, percent-encoded (everything but RFC 3986's unreserved characters).
fn query_value(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `taskd tasks --server URL`: the same list through the API (`GET /api/v1/tasks` with the
/// same filter), a page (at most 1000) at a time.
fn list_remote(
    remote: &super::submit::Remote,
    filter: &ListFilter,
    args: &TasksArgs,
) -> anyhow::Result<Vec<TaskRecord>> {
    let mut fixed = String::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            fixed.push_str(&format!("&{k}={}", query_value(&v)));
        }
    };
    put("queue", filter.queue.as_ref().map(|q| q.to_string()));
    put("state", filter.state.map(|s| s.to_string()));
    put("since", filter.since.map(|t| t.to_string()));
    put("until", filter.until.map(|t| t.to_string()));
    put("unique_key", filter.unique_key.clone());
    // The condition as written: the API parses it as the broker does.
    put("payload", args.condition.clone());
    let limit = filter.limit;
    let mut list: Vec<TaskRecord> = Vec::new();
    let mut cursor: Option<String> = filter.after.map(|id| id.to_string());
    while list.len() < limit {
        let mut path = format!(
            "/api/v1/tasks?limit={}{fixed}",
            (limit - list.len()).min(1000)
        );
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", query_value(c)));
        }
        let v = remote.call("GET", &path, None)?;
        let page: Vec<TaskRecord> = serde_json::from_value(v["tasks"].clone()).map_err(|e| {
            Failure::new(
                exit::FAILURE,
                format!("{}{path}: not a list of tasks: {e}", remote.base()),
            )
        })?;
        list.extend(page);
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    Ok(list)
}

pub async fn show(flag: Option<PathBuf>, args: ShowArgs) -> anyhow::Result<u8> {
    let id: TaskId = args.id.parse().map_err(Failure::usage)?;
    let missing = || Failure::new(exit::FAILURE, format!("no task with id {id}"));
    let detail: TaskDetail = match super::submit::Remote::new(&args.remote) {
        Some(remote) => match remote.fetch("GET", &format!("/api/v1/tasks/{id}"), None) {
            Ok(v) => serde_json::from_value(v).map_err(|e| {
                Failure::new(exit::FAILURE, format!("{}: not a task: {e}", remote.base()))
            })?,
            Err((Some(404), _)) => return Err(missing().into()),
            Err((_, f)) => return Err(f.into()),
        },
        None => {
            let config = load_config(flag)?;
            let broker = open_broker(&config).await?;
            broker.get(id).await?.ok_or_else(missing)?
        }
    };
    if args.json {
        print_json(&detail)?;
        return Ok(exit::OK);
    }
    let t = &detail.task;
    println!("task      {}", t.id);
    println!("queue     {}", t.queue);
    println!(
        "state     {}{}",
        t.state,
        if t.cancel_requested {
            " (cancel requested)"
        } else {
            ""
        }
    );
    println!("attempts  {}", t.attempts);
    if detail.lost > 0 {
        println!(
            "lost      {} run{} (the daemon or node running it died; past max_lost it fails)",
            detail.lost,
            if detail.lost == 1 { "" } else { "s" }
        );
    }
    if detail.crashes > 0 {
        println!(
            "crashes   {} (its worker died running it; at max_crashes it fails)",
            detail.crashes
        );
    }
    match (&t.payload_b64, t.raw_payload()) {
        (None, _) => println!("payload   {}", t.payload),
        (Some(_), Some(bytes)) => println!("payload   {}", raw_preview(&bytes)),
        (Some(_), None) => println!("payload   raw, not valid base64 in the store"),
    }
    if !t.args.is_empty() {
        println!("args      {:?}", t.args);
    }
    if t.priority != 0 {
        println!("priority  {}", t.priority);
    }
    if let Some(k) = &t.unique_key {
        println!("unique    {}", visible(k));
    }
    if let Some(e) = t.expires_at {
        println!("expires   {}", fmt_time(e));
    }
    if !t.after.is_empty() {
        println!(
            "after     {}",
            crate::model::join_after(&t.after).replace(',', ", ")
        );
    }
    if let Some(c) = crate::celery::CeleryMeta::of(&t.payload) {
        println!(
            "celery    {} (Celery id {})",
            visible(&c.name),
            visible(&c.result_to.id)
        );
    }
    if let Some(name) = &t.schedule {
        match t.slot {
            Some(slot) => println!(
                "schedule  {} (slot {})",
                visible(name),
                crate::slots::show_utc(slot)
            ),
            None => println!("schedule  {} (fired by an operator)", visible(name)),
        }
    }
    println!("created   {}", fmt_time(t.created_at));
    if matches!(t.state, TaskState::Scheduled | TaskState::Retrying) {
        println!("runs at   {}", fmt_time(t.run_at));
    }
    if let Some(f) = t.finished_at {
        println!("finished  {}", fmt_time(f));
    }
    if let Some(n) = &t.node {
        println!("node      {}", visible(n.as_str()));
    }
    if let Some(e) = &t.last_error {
        println!("error     {}", visible(e));
    }
    if let Some(r) = &detail.result {
        println!("result    {}", shown_result(r, t.id));
    }
    for (run, a) in (1u32..).zip(&detail.history) {
        println!();
        // Runs are numbered in order. The program's TASKD_ATTEMPT repeats after a retry (a
        // fresh budget) or an uncharged run (lost, shutdown): say so where it differs.
        let counted = if a.number == run {
            String::new()
        } else {
            format!(" (TASKD_ATTEMPT={})", a.number)
        };
        let reason = a
            .reason
            .map(|r| r.to_string())
            .unwrap_or_else(|| "?".into());
        let code = match (a.exit_code, a.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ => String::new(),
        };
        println!(
            "attempt {run}{counted} — {reason}{}{} — started {}, took {}{}",
            if code.is_empty() { "" } else { ", " },
            code,
            fmt_time(a.started_at),
            fmt_duration_ms(a.ended_at - a.started_at),
            a.pid.map(|p| format!(", pid {p}")).unwrap_or_default(),
        );
        if let Some(e) = &a.error {
            println!("  error: {}", visible(e));
        }
        if let Some(used) = resources_used(a.memory_peak, a.cpu_usec) {
            println!("  used: {used}");
        }
        for (name, tail) in [("stdout", &a.stdout_tail), ("stderr", &a.stderr_tail)] {
            if !tail.is_empty() {
                println!("  {name} (tail):");
                for line in tail.lines() {
                    println!("    {}", visible(line));
                }
            }
        }
    }
    Ok(exit::OK)
}

/// What an attempt's cgroup counted, for `show`: "peak memory 12.5 MiB, CPU 1.25 s".
fn resources_used(memory_peak: Option<u64>, cpu_usec: Option<u64>) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(m) = memory_peak {
        parts.push(format!(
            "peak memory {:.1} MiB",
            m as f64 / (1024.0 * 1024.0)
        ));
    }
    if let Some(c) = cpu_usec {
        parts.push(format!("CPU {:.2} s", c as f64 / 1e6));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// How much of a result `show` prints, in characters.
const RESULT_SHOWN: usize = 1000;

/// A result as `show` prints it: compact JSON on one line, cut after [`RESULT_SHOWN`]
/// characters (`taskd result` prints it whole).
fn shown_result(value: &serde_json::Value, id: TaskId) -> String {
    let line = json_line(value);
    if line.chars().count() <= RESULT_SHOWN {
        return line;
    }
    let cut: String = line.chars().take(RESULT_SHOWN).collect();
    format!(
        "{cut}… ({} bytes in all; `taskd result {id}` prints it whole)",
        line.len()
    )
}

/// The long-lived workers of the daemon running on `state_dir` (none when it is not running):
/// they live in the daemon, which keeps `state_dir/workers.json` current.
fn daemon_workers(state_dir: &std::path::Path) -> Vec<crate::worker::status::WorkerInfo> {
    let Some(pid) = crate::daemon::running_daemon(state_dir) else {
        return Vec::new();
    };
    crate::worker::status::read_status(state_dir)
        .filter(|f| f.daemon_pid == pid)
        .map(|f| f.workers)
        .unwrap_or_default()
}

/// Under the workers table: what each worker's previous process last wrote on stderr
/// outside tasks, the cause a FATAL or restarting worker's "why" can only hint at.
fn print_workers_stderr(workers: &[crate::worker::status::WorkerInfo]) {
    for w in workers.iter().filter(|w| !w.last_stderr.is_empty()) {
        println!(
            "{}/{} wrote on stderr before it last ended:",
            w.queue, w.slot
        );
        for line in &w.last_stderr {
            println!("    {}", visible(line));
        }
    }
}

/// `taskd status`: one row per long-lived worker.
fn workers_table(workers: &[crate::worker::status::WorkerInfo]) -> Table {
    let now = crate::model::now_ms();
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "worker",
        "pid",
        "state",
        "uptime",
        "tasks done",
        "last exit",
        "why",
    ]);
    for w in workers {
        let uptime = match (w.pid, w.started_ms) {
            (Some(_), Some(t)) => humantime::format_duration(std::time::Duration::from_secs(
                ((now - t).max(0) / 1000) as u64,
            ))
            .to_string(),
            _ => "-".into(),
        };
        table.add_row(vec![
            format!("{}/{}", w.queue, w.slot),
            w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            w.state.as_str().to_string(),
            uptime,
            w.tasks_done.to_string(),
            visible(w.last_exit.as_deref().unwrap_or_default()).into_owned(),
            visible(w.why.as_deref().unwrap_or_default()).into_owned(),
        ]);
    }
    table
}

/// How many bytes of a raw payload `show` prints in hex.
const RAW_PREVIEW: usize = 32;

/// A raw payload as `show` prints it: its size, then its first bytes in hex.
fn raw_preview(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes
        .iter()
        .take(RAW_PREVIEW)
        .map(|b| format!("{b:02x}"))
        .collect();
    let more = if bytes.len() > RAW_PREVIEW {
        " …"
    } else {
        ""
    };
    let unit = if bytes.len() == 1 { "byte" } else { "bytes" };
    format!("raw, {} {unit}: {}{more}", bytes.len(), hex.join(" "))
}

#[cfg(test)]
mod raw_tests {
    #[test]
    fn a_raw_payload_shows_its_size_and_first_bytes_in_hex() {
        assert_eq!(
            super::raw_preview(&[0x0a, 0x03, 0xff]),
            "raw, 3 bytes: 0a 03 ff"
        );
        let long: Vec<u8> = (0..40).collect();
        let shown = super::raw_preview(&long);
        assert!(shown.starts_with("raw, 40 bytes: 00 01 02"), "{shown}");
        assert!(shown.ends_with("1e 1f …"), "{shown}");
    }
}
