//! What the daemon's log says about task ends (`[taskd] log_tasks`): a task that failed for
//! good at WARN with its queue, id, attempts, reason and last stderr line; a retried attempt
//! at INFO with when it runs again; with "all" every success and cancellation; with "none"
//! nothing; and a reload that changes the setting.

mod common;

use std::time::Duration;

use common::*;

const QUEUES: &str = r#"
[queues.flaky]
shell = 'echo "starting"; echo "first line"; echo "cannot reach db: connection refused" >&2; exit 3'
max_attempts = 2
backoff = { kind = "fixed", base = "1s", jitter = false }

[queues.fine]
shell = 'echo fine'

[queues.later]
shell = 'sleep 60'
"#;

fn config(log_tasks: Option<&str>) -> String {
    let line = log_tasks
        .map(|v| format!("log_tasks = \"{v}\"\n"))
        .unwrap_or_default();
    format!("[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n{line}{QUEUES}")
}

/// The log lines that mention `id` and `what`.
fn lines_with(d: &Daemon, id: &str, what: &str) -> Vec<String> {
    d.log_text()
        .lines()
        .filter(|l| l.contains(id) && l.contains(what))
        .map(str::to_string)
        .collect()
}

/// Run one failing task (two attempts), one successful, and one cancelled while it runs (a
/// task cancelled before a daemon claimed it ends in the broker, unseen by any daemon);
/// return their ids.
fn run_three(env: &Env) -> (String, String, String) {
    let bad = env.submit("flaky", "{}");
    let good = env.submit("fine", "{}");
    let later = env.submit("later", "{}");
    env.wait_state(&later, "running", Duration::from_secs(30));
    env.ok(&["cancel", &later]);
    env.wait_state(&bad, "failed", Duration::from_secs(30));
    env.wait_state(&good, "succeeded", Duration::from_secs(30));
    env.wait_state(&later, "cancelled", Duration::from_secs(30));
    (bad, good, later)
}

#[test]
fn a_failed_task_is_logged_at_warn_and_a_retry_at_info() {
    let env = Env::raw(&config(None));
    let d = env.daemon();
    let (bad, good, later) = run_three(&env);
    // The failure line is written after the result is decided; wait for it.
    assert!(
        poll(Duration::from_secs(10), || !lines_with(
            &d,
            &bad,
            "task failed"
        )
        .is_empty()),
        "no `task failed` line:\n{}",
        d.log_text()
    );
    let failed = lines_with(&d, &bad, "task failed");
    assert_eq!(failed.len(), 1, "{failed:#?}");
    let l = &failed[0];
    for part in [
        " WARN ",
        "queue=flaky",
        &format!("task={bad}"),
        "attempts=2",
        "max_attempts=2",
        "reason=\"exit\"",
        "error=\"exit code 3; gave up after 2 attempts\"",
        "stderr=\"cannot reach db: connection refused\"",
    ] {
        assert!(l.contains(part), "the failure line lacks {part:?}: {l}");
    }
    let retried = lines_with(&d, &bad, "attempt failed; retrying in");
    assert_eq!(retried.len(), 1, "{}", d.log_text());
    let l = &retried[0];
    for part in [
        " INFO ",
        "attempt=1",
        "attempts=1",
        "reason=\"exit\"",
        "stderr=\"cannot reach db: connection refused\"",
        "next=\"20",
    ] {
        assert!(l.contains(part), "the retry line lacks {part:?}: {l}");
    }
    // The default logs no success and no cancellation.
    assert!(lines_with(&d, &good, "task succeeded").is_empty());
    assert!(lines_with(&d, &later, "task cancelled").is_empty());
}

#[test]
fn log_tasks_all_logs_every_end_and_none_logs_none() {
    let env = Env::raw(&config(Some("all")));
    let d = env.daemon();
    let (bad, good, later) = run_three(&env);
    let ok = poll(Duration::from_secs(10), || {
        !lines_with(&d, &good, "task succeeded").is_empty()
            && !lines_with(&d, &later, "task cancelled").is_empty()
            && !lines_with(&d, &bad, "task failed").is_empty()
    });
    assert!(
        ok,
        "missing lines with log_tasks = \"all\":\n{}",
        d.log_text()
    );
    assert!(lines_with(&d, &good, "task succeeded")[0].contains(" INFO "));
    let c = &lines_with(&d, &later, "task cancelled")[0];
    assert!(c.contains(" INFO ") && c.contains("queue=later"), "{c}");
    drop(d);

    let env = Env::raw(&config(Some("none")));
    let d = env.daemon();
    let (bad, good, later) = run_three(&env);
    // The failed task's end is recorded before its log line would be written; a line for
    // the next task proves the daemon went past it.
    let probe = env.submit("fine", "{}");
    env.wait_state(&probe, "succeeded", Duration::from_secs(30));
    for (id, what) in [
        (&bad, "task failed"),
        (&bad, "retrying"),
        (&good, "task succeeded"),
        (&later, "task cancelled"),
    ] {
        assert!(
            lines_with(&d, id, what).is_empty(),
            "log_tasks = \"none\" logged {what}:\n{}",
            d.log_text()
        );
    }
}

#[test]
fn a_reload_changes_log_tasks_and_says_so() {
    let env = Env::raw(&config(None));
    let d = env.daemon();
    std::fs::write(&env.config, config(Some("all"))).expect("rewrite the config");
    let out = env.ok(&["reload"]);
    assert!(out.contains("log_tasks failures → all"), "{out}");
    let good = env.submit("fine", "{}");
    env.wait_state(&good, "succeeded", Duration::from_secs(30));
    assert!(
        poll(Duration::from_secs(10), || !lines_with(
            &d,
            &good,
            "task succeeded"
        )
        .is_empty()),
        "{}",
        d.log_text()
    );
}

/// Each log line about a run carries that run's span alone: a task started from the end of
/// the previous one (one slot, a backlog) is not logged inside the previous task's span.
#[test]
fn a_run_started_after_another_is_not_logged_inside_its_span() {
    let env = Env::raw(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlog_tasks = \"all\"\n\
         [queues.one]\nconcurrency = 1\nshell = 'echo ok'\n",
    );
    env.ok(&["pause", "one"]);
    let ids: Vec<String> = (0..5).map(|_| env.submit("one", "{}")).collect();
    let d = env.daemon();
    env.ok(&["resume", "one"]);
    for id in &ids {
        env.wait_state(id, "succeeded", Duration::from_secs(30));
    }
    assert!(
        poll(Duration::from_secs(10), || ids
            .iter()
            .all(|id| !lines_with(&d, id, "task succeeded").is_empty())),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    let nested: Vec<&str> = log
        .lines()
        .filter(|l| l.matches("task{").count() > 1)
        .collect();
    assert!(
        nested.is_empty(),
        "log lines inside another task's span:\n{}",
        nested.join("\n")
    );
}
