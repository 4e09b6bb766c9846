//! Real processes, small shell one-liners. Waits poll with a deadline; no test sleeps a fixed
//! time to await an outcome.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::output::Tail;
use super::procs::{parse_stat, read_stat};
use super::setup::{ChildSetup, Host, TASK_NOFILE_SOFT};
use super::*;

/// Gives this test process the open-files soft limit a daemon gives itself (1024 for a few
/// slots), so that plain tasks take the fast spawn path (`spawn.rs`) as they do in the
/// daemon; tasks with limits, a umask or another user still take std's.
fn as_a_daemon() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        fit_own_nofile(8).expect("fit nofile");
        assert!(
            ChildSetup::plan(&Spec::default(), &host()).is_none(),
            "plain tasks need no pre_exec hook"
        );
    });
}

fn spec(argv: &[&str]) -> Spec {
    as_a_daemon();
    Spec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into())],
        cwd: None,
        stdin: Vec::new(),
        timeout: Duration::from_secs(20),
        kill_grace: Duration::from_secs(2),
        tail_bytes: 64 * 1024,
        log: None,
        user: None,
        umask: None,
        limits: Vec::new(),
        live: None,
        log_lines: false,
        result: None,
        cgroup: None,
    }
}

fn sh(script: &str) -> Spec {
    spec(&["/bin/sh", "-c", script])
}

async fn run_plain(spec: Spec) -> Outcome {
    run(spec, Stop::default(), None).await
}

/// True once `pid` is gone or a zombie (dead, waiting for its parent to reap it).
fn is_dead(pid: i32) -> bool {
    read_stat(pid).is_none_or(|st| st.state == b'Z')
}

fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("test output is UTF-8")
}

#[tokio::test]
async fn exit_codes_and_signals() {
    let ok = run_plain(sh("exit 0")).await;
    assert_eq!(ok.status, Status::Exited(0));
    assert!(ok.status.is_success());
    assert!(ok.pid.is_some());
    assert!(ok.ended_at_ms >= ok.started_at_ms);
    assert!(!ok.stray_killed);

    let three = run_plain(sh("exit 3")).await;
    assert_eq!(three.status, Status::Exited(3));

    let killed = run_plain(sh("kill -9 $$")).await;
    assert_eq!(killed.status, Status::Signaled(9));
}

#[tokio::test]
async fn bin_true_many_at_once() {
    let runs = (0..200).map(|_| run_plain(spec(&["/bin/true"])));
    for outcome in futures_join_all(runs).await {
        assert_eq!(outcome.status, Status::Exited(0));
        assert!(!outcome.stray_killed);
    }
}

/// A tiny join_all, to avoid a dependency for one test.
async fn futures_join_all<F: std::future::Future<Output = Outcome> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<Outcome> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task panicked"));
    }
    out
}

#[tokio::test]
async fn stdout_and_stderr_are_kept_apart() {
    let o = run_plain(sh("echo out; echo err >&2")).await;
    assert_eq!(o.stdout_tail, b"out\n");
    assert_eq!(o.stderr_tail, b"err\n");
    assert_eq!((o.stdout_total, o.stderr_total), (4, 4));
}

#[tokio::test]
async fn stdin_payload_reaches_the_program() {
    let mut s = spec(&["/bin/cat"]);
    s.stdin = br#"{"hello":"world"}"#.to_vec();
    let o = run_plain(s).await;
    assert_eq!(o.status, Status::Exited(0));
    assert_eq!(o.stdout_tail, br#"{"hello":"world"}"#);

    // Larger than a pipe buffer, both ways.
    let mut s = spec(&["/bin/cat"]);
    s.stdin = vec![b'a'; 3 * 1024 * 1024];
    s.tail_bytes = 10;
    let o = run_plain(s).await;
    assert_eq!(o.status, Status::Exited(0));
    assert_eq!(o.stdout_total, 3 * 1024 * 1024);
    assert_eq!(o.stdout_tail, vec![b'a'; 10]);

    // A program that never reads a large stdin does not hold us up.
    let mut s = sh("exit 0");
    s.stdin = vec![b'b'; 1024 * 1024];
    assert_eq!(run_plain(s).await.status, Status::Exited(0));

    // No payload: stdin is at EOF at once.
    let o = run_plain(sh("wc -c")).await;
    assert_eq!(text(&o.stdout_tail).trim(), "0");
}

#[tokio::test]
async fn env_is_exactly_what_was_given() {
    let mut s = spec(&["/usr/bin/env"]);
    s.env = vec![
        ("ALPHA".into(), "1".into()),
        ("BETA".into(), "two words".into()),
    ];
    let o = run_plain(s).await;
    assert_eq!(o.status, Status::Exited(0));
    assert_eq!(text(&o.stdout_tail), "ALPHA=1\nBETA=two words\n");
}

#[tokio::test]
async fn cwd_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(&["/bin/pwd", "-P"]);
    s.cwd = Some(dir.path().to_path_buf());
    let o = run_plain(s).await;
    assert_eq!(o.status, Status::Exited(0));
    let want = dir.path().canonicalize().expect("canonical tempdir");
    assert_eq!(
        text(&o.stdout_tail).trim_end(),
        want.to_str().expect("utf-8 path")
    );
}

#[tokio::test]
async fn bad_cwd_is_a_spawn_failure_naming_it() {
    let mut s = sh("exit 0");
    s.cwd = Some("/nonexistent-taskd-dir".into());
    let o = run_plain(s).await;
    assert_eq!(o.pid, None);
    match o.status {
        Status::SpawnFailed {
            kind: SpawnFailure::BadCwd,
            message,
        } => {
            assert_eq!(message, "cwd /nonexistent-taskd-dir does not exist")
        }
        other => panic!("unexpected {other:?}"),
    }

    let file = tempfile::NamedTempFile::new().expect("temp file");
    let mut s = sh("exit 0");
    s.cwd = Some(file.path().to_path_buf());
    assert!(matches!(
        run_plain(s).await.status,
        Status::SpawnFailed {
            kind: SpawnFailure::BadCwd,
            ..
        }
    ));
}

#[tokio::test]
async fn missing_and_unexecutable_programs() {
    let o = run_plain(spec(&["/usr/bin/taskd-no-such-program"])).await;
    assert_eq!(o.pid, None);
    assert_eq!(
        o.status,
        Status::SpawnFailed {
            kind: SpawnFailure::NotFound,
            message: "program not found: /usr/bin/taskd-no-such-program".into()
        }
    );

    let o = run_plain(spec(&["taskd-no-such-program-on-path"])).await;
    assert!(
        matches!(&o.status, Status::SpawnFailed { kind: SpawnFailure::NotFound, message } if message.contains("taskd-no-such-program-on-path")),
        "{:?}",
        o.status
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("x.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").expect("write script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut s = spec(&["./x.sh"]);
    s.cwd = Some(dir.path().to_path_buf());
    let o = run_plain(s).await;
    assert_eq!(
        o.status,
        Status::SpawnFailed {
            kind: SpawnFailure::NotExecutable,
            message: "permission denied (not executable): ./x.sh".into()
        }
    );

    let o = run_plain(spec(&[])).await;
    assert!(matches!(
        o.status,
        Status::SpawnFailed {
            kind: SpawnFailure::Other,
            ..
        }
    ));
}

#[tokio::test]
async fn timeout_sends_term_to_the_group() {
    let mut s = sh("sleep 30");
    s.timeout = Duration::from_millis(300);
    s.kill_grace = Duration::from_secs(5);
    let t = Instant::now();
    let o = run_plain(s).await;
    assert_eq!(o.status, Status::TimedOut { killed_with: 15 });
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(
        took < Duration::from_millis(300) + Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn timeout_escalates_to_kill_when_term_is_ignored() {
    let mut s = sh("trap '' TERM; sleep 30");
    s.timeout = Duration::from_millis(200);
    s.kill_grace = Duration::from_millis(300);
    let t = Instant::now();
    let o = run_plain(s).await;
    assert_eq!(o.status, Status::TimedOut { killed_with: 9 });
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn background_grandchild_holding_the_pipes_is_killed() {
    let o = run_plain(sh("sleep 300 & echo $!; exit 0")).await;
    assert_eq!(o.status, Status::Exited(0));
    assert!(o.stray_killed);
    let pid: i32 = text(&o.stdout_tail)
        .trim()
        .parse()
        .expect("the script printed a pid");
    wait_until("the grandchild is dead", Duration::from_secs(5), || {
        is_dead(pid)
    });
}

#[tokio::test]
async fn background_grandchild_not_holding_pipes_is_killed_too() {
    let o = run_plain(sh("sleep 300 >/dev/null 2>&1 & echo $!; exit 0")).await;
    assert_eq!(o.status, Status::Exited(0));
    assert!(o.stray_killed);
    let pid: i32 = text(&o.stdout_tail)
        .trim()
        .parse()
        .expect("the script printed a pid");
    wait_until("the grandchild is dead", Duration::from_secs(5), || {
        is_dead(pid)
    });
}

#[tokio::test]
async fn tail_keeps_only_the_last_bytes() {
    let mut s = sh("head -c 5000000 /dev/zero | tr '\\0' x; echo END; echo E >&2");
    s.tail_bytes = 1000;
    let o = run_plain(s).await;
    assert_eq!(o.status, Status::Exited(0));
    assert_eq!(o.stdout_total, 5_000_004);
    assert_eq!(o.stdout_tail.len(), 1000);
    assert!(o.stdout_tail.ends_with(b"xEND\n"));
    assert!(o.stdout_tail[..996].iter().all(|&b| b == b'x'));
    assert_eq!(o.stderr_tail, b"E\n");

    let mut s = sh("echo something; echo more >&2");
    s.tail_bytes = 0;
    let o = run_plain(s).await;
    assert!(o.stdout_tail.is_empty() && o.stderr_tail.is_empty());
    assert_eq!((o.stdout_total, o.stderr_total), (10, 5));
}

#[tokio::test]
async fn log_files_are_capped_with_a_marker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogSpec {
        stdout_path: dir.path().join("logs/out.log"),
        stderr_path: dir.path().join("logs/err.log"),
        max_bytes: 100,
    };
    let mut s = sh("head -c 1000 /dev/zero | tr '\\0' y; echo oops >&2");
    s.log = Some(log.clone());
    let o = run_plain(s).await;
    assert_eq!(o.status, Status::Exited(0));
    assert_eq!(o.stdout_total, 1000);
    let out = std::fs::read(&log.stdout_path).expect("stdout log");
    let mut want = vec![b'y'; 100];
    want.extend_from_slice(b"\n[taskd: output truncated at 100 bytes]\n");
    assert_eq!(out, want);
    assert_eq!(
        std::fs::read(&log.stderr_path).expect("stderr log"),
        b"oops\n"
    );

    // A second attempt appends.
    let mut s = sh("echo again >&2");
    s.log = Some(log.clone());
    run_plain(s).await;
    assert_eq!(
        std::fs::read(&log.stderr_path).expect("stderr log"),
        b"oops\nagain\n"
    );
}

#[tokio::test]
async fn cancel_stops_the_task() {
    let stop = Stop::default();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(run(sh("sleep 30"), stop.clone(), Some(tx)));
    let spawned = rx.await.expect("spawned is reported");
    let stat = read_stat(spawned.pid).expect("the leader is running");
    assert_eq!(stat.start_time, spawned.start_time());
    assert_eq!(stat.pgrp, spawned.pid, "the leader heads its own group");
    let t = Instant::now();
    stop.cancel.cancel();
    let o = task.await.expect("run does not panic");
    assert_eq!(o.status, Status::Cancelled);
    assert_eq!(o.pid, Some(spawned.pid));
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn shutdown_interrupts_the_task() {
    let stop = Stop::default();
    let (tx, rx) = oneshot::channel();
    let mut s = sh("trap '' TERM; sleep 30");
    s.kill_grace = Duration::from_millis(200);
    let task = tokio::spawn(run(s, stop.clone(), Some(tx)));
    rx.await.expect("spawned is reported");
    stop.shutdown.cancel();
    let o = task.await.expect("run does not panic");
    assert_eq!(o.status, Status::Interrupted);
}

#[tokio::test]
async fn already_stopped_tasks_do_not_start() {
    let stop = Stop::default();
    stop.cancel.cancel();
    let o = run(sh("exit 0"), stop, None).await;
    assert_eq!((o.status, o.pid), (Status::Cancelled, None));

    let stop = Stop::default();
    stop.shutdown.cancel();
    let o = run(sh("exit 0"), stop, None).await;
    assert_eq!((o.status, o.pid), (Status::Interrupted, None));
}

#[tokio::test]
async fn dropping_run_kills_the_group() {
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(run(sh("sleep 300"), Stop::default(), Some(tx)));
    let spawned = rx.await.expect("spawned is reported");
    task.abort();
    let _ = task.await;
    wait_until("the dropped task is dead", Duration::from_secs(5), || {
        is_dead(spawned.pid)
    });
}

#[test]
fn kill_orphan_group_checks_the_leader() {
    let mut child = std::process::Command::new("/bin/sh")
        .args(["-c", "sleep 300"])
        .process_group(0)
        .spawn()
        .expect("spawn sh");
    let pgid = child.id() as i32;
    let start_time = read_stat(pgid).expect("leader is running").start_time;

    assert!(
        !kill_orphan_group(pgid, start_time + 1),
        "a different start time is another process"
    );
    assert!(read_stat(pgid).is_some_and(|st| st.state != b'Z'));
    assert!(kill_orphan_group(pgid, start_time));
    let status = child.wait().expect("wait for sh");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );

    // The group is gone; its number may already serve another test's process group (the
    // pid space wraps quickly under a test suite), so only assert where it does not.
    if nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_err() {
        assert!(!kill_orphan_group(pgid, start_time), "the group is gone");
    }
    assert!(!kill_orphan_group(1, 0));
    assert!(!kill_orphan_group(0, 0));
    assert!(!kill_orphan_group(-5, 0));
    assert!(!kill_orphan_group(nix::unistd::getpgrp().as_raw(), 0));
}

#[test]
fn kill_orphan_group_without_its_leader() {
    let out = std::process::Command::new("/bin/sh")
        .args(["-c", "sleep 300 >/dev/null 2>&1 & echo $!"])
        .process_group(0)
        .output()
        .expect("run sh");
    let leader_pid = {
        // `output()` reaped the leader; its group lives on in the background sleep.
        let member: i32 = text(&out.stdout)
            .trim()
            .parse()
            .expect("the script printed a pid");
        let st = read_stat(member).expect("the member is running");
        (member, st.pgrp)
    };
    let (member, pgid) = leader_pid;
    assert!(
        kill_orphan_group(pgid, 12345),
        "an absent leader cannot have been reused"
    );
    wait_until(
        "the orphaned member is dead",
        Duration::from_secs(5),
        || is_dead(member),
    );
}

/// Held by tests that open a descriptor without FD_CLOEXEC and by those that look for leaked
/// descriptors in a task, so that the one cannot leak into the other's task.
static FD_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn inherited_fds_become_cloexec() {
    let _fds = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // dup() gives a descriptor without FD_CLOEXEC, like one inherited from a parent.
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let cloexec = |fd| {
        let flags = fcntl(fd, FcntlArg::F_GETFD).expect("F_GETFD");
        FdFlag::from_bits_retain(flags).contains(FdFlag::FD_CLOEXEC)
    };
    let fd = nix::unistd::dup(2).expect("dup");
    assert!(fd >= 3);
    assert!(!cloexec(fd));
    mark_inherited_fds_cloexec();
    assert!(cloexec(fd));
    nix::unistd::close(fd).expect("close");
}

#[tokio::test]
// The lock only keeps other tests' non-close-on-exec descriptors out of this test's window;
// nothing in this test's runtime takes it.
#[allow(clippy::await_holding_lock)]
async fn a_task_sees_no_descriptor_above_2() {
    let _fds = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // What the daemon does at start-up with what it inherited.
    mark_inherited_fds_cloexec();
    let dir = tempfile::tempdir().expect("temp dir");
    // Another task is running meanwhile, with its pipes and log files open in this process.
    let mut other = sh("sleep 30");
    other.log = Some(LogSpec {
        stdout_path: dir.path().join("other.out"),
        stderr_path: dir.path().join("other.err"),
        max_bytes: 1024,
    });
    other.stdin = b"{}".to_vec();
    other.timeout = Duration::from_secs(3);
    let (tx, rx) = oneshot::channel();
    let other = tokio::spawn(run(other, Stop::default(), Some(tx)));
    rx.await.expect("the other task started");
    for setup in [None, Some(0o022)] {
        // Both spawn paths: posix_spawn (nothing to do before exec) and fork + pre_exec.
        let mut s = spec(&["/bin/ls", "/proc/self/fd"]);
        s.stdin = b"{}".to_vec();
        s.umask = setup;
        s.log = Some(LogSpec {
            stdout_path: dir.path().join("ls.out"),
            stderr_path: dir.path().join("ls.err"),
            max_bytes: 1024,
        });
        let o = run_plain(s).await;
        assert_eq!(o.status, Status::Exited(0), "{}", text(&o.stderr_tail));
        let fds: Vec<&str> = text(&o.stdout_tail).split_whitespace().collect();
        // 3 is the directory ls itself opened to list the others.
        assert_eq!(fds, ["0", "1", "2", "3"], "umask {setup:?}");
    }
    let o = other.await.expect("other task");
    assert!(
        matches!(o.status, Status::TimedOut { .. }),
        "{:?}",
        o.status
    );
}

fn fake_host(nofile: (u64, u64), oom: i32) -> Host {
    Host {
        nofile,
        oom_score_adj: Some(oom),
        euid: 0,
        egid: 0,
    }
}

#[test]
fn plain_tasks_keep_the_fast_path() {
    let plain = spec(&["/bin/true"]);
    // A daemon with default limits and oom_score_adj: nothing to do before exec.
    assert_eq!(ChildSetup::plan(&plain, &fake_host((1024, 4096), 0)), None);
    // A hard limit under 1024 is as high as the soft one can go.
    assert_eq!(ChildSetup::plan(&plain, &fake_host((512, 512), 0)), None);
    assert!(ChildSetup::plan(&plain, &fake_host((512, 4096), 0)).is_some());
    // A raised daemon limit, or a protected daemon: every task needs the hook.
    assert!(ChildSetup::plan(&plain, &fake_host((65536, 65536), 0)).is_some());
    assert!(ChildSetup::plan(&plain, &fake_host((1024, 4096), -900)).is_some());
    // The queue asks for something.
    let mut s = plain.clone();
    s.umask = Some(0o027);
    assert!(ChildSetup::plan(&s, &fake_host((1024, 4096), 0)).is_some());
    let mut s = plain.clone();
    s.limits = vec![Rlimit::both(nix::sys::resource::Resource::RLIMIT_CORE, 0)];
    assert!(ChildSetup::plan(&s, &fake_host((1024, 4096), 0)).is_some());
    // Running as the daemon's own user is no switch.
    let root = UserSpec::lookup("root", None).expect("root");
    let mut s = plain.clone();
    s.user = Some(root);
    assert_eq!(ChildSetup::plan(&s, &fake_host((1024, 4096), 0)), None);
}

#[test]
fn nofile_reset_unless_the_queue_sets_it() {
    use nix::sys::resource::Resource;
    let host = fake_host((65536, 65536), 0);
    let setup = ChildSetup::plan(&spec(&["/bin/true"]), &host).expect("a reset");
    assert_eq!(
        setup.limits(),
        [Rlimit {
            resource: Resource::RLIMIT_NOFILE,
            soft: 1024,
            hard: 65536
        }]
    );
    let mut s = spec(&["/bin/true"]);
    s.limits = vec![Rlimit::both(Resource::RLIMIT_NOFILE, 4096)];
    let setup = ChildSetup::plan(&s, &host).expect("the queue's limit");
    assert_eq!(
        setup.limits(),
        [Rlimit::both(Resource::RLIMIT_NOFILE, 4096)]
    );
}

#[tokio::test]
async fn tasks_get_the_default_nofile_and_their_queues_limits() {
    use nix::sys::resource::{getrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let script = "ulimit -Sn; ulimit -Hn; ulimit -c; ulimit -t; umask";
    let o = run_plain(sh(script)).await;
    let lines: Vec<String> = text(&o.stdout_tail).lines().map(str::to_string).collect();
    let show = |v: u64| {
        if v == UNLIMITED {
            "unlimited".to_string()
        } else {
            v.to_string()
        }
    };
    assert_eq!(
        lines[0],
        TASK_NOFILE_SOFT.min(hard).to_string(),
        "{lines:?}"
    );
    assert_eq!(lines[1], show(hard), "the hard limit is kept");

    let mut s = sh(script);
    s.limits = vec![
        Rlimit::both(Resource::RLIMIT_NOFILE, 256),
        Rlimit::both(Resource::RLIMIT_CORE, 0),
        Rlimit::both(Resource::RLIMIT_CPU, 30),
    ];
    s.umask = Some(0o027);
    let o = run_plain(s).await;
    assert_eq!(o.status, Status::Exited(0), "{}", text(&o.stderr_tail));
    let lines: Vec<&str> = text(&o.stdout_tail).lines().collect();
    assert_eq!(lines, ["256", "256", "0", "30", "0027"]);
}

#[tokio::test]
async fn an_impossible_limit_fails_the_spawn_not_the_daemon() {
    use nix::sys::resource::Resource;
    // More open files than the kernel allows anyone (fs.nr_open): setrlimit fails in the
    // child, and the attempt is a spawn failure.
    let mut s = spec(&["/bin/true"]);
    s.limits = vec![Rlimit::both(Resource::RLIMIT_NOFILE, UNLIMITED)];
    let o = run_plain(s).await;
    assert!(
        matches!(
            o.status,
            Status::SpawnFailed {
                kind: SpawnFailure::Other,
                ..
            }
        ),
        "{:?}",
        o.status
    );
    assert!(o.pid.is_none());
}

#[test]
fn a_non_root_daemon_says_which_limit_it_cannot_raise() {
    use nix::sys::resource::Resource;
    let mut s = spec(&["/bin/true"]);
    s.limits = vec![Rlimit::both(Resource::RLIMIT_CORE, UNLIMITED)];
    let user = Host {
        euid: 1000,
        egid: 1000,
        ..fake_host((1024, 4096), 0)
    };
    let (_, own) = nix::sys::resource::getrlimit(Resource::RLIMIT_CORE).expect("getrlimit");
    let message = setup::unsettable_limit(&s, &user);
    if own == UNLIMITED {
        assert_eq!(message, None, "nothing to raise");
    } else {
        let m = message.expect("refused before the fork");
        assert!(
            m.contains("RLIMIT_CORE") && m.contains("not run as root"),
            "{m}"
        );
    }
    assert_eq!(
        setup::unsettable_limit(&s, &fake_host((1024, 4096), 0)),
        None
    );
}

#[test]
fn user_lookup() {
    let root = UserSpec::lookup("root", None).expect("root exists");
    assert_eq!((root.uid, root.gid, root.name.as_str()), (0, 0, "root"));
    assert!(root.groups.contains(&0));
    assert_eq!(UserSpec::lookup("0", None).expect("uid 0").name, "root");
    let with_group = UserSpec::lookup("root", Some("0")).expect("group 0 exists");
    assert!(with_group.groups.contains(&with_group.gid));
    assert!(matches!(
        UserSpec::lookup("taskd-no-such-user", None),
        Err(ExecError::UnknownUser(_))
    ));
    assert!(matches!(
        UserSpec::lookup("root", Some("taskd-no-such-group")),
        Err(ExecError::UnknownGroup(_))
    ));
}

#[tokio::test]
async fn runs_as_another_user_when_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let nobody = UserSpec::lookup("nobody", None).expect("nobody exists");
    let mut s = sh("id -u; id -g; id -G");
    s.user = Some(nobody.clone());
    let o = run_plain(s).await;
    assert_eq!(o.status, Status::Exited(0), "{}", text(&o.stderr_tail));
    let lines: Vec<&str> = text(&o.stdout_tail).lines().collect();
    assert_eq!(lines[0], nobody.uid.to_string());
    assert_eq!(lines[1], nobody.gid.to_string());
    let mut got: Vec<u32> = lines[2]
        .split(' ')
        .map(|g| g.parse().expect("gid"))
        .collect();
    let mut want = nobody.groups.clone();
    got.sort_unstable();
    want.sort_unstable();
    want.dedup();
    assert_eq!(got, want, "no supplementary group of root is left behind");
}

/// `reap_orphans` needs this process to be a subreaper, which would change what happens to
/// every other test's orphans; so the real test runs in a fresh copy of the test binary.
#[test]
fn reap_orphans_reaps_adopted_zombies() {
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "executor::tests::subreaper_helper",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TASKD_SUBREAPER_HELPER", "1")
        .output()
        .expect("run the helper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "helper failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("1 passed"),
        "helper did not run:\n{stdout}\n{stderr}"
    );
}

#[tokio::test]
#[ignore = "runs inside reap_orphans_reaps_adopted_zombies"]
async fn subreaper_helper() {
    if std::env::var_os("TASKD_SUBREAPER_HELPER").is_none() {
        return;
    }
    become_subreaper().expect("prctl");

    // Task leaders are registered: reaping orphans in a loop never steals their status.
    let reaper = std::thread::spawn(|| {
        let end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < end {
            reap_orphans();
        }
    });
    for _ in 0..50 {
        assert_eq!(run_plain(sh("exit 7")).await.status, Status::Exited(7));
    }
    reaper.join().expect("reaper thread");

    // A grandchild orphaned by its parent becomes our child; once it exits it is a zombie
    // until reap_orphans reaps it.
    let out = std::process::Command::new("/bin/sh")
        .args(["-c", "sleep 0.2 >/dev/null 2>&1 & echo $!"])
        .output()
        .expect("run sh");
    let orphan: i32 = text(&out.stdout)
        .trim()
        .parse()
        .expect("the script printed a pid");
    wait_until("the orphan is our zombie", Duration::from_secs(5), || {
        read_stat(orphan).is_some_and(|st| st.state == b'Z' && st.ppid == std::process::id() as i32)
    });
    let mut reaped = 0;
    wait_until("the zombie is reaped", Duration::from_secs(5), || {
        reaped += reap_orphans();
        read_stat(orphan).is_none()
    });
    assert!(reaped >= 1);
}

#[test]
fn stat_parsing_counts_from_the_last_paren() {
    let line = b"4242 (we (ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200 18446744073709551615\n";
    assert_eq!(
        parse_stat(line),
        Some(super::procs::Stat {
            state: b'S',
            ppid: 1,
            pgrp: 4242,
            start_time: 987654
        })
    );
    assert_eq!(parse_stat(b"garbage"), None);
    let me = read_stat(std::process::id() as i32).expect("own stat");
    assert_eq!(me.pgrp, nix::unistd::getpgrp().as_raw());
    assert_eq!(me.ppid, nix::unistd::getppid().as_raw());
}

proptest! {
    #[test]
    fn tail_is_the_last_bytes(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20), cap in 0usize..500) {
        let mut tail = Tail::new(cap);
        let mut all = Vec::new();
        for c in &chunks {
            tail.push(c);
            all.extend_from_slice(c);
        }
        let want = &all[all.len().saturating_sub(cap)..];
        prop_assert_eq!(tail.into_vec(), want.to_vec());
    }
}

#[tokio::test]
async fn program_is_searched_in_the_tasks_own_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let script = bin.join("taskd-test-hello");
    std::fs::write(&script, "#!/bin/sh\necho found-on-path\n").expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // A first directory holding a same-named file that may not be run: skipped, as execvp does.
    let denied = dir.path().join("denied");
    std::fs::create_dir(&denied).expect("mkdir");
    std::fs::write(denied.join("taskd-test-hello"), "#!/bin/sh\necho wrong\n").expect("write");

    let mut s = spec(&["taskd-test-hello"]);
    s.env = vec![(
        "PATH".into(),
        format!("{}:{}:/usr/bin:/bin", denied.display(), bin.display()),
    )];
    let o = run_plain(s).await;
    assert_eq!(o.status, Status::Exited(0), "{o:?}");
    assert_eq!(text(&o.stdout_tail), "found-on-path\n");

    // Only a file that may not be run: permission denied, not "not found".
    let mut s = spec(&["taskd-test-hello"]);
    s.env = vec![("PATH".into(), denied.display().to_string())];
    let o = run_plain(s).await;
    assert!(
        matches!(
            &o.status,
            Status::SpawnFailed {
                kind: SpawnFailure::NotExecutable,
                ..
            }
        ),
        "{:?}",
        o.status
    );
}

#[tokio::test]
async fn tasks_start_with_no_blocked_signals_and_default_sigpipe() {
    // The daemon ignores SIGPIPE (Rust does) and handles TERM/INT/HUP/USR1; none of that may
    // reach a task: nothing blocked, SIGPIPE (bit 13) not ignored.
    // SAFETY: ignoring SIGPIPE process-wide is what every Rust binary's start-up does anyway.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let o = run_plain(sh("grep -E '^Sig(Blk|Ign):' /proc/self/status")).await;
    assert_eq!(o.status, Status::Exited(0), "{o:?}");
    let out = text(&o.stdout_tail).to_string();
    let mask = |name: &str| {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {out}"));
        u64::from_str_radix(line.split_whitespace().nth(1).expect("mask"), 16).expect("hex")
    };
    assert_eq!(mask("SigBlk:"), 0, "{out}");
    assert_eq!(mask("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
    // And the leader is its own group's leader.
    let o = run_plain(sh("ps -o pid=,pgid= -p $$")).await;
    let fields: Vec<&str> = text(&o.stdout_tail).split_whitespace().collect();
    assert_eq!(fields.len(), 2, "{o:?}");
    assert_eq!(fields[0], fields[1], "the task leads its own process group");
}

#[tokio::test]
async fn a_leader_that_closes_its_pipes_early_is_still_waited_for() {
    // Its pipes close long before it exits: the daemon must notice the exit itself (and its
    // status), not take the closed pipes for the end.
    let o = run_plain(sh("exec >/dev/null 2>&1 </dev/null; sleep 0.3; exit 3")).await;
    assert_eq!(o.status, Status::Exited(3), "{o:?}");
    let ran = o.ended_at_ms - o.started_at_ms;
    assert!(ran >= 300, "ended after {ran} ms, before the leader exited");
}

/// Whether `path` is gone within a few seconds (a result file is removed in the background).
async fn removed_soon(path: &std::path::Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// `spec` with a result file in `dir`, bounded by `max` bytes.
fn with_result(mut spec: Spec, dir: &std::path::Path, max: u64) -> Spec {
    spec.result = Some(ResultSpec {
        dir: ResultDir::new(dir.join("results")),
        max_bytes: max,
    });
    spec
}

#[tokio::test]
async fn a_task_returns_what_it_writes_to_its_result_file() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run_plain(with_result(
        sh(r#"echo "$TASKD_RESULT_FILE"; stat -c %a "$TASKD_RESULT_FILE"; printf '{"sum": 3}' > "$TASKD_RESULT_FILE""#),
        tmp.path(),
        100,
    ))
    .await;
    assert_eq!(o.status, Status::Exited(0), "{o:?}");
    assert_eq!(o.returned, Returned::Value(serde_json::json!({"sum": 3})));
    let out = text(&o.stdout_tail).to_string();
    let mut lines = out.lines();
    let path = std::path::PathBuf::from(lines.next().expect("the path"));
    assert!(
        path.starts_with(tmp.path().join("results")),
        "{path:?} is in the result directory"
    );
    assert_eq!(lines.next(), Some("600"), "the file is the task's alone");
    assert!(
        removed_soon(&path).await,
        "the file is removed after the attempt"
    );
}

#[tokio::test]
async fn a_failed_run_returns_nothing_and_a_task_without_a_result_file_has_no_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run_plain(with_result(
        sh(r#"echo '"half done"' > "$TASKD_RESULT_FILE"; echo "$TASKD_RESULT_FILE"; exit 3"#),
        tmp.path(),
        100,
    ))
    .await;
    assert_eq!(o.status, Status::Exited(3));
    assert_eq!(o.returned, Returned::Nothing, "only a success returns");
    let path = std::path::PathBuf::from(text(&o.stdout_tail).trim());
    assert!(removed_soon(&path).await, "removed after a failed run too");

    let o = run_plain(sh(r#"echo "[${TASKD_RESULT_FILE-unset}]""#)).await;
    assert_eq!(text(&o.stdout_tail), "[unset]\n");
    assert_eq!(o.returned, Returned::Nothing);
}

#[tokio::test]
async fn a_result_file_that_cannot_be_made_fails_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    // The state directory is gone: nowhere to put the file.
    let o = run_plain(with_result(sh("exit 0"), &tmp.path().join("missing"), 100)).await;
    match &o.status {
        Status::SpawnFailed { message, .. } => {
            assert!(message.contains("result file"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}
