//! Crash safety: kill -9 the daemon while tasks run, start it again.
//! The orphaned process groups are killed, their tasks run again without being charged an
//! attempt (reason `lost` in the history), nothing stays `running`, nothing is lost.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{alive, history, poll, secs, wait_line, Env};
use serde_json::{json, Value};

/// A config with fast defaults and `D` (the temp dir) in every task's environment.
fn setup(body: &str) -> Env {
    let env = Env::raw("");
    let d = env.path().display().to_string();
    let text = format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"2s\"\n\n\
         [defaults]\nbackoff = {{ base = \"100ms\", max = \"200ms\", jitter = false }}\n\
         kill_grace = \"1s\"\nenv = {{ D = '{d}' }}\n\n{body}\n"
    );
    std::fs::write(&env.config, text).unwrap();
    env
}

fn submit(env: &Env, queue: &str, payload: &Value) -> String {
    env.ok(&["submit", queue, &payload.to_string()])
        .trim()
        .to_string()
}

fn submit_batch(env: &Env, queue: &str, n: usize) -> Vec<String> {
    common::submit_batch(env, queue, &vec![serde_json::json!({}); n])
}

fn wait_pid(path: &Path, deadline: Duration) -> i32 {
    wait_line(path, deadline).parse().expect("a pid")
}

fn status(env: &Env) -> Value {
    serde_json::from_str(&env.ok(&["status", "--json"])).expect("status --json is JSON")
}

fn counts(env: &Env, queue: &str) -> Value {
    let s = status(env);
    s["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == queue)
        .map(|q| q["counts"].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn kill9_orphans_are_killed_and_their_tasks_run_again_uncharged() {
    let env = setup(
        r#"
[queues.k]
concurrency = 3
max_attempts = 1
shell = '''
if [ -e "$D/ran-$TASKD_ARG_n" ]; then echo "rerun attempt $TASKD_ATTEMPT"; exit 0; fi
touch "$D/ran-$TASKD_ARG_n"
sleep 30 & echo $! > "$D/bg-$TASKD_ARG_n"
echo $$ > "$D/pid-$TASKD_ARG_n"
if [ "$TASKD_ARG_n" = 3 ]; then
  # leaves its background child behind once the daemon is gone
  while [ ! -e "$D/leader-exit" ]; do sleep 0.02; done
  exit 0
fi
wait
'''
"#,
    );
    let d = env.daemon();
    let ids: Vec<String> = (1..=3)
        .map(|n| submit(&env, "k", &json!({ "n": n })))
        .collect();
    let mut pids = Vec::new();
    for n in 1..=3 {
        pids.push(wait_pid(&env.path().join(format!("pid-{n}")), secs(10)));
        pids.push(wait_pid(&env.path().join(format!("bg-{n}")), secs(10)));
    }
    for id in &ids {
        env.wait_state(id, "running", secs(10));
    }
    d.kill9();
    // The tasks outlive their daemon (otherwise this test would prove nothing).
    assert!(
        pids.iter().all(|&p| alive(p)),
        "the tasks died with the daemon: {pids:?}"
    );
    for id in &ids {
        assert_eq!(env.state(id), "running");
    }
    // Task 3's leader exits while the daemon is down; its background child stays in the group.
    let (leader3, bg3) = (pids[4], pids[5]);
    std::fs::write(env.path().join("leader-exit"), "").unwrap();
    assert!(
        poll(secs(5), || !alive(leader3)),
        "task 3's leader did not exit"
    );
    assert!(alive(bg3));
    // A producer's enqueue works while the daemon is down.
    let late = submit(&env, "k", &json!({ "n": 4 }));
    std::fs::write(env.path().join("ran-4"), "").unwrap(); // it just exits 0

    let d = env.daemon();
    let ok = poll(secs(5), || pids.iter().all(|&p| !alive(p)));
    let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(
        ok,
        "orphaned task processes survive the restart: {left:?}\n{}",
        d.log_text()
    );

    for id in &ids {
        let v = env.wait_state(id, "succeeded", secs(15));
        assert_eq!(v["attempts"], 1, "the lost run was charged:\n{v:#}");
        let h = history(&v);
        assert_eq!(h.len(), 2, "{v:#}");
        assert_eq!(h[0]["reason"], "lost", "{v:#}");
        assert_eq!(h[1]["reason"], "exit", "{v:#}");
        assert_eq!(
            h[1]["stdout_tail"], "rerun attempt 1\n",
            "the rerun is attempt 1 again:\n{v:#}"
        );
    }
    env.wait_state(&late, "succeeded", secs(15));
    let c = counts(&env, "k");
    assert_eq!(c["running"], 0, "{c}");
    assert_eq!(c["succeeded"], 4, "{c}");
}

/// A task's process group outlives its leader while the daemon is down, and the member left
/// does not carry the task's environment (it ran `env -i`, as sudo, ssh or a sanitising
/// wrapper would). Recovery must still kill the group: it is the task's.
#[test]
fn kill9_recovery_kills_an_orphaned_group_whose_leader_exited() {
    let env = setup(
        r#"
[queues.k]
shell = '''
if [ -e "$D/ran" ]; then exit 0; fi
touch "$D/ran"
env -i /bin/sleep 30 & echo $! > "$D/bg"
echo $$ > "$D/pid"
while [ ! -e "$D/leader-exit" ]; do sleep 0.02; done
'''
"#,
    );
    let d = env.daemon();
    let id = submit(&env, "k", &json!({}));
    let leader = wait_pid(&env.path().join("pid"), secs(10));
    let bg = wait_pid(&env.path().join("bg"), secs(10));
    env.wait_state(&id, "running", secs(10));
    d.kill9();
    std::fs::write(env.path().join("leader-exit"), "").unwrap();
    assert!(poll(secs(5), || !alive(leader)), "the leader did not exit");
    assert!(alive(bg), "the background member died with its leader");
    let d = env.daemon();
    let v = env.wait_state(&id, "succeeded", secs(15));
    assert_eq!(history(&v)[0]["reason"], "lost", "{v:#}");
    let dead = poll(secs(5), || !alive(bg));
    if !dead {
        let _ = std::process::Command::new("kill")
            .args(["-9", &bg.to_string()])
            .status(); // clean up
    }
    assert!(
        dead,
        "process {bg} of the crashed task's group survived recovery:\n{}",
        d.log_text()
    );
}

/// Only a task that was running when the daemon died has a `lost` attempt: a task that was
/// still waiting for a slot did not run, and its history must not suggest it may have.
#[test]
fn kill9_recovery_records_lost_only_for_tasks_that_had_started() {
    let env = setup(
        r#"
[queues.q]
shell = '''
touch "$D/started-$TASKD_ARG_n"
if [ -e "$D/go" ]; then exit 0; fi
sleep 30
'''
"#,
    );
    // Enqueued before the daemon starts: it finds a backlog.
    let ids: Vec<String> = (1..=3)
        .map(|n| submit(&env, "q", &json!({ "n": n })))
        .collect();
    let d = env.daemon();
    assert!(poll(secs(10), || env.path().join("started-1").exists()));
    d.kill9();
    std::fs::write(env.path().join("go"), "").unwrap();
    let _d = env.daemon();
    for id in &ids {
        env.wait_state(id, "succeeded", secs(15));
    }
    let v = env.show(&ids[0]);
    assert_eq!(history(&v)[0]["reason"], "lost", "{v:#}");
    for (n, id) in ids.iter().enumerate().skip(1) {
        let v = env.show(id);
        let reasons: Vec<&str> = history(&v)
            .iter()
            .map(|a| a["reason"].as_str().unwrap_or("?"))
            .collect();
        assert_eq!(
            reasons,
            vec!["exit"],
            "task {} never ran before the crash, yet its history is {reasons:?}",
            n + 1
        );
    }
}

/// The result file of a run the crash cut short is removed by the next start, before any
/// task runs; the run's task runs again and returns its result through a new file.
#[test]
fn kill9_leaves_no_result_file_behind_after_the_restart() {
    let env = setup(
        r#"
[queues.q]
shell = '''
echo "$TASKD_RESULT_FILE" >> "$D/paths"
echo '"half"' > "$TASKD_RESULT_FILE"
if [ -e "$D/go" ]; then echo '"whole"' > "$TASKD_RESULT_FILE"; exit 0; fi
sleep 30
'''
"#,
    );
    let id = submit(&env, "q", &json!({}));
    let d = env.daemon();
    let first = wait_line(&env.path().join("paths"), secs(10));
    let first = Path::new(&first).to_path_buf();
    assert!(poll(secs(10), || std::fs::read(&first)
        .is_ok_and(|b| b == b"\"half\"\n")));
    let pid = d.pid();
    d.kill9();
    // The task's processes outlive their daemon (killed by the next one) and so does its file.
    assert!(!alive(pid) && first.exists());
    std::fs::write(env.path().join("go"), "").unwrap();
    let _d = env.daemon();
    let v = env.wait_state(&id, "succeeded", secs(15));
    assert!(
        !first.exists(),
        "the crashed run's result file is still there"
    );
    assert_eq!(v["result"], "whole", "{v:#}");
    let paths = std::fs::read_to_string(env.path().join("paths")).unwrap();
    assert_eq!(paths.lines().count(), 2, "{paths}");
    let results = env.path().join("state/results");
    // Where the files are on a tmpfs, the crashed daemon's directory there went with them;
    // the new one has a fresh name.
    let first_root = first.parent().and_then(Path::parent).unwrap();
    let root = std::fs::read_link(&results).unwrap_or(results.clone());
    assert!(
        first_root == root || !first_root.exists(),
        "the crashed daemon's directory {} is still there",
        first_root.display()
    );
    // The second run's file goes once it has been read, in the background: soon after.
    assert!(
        poll(secs(10), || walk(&results).is_empty()),
        "files left in {}: {:?}",
        results.display(),
        walk(&results)
    );
}

/// Where `/dev/shm` is a tmpfs (and the state directory is not) the result files go to a
/// directory there, which `state/results` names; a daemon that stops removes both, so that
/// nothing of it stays in memory after its state directory is gone.
#[test]
fn a_stopped_daemon_leaves_no_result_directory_behind() {
    let env = setup(
        r#"
[queues.q]
shell = 'echo "$TASKD_RESULT_FILE" > "$D/path"; echo 7 > "$TASKD_RESULT_FILE"'
"#,
    );
    let d = env.daemon();
    let id = submit(&env, "q", &json!({}));
    let v = env.wait_state(&id, "succeeded", secs(15));
    assert_eq!(v["result"], 7, "{v:#}");
    let link = env.path().join("state/results");
    let file = std::fs::read_to_string(env.path().join("path")).unwrap();
    let root = Path::new(file.trim())
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    match std::fs::read_link(&link) {
        Ok(target) => {
            assert_eq!(target, root);
            assert!(root.starts_with("/dev/shm"), "{}", root.display());
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&root).unwrap().permissions(),
            );
            assert_eq!(mode & 0o7777, 0o711, "the daemon's, searchable only");
        }
        Err(_) => {
            // The tmpfs half of this test cannot run; the fallback is still checked.
            common::skip::skip(
                "no tmpfs at /dev/shm here (the result files were in the state directory)",
                "mount a tmpfs at /dev/shm",
            );
            assert_eq!(root, link);
        }
    }
    d.signal(common::SIGTERM);
    assert_eq!(d.wait_exit(secs(20)), Some(0));
    assert!(!root.exists(), "{} outlived its daemon", root.display());
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "state/results is gone"
    );
}

/// Every file (not directory) under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Lines of a file (0 if it does not exist).
fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn five_hundred_tasks_survive_twenty_kill9_restart_cycles() {
    const TOTAL: usize = 500;
    const CYCLES: usize = 20;
    const LATE: usize = 5; // submitted while the daemon is down, per cycle
    let started = Instant::now();
    let env = setup(
        r#"
[queues.w]
concurrency = 4
max_attempts = 3
# A recovered task is claimed first after the restart, and may be cut short again and
# again: this test is about every task ending done, not about `max_lost`.
max_lost = 1000
shell = 'echo "$TASKD_TASK_ID" >> "$D/done"; sleep 0.05'
"#,
    );
    let done = env.path().join("done");
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("random seed {seed}");
    let mut rand = move |lo: usize, hi: usize| {
        // xorshift64
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        lo + (seed % (hi - lo + 1) as u64) as usize
    };

    let mut ids = submit_batch(&env, "w", TOTAL - CYCLES * LATE);
    let mut kills = 0;
    let mut instant_kills = 0;
    for cycle in 0..CYCLES {
        if rand(0, 3) == 0 {
            // Sometimes also kill a daemon as soon as it is ready: mid-recovery or mid-claim.
            env.daemon().kill9();
            instant_kills += 1;
        }
        let d = env.daemon();
        let base = lines(&done);
        let want = rand(1, 20);
        let progressed = poll(secs(30), || lines(&done) >= base + want);
        assert!(
            progressed,
            "cycle {cycle}: no progress after a restart:\n{}",
            d.log_text()
        );
        d.kill9();
        kills += 1;
        ids.extend(submit_batch(&env, "w", LATE));
    }
    assert_eq!(ids.len(), TOTAL);
    let after_kills = lines(&done);

    let d = env.daemon();
    let ok = poll(secs(60), || env.count("w", "succeeded") == TOTAL as u64);
    assert!(
        ok,
        "not all {TOTAL} tasks succeeded after {kills} kill -9 cycles: {}\n{}",
        counts(&env, "w"),
        d.log_text()
    );
    let c = counts(&env, "w");
    for state in [
        "scheduled",
        "queued",
        "running",
        "retrying",
        "failed",
        "cancelled",
    ] {
        assert_eq!(c[state], 0, "{state}: {c}");
    }

    let text = std::fs::read_to_string(&done).unwrap();
    let mut runs: HashMap<&str, usize> = HashMap::new();
    for line in text.lines() {
        *runs.entry(line.trim()).or_default() += 1;
    }
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !runs.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} task ids never reached the file, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let known: HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert!(
        runs.keys().all(|id| known.contains(id)),
        "the file holds ids that were never submitted"
    );

    // No lost run was charged: every task succeeded on its first charged attempt.
    let list: Value =
        serde_json::from_str(&env.ok(&["tasks", "--queue", "w", "--limit", "1000", "--json"]))
            .unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), TOTAL);
    let charged: Vec<&Value> = list.iter().filter(|t| t["attempts"] != 1).collect();
    assert!(
        charged.is_empty(),
        "{} tasks were charged more than one attempt, e.g. {:#}",
        charged.len(),
        charged[0]
    );

    // Tasks that ran twice were recovered as `lost`, never retried as failures.
    let twice: Vec<&str> = runs
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(id, _)| *id)
        .collect();
    eprintln!(
        "{kills} kill -9 cycles after progress (+{instant_kills} right after start); {after_kills} runs started before the last restart; {} runs in all for {TOTAL} tasks; \
         {} tasks ran more than once; took {:.1?}",
        text.lines().count(),
        twice.len(),
        started.elapsed()
    );
    assert!(
        !twice.is_empty(),
        "no kill landed while a task ran: the test proved nothing"
    );
    for id in twice.iter().take(15) {
        let v = env.show(id);
        let reasons: Vec<&str> = history(&v)
            .iter()
            .map(|a| a["reason"].as_str().unwrap_or("?"))
            .collect();
        assert!(
            reasons.contains(&"lost"),
            "task {id} ran {} times without a lost attempt: {reasons:?}",
            runs[id]
        );
        assert!(
            reasons.iter().all(|r| *r == "lost" || *r == "exit"),
            "task {id}: {reasons:?}"
        );
        assert_eq!(*reasons.last().unwrap(), "exit");
    }
}

/// `max_lost`: a task whose daemon dies under it each time fails `lost` past the limit,
/// instead of being queued again for ever (it is the likely cause of the deaths).
#[test]
fn a_task_lost_more_than_max_lost_times_fails_with_reason_lost() {
    let env = setup(
        r#"
[queues.poison]
max_lost = 2
shell = 'echo "$TASKD_ATTEMPT" >> "$D/runs"; sleep 30'
"#,
    );
    let runs = env.path().join("runs");
    let id = submit(&env, "poison", &json!({}));
    for n in 1..=3usize {
        let d = env.daemon();
        // This run started (its line), the store says so, and the previous runs are
        // already recorded as lost (the restart's recovery is done).
        let mut last = Value::Null;
        let ok = poll(secs(30), || {
            let started = std::fs::read_to_string(&runs)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            last = env.show(&id);
            started == n && last["state"] == "running" && history(&last).len() == n - 1
        });
        assert!(ok, "run {n} did not start: {last:#}\n{}", d.log_text());
        d.kill9();
    }
    // The third loss is one more than max_lost: the next start fails the task.
    let d = env.daemon();
    let v = env.wait_state(&id, "failed", secs(30));
    assert_eq!(v["lost"], 3, "{v:#}");
    let reasons: Vec<&str> = history(&v)
        .iter()
        .map(|a| a["reason"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(reasons, ["lost", "lost", "lost"]);
    assert_eq!(v["attempts"], 0, "lost runs are not charged");
    let error = v["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("lost 3 times") && error.contains("max_lost = 2"),
        "{error}"
    );
    let shown = env.ok(&["show", &id]);
    assert!(shown.contains("state     failed"), "{shown}");
    assert!(
        shown.contains("lost      3 runs (the daemon or node running it died"),
        "{shown}"
    );
    assert!(
        d.log_text()
            .contains("its runs were lost more often than max_lost"),
        "the daemon says why:\n{}",
        d.log_text()
    );
    // Not run again.
    assert_eq!(counts(&env, "poison")["running"], 0);
    assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 3);
}

/// `max_crashes`: a long-lived worker that dies on the same task fails it at the limit,
/// attempts left or not.
#[test]
fn a_task_its_worker_dies_on_max_crashes_times_fails() {
    let env = setup(
        r#"
[queues.w]
max_attempts = 10
max_crashes = 2
start_secs = "0s"
worker = ["sh", "-c", "echo '{\"type\":\"ready\",\"protocol\":1}' >&4; while read -r l <&3; do echo took >> \"$D/took\"; exit 3; done"]
"#,
    );
    let id = submit(&env, "w", &json!({}));
    let d = env.daemon();
    let v = env.wait_state(&id, "failed", secs(40));
    assert_eq!(v["crashes"], 2, "{v:#}");
    let h = history(&v);
    assert_eq!(h.len(), 2, "{v:#}");
    assert!(h.iter().all(|a| a["reason"] == "crash"), "{v:#}");
    let error = h[1]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("died while running the task")
            && error.contains("died running this task 2 times (max_crashes = 2)"),
        "{error}"
    );
    assert_eq!(v["attempts"], 2, "8 attempts were left");
    let shown = env.ok(&["show", &id]);
    assert!(
        shown.contains("crashes   2 (its worker died running it"),
        "{shown}"
    );
    let took = std::fs::read_to_string(env.path().join("took")).unwrap_or_default();
    assert_eq!(took.lines().count(), 2, "{}", d.log_text());
}
