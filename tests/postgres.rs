//! The PostgreSQL broker end to end, against a private PostgreSQL the tests start
//! (tests/common/postgres.rs) and the real `taskd` binary: migrations from an empty
//! database and a re-run of `taskd migrate`, a daemon refusing a newer schema, the SQL
//! function `taskd.enqueue` inside transactions that roll back and commit, `EXPLAIN` of the
//! hot statements over many finished tasks, and `taskd submit` while the server is down.
//!
//! Where PostgreSQL is not installed each test prints a skip message and passes, except
//! under `CI=true`, where it fails.

#![cfg(feature = "postgres")]

mod common;
#[path = "common/postgres.rs"]
mod pg_server;

use std::time::Duration;

use common::{poll, Env};
use pg_server::PgServer;

fn config(url: &str, body: &str) -> String {
    format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nbroker = \"{url}\"\nlease = \"3s\"\n\n{body}\n"
    )
}

#[test]
fn migrate_applies_the_schema_to_an_empty_database_once_and_a_newer_schema_is_refused() {
    let Some(server) = pg_server::shared("migrate") else {
        return;
    };
    let db = server.new_db();
    let url = server.url(&db);
    let env = Env::raw(&config(&url, "[queues.q]\nshell = \"true\"\n"));
    let first = env.ok(&["migrate"]);
    assert!(
        first.contains(&format!(
            "schema `taskd` at 127.0.0.1:{}/{db}: version 0 → ",
            server.port
        )),
        "{first}"
    );
    assert!(first.contains("applied"), "{first}");
    let version = server.psql(&db, "SELECT max(version) FROM taskd.schema_version");
    let version = version.trim();
    let again = env.ok(&["migrate"]);
    assert!(
        again.contains(&format!(
            "is at version {version}, the newest this taskd knows: nothing to do"
        )),
        "{again}"
    );
    assert_eq!(
        server
            .psql(&db, "SELECT count(*) FROM taskd.schema_version")
            .trim(),
        version,
        "a re-run applied a migration twice"
    );
    // The tables work: a submit lands in them.
    let id = env.submit("q", "{}");
    assert_eq!(
        server
            .psql(
                &db,
                &format!("SELECT state FROM taskd.tasks WHERE id = '{id}'")
            )
            .trim(),
        "queued"
    );
    // A schema from a newer taskd: a daemon refuses to start, saying what to do.
    server.psql(
        &db,
        "INSERT INTO taskd.schema_version (version) VALUES (9999)",
    );
    let log = env.path().join("refused.log");
    let mut child = env
        .cmd(&["start"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start taskd");
    let mut code = None;
    let exited = poll(Duration::from_secs(30), || {
        code = child.try_wait().expect("wait").map(|s| s.code());
        code.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(exited, "a daemon started on a newer schema:\n{log}");
    assert_ne!(code.flatten(), Some(0));
    assert!(
        log.contains("has version 9999, newer than this taskd understands")
            && log.contains("upgrade this taskd too"),
        "{log}"
    );
    let out = env.run(&["migrate"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("newer than this taskd understands"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sql_enqueue_in_a_rolled_back_transaction_leaves_nothing_and_a_committed_one_runs() {
    let Some(server) = pg_server::shared("sql enqueue") else {
        return;
    };
    let db = server.new_db();
    let url = server.url(&db);
    let env = Env::raw(&config(
        &url,
        "[queues.emails]\nshell = \"cat >> \\\"$D/ran\\\"; echo >> \\\"$D/ran\\\"\"\nenv = { D = 'DIR' }\n",
    ));
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        text.replace("DIR", &env.path().display().to_string()),
    )
    .unwrap();
    let daemon = env.daemon();
    assert!(
        poll(Duration::from_secs(30), || server
            .psql(&db, "SELECT to_regproc('taskd.enqueue') IS NOT NULL")
            .trim()
            == "t"),
        "the daemon did not create the schema; its log:\n{}",
        daemon.log_text()
    );
    server.psql(&db, "CREATE TABLE orders (id int PRIMARY KEY)");
    // Rolled back: neither the order nor its task.
    let out = server.psql_script(
        &db,
        "BEGIN;\nINSERT INTO orders VALUES (1);\nSELECT taskd.enqueue('emails', '{\"order\":1}'::jsonb);\nROLLBACK;\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        server.psql(&db, "SELECT count(*) FROM taskd.tasks").trim(),
        "0"
    );
    assert_eq!(server.psql(&db, "SELECT count(*) FROM orders").trim(), "0");
    // Committed: the task exists and the daemon runs it.
    let out = server.psql_script(
        &db,
        "BEGIN;\nINSERT INTO orders VALUES (2);\nSELECT taskd.enqueue('emails', '{\"order\":2}'::jsonb, priority => 5, unique_key => 'order-2');\nCOMMIT;\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(id.len(), 36, "an id: {id:?}");
    let record = env.wait_state(&id, "succeeded", Duration::from_secs(30));
    assert_eq!(record["payload"]["order"], 2);
    assert_eq!(record["priority"], 5);
    let ran = std::fs::read_to_string(env.path().join("ran")).unwrap_or_default();
    assert!(ran.contains("\"order\""), "the task's stdin: {ran:?}");
    // The unique key: a second enqueue while the first holds it answers the holder.
    let a = server.psql(
        &db,
        "SELECT taskd.enqueue('emails', '{}'::jsonb, run_at => now() + interval '1 hour', unique_key => 'k')",
    );
    let b = server.psql(
        &db,
        "SELECT taskd.enqueue('emails', '{}'::jsonb, unique_key => 'k')",
    );
    assert_eq!(a.trim(), b.trim());
    assert_eq!(env.state(a.trim()), "scheduled");
    // A bad queue name is refused with the function's message.
    let out = server.psql_script(&db, "SELECT taskd.enqueue('no spaces', '{}'::jsonb);\n");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a queue name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The plan of `sql` on database `db`, as text.
fn explain(server: &PgServer, db: &str, sql: &str) -> String {
    server.psql(db, &format!("SET search_path = taskd; EXPLAIN {sql}"))
}

#[test]
fn the_claim_finish_and_list_statements_read_indexes_not_the_finished_tasks() {
    let Some(server) = pg_server::shared("explain") else {
        return;
    };
    let db = server.new_db();
    let url = server.url(&db);
    let env = Env::raw(&config(&url, "[queues.q]\nshell = \"true\"\n"));
    env.ok(&["migrate"]);
    // 50,000 finished tasks and a few waiting ones, statistics up to date: with the
    // planner's own costs (no `enable_seqscan = off`), a plan that reads the finished rows
    // would show as a sequential scan.
    server.psql(
        &db,
        "INSERT INTO taskd.tasks (id, queue, state, payload, run_at, created_at, updated_at, finished_at)
         SELECT 'f' || g, 'q', 'succeeded', '{}', g, g, g, g FROM generate_series(1, 50000) g;
         INSERT INTO taskd.tasks (id, queue, state, payload, run_at, created_at, updated_at)
         SELECT 'w' || g, 'q', 'queued', '{}', g, g, g FROM generate_series(1, 20) g;
         INSERT INTO taskd.tasks (id, queue, state, payload, run_at, created_at, updated_at, lease_node, lease_token)
         SELECT 'r' || g, 'q', 'running', '{}', g, g, g, 'n:1', 1 FROM generate_series(1, 20) g;
         ANALYZE taskd.tasks;",
    );
    // The statements of the `claim` SQL function (schema.rs): promotion, then the pick.
    let plans = [
        ("promote", "SELECT seq FROM tasks WHERE queue = 'q' AND state IN ('scheduled', 'retrying') AND blocked = 0 AND run_at <= 100 AND (expires_at IS NULL OR expires_at > 100) FOR UPDATE SKIP LOCKED"),
        ("claim", "SELECT seq FROM tasks WHERE queue = 'q' AND state = 'queued' AND lease_node IS NULL AND parked = 0 AND (expires_at IS NULL OR expires_at > 100) ORDER BY priority DESC, seq LIMIT 10 FOR UPDATE SKIP LOCKED"),
        // The writer's finish (writer.rs) and the renewal of leases.
        ("finish", "SELECT seq, cancel_requested, state FROM tasks WHERE id = 'r1' AND lease_token = 1 AND lease_node = 'n:1' AND state IN ('queued', 'running') FOR UPDATE"),
        ("recover", "SELECT seq FROM tasks WHERE lease_node IS NOT NULL AND lease_expires < 100 AND state IN ('queued', 'running') FOR UPDATE SKIP LOCKED"),
        // A page of `taskd tasks` (the newest first), all queues and one queue.
        ("list", "SELECT * FROM tasks WHERE true ORDER BY seq DESC LIMIT 50"),
        ("list by queue", "SELECT * FROM tasks WHERE true AND queue = 'q' ORDER BY seq DESC LIMIT 50"),
        ("next due", "SELECT run_at FROM tasks WHERE state IN ('scheduled', 'retrying') AND blocked = 0 AND queue NOT IN (SELECT queue FROM paused_queues) ORDER BY run_at LIMIT 1"),
        ("retention", "SELECT seq FROM tasks WHERE queue = 'q' AND state = 'succeeded' AND finished_at IS NOT NULL AND finished_at < 100 ORDER BY finished_at LIMIT 200"),
    ];
    for (what, sql) in plans {
        let plan = explain(&server, &db, sql);
        assert!(
            !plan.contains("Seq Scan on tasks"),
            "the {what} statement reads the whole tasks table:\n{plan}"
        );
        assert!(
            plan.contains("Index"),
            "{what}: no index in the plan:\n{plan}"
        );
    }
}

#[test]
fn submit_exits_3_naming_the_address_while_postgres_is_down() {
    let Some(mut server) = PgServer::start("submit while postgres is down") else {
        return;
    };
    let db = server.new_db();
    let url = server.url(&db);
    let env = Env::raw(&config(&url, "[queues.q]\nshell = \"true\"\n"));
    env.submit("q", "{}");
    server.kill();
    let out = env.run(&["submit", "q", "{}"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!(
            "cannot reach PostgreSQL at 127.0.0.1:{}/{db}",
            server.port
        )),
        "{err}"
    );
    server.start_again();
    let id = env.submit("q", "{}");
    assert_eq!(env.state(&id), "queued");
}
