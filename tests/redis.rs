//! The daemon and the CLI on the Redis broker, with the real `taskd` binary, real
//! `redis-server` processes (private, on free ports) and real tasks: several nodes on one
//! set of queues, cancel and pause across nodes, Redis going away and coming back, and a
//! node killed with SIGKILL whose tasks the others take back.
//!
//! Where `redis-server` is missing each test prints a skip message and passes, except under
//! `CI=true`, where it fails. Nothing sleeps a fixed time to wait for an outcome.

// The Redis broker exists only in builds with the `redis` feature (the default).
#![cfg(feature = "redis")]

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{history, poll, queue_count, secs, submit_batch, Daemon, Env};
use redis_server::RedisServer;
use serde_json::{json, Value};

/// A node's config: its own state directory, the shared broker, a short lease and fast
/// retries; `@D@` in `queues` is the node's directory.
fn node(server: &RedisServer, lease: &str, queues: &str) -> Env {
    let env = Env::raw("");
    let d = env.path().display().to_string();
    let text = format!(
        "[taskd]\nstate_dir = \"state\"\nbroker = \"{}\"\nshutdown_grace = \"5s\"\nlease = \"{lease}\"\n\n\
         [defaults]\nbackoff = {{ base = \"100ms\", max = \"200ms\", jitter = false }}\nkill_grace = \"1s\"\n\n{}\n",
        server.url(),
        queues.replace("@D@", &d)
    );
    std::fs::write(&env.config, text).expect("write config");
    env
}

/// [`poll`] at a slower pace, for checks that start a process or read a big file.
fn poll_slow(deadline: Duration, f: impl FnMut() -> bool) -> bool {
    common::poll_every(Duration::from_millis(250), deadline, f)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A node with a 3 s lease running a task whose first run sleeps (its pid in `pid`) and
/// whose next run succeeds at once: (the node's env, its daemon, the task, the first run's
/// pid), once the first run is running.
fn running_once(server: &RedisServer) -> (Env, Daemon, String, i32) {
    let env = node(
        server,
        "3s",
        "[queues.w]\nshell = '''\nif [ -e \"@D@/pid\" ]; then exit 0; fi\necho $$ > \"@D@/pid\"; exec sleep 60\n'''\n",
    );
    let d = env.daemon();
    let id = env.submit("w", "{}");
    env.wait_state(&id, "running", secs(20));
    let pid: i32 = common::wait_line(&env.path().join("pid"), secs(20))
        .parse()
        .expect("a pid");
    (env, d, id, pid)
}

#[test]
fn tasks_run_on_redis_and_status_lists_the_node() {
    let Some(server) = RedisServer::start("tasks_run_on_redis_and_status_lists_the_node") else {
        return;
    };
    let env = node(
        &server,
        "30s",
        "[queues.w]\nconcurrency = 2\nshell = 'echo \"$TASKD_ARG_n\" >> \"@D@/out\"; [ \"$TASKD_ARG_n\" != 3 ] || exit 7'\nmax_attempts = 2\n",
    );
    let d = env.daemon();
    assert!(
        !d.log_text().contains("appendonly no"),
        "a durable server was reported as losing data:\n{}",
        d.log_text()
    );
    let ids: Vec<String> = (1..=3)
        .map(|n| {
            env.ok(&["submit", "w", &json!({ "n": n }).to_string()])
                .trim()
                .to_string()
        })
        .collect();
    for id in &ids[..2] {
        env.wait_state(id, "succeeded", secs(20));
    }
    let failed = env.wait_state(&ids[2], "failed", secs(20));
    assert_eq!(history(&failed).len(), 2, "{failed:#}");
    assert_eq!(failed["attempts"], 2);
    let mut got = lines(&env.path().join("out"));
    got.sort();
    assert_eq!(got, vec!["1", "2", "3", "3"]);

    let v = env.status();
    assert_eq!(queue_count(&v, "w", "succeeded"), 2, "{v:#}");
    assert_eq!(queue_count(&v, "w", "failed"), 1, "{v:#}");
    let me = d.node_id();
    let nodes = v["nodes"].as_array().expect("status lists nodes");
    let n = nodes
        .iter()
        .find(|n| n["id"] == me.as_str())
        .unwrap_or_else(|| panic!("node {me} is not listed: {v:#}"));
    assert_eq!(n["pid"], d.pid());
    assert_eq!(n["queues"], json!(["w"]));
    assert!(n["last_heartbeat"].as_i64().unwrap_or(0) > 0, "{n}");
    let text = env.ok(&["status"]);
    assert!(text.contains(&me), "the table lists the node:\n{text}");
    // The nodes table, cell by cell against the JSON (the daemon is idle: nothing changes
    // between the two reads but the heartbeat's age).
    let t = common::table::find(&text, "node");
    assert_eq!(
        t.header,
        ["node", "host", "pid", "queues", "running", "last heartbeat"]
    );
    assert_eq!(t.rows.len(), nodes.len(), "{text}");
    for n in nodes {
        let row = t.row(n["id"].as_str().expect("node id"));
        assert_eq!(t.cell(row, "host"), n["host"].as_str().expect("host"));
        assert_eq!(t.cell(row, "pid"), n["pid"].to_string());
        let queues: Vec<&str> = n["queues"]
            .as_array()
            .expect("queues")
            .iter()
            .map(|q| q.as_str().expect("a queue"))
            .collect();
        assert_eq!(t.cell(row, "queues"), queues.join(" "));
        assert_eq!(t.cell(row, "running"), n["running"].to_string());
        let ago = t.cell(row, "last heartbeat");
        let ms = common::table::duration_ms(
            ago.strip_suffix(" ago")
                .unwrap_or_else(|| panic!("last heartbeat: {ago}")),
        );
        assert!((0..30_000).contains(&ms), "last heartbeat {ago}");
    }
    // Seen from a machine (a state directory) without a daemon of its own.
    let cli = node(&server, "30s", "[queues.w]\nshell = 'true'\n");
    let text = cli.ok(&["status"]);
    assert!(
        text.contains("not running on this machine") && text.contains("1 node is sharing"),
        "{text}"
    );

    // A retried task runs again, on any node.
    env.ok(&["retry", &ids[2]]);
    env.wait_state(&ids[2], "failed", secs(20));
    drop(d);
}

#[test]
fn submit_with_redis_unreachable_exits_3_naming_the_address() {
    let Some(mut server) =
        RedisServer::start("submit_with_redis_unreachable_exits_3_naming_the_address")
    else {
        return;
    };
    let env = node(&server, "30s", "[queues.w]\nshell = 'true'\n");
    server.kill();
    let start = Instant::now();
    let out = env.run(&["submit", "w", "{}"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{}", server.port)),
        "the message names the address: {stderr}"
    );
    assert!(
        start.elapsed() < secs(15),
        "took {:?} to give up",
        start.elapsed()
    );
    let out = env.run(&["status"]);
    assert_eq!(out.status.code(), Some(3));

    // With the server back, the same command works.
    server.start_again();
    env.submit("w", "{}");
}

#[test]
fn the_password_never_reaches_messages_or_logs() {
    let Some(server) = RedisServer::start("the_password_never_reaches_messages_or_logs") else {
        return;
    };
    server.cli(&["CONFIG", "SET", "requirepass", "s3cret-pw"]);
    let env = Env::raw("");
    let url = format!("redis://:s3cret-pw@127.0.0.1:{}/2", server.port);
    std::fs::write(
        &env.config,
        format!(
            "[taskd]\nstate_dir = \"state\"\nbroker = \"{url}\"\n\n[queues.w]\nshell = 'true'\n"
        ),
    )
    .expect("write config");
    let d = env.daemon();
    let id = env.submit("w", "{}");
    env.wait_state(&id, "succeeded", secs(20));
    let check = env.ok(&["check"]);
    let status = env.ok(&["status"]);
    for (what, text) in [("log", d.log_text()), ("check", check), ("status", status)] {
        assert!(
            !text.contains("s3cret-pw"),
            "the {what} shows the password:\n{text}"
        );
    }
    // The wrong password: exit 3, and the message does not repeat it either.
    let bad = Env::raw("");
    std::fs::write(
        &bad.config,
        format!(
            "[taskd]\nbroker = \"redis://:wrong-pw@127.0.0.1:{}/2\"\n\n[queues.w]\nshell = 'true'\n",
            server.port
        ),
    )
    .expect("write config");
    let out = bad.run(&["submit", "w", "{}"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("wrong-pw"), "{stderr}");
    drop(d);
}

#[test]
fn cancel_and_pause_reach_a_task_running_on_another_node() {
    let Some(server) = RedisServer::start("cancel_and_pause_reach_a_task_running_on_another_node")
    else {
        return;
    };
    let q = "[queues.w]\nconcurrency = 1\nshell = 'echo $$ > \"@D@/pid-$TASKD_TASK_ID\"; exec sleep 60'\n";
    let a = node(&server, "30s", q);
    let b = node(&server, "30s", q);
    let cli = node(&server, "30s", q);
    let da = a.daemon();
    let db = b.daemon();
    let id = cli.submit("w", "{}");
    let running = cli.wait_state(&id, "running", secs(20));
    let holder = running["node"]
        .as_str()
        .expect("a running task has a node")
        .to_string();
    assert!(
        holder == da.node_id() || holder == db.node_id(),
        "{holder} is neither node"
    );
    let start = Instant::now();
    cli.ok(&["cancel", &id]);
    let done = cli.wait_state(&id, "cancelled", secs(20));
    assert!(
        start.elapsed() < secs(10),
        "cancel took {:?}",
        start.elapsed()
    );
    assert_eq!(done["last_error"], "cancelled by an operator");

    // Paused on the CLI's node: neither daemon claims from the queue.
    cli.ok(&["pause", "w"]);
    assert!(cli.status()["queues"][0]["paused"]
        .as_bool()
        .unwrap_or(false));
    let waiting = cli.submit("w", "{}");
    let stayed = !poll(secs(3), || cli.state(&waiting) != "queued");
    assert!(stayed, "a paused queue's task was claimed");
    cli.ok(&["resume", "w"]);
    cli.wait_state(&waiting, "running", secs(20));
    cli.ok(&["cancel", &waiting]);
    cli.wait_state(&waiting, "cancelled", secs(20));
    drop((da, db));
}

#[test]
fn scheduled_and_retrying_tasks_are_promoted_by_a_node() {
    let Some(server) = RedisServer::start("scheduled_and_retrying_tasks_are_promoted_by_a_node")
    else {
        return;
    };
    let q = "[queues.w]\nconcurrency = 2\nmax_attempts = 3\nshell = 'echo x >> \"@D@/runs-$TASKD_TASK_ID\"; [ \"$TASKD_ATTEMPT\" = 3 ]'\n";
    let a = node(&server, "30s", q);
    let b = node(&server, "30s", q);
    let _da = a.daemon();
    let _db = b.daemon();
    let cli = node(&server, "30s", q);
    let id = cli
        .ok(&["submit", "w", "{}", "--delay", "1s"])
        .trim()
        .to_string();
    assert_eq!(cli.state(&id), "scheduled");
    let done = cli.wait_state(&id, "succeeded", secs(30));
    assert_eq!(done["attempts"], 3, "{done:#}");
    assert_eq!(history(&done).len(), 3);
}

#[test]
fn a_daemon_keeps_its_running_task_while_redis_restarts() {
    let Some(mut server) =
        RedisServer::start("a_daemon_keeps_its_running_task_while_redis_restarts")
    else {
        return;
    };
    let env = node(
        &server,
        "30s",
        "[queues.w]\nconcurrency = 1\nshell = 'while [ ! -e \"@D@/go\" ]; do sleep 0.05; done; echo done >> \"@D@/out\"'\n",
    );
    let d = env.daemon();
    let id = env.submit("w", "{}");
    env.wait_state(&id, "running", secs(20));
    server.kill();
    // The task ends while Redis is away: its result waits in the daemon.
    std::fs::write(env.path().join("go"), "").expect("write go");
    assert!(
        poll(secs(20), || lines(&env.path().join("out")).len() == 1),
        "the task did not finish"
    );
    let out = env.run(&["submit", "w", "{}"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        poll(secs(20), || d.log_text().contains("unreachable")),
        "the daemon did not log the outage:\n{}",
        d.log_text()
    );
    assert!(!d.exited(), "the daemon exited:\n{}", d.log_text());
    // The free slot's claims fail meanwhile, retried with backoff: logged once.
    assert!(
        poll(secs(20), || d.log_text().contains("failed to claim tasks")),
        "{}",
        d.log_text()
    );
    server.start_again();
    let done = env.wait_state(&id, "succeeded", secs(60));
    assert_eq!(history(&done).len(), 1, "{done:#}");
    // New work is taken again.
    let next = env.submit("w", "{}");
    env.wait_state(&next, "succeeded", secs(60));
    assert!(!d.exited());
    assert_eq!(lines(&env.path().join("out")).len(), 2);
    let log = d.log_text();
    assert_eq!(
        log.matches("failed to claim tasks").count(),
        1,
        "one outage, one line:\n{log}"
    );
    assert!(log.contains("claiming tasks again"), "{log}");
}

#[test]
fn a_daemon_started_before_redis_waits_for_it() {
    let Some(mut server) = RedisServer::start("a_daemon_started_before_redis_waits_for_it") else {
        return;
    };
    let env = node(&server, "30s", "[queues.w]\nshell = 'true'\n");
    server.kill();
    let log = env.path().join("early.log");
    let child = env
        .cmd(&["start"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start");
    // Killed when the test ends, however it ends.
    let d = Daemon {
        child: Some(child),
        log: log.clone(),
    };
    assert!(
        poll(secs(20), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("cannot reach the redis server")),
        "no message about the broker"
    );
    assert!(!d.exited(), "the daemon exited");
    server.start_again();
    assert!(
        poll(secs(30), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ready")),
        "the daemon did not start once Redis was back:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let id = env.submit("w", "{}");
    env.wait_state(&id, "succeeded", secs(20));
    d.signal(common::SIGTERM);
    assert_eq!(d.wait_exit(secs(20)), Some(0));
}

/// Issue #7's fault test: three nodes, 5,000 tasks that each append their id to a file;
/// one node is killed with SIGKILL mid-run and Redis is restarted once. Every task ends
/// `succeeded`, every id is in the file, and the killed node's tasks were taken back.
#[test]
fn three_nodes_5000_tasks_survive_a_sigkilled_node_and_a_redis_restart() {
    const TOTAL: usize = 5000;
    let Some(mut server) =
        RedisServer::start("three_nodes_5000_tasks_survive_a_sigkilled_node_and_a_redis_restart")
    else {
        return;
    };
    let out = tempfile::tempdir().expect("temp dir");
    let file = out.path().join("ids");
    let q = format!(
        "[queues.w]\nconcurrency = 4\nshell = 'echo \"$TASKD_TASK_ID\" >> \"{}\"; sleep 0.02'\n",
        file.display()
    );
    let envs: Vec<Env> = (0..3).map(|_| node(&server, "6s", &q)).collect();
    let mut daemons: Vec<Option<Daemon>> = envs.iter().map(|e| Some(e.daemon())).collect();
    let payloads: Vec<Value> = (0..TOTAL).map(|i| json!({ "i": i })).collect();
    let ids = submit_batch(&envs[0], "w", &payloads);
    let want: BTreeSet<String> = ids.iter().cloned().collect();

    // Mid-run: kill one node, then note what it held (nothing changes for its tasks until
    // their leases expire).
    assert!(
        poll_slow(secs(120), || lines(&file).len() >= TOTAL / 5),
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

    // Then Redis goes away and comes back (AOF on: nothing acknowledged is lost).
    assert!(
        poll_slow(secs(120), || lines(&file).len() >= TOTAL / 2),
        "no progress after the kill"
    );
    server.restart();

    let mut last = Value::Null;
    let finished = poll_slow(secs(300), || {
        last = envs[0].status();
        queue_count(&last, "w", "succeeded") as usize == TOTAL
    });
    assert!(finished, "not all tasks succeeded: {last:#}");
    let seen: BTreeSet<String> = lines(&file).into_iter().collect();
    let missing: Vec<&String> = want.difference(&seen).take(5).collect();
    assert!(missing.is_empty(), "ids missing from the file: {missing:?}");
    assert_eq!(queue_count(&last, "w", "failed"), 0);

    // The victim's running tasks were taken back by the others, uncharged; its reserved
    // ones were released and ran elsewhere.
    for id in &held {
        let t = envs[0].show(id);
        assert_eq!(t["state"], "succeeded");
        let lost = history(&t)
            .iter()
            .any(|a| a["reason"] == "lost" && a["node"] == victim_id.as_str());
        assert!(
            lost,
            "the killed node's run of {id} is not recorded as lost: {t:#}"
        );
        assert_eq!(t["attempts"], 1, "a lost run was charged: {t:#}");
    }
    for id in &reserved {
        let t = envs[0].show(id);
        assert_eq!(t["state"], "succeeded");
        assert_ne!(t["node"], victim_id.as_str());
    }
    eprintln!(
        "killed node {victim_id} held {} running and {} reserved tasks; all taken back",
        held.len(),
        reserved.len()
    );
    let logs: String = daemons.iter().flatten().map(|d| d.log_text()).collect();
    assert!(
        logs.contains("took back tasks whose lease expired"),
        "no node logged taking back the victim's tasks"
    );
    drop(daemons);
}

/// `contrib/redis/enqueue.lua` and `push.lua` are the scripts taskd runs, and an
/// application can call them with plain Redis commands: the tasks run like ones
/// `taskd submit` enqueued.
#[test]
fn a_task_enqueued_with_redis_cli_and_the_shipped_script_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).expect("read a script");
    let shipped = read("contrib/redis/enqueue.lua");
    assert!(
        shipped.contains(&read("src/broker/redis/lib.lua"))
            && shipped.ends_with(&read("src/broker/redis/enqueue.lua")),
        "contrib/redis/enqueue.lua differs from src/broker/redis/{{lib,enqueue}}.lua; run contrib/redis/build"
    );
    let shipped = read("contrib/redis/push.lua");
    assert!(
        shipped.contains(&read("src/broker/redis/lib.lua"))
            && shipped.ends_with(&read("src/broker/redis/push.lua")),
        "contrib/redis/push.lua differs from src/broker/redis/{{lib,push}}.lua; run contrib/redis/build"
    );
    let Some(server) =
        RedisServer::start("a_task_enqueued_with_redis_cli_and_the_shipped_script_runs")
    else {
        return;
    };
    let env = node(
        &server,
        "30s",
        "[queues.emails]\ncommand = ['sh', '-c', 'echo \"$1\" > \"$2\"', 'x', '{to}', '@D@/sent']\n",
    );
    let d = env.daemon();
    let id = taskd::model::TaskId::new().to_string();
    server.cli(&["SADD", "taskd:queues", "emails"]);
    let script = root.join("contrib/redis/enqueue.lua");
    let out = server.cli(&[
        "--eval",
        script.to_str().expect("utf-8 path"),
        "taskd:{q:emails}:",
        ",",
        "1",
        &id,
        r#"{"to":"a@example.com"}"#,
        "[]",
        "0",
        "",
        "",
    ]);
    assert!(
        out.contains(&id) && out.contains("queued"),
        "the script answered: {out}"
    );
    let done = env.wait_state(&id, "succeeded", secs(20));
    assert_eq!(done["payload"]["to"], "a@example.com");
    assert_eq!(
        std::fs::read_to_string(env.path().join("sent")).expect("the task wrote"),
        "a@example.com\n"
    );

    // The fast path: one entry in the queue's inbox, stored by the daemon. Its id comes
    // from where docs/redis.md takes it (a random v4 UUID, present on every Linux machine;
    // `uuidgen` is not installed by default on Debian).
    let guide = read("docs/redis.md");
    assert!(
        !guide.contains("uuidgen") && guide.contains("$(cat /proc/sys/kernel/random/uuid)"),
        "docs/redis.md makes ids with /proc/sys/kernel/random/uuid"
    );
    let id = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("the kernel's random UUID")
        .trim()
        .to_string();
    let out = server.cli(&[
        "--eval",
        root.join("contrib/redis/push.lua")
            .to_str()
            .expect("utf-8 path"),
        "taskd:{q:emails}:",
        &format!("taskd:{{q:emails}}:t:{id}"),
        ",",
        &format!("{id}\x1f[]\x1f{{\"to\":\"b@example.com\"}}"),
    ]);
    assert!(
        out.trim().parse::<u64>().is_ok(),
        "push.lua answers the time it pushed at, not: {out}"
    );
    let done = env.wait_state(&id, "succeeded", secs(20));
    assert_eq!(done["payload"]["to"], "b@example.com");
    assert_eq!(
        std::fs::read_to_string(env.path().join("sent")).expect("the task wrote"),
        "b@example.com\n"
    );
    drop(d);
}

/// A node that stops cleanly (SIGTERM) removes its record from the registry: `status`
/// lists it while it runs and not after.
#[test]
fn a_node_that_stops_cleanly_leaves_the_registry() {
    let Some(server) = RedisServer::start("a_node_that_stops_cleanly_leaves_the_registry") else {
        return;
    };
    let env = node(&server, "30s", "[queues.w]\nshell = 'true'\n");
    let d = env.daemon();
    let me = d.node_id();
    let listed = |env: &Env| {
        env.status()["nodes"]
            .as_array()
            .expect("status lists nodes")
            .iter()
            .any(|n| n["id"] == me.as_str())
    };
    assert!(
        poll(secs(20), || listed(&env)),
        "a running node is not listed: {:#}",
        env.status()
    );
    d.signal(common::SIGTERM);
    assert_eq!(d.wait_exit(secs(20)), Some(0), "a drained daemon exits 0");
    assert!(
        !listed(&env),
        "a stopped node is still listed: {:#}",
        env.status()
    );
}

/// A node whose lease was taken over (here: the fencing token bumped behind its back, as a
/// reclaim by another node does) stops its copy of the task; the task is taken back and
/// runs again, uncharged for the lost run.
#[test]
fn a_node_that_lost_its_lease_stops_its_copy_of_the_task() {
    let Some(server) = RedisServer::start("a_node_that_lost_its_lease_stops_its_copy_of_the_task")
    else {
        return;
    };
    let (env, d, id, pid) = running_once(&server);
    server.cli(&["HINCRBY", &format!("taskd:{{q:w}}:t:{id}"), "token", "1"]);
    assert!(
        poll(secs(20), || !common::alive(pid)),
        "the task kept running after its lease was lost:\n{}",
        d.log_text()
    );
    assert!(d.log_text().contains("lost the lease"), "{}", d.log_text());
    let v = env.wait_state(&id, "succeeded", secs(30));
    let h = history(&v);
    assert_eq!(
        h.first().map(|a| a["reason"].clone()),
        Some(json!("lost")),
        "{v:#}"
    );
    assert_eq!(v["attempts"], 1, "{v:#}");
}

/// A node frozen after starting a task but before its start reached Redis: its lease runs
/// out, another node takes the task back (as never started: no `lost` attempt) and runs it
/// again. The first run happened all the same; when the frozen node wakes up, its result is
/// refused (the lease is gone) and used to vanish, so the task showed one run where there
/// were two. The run is now added to the history, and the node says truthfully why its
/// result is not applied.
///
/// The window between a spawn and its start record is microseconds wide, too narrow to hit
/// from outside: the test runs the task normally on node A, puts the task back in the state
/// a missing start record leaves (queued, held by A, attempt not counted) with one Lua
/// script, then freezes A with SIGSTOP.
#[test]
fn a_run_on_a_node_frozen_before_its_start_was_recorded_stays_in_the_history() {
    let Some(server) = RedisServer::start(
        "a_run_on_a_node_frozen_before_its_start_was_recorded_stays_in_the_history",
    ) else {
        return;
    };
    let (env_a, d_a, id, pid) = running_once(&server);
    let node_a = d_a.node_id();
    let unrecord = "local t = KEYS[1] .. 't:' .. ARGV[1]
        local seq = redis.call('HGET', t, 'seq')
        redis.call('HINCRBY', t, 'attempts', -1)
        redis.call('HSET', t, 'state', 'queued')
        redis.call('HDEL', t, 'started_at', 'pid', 'pid_start', 'pid_boot')
        redis.call('ZREM', KEYS[1] .. 'st:running', ARGV[1])
        redis.call('ZADD', KEYS[1] .. 'st:queued', seq, ARGV[1])
        return 'ok'";
    assert_eq!(
        server
            .cli(&["EVAL", unrecord, "1", "taskd:{q:w}:", &id])
            .trim(),
        "ok"
    );
    d_a.signal(libc::SIGSTOP);
    // Node B serves the queue too, with the pid file that makes a second run succeed.
    let dir_a = env_a.path().display().to_string();
    let env_b = node(
        &server,
        "3s",
        &format!(
            "[queues.w]\nshell = '''\nif [ -e \"{dir_a}/pid\" ]; then exit 0; fi\necho $$ > \"{dir_a}/pid\"; exec sleep 60\n'''\n"
        ),
    );
    let _d_b = env_b.daemon();
    let v = env_b.wait_state(&id, "succeeded", secs(30));
    assert_eq!(
        history(&v).len(),
        1,
        "B took the task back as never started: {v:#}"
    );
    d_a.signal(libc::SIGCONT);
    let mut v = Value::Null;
    let both = poll(secs(30), || {
        v = env_b.show(&id);
        history(&v).len() == 2
    });
    assert!(
        both,
        "the frozen node's run left no trace in the history:\n{v:#}\nnode A's log:\n{}",
        d_a.log_text()
    );
    let first = history(&v)
        .iter()
        .find(|a| a["node"] == node_a.as_str())
        .unwrap_or_else(|| panic!("no run of node {node_a}: {v:#}"));
    assert_eq!(first["reason"], "lost", "{v:#}");
    assert!(
        first["error"]
            .as_str()
            .unwrap_or_default()
            .contains("may have run twice"),
        "{v:#}"
    );
    assert_eq!(
        v["state"], "succeeded",
        "the note changes nothing else: {v:#}"
    );
    assert_eq!(v["attempts"], 1, "{v:#}");
    assert!(
        poll(secs(10), || !common::alive(pid)),
        "A's copy kept running"
    );
    let log = d_a.log_text();
    assert!(
        log.contains("lease was taken over while this node ran it")
            && !log.contains("its result is dropped"),
        "{log}"
    );
}

/// A TCP proxy in front of `upstream` that relays both ways until a client sends `marker`:
/// it passes that request on whole, swallows the chunk that holds its answer (a finish
/// call's `[ok]`: the script ran), and cuts the connection. Once; the next connections are relayed.
fn proxy_losing_one_answer(upstream: u16, marker: &'static [u8]) -> u16 {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let port = listener.local_addr().expect("proxy address").port();
    let armed = Arc::new(AtomicBool::new(true));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let pending = Arc::new(AtomicBool::new(false));
            let (mut c_in, mut s_out) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            let (armed, seen) = (armed.clone(), pending.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = c_in.read(&mut buf) {
                    if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    if buf[..n].windows(marker.len()).any(|w| w == marker)
                        && armed.swap(false, Ordering::SeqCst)
                    {
                        seen.store(true, Ordering::SeqCst);
                    }
                }
            });
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = s_in.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let answer = &buf[..n];
                    // finish.lua answers one result with a one-element array, `ok`;
                    // started.lua's plain `ok` is not it.
                    let finished = b"*1\r\n$2\r\nok\r\n";
                    if pending.load(Ordering::SeqCst)
                        && answer.windows(finished.len()).any(|w| w == finished)
                    {
                        let _ = s_in.shutdown(Shutdown::Both);
                        break;
                    }
                    if c_out.write_all(answer).is_err() {
                        break;
                    }
                }
                let _ = c_out.shutdown(Shutdown::Both);
            });
        }
    });
    port
}

/// A result write that Redis applied but whose answer was lost (the connection broke on the
/// way back) is sent again, and refused: the lease was spent by the first write. That used to
/// be logged as "the task's lease was taken over; its result is dropped", though nothing was
/// dropped. The node now finds its run in the history and says the result was recorded.
#[test]
fn a_result_whose_answer_was_lost_is_logged_as_recorded() {
    let Some(server) = RedisServer::start("a_result_whose_answer_was_lost_is_logged_as_recorded")
    else {
        return;
    };
    let port = proxy_losing_one_answer(server.port, b"answer-lost-marker");
    let env = Env::raw("");
    std::fs::write(
        &env.config,
        format!(
            "[taskd]\nstate_dir = \"state\"\nbroker = \"redis://127.0.0.1:{port}/0\"\nshutdown_grace = \"5s\"\n\n\
             [queues.q]\nshell = 'echo answer-lost-marker'\n"
        ),
    )
    .expect("write config");
    let d = env.daemon();
    let id = env.submit("q", "{}");
    let v = env.wait_state(&id, "succeeded", secs(30));
    assert_eq!(history(&v).len(), 1, "{v:#}");
    let recorded = "the result was recorded by an earlier try whose answer was lost";
    assert!(
        poll(secs(20), || d.log_text().contains(recorded)),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(!log.contains("result is dropped"), "{log}");
    assert_eq!(history(&env.show(&id)).len(), 1, "nothing was added");
}

/// `rediss://`: the same broker over TLS (a self-signed certificate, accepted with the
/// URL's `#insecure`, which only a test should use).
#[test]
fn rediss_urls_connect_over_tls() {
    let Some(plain) = RedisServer::start("rediss_urls_connect_over_tls") else {
        return;
    };
    let dir = plain.dir().to_path_buf();
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        common::skip::skip(
            "openssl is not installed (it makes the test certificate)",
            "apt-get install -y openssl",
        );
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut tls = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(dir.join("cert.pem"))
        .arg("--tls-key-file")
        .arg(dir.join("key.pem"))
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start a TLS redis-server");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut tls);
    assert!(
        poll(secs(20), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "the TLS server did not listen"
    );
    let env = Env::raw("");
    std::fs::write(
        &env.config,
        format!(
            "[taskd]\nstate_dir = \"state\"\nbroker = \"rediss://127.0.0.1:{port}/0#insecure\"\n\n[queues.w]\nshell = 'true'\n"
        ),
    )
    .expect("write config");
    let d = env.daemon();
    let id = env.submit("w", "{}");
    env.wait_state(&id, "succeeded", secs(20));
    drop(d);
}

#[test]
fn a_daemon_warns_when_redis_is_configured_to_lose_tasks() {
    let Some(server) = RedisServer::start("a_daemon_warns_when_redis_is_configured_to_lose_tasks")
    else {
        return;
    };
    server.cli(&["CONFIG", "SET", "appendonly", "no"]);
    server.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let env = node(&server, "30s", "[queues.w]\nshell = 'true'\n");
    let d = env.daemon();
    let log = d.log_text();
    assert!(log.contains("appendonly no"), "{log}");
    assert!(log.contains("maxmemory-policy allkeys-lru"), "{log}");
    assert!(log.contains("WARN"), "{log}");
}

/// A node killed with SIGKILL and started again on the same state directory kills what its
/// predecessor left running (the task's lease is still the dead node's); the task is then
/// taken back when that lease expires and runs again, uncharged for the lost run.
#[test]
fn a_restarted_node_kills_what_its_predecessor_left_running() {
    let Some(server) =
        RedisServer::start("a_restarted_node_kills_what_its_predecessor_left_running")
    else {
        return;
    };
    let (env, d, id, pid) = running_once(&server);
    d.kill9();
    assert!(common::alive(pid), "the task died with its daemon");
    let d = env.daemon();
    assert!(
        poll(secs(20), || !common::alive(pid)),
        "the restarted node left its predecessor's task running:\n{}",
        d.log_text()
    );
    let v = env.wait_state(&id, "succeeded", secs(30));
    assert_eq!(history(&v)[0]["reason"], "lost", "{v:#}");
    assert_eq!(v["attempts"], 1, "{v:#}");
}

/// A node killed after it started a task whose start never reached Redis (Redis was down at
/// that moment; found by the chaos suite's `crash_in_outage`): the run happened, and its
/// start log says so, but Redis still shows the task held and never started, so when its
/// lease ran out it was taken back as if nothing had run and the run left no trace. The
/// restarted node now marks its predecessor's noted tasks as started, so that their run is
/// recorded as `lost` when the lease expires. (The missing start record is made as in the
/// frozen-node test above: the task runs normally, then one Lua script undoes its start.)
#[test]
fn a_run_whose_start_never_reached_redis_is_recorded_after_its_node_died() {
    let Some(server) =
        RedisServer::start("a_run_whose_start_never_reached_redis_is_recorded_after_its_node_died")
    else {
        return;
    };
    let (env, d, id, pid) = running_once(&server);
    let unrecord = "local t = KEYS[1] .. 't:' .. ARGV[1]
        local seq = redis.call('HGET', t, 'seq')
        redis.call('HINCRBY', t, 'attempts', -1)
        redis.call('HSET', t, 'state', 'queued')
        redis.call('HDEL', t, 'started_at', 'pid', 'pid_start', 'pid_boot')
        redis.call('ZREM', KEYS[1] .. 'st:running', ARGV[1])
        redis.call('ZADD', KEYS[1] .. 'st:queued', seq, ARGV[1])
        return 'ok'";
    assert_eq!(
        server
            .cli(&["EVAL", unrecord, "1", "taskd:{q:w}:", &id])
            .trim(),
        "ok"
    );
    d.kill9();
    let d = env.daemon();
    assert!(
        poll(secs(20), || !common::alive(pid)),
        "the restarted node left its predecessor's task running:\n{}",
        d.log_text()
    );
    let v = env.wait_state(&id, "succeeded", secs(30));
    let h = history(&v);
    assert_eq!(
        h.len(),
        2,
        "the killed node's run is missing from the history:\n{v:#}\n{}",
        d.log_text()
    );
    assert_eq!(h[0]["reason"], "lost", "{v:#}");
    assert_eq!(h[0]["number"], 1, "{v:#}");
    assert_eq!(v["attempts"], 1, "the lost run is not charged: {v:#}");
    assert_eq!(v["lost"], 1, "{v:#}");
}

/// A daemon stores what producers push into a queue's inbox in the background, a bounded
/// step at a time, even while the queue is paused and nothing claims from it.
#[test]
fn a_daemon_stores_the_inbox_of_a_paused_queue() {
    let Some(server) = RedisServer::start("a_daemon_stores_the_inbox_of_a_paused_queue") else {
        return;
    };
    let env = node(&server, "30s", "[queues.w]\nshell = 'true'\n");
    let d = env.daemon();
    env.ok(&["pause", "w"]);
    let payloads: Vec<Value> = (0..1000).map(|i| serde_json::json!({ "i": i })).collect();
    let ids = common::submit_batch(&env, "w", &payloads);
    let n = |args: &[&str]| server.cli(args).trim().parse::<u64>().unwrap_or(u64::MAX);
    assert!(
        poll(secs(20), || n(&["ZCARD", "taskd:{q:w}:st:queued"]) == 1000),
        "the daemon did not store the inbox: {} left in it",
        n(&["LLEN", "taskd:{q:w}:in"])
    );
    assert_eq!(n(&["LLEN", "taskd:{q:w}:in"]), 0);
    assert_eq!(queue_count(&env.status(), "w", "queued"), 1000);
    env.ok(&["resume", "w"]);
    env.wait_state(&ids[999], "succeeded", secs(30));
    drop(d);
}

/// The HTTP API lists the nodes sharing the broker beside the queues, and so does
/// `taskd status --server`.
#[test]
fn the_api_and_status_server_list_the_nodes() {
    let Some(server) = RedisServer::start("the_api_and_status_server_list_the_nodes") else {
        return;
    };
    let env = node(&server, "30s", "[queues.w]\nshell = 'true'\n");
    let text = std::fs::read_to_string(&env.config).expect("read config");
    std::fs::write(
        &env.config,
        text.replacen("[taskd]\n", "[taskd]\nlisten = \"127.0.0.1:0\"\n", 1),
    )
    .expect("write config");
    let d = env.daemon();
    let me = d.node_id();
    let url = d.api_base();
    let listed = |v: &Value| {
        v["nodes"].as_array().is_some_and(|ns| {
            ns.iter()
                .any(|n| n["id"] == me.as_str() && n["pid"] == d.pid())
        })
    };
    let mut v = Value::Null;
    assert!(
        poll(secs(20), || {
            v = serde_json::from_str(&env.ok(&["status", "--server", &url, "--json"]))
                .expect("status --server --json is JSON");
            listed(&v)
        }),
        "GET /api/v1/queues does not list node {me}: {v:#}"
    );
    let text = env.ok(&["status", "--server", &url]);
    assert!(
        text.contains("nodes sharing its broker") && text.contains(&me),
        "{text}"
    );
    drop(d);
}

/// `taskd status` (table and JSON) shows inbox entries that were set aside and will never
/// run, so that an operator finds them.
#[test]
fn status_shows_entries_set_aside() {
    let Some(server) = RedisServer::start("status_shows_entries_set_aside") else {
        return;
    };
    let env = node(&server, "30s", "[queues.w]\nshell = 'true'\n");
    server.cli(&["SADD", "taskd:queues", "w"]);
    server.cli(&["RPUSH", "taskd:{q:w}:in", "not an entry"]);
    server.cli(&["INCRBY", "taskd:{q:w}:inn", "1"]);
    // Any reader that stores the inbox sets it aside; a list does.
    env.ok(&["tasks"]);
    let v = env.status();
    let w = v["queues"]
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["queue"] == "w"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(w["set_aside"], 1, "{v:#}");
    assert_eq!(queue_count(&v, "w", "queued"), 0, "{v:#}");
    let text = env.ok(&["status"]);
    assert!(text.contains("1 inbox entry set aside"), "{text}");
}

/// `taskd logs --follow` on a node that does not run the task: it says where the task runs
/// (output is live only there), shows the attempt's stored tails when it ends, and exits
/// with how the task ended; on the node running it, the output is live.
#[test]
fn a_task_running_on_another_node_is_followed_through_its_stored_tails() {
    let Some(server) =
        RedisServer::start("a_task_running_on_another_node_is_followed_through_its_stored_tails")
    else {
        return;
    };
    // Only node A serves `w`; node B's daemon serves another queue.
    let a = node(
        &server,
        "30s",
        "[queues.w]\nshell = 'echo first; while [ ! -e \"@D@/go\" ]; do sleep 0.02; done; echo second'\n",
    );
    let b = node(&server, "30s", "[queues.other]\nshell = 'true'\n");
    let da = a.daemon();
    let _db = b.daemon();
    let id = a.submit("w", "{}");
    a.wait_state(&id, "running", secs(20));
    let follow = |env: &Env, name: &str| {
        let err = env.path().join(format!("{name}.err"));
        let child = env
            .cmd(&["logs", &id, "--follow"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("start taskd logs");
        (child, err)
    };
    let (on_a, a_err) = follow(&a, "a");
    let (on_b, b_err) = follow(&b, "b");
    let node_a = da.node_id();
    let notice = format!(
        "── attempt 1 runs on node {node_a}, whose output is live only there (`taskd logs --follow {id}` on that host, or --server with that node's API); its stored output is shown when it ends ──"
    );
    let ok = poll(secs(20), || {
        lines(&b_err).contains(&notice)
            && lines(&a_err)
                .iter()
                .any(|l| l.starts_with("── attempt 1 · started ") && l.ends_with(" · live ──"))
    });
    assert!(
        ok,
        "on B:\n{:#?}\non A:\n{:#?}",
        lines(&b_err),
        lines(&a_err)
    );
    std::fs::write(a.path().join("go"), "").expect("open the gate");
    for (child, err, what) in [(on_a, &a_err, "live"), (on_b, &b_err, "stored output")] {
        let out = child.wait_with_output().expect("wait for taskd logs");
        assert_eq!(out.status.code(), Some(0), "{:#?}", lines(err));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "first\nsecond\n");
        let err = lines(err);
        let header = err
            .iter()
            .find(|l| l.starts_with("── attempt 1 · started "))
            .unwrap_or_else(|| panic!("{err:#?}"));
        assert!(
            header.ends_with(&format!(" on {node_a} · {what} ──")),
            "{header}"
        );
        assert_eq!(
            err.last().map(String::as_str),
            Some(format!("── task {id} succeeded after 1 attempt ──").as_str())
        );
    }
}

/// `max_lost` on a shared broker: a task whose node is killed under it each time is taken
/// back when its lease expires, and failed `lost` once it was lost more than `max_lost`
/// times.
#[test]
fn a_task_lost_more_than_max_lost_times_fails_on_redis() {
    let Some(server) = RedisServer::start("a_task_lost_more_than_max_lost_times_fails_on_redis")
    else {
        return;
    };
    let env = node(
        &server,
        "3s",
        "[queues.poison]\nmax_lost = 1\nshell = 'echo \"$TASKD_ATTEMPT\" >> \"@D@/runs\"; sleep 60'\n",
    );
    let runs = env.path().join("runs");
    let id = env.submit("poison", "{}");
    for n in 1..=2usize {
        let d = env.daemon();
        let mut last = Value::Null;
        let ok = poll(secs(40), || {
            let started = std::fs::read_to_string(&runs)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            last = env.show(&id);
            started == n && last["state"] == "running" && history(&last).len() == n - 1
        });
        assert!(ok, "run {n} did not start: {last:#}\n{}", d.log_text());
        d.kill9();
    }
    // The second loss is one more than max_lost: once the lease expires, it fails.
    let d = env.daemon();
    let v = env.wait_state(&id, "failed", secs(40));
    assert_eq!(v["lost"], 2, "{v:#}");
    let reasons: Vec<&str> = history(&v)
        .iter()
        .map(|a| a["reason"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(reasons, ["lost", "lost"]);
    assert!(
        v["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("lost 2 times") && e.contains("max_lost = 1")),
        "{v:#}"
    );
    assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 2);
    assert!(
        d.log_text()
            .contains("its runs were lost more often than max_lost"),
        "{}",
        d.log_text()
    );
}

/// `max_crashes` on a shared broker: a task that kills every long-lived worker that takes
/// it, on two nodes, fails at its third crash whichever nodes its runs were on (the count
/// is the task's history in the store, not a node's memory), with attempts left.
#[test]
fn a_task_its_workers_die_on_max_crashes_times_fails_on_redis() {
    let Some(server) =
        RedisServer::start("a_task_its_workers_die_on_max_crashes_times_fails_on_redis")
    else {
        return;
    };
    let shared = tempfile::tempdir().expect("temp dir");
    let took = shared.path().join("took");
    let queues = format!(
        "[queues.dies]\nmax_attempts = 10\nmax_crashes = 3\nstart_secs = \"0s\"\n\
         worker = [\"sh\", \"-c\", \"echo '{{\\\"type\\\":\\\"ready\\\",\\\"protocol\\\":1}}' >&4; while read -r l <&3; do echo took >> '{}'; exit 3; done\"]\n",
        took.display()
    );
    let a = node(&server, "5s", &queues);
    let b = node(&server, "5s", &queues);
    let da = a.daemon();
    let db = b.daemon();
    let id = a.submit("dies", "{}");
    let v = a.wait_state(&id, "failed", secs(60));
    assert_eq!(v["crashes"], 3, "{v:#}");
    let h = history(&v);
    assert_eq!(h.len(), 3, "{v:#}");
    assert!(h.iter().all(|at| at["reason"] == "crash"), "{v:#}");
    assert!(
        h[2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("died running this task 3 times (max_crashes = 3)")),
        "{v:#}"
    );
    assert_eq!(v["attempts"], 3, "7 attempts were left");
    // What people read: the other node's `show` says the same.
    let shown = b.ok(&["show", &id]);
    assert!(shown.contains("state     failed"), "{shown}");
    assert!(
        shown.contains("crashes   3 (its worker died running it"),
        "{shown}"
    );
    assert_eq!(
        lines(&took).len(),
        3,
        "three runs, none after the task failed\n{}\n{}",
        da.log_text(),
        db.log_text()
    );
}
