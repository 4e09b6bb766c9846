//! Retention, on each backend: the daemon deletes finished tasks once their queue's
//! `keep_*` ran out, and `taskd prune` does it at once (or counts, with `--dry-run`),
//! without a daemon. (A child module of `cases`: it shares its helpers.)

use super::*;
use crate::common::table;

/// Whether `taskd show ID` says the task does not exist.
fn gone(env: &Env, id: &str) -> bool {
    let out = env.run(&["show", id, "--json"]);
    match out.status.code() {
        Some(1) if String::from_utf8_lossy(&out.stderr).contains("no task with id") => true,
        Some(0) => false,
        other => panic!(
            "taskd show {id}: exit {other:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The first sample of `name` whose labels contain every one of `labels`, from /metrics.
fn metric(base: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let text = ureq::get(&format!("{base}/metrics"))
        .call()
        .expect("GET /metrics")
        .into_string()
        .expect("body");
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn the_daemon_deletes_finished_tasks_once_their_keep_runs_out() {
    let Some(case) = Case::new() else { return };
    let body = r#"
[queues.short]
max_attempts = 1
keep_succeeded = "1s"
keep_failed = "forever"
shell = 'exit "$TASKD_ARG_code"'

[queues.long]
shell = 'exit 0'

[queues.tick]
keep_succeeded = "1s"
keep_failed = "1s"
keep_cancelled = "1s"
shell = 'exit 0'

[schedules.tick]
queue = "tick"
every = "1s"
"#;
    let text = config_text(&case, "5s", body).replacen(
        "[taskd]\n",
        "[taskd]\nlisten = \"127.0.0.1:0\"\n",
        1,
    );
    std::fs::write(&case.config, text).expect("write config");
    let d = case.daemon();
    let base = d.api_base();
    let ok: Vec<String> = (0..3)
        .map(|_| submit(&case, "short", &json!({"code": 0}), &[]))
        .collect();
    let failed = submit(&case, "short", &json!({"code": 3}), &[]);
    let long = submit(&case, "long", &json!({}), &[]);
    for id in ok.iter().chain([&failed, &long]) {
        wait_done(&case, id, secs(30));
    }
    assert_eq!(case.state(&failed), "failed");
    // Deleted within a second of keep plus the daemon's pass (every 5 s).
    assert!(
        poll(secs(30), || ok.iter().all(|id| gone(&case, id))),
        "the succeeded tasks of `short` were not deleted; log:\n{}",
        d.log_text()
    );
    assert!(!gone(&case, &failed), "keep_failed = \"forever\" keeps it");
    assert!(!gone(&case, &long), "`long` keeps its tasks for 7 days");
    assert_eq!(case.count("short", "succeeded"), 0);
    assert_eq!(case.count("short", "failed"), 1);
    assert_eq!(
        metric(
            &base,
            "taskd_tasks_pruned_total",
            &["queue=\"short\"", "state=\"succeeded\""]
        ),
        Some(3.0),
        "the deletions are counted"
    );
    let bytes = metric(&base, "taskd_store_bytes", &[]).expect("taskd_store_bytes");
    assert!(bytes > 0.0, "the store's size: {bytes}");
    wait_log(&d, "deleted finished tasks past their keep_* time", secs(5));
    // A schedule's slot records follow its queue's retention: it fires every second, and
    // its records older than the queue's longest keep (1 s) go at the daemon's passes.
    let schedule = || -> Value {
        serde_json::from_str(&case.ok(&["schedules", "show", "tick", "--json", "--limit", "500"]))
            .expect("JSON")
    };
    assert!(
        poll(secs(60), || {
            let s = schedule();
            let fired = s["schedule"]["fired"].as_u64().unwrap_or(0);
            let kept = s["history"].as_array().map_or(0, Vec::len) as u64;
            fired >= 8 && (1..fired.saturating_sub(2)).contains(&kept)
        }),
        "the old slot records of `tick` were not deleted: {:#}\nlog:\n{}",
        schedule(),
        d.log_text()
    );
    wait_log(&d, "deleted schedules' slot records", secs(10));
    // `taskd prune --dry-run` counts the slot records that are due, as `prune` deletes them.
    let kept = || schedule()["history"].as_array().map_or(0, Vec::len) as u64;
    // A few records to count (it fires every second; a pass every 5 s leaves one or two).
    assert!(poll(secs(20), || kept() >= 3), "{:#}", schedule());
    d.signal(crate::common::SIGTERM);
    assert_eq!(d.wait_exit(secs(30)), Some(0));
    let before = kept();
    let dry = |case: &Case| -> Value {
        serde_json::from_str(&case.ok(&["prune", "--dry-run", "--json", "--queue", "tick"]))
            .expect("JSON")
    };
    // With no daemon nothing fires any more: every record but the newest comes due.
    assert!(
        poll(secs(10), || dry(&case)["slot_records"] == before - 1),
        "a dry run should count {} slot records: {:#}",
        before - 1,
        dry(&case)
    );
    let text = case.ok(&["prune", "--dry-run", "--queue", "tick"]);
    let due = before - 1;
    let records = if due == 1 { "record" } else { "records" };
    assert_eq!(
        text.contains(&format!(
            "dry run: {due} slot {records} of schedules older than their queue's longest keep time would be deleted"
        )),
        due > 0,
        "{text}"
    );
    assert_eq!(kept(), before, "a dry run deletes no slot record");
    let out: Value =
        serde_json::from_str(&case.ok(&["prune", "--json", "--queue", "tick"])).expect("JSON");
    assert_eq!(out["slot_records"], due, "{out:#}");
    assert_eq!(kept(), 1, "the newest record stays");
    assert_eq!(dry(&case)["slot_records"], 0);
}

#[test]
fn prune_dry_run_counts_and_prune_deletes_without_a_daemon() {
    let Some(case) = setup(
        "5s",
        r#"
[queues.p]
keep_cancelled = "1s"
shell = 'exit 0'

[queues.f]
keep_cancelled = "forever"
keep_succeeded = "36h"
shell = 'exit 0'
"#,
    ) else {
        return;
    };
    // No daemon: tasks cancelled while they wait are finished (cancelled) at once.
    let p: Vec<String> = (0..3)
        .map(|_| submit(&case, "p", &json!({}), &[]))
        .collect();
    let f = submit(&case, "f", &json!({}), &[]);
    for id in p.iter().chain([&f]) {
        case.ok(&["cancel", id]);
    }
    let dry = |case: &Case| -> Value {
        serde_json::from_str(&case.ok(&["prune", "--dry-run", "--json"])).expect("JSON")
    };
    assert!(
        poll(secs(20), || dry(&case)["total"] == 3),
        "three tasks of `p` become due a second after they were cancelled: {:#}",
        dry(&case)
    );
    let json = dry(&case);
    assert_eq!(json["dry_run"], true);
    // The table people read: a row per queue and state, with the keep time and the count.
    let text = case.ok(&["prune", "--dry-run"]);
    let t = table::find(&text, "queue");
    assert_eq!(t.header, ["queue", "state", "keep", "due"]);
    let rows: Vec<Vec<String>> = t.rows.clone();
    assert_eq!(rows.len(), 6, "{text}");
    for (row, want) in rows.iter().zip(json["rows"].as_array().expect("rows")) {
        assert_eq!(row[0], want["queue"].as_str().unwrap(), "{text}");
        assert_eq!(row[1], want["state"].as_str().unwrap(), "{text}");
        assert_eq!(row[2], want["keep"].as_str().unwrap(), "{text}");
        assert_eq!(row[3], want["count"].to_string(), "{text}");
    }
    let find = |q: &str, s: &str| -> Vec<String> {
        rows.iter()
            .find(|r| r[0] == q && r[1] == s)
            .unwrap_or_else(|| panic!("no row {q} {s} in:\n{text}"))
            .clone()
    };
    assert_eq!(find("p", "cancelled"), ["p", "cancelled", "1s", "3"]);
    assert_eq!(find("p", "succeeded"), ["p", "succeeded", "7d", "0"]);
    assert_eq!(find("p", "failed"), ["p", "failed", "30d", "0"]);
    assert_eq!(find("f", "cancelled"), ["f", "cancelled", "forever", "0"]);
    assert_eq!(find("f", "succeeded"), ["f", "succeeded", "36h", "0"]);
    assert!(
        text.contains("dry run: 3 finished tasks past their keep time; nothing deleted"),
        "{text}"
    );
    for id in &p {
        assert!(!gone(&case, id), "a dry run deletes nothing");
    }
    // --queue narrows it to one queue.
    let only_f = case.ok(&["prune", "--dry-run", "--queue", "f"]);
    let t = table::find(&only_f, "queue");
    assert!(t.rows.iter().all(|r| r[0] == "f"), "{only_f}");
    let unknown = case.run(&["prune", "--queue", "nope"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("unknown queue `nope`"),
        "{:?}",
        unknown
    );
    // The real thing: deleted, counted, recorded in the audit trail.
    let text = case.ok(&["prune"]);
    let t = table::find(&text, "queue");
    assert_eq!(t.header, ["queue", "state", "keep", "deleted"]);
    assert!(
        t.rows.iter().any(|r| r == &["p", "cancelled", "1s", "3"]),
        "{text}"
    );
    assert!(
        text.contains("deleted 3 finished tasks past their keep time"),
        "{text}"
    );
    for id in &p {
        assert!(gone(&case, id), "task {id} was deleted");
    }
    assert!(!gone(&case, &f), "keep_cancelled = \"forever\"");
    let audit = case.ok(&["audit"]);
    assert!(
        audit.contains("prune") && audit.contains("deleted 3 finished tasks"),
        "{audit}"
    );
    // Nothing is due any more.
    let again: Value = serde_json::from_str(&case.ok(&["prune", "--json"])).expect("JSON");
    assert_eq!(again["total"], 0);
    // `taskd status` shows the store's size, as its second line: the number people read
    // agrees with the bytes of `--json`, and says what was measured.
    let status = case.ok(&["status"]);
    let json: Value = serde_json::from_str(&case.ok(&["status", "--json"])).expect("JSON");
    let bytes = json["store"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 0, "{json:#}");
    let line = status
        .lines()
        .nth(1)
        .filter(|l| l.starts_with("store: "))
        .unwrap_or_else(|| panic!("no store line second in:\n{status}"));
    let mut words = line["store: ".len()..].split(' ');
    let (number, unit) = (words.next().unwrap(), words.next().unwrap());
    let factor = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1048576.0,
        "GiB" => 1073741824.0,
        other => panic!("unit {other:?} in {line:?}"),
    };
    let shown = number.parse::<f64>().expect("a number") * factor;
    let ratio = shown / bytes as f64;
    assert!(
        (0.8..1.25).contains(&ratio),
        "{line:?} against {bytes} bytes in --json"
    );
    if case.postgres.is_some() {
        assert!(
            line.contains(" in PostgreSQL (postgres://")
                && line.ends_with(", the schema's tables with their indexes)"),
            "{line}"
        );
        assert_eq!(json["store"]["measure"], "tables");
    } else if case.redis.is_some() {
        assert!(
            line.contains(" of memory on the Redis server (redis://")
                && line.ends_with(", its used_memory)"),
            "{line}"
        );
        assert_eq!(json["store"]["measure"], "memory");
    } else {
        assert!(
            line.contains(" on disk (sqlite://") && line.ends_with(", with its WAL)"),
            "{line}"
        );
        assert_eq!(json["store"]["measure"], "file");
    }
}
