//! Every table the CLI prints for people, read back cell by cell and compared with what the
//! same command says with `--json`: `taskd status` (queues and workers), `taskd status
//! --server` (queues), `taskd tasks`, `taskd check` and `taskd audit` (also `--server`). A count under the wrong column is
//! invisible to `--json`; only reading the table finds it. (The nodes table of a shared
//! broker is checked in tests/redis.rs, which starts the Redis it needs.)

mod common;

use std::time::Duration;

use common::table::{self, Table};
use common::*;
use serde_json::Value;

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

const STATES: [&str; 7] = [
    "scheduled",
    "queued",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "cancelled",
];

/// `mix` runs one task at a time; the payload's `do` picks what it does: `ok`, `fail`
/// (exit 3, a permanent failure with a long stderr line), `again` (exit 4, retried after an
/// hour) or `sleep`. `pool` has two idle long-lived workers; `broken`'s worker program does
/// not exist, so it is FATAL.
const CONFIG: &str = r#"
[taskd]
state_dir = "state"
shutdown_grace = "5s"
listen = "127.0.0.1:0"

[queues.mix]
concurrency = 1
shell = 'case "$TASKD_ARG_do" in ok) exit 0;; fail) echo "could not find the record for customer 4711 in the billing database, giving up for good" >&2; exit 3;; again) exit 4;; sleep) sleep 60;; esac'
fail_exit_codes = [3]
max_attempts = 2
backoff = { kind = "fixed", base = "1h", max = "1h", jitter = false }

[queues.idle]
shell = "true"
timeout = "90s"

[queues.pool]
concurrency = 2
worker = ["sh", "-c", "echo '{\"type\":\"ready\",\"protocol\":1}' >&4; while read -r l <&3; do :; done"]
start_secs = "0s"

[queues.broken]
worker = ["/nonexistent/bin/worker"]
start_retries = 1
"#;

/// The queues table checked against the `queues` of a JSON answer (status --json or the
/// API): one row per queue, each count in its state's column, the notes.
fn check_queues(t: &Table, json: &Value) {
    let mut header = vec!["queue".to_string()];
    header.extend(STATES.iter().map(|s| s.to_string()));
    header.push("notes".into());
    assert_eq!(t.header, header);
    let queues = json["queues"].as_array().expect("queues");
    assert_eq!(t.rows.len(), queues.len(), "{t:#?}\n{json:#}");
    for q in queues {
        let name = q["queue"].as_str().expect("queue name");
        let row = t.row(name);
        for s in STATES {
            assert_eq!(
                t.cell(row, s),
                q["counts"][s].as_u64().expect("a count").to_string(),
                "queue {name}, column {s}: {row:?}\n{q:#}"
            );
        }
        let notes = t.cell(row, "notes");
        assert_eq!(
            notes.contains("PAUSED"),
            q["paused"] == true,
            "{name}: {notes}"
        );
    }
}

/// The workers table of `taskd status` against `status --json`'s workers.
fn check_workers(t: &Table, json: &Value) {
    assert_eq!(
        t.header,
        [
            "worker",
            "pid",
            "state",
            "uptime",
            "tasks done",
            "last exit",
            "why"
        ]
    );
    let workers = json["workers"].as_array().expect("workers");
    assert_eq!(t.rows.len(), workers.len(), "{t:#?}\n{json:#}");
    for w in workers {
        let key = format!("{}/{}", w["queue"].as_str().expect("queue"), w["slot"]);
        let row = t.row(&key);
        let or_dash = |v: &Value| match v {
            Value::Null => "-".to_string(),
            v => v.to_string(),
        };
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        assert_eq!(t.cell(row, "pid"), or_dash(&w["pid"]), "{key}: {w:#}");
        assert_eq!(
            t.cell(row, "state"),
            w["state"].as_str().expect("state").to_uppercase(),
            "{key}"
        );
        // status --json says `uptime_s`; the API gives `started_ms`.
        let uptime = w["uptime_s"].as_i64().or_else(|| {
            w["pid"].as_i64()?;
            Some((now_ms() - w["started_ms"].as_i64()?) / 1000)
        });
        match uptime {
            None => assert_eq!(t.cell(row, "uptime"), "-", "{key}"),
            Some(s) => {
                let shown = table::duration_ms(t.cell(row, "uptime")) / 1000;
                assert!(
                    (shown - s).abs() <= 5,
                    "{key}: uptime {shown}s in the table, {s}s in JSON"
                );
            }
        }
        assert_eq!(
            t.cell(row, "tasks done"),
            w["tasks_done"].to_string(),
            "{key}"
        );
        assert_eq!(t.cell(row, "last exit"), text(&w["last_exit"]), "{key}");
        assert_eq!(t.cell(row, "why"), text(&w["why"]), "{key}");
    }
}

/// The `taskd tasks` table against `tasks --json` with the same filters.
fn check_tasks(env: &Env, args: &[&str]) {
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let list = json_of(&env.ok(&json_args));
    let text = env.ok(args);
    let list = list.as_array().expect("tasks --json is an array");
    if list.is_empty() {
        assert_eq!(text.trim(), "no tasks match");
        return;
    }
    let t = table::find(&text, "id");
    assert_eq!(
        t.header,
        ["id", "queue", "state", "attempts", "age", "last error"]
    );
    assert_eq!(t.rows.len(), list.len(), "{args:?}:\n{text}");
    let now = now_ms();
    for (row, task) in t.rows.iter().zip(list) {
        let text = |k: &str| task[k].as_str().unwrap_or_default().to_string();
        assert_eq!(t.cell(row, "id"), text("id"), "rows in the JSON's order");
        assert_eq!(t.cell(row, "queue"), text("queue"));
        assert_eq!(t.cell(row, "state"), text("state"));
        assert_eq!(t.cell(row, "attempts"), task["attempts"].to_string());
        let age = now - task["created_at"].as_i64().expect("created_at");
        let shown = table::duration_ms(t.cell(row, "age"));
        assert!(
            (age - shown).abs() < 5_000,
            "age {shown} ms in the table, {age} ms from the JSON"
        );
        let err = text("last_error");
        let cell = t.cell(row, "last error");
        if err.chars().count() <= 60 {
            assert_eq!(cell, err);
        } else {
            let kept: String = err.chars().take(59).collect();
            assert_eq!(
                cell,
                format!("{kept}…"),
                "a long error is cut with an ellipsis"
            );
        }
    }
}

fn status_json(env: &Env) -> Value {
    json_of(&env.ok(&["status", "--json"]))
}

fn counts(env: &Env, queue: &str) -> Vec<u64> {
    let v = status_json(env);
    let q = v["queues"]
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["queue"] == queue))
        .cloned()
        .unwrap_or_default();
    STATES
        .iter()
        .map(|s| q["counts"][s].as_u64().unwrap_or(0))
        .collect()
}

fn wait_counts(env: &Env, queue: &str, want: [u64; 7]) {
    let mut last = Vec::new();
    let ok = poll(Duration::from_secs(30), || {
        last = counts(env, queue);
        last == want
    });
    assert!(
        ok,
        "{queue}: counts {last:?}, expected {want:?} ({STATES:?})"
    );
}

/// Every state of `mix` holds a different number of tasks than the state in the column
/// next to it, both in lifecycle and in alphabetical order, so that a row filled in another
/// order than its header cannot pass.
#[test]
fn status_tasks_and_server_tables_match_json_cell_by_cell() {
    let env = Env::raw(CONFIG);
    // Without a daemon: no workers table, and the queues table still matches.
    env.submit("mix", r#"{"do":"ok"}"#);
    let text = env.ok(&["status"]);
    check_queues(&table::find(&text, "queue"), &status_json(&env));
    assert!(
        table::parse(&text).iter().all(|t| t.header[0] != "worker"),
        "{text}"
    );

    let d = env.daemon();
    for _ in 0..2 {
        env.submit("mix", r#"{"do":"ok"}"#);
    }
    for _ in 0..2 {
        env.submit("mix", r#"{"do":"fail"}"#);
    }
    env.submit("mix", r#"{"do":"again"}"#);
    wait_counts(&env, "mix", [0, 0, 0, 1, 3, 2, 0]);
    let sleeper = env.submit("mix", r#"{"do":"sleep"}"#);
    env.wait_state(&sleeper, "running", Duration::from_secs(20));
    for _ in 0..2 {
        env.submit("mix", r#"{"do":"ok"}"#);
    }
    env.ok(&["submit", "mix", r#"{"do":"ok"}"#, "--delay", "1h"]);
    let later = env
        .ok(&["submit", "mix", r#"{"do":"ok"}"#, "--delay", "1h"])
        .trim()
        .to_string();
    env.ok(&["cancel", &later]);
    env.ok(&["pause", "idle"]);
    wait_counts(&env, "mix", [1, 2, 1, 1, 3, 2, 1]);

    // The workers settle: two RUNNING in `pool`, `broken` FATAL.
    let ok = poll(Duration::from_secs(30), || {
        let v = status_json(&env);
        let ws = v["workers"].as_array().cloned().unwrap_or_default();
        ws.len() == 3
            && ws
                .iter()
                .filter(|w| w["queue"] == "pool" && w["state"] == "running")
                .count()
                == 2
            && ws
                .iter()
                .any(|w| w["queue"] == "broken" && w["state"] == "fatal")
    });
    assert!(ok, "workers did not settle:\n{:#}", status_json(&env));

    let json = status_json(&env);
    let text = env.ok(&["status"]);
    check_queues(&table::find(&text, "queue"), &json);
    check_workers(&table::find(&text, "worker"), &json);
    assert!(
        table::find(&text, "queue")
            .cell(table::find(&text, "queue").row("broken"), "notes")
            .contains("workers FATAL"),
        "{text}"
    );

    // The same queues through the daemon's API.
    let url = d.api_base();
    let json = json_of(&env.ok(&["status", "--server", &url, "--json"]));
    let text = env.ok(&["status", "--server", &url]);
    check_queues(&table::find(&text, "queue"), &json);
    check_workers(&table::find(&text, "worker"), &json);

    // `tasks` and `show` through the API say what they say from the store.
    assert_eq!(
        json_of(&env.ok(&["tasks", "--json", "--server", &url])),
        json_of(&env.ok(&["tasks", "--json"])),
        "tasks --server"
    );
    check_tasks(&env, &["tasks", "--server", &url, "--state", "failed"]);
    check_tasks(
        &env,
        &["tasks", "--server", &url, "--queue", "mix", "--limit", "3"],
    );
    let first = json_of(&env.ok(&["tasks", "--json", "--state", "failed"]))[0]["id"]
        .as_str()
        .expect("a failed task")
        .to_string();
    assert_eq!(
        json_of(&env.ok(&["show", &first, "--json", "--server", &url])),
        json_of(&env.ok(&["show", &first, "--json"]))
    );
    assert_eq!(
        env.ok(&["show", &first, "--server", &url]),
        env.ok(&["show", &first])
    );
    let unknown = "01a20000-0000-7000-8000-000000000000";
    for remote in [false, true] {
        let mut args = vec!["show", unknown];
        if remote {
            args.extend(["--server", url.as_str()]);
        }
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("no task with id {unknown}")),
            "{args:?}: {out:?}"
        );
    }

    // Tasks: all, and filtered.
    check_tasks(&env, &["tasks"]);
    check_tasks(&env, &["tasks", "--state", "failed"]);
    check_tasks(&env, &["tasks", "--queue", "mix", "--limit", "3"]);
    check_tasks(&env, &["tasks", "--queue", "idle"]);
}

#[test]
fn check_table_matches_json_cell_by_cell() {
    let env = Env::raw(CONFIG);
    let json = json_of(&env.ok(&["check", "--json"]));
    let text = env.ok(&["check"]);
    let t = table::find(&text, "queue");
    assert_eq!(
        t.header,
        [
            "queue",
            "concurrency",
            "timeout",
            "attempts",
            "backoff",
            "runs"
        ]
    );
    let queues = json["queues"].as_array().expect("queues");
    assert_eq!(t.rows.len(), queues.len(), "{text}");
    for q in queues {
        let name = q["name"].as_str().expect("name");
        let row = t.row(name);
        assert_eq!(t.cell(row, "concurrency"), q["concurrency"].to_string());
        assert_eq!(
            table::duration_ms(t.cell(row, "timeout")),
            (q["timeout_secs"].as_f64().expect("timeout") * 1000.0) as i64,
            "{name}"
        );
        assert_eq!(t.cell(row, "attempts"), q["max_attempts"].to_string());
        let (base, max) = t
            .cell(row, "backoff")
            .split_once(" → ")
            .unwrap_or_else(|| panic!("backoff cell of {name}: {row:?}"));
        assert_eq!(
            table::duration_ms(base),
            (q["backoff"]["base_secs"].as_f64().expect("base") * 1000.0) as i64
        );
        assert_eq!(
            table::duration_ms(max),
            (q["backoff"]["max_secs"].as_f64().expect("max") * 1000.0) as i64
        );
        assert_eq!(t.cell(row, "runs"), q["program"].as_str().expect("program"));
    }
    // The header lines above the table say the same as the JSON.
    assert!(text.contains(&format!(
        "  broker:    {}",
        json["broker"].as_str().expect("broker")
    )));
    assert!(text.contains(&format!(
        "  state_dir: {}",
        json["state_dir"].as_str().expect("state_dir")
    )));
}

/// A time as `taskd audit` prints it: RFC 3339 in UTC, to the second.
fn rfc3339_seconds(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `taskd audit`'s table against `taskd audit --json`, row by row and cell by cell; the
/// rows in the JSON's order.
fn check_audit(text: &str, json: &Value) {
    let t = table::find(text, "time");
    assert_eq!(
        t.header,
        ["time", "who", "action", "target", "outcome", "detail"]
    );
    let records = json.as_array().expect("an array");
    assert_eq!(t.rows.len(), records.len(), "{text}\n{json:#}");
    for (row, r) in t.rows.iter().zip(records) {
        let s = |k: &str| {
            r[k].as_str()
                .unwrap_or_else(|| panic!("{k}: {r:#}"))
                .to_string()
        };
        assert_eq!(
            t.cell(row, "time"),
            rfc3339_seconds(r["at"].as_i64().expect("at"))
        );
        assert_eq!(t.cell(row, "who"), s("who"), "{r:#}");
        assert_eq!(t.cell(row, "action"), s("action"), "{r:#}");
        assert_eq!(t.cell(row, "target"), s("target"), "{r:#}");
        assert_eq!(t.cell(row, "outcome"), s("outcome"), "{r:#}");
        let detail = s("detail").split_whitespace().collect::<Vec<_>>().join(" ");
        let shown = if detail.chars().count() > 80 {
            format!("{}…", detail.chars().take(79).collect::<String>())
        } else {
            detail
        };
        assert_eq!(t.cell(row, "detail"), shown, "{r:#}");
    }
}

#[test]
fn audit_table_matches_json_cell_by_cell_newest_last() {
    let env = Env::new("[queues.q]\nshell = \"true\"\n");
    let id = env
        .ok(&["submit", "q", "{}", "--delay", "1h"])
        .trim()
        .to_string();
    env.ok(&["pause", "q"]);
    env.ok(&["cancel", &id]);
    env.ok(&["retry", &id]);
    // Refused, with a detail longer than the column shows.
    assert_eq!(env.run(&["retry", &id]).status.code(), Some(1));
    env.ok(&["resume", "q"]);

    let json = json_of(&env.ok(&["audit", "--json"]));
    let records = json.as_array().expect("an array");
    let actions: Vec<&str> = records
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        ["pause", "cancel", "retry", "retry", "resume"],
        "oldest first, the newest last"
    );
    assert!(
        records[3]["detail"]
            .as_str()
            .expect("detail")
            .chars()
            .count()
            > 80,
        "the refused retry's detail is long enough to be cut: {:#}",
        records[3]
    );
    check_audit(&env.ok(&["audit"]), &json);
    // The table's last row is the newest: `resume`.
    let t = table::find(&env.ok(&["audit"]), "time");
    assert_eq!(t.cell(t.rows.last().expect("rows"), "action"), "resume");

    // --reverse: newest first, in the table and the JSON alike.
    let reversed = json_of(&env.ok(&["audit", "--json", "--reverse"]));
    let mut want = records.clone();
    want.reverse();
    assert_eq!(reversed, Value::Array(want));
    check_audit(&env.ok(&["audit", "--reverse"]), &reversed);

    // -n: the newest N, still newest last.
    let two = json_of(&env.ok(&["audit", "--json", "-n", "2"]));
    assert_eq!(two, Value::Array(records[3..].to_vec()));
    check_audit(&env.ok(&["audit", "-n", "2"]), &two);

    // --since: a time after every record finds none, and says so.
    let later = env.ok(&["audit", "--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(later.trim(), "no audit records since 2999-01-01T00:00:00Z");
    assert_eq!(
        json_of(&env.ok(&["audit", "--json", "--since", "1h"])),
        json
    );
    let bad = env.run(&["audit", "--since", "yesterday"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

#[test]
fn audit_table_over_the_api_is_the_local_one() {
    let env = Env::raw(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = \"127.0.0.1:0\"\n\n[queues.q]\nshell = \"true\"\n",
    );
    let d = env.daemon();
    let url = d.api_base();
    env.ok(&["pause", "q"]);
    env.ok(&["resume", "q"]);
    // The daemon records its start beside its main loop: wait for it.
    assert!(
        poll(Duration::from_secs(20), || json_of(
            &env.ok(&["audit", "--json"])
        )
        .as_array()
        .is_some_and(|a| a.iter().any(|r| r["action"] == "start"))),
        "no start record"
    );
    let local = json_of(&env.ok(&["audit", "--json"]));
    let remote = json_of(&env.ok(&["audit", "--json", "--server", &url]));
    assert_eq!(remote, local);
    check_audit(&env.ok(&["audit", "--server", &url]), &remote);
    assert_eq!(
        env.ok(&["audit", "--server", &url]),
        env.ok(&["audit"]),
        "the same table either way"
    );
    // Pages of the API (at most 1000 each) are followed up to -n.
    let one = json_of(&env.ok(&["audit", "--json", "-n", "1", "--server", &url]));
    assert_eq!(one.as_array().map(Vec::len), Some(1));
    assert_eq!(
        one[0],
        *local.as_array().and_then(|a| a.last()).expect("records")
    );
}

/// A time as RFC 3339 in UTC to the millisecond (what `--since`/`--until` take).
fn rfc3339_millis(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// `taskd tasks`' filters (`--since`, `--until`, `--key`, `--where`, `--after`) select the
/// same tasks from the store and through the API (`--server`), and the table says what the
/// JSON says, cell by cell.
#[test]
fn tasks_filters_select_the_same_tasks_locally_and_over_the_api() {
    let env = Env::raw(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = \"127.0.0.1:0\"\n\n[queues.q]\nshell = \"true\"\n",
    );
    // Paused: the tasks stay queued, so every listing sees the same ones.
    env.ok(&["pause", "q"]);
    let t1 = env.submit("q", r#"{"user_id":42}"#);
    let t2 = env
        .ok(&["submit", "q", r#"{"user_id":7}"#, "--unique", "report-7"])
        .trim()
        .to_string();
    let t3 = env.submit("q", r#"{"user_id":"42","note":"a string"}"#);
    let t4 = env.submit("q", r#"{"user":{"id":42}}"#);
    let d = env.daemon();
    let url = d.api_base();
    let created = |id: &str| env.show(id)["created_at"].as_i64().expect("created_at");
    let (at2, at3) = (rfc3339_millis(created(&t2)), rfc3339_millis(created(&t3)));

    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--where", "payload.user_id = 42"], vec![&t3, &t1]),
        (vec!["--where", "user.id=42"], vec![&t4]),
        (vec!["--key", "report-7"], vec![&t2]),
        (vec!["--since", &at2], vec![&t4, &t3, &t2]),
        (vec!["--until", &at3], vec![&t2, &t1]),
        (vec!["--since", &at2, "--until", &at3], vec![&t2]),
        (
            vec!["--since", "1h", "--where", "payload.user_id = 7"],
            vec![&t2],
        ),
        (
            vec![
                "--since",
                "1h",
                "--key",
                "report-7",
                "--where",
                "user_id=42",
            ],
            vec![],
        ),
        (vec!["--limit", "2"], vec![&t4, &t3]),
        (vec!["--limit", "2", "--after", &t3], vec![&t2, &t1]),
        (
            vec!["--where", "payload.user_id = 42", "--after", &t3],
            vec![&t1],
        ),
    ];
    for (filter, want) in &cases {
        for remote in [false, true] {
            let mut args = vec!["tasks"];
            args.extend(filter.iter().copied());
            if remote {
                args.extend(["--server", url.as_str()]);
            }
            let mut json_args = args.clone();
            json_args.push("--json");
            let list = json_of(&env.ok(&json_args));
            let ids: Vec<&str> = list
                .as_array()
                .expect("an array")
                .iter()
                .filter_map(|t| t["id"].as_str())
                .collect();
            assert_eq!(&ids, want, "{args:?}");
            check_tasks(&env, &args);
        }
    }

    // A bad value is a usage error that names its option, from the store and the API alike.
    for remote in [false, true] {
        for (args, says) in [
            (vec!["tasks", "--where", "user_id"], "--where"),
            (vec!["tasks", "--since", "last tuesday"], "--since"),
            (vec!["tasks", "--after", "not-an-id"], "--after"),
        ] {
            let mut args = args.clone();
            if remote {
                args.extend(["--server", url.as_str()]);
            }
            let out = env.run(&args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains(says),
                "{args:?}: {out:?}"
            );
        }
    }
    drop(d);
}
