//! Whole-file tests: valid configs and their values, and every class of error with its
//! position, key and fix.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::validate::validate;
use super::*;

const EXAMPLE: &str = r#"[taskd]
broker = "sqlite:///var/lib/taskd/taskd.db"   # default: sqlite in state_dir
state_dir = "/var/lib/taskd"
listen = "127.0.0.1:7070"
shutdown_grace = "30s"

[defaults]                                    # every queue inherits these
timeout = "30m"
max_attempts = 5
backoff = { kind = "exponential", base = "10s", max = "1h", jitter = true }
kill_grace = "10s"

[queues.thumbnails]
concurrency = 4
command = ["/usr/local/bin/make-thumb", "--size", "{size}", "{src}"]
timeout = "2m"

[queues.reports]
concurrency = 1
shell = "/opt/reports/build.sh \"$TASKD_ARG_month\" | gzip > /srv/out/$TASKD_TASK_ID.gz"
user = "root"
env = { REPORT_DIR = "/srv/reports" }
cwd = "/opt/reports"

[queues.emails]
concurrency = 8
command = ["python3", "/srv/app/email_worker.py"]
"#;

fn ok(text: &str) -> Config {
    ok_at(text, "/etc/taskd/taskd.toml", None)
}

fn ok_at(text: &str, path: &str, state_directory: Option<&str>) -> Config {
    match validate(text, Path::new(path), state_directory.map(OsString::from)) {
        Ok(c) => c,
        Err(diags) => panic!("{}", ConfigError::Invalid(diags)),
    }
}

fn errs(text: &str) -> Vec<Diagnostic> {
    match validate(text, Path::new("taskd.toml"), None) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(d) => d,
    }
}

/// The one diagnostic of `text`, which must have exactly one.
fn one(text: &str) -> Diagnostic {
    let mut d = errs(text);
    assert_eq!(d.len(), 1, "expected one diagnostic, got {d:#?}");
    d.remove(0)
}

fn at(diagnostic: &Diagnostic, line: usize, column: usize, key: &str) {
    assert_eq!(
        (diagnostic.line, diagnostic.column, diagnostic.key.as_str()),
        (line, column, key),
        "wrong place for {diagnostic}"
    );
}

fn q(name: &str) -> QueueName {
    QueueName::try_from(name.to_string()).unwrap()
}

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

#[test]
fn a_full_example_config_is_valid() {
    let c = ok(EXAMPLE);
    assert_eq!(c.path, PathBuf::from("/etc/taskd/taskd.toml"));
    assert_eq!(
        c.broker,
        BrokerUrl::Sqlite {
            path: "/var/lib/taskd/taskd.db".into()
        }
    );
    assert_eq!(c.broker.to_string(), "sqlite:///var/lib/taskd/taskd.db");
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/taskd"));
    assert_eq!(
        c.listen,
        vec![Listen::Tcp("127.0.0.1:7070".parse().unwrap())]
    );
    assert_eq!(c.shutdown_grace, secs(30));
    assert_eq!(c.max_payload, 1024 * 1024);
    assert_eq!(
        c.queues.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        ["emails", "reports", "thumbnails"]
    );

    let t = &c.queues[&q("thumbnails")];
    assert_eq!(t.name, q("thumbnails"));
    assert_eq!(t.concurrency, 4);
    assert_eq!(t.timeout, secs(120));
    assert_eq!(t.max_attempts, 5);
    assert_eq!(t.kill_grace, secs(10));
    assert_eq!(t.backoff, Backoff::default());
    let Program::Command(argv) = &t.program else {
        panic!("thumbnails runs a command")
    };
    let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
    assert_eq!(
        argv,
        ["/usr/local/bin/make-thumb", "--size", "{size}", "{src}"]
    );
    assert_eq!(
        t.required_fields().into_iter().collect::<Vec<_>>(),
        ["size", "src"]
    );
    assert_eq!(t.output_tail, 64 * 1024);
    assert_eq!(t.max_result, 1024 * 1024);
    assert_eq!(t.log_max, 10 * 1024 * 1024);
    assert!(t.fail_exit_codes.is_empty() && t.env.is_empty());
    assert_eq!(
        (&t.cwd, &t.user, &t.group, &t.log_dir),
        (&None, &None, &None, &None)
    );

    let r = &c.queues[&q("reports")];
    assert_eq!(r.concurrency, 1);
    assert_eq!(r.timeout, secs(30 * 60));
    assert_eq!(
        r.program,
        Program::Shell(
            "/opt/reports/build.sh \"$TASKD_ARG_month\" | gzip > /srv/out/$TASKD_TASK_ID.gz".into()
        )
    );
    assert!(r.required_fields().is_empty());
    assert_eq!(r.user.as_deref(), Some("root"));
    assert_eq!(
        r.env.get("REPORT_DIR").map(String::as_str),
        Some("/srv/reports")
    );
    assert_eq!(r.cwd, Some(PathBuf::from("/opt/reports")));

    assert_eq!(c.queues[&q("emails")].concurrency, 8);
}

#[test]
fn empty_file_takes_every_default() {
    let c = ok_at("", "/srv/app/taskd.toml", None);
    assert_eq!(c.state_dir, PathBuf::from("/srv/app/taskd-data"));
    assert_eq!(
        c.broker,
        BrokerUrl::Sqlite {
            path: "/srv/app/taskd-data/taskd.db".into()
        }
    );
    assert!(c.listen.is_empty());
    assert_eq!(c.shutdown_grace, secs(30));
    assert_eq!(c.max_payload, 1 << 20);
    assert!(c.queues.is_empty());
}

#[test]
fn state_dir_rules() {
    // $STATE_DIRECTORY, first entry, when the file does not say.
    let c = ok_at(
        "",
        "/srv/app/taskd.toml",
        Some("/var/lib/taskd:/var/lib/other"),
    );
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/taskd"));
    assert_eq!(
        c.broker,
        BrokerUrl::Sqlite {
            path: "/var/lib/taskd/taskd.db".into()
        }
    );
    // The file wins over the environment; relative means next to the config file.
    let c = ok_at(
        "[taskd]\nstate_dir = \"data/./state\"\nbroker = \"sqlite:q.db\"\n",
        "/srv/app/taskd.toml",
        Some("/var/lib/taskd"),
    );
    assert_eq!(c.state_dir, PathBuf::from("/srv/app/data/state"));
    assert_eq!(
        c.broker,
        BrokerUrl::Sqlite {
            path: "/srv/app/q.db".into()
        }
    );
    // A relative config path is made absolute.
    let c = ok_at("", "taskd.toml", None);
    assert!(c.state_dir.is_absolute(), "{:?}", c.state_dir);
    assert_eq!(c.path, PathBuf::from("taskd.toml"));
}

#[test]
fn real_directory_is_canonicalized() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("taskd.toml");
    std::fs::write(&file, "[queues.a]\nshell = \"true\"\ncwd = \"work\"\n").unwrap();
    let c = load(&file).unwrap();
    let real = std::fs::canonicalize(dir.path()).unwrap();
    assert_eq!(c.state_dir, real.join("taskd-data"));
    assert_eq!(c.queues[&q("a")].cwd, Some(real.join("work")));
}

#[test]
fn load_reports_a_missing_file() {
    let err = load(Path::new("/nonexistent/taskd.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err
        .to_string()
        .starts_with("failed to read config file /nonexistent/taskd.toml: "));
}

#[test]
fn inheritance_and_merging() {
    let c = ok(r#"
[taskd]
max_payload = "512KiB"

[defaults]
concurrency = 2
max_attempts = 3
timeout = "5m"
backoff = { kind = "fixed", base = "5s", max = "1m" }
kill_grace = "3s"
fail_exit_codes = [64, 65, 64]
env = { A = "1", B = "2" }
cwd = "/srv"
group = "root"
output_tail = "1KiB"
log_dir = "logs"
log_max = 2048

[queues.a]
command = ["/bin/echo", "{x}"]
env = { B = "queue", C = "3" }
backoff = { base = "20s" }

[queues.b]
shell = "true"
max_attempts = 1
output_tail = 0
backoff.jitter = false
"#);
    assert_eq!(c.max_payload, 512 * 1024);
    let a = &c.queues[&q("a")];
    assert_eq!(a.concurrency, 2);
    assert_eq!(a.max_attempts, 3);
    assert_eq!(a.timeout, secs(300));
    assert_eq!(a.kill_grace, secs(3));
    assert_eq!(a.fail_exit_codes, [64, 65]);
    assert_eq!(
        a.env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>(),
        ["A=1", "B=queue", "C=3"]
    );
    assert_eq!(a.cwd, Some(PathBuf::from("/srv")));
    assert_eq!(a.group.as_deref(), Some("root"));
    assert_eq!(a.output_tail, 1024);
    assert_eq!(a.log_dir, Some(PathBuf::from("/etc/taskd/logs")));
    assert_eq!(a.log_max, 2048);
    // Sub-keys the queue leaves out come from [defaults].backoff, then the built-in ones.
    assert_eq!(
        a.backoff,
        Backoff {
            kind: BackoffKind::Fixed,
            base: secs(20),
            max: secs(60),
            jitter: true
        }
    );
    let b = &c.queues[&q("b")];
    assert_eq!(b.max_attempts, 1);
    assert_eq!(b.output_tail, 0);
    assert_eq!(b.env.len(), 2);
    assert_eq!(
        b.backoff,
        Backoff {
            kind: BackoffKind::Fixed,
            base: secs(5),
            max: secs(60),
            jitter: false
        }
    );
}

#[test]
fn standard_tables_and_dotted_keys_work_too() {
    let c = ok(r#"
[queues.a]
shell = "true"

[queues.a.backoff]
kind = "fixed"
base = "1s"

[queues.a.env]
X = "y"

[queues]
b.shell = "false"
"#);
    let a = &c.queues[&q("a")];
    assert_eq!(a.backoff.kind, BackoffKind::Fixed);
    assert_eq!(a.backoff.base, secs(1));
    assert_eq!(a.env["X"], "y");
    assert!(c.queues.contains_key(&q("b")));
}

// ----- errors --------------------------------------------------------------------------

#[test]
fn display_format() {
    let d = one("[queues.thumbnails]\nshell = \"true\"\nconcurrency = 0\n");
    at(&d, 3, 15, "queues.thumbnails.concurrency");
    assert_eq!(
        d.to_string(),
        "taskd.toml:3:15: error: queues.thumbnails.concurrency: concurrency must be at least 1, found 0\n  fix: set `concurrency = 1` or more"
    );
    let all = ConfigError::Invalid(vec![d.clone(), d]).to_string();
    assert!(all.ends_with("\n2 errors in taskd.toml"), "{all}");
    assert_eq!(all.matches("error: queues.thumbnails").count(), 2);
    let single = ConfigError::Invalid(errs("[x]\n")).to_string();
    assert!(single.ends_with("\n1 error in taskd.toml"), "{single}");
}

#[test]
fn syntax_errors_have_a_position() {
    let d = one("[taskd]\nlisten = \"127.0.0.1:7070\n");
    assert_eq!(d.line, 2);
    assert!(d.message.starts_with("invalid TOML"), "{d}");
    assert!(d.fix.is_some());
}

#[test]
fn unquoted_duration_gets_a_hint() {
    let d = one("[queues.a]\nshell = \"true\"\ntimeout = 5m # two minutes\n");
    assert_eq!(d.line, 3);
    assert_eq!(
        d.fix.as_deref(),
        Some("durations and sizes are strings: write `timeout = \"5m\"`")
    );
}

#[test]
fn duplicate_queue() {
    let d = one("[queues.a]\nshell = \"true\"\n\n[queues.a]\nshell = \"false\"\n");
    assert_eq!(d.message, "queue `a` is defined twice");
    assert_eq!(d.key, "queues.a");
    assert_eq!(d.line, 4);
}

#[test]
fn duplicate_key() {
    let d = one("[queues.a]\nshell = \"true\"\nshell = \"false\"\n");
    assert_eq!(d.key, "queues.a.shell");
    assert!(d.message.contains("set twice"), "{d}");
    assert_eq!(d.line, 3);
}

#[test]
fn unknown_keys() {
    let d = one("[queues.a]\nshell = \"true\"\n  concurency = 2\n");
    at(&d, 3, 3, "queues.a.concurency");
    assert_eq!(d.message, "unknown key `concurency` in [queues.a]");
    assert_eq!(d.fix.as_deref(), Some("did you mean `concurrency`?"));

    let d = one("[defaults]\nzzz = 1\n");
    at(&d, 2, 1, "defaults.zzz");
    let fix = d.fix.unwrap();
    assert!(
        fix.contains("concurrency") && fix.contains("log_max"),
        "{fix}"
    );

    let d = one("[queue.a]\nshell = \"true\"\n");
    at(&d, 1, 2, "queue");
    assert_eq!(d.fix.as_deref(), Some("did you mean `queues`?"));

    let d = one("[taskd]\nconcurrency = 2\n");
    at(&d, 2, 1, "taskd.concurrency");
    assert!(d.fix.unwrap().contains("[defaults]"));

    let d = one("[defaults]\nlisten = \"127.0.0.1:1\"\n");
    assert!(d.message.contains("belongs in [taskd]"), "{d}");

    let d = one("[defaults]\ncommand = [\"x\"]\n");
    at(&d, 2, 1, "defaults.command");
    assert!(d.message.contains("[queues.NAME]"), "{d}");

    let d = one("[queues.a]\nshell = \"true\"\nbackoff = { knd = \"fixed\" }\n");
    at(&d, 3, 13, "queues.a.backoff.knd");
    assert_eq!(d.fix.as_deref(), Some("did you mean `kind`?"));
}

#[test]
fn wrong_types() {
    let d = one("[queues.a]\nshell = \"true\"\nconcurrency = \"4\"\n");
    at(&d, 3, 15, "queues.a.concurrency");
    assert_eq!(d.message, "concurrency must be an integer, found a string");
    assert_eq!(
        d.fix.as_deref(),
        Some("remove the quotes: `concurrency = 4`")
    );

    let d = one("[queues.a]\nshell = \"true\"\ntimeout = 30\n");
    at(&d, 3, 11, "queues.a.timeout");
    assert!(d.message.contains("found an integer"), "{d}");
    assert_eq!(
        d.fix.as_deref(),
        Some("a duration needs a unit: write `timeout = \"30s\"`")
    );

    let d = one("[queues.a]\nshell = [\"true\"]\n");
    at(&d, 2, 9, "queues.a.shell");
    assert_eq!(d.message, "shell must be a string, found an array");

    let d = one("[queues.a]\ncommand = \"/bin/true\"\n");
    assert!(
        d.fix.unwrap().contains("shell"),
        "a string command hints at `shell`"
    );

    let d = one("[queues.a]\nshell = \"true\"\nbackoff = \"exponential\"\n");
    assert_eq!(d.message, "backoff must be a table, found a string");

    let d = one("[queues.a]\nshell = \"true\"\nbackoff = { jitter = \"yes\" }\n");
    at(&d, 3, 22, "queues.a.backoff.jitter");

    let d = one("taskd = 5\n");
    at(&d, 1, 9, "taskd");
    assert_eq!(d.message, "taskd must be a table, found an integer");

    let d = one("[queues]\na = 5\n");
    at(&d, 2, 5, "queues.a");

    let d = one("[[queues]]\nshell = \"true\"\n");
    assert_eq!(d.key, "queues");

    let d = one("[queues.a]\nshell = \"true\"\nenv = { A = 1 }\n");
    at(&d, 3, 13, "queues.a.env.A");
    assert_eq!(
        d.fix.as_deref(),
        Some("write the value as a string: `A = \"1\"`")
    );

    let d = one("[queues.a]\nshell = \"true\"\nfail_exit_codes = [1, \"2\"]\n");
    at(&d, 3, 23, "queues.a.fail_exit_codes[1]");
}

#[test]
fn impossible_numbers() {
    let cases: &[(&str, usize, &str, &str)] = &[
        ("concurrency = -3", 15, "concurrency", "cannot be negative"),
        ("concurrency = 10001", 15, "concurrency", "at most 10000"),
        ("max_attempts = 0", 16, "max_attempts", "at least 1"),
        (
            "max_attempts = 1001",
            16,
            "max_attempts",
            "never retries without limit",
        ),
        (
            "fail_exit_codes = [0]",
            20,
            "fail_exit_codes[0]",
            "0 means success",
        ),
        (
            "fail_exit_codes = [2, 256]",
            23,
            "fail_exit_codes[1]",
            "1 to 255",
        ),
        ("output_tail = \"17MiB\"", 15, "output_tail", "too large"),
        ("output_tail = -1", 15, "output_tail", "cannot be negative"),
        ("log_max = 0", 11, "log_max", "more than zero"),
        (
            "log_max = \"10 parsecs\"",
            11,
            "log_max",
            "unknown unit `parsecs`",
        ),
    ];
    for (line, column, key, needle) in cases {
        let d = one(&format!("[queues.a]\nshell = \"true\"\n{line}\n"));
        at(&d, 3, *column, &format!("queues.a.{key}"));
        assert!(d.message.contains(needle), "{line}: {d}");
        assert!(d.fix.is_some());
    }
}

#[test]
fn bad_durations() {
    let cases: &[(&str, usize, &str)] = &[
        ("timeout = \"-5s\"", 11, "cannot be negative"),
        ("timeout = \"0s\"", 11, "longer than zero"),
        ("kill_grace = \"0s\"", 14, "longer than zero"),
        ("timeout = \"5 fortnights\"", 11, "is not a duration"),
        ("timeout = \"400d\"", 11, "too long"),
        ("backoff = { base = \"0s\" }", 20, "longer than zero"),
    ];
    for (line, column, needle) in cases {
        let d = one(&format!("[queues.a]\nshell = \"true\"\n{line}\n"));
        assert_eq!((d.line, d.column), (3, *column), "{d}");
        assert!(d.message.contains(needle), "{line}: {d}");
    }
    let d = one("[taskd]\nshutdown_grace = \"0s\"\n");
    at(&d, 2, 18, "taskd.shutdown_grace");
}

#[test]
fn backoff_base_above_max() {
    let d = one("[queues.a]\nshell = \"true\"\nbackoff = { base = \"2h\", max = \"1h\" }\n");
    at(&d, 3, 20, "queues.a.backoff.base");
    assert!(d.message.contains("longer than max"), "{d}");
    // Only max set, below the inherited base: point at max.
    let d = one("[defaults]\nbackoff = { max = \"5s\" }\n[queues.a]\nshell = \"true\"\n");
    at(&d, 2, 19, "defaults.backoff.max");
    assert!(d.message.contains("10s, inherited"), "{d}");
    // Reported once, in [defaults], not again for every queue that inherits it.
    let d = errs("[defaults]\nbackoff = { base = \"2h\" }\n[queues.a]\nshell = \"true\"\n[queues.b]\nshell = \"true\"\n");
    assert_eq!(d.len(), 1, "{d:#?}");
    // An invalid base is reported once, without a follow-on comparison error.
    let d = one("[queues.a]\nshell = \"true\"\nbackoff = { base = \"x\", max = \"1s\" }\n");
    assert!(d.message.contains("not a duration"), "{d}");
    let d = one("[queues.a]\nshell = \"true\"\nbackoff = { kind = \"exponental\" }\n");
    assert_eq!(
        d.fix.as_deref(),
        Some("did you mean `kind = \"exponential\"`?")
    );
}

#[test]
fn program_errors() {
    let d = one("[queues.a]\nconcurrency = 2\n");
    at(&d, 1, 1, "queues.a");
    assert!(d.message.contains("nothing to run"), "{d}");

    let d = one("[queues.a]\ncommand = [\"/bin/true\"]\nshell = \"true\"\n");
    at(&d, 3, 1, "queues.a.shell");
    assert!(d.message.contains("both"), "{d}");

    let d = one("[queues.a]\ncommand = []\n");
    at(&d, 2, 11, "queues.a.command");
    assert!(d.message.contains("empty"), "{d}");

    let d = one("[queues.a]\ncommand = [\"\", \"x\"]\n");
    at(&d, 2, 12, "queues.a.command[0]");

    let d = one("[queues.a]\nshell = \"  \"\n");
    at(&d, 2, 9, "queues.a.shell");

    let d = one("[queues.a]\ncommand = [\"/bin/echo\", \"{1x}\"]\n");
    at(&d, 2, 25, "queues.a.command[1]");
    assert!(
        d.message.contains("`{1x}`") && d.message.contains("letter"),
        "{d}"
    );

    let d = one("[queues.a]\ncommand = [\"{prog}\"]\n");
    at(&d, 2, 12, "queues.a.command[0]");
    assert!(d.message.contains("program name"), "{d}");

    let d = one("[queues.a]\ncommand = [\"/bin/echo\", 3]\n");
    at(&d, 2, 25, "queues.a.command[1]");
}

#[test]
fn worker_queues() {
    let c = crate::config::parse_str(
        "[queues.emails]\nconcurrency = 8\nworker = [\"python3\", \"w.py\"]\nmax_tasks_per_worker = 1000\nmax_worker_memory = \"512MiB\"\nstart_secs = \"0s\"\nstart_retries = 5\n",
        std::path::Path::new("/etc/taskd/taskd.toml"),
    )
    .expect("valid");
    let q = c.queues.values().next().expect("one queue");
    let w = q.worker().expect("a worker queue");
    assert_eq!(w.argv, ["python3", "w.py"]);
    assert_eq!(w.max_tasks, Some(1000));
    assert_eq!(w.max_memory, Some(512 << 20));
    assert_eq!(w.start_secs, Duration::ZERO);
    assert_eq!(w.start_retries, 5);
    let c = crate::config::parse_str(
        "[queues.e]\nworker = [\"w\"]\n",
        std::path::Path::new("/etc/taskd/taskd.toml"),
    )
    .expect("valid");
    let w = c
        .queues
        .values()
        .next()
        .and_then(|q| q.worker().cloned())
        .expect("worker");
    assert_eq!(
        (w.start_secs, w.start_retries, w.max_tasks, w.max_memory),
        (Duration::from_secs(1), 3, None, None)
    );
}

#[test]
fn worker_errors() {
    let d = one("[queues.e]\nshell = \"true\"\nworker = [\"w\"]\n");
    at(&d, 3, 1, "queues.e.worker");
    assert!(
        d.message.contains("one of `command`, `shell` or `worker`"),
        "{d}"
    );
    let d = one("[queues.e]\nshell = \"true\"\nmax_tasks_per_worker = 10\n");
    at(&d, 3, 1, "queues.e.max_tasks_per_worker");
    assert!(d.message.contains("applies to long-lived workers"), "{d}");
    assert!(d.fix.as_deref().unwrap_or("").contains("worker = ["), "{d}");
    let d = one("[queues.e]\nworker = []\n");
    at(&d, 2, 10, "queues.e.worker");
    let d = one("[queues.e]\nworker = [\"w\"]\nmax_worker_memory = \"12 parsecs\"\n");
    at(&d, 3, 21, "queues.e.max_worker_memory");
    let d = one("[queues.e]\nworker = [\"w\"]\nstart_retries = 0\n");
    at(&d, 3, 17, "queues.e.start_retries");
    let d = one("[defaults]\nstart_secs = \"1s\"\n[queues.e]\nworker = [\"w\"]\n");
    at(&d, 2, 1, "defaults.start_secs");
    let d = one("[queues.e]\n");
    assert!(d.message.contains("`command`, `shell` or `worker`"), "{d}");
}

#[test]
fn queue_names() {
    let d = one("[queues.\"bad name\"]\nshell = \"true\"\n");
    at(&d, 1, 9, "queues.\"bad name\"");
    assert!(d.message.contains("cannot be a queue name"), "{d}");
    assert_eq!(d.fix.as_deref(), Some("rename it, e.g. [queues.bad-name]"));
}

#[test]
fn accounts_paths_env_listen_broker() {
    let d = one("[queues.a]\nshell = \"true\"\nuser = \"no-such-user-taskd\"\n");
    at(&d, 3, 8, "queues.a.user");
    assert!(d.message.contains("does not exist"), "{d}");

    let d = one("[defaults]\ngroup = \"no-such-group-taskd\"\n");
    at(&d, 2, 9, "defaults.group");

    let d = one("[queues.a]\nshell = \"true\"\ncwd = \"~/work\"\n");
    at(&d, 3, 7, "queues.a.cwd");
    assert!(d.message.contains('~'), "{d}");

    let d = one("[defaults]\nlog_dir = \"\"\n");
    at(&d, 2, 11, "defaults.log_dir");

    let d = one("[queues.a]\nshell = \"true\"\nenv = { \"BAD-NAME\" = \"x\" }\n");
    at(&d, 3, 9, "queues.a.env.BAD-NAME");
    assert_eq!(d.fix.as_deref(), Some("rename it, e.g. `BAD_NAME`"));

    let d = one("[defaults]\nenv = { TASKD_QUEUE = \"x\" }\n");
    at(&d, 2, 9, "defaults.env.TASKD_QUEUE");

    let d = one("[taskd]\nlisten = \"localhost:7070\"\n");
    at(&d, 2, 10, "taskd.listen");

    let d = one("[taskd]\nbroker = \"postgres://127.0.0.1/taskd?schema=Jobs\"\n");
    at(&d, 2, 10, "taskd.broker");
    #[cfg(feature = "postgres")]
    assert!(
        d.message.contains("`schema=Jobs` is not a schema name"),
        "{d}"
    );
    #[cfg(not(feature = "postgres"))]
    assert!(d.message.contains("without the PostgreSQL broker"), "{d}");
    #[cfg(feature = "redis")]
    {
        let d = one("[taskd]\nbroker = \"redis://:pw@host:port/0\"\n");
        at(&d, 2, 10, "taskd.broker");
        assert!(d.message.contains("redis broker URL is invalid"), "{d}");
        assert!(!d.message.contains(":pw@"), "the password is shown: {d}");
    }

    let d = one("[taskd]\nbroker = \"mysql://x\"\n");
    assert!(d.message.contains("sqlite:"), "{d}");

    let d = one("[taskd]\nmax_payload = \"1 parsec\"\n");
    at(&d, 2, 15, "taskd.max_payload");
    let d = one("[taskd]\nmax_payload = 0\n");
    assert!(d.message.contains("more than zero"), "{d}");
}

#[test]
fn every_error_is_reported() {
    let text = r#"[taskd]
listen = "nowhere"
bogus = 1

[defaults]
timeout = "-1s"

[queues.a]
concurrency = 0
command = ["/bin/x", "{}"]
max_attempts = 5000

[queues.b]
user = "no-such-user-taskd"
"#;
    let d = errs(text);
    let places: Vec<(usize, &str)> = d.iter().map(|d| (d.line, d.key.as_str())).collect();
    assert_eq!(
        places,
        [
            (2, "taskd.listen"),
            (3, "taskd.bogus"),
            (6, "defaults.timeout"),
            (9, "queues.a.concurrency"),
            (10, "queues.a.command[1]"),
            (11, "queues.a.max_attempts"),
            (13, "queues.b"),
            (14, "queues.b.user"),
        ]
    );
    let shown = ConfigError::Invalid(d).to_string();
    assert!(shown.ends_with("8 errors in taskd.toml"), "{shown}");
}

#[test]
fn columns_count_characters() {
    let d = errs("[queues.a]\nshell = \"true\"\nenv = { \"é\" = \"x\", A = 1 }\n");
    assert_eq!(d.len(), 2, "{d:#?}");
    at(&d[0], 3, 9, "queues.a.env.\"é\"");
    // `é` is two bytes but one column.
    at(&d[1], 3, 24, "queues.a.env.A");
}

#[test]
fn umask_limits_and_env_inherit_are_inherited() {
    let c = ok(r#"
[defaults]
umask = "027"
limits = { nofile = 4096, core = 0, as = "unlimited" }
env_inherit = ["http_proxy", "LC_TIME", "http_proxy"]

[queues.a]
shell = "true"
limits = { nproc = 20, nofile = 2048, cpu = "10m" }

[queues.b]
shell = "true"
umask = 0o077
env_inherit = []
limits.fsize = "1GiB"

[queues.c]
shell = "true"
umask = 0
"#);
    let a = &c.queues[&q("a")];
    assert_eq!(a.umask, Some(0o027));
    assert_eq!(
        a.limits,
        Limits {
            nofile: Some(LimitValue::Finite(2048)),
            nproc: Some(LimitValue::Finite(20)),
            address_space: Some(LimitValue::Unlimited),
            cpu: Some(LimitValue::Finite(600)),
            fsize: None,
            core: Some(LimitValue::Finite(0)),
        }
    );
    assert_eq!(
        a.env_inherit,
        ["http_proxy", "LC_TIME"],
        "duplicates dropped"
    );
    let b = &c.queues[&q("b")];
    assert_eq!(b.umask, Some(0o077));
    assert!(
        b.env_inherit.is_empty(),
        "a queue's list replaces the defaults' list"
    );
    assert_eq!(b.limits.fsize, Some(LimitValue::Finite(1 << 30)));
    assert_eq!(b.limits.nofile, Some(LimitValue::Finite(4096)));
    assert_eq!(c.queues[&q("c")].umask, Some(0));
    let set = |l: &Limits| {
        [
            ("nofile", l.nofile),
            ("nproc", l.nproc),
            ("as", l.address_space),
            ("cpu", l.cpu),
            ("fsize", l.fsize),
            ("core", l.core),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.map(|_| key))
        .collect::<Vec<_>>()
    };
    assert_eq!(set(&b.limits), ["nofile", "as", "fsize", "core"]);

    let plain = &ok("[queues.p]\nshell = \"true\"\n").queues[&q("p")];
    assert_eq!(
        (plain.umask, plain.limits, plain.env_inherit.len()),
        (None, Limits::default(), 0)
    );
    assert_eq!(
        ok("[queues.p]\nshell = \"true\"\nlimits = { cpu = 90 }\numask = \"0o22\"\n").queues
            [&q("p")]
            .limits
            .cpu,
        Some(LimitValue::Finite(90))
    );
}

#[test]
fn umask_errors() {
    let d = one("[queues.a]\nshell = \"true\"\numask = 27\n");
    at(&d, 3, 9, "queues.a.umask");
    assert!(
        d.message.contains("decimal") && d.message.contains("octal"),
        "{d}"
    );
    assert_eq!(d.fix.as_deref(), Some("write `umask = \"027\"` (octal)"));

    let d = one("[defaults]\numask = \"089\"\n");
    at(&d, 2, 9, "defaults.umask");
    assert!(d.message.contains("octal digits"), "{d}");

    let d = one("[defaults]\numask = \"1777\"\n");
    assert!(d.message.contains("out of range"), "{d}");
    let d = one("[defaults]\numask = 0o1000\n");
    assert!(d.message.contains("out of range"), "{d}");

    let d = one("[defaults]\numask = true\n");
    assert!(d.message.contains("must be an octal string"), "{d}");
    let d = one("[defaults]\numask = \"\"\n");
    at(&d, 2, 9, "defaults.umask");
}

#[test]
fn limits_errors() {
    let d = one("[queues.a]\nshell = \"true\"\nlimits = { nofile = 1024, stack = \"8MiB\" }\n");
    at(&d, 3, 27, "queues.a.limits.stack");
    assert!(d.message.contains("unknown key `stack`"), "{d}");
    assert!(
        d.fix
            .as_deref()
            .is_some_and(|f| f.contains("nofile, nproc, as, cpu, fsize, core")),
        "{d}"
    );

    let d = one("[defaults]\nlimits = { rss = \"1GiB\" }\n");
    at(&d, 2, 12, "defaults.limits.rss");
    assert!(d.fix.as_deref().is_some_and(|f| f.contains("`as`")), "{d}");

    let d = one("[defaults]\nlimits = { nofile = 0 }\n");
    at(&d, 2, 21, "defaults.limits.nofile");
    assert!(d.message.contains("at least 1"), "{d}");

    let d = one("[defaults]\nlimits = { nofile = \"unlimited\" }\n");
    assert!(d.message.contains("cannot be unlimited"), "{d}");

    let d = one("[defaults]\nlimits = { nproc = \"20:40\" }\n");
    at(&d, 2, 20, "defaults.limits.nproc");
    assert!(d.message.contains("soft:hard"), "{d}");
    assert_eq!(
        d.fix.as_deref(),
        Some("write one value, such as `nproc = 20`")
    );

    let d = one("[defaults]\nlimits = { as = \"1KiB\" }\n");
    at(&d, 2, 17, "defaults.limits.as");
    assert!(d.message.contains("at least 16MiB"), "{d}");

    let d = one("[defaults]\nlimits = { cpu = \"1500ms\" }\n");
    assert!(d.message.contains("whole seconds"), "{d}");
    assert_eq!(d.fix.as_deref(), Some("write `cpu = \"2s\"`"));
    let d = one("[defaults]\nlimits = { cpu = \"soon\" }\n");
    assert!(d.message.contains("not a duration"), "{d}");
    let d = one("[defaults]\nlimits = { cpu = -5 }\n");
    assert!(d.message.contains("negative"), "{d}");
    let d = one("[defaults]\nlimits = { fsize = \"lots\" }\n");
    at(&d, 2, 20, "defaults.limits.fsize");

    let d = one("[defaults]\nlimits = 5\n");
    at(&d, 2, 10, "defaults.limits");
    assert!(d.message.contains("must be a table"), "{d}");

    // Every bad sub-key is reported.
    let d = errs("[defaults]\nlimits = { nofile = -1, nproc = true, core = \"x\" }\n");
    assert_eq!(d.len(), 3, "{d:#?}");
}

#[test]
fn env_inherit_errors() {
    let text = r#"[queues.a]
shell = "true"
env_inherit = ["LANG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "JOURNAL_STREAM", "TASKD_TOKEN", "LC_*", "BAD-NAME", 5]
"#;
    let d = errs(text);
    let keys: Vec<&str> = d.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(
        keys,
        (1..=8)
            .map(|i| format!("queues.a.env_inherit[{i}]"))
            .collect::<Vec<_>>()
    );
    at(&d[0], 3, 24, "queues.a.env_inherit[1]");
    assert!(
        d[0].message
            .contains("`NOTIFY_SOCKET` is never passed to tasks"),
        "{}",
        d[0]
    );
    assert!(d[0].message.contains("service manager"), "{}", d[0]);
    assert_eq!(
        d[0].fix.as_deref(),
        Some("remove \"NOTIFY_SOCKET\" from env_inherit")
    );
    for d in &d[1..=3] {
        assert!(d.message.contains("never passed to tasks"), "{d}");
    }
    assert!(d[4].message.contains("TASKD_ variables"), "{}", d[4]);
    assert!(d[5].message.contains("pattern"), "{}", d[5]);
    assert!(
        d[6].message
            .contains("not a valid environment variable name"),
        "{}",
        d[6]
    );
    assert!(d[7].message.contains("found an integer"), "{}", d[7]);

    let d = one("[defaults]\nenv_inherit = \"LANG\"\n");
    at(&d, 2, 15, "defaults.env_inherit");
}

fn errs_as(text: &str, euid: u32, egid: u32) -> Vec<Diagnostic> {
    let id = Some(validate::Identity { euid, egid });
    match validate::validate_as(text, Path::new("taskd.toml"), None, id) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(d) => d,
    }
}

fn ok_as(text: &str, euid: u32, egid: u32) -> Config {
    let id = Some(validate::Identity { euid, egid });
    match validate::validate_as(text, Path::new("taskd.toml"), None, id) {
        Ok(c) => c,
        Err(diags) => panic!("{}", ConfigError::Invalid(diags)),
    }
}

#[test]
fn switching_users_needs_a_root_daemon() {
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("nobody exists");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());

    let d = errs_as("[queues.a]\nshell = \"true\"\nuser = \"root\"\n", uid, gid);
    assert_eq!(d.len(), 1, "{d:#?}");
    at(&d[0], 3, 8, "queues.a.user");
    assert!(d[0].message.contains("`nobody` (uid 65534)"), "{}", d[0]);
    assert!(
        d[0].message.contains("the daemon must run as root"),
        "{}",
        d[0]
    );
    assert!(
        d[0].fix
            .as_deref()
            .is_some_and(|f| f.contains("remove `user`")),
        "{}",
        d[0]
    );

    // Its own user is no switch.
    ok_as(
        "[queues.a]\nshell = \"true\"\nuser = \"nobody\"\n",
        uid,
        gid,
    );
    // Root may switch to anyone; a client that only submits is not checked.
    ok_as("[queues.a]\nshell = \"true\"\nuser = \"nobody\"\n", 0, 0);
    validate::validate_as(
        "[queues.a]\nshell = \"true\"\nuser = \"root\"\n",
        Path::new("taskd.toml"),
        None,
        None,
    )
    .expect("a client does not need root");

    // A [defaults] user every queue inherits is reported once, where it is set.
    let d = errs_as(
        "[defaults]\nuser = \"root\"\n\n[queues.a]\nshell = \"true\"\n\n[queues.b]\nshell = \"true\"\n",
        uid,
        gid,
    );
    assert_eq!(d.len(), 1, "{d:#?}");
    at(&d[0], 2, 8, "defaults.user");

    // A group other than its own needs root too, with or without `user`.
    let d = errs_as("[queues.a]\nshell = \"true\"\ngroup = \"root\"\n", uid, gid);
    assert_eq!(d.len(), 1, "{d:#?}");
    at(&d[0], 3, 9, "queues.a.group");
    assert!(d[0].message.contains("switch groups"), "{}", d[0]);
    let d = errs_as(
        "[queues.a]\nshell = \"true\"\nuser = \"nobody\"\ngroup = \"root\"\n",
        uid,
        gid,
    );
    assert_eq!(d.len(), 1, "{d:#?}");
    at(&d[0], 4, 9, "queues.a.group");
}

#[test]
fn api_tokens() {
    let tok = "0123456789abcdef0123";
    let c = ok(&format!(
        "[taskd]\nlisten = \"0.0.0.0:7070\"\ntoken = \"{tok}\"\n"
    ));
    assert_eq!(c.token_name(tok), Some("default"));
    assert_eq!(c.token_name("0123"), None);
    assert!(
        !format!("{c:?}").contains(tok),
        "Debug must not show the token"
    );
    // A loopback listen needs none.
    assert!(!ok("[taskd]\nlisten = \"[::1]:7070\"\n").has_tokens());
    let d = one("[taskd]\nlisten = \"0.0.0.0:7070\"\n");
    at(&d, 2, 10, "taskd.listen");
    assert!(d.fix.as_deref().unwrap_or("").contains("token_file"), "{d}");
    let d = one("[taskd]\ntoken = \"short\"\n");
    at(&d, 2, 9, "taskd.token");
    assert!(!d.to_string().contains("\"short\""), "{d}");
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{tok}\n")).expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let c = ok(&format!("[taskd]\ntoken_file = \"{}\"\n", file.display()));
    assert_eq!(c.token_name(tok), Some("default"));
    let d = one(&format!(
        "[taskd]\ntoken = \"{tok}\"\ntoken_file = \"{}\"\n",
        file.display()
    ));
    assert!(d.message.contains("both"), "{d}");
    let d = one("[taskd]\ntoken_file = \"/nonexistent/taskd-token\"\n");
    at(&d, 2, 14, "taskd.token_file");
}

/// A token file with `text`, mode `mode`, in `dir`.
fn token_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{text}\n")).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p
}

#[test]
fn named_tokens_in_both_forms() {
    let dir = tempfile::tempdir().expect("dir");
    let ci = token_file(dir.path(), "ci", "ci-token-0123456789abcdef", 0o600);
    let dash = token_file(dir.path(), "dash", "dash-token-0123456789abcdef", 0o640);
    let single = "single-token-0123456789abcdef";
    let inline = ok(&format!(
        "[taskd]\nlisten = \"0.0.0.0:7070\"\ntoken = \"{single}\"\ntokens = [{{ name = \"ci\", token_file = \"{}\" }}, {{ name = \"dash.v2\", token_file = \"{}\" }}]\n",
        ci.display(),
        dash.display()
    ));
    let tables = ok(&format!(
        "[taskd]\nlisten = \"0.0.0.0:7070\"\ntoken = \"{single}\"\n\n[[taskd.tokens]]\nname = \"ci\"\ntoken_file = \"{}\"\n\n[[taskd.tokens]]\nname = \"dash.v2\"\ntoken_file = \"{}\"\n",
        ci.display(),
        dash.display()
    ));
    for c in [&inline, &tables] {
        let names: Vec<&str> = c.tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["default", "ci", "dash.v2"]);
        assert_eq!(c.token_name(single), Some("default"));
        assert_eq!(c.token_name("ci-token-0123456789abcdef"), Some("ci"));
        assert_eq!(c.token_name("dash-token-0123456789abcdef"), Some("dash.v2"));
        assert_eq!(c.token_name("ci-token-0123456789abcde"), None);
        assert_eq!(c.audit_keep, defaults::AUDIT_KEEP);
        assert!(
            !format!("{c:?}").contains("ci-token"),
            "Debug shows a token"
        );
    }
    // Named tokens alone are enough for a non-loopback listen.
    let c = ok(
        "[taskd]\nlisten = \"0.0.0.0:7070\"\ntokens = [{ name = \"ci\", token = \"inline-token-0123456789\" }]\n",
    );
    assert_eq!(c.token_name("inline-token-0123456789"), Some("ci"));
    let c = ok("[taskd]\naudit_keep = 5\n");
    assert_eq!(c.audit_keep, 5);
}

/// A client command never opens token files: they may be the daemon's alone (0600, root),
/// and loose or missing ones are for `check` and `start` to refuse.
#[test]
fn clients_do_not_open_token_files() {
    let dir = tempfile::tempdir().expect("dir");
    let loose = token_file(dir.path(), "loose", "loose-token-0123456789abcdef", 0o644);
    let text = format!(
        "[taskd]\nlisten = \"0.0.0.0:7070\"\ntoken_file = \"/nonexistent/taskd-token\"\ntokens = [{{ name = \"ci\", token_file = \"{}\" }}]\n",
        loose.display()
    );
    let c = super::validate::validate_as(&text, Path::new("/etc/taskd/taskd.toml"), None, None)
        .unwrap_or_else(|d| panic!("{}", ConfigError::Invalid(d)));
    let names: Vec<&str> = c.tokens.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["default", "ci"]);
    assert!(c.tokens.iter().all(|t| t.secret.is_none()));
    assert_eq!(c.token_name("loose-token-0123456789abcdef"), None);
    // The daemon (and `check`) refuse both files.
    let d = errs(&text);
    assert_eq!(d.len(), 2, "{d:#?}");
}

#[test]
fn listen_takes_a_list_of_tcp_addresses_and_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taskd.toml");
    let c = ok_at(
        "[taskd]\nlisten = [\"127.0.0.1:7070\", \"unix:api.sock\", \"unix:/tmp/x.sock\"]\nlisten_group = \"root\"\n",
        path.to_str().unwrap(),
        None,
    );
    assert_eq!(
        c.listen,
        vec![
            Listen::Tcp("127.0.0.1:7070".parse().unwrap()),
            Listen::Unix(dir.path().join("api.sock")),
            Listen::Unix(PathBuf::from("/tmp/x.sock")),
        ]
    );
    assert_eq!(c.listen_group.as_deref(), Some("root"));
    assert_eq!(
        c.listen[1].to_string(),
        format!("unix:{}", dir.path().join("api.sock").display())
    );
    // One string still works, and a Unix socket alone needs no token.
    let c = ok("[taskd]\nlisten = \"unix:/tmp/api.sock\"\n");
    assert_eq!(c.listen, vec![Listen::Unix(PathBuf::from("/tmp/api.sock"))]);
    assert!(!c.has_tokens());

    // Each bad entry is reported at its own place.
    let d = one("[taskd]\nlisten = [\"127.0.0.1:7070\", \"localhost:1\"]\n");
    at(&d, 2, 29, "taskd.listen[1]");
    assert!(d.fix.as_deref().unwrap_or("").contains("unix:"), "{d}");
    let d = one("[taskd]\nlisten = [\"unix:/no/such/dir/api.sock\"]\n");
    at(&d, 2, 11, "taskd.listen[0]");
    assert!(d.message.contains("/no/such/dir"), "{d}");
    let d = one("[taskd]\nlisten = [\"unix:~/api.sock\"]\n");
    assert!(
        d.fix.as_deref().unwrap_or("").contains("absolute path"),
        "{d}"
    );
    let long = format!("unix:/tmp/{}", "s".repeat(120));
    let d = one(&format!("[taskd]\nlisten = [\"{long}\"]\n"));
    assert!(d.message.contains("at most 107"), "{d}");
    let d = one("[taskd]\nlisten = [7070]\n");
    at(&d, 2, 11, "taskd.listen[0]");
    let d = one("[taskd]\nlisten = 7070\n");
    assert!(d.message.contains("a string or a list of strings"), "{d}");
    // A non-loopback TCP entry of a list still needs a token, named at its place.
    let d = one("[taskd]\nlisten = [\"unix:/tmp/a.sock\", \"0.0.0.0:7070\"]\n");
    at(&d, 2, 31, "taskd.listen");
    assert!(d.message.contains("0.0.0.0:7070"), "{d}");
    let d = one("[taskd]\nlisten_group = \"no-such-group-taskd\"\n");
    at(&d, 2, 16, "taskd.listen_group");
    assert!(d.fix.as_deref().unwrap_or("").contains("groupadd"), "{d}");
}

#[test]
fn a_schedules_task_takes_its_queues_expiry() {
    let c = ok("[queues.report]\nshell = 'true'\nexpires = \"1h\"\n\n\
                [queues.plain]\nshell = 'true'\n\n\
                [schedules.hourly]\nqueue = \"report\"\nevery = \"10m\"\n\n\
                [schedules.other]\nqueue = \"plain\"\nevery = \"10m\"\n");
    let before = crate::model::now_ms();
    let t = c.schedules["hourly"].task();
    let after = crate::model::now_ms();
    let at = t
        .expires_at
        .expect("the queue's expires reaches the slot's task");
    assert!(
        (before + 3_600_000..=after + 3_600_000).contains(&at),
        "expires_at {at} is not an hour after {before}..{after}"
    );
    assert_eq!(c.schedules["other"].task().expires_at, None);
}

#[test]
fn a_url_shown_hides_its_password_and_keeps_its_user() {
    assert_eq!(
        redact_url("postgres://app:s3cret@db:5432/app"),
        "postgres://app:***@db:5432/app"
    );
    assert_eq!(
        redact_url("redis://:s3cret@r:6379/0"),
        "redis://:***@r:6379/0"
    );
    // No password: the user stays, and no `***` suggests one.
    assert_eq!(
        redact_url("postgres://postgres@127.0.0.1:5432/t"),
        "postgres://postgres@127.0.0.1:5432/t"
    );
    assert_eq!(
        redact_url("redis://127.0.0.1:6379/0"),
        "redis://127.0.0.1:6379/0"
    );
}
