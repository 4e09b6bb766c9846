//! The PostgreSQL broker end to end, against a private PostgreSQL the tests start
//! (tests/common/postgres.rs) and the real `taskd` binary: migrations from an empty
//! database and a re-run of `taskd migrate`, a daemon refusing a newer schema, the SQL
//! function `taskd.enqueue` inside transactions that roll back and commit, `EXPLAIN` of the
//! hot statements over many finished tasks, the pool warmed (connections open, the claim
//! run on each) before a daemon says `ready`, the pool reusing the connection given back
//! last, `taskd submit` while the server is down, and three daemons running 5,000 tasks
//! through a node killed with SIGKILL and a PostgreSQL crash.
//!
//! Where PostgreSQL is not installed each test prints a skip message and passes, except
//! under `CI=true`, where it fails.

#![cfg(feature = "postgres")]

mod common;
#[path = "common/postgres.rs"]
mod pg_server;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{history, poll, poll_every, queue_count, secs, submit_batch, Daemon, Env};
use pg_server::PgServer;
use serde_json::{json, Value};

const QUARTER_SECOND: Duration = Duration::from_millis(250);

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
        // The writer's finish and start (writer.rs) and the renewal of leases.
        ("finish", "SELECT t.seq, t.cancel_requested, t.state FROM unnest(ARRAY['r1', 'r2', 'r3'], ARRAY[1, 1, 1]::bigint[], ARRAY['n:1', 'n:1', 'n:1']) AS w(id, token, node) JOIN tasks t ON t.id = w.id WHERE t.lease_token = w.token AND t.lease_node = w.node AND t.state IN ('queued', 'running') FOR UPDATE OF t"),
        ("start", "UPDATE tasks t SET state = 'running' FROM unnest(ARRAY['r1', 'r2'], ARRAY[1, 1]::bigint[], ARRAY['n:1', 'n:1']) AS s(id, token, node) WHERE t.id = s.id AND t.lease_token = s.token AND t.lease_node = s.node AND t.state IN ('queued', 'running') RETURNING t.id"),
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
    // The claim's plain statement, which the daemon's claims send (prepared), in the plan of
    // its first calls (custom) and the one PostgreSQL may keep after a few (generic): the
    // pick reads `tasks_ready`, the probe for due waiting tasks an index too.
    for mode in ["force_custom_plan", "force_generic_plan"] {
        let plan = server.psql(
            &db,
            &format!(
                "SET search_path = taskd; SET plan_cache_mode = {mode};
                 PREPARE c(text, text, bigint, bigint, bigint) AS {};
                 EXPLAIN EXECUTE c('q', 'n:1', 10, 100, 60000);",
                taskd::broker::postgres::CLAIM_SQL
            ),
        );
        assert!(
            !plan.contains("Seq Scan on tasks"),
            "the claim statement ({mode}) reads the whole tasks table:\n{plan}"
        );
        assert!(
            plan.contains("tasks_ready") && plan.matches("Index").count() >= 2,
            "the claim statement ({mode}): its pick or its probe reads no index:\n{plan}"
        );
    }
}

/// The client backends of database `db` other than the asking one: how many, and how many
/// of them last ran the claim statement (`pg_stat_activity.query`, the newest statement of
/// each, cut at 1 KiB).
fn backends(server: &PgServer, db: &str) -> (usize, usize) {
    let out = server.psql(
        db,
        &format!(
            "SELECT count(*), count(*) FILTER (WHERE left(query, 200) = left($claim${}$claim$, 200))
               FROM pg_stat_activity
              WHERE datname = current_database() AND backend_type = 'client backend'
                AND pid <> pg_backend_pid()",
            taskd::broker::postgres::CLAIM_SQL
        ),
    );
    let mut cols = out
        .trim()
        .split('|')
        .map(|c| c.parse::<usize>().expect("a count"));
    (cols.next().expect("count"), cols.next().expect("claims"))
}

/// The shared test server (`None`: skipped), a runtime, a new database and a broker opened
/// on it.
fn opened(
    label: &str,
) -> Option<(
    std::sync::Arc<PgServer>,
    tokio::runtime::Runtime,
    String,
    taskd::broker::postgres::PgBroker,
)> {
    let server = pg_server::shared(label)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let db = server.new_db();
    let broker = runtime
        .block_on(taskd::broker::postgres::PgBroker::open(&server.url(&db)))
        .expect("open the broker");
    Some((server, runtime, db, broker))
}

/// Before a daemon says `ready` the broker opens its pool and runs the claim (and the
/// writer's statements) on each connection, so that the first claims do not pay for new
/// server processes and first plans.
#[test]
fn warming_opens_the_pool_and_runs_the_claim_on_each_connection() {
    use taskd::broker::Broker;
    let Some((server, runtime, db, broker)) = opened("warm-up") else {
        return;
    };
    assert_eq!(
        backends(&server, &db),
        (1, 0),
        "opened: the one connection the schema was checked on"
    );
    runtime.block_on(broker.warm()).expect("warm");
    let pool = taskd::broker::postgres::DEFAULT_POOL;
    assert_eq!(
        backends(&server, &db),
        (pool, pool),
        "the default pool, each connection having run the claim"
    );
    drop(broker);
    let small = server.new_db();
    let broker = runtime
        .block_on(taskd::broker::postgres::PgBroker::open(&format!(
            "{}?pool_size=2",
            server.url(&small)
        )))
        .expect("open the broker");
    runtime.block_on(broker.warm()).expect("warm");
    assert_eq!(backends(&server, &small), (2, 2), "the URL's pool_size");
    // `taskd start` warms before it says `ready`.
    let started = server.new_db();
    let env = Env::raw(&config(
        &server.url(&started),
        "[queues.q]\nshell = \"true\"\n",
    ));
    let daemon = env.daemon();
    let log = daemon.log_text();
    let warmed = log
        .lines()
        .position(|l| l.contains("PostgreSQL pool warmed"))
        .unwrap_or_else(|| panic!("no warm-up logged:\n{log}"));
    let ready = log
        .lines()
        .position(|l| l.ends_with(" ready"))
        .expect("ready");
    assert!(warmed < ready, "warmed after `ready`:\n{log}");
    assert!(
        log.contains(&format!("connections={pool}")),
        "not the whole pool:\n{log}"
    );
    assert!(backends(&server, &started).0 >= pool, "{log}");
}

/// The pool hands out the connection given back last: on an otherwise idle pool, operations
/// one after the other all run on one connection, so that PostgreSQL plans the hot
/// statements on the few connections a load keeps busy, not on every one in turn.
#[test]
fn operations_one_after_the_other_reuse_the_connection_given_back_last() {
    use taskd::broker::Broker;
    let Some((server, runtime, db, broker)) = opened("lifo") else {
        return;
    };
    // Warming leaves the whole pool open and idle, each connection's last statement the claim.
    runtime.block_on(broker.warm()).expect("warm");
    let pool = taskd::broker::postgres::DEFAULT_POOL;
    assert_eq!(backends(&server, &db), (pool, pool), "warmed");
    for _ in 0..3 * pool {
        runtime.block_on(broker.counts()).expect("counts");
    }
    // Handed out in turn, every connection would have run a count since.
    assert_eq!(
        backends(&server, &db),
        (pool, pool - 1),
        "{} operations one after the other ran on more than one connection",
        3 * pool
    );
}

/// The claim's plain statement (`CLAIM_SQL`) on queue `queue` of database `db`, run by
/// `psql` as the daemon's pool runs it (prepared, parameters bound): per answered row its
/// first two columns, `applied` and `seq` (`""` for SQL's `NULL`).
fn claim_statement(server: &PgServer, db: &str, queue: &str) -> Vec<(String, String)> {
    let out = server.psql(
        db,
        &format!(
            "SET search_path = taskd;
             PREPARE c(text, text, bigint, bigint, bigint) AS {};
             EXECUTE c('{queue}', 'n:1', 10, taskd.now_ms(), 60000);",
            taskd::broker::postgres::CLAIM_SQL
        ),
    );
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut cols = l.split('|');
            let applied = cols.next().unwrap_or_default().to_string();
            let seq = cols.next().unwrap_or_default().to_string();
            (applied, seq)
        })
        .collect()
}

/// The claim's plain statement claims from a queue that needs nothing more, and declines,
/// changing nothing, for a paused queue (nothing to claim), tasks parked under limits since
/// removed and due waiting tasks: for those two the broker calls the `claim` SQL function,
/// which releases and promotes them first, so a daemon runs them as before.
#[test]
fn the_claim_statement_hands_parked_keys_and_due_tasks_to_the_claim_function() {
    let Some(server) = pg_server::shared("claim statement") else {
        return;
    };
    let db = server.new_db();
    let url = server.url(&db);
    let env = Env::raw(&config(
        &url,
        "[queues.parked]\nshell = \"true\"\n\n[queues.due]\nshell = \"true\"\n\n[queues.paused]\nshell = \"true\"\n",
    ));
    env.ok(&["migrate"]);
    server.psql(
        &db,
        "INSERT INTO taskd.tasks (id, queue, state, payload, run_at, created_at, updated_at, parked, flow_key)
         SELECT taskd.uuid_v7(), q, st, '{}', 1, 1, 1, p, k
           FROM (VALUES ('plain', 'queued', 0, NULL), ('plain', 'queued', 0, NULL),
                        ('paused', 'queued', 0, NULL),
                        ('parked', 'queued', 1, 'key'), ('parked', 'queued', 0, NULL),
                        ('due', 'scheduled', 0, NULL), ('due', 'retrying', 0, NULL),
                        ('due', 'queued', 0, NULL)) AS v(q, st, p, k);
         INSERT INTO taskd.paused_queues (queue, paused_at) VALUES ('paused', 1);
         INSERT INTO taskd.parked_keys (queue, kind, key) VALUES ('parked', 1, 'key');",
    );
    let held = |queue: &str| {
        server
            .psql(
                &db,
                &format!("SELECT count(*) FROM taskd.tasks WHERE queue = '{queue}' AND lease_node IS NOT NULL"),
            )
            .trim()
            .to_string()
    };

    // A plain queue: claimed by the statement alone, with tokens of at least the server's
    // clock in µs; once empty, it answers that it applied and claimed nothing.
    let got = claim_statement(&server, &db, "plain");
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter()
            .all(|(applied, seq)| applied == "t" && !seq.is_empty()),
        "{got:?}"
    );
    assert_eq!(
        server
            .psql(
                &db,
                "SELECT count(*) FROM taskd.tasks WHERE queue = 'plain' AND lease_node = 'n:1'
                   AND lease_token >= (extract(epoch FROM clock_timestamp()) * 1000000)::bigint - 60000000"
            )
            .trim(),
        "2"
    );
    assert_eq!(
        claim_statement(&server, &db, "plain"),
        vec![("t".to_string(), String::new())]
    );

    // A paused queue: nothing claimed, and nothing for the function to do either.
    assert_eq!(
        claim_statement(&server, &db, "paused"),
        vec![(String::new(), String::new())]
    );
    assert_eq!(held("paused"), "0");

    // Parked keys, due waiting tasks: declined, nothing changed.
    for queue in ["parked", "due"] {
        assert_eq!(
            claim_statement(&server, &db, queue),
            vec![("f".to_string(), String::new())],
            "{queue}"
        );
        assert_eq!(held(queue), "0", "{queue}");
    }
    assert_eq!(
        server
            .psql(&db, "SELECT count(*) FROM taskd.parked_keys")
            .trim(),
        "1"
    );
    assert_eq!(
        server
            .psql(
                &db,
                "SELECT count(*) FROM taskd.tasks WHERE queue = 'due' AND state <> 'queued'"
            )
            .trim(),
        "2"
    );

    // A daemon's claims run the parked and the due tasks (through the function), and leave
    // the paused queue's task waiting, unclaimed.
    let daemon = env.daemon();
    let mut last = Value::Null;
    let ran = poll_every(QUARTER_SECOND, secs(30), || {
        last = env.status();
        queue_count(&last, "parked", "succeeded") == 2
            && queue_count(&last, "due", "succeeded") == 3
    });
    assert!(ran, "{last:#}\n{}", daemon.log_text());
    assert_eq!(
        server
            .psql(&db, "SELECT count(*) FROM taskd.parked_keys")
            .trim(),
        "0"
    );
    assert_eq!(queue_count(&last, "paused", "queued"), 1, "{last:#}");
    assert_eq!(held("paused"), "0");
    let text = env.ok(&["status"]);
    assert!(text.contains("paused"), "{text}");
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

/// A node's config for the crash test: its own state directory, the shared database, a
/// short lease and fast retries.
fn node(url: &str, queues: &str) -> Env {
    let env = Env::raw("");
    let text = format!(
        "[taskd]\nstate_dir = \"state\"\nbroker = \"{url}\"\nshutdown_grace = \"5s\"\nlease = \"6s\"\n\n\
         [defaults]\nbackoff = {{ base = \"100ms\", max = \"200ms\", jitter = false }}\nkill_grace = \"1s\"\n\n{queues}\n"
    );
    std::fs::write(&env.config, text).expect("write config");
    env
}

fn ledger(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Three daemons on one database run 5,000 tasks, each of which appends its id to a
/// ledger; one daemon is killed with SIGKILL mid-run and PostgreSQL is stopped hard
/// (immediate shutdown, as a crash) and started again on the same data and port. At the
/// end every task succeeded with one charged attempt (the killed node's runs are `lost`,
/// not charged), every id is in the ledger and nothing else is, and an id is there twice
/// only when the killed node held its task.
#[test]
fn three_nodes_5000_tasks_survive_a_sigkilled_node_and_a_postgres_restart() {
    const TOTAL: usize = 5000;
    let Some(mut server) = PgServer::start("three nodes, a kill -9 and a PostgreSQL restart")
    else {
        return;
    };
    let db = server.new_db();
    let url = server.url(&db);
    let out = tempfile::tempdir().expect("temp dir");
    let file = out.path().join("ids");
    let q = format!(
        "[queues.w]\nconcurrency = 4\nshell = 'echo \"$TASKD_TASK_ID\" >> \"{}\"'\n",
        file.display()
    );
    let envs: Vec<Env> = (0..3).map(|_| node(&url, &q)).collect();
    envs[0].ok(&["migrate"]);
    let payloads: Vec<Value> = (0..TOTAL).map(|i| json!({ "i": i })).collect();
    let ids = submit_batch(&envs[0], "w", &payloads);
    let want: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(want.len(), TOTAL, "ids are unique");
    let mut daemons: Vec<Option<Daemon>> = envs.iter().map(|e| Some(e.daemon())).collect();

    // Mid-run: kill one node and note what it held (its tasks stay as they are until
    // their leases expire).
    assert!(
        poll_every(QUARTER_SECOND, secs(60), || ledger(&file).len()
            >= TOTAL / 5),
        "no progress"
    );
    let victim = daemons[2].take().expect("the third daemon");
    let victim_id = victim.node_id();
    victim.kill9();
    let held = envs[0].held_by(&victim_id, "running");
    let reserved = envs[0].held_by(&victim_id, "queued");
    assert!(
        !held.is_empty() || !reserved.is_empty(),
        "the killed node held no task: the test proved nothing"
    );

    // Then PostgreSQL crashes and comes back on the same data and port.
    assert!(
        poll_every(QUARTER_SECOND, secs(60), || ledger(&file).len()
            >= TOTAL / 2),
        "no progress after the kill"
    );
    let before_restart = ledger(&file).len();
    server.restart();
    assert!(before_restart < TOTAL, "the restart came after the end");

    let mut last = Value::Null;
    let finished = poll_every(QUARTER_SECOND, secs(90), || {
        last = envs[0].status();
        queue_count(&last, "w", "succeeded") as usize == TOTAL
    });
    let logs: String = daemons.iter().flatten().map(|d| d.log_text()).collect();
    assert!(finished, "not all tasks succeeded: {last:#}\nlogs:\n{logs}");
    for state in [
        "queued",
        "running",
        "scheduled",
        "retrying",
        "failed",
        "cancelled",
    ] {
        assert_eq!(queue_count(&last, "w", state), 0, "{state}: {last:#}");
    }

    // Every id in the ledger, nothing else; every run beyond the first accounted for: a
    // `lost` run in the task's history (a node whose lease ran out: the killed one, or a
    // live one starved past its lease on a loaded machine; at least once, as documented),
    // or the killed node's run whose start never reached the database.
    let lines = ledger(&file);
    let seen: BTreeSet<String> = lines.iter().cloned().collect();
    let missing: Vec<&String> = want.difference(&seen).take(5).collect();
    assert!(
        missing.is_empty(),
        "ids missing from the ledger: {missing:?}"
    );
    let unknown: Vec<&String> = seen.difference(&want).take(5).collect();
    assert!(
        unknown.is_empty(),
        "ids in the ledger that were never submitted: {unknown:?}"
    );
    let mut runs: std::collections::BTreeMap<&str, usize> = Default::default();
    for l in &lines {
        *runs.entry(l.as_str()).or_default() += 1;
    }
    let mut rerun = 0;
    for (id, n) in &runs {
        if *n == 1 {
            continue;
        }
        rerun += 1;
        let t = envs[0].show(id);
        let lost = history(&t).iter().filter(|a| a["reason"] == "lost").count();
        let unrecorded = usize::from(held.contains(*id) || reserved.contains(*id));
        assert!(
            *n <= 1 + lost + unrecorded,
            "task {id} ran {n} times, with {lost} lost runs in its history: {t:#}"
        );
    }

    // One charged attempt each: the lost runs were not charged.
    let done = envs[0].tasks_in("succeeded");
    assert_eq!(done.len(), TOTAL);
    for t in &done {
        assert_eq!(
            t["attempts"], 1,
            "a task was charged more than one attempt: {t:#}"
        );
    }
    // The killed node's running tasks were taken back, each with its run recorded as
    // `lost`; its reserved ones ran elsewhere.
    for id in &held {
        let t = envs[0].show(id);
        let lost = history(&t)
            .iter()
            .any(|a| a["reason"] == "lost" && a["node"] == victim_id.as_str());
        assert!(
            lost,
            "the killed node's run of {id} is not recorded as lost: {t:#}"
        );
        assert!(t["lost"].as_u64() >= Some(1), "{t:#}");
    }
    for id in &reserved {
        assert_ne!(envs[0].show(id)["node"], victim_id.as_str());
    }
    assert!(
        logs.contains("took back tasks whose lease expired"),
        "no node logged taking back the killed node's tasks:\n{logs}"
    );
    // The people's view agrees: `taskd status` shows the queue with all of them succeeded.
    let text = envs[1].ok(&["status"]);
    let table = common::table::find(&text, "queue");
    let row = table.row("w");
    assert_eq!(table.cell(row, "succeeded"), TOTAL.to_string(), "{text}");
    for state in ["queued", "running", "failed"] {
        assert_eq!(table.cell(row, state), "0", "{text}");
    }
    eprintln!(
        "killed node {victim_id} held {} running and {} reserved tasks; {rerun} tasks ran more \
         than once; PostgreSQL restarted after {before_restart} runs",
        held.len(),
        reserved.len()
    );
    drop(daemons);
}
