//! Containment with the real binary and the machine's real cgroup hierarchies: a task that
//! starts a grandchild in a session of its own (`setsid`) and another through a double
//! fork, each with an empty environment (so that nothing but the task's cgroup can find
//! them), then sleeps. On timeout, on cancel, on the daemon's shutdown and after a kill -9
//! of the daemon and its restart, none of them survives. Skipped, visibly, where no cgroup
//! hierarchy is writable (the daemon then falls back to process groups and says so).

mod common;

use std::path::{Path, PathBuf};

use common::{alive, poll, secs, Env};

/// The task: records its own pid, a `setsid` grandchild's and a double-forked one's in
/// `$D/<task id>.pids`, then sleeps. The grandchildren get `env -i`: no `TASKD_TASK_ID`
/// for crash recovery's environment scan to find, and neither is in the task's group.
const ESCAPING: &str = r#"
f="$D/$TASKD_TASK_ID"
setsid env -i sh -c 'echo $$ > "$0.setsid"; exec sleep 300' "$f" &
( env -i sh -c 'echo $$ > "$0.fork"; exec sleep 300' "$f" & ) &
echo $$ > "$f.leader"
sleep 300
"#;

fn setup(queues: &str) -> Env {
    let env = Env::raw("");
    let d = env.path().display().to_string();
    let text = format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"1s\"\n\n\
         [defaults]\nkill_grace = \"500ms\"\nmax_attempts = 1\nenv = {{ D = '{d}' }}\n\n{queues}\n"
    );
    std::fs::write(&env.config, text).unwrap();
    env
}

fn escaping_queue(name: &str, timeout: &str) -> String {
    format!("[queues.{name}]\nshell = '''{ESCAPING}'''\ntimeout = \"{timeout}\"\n")
}

/// The daemon's subtree, or `None` after a visible skip when it runs without cgroups.
fn subtree(daemon: &common::Daemon) -> Option<PathBuf> {
    let log = daemon.log_text();
    match common::cgroups::subtree_from_log(&log) {
        Some(t) => Some(t),
        None => {
            let why = log
                .lines()
                .find(|l| l.contains("containment:"))
                .unwrap_or("the daemon logged no containment line")
                .to_string();
            common::skip::skip(
                &format!("no writable cgroup hierarchy here: {why}"),
                "run as root on a machine with a cgroup v2 hierarchy, or set cgroup_root",
            );
            None
        }
    }
}

/// The three pids a task wrote (leader, setsid grandchild, double-forked grandchild).
fn task_pids(env: &Env, id: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let ok = poll(secs(15), || {
        pids = ["leader", "setsid", "fork"]
            .iter()
            .filter_map(|k| {
                let p = env.path().join(format!("{id}.{k}"));
                std::fs::read_to_string(p).ok()?.trim().parse().ok()
            })
            .collect();
        pids.len() == 3
    });
    assert!(ok, "task {id} did not start its three processes: {pids:?}");
    pids
}

/// Polls until none of `pids` is alive; panics naming the survivors.
fn assert_all_gone(pids: &[i32], what: &str) {
    let ok = poll(secs(10), || pids.iter().all(|&p| !alive(p)));
    let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(ok, "{what}: processes survived their task: {left:?}");
}

/// Before anything: the grandchildren really escaped the task's process group and session
/// (otherwise this test would prove nothing a process group does not already do).
fn assert_escaped(pids: &[i32]) {
    let sid = |pid: i32| -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let close = stat.rfind(')')?;
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        Some(format!("pgrp {} session {}", f.get(2)?, f.get(3)?))
    };
    let leader = sid(pids[0]);
    assert_ne!(sid(pids[1]), leader, "the setsid grandchild left the group");
    assert!(alive(pids[2]), "the double-forked grandchild runs");
}

fn cgroups_in(tree: &Path) -> Vec<PathBuf> {
    common::cgroups::all_trees(tree)
        .iter()
        .flat_map(|t| std::fs::read_dir(t).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Processes still in the subtree's cgroups, as `cgroup: pid`.
fn processes_in(tree: &Path) -> Vec<String> {
    cgroups_in(tree)
        .iter()
        .flat_map(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .map(|p| format!("{}: {p}", d.display()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The v2 cgroup of process `pid` (`/…/taskd-<key>/task-<queue>-<n>`), if it is alive.
fn cgroup_of(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

/// The directory in `tree` of a task's cgroup as `/proc/PID/cgroup` names it, after
/// checking that it is one of the subtree's.
fn dir_in(tree: &Path, cgroup: &str) -> PathBuf {
    let (parent, name) = cgroup.rsplit_once('/').expect("a cgroup path");
    assert!(
        parent.ends_with(&format!("/{}", tree.file_name().unwrap().to_string_lossy())),
        "{cgroup} is not in the daemon's subtree {}",
        tree.display()
    );
    tree.join(name)
}

#[test]
fn a_timeout_and_a_cancel_end_every_process_of_the_task() {
    let env = setup(&format!(
        "{}{}",
        escaping_queue("slow", "2s"),
        escaping_queue("held", "1h")
    ));
    let daemon = env.daemon();
    let Some(tree) = subtree(&daemon) else { return };
    let status = env.ok(&["status"]);
    assert!(
        status.contains("containment: a cgroup per task under "),
        "taskd status does not say how tasks are contained:\n{status}"
    );

    let timed = env.submit("slow", "{}");
    let cancelled = env.submit("held", "{}");
    let timed_pids = task_pids(&env, &timed);
    let cancelled_pids = task_pids(&env, &cancelled);
    assert_escaped(&timed_pids);
    assert_escaped(&cancelled_pids);
    let timed_cg = cgroup_of(timed_pids[0]).expect("the task runs");
    let cancelled_cg = cgroup_of(cancelled_pids[0]).expect("the task runs");
    assert_ne!(timed_cg, cancelled_cg, "two running tasks share a cgroup");
    for (cg, queue, pids) in [
        (&timed_cg, "slow", &timed_pids),
        (&cancelled_cg, "held", &cancelled_pids),
    ] {
        let dir = dir_in(&tree, cg);
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            dir.is_dir() && name == format!("task-{queue}-0"),
            "the running task of {queue} has no cgroup task-{queue}-0 of its own: {cg}"
        );
        // The grandchildren that left the task's group are still in its cgroup.
        for &pid in pids.iter() {
            assert_eq!(cgroup_of(pid).as_deref(), Some(cg.as_str()));
        }
    }

    env.ok(&["cancel", &cancelled]);
    env.wait_state(&cancelled, "cancelled", secs(15));
    assert_all_gone(&cancelled_pids, "cancel");

    let shown = env.wait_state(&timed, "failed", secs(20));
    assert_eq!(common::history(&shown)[0]["reason"], "timeout", "{shown:#}");
    assert_all_gone(&timed_pids, "timeout");

    // Each task's cgroup is empty once it ended (kept for the queue's next task).
    assert!(
        poll(secs(5), || processes_in(&tree).is_empty()),
        "processes left in the task cgroups: {:?}",
        processes_in(&tree)
    );
    daemon.signal(common::SIGTERM);
    assert_eq!(daemon.wait_exit(secs(20)), Some(0));
    assert!(
        !tree.exists(),
        "the daemon's subtree {} outlived its clean exit",
        tree.display()
    );
}

#[test]
fn a_shutdown_ends_every_process_of_an_interrupted_task() {
    let env = setup(&escaping_queue("q", "1h"));
    let daemon = env.daemon();
    let Some(tree) = subtree(&daemon) else { return };
    let id = env.submit("q", "{}");
    let pids = task_pids(&env, &id);
    assert_escaped(&pids);
    daemon.signal(common::SIGTERM);
    assert_eq!(daemon.wait_exit(secs(20)), Some(0));
    assert_all_gone(&pids, "shutdown");
    assert!(!tree.exists(), "the subtree outlived the daemon's exit");
}

#[test]
fn after_a_kill_9_the_next_daemon_ends_what_the_tasks_left_running() {
    let env = setup(&escaping_queue("q", "1h"));
    let daemon = env.daemon();
    let Some(tree) = subtree(&daemon) else { return };
    let id = env.submit("q", "{}");
    let pids = task_pids(&env, &id);
    assert_escaped(&pids);
    daemon.kill9();
    // The task and both grandchildren outlive the daemon: nothing else kills them.
    assert!(
        pids.iter().all(|&p| alive(p)),
        "a process died with the daemon"
    );
    let cg = cgroup_of(pids[0]).expect("the task outlived the daemon");
    assert!(dir_in(&tree, &cg).is_dir());

    let daemon = env.daemon();
    assert_all_gone(&pids, "crash recovery");
    assert!(
        daemon
            .log_text()
            .contains("a previous daemon left running in its cgroups"),
        "the restart does not say it killed leftovers:\n{}",
        daemon.log_text()
    );
    // The task was put back and runs again, in a fresh cgroup.
    let again = env.wait_state(&id, "running", secs(15));
    assert_eq!(common::history(&again)[0]["reason"], "lost", "{again:#}");
    daemon.signal(common::SIGTERM);
    assert_eq!(daemon.wait_exit(secs(20)), Some(0));
    assert!(!tree.exists(), "the subtree outlived the daemon's exit");
}

/// A config whose `[taskd]` table also listens on a free port (for `/metrics`).
fn setup_with_api(queues: &str) -> Env {
    let env = Env::raw("");
    let d = env.path().display().to_string();
    let text = format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"1s\"\nlisten = \"127.0.0.1:0\"\n\n\
         [defaults]\nkill_grace = \"500ms\"\nmax_attempts = 1\nenv = {{ D = '{d}' }}\n\n{queues}\n"
    );
    std::fs::write(&env.config, text).unwrap();
    env
}

/// Python forks children until the kernel refuses one, prints how many it got, and exits:
/// the children (each sleeping) are left for the end of the task to kill.
const FORKER: &str = r#"
import os, time
n = 0
for i in range(200):
    try:
        pid = os.fork()
    except OSError as e:
        print("fork refused: errno", e.errno, flush=True)
        break
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    n += 1
    with open(os.environ["D"] + "/" + os.environ["TASKD_TASK_ID"] + ".children", "a") as f:
        f.write(str(pid) + "\n")
print("forked", n, flush=True)
"#;

#[test]
fn a_fork_bomb_stays_inside_pids_max() {
    let env = setup(&format!(
        "[queues.bomb]\ncommand = [\"python3\", \"-c\", '''{FORKER}''']\npids_max = 16\n"
    ));
    let daemon = env.daemon();
    let Some(_tree) = subtree(&daemon) else {
        return;
    };
    let id = env.submit("bomb", "{}");
    let shown = env.wait_state(&id, "succeeded", secs(30));
    let out = common::history(&shown)[0]["stdout_tail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        out.contains("fork refused: errno 11"),
        "the 17th process was not refused (EAGAIN):\n{out}"
    );
    let forked: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("forked "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in:\n{out}"));
    // pids_max counts the task's own process (and its threads) too.
    assert!(
        (1..16).contains(&forked),
        "forked {forked} children under pids_max = 16"
    );
    // The children outlived their parent's exit only until the task's end killed its cgroup.
    let children: Vec<i32> = std::fs::read_to_string(env.path().join(format!("{id}.children")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(children.len(), forked);
    assert_all_gone(&children, "the end of a task");
}

#[test]
fn a_task_past_memory_max_ends_with_reason_oom() {
    let env = setup_with_api(
        "[queues.hog]\ncommand = [\"python3\", \"-c\", \"b = b'x' * (256 << 20); print(len(b))\"]\nmemory_max = \"32MiB\"\n\n\
         [queues.small]\ncommand = [\"python3\", \"-c\", \"b = b'x' * (8 << 20); print(len(b))\"]\nmemory_max = \"64MiB\"\n",
    );
    let daemon = env.daemon();
    let Some(_tree) = subtree(&daemon) else {
        return;
    };
    let hog = env.submit("hog", "{}");
    let small = env.submit("small", "{}");

    let shown = env.wait_state(&hog, "failed", secs(30));
    let a = &common::history(&shown)[0];
    assert_eq!(a["reason"], "oom", "{shown:#}");
    assert!(
        a["error"]
            .as_str()
            .is_some_and(|e| e.contains("OOM killer") && e.contains("memory_max 32MiB")),
        "{shown:#}"
    );
    let peak = a["memory_peak"].as_u64().expect("a peak memory");
    assert!(
        peak <= 33 << 20,
        "peak {peak} above memory_max: the limit did not hold"
    );

    // A task under its limit runs as ever, and its use is shown.
    let ok = env.wait_state(&small, "succeeded", secs(30));
    let a = &common::history(&ok)[0];
    let peak = a["memory_peak"].as_u64().expect("a peak memory");
    assert!(peak >= 8 << 20, "peak {peak} below what the task allocated");
    assert!(a["cpu_usec"].as_u64().is_some_and(|c| c > 0), "{ok:#}");

    // What people read: `taskd show`'s line, and the metric.
    let text = env.ok(&["show", &hog]);
    assert!(
        text.contains("— oom"),
        "show does not give the reason:\n{text}"
    );
    assert!(
        text.contains("used: peak memory ") && text.contains(" MiB, CPU "),
        "show does not give the attempt's use:\n{text}"
    );
    let metrics = ureq::get(&format!("{}/metrics", daemon.api_base()))
        .timeout(secs(20))
        .call()
        .expect("GET /metrics")
        .into_string()
        .expect("a body");
    assert!(
        metrics.contains("taskd_tasks_oom_killed_total{queue=\"hog\"} 1"),
        "the OOM kill is not counted:\n{metrics}"
    );
}

#[test]
fn limits_are_refused_where_cgroups_are_not_available() {
    // A cgroup_root outside any cgroup hierarchy: check names the file, line, key and why.
    let env = Env::raw(
        "[taskd]\nstate_dir = \"state\"\ncgroup_root = \"/tmp\"\n\n[queues.q]\nshell = \"true\"\n",
    );
    let out = env.run(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("taskd.toml:3:15") && err.contains("taskd.cgroup_root"),
        "{err}"
    );
    assert!(err.contains("not in a cgroup v2 hierarchy"), "{err}");

    // A daemon user that may not create cgroups (not root): memory_max is an error that
    // names the key and why, never a limit silently not applied.
    if !nix::unistd::geteuid().is_root() {
        common::skip::skip(
            "the second half plays a user that may not create cgroups, which needs root to switch to `nobody`",
            "run the tests as root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = dir.path().join("taskd.toml");
    std::fs::write(
        &config,
        "[taskd]\nstate_dir = \"/tmp\"\n\n[queues.q]\nshell = \"true\"\nmemory_max = \"64MiB\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let bin = common::bin_for_others(dir.path());
    let out = std::os::unix::process::CommandExt::uid(
        std::process::Command::new(&bin)
            .args(["check", "-c"])
            .arg(&config),
        65534,
    )
    .env_remove("TASKD_CONFIG")
    .output()
    .expect("run taskd check as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("taskd.toml:6:14")
            && err.contains("queues.q.memory_max")
            && err.contains("needs a cgroup per task"),
        "{err}"
    );
}

/// The task of `reuse`: by its payload's role, the first starts a child in a session of its
/// own that outlives it (unless its end kills it), uses 64 MiB and some CPU; the second
/// says whether that child was still there when it began. Each writes its cgroup, then
/// waits for the test's go-ahead (`$D/<id>.go`).
const REUSING: &str = r#"
f="$D/$TASKD_TASK_ID"
if [ "$TASKD_ARG_role" = first ]; then
  setsid env -i sh -c 'echo $$ > "$0.tmp"; mv "$0.tmp" "$0"; exec sleep 300' "$D/child" &
  i=0; while [ ! -s "$D/child" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
  python3 -c "b = b'x' * (64 << 20)"
  i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done
else
  c=$(cat "$D/child")
  s=$(sed 's/.*) \(.\) .*/\1/' "/proc/$c/stat" 2>/dev/null)
  echo "${s:-gone}" > "$f.child"
fi
grep '^0::' /proc/self/cgroup | cut -d: -f3- > "$f.cg.tmp"; mv "$f.cg.tmp" "$f.cg"
i=0; while [ ! -e "$f.go" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done
"#;

#[test]
fn a_queue_slot_reuses_its_cgroup_once_the_last_task_left_nothing_in_it() {
    use std::os::unix::fs::MetadataExt;
    let env = setup(&format!(
        "[queues.one]\nshell = '''{REUSING}'''\nconcurrency = 1\ntimeout = \"1m\"\n"
    ));
    let daemon = env.daemon();
    let Some(tree) = subtree(&daemon) else { return };
    let first = env.submit("one", r#"{"role": "first"}"#);
    let second = env.submit("one", r#"{"role": "second"}"#);
    let cg_file = |id: &str| env.path().join(format!("{id}.cg"));

    let cg1 = common::wait_line(&cg_file(&first), secs(20));
    let dir = dir_in(&tree, &cg1);
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(name, "task-one-0", "the queue's only slot's cgroup");
    let inode = std::fs::metadata(&dir).expect("the cgroup exists").ino();
    let child: i32 = common::wait_line(&env.path().join("child"), secs(10))
        .parse()
        .expect("a pid");
    assert!(alive(child), "the first task's child runs");
    assert_eq!(cgroup_of(child).as_deref(), Some(cg1.as_str()));
    assert!(!cg_file(&second).exists(), "one slot: the second waits");
    std::fs::write(env.path().join(format!("{first}.go")), "").unwrap();
    env.wait_state(&first, "succeeded", secs(20));

    // The second task runs in the very same cgroup (same directory, same inode), and the
    // first one's child was gone before it began.
    let cg2 = common::wait_line(&cg_file(&second), secs(20));
    assert_eq!(cg2, cg1, "the second task got another cgroup");
    assert_eq!(
        std::fs::metadata(&dir).expect("the cgroup exists").ino(),
        inode,
        "{name} was made again, not reused"
    );
    let state = common::wait_line(&env.path().join(format!("{second}.child")), secs(5));
    assert!(
        state == "gone" || state == "Z",
        "the first task's child was still there (state {state}) when the next task got its cgroup"
    );
    assert!(!alive(child));
    let members = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    assert!(
        !members.lines().any(|p| p.trim() == child.to_string()),
        "the child is still a member: {members}"
    );
    std::fs::write(env.path().join(format!("{second}.go")), "").unwrap();
    let shown2 = env.wait_state(&second, "succeeded", secs(20));
    let shown1 = env.show(&first);

    // Each attempt shows its own use, not the cgroup's since it was made.
    let (a1, a2) = (&common::history(&shown1)[0], &common::history(&shown2)[0]);
    let cpu = |a: &serde_json::Value| a["cpu_usec"].as_u64().expect("CPU time counted");
    assert!(
        cpu(a2) < cpu(a1),
        "the second task's CPU time {} includes the first's {}",
        cpu(a2),
        cpu(a1)
    );
    if let (Some(p1), Some(p2)) = (a1["memory_peak"].as_u64(), a2["memory_peak"].as_u64()) {
        assert!(p1 >= 64 << 20, "the first task's peak {p1}");
        assert!(
            p2 < 32 << 20,
            "the second task's peak {p2} is the first one's: not reset"
        );
    }
    assert!(processes_in(&tree).is_empty(), "{:?}", processes_in(&tree));
    let trees = common::cgroups::all_trees(&tree);
    daemon.signal(common::SIGTERM);
    assert_eq!(daemon.wait_exit(secs(20)), Some(0));
    for t in trees {
        assert!(!t.exists(), "{} outlived the daemon's exit", t.display());
    }
    assert!(
        !tree.exists(),
        "the kept cgroups outlived the daemon's exit"
    );
}

/// A task whose program reads its own `/proc/self/cgroup` as its first act (`cat`): it is in
/// its slot's cgroup in every hierarchy the daemon puts it in (v2; v1 memory, and v1 pids
/// for `pids_max` where those are v1 controllers) — there before its program began, not
/// moved after — whether it started by the daemon's own spawn (`plain`) or by a fork with a
/// `pre_exec` hook (`hooked`: its umask needs one), and in a slot's kept cgroup as in a new
/// one (two tasks each, one slot).
#[test]
fn a_task_is_in_its_cgroup_from_its_first_instruction() {
    let env = setup(
        "[queues.plain]\ncommand = [\"cat\", \"/proc/self/cgroup\"]\nconcurrency = 1\npids_max = 64\n\n\
         [queues.hooked]\ncommand = [\"cat\", \"/proc/self/cgroup\"]\nconcurrency = 1\npids_max = 64\numask = \"077\"\n",
    );
    let daemon = env.daemon();
    let Some(tree) = subtree(&daemon) else { return };
    let key = tree.file_name().unwrap().to_string_lossy().into_owned();
    // The v1 hierarchies where the daemon has its subtree, and so puts its tasks.
    let v1: Vec<String> = common::cgroups::all_trees(&tree)[1..]
        .iter()
        .filter_map(|t| {
            let rest = t.strip_prefix("/sys/fs/cgroup").ok()?;
            let c = rest.components().next()?.as_os_str().to_string_lossy();
            ["memory", "pids"].contains(&&*c).then(|| c.into_owned())
        })
        .collect();
    for queue in ["plain", "hooked"] {
        for round in 0..2 {
            let id = env.submit(queue, "{}");
            let shown = env.wait_state(&id, "succeeded", secs(20));
            let out = common::history(&shown)[0]["stdout_tail"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let want = format!("/{key}/task-{queue}-0");
            let v2 = out.lines().find_map(|l| l.strip_prefix("0::"));
            assert!(
                v2.is_some_and(|p| p.ends_with(&want)),
                "{queue} task {round}: not in its v2 cgroup …{want} from its start:\n{out}"
            );
            for c in &v1 {
                let line = out.lines().find(|l| {
                    l.split(':')
                        .nth(1)
                        .is_some_and(|cs| cs.split(',').any(|x| x == c))
                });
                assert!(
                    line.is_some_and(|l| l.ends_with(&want)),
                    "{queue} task {round}: not in its v1 {c} cgroup …{want} from its start:\n{out}"
                );
            }
        }
    }
    assert!(processes_in(&tree).is_empty(), "{:?}", processes_in(&tree));
    daemon.signal(common::SIGTERM);
    assert_eq!(daemon.wait_exit(secs(20)), Some(0));
}
