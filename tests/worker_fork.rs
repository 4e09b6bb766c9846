//! `worker_fork = true` under a real daemon with the real Python library: one loaded parent
//! forks the queue's workers. Its children serve tasks and share its memory (PSS from
//! `/proc/PID/smaps_rollup`), a killed child is replaced by a new fork of the same parent, a
//! timeout kills only that child, the parent's death leaves running tasks to finish and the
//! next worker forks from a new parent, and a program without support fails its start
//! saying so.

mod common;

use common::*;
use serde_json::Value;

/// An App worker. The module holds 24 MiB of written memory (what an application's imports
/// amount to), loaded once in the parent. `who` answers the worker's pid and parent pid;
/// `hang` sleeps; `block` writes its pid to `$D/block-N` and waits while `$D/block` exists.
const APP: &str = r#"
import os, time
import taskd

BALLAST = b"x" * (24 * 1024 * 1024)
app = taskd.App(queue="f")

@app.task
def who():
    return {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0)}

@app.task
def hang():
    time.sleep(60)

@app.task
def block(n):
    d = os.environ["D"]
    with open(os.path.join(d, "block-%d" % n), "w") as f:
        f.write("%d\n" % os.getpid())
    while os.path.exists(os.path.join(d, "block")):
        time.sleep(0.02)
    return n

if __name__ == "__main__":
    app.run()
"#;

fn fork_env(extra: &str) -> Env {
    let env = Env::new("");
    let d = env.path().display().to_string();
    env.rewrite(&format!(
        "[queues.f]\nworker = [\"python3\", \"{d}/app.py\"]\nworker_fork = true\n\
         start_secs = \"100ms\"\nkill_grace = \"1s\"\n\
         backoff = {{ kind = \"fixed\", base = \"1s\" }}\n\
         env = {{ D = '{d}', PYTHONPATH = '{}' }}\n{extra}\n",
        contrib("python").display()
    ));
    std::fs::write(env.path().join("app.py"), APP).unwrap();
    env
}

fn workers(env: &Env) -> Vec<Value> {
    let v: Value = serde_json::from_str(&env.ok(&["status", "--json"])).expect("JSON");
    v["workers"].as_array().cloned().unwrap_or_default()
}

/// The pids of the queue's RUNNING workers, once `n` of them are (and `also` holds).
fn running_pids(env: &Env, n: usize, also: impl Fn(&[i32]) -> bool) -> Vec<i32> {
    let mut pids = Vec::new();
    let ok = poll(secs(30), || {
        pids = workers(env)
            .iter()
            .filter(|w| w["state"] == "running")
            .filter_map(|w| w["pid"].as_i64().map(|p| p as i32))
            .collect();
        pids.len() == n && also(&pids)
    });
    assert!(ok, "{n} workers did not get RUNNING: {:#?}", workers(env));
    pids
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat`.
fn stat_field(pid: i32, n: usize) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.rfind(')')?;
    stat[close + 2..]
        .split_whitespace()
        .nth(n - 3)?
        .parse()
        .ok()
}

fn ppid(pid: i32) -> i32 {
    stat_field(pid, 4).expect("a live process") as i32
}

/// (Rss, Pss) in KiB from `/proc/PID/smaps_rollup`.
fn rss_pss(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    (field("Rss:"), field("Pss:"))
}

fn submit_call(env: &Env, call: &str) -> String {
    env.submit(
        "f",
        &format!(r#"{{"task":"{call}","args":[],"kwargs":{{}}}}"#),
    )
}

#[test]
fn the_children_of_one_parent_serve_the_tasks_and_share_its_memory() {
    let env = fork_env("concurrency = 3");
    let d = env.daemon();
    let pids = running_pids(&env, 3, |_| true);
    let parent = ppid(pids[0]);
    assert_ne!(
        parent,
        d.pid(),
        "the workers are forked, not spawned by the daemon"
    );
    for &p in &pids {
        assert_eq!(ppid(p), parent, "every worker is a child of the one parent");
        assert_eq!(
            stat_field(p, 5),
            Some(i64::from(p)),
            "each worker leads a process group of its own (setpgid)"
        );
    }
    assert_eq!(ppid(parent), d.pid(), "the parent is the daemon's child");

    // Where the daemon runs a cgroup per worker, each forked worker was moved into its own.
    let cgroup = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/cgroup"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            .unwrap_or_default()
    };
    if cgroup(parent).contains("/taskd-") {
        let mut seen = vec![cgroup(parent)];
        for &p in &pids {
            let cg = cgroup(p);
            assert!(cg.contains("/worker-f-"), "worker {p} is in {cg}");
            assert!(!seen.contains(&cg), "worker {p} shares {cg}: {seen:?}");
            seen.push(cg);
        }
    }

    let ids: Vec<String> = (0..9).map(|_| submit_call(&env, "who")).collect();
    for id in &ids {
        let v = env.wait_state(id, "succeeded", secs(30));
        let r = &v["result"];
        assert_eq!(r["ppid"], parent, "{v:#}");
        assert_eq!(r["pid"], r["pgid"], "{v:#}");
        assert!(
            pids.contains(&(r["pid"].as_i64().expect("pid") as i32)),
            "ran on one of the RUNNING workers {pids:?}: {v:#}"
        );
    }

    // The 24 MiB the parent loaded are shared: each child's proportional share of its
    // resident memory is well under what it maps.
    for &p in &pids {
        let (rss, pss) = rss_pss(p);
        assert!(
            rss > 24 * 1024,
            "worker {p}: Rss {rss} KiB holds the ballast"
        );
        assert!(
            pss * 2 < rss,
            "worker {p}: Pss {pss} KiB is not well under its Rss {rss} KiB: nothing shared"
        );
    }
    let total: u64 = pids.iter().chain([&parent]).map(|&p| rss_pss(p).1).sum();
    assert!(
        total < 3 * 24 * 1024,
        "parent and 3 workers hold {total} KiB PSS: less than three copies of the ballast"
    );
}

#[test]
fn a_killed_child_is_replaced_by_a_new_fork_and_a_timeout_kills_only_its_child() {
    let env = fork_env("concurrency = 2\ntimeout = \"1s\"\nmax_attempts = 1");
    let _d = env.daemon();
    let pids = running_pids(&env, 2, |_| true);
    let parent = ppid(pids[0]);

    // kill -9 of one worker: a new fork of the same parent takes its slot.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let now = running_pids(&env, 2, |p| !p.contains(&pids[0]));
    assert!(now.contains(&pids[1]), "the other worker stayed: {now:?}");
    let new = *now.iter().find(|p| **p != pids[1]).expect("a new worker");
    assert_eq!(ppid(new), parent, "forked from the same parent");

    // A task past its timeout: only its worker is killed.
    let id = submit_call(&env, "hang");
    let v = env.wait_state(&id, "failed", secs(30));
    assert_eq!(history(&v)[0]["reason"], "timeout", "{v:#}");
    let hung = history(&v)[0]["pid"].as_i64().expect("pid") as i32;
    let other = if hung == new { pids[1] } else { new };
    assert!(alive(other), "the other worker {other} is untouched");
    assert!(
        poll(secs(10), || !alive(hung)),
        "the timed-out worker {hung} is gone"
    );
    let after = running_pids(&env, 2, |p| !p.contains(&hung));
    assert!(after.contains(&other), "{after:?}");
    for p in after {
        assert_eq!(ppid(p), parent);
    }
    assert!(alive(parent));
}

#[test]
fn the_parents_death_leaves_running_tasks_to_finish_and_a_new_parent_forks_the_next() {
    let env = fork_env("concurrency = 2");
    let d = env.daemon();
    let pids = running_pids(&env, 2, |_| true);
    let parent = ppid(pids[0]);
    let gate = env.path().join("block");
    std::fs::write(&gate, "").unwrap();
    let blocked = env.submit("f", r#"{"task":"block","args":[1]}"#);
    let runner: i32 = wait_line(&env.path().join("block-1"), secs(30))
        .parse()
        .expect("a pid");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(parent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    assert!(poll(secs(10), || !alive(parent)), "the parent is gone");
    // Its children were re-parented to the daemon (a child subreaper) and keep serving.
    assert!(alive(runner));
    let other = *pids
        .iter()
        .find(|p| **p != runner)
        .expect("the idle worker");
    let id = submit_call(&env, "who");
    let v = env.wait_state(&id, "succeeded", secs(30));
    assert_eq!(v["result"]["pid"], other, "{v:#}");
    std::fs::remove_file(&gate).unwrap();
    let v = env.wait_state(&blocked, "succeeded", secs(30));
    assert_eq!(v["result"], 1, "{v:#}");
    assert_eq!(
        history(&v).len(),
        1,
        "the running task finished in its one attempt"
    );

    // The next worker comes from a new parent.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(other),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let now = running_pids(&env, 2, |p| !p.contains(&other));
    let new = *now.iter().find(|p| **p != runner).expect("a new worker");
    let new_parent = ppid(new);
    assert_ne!(new_parent, parent);
    assert_ne!(new_parent, d.pid(), "forked by a parent, not spawned");
    assert!(
        d.log_text().contains("worker parent ended"),
        "the log says the parent ended:\n{}",
        d.log_text()
    );
}

#[test]
fn a_program_without_support_fails_its_start_saying_so() {
    let env = Env::new("");
    let d = env.path().display().to_string();
    std::fs::write(
        env.path().join("old.py"),
        "import taskd_worker\n\n@taskd_worker.task\ndef handle(payload, job):\n    return 1\n\ntaskd_worker.run()\n",
    )
    .unwrap();
    env.rewrite(&format!(
        "[queues.old]\nworker = [\"python3\", \"{d}/old.py\"]\nworker_fork = true\nstart_retries = 1\n\
         env = {{ PYTHONPATH = '{}' }}\n",
        contrib("python").display()
    ));
    let _d = env.daemon();
    let mut last = Vec::new();
    let fatal = poll(secs(30), || {
        last = workers(&env);
        !last.is_empty() && last.iter().all(|w| w["state"] == "fatal")
    });
    assert!(fatal, "{last:#?}");
    let why = last[0]["why"].as_str().unwrap_or_default();
    assert!(
        why.contains("the program does not support worker_fork"),
        "{why}"
    );
    // The human table says it too.
    let table = env.ok(&["status"]);
    assert!(table.contains("does not support worker_fork"), "{table}");
}
