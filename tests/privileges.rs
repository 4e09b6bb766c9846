//! Least privilege, through the real daemon: tasks run as the configured user with that
//! user's groups and identity, within their queue's limits and umask, with an environment
//! built from an allowlist, and with nothing of the daemon's own state: no inherited
//! descriptor, no raised open-files limit, no OOM-killer protection.
//!
//! Switching users needs root: every test that needs it is skipped, visibly, when the tests
//! do not run as root, and fails under `CI=true` (`common::skip`).

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::{alive, history, poll, Daemon, Env, BIN};

const DEADLINE: Duration = Duration::from_secs(30);

/// Held by every test that runs processes as `nobody`: RLIMIT_NPROC counts all of a user's
/// processes, so the fork-bomb test must not share `nobody` with the others.
static NOBODY: Mutex<()> = Mutex::new(());

fn nobody_lock() -> std::sync::MutexGuard<'static, ()> {
    NOBODY.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        common::skip::skip("needs root to switch users", "run the tests as root");
    }
    root
}

/// Makes the env's directory and config readable by other users (tempdirs are 0700).
fn world_readable(env: &Env) {
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// Starts the daemon through `sh -c "PRELUDE; exec LAUNCHER taskd -c CONFIG start"`, so that
/// the prelude and launcher can change what the daemon inherits (descriptors, limits,
/// oom_score_adj, groups).
fn daemon_via_sh(env: &Env, prelude: &str, launcher: &str) -> Daemon {
    let log = env.path().join("daemon-sh.log");
    let err = std::fs::File::create(&log).expect("daemon log");
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("{prelude}\nexec {launcher} \"$0\" -c \"$1\" start"))
        .arg(BIN)
        .arg(&env.config)
        .env_remove("TASKD_CONFIG")
        .env("RUST_LOG", "info,taskd=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    let d = Daemon {
        child: Some(cmd.spawn().expect("start sh")),
        log,
    };
    assert!(
        poll(Duration::from_secs(20), || d.log_text().contains("ready")
            || d.exited()),
        "daemon did not become ready:\n{}",
        d.log_text()
    );
    assert!(!d.exited(), "daemon exited at start:\n{}", d.log_text());
    d
}

/// Submits and waits for the task to end (succeeded or failed); returns its first attempt.
fn run_task(env: &Env, queue: &str, payload: &str) -> serde_json::Value {
    let id = env.submit(queue, payload);
    let mut last = serde_json::Value::Null;
    let done = poll(DEADLINE, || {
        last = env.show(&id);
        last["state"] == "succeeded" || last["state"] == "failed"
    });
    assert!(done, "task {id} on {queue} did not end:\n{last:#}");
    history(&last)[0].clone()
}

fn stdout(attempt: &serde_json::Value) -> String {
    attempt["stdout_tail"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn stderr(attempt: &serde_json::Value) -> String {
    attempt["stderr_tail"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// What the system database says, via `id`, run by the test (as root).
fn id_of(user: &str, flag: &str) -> String {
    let out = Command::new("id")
        .args([flag, user])
        .output()
        .expect("run id");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sorted_words(s: &str) -> BTreeSet<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn home_of(user: &str) -> String {
    let out = Command::new("getent")
        .args(["passwd", user])
        .output()
        .expect("run getent");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    line.split(':').nth(5).expect("passwd line").to_string()
}

/// The lines of `/proc/PID/limits` for one limit: (soft, hard).
fn proc_limit(pid: i32, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .expect("the limit is listed");
    let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
    (fields[0].to_string(), fields[1].to_string())
}

#[test]
fn a_task_runs_as_nobody_with_nobodys_groups_and_identity() {
    if !is_root() {
        return;
    }
    let _nobody = nobody_lock();
    let env = Env::new(
        r#"[queues.as-nobody]
shell = 'id -u; id -g; id -G; echo "$HOME|$USER|$LOGNAME|$PATH"'
user = "nobody"
max_attempts = 1
"#,
    );
    // The daemon has supplementary groups of its own (adm, 4) and root's identity variables:
    // the task must get nobody's groups and variables, none of the daemon's.
    let setpriv = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !setpriv {
        eprintln!("setpriv (util-linux) is missing: the daemon runs without extra groups");
    }
    let d = daemon_via_sh(
        &env,
        "export HOME=/root USER=root LOGNAME=root",
        if setpriv { "setpriv --groups 4 --" } else { "" },
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).expect("status");
    assert!(
        !setpriv
            || status
                .lines()
                .any(|l| l.starts_with("Groups:") && l.contains('4')),
        "the daemon runs with a supplementary group: {status}"
    );
    let a = run_task(&env, "as-nobody", "{}");
    assert_eq!(a["exit_code"], 0, "{a:#}");
    let out = stdout(&a);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[0], id_of("nobody", "-u"), "uid");
    assert_eq!(lines[1], id_of("nobody", "-g"), "gid");
    assert_eq!(
        sorted_words(lines[2]),
        sorted_words(&id_of("nobody", "-G")),
        "supplementary groups are nobody's, none of root's left behind"
    );
    assert_eq!(
        lines[3],
        format!(
            "{}|nobody|nobody|/usr/local/bin:/usr/bin:/bin",
            home_of("nobody")
        )
    );
}

#[test]
fn nobody_cannot_read_a_private_file_of_roots() {
    if !is_root() {
        return;
    }
    let _nobody = nobody_lock();
    let env = Env::new(
        r#"[queues.as-nobody]
command = ["/bin/cat", "{file}"]
user = "nobody"
max_attempts = 1

[queues.as-root]
command = ["/bin/cat", "{file}"]
max_attempts = 1
"#,
    );
    // The directory is open to all, so only the file's own mode keeps nobody out.
    world_readable(&env);
    let secret = env.path().join("secret");
    std::fs::write(&secret, "root only\n").expect("write secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let _d = env.daemon();
    let payload = serde_json::json!({ "file": secret }).to_string();

    let a = run_task(&env, "as-nobody", &payload);
    assert_ne!(a["exit_code"], 0, "{a:#}");
    assert!(a["exit_code"].is_i64(), "it ran and failed: {a:#}");
    assert!(
        stderr(&a).contains("Permission denied"),
        "stderr: {}",
        stderr(&a)
    );
    assert_eq!(stdout(&a), "");

    // The same task as root reads it: the difference is the user.
    let a = run_task(&env, "as-root", &payload);
    assert_eq!(a["exit_code"], 0, "{a:#}");
    assert_eq!(stdout(&a), "root only\n");
}

/// A task run as another user writes its result file: the file (0600) and its directory
/// (0700) are that user's; the directory above them is the daemon's, which the user may pass
/// through but not list, and the daemon's own tasks' directory stays closed to it. With the
/// files on the tmpfs the state directory stays closed; without, it gets the search bit for
/// others, nothing more. Its other files stay private.
#[test]
fn a_task_run_as_another_user_writes_its_result_file() {
    if !is_root() {
        return;
    }
    let _nobody = nobody_lock();
    let env = Env::new(
        r#"[queues.as-nobody]
shell = '''
f="$TASKD_RESULT_FILE"
stat -c '%a %U' "$f" "$(dirname "$f")"
root="$(dirname "$(dirname "$f")")"
ls "$root" >/dev/null 2>&1 && echo "listed the results" || echo "cannot list the results"
[ -x "$root/0" ] && echo "entered root's directory" || echo "cannot enter root's directory"
printf '{"who": "%s"}' "$(id -un)" > "$f"
'''
user = "nobody"
max_attempts = 1

[queues.as-root]
shell = 'echo 42 > "$TASKD_RESULT_FILE"'
max_attempts = 1
"#,
    );
    world_readable(&env);
    let _d = env.daemon();
    let id = env.submit("as-root", "{}");
    let v = env.wait_state(&id, "succeeded", DEADLINE);
    assert_eq!(v["result"], 42, "{v:#}");
    let id = env.submit("as-nobody", "{}");
    let v = env.wait_state(&id, "succeeded", DEADLINE);
    assert_eq!(v["result"], serde_json::json!({"who": "nobody"}), "{v:#}");
    assert_eq!(
        stdout(&history(&v)[0]),
        "600 nobody\n700 nobody\ncannot list the results\ncannot enter root's directory\n"
    );
    let state = env.path().join("state");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    match std::fs::read_link(state.join("results")) {
        // On the tmpfs: the user reaches its directory through `/dev/shm`, and the state
        // directory stays closed.
        Ok(root) => {
            assert!(root.starts_with("/dev/shm"), "{}", root.display());
            assert_eq!(mode(&root), 0o711);
            assert_eq!(
                mode(&state),
                0o700,
                "the state directory stays the daemon's"
            );
        }
        Err(_) => {
            assert_eq!(mode(&state), 0o701, "the search bit only, for others");
            assert_eq!(mode(&state.join("results")), 0o711);
        }
    }
    for private in ["taskd.db", "started.log"] {
        assert_eq!(
            mode(&state.join(private)) & 0o077,
            0,
            "{private} is the daemon's"
        );
    }
}

#[test]
fn nproc_stops_a_fork_bomb_without_harming_the_daemon() {
    if !is_root() {
        return;
    }
    let _nobody = nobody_lock();
    let env = Env::new(
        r#"[queues.bomb]
shell = 'for i in $(seq 100); do sleep 5 & echo "started $i"; done; wait'
user = "nobody"
limits = { nproc = 20 }
max_attempts = 1
timeout = "60s"

[queues.next]
shell = "echo alive"
"#,
    );
    let d = env.daemon();
    let a = run_task(&env, "bomb", "{}");
    let started = stdout(&a).lines().count();
    let err = stderr(&a);
    // The shell itself counts against nproc too, so fewer than 20 (never the 100 asked for).
    assert!(
        started < 20,
        "{started} background processes started under nproc = 20:\n{a:#}"
    );
    assert!(
        err.contains("Resource temporarily unavailable") || err.contains("Cannot fork"),
        "the task saw its forks fail: {err}"
    );
    assert_ne!(a["exit_code"], 0, "{a:#}");

    // The daemon (root, no limit of the task's) is fine and runs the next task.
    assert!(alive(d.pid()));
    let a = run_task(&env, "next", "{}");
    assert_eq!(stdout(&a), "alive\n", "{a:#}");
}

#[test]
fn umask_applies_to_files_the_task_creates() {
    let env = Env::new(
        r#"[queues.private]
shell = 'touch "$TASKD_ARG_path"'
umask = "077"

[queues.inherited]
shell = 'touch "$TASKD_ARG_path"'
"#,
    );
    let _d = env.daemon();
    let mode = |name: &str, queue: &str| {
        let path = env.path().join(name);
        let payload = serde_json::json!({ "path": path }).to_string();
        let a = run_task(&env, queue, &payload);
        assert_eq!(a["exit_code"], 0, "{a:#}");
        std::fs::metadata(&path)
            .expect("created")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("private", "private"), 0o600);
    // Without `umask`, the daemon's (this test's) applies.
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let own: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).expect("octal"))
        .expect("Umask line");
    assert_eq!(mode("inherited", "inherited"), 0o666 & !own);
}

#[test]
fn a_task_sees_no_descriptor_above_2_even_when_the_daemon_inherited_one() {
    let env = Env::new(
        r#"[queues.plain]
command = ["/bin/ls", "/proc/self/fd"]

[queues.with-umask]
command = ["/bin/ls", "/proc/self/fd"]
umask = "022"
log_dir = "logs"
"#,
    );
    // Soft open-files limit 1024: the plain queue then needs nothing before exec and takes
    // the posix_spawn path; the other one forks and runs a pre_exec hook.
    let d = daemon_via_sh(&env, "ulimit -Sn 1024\nexec 7</etc/hostname", "");
    let link = std::fs::read_link(format!("/proc/{}/fd/7", d.pid()));
    assert_eq!(
        link.ok().as_deref(),
        Some(std::path::Path::new("/etc/hostname")),
        "the daemon holds the inherited descriptor 7"
    );
    for queue in ["plain", "with-umask"] {
        let a = run_task(&env, queue, "{}");
        assert_eq!(a["exit_code"], 0, "{a:#}");
        let fds: Vec<String> = stdout(&a).split_whitespace().map(str::to_string).collect();
        // 3 is the directory ls opened to list the others.
        assert_eq!(fds, ["0", "1", "2", "3"], "queue {queue}");
    }
}

#[test]
fn the_environment_is_the_allowlist_env_inherit_env_and_taskd_variables() {
    let env = Env::new(
        r#"[queues.default]
command = ["/usr/bin/env"]

[queues.listed]
command = ["/usr/bin/env"]
env_inherit = ["PRIV_TEST_LISTED"]
env = { FROM_CONFIG = "yes" }
"#,
    );
    // A socket for the daemon's sd_notify messages, which must stay the daemon's.
    let notify = env.path().join("notify.sock");
    let _sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("bind notify socket");
    let notify = notify.display().to_string();
    let _d = env.daemon_with(&[
        ("PRIV_TEST_MARKER", "leaked"),
        ("PRIV_TEST_LISTED", "listed"),
        ("LANG", "C.UTF-8"),
        ("TZ", "UTC"),
        ("NOTIFY_SOCKET", &notify),
        ("WATCHDOG_USEC", "60000000"),
        ("LISTEN_FDS", "0"),
        ("LISTEN_PID", "1"),
        ("JOURNAL_STREAM", "0:0"),
    ]);
    let vars = |queue: &str| -> std::collections::BTreeMap<String, String> {
        let a = run_task(&env, queue, "{}");
        assert_eq!(a["exit_code"], 0, "{a:#}");
        stdout(&a)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    const ALLOWLIST: &[&str] = &[
        "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR",
    ];

    let got = vars("default");
    for name in got.keys() {
        assert!(
            ALLOWLIST.contains(&name.as_str()) || name.starts_with("TASKD_"),
            "{name} reached a task: {got:#?}"
        );
    }
    assert_eq!(got.get("LANG").map(String::as_str), Some("C.UTF-8"));
    assert_eq!(got.get("TZ").map(String::as_str), Some("UTC"));
    assert_eq!(got.get("TASKD_QUEUE").map(String::as_str), Some("default"));
    assert!(got.contains_key("TASKD_TASK_ID") && got.contains_key("PATH"));

    let got = vars("listed");
    assert_eq!(
        got.get("PRIV_TEST_LISTED").map(String::as_str),
        Some("listed")
    );
    assert_eq!(got.get("FROM_CONFIG").map(String::as_str), Some("yes"));
    for name in [
        "PRIV_TEST_MARKER",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "LISTEN_FDS",
        "LISTEN_PID",
        "JOURNAL_STREAM",
        "RUST_LOG",
    ] {
        assert!(!got.contains_key(name), "{name} reached a task: {got:#?}");
    }
}

#[test]
fn nofile_and_oom_score_adj_are_reset_in_every_task() {
    if !is_root() {
        return;
    }
    let _nobody = nobody_lock();
    let script = "ulimit -Sn; ulimit -Hn; cat /proc/self/oom_score_adj";
    let env = Env::new(&format!(
        r#"[queues.plain]
shell = "{script}"

[queues.own-nofile]
shell = "{script}"
limits = {{ nofile = 2048 }}

[queues.as-nobody]
shell = "{script}"
user = "nobody"

# Enough concurrency that the daemon needs more than 1024 descriptors itself.
[queues.wide]
concurrency = 200
shell = "{script}"
"#
    ));
    // A daemon that raised its open-files limit and is shielded from the OOM killer (a
    // positive score makes lowering it back a privileged act, done before the user switch).
    let d = daemon_via_sh(
        &env,
        "ulimit -n 4096\necho 500 > /proc/self/oom_score_adj",
        "",
    );
    // The daemon sizes its own soft limit to its queues (64, plus per task slot 8 and the
    // files its cgroup keeps open, none to 9 as the machine offers: 203 slots), so here it
    // stays above 1024 and every task needs the reset.
    let (soft, hard) = proc_limit(d.pid(), "Max open files");
    assert_eq!(hard, "4096");
    let soft: u64 = soft.parse().expect("a number");
    assert!(
        soft >= 64 && (soft - 64).is_multiple_of(203) && (8..=17).contains(&((soft - 64) / 203)),
        "soft limit {soft} is not 64 + (8 + 0..=9) × 203"
    );
    let own = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", d.pid())).expect("read");
    assert_eq!(own.trim(), "500");

    let lines = |queue: &str| {
        let a = run_task(&env, queue, "{}");
        assert_eq!(a["exit_code"], 0, "{a:#}");
        stdout(&a).lines().map(str::to_string).collect::<Vec<_>>()
    };
    assert_eq!(lines("plain"), ["1024", "4096", "0"], "hard limit kept");
    assert_eq!(lines("own-nofile"), ["2048", "2048", "0"]);
    assert_eq!(lines("as-nobody"), ["1024", "4096", "0"]);
}

#[test]
fn a_daemon_with_few_task_slots_lowers_its_own_nofile_so_tasks_inherit_1024() {
    if !is_root() {
        return;
    }
    let env = Env::new("[queues.plain]\nshell = \"ulimit -Sn; ulimit -Hn\"\n");
    let d = daemon_via_sh(&env, "ulimit -n 4096", "");
    assert_eq!(
        proc_limit(d.pid(), "Max open files"),
        ("1024".into(), "4096".into())
    );
    let a = run_task(&env, "plain", "{}");
    assert_eq!(
        stdout(&a).lines().collect::<Vec<_>>(),
        ["1024", "4096"],
        "{a:#}"
    );
}

#[test]
fn check_as_a_non_root_user_refuses_other_users() {
    if !is_root() {
        return;
    }
    let _nobody = nobody_lock();
    let check_as_nobody = |env: &Env| {
        world_readable(env);
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(common::bin_for_others(env.path()))
            .args(["check", "-c"])
            .arg(&env.config)
            .env_remove("TASKD_CONFIG")
            .output()
            .expect("run runuser")
    };

    let env = Env::raw("[queues.reports]\nshell = \"true\"\nuser = \"root\"\n");
    let out = check_as_nobody(&env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "stderr: {err}");
    let expected = format!("{}:3:8: error: queues.reports.user: ", env.config.display());
    assert!(
        err.contains(&expected),
        "names file, line, column and key: {err}"
    );
    assert!(err.contains("the daemon must run as root"), "{err}");
    assert!(err.contains("fix: "), "{err}");

    // Its own user is not a switch: a daemon running as nobody may run tasks as nobody.
    let env = Env::raw("[queues.reports]\nshell = \"true\"\nuser = \"nobody\"\n");
    let out = check_as_nobody(&env);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A producer running as another user than the store's owner (a web app under the shipped
/// unit) is told which file it may not use and what to do, with exit 3, instead of SQLite's
/// "unable to open database file"; one that may only read the store can still read it.
#[test]
fn a_producer_without_access_to_the_store_is_told_which_file_and_what_to_do() {
    if !is_root() {
        return;
    }
    let env = Env::new("[queues.q]\nshell = \"true\"\n");
    world_readable(&env);
    env.submit("q", "{}");
    let state = env.path().join("state");
    let db = state.join("taskd.db");
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(BIN)
            .arg("-c")
            .arg(&env.config)
            .args(args)
            .env_remove("TASKD_CONFIG")
            .output()
            .expect("run taskd through setpriv")
    };
    let chmod = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    for (what, setup, named, mode) in [
        (
            "a closed state directory",
            (0o750, 0o644),
            &state,
            "mode 0750",
        ),
        ("a private store", (0o755, 0o600), &db, "mode 0600"),
        ("a store it may only read", (0o755, 0o644), &db, "mode 0644"),
    ] {
        chmod(&state, setup.0);
        for f in ["taskd.db", "taskd.db-wal", "taskd.db-shm"] {
            if state.join(f).exists() {
                chmod(&state.join(f), setup.1);
            }
        }
        let out = as_nobody(&["submit", "q", "{}"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{what}: {err}");
        for part in [
            format!("permission denied on {} (", named.display()),
            mode.to_string(),
            "user nobody".to_string(),
            "taskd submit --server".to_string(),
            "docs/systemd.md".to_string(),
        ] {
            assert!(
                err.contains(&part),
                "{what}: the message lacks {part:?}:\n{err}"
            );
        }
        assert!(
            !err.contains("unable to open database file"),
            "{what}: {err}"
        );
    }
    // Reading needs only read access.
    let out = as_nobody(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
