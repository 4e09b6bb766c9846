//! Faults that used to lose or corrupt work, each against a real daemon and real processes:
//! a flood of idle API connections, integers beyond 64 bits, a log reader that dies, a
//! state directory deleted under a running daemon, a Redis server that is full.

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use std::collections::VecDeque;
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{history, poll, Env};

/// Run the daemon with an open-files limit of `n` (soft and hard): a small budget, so that a
/// test needs few connections to exhaust it.
fn nofile_limit(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook only calls setrlimit, which is async-signal-safe, and allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)?;
            Ok(())
        });
    }
}

/// Open connections to `addr` that each send half a request and then nothing, as fast as
/// they are accepted, keeping at most `keep` open at once, until `stop` is set; `opened`
/// counts them.
fn flood(
    addr: String,
    keep: usize,
    opened: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut open = VecDeque::new();
        while !stop.load(Ordering::Relaxed) {
            match TcpStream::connect(&addr) {
                Ok(mut s) => {
                    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n");
                    open.push_back(s);
                    opened.fetch_add(1, Ordering::Relaxed);
                    if open.len() > keep {
                        open.pop_front();
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

#[test]
fn an_idle_connection_flood_neither_fails_tasks_nor_slows_healthz() {
    let e = Env::raw(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = \"127.0.0.1:0\"\n\n[queues.work]\nshell = \"echo done\"\nconcurrency = 2\n",
    );
    // 160 descriptors: before the fix, some 150 idle connections left none for tasks.
    let d = e.daemon_custom(|c| nofile_limit(c, 160));
    let url = d.api_base();
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let flooder = flood(
        url.trim_start_matches("http://").to_string(),
        300,
        opened.clone(),
        stop.clone(),
    );
    // The tasks come once more connections are open than the daemon has descriptors.
    assert!(
        poll(Duration::from_secs(30), || opened.load(Ordering::Relaxed)
            >= 300),
        "the flood opened only {} connections",
        opened.load(Ordering::Relaxed)
    );

    let ids: Vec<String> = (0..10)
        .map(|i| e.submit("work", &format!("{{\"n\":{i}}}")))
        .collect();
    let began = Instant::now();
    let health = ureq::get(&format!("{url}/healthz"))
        .timeout(Duration::from_secs(20))
        .call();
    let health_took = began.elapsed();
    for id in &ids {
        let done = e.wait_state(id, "succeeded", Duration::from_secs(30));
        let h = history(&done);
        assert_eq!(h.len(), 1, "one attempt, no failed spawn: {done:#}");
        assert_eq!(h[0]["reason"], "exit", "{done:#}");
    }
    stop.store(true, Ordering::Relaxed);
    flooder.join().expect("the flood thread");
    eprintln!("healthz answered in {health_took:?} during the flood");
    let health = health.expect("healthz answers during the flood");
    assert_eq!(health.status(), 200);
    assert!(
        health_took < Duration::from_secs(2),
        "healthz took {health_took:?} during the flood"
    );
    let log = d.log_text();
    assert!(
        log.contains("connections open, the most this daemon serves"),
        "the daemon says it reached its connection limit:\n{log}"
    );
}

#[test]
fn a_task_that_finds_no_free_descriptor_waits_instead_of_failing() {
    // 40 descriptors for a daemon running 8 tasks at once: some spawns find none free
    // (EMFILE) until other tasks end.
    let e = Env::new("[queues.q]\nshell = \"sleep 0.3\"\nconcurrency = 8\n");
    let d = e.daemon_custom(|c| nofile_limit(c, 40));
    let payloads: Vec<serde_json::Value> = (0..24).map(|i| serde_json::json!({ "n": i })).collect();
    let ids = common::submit_batch(&e, "q", &payloads);
    for id in &ids {
        let v = e.wait_state(id, "succeeded", Duration::from_secs(60));
        assert_eq!(history(&v).len(), 1, "one attempt, no failed spawn: {v:#}");
    }
    assert!(
        d.log_text().contains("out of file descriptors"),
        "the daemon ran short of descriptors (else this test shows nothing):\n{}",
        d.log_text()
    );
}

#[test]
fn a_log_reader_that_goes_away_stops_neither_tasks_nor_the_daemon() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let e = Env::raw(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = \"127.0.0.1:0\"\n\n[queues.work]\nshell = \"echo done\"\n",
    );
    // `taskd start 2>&1 | logger`, and logger dies.
    let mut child = e
        .cmd(&["start"])
        .env("RUST_LOG", "info,taskd=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the daemon");
    let mut reader = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut url = None;
    let mut line = String::new();
    while reader.read_line(&mut line).expect("read the log") > 0 {
        if let Some(i) = line.find("API listening on ") {
            url = line[i + "API listening on ".len()..]
                .split_whitespace()
                .next()
                .map(str::to_string);
        }
        if line.contains("ready") {
            break;
        }
        line.clear();
    }
    let url = url.expect("the daemon logged its API address before ready");
    drop(reader);
    let d = common::Daemon {
        child: Some(child),
        log: e.path().join("no-log"),
    };

    let ids: Vec<String> = (0..5)
        .map(|i| e.submit("work", &format!("{{\"n\":{i}}}")))
        .collect();
    for id in &ids {
        e.wait_state(id, "succeeded", Duration::from_secs(20));
    }
    d.signal(common::SIGHUP);
    let after = e.submit("work", "{}");
    e.wait_state(&after, "succeeded", Duration::from_secs(20));
    let metrics = ureq::get(&format!("{url}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("taskd_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no taskd_log_lines_dropped_total in:\n{metrics}"));
    assert!(dropped > 0.0, "log lines were written to a closed pipe");
    d.signal(common::SIGTERM);
    assert_eq!(
        d.wait_exit(Duration::from_secs(20)),
        Some(0),
        "a clean stop"
    );
}

/// Run `taskd ARGS` that is expected to exit on its own (a refused start): panic with what it
/// printed if it still runs after `deadline`.
fn run_refused(e: &Env, args: &[&str], deadline: Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = e
        .cmd(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run taskd");
    let exited = poll(deadline, || child.try_wait().ok().flatten().is_some());
    if !exited {
        let _ = child.kill();
        let out = child.wait_with_output().expect("collect its output");
        panic!(
            "taskd {args:?} still ran after {deadline:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.wait_with_output().expect("collect its output")
}

#[test]
fn a_state_directory_deleted_under_the_daemon_halts_it_and_keeps_others_out() {
    let e = Env::new("[queues.q]\nshell = \"echo ok\"\n");
    let d = e.daemon();
    let first = e.submit("q", "{}");
    e.wait_state(&first, "succeeded", Duration::from_secs(20));
    std::fs::remove_dir_all(e.path().join("state")).expect("rm -r state");
    assert!(
        poll(Duration::from_secs(10), || d
            .log_text()
            .contains("no longer claims tasks")),
        "the daemon says it lost its store:\n{}",
        d.log_text()
    );
    let pid = format!("pid {}", d.pid());

    // submit refuses rather than create a fresh store that daemon never reads.
    let out = e.run(&["submit", "q", "{}"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "submit: {err}");
    assert!(
        err.contains(&pid) && err.contains("restart the daemon") && err.contains("taskd.db"),
        "submit names the store, the daemon and the fix: {err}"
    );
    assert!(
        !e.path().join("state").join("taskd.db").exists(),
        "no fresh store was created"
    );
    // status says so, loudly, instead of "not running".
    let out = e.run(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains(&pid) && err.contains("no longer claims tasks"),
        "status: {err}"
    );
    // A second daemon is refused, naming the first.
    let out = run_refused(&e, &["start"], Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a second daemon started: {err}");
    assert!(
        err.contains(&pid),
        "the refusal names pid {}: {err}",
        d.pid()
    );
    assert!(!d.exited(), "the first daemon still runs");
}

#[test]
fn a_second_daemon_on_the_same_sqlite_file_is_refused_whatever_its_state_dir() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("shared.db");
    let config = |state: &str| {
        format!(
            "[taskd]\nstate_dir = \"{state}\"\nbroker = \"sqlite://{}\"\nshutdown_grace = \"5s\"\n\n[queues.q]\nshell = \"sleep 30\"\n",
            db.display()
        )
    };
    let one = Env::raw(&config("state-one"));
    let d = one.daemon();
    let id = one.submit("q", "{}");
    one.wait_state(&id, "running", Duration::from_secs(20));

    let two = Env::raw(&config("state-two"));
    let out = run_refused(&two, &["start"], Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the second daemon started: {err}"
    );
    assert!(
        err.contains(&format!("pid {}", d.pid())) && err.contains("shared.db"),
        "the refusal names the first daemon and the store: {err}"
    );
    // Its running task was left alone: no crash recovery ran.
    let v = one.show(&id);
    assert_eq!(v["state"], "running", "{v:#}");
    assert!(history(&v).is_empty(), "no attempt was recorded: {v:#}");
}

/// `INFO memory`'s `used_memory`, in bytes.
fn used_memory(server: &redis_server::RedisServer) -> u64 {
    let info = server.cli(&["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no used_memory in INFO memory:\n{info}"))
}

#[test]
fn a_full_redis_stops_claims_until_results_can_be_written() {
    let Some(server) =
        redis_server::RedisServer::start("a_full_redis_stops_claims_until_results_can_be_written")
    else {
        return;
    };
    let e = Env::raw("");
    let ran = e.path().join("ran");
    std::fs::write(
        &e.config,
        format!(
            "[taskd]\nstate_dir = \"state\"\nbroker = \"{}\"\nshutdown_grace = \"5s\"\n\n\
             [queues.q]\nshell = 'echo \"$TASKD_TASK_ID\" >> {}'\nconcurrency = 2\n\n\
             [queues.other]\nshell = 'true'\n",
            server.url(),
            ran.display()
        ),
    )
    .expect("write config");
    let payloads: Vec<serde_json::Value> = (0..40).map(|i| serde_json::json!({ "n": i })).collect();
    let ids = common::submit_batch(&e, "q", &payloads);
    // Stored from the inbox (a listing stores it), so that claiming needs no growing write:
    // on a full server claims then pass while every start and result write is refused.
    e.ok(&["tasks"]);
    e.ok(&["pause", "other"]);

    // Fill the server: a 4 MB value, then a maxmemory below what it uses, evicting nothing.
    server.cli(&["SETRANGE", "filler", "4000000", "x"]);
    server.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let limit = used_memory(&server) - 1_000_000;
    server.cli(&["CONFIG", "SET", "maxmemory", &limit.to_string()]);
    let probe = server.cli(&["SET", "probe", "1"]);
    assert!(probe.contains("OOM"), "the server refuses writes: {probe}");

    let d = e.daemon();
    assert!(
        poll(Duration::from_secs(30), || d
            .log_text()
            .contains("not claiming tasks")),
        "the daemon says why it stops claiming:\n{}",
        d.log_text()
    );
    let count = || {
        std::fs::read_to_string(&ran)
            .unwrap_or_default()
            .lines()
            .count()
    };
    // Claims stopped: a few tasks ran before the first refused result, not the backlog, and
    // no more start while the server stays full. Tasks already started when claims stopped
    // may still be running, and ones claimed just before may still be starting (their
    // start, cgroup and all, precedes the refusal): counted once none of the daemon's
    // children is left and the count has held for a second.
    let mut last = (usize::MAX, Instant::now());
    assert!(
        poll(Duration::from_secs(20), || {
            let now = count();
            let idle = common::children(d.pid())
                .iter()
                .all(|(_, state)| *state == 'Z');
            if now != last.0 || !idle {
                last = (now, Instant::now());
                return false;
            }
            last.1.elapsed() >= Duration::from_secs(1)
        }),
        "tasks started before claims stopped are still running"
    );
    let started = count();
    eprintln!("{started} of 40 tasks ran before claims stopped");
    assert!(started < 20, "{started} of 40 tasks ran on a full server");
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(3) {
        assert_eq!(count(), started, "a task started on a full server");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = e.ok(&["status"]);
    assert!(
        status.contains("NOT CLAIMING TASKS") && status.contains("maxmemory"),
        "taskd status says why:\n{status}"
    );
    let out = e.run(&["resume", "other"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "resume on a full server: {err}");
    assert!(
        err.contains("out of memory") && err.contains("maxmemory"),
        "resume says why: {err}"
    );

    // Room again: every result is written, the backlog runs, and nothing ran twice.
    server.cli(&["DEL", "filler"]);
    for id in &ids {
        let v = e.wait_state(id, "succeeded", Duration::from_secs(60));
        assert_eq!(history(&v).len(), 1, "one attempt: {v:#}");
    }
    assert_eq!(count(), 40, "each task ran once");
    assert!(
        poll(Duration::from_secs(10), || d
            .log_text()
            .contains("takes writes again")),
        "the daemon says it claims again:\n{}",
        d.log_text()
    );
}
