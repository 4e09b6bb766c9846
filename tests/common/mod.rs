//! Shared helpers for the integration tests: a temp directory with a config, the real
//! `taskd` binary, a daemon that is killed when the test ends, polling with a deadline.
#![allow(dead_code)]

pub mod browser;
pub mod cgroups;
pub mod skip;
pub mod table;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_taskd");

/// A temp directory with `taskd.toml` in it. State lives in `<dir>/state`.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Env {
    /// `queues` is TOML appended after a `[taskd]` table that puts state in the temp dir.
    pub fn new(queues: &str) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("taskd.toml");
        let text = format!("[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n\n{queues}\n");
        std::fs::write(&config, text).expect("write config");
        Env { dir, config }
    }

    /// A config file with exactly this text (no [taskd] table added).
    pub fn raw(text: &str) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("taskd.toml");
        std::fs::write(&config, text).expect("write config");
        Env { dir, config }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn rewrite(&self, queues: &str) {
        let text = format!("[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n\n{queues}\n");
        std::fs::write(&self.config, text).expect("rewrite config");
    }

    /// A `taskd` command with `-c` set to this env's config.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("-c").arg(&self.config).args(args);
        c.env_remove("TASKD_CONFIG");
        c
    }

    /// Run `taskd ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run taskd")
    }

    /// Run and insist on exit 0; return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "taskd {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Submit and return the task id.
    pub fn submit(&self, queue: &str, payload: &str) -> String {
        self.ok(&["submit", queue, payload]).trim().to_string()
    }

    /// `taskd show ID --json`.
    pub fn show(&self, id: &str) -> serde_json::Value {
        let s = self.ok(&["show", id, "--json"]);
        serde_json::from_str(&s).expect("show --json is JSON")
    }

    pub fn state(&self, id: &str) -> String {
        self.show(id)["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// `taskd status --json`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json is JSON")
    }

    /// Every task in `state` (`taskd tasks --state STATE --limit 0 --json`).
    pub fn tasks_in(&self, state: &str) -> Vec<serde_json::Value> {
        let list: serde_json::Value =
            serde_json::from_str(&self.ok(&["tasks", "--state", state, "--limit", "0", "--json"]))
                .expect("tasks --json is JSON");
        list.as_array().expect("a list").clone()
    }

    /// The ids of the tasks in `state` that `node` holds (a crash test's victim).
    pub fn held_by(&self, node: &str, state: &str) -> std::collections::BTreeSet<String> {
        self.tasks_in(state)
            .iter()
            .filter(|t| t["node"] == node)
            .map(|t| t["id"].as_str().expect("id").to_string())
            .collect()
    }

    /// Counts by state for one queue, from `taskd status --json`.
    pub fn count(&self, queue: &str, state: &str) -> u64 {
        queue_count(&self.status(), queue, state)
    }

    /// Wait until the task reaches `state`; panic with its record after the deadline.
    pub fn wait_state(&self, id: &str, state: &str, deadline: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let ok = poll(deadline, || {
            last = self.show(id);
            last["state"] == state
        });
        assert!(
            ok,
            "task {id} did not reach {state} within {deadline:?}; last record:\n{last:#}"
        );
        last
    }

    /// Start a daemon on this env's config; it is killed when the handle drops.
    pub fn daemon(&self) -> Daemon {
        self.daemon_with(&[])
    }

    pub fn daemon_with(&self, extra_env: &[(&str, &str)]) -> Daemon {
        self.daemon_custom(|cmd| {
            for (k, v) in extra_env {
                cmd.env(k, v);
            }
        })
    }

    /// Start a daemon whose command `adjust` may change (environment, limits) before it runs.
    pub fn daemon_custom(&self, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let log = self.dir.path().join(format!("daemon-{}.log", unique()));
        let err = std::fs::File::create(&log).expect("daemon log");
        let mut cmd = self.cmd(&["start"]);
        cmd.env("RUST_LOG", "info,taskd=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        adjust(&mut cmd);
        let child = cmd.spawn().expect("start daemon");
        let d = Daemon {
            child: Some(child),
            log,
        };
        assert!(
            // The line itself: "ready" inside another ("... already exists") is not it.
            poll(Duration::from_secs(20), || d
                .log_text()
                .lines()
                .any(|l| l.ends_with(" ready"))
                || d.exited()),
            "daemon did not become ready:\n{}",
            d.log_text()
        );
        assert!(!d.exited(), "daemon exited at start:\n{}", d.log_text());
        d
    }
}

pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub struct Daemon {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    /// The node id the daemon logged at start (`node=<host>:<pid>`).
    pub fn node_id(&self) -> String {
        let text = self.log_text();
        let at = text.find("node=").expect("the daemon logs its node id");
        text[at + 5..]
            .split_whitespace()
            .next()
            .expect("a node id")
            .to_string()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The HTTP API's base URL, from the log line the daemon writes once it listens.
    pub fn api_base(&self) -> String {
        let mut url = String::new();
        let ok = poll(Duration::from_secs(10), || {
            let log = self.log_text();
            match log.find("API listening on ") {
                Some(i) => {
                    url = log[i + "API listening on ".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    true
                }
                None => false,
            }
        });
        assert!(
            ok,
            "the daemon did not log its API address:\n{}",
            self.log_text()
        );
        url
    }

    pub fn exited(&self) -> bool {
        // try_wait needs &mut; peek at /proc instead.
        match &self.child {
            None => true,
            Some(c) => {
                let stat =
                    std::fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
                stat.is_empty() || stat.contains(") Z ")
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        let sig = nix::sys::signal::Signal::try_from(sig).expect("a signal number");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// SIGKILL the daemon and reap it (its tasks keep running as orphans).
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait for the daemon to exit; return its exit code.
    pub fn wait_exit(mut self, deadline: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if start.elapsed() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "daemon did not exit within {deadline:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// At the end of a test, the cgroups of every daemon it started in this directory are
/// removed (their processes killed first) when they are still there: a daemon the test
/// killed (with [`Daemon::kill9`], or its own child's `kill`) and never started again
/// leaves its subtree behind.
/// Removes the result files' directory on the tmpfs that `<dir>/results` (a state
/// directory's) names, if any: a daemon removes it when it stops, not when it is killed.
pub fn remove_result_root(state_dir: &Path) {
    if let Ok(root) = std::fs::read_link(state_dir.join("results")) {
        let name = root.file_name().map(|n| n.to_string_lossy().into_owned());
        if root.parent() == Some(Path::new("/dev/shm"))
            && name.is_some_and(|n| n.starts_with("taskd-results-"))
        {
            let _ = std::fs::remove_dir_all(&root);
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for e in entries.flatten() {
            // A state directory (`state`, or another a test named), one level down.
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_result_root(&e.path());
            }
            let name = e.file_name();
            let name = name.to_string_lossy();
            // `daemon-*.log` from [`Env::daemon`], and the logs of daemons a test started
            // itself (`journal.log`, `taskd.log` and its rotated `taskd.log.1`, ...).
            if !name.contains(".log") {
                continue;
            }
            let log = std::fs::read_to_string(e.path()).unwrap_or_default();
            if let Some(tree) = cgroups::subtree_from_log(&log) {
                if tree.exists() {
                    cgroups::remove(&tree);
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // A daemon killed here cannot remove its cgroups: the test does.
            if let Some(tree) = cgroups::subtree_from_log(&self.log_text()) {
                cgroups::remove(&tree);
            }
        }
    }
}

pub const SIGTERM: i32 = 15;
pub const SIGINT: i32 = 2;
pub const SIGHUP: i32 = 1;
pub const SIGKILL: i32 = 9;

/// The count of `state` for `queue` in a `taskd status --json` value (0 when absent).
pub fn queue_count(status: &serde_json::Value, queue: &str, state: &str) -> u64 {
    status["queues"]
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["queue"] == queue))
        .and_then(|q| q["counts"][state].as_u64())
        .unwrap_or(0)
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A 0755 copy of the taskd binary in `dir` (itself 0755), for running it as another user:
/// the build directory may sit below a directory only root may enter (a checkout in a 0700
/// temporary directory).
pub fn bin_for_others(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let bin = dir.join("taskd-for-others");
    std::fs::copy(BIN, &bin).expect("copy the taskd binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod bin");
    bin
}

/// A path under the repository's `contrib/`.
pub fn contrib(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(rel)
}

/// Poll `f` every 20 ms until it is true or `deadline` passes; returns whether it became true.
pub fn poll(deadline: Duration, f: impl FnMut() -> bool) -> bool {
    poll_every(Duration::from_millis(20), deadline, f)
}

/// [`poll`], checking every `interval` (a slower pace for checks that start a process or
/// read a big file).
pub fn poll_every(interval: Duration, deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}

/// Is a process with this pid alive (and not a zombie)?
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.contains(") Z "),
        Err(_) => false,
    }
}

/// Children of `pid` (from /proc), with their state letter.
pub fn children(pid: i32) -> Vec<(i32, char)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let Some(close) = stat.rfind(')') else {
                continue;
            };
            let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            if fields.len() > 2 && fields[1].parse::<i32>().ok() == Some(pid) {
                out.push((p, fields[0].chars().next().unwrap_or('?')));
            }
        }
    }
    out
}

/// A task record's attempt history (from `show --json`).
pub fn history(v: &serde_json::Value) -> &Vec<serde_json::Value> {
    v["history"].as_array().expect("history is an array")
}

/// Wait until `path` holds a complete line (written by `echo`), return it trimmed.
pub fn wait_line(path: &Path, deadline: Duration) -> String {
    let mut text = String::new();
    let ok = poll(deadline, || {
        text = std::fs::read_to_string(path).unwrap_or_default();
        text.ends_with('\n')
    });
    assert!(ok, "{} was not written within {deadline:?}", path.display());
    text.trim().to_string()
}

/// Submit one task per payload with `submit --batch --json`; return the ids in order.
pub fn submit_batch(env: &Env, queue: &str, payloads: &[serde_json::Value]) -> Vec<String> {
    let file = env.path().join(format!("batch-{}.jsonl", unique()));
    let text: String = payloads.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(&file, text).expect("write batch file");
    let out = env.ok(&[
        "submit",
        queue,
        "--batch",
        file.to_str().expect("utf-8 path"),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("submit --batch --json is JSON");
    let ids: Vec<String> = v["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|i| i.as_str().expect("an id").to_string())
        .collect();
    assert_eq!(ids.len(), payloads.len(), "batch answer: {v}");
    ids
}
