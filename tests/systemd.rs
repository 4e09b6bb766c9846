//! The daemon under a service manager: the sd_notify protocol, and the shipped unit file.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{Env, SIGHUP, SIGTERM};

/// Collect datagrams until one contains `want`, or panic after `deadline`.
fn expect_message(sock: &UnixDatagram, want: &str, deadline: Duration, seen: &mut Vec<String>) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want || l.starts_with(want));
            seen.push(msg);
            if hit {
                return;
            }
        }
    }
    panic!("no `{want}` from the daemon within {deadline:?}; got {seen:?}");
}

#[test]
fn the_daemon_speaks_sd_notify_and_keeps_the_socket_from_its_tasks() {
    let env = Env::new(
        r#"
[queues.env]
shell = 'env > "$OUT"'
env = { OUT = "@OUT@" }
"#,
    );
    let out = env.path().join("task-env.txt");
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("@OUT@", &out.display().to_string());
    std::fs::write(&env.config, text).unwrap();
    let sock_path = env.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let d = env.daemon_with(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ]);
    let mut seen = Vec::new();
    expect_message(&sock, "READY=1", Duration::from_secs(10), &mut seen);
    assert!(
        seen.iter().any(|m| m.contains("STATUS=")),
        "READY comes with a STATUS line: {seen:?}"
    );
    // WatchdogSec=0.4s: pings at least every 0.2 s.
    expect_message(&sock, "WATCHDOG=1", Duration::from_secs(5), &mut seen);

    let id = env.submit("env", "{}");
    env.wait_state(&id, "succeeded", Duration::from_secs(20));
    // The periodic STATUS line counts retrying and failed tasks and says the broker is up.
    expect_message(&sock, "STATUS=", Duration::from_secs(10), &mut seen);
    expect_message(&sock, "STATUS=", Duration::from_secs(10), &mut seen);
    assert!(
        seen.iter()
            .any(|m| m.contains("0 retrying, 0 failed; broker up")),
        "{seen:?}"
    );
    let task_env = std::fs::read_to_string(&out).expect("task wrote its env");
    for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC"] {
        assert!(
            !task_env.contains(&format!("{var}=")),
            "{var} leaked into a task:\n{task_env}"
        );
    }

    d.signal(SIGHUP);
    expect_message(&sock, "RELOADING=1", Duration::from_secs(10), &mut seen);
    let reloading = seen
        .iter()
        .rev()
        .find(|m| m.contains("RELOADING=1"))
        .unwrap()
        .clone();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    expect_message(&sock, "READY=1", Duration::from_secs(10), &mut seen);

    d.signal(SIGTERM);
    expect_message(&sock, "STOPPING=1", Duration::from_secs(10), &mut seen);
    let stopping = seen
        .iter()
        .rev()
        .find(|m| m.contains("STOPPING=1"))
        .unwrap()
        .clone();
    assert!(stopping.contains("EXTEND_TIMEOUT_USEC="), "{stopping}");
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn without_notify_socket_the_daemon_runs_as_usual() {
    let env = Env::new("[queues.q]\ncommand = [\"/bin/true\"]\n");
    let d = env.daemon_with(&[("NOTIFY_SOCKET", "")]);
    let id = env.submit("q", "{}");
    env.wait_state(&id, "succeeded", Duration::from_secs(20));
    d.signal(SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        common::skip::skip(
            "systemd-analyze is not installed",
            "apt-get install -y systemd",
        );
        return;
    };
    assert!(out.status.success());
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/taskd.service");
    let text = std::fs::read_to_string(unit).unwrap();
    let docs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(!docs.is_empty(), "the unit names its documentation");
    for d in &docs {
        assert!(
            !d.contains("example") && !d.contains("invalid"),
            "Documentation= points at a placeholder: {d}"
        );
        // What the guide installs: the man pages and the docs.
        assert!(
            *d == "man:taskd(1)"
                || d.strip_prefix("file:///usr/local/share/doc/taskd/")
                    .is_some_and(|f| std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("docs")
                        .join(f)
                        .is_file()
                        || f == "README.md"),
            "Documentation={d} is neither the man page nor a doc docs/systemd.md installs"
        );
    }
    // verify checks that ExecStart's binary exists: point it at the one just built; and
    // that Documentation='s man pages exist: generate them where `man` looks.
    let dir = tempfile::tempdir().unwrap();
    let man1 = dir.path().join("man").join("man1");
    std::fs::create_dir_all(&man1).unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["generate", "man"])
        .arg(&man1)
        .output()
        .expect("generate the man pages");
    assert!(out.status.success(), "{out:?}");
    let text = text.replace("/usr/local/bin/taskd", common::BIN);
    let copy = dir.path().join("taskd.service");
    std::fs::write(&copy, text).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about taskd.service itself are what this test owns; the host's other units may
    // have complaints of their own.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("taskd.service"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify complains about the unit:\n{stderr}"
    );
}

#[test]
fn taskd_reload_reports_changes_per_queue_and_refuses_an_invalid_config() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("[queues.a]\nconcurrency = 1\ncommand = [\"/bin/true\"]\n");
    // No daemon yet: a clear error, not a hang.
    let out = env.run(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no taskd daemon is running"),
        "{out:?}"
    );

    let d = env.daemon();
    let sock = env.path().join("state").join("taskd.sock");
    let mode = std::fs::metadata(&sock)
        .expect("control socket exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the control socket is owner-only");

    env.rewrite("[queues.a]\nconcurrency = 3\ntimeout = \"2m\"\ncommand = [\"/bin/true\"]\n\n[queues.b]\ncommand = [\"/bin/true\"]\n");
    let out = env.run(&["reload"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("queue a: concurrency 1 → 3"), "{stdout}");
    assert!(stdout.contains("timeout 30m → 2m"), "{stdout}");
    assert!(stdout.contains("queue b: started"), "{stdout}");
    // The new queue really runs.
    let id = env.submit("b", "{}");
    env.wait_state(&id, "succeeded", Duration::from_secs(20));

    let out = env.run(&["reload"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing changed"),
        "{out:?}"
    );

    // An invalid file: refused with its diagnostics; the daemon keeps the old config.
    env.rewrite("[queues.a]\nconcurrency = 0\ncommand = [\"/bin/true\"]\n\n[queues.b]\ncommand = [\"/bin/true\"]\n");
    let out = env.run(&["reload"]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("queues.a.concurrency"), "{stderr}");
    // Put a valid file back (without reloading) so the CLI can submit: queue b still runs.
    env.rewrite("[queues.a]\nconcurrency = 3\ncommand = [\"/bin/true\"]\n\n[queues.b]\ncommand = [\"/bin/true\"]\n");
    let id = env.submit("b", "{}");
    env.wait_state(&id, "succeeded", Duration::from_secs(20));
    assert!(!d.exited(), "the daemon survived an invalid reload");
    let _ = d;
}

#[test]
fn under_journald_log_lines_carry_a_syslog_priority_and_no_timestamp() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new("[queues.q]\ncommand = [\"/nonexistent/program\"]\nmax_attempts = 1\n");
    // Stand in for journald: stderr is a file, and JOURNAL_STREAM names its device:inode.
    let log = env.path().join("journal.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut child = env
        .cmd(&["start"])
        .env("JOURNAL_STREAM", &stream)
        .stderr(file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        common::poll(Duration::from_secs(20), || read().contains("ready")),
        "{}",
        read()
    );
    let id = env.submit("q", "{}");
    env.wait_state(&id, "failed", Duration::from_secs(20));
    assert!(
        common::poll(Duration::from_secs(10), || read().contains("cannot run")),
        "{}",
        read()
    );
    let _ = child.kill();
    let _ = child.wait();
    let text = read();
    assert!(
        text.lines()
            .any(|l| l.starts_with("<6>") && l.contains("ready")),
        "{text}"
    );
    let warn = text
        .lines()
        .find(|l| l.contains("cannot run"))
        .expect("a warning about the task");
    assert!(warn.starts_with("<4>"), "{warn}");
    // Every line about a task names its queue, id and attempt.
    assert!(
        warn.contains("queue=q") && warn.contains(&id) && warn.contains("attempt=1"),
        "{warn}"
    );
    assert!(
        text.lines()
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with('<') && !l.contains("Z ")),
        "every line has a priority and no timestamp of its own:\n{text}"
    );

    // A JOURNAL_STREAM that does not name our stderr (inherited from elsewhere) is ignored.
    let d = env.daemon_with(&[("JOURNAL_STREAM", "1:1")]);
    assert!(!d.log_text().starts_with('<'), "{}", d.log_text());
}

#[test]
fn sigusr1_reopens_the_log_file_for_logrotate() {
    let env = Env::new("[queues.q]\ncommand = [\"/nonexistent/program\"]\nmax_attempts = 1\n");
    let log = env.path().join("taskd.log");
    let mut child = env
        .cmd(&["start", "--log-file", log.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(
        common::poll(Duration::from_secs(20), || read(&log).contains("ready")),
        "{}",
        read(&log)
    );
    let rotated = env.path().join("taskd.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("signal the daemon");
    assert!(
        common::poll(Duration::from_secs(10), || read(&log).contains("reopened")),
        "no new log file"
    );
    let id = env.submit("q", "{}");
    env.wait_state(&id, "failed", Duration::from_secs(20));
    assert!(
        common::poll(Duration::from_secs(10), || read(&log)
            .contains("cannot run")),
        "{}",
        read(&log)
    );
    assert!(
        !read(&rotated).contains("cannot run"),
        "the rotated file got new lines"
    );
    assert!(
        !read(&log).contains('\u{1b}'),
        "no terminal colours in a log file"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn task_output_reaches_the_log_only_with_log_output_and_tagged_with_the_task() {
    let env = Env::new(
        r#"
[queues.loud]
log_output = true
shell = 'echo hello-from-task; echo oops-on-stderr >&2; printf no-newline-at-end'

[queues.quiet]
shell = 'echo quiet-output-line'
"#,
    );
    let d = env.daemon();
    let loud = env.submit("loud", "{}");
    let quiet = env.submit("quiet", "{}");
    env.wait_state(&loud, "succeeded", Duration::from_secs(20));
    env.wait_state(&quiet, "succeeded", Duration::from_secs(20));
    assert!(
        common::poll(Duration::from_secs(10), || d
            .log_text()
            .contains("no-newline-at-end")),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    for line in ["hello-from-task", "oops-on-stderr", "no-newline-at-end"] {
        let l = log
            .lines()
            .find(|l| l.contains(line))
            .unwrap_or_else(|| panic!("{line} not logged:\n{log}"));
        assert!(
            l.contains(&loud) && l.contains("queue=loud") && l.contains("attempt=1"),
            "{l}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("oops-on-stderr") && l.contains("stderr")),
        "{log}"
    );
    assert!(
        !log.contains("quiet-output-line"),
        "output of a queue without log_output was logged:\n{log}"
    );
}

#[test]
fn secrets_in_a_queues_env_never_reach_logs_status_or_reload_output() {
    let secret = "s3cr3t-T0KEN-value";
    let env = Env::new(&format!(
        "[queues.s]\nenv = {{ API_TOKEN = \"{secret}\" }}\nshell = 'test \"$API_TOKEN\" = {secret}'\n"
    ));
    let d = env.daemon_with(&[("RUST_LOG", "trace")]);
    let id = env.submit("s", "{}");
    env.wait_state(&id, "succeeded", Duration::from_secs(20));
    env.rewrite(&format!(
        "[queues.s]\nenv = {{ API_TOKEN = \"{secret}-rotated\" }}\nshell = 'true'\n"
    ));
    let reload = env.run(&["reload"]);
    assert!(reload.status.success(), "{reload:?}");
    let mut seen = String::new();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["check"],
        &["check", "--json"],
        &["show", &id],
        &["show", &id, "--json"],
    ] {
        let out = env.run(args);
        seen.push_str(&String::from_utf8_lossy(&out.stdout));
        seen.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    seen.push_str(&String::from_utf8_lossy(&reload.stdout));
    seen.push_str(&d.log_text());
    assert!(!seen.contains(secret), "the secret leaked:\n{seen}");
}

#[test]
fn the_control_socket_path_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let env = common::Env::raw(&format!(
        "[taskd]\nstate_dir = \"state\"\ncontrol_socket = \"{}\"\n\n[queues.a]\ncommand = [\"/bin/true\"]\n",
        sock.display()
    ));
    let _d = env.daemon();
    assert!(sock.exists(), "the daemon listens at the configured path");
    assert!(!env.path().join("state").join("taskd.sock").exists());
    let out = env.run(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing changed"),
        "{out:?}"
    );
}

/// The directories `systemd/taskd.tmpfiles` creates: (path, mode, user, group).
fn tmpfiles_dirs() -> Vec<(String, u32, String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/taskd.tmpfiles"
    ))
    .expect("read systemd/taskd.tmpfiles");
    text.lines()
        .filter(|l| l.starts_with("d "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[1].to_string(),
                u32::from_str_radix(f[2], 8).expect("an octal mode"),
                f[3].to_string(),
                f[4].to_string(),
            )
        })
        .collect()
}

const SYSTEM_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/config/taskd.example-system.toml"
);

/// The config shipped for /etc/taskd: every path in it is absolute, nothing it writes is
/// where the unit makes the file system read-only, and each directory it names is one that
/// docs/systemd.md creates (tmpfiles, StateDirectory=, the worker's directory).
#[test]
fn the_system_example_config_uses_absolute_paths_the_unit_can_write() {
    let text = std::fs::read_to_string(SYSTEM_CONFIG).expect("read the system config");
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/systemd.md"))
        .expect("read docs/systemd.md");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/taskd.service"
    ))
    .expect("read the unit");
    assert!(
        unit.contains("ProtectSystem=full"),
        "this test assumes /usr, /boot and /etc are read-only"
    );
    let made: Vec<String> = tmpfiles_dirs().into_iter().map(|d| d.0).collect();
    for key in ["state_dir", "log_dir", "control_socket", "cwd"] {
        for line in text
            .lines()
            .filter(|l| l.trim_start().starts_with(&format!("{key} =")))
        {
            let value = line.split('"').nth(1).unwrap_or_else(|| panic!("{line}"));
            assert!(value.starts_with('/'), "{key} is relative: {line}");
            for ro in ["/etc", "/usr", "/boot"] {
                assert!(
                    !value.starts_with(ro),
                    "{key} = {value} is under {ro}, read-only under the unit"
                );
            }
            assert!(
                made.iter().any(|d| value.starts_with(d.as_str())),
                "{key} = {value} is under no directory systemd/taskd.tmpfiles creates ({made:?})"
            );
        }
    }
    assert!(
        text.contains("state_dir = \"/var/lib/taskd\""),
        "the store is in the unit's StateDirectory"
    );
    // Files the queues run: under a directory the guide installs them into.
    for line in text
        .lines()
        .filter(|l| l.starts_with("worker =") || l.starts_with("command ="))
    {
        for arg in line
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|a| a.starts_with('/'))
        {
            let installed = arg.starts_with("/bin/")
                || arg.starts_with("/usr/bin/")
                || guide.contains(arg.rsplit_once('/').expect("a path").0);
            assert!(
                installed,
                "{arg} ({line}) is not installed by docs/systemd.md"
            );
        }
    }
    // The guide installs this very file.
    assert!(
        guide.contains("config/taskd.example-system.toml /etc/taskd/taskd.toml"),
        "docs/systemd.md installs config/taskd.example-system.toml"
    );
}

/// The same file, with its absolute paths moved under a temporary root (the directories
/// made as systemd/taskd.tmpfiles makes them), passes `taskd check` from /etc/taskd and
/// runs every queue under a real daemon: what `systemctl start taskd` does after the guide.
#[test]
fn the_system_example_config_checks_and_runs_every_queue() {
    if !nix::unistd::geteuid().is_root() {
        common::skip::skip(
            "needs root: the system config runs its queues as another user",
            "run the tests as root",
        );
        return;
    }
    let root = tempfile::tempdir().expect("temp root");
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod the root");
    let r = root.path().display().to_string();
    // The `taskd` user the package creates; `nobody` stands in where it does not exist.
    let user = if std::process::Command::new("id")
        .arg("taskd")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        "taskd"
    } else {
        "nobody"
    };
    for (dir, mode, _, _) in tmpfiles_dirs() {
        let d = format!("{r}{dir}");
        std::fs::create_dir_all(&d).expect("create a tmpfiles directory");
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
    }
    let lib = format!("{r}/usr/local/lib/taskd");
    std::fs::create_dir_all(&lib).expect("the worker's directory");
    for f in ["example_worker.py", "taskd_worker.py"] {
        std::fs::copy(
            format!("{}/contrib/python/{f}", env!("CARGO_MANIFEST_DIR")),
            format!("{lib}/{f}"),
        )
        .expect("install the example worker");
    }
    for d in [
        format!("{r}/usr"),
        format!("{r}/usr/local"),
        format!("{r}/usr/local/lib"),
        lib.clone(),
    ] {
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port();
    let text = std::fs::read_to_string(SYSTEM_CONFIG)
        .expect("read the system config")
        .replace("\"/var/", &format!("\"{r}/var/"))
        .replace("\"/usr/local/", &format!("\"{r}/usr/local/"))
        .replace("user = \"taskd\"", &format!("user = \"{user}\""))
        .replace("127.0.0.1:7070", &format!("127.0.0.1:{port}"));
    let etc = format!("{r}/etc/taskd");
    let config = format!("{etc}/taskd.toml");
    std::fs::write(&config, &text).expect("install the config");
    let env = Env {
        dir: root,
        config: config.clone().into(),
    };
    // As the unit runs it: from /, with $STATE_DIRECTORY set by StateDirectory=.
    let out = env
        .cmd(&["check", "--json"])
        .current_dir("/")
        .env("STATE_DIRECTORY", format!("{r}/var/lib/taskd"))
        .output()
        .expect("run taskd check");
    assert!(out.status.success(), "taskd check: {out:?}");
    let check: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check --json");
    assert_eq!(
        check["state_dir"],
        format!("{r}/var/lib/taskd"),
        "{check:#}"
    );
    assert_eq!(
        check["broker"],
        format!("sqlite://{r}/var/lib/taskd/taskd.db"),
        "{check:#}"
    );
    let mut resolved = check.clone();
    resolved["config"] = serde_json::Value::Null;
    assert!(
        !resolved.to_string().contains(&etc),
        "nothing resolves next to the config in /etc: {check:#}"
    );
    let d = env.daemon();
    for (queue, payload, out) in [
        ("echo", r#"{"msg":"hello"}"#, "hello"),
        ("shell", r#"{"msg":"hi"}"#, "attempt 1: hi"),
        ("hello", r#"{"name":"you"}"#, "hello, you"),
    ] {
        let id = env.submit(queue, payload);
        let v = env.wait_state(&id, "succeeded", Duration::from_secs(60));
        let tail = v["history"][0]["stdout_tail"].as_str().unwrap_or_default();
        assert!(tail.contains(out), "{queue}: {v:#}\n{}", d.log_text());
    }
    let logs = std::fs::read_dir(format!("{r}/var/log/taskd/shell"))
        .expect("the shell queue's log_dir")
        .count();
    assert!(logs >= 1, "the shell queue's full output is in its log_dir");
    // The API local apps enqueue through.
    let id = env
        .ok(&[
            "submit",
            "echo",
            r#"{"msg":"over http"}"#,
            "--server",
            &format!("http://127.0.0.1:{port}"),
        ])
        .trim()
        .to_string();
    env.wait_state(&id, "succeeded", Duration::from_secs(30));
}
