//! Bad configs through the real binary: `taskd check -c FILE` (and `start`, `submit`) must exit
//! 78 and print, for every problem, `FILE:LINE:COL: error: KEY: message` with a `fix:` line.
//!
//! Each test writes a config with [`Env::raw`] so line numbers are exactly those of the text
//! in the test; `cat -n` the string to check an expectation.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Env;

/// Exit code for an invalid config (EX_CONFIG).
const EX_CONFIG: i32 = 78;

/// One diagnostic as printed: `FILE:LINE:COL: error: REST` and an optional `  fix: ...` line.
#[derive(Debug)]
struct Diag {
    file: String,
    line: usize,
    col: usize,
    /// Everything after `error: ` (the dotted key, `: `, the message).
    rest: String,
    fix: Option<String>,
}

fn parse_diags(stderr: &str) -> Vec<Diag> {
    let mut out: Vec<Diag> = Vec::new();
    for l in stderr.lines() {
        if let Some(fix) = l.strip_prefix("  fix: ") {
            if let Some(last) = out.last_mut() {
                assert!(
                    last.fix.is_none(),
                    "two fix lines for one diagnostic:\n{stderr}"
                );
                last.fix = Some(fix.to_string());
            }
            continue;
        }
        let Some(i) = l.find(": error: ") else {
            continue;
        };
        let mut pos = l[..i].rsplitn(3, ':');
        let col = pos.next().and_then(|c| c.parse().ok());
        let line = pos.next().and_then(|c| c.parse().ok());
        let file = pos.next();
        let (Some(col), Some(line), Some(file)) = (col, line, file) else {
            panic!("diagnostic without FILE:LINE:COL: {l:?}\nstderr:\n{stderr}");
        };
        out.push(Diag {
            file: file.to_string(),
            line,
            col,
            rest: l[i + ": error: ".len()..].to_string(),
            fix: None,
        });
    }
    out
}

/// Run `taskd ARGS` and kill it if it has not exited by the deadline (so a command that
/// wrongly starts a daemon fails the test instead of hanging it).
fn run_with_deadline(mut cmd: Command, deadline: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn taskd");
    let start = Instant::now();
    let ok = common::poll(deadline, || matches!(child.try_wait(), Ok(Some(_))));
    if !ok {
        let _ = child.kill();
        let out = child.wait_with_output().expect("reap taskd");
        panic!(
            "taskd did not exit within {deadline:?} (ran {:?}); stderr:\n{}",
            start.elapsed(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.wait_with_output().expect("collect taskd output")
}

/// A checked bad config: its stderr and parsed diagnostics.
struct Bad {
    env: Env,
    stderr: String,
    diags: Vec<Diag>,
}

impl Bad {
    /// The diagnostic for `key`; the key must be printed right after `error: `.
    fn diag(&self, key: &str) -> &Diag {
        let prefix = format!("{key}: ");
        let found: Vec<&Diag> = self
            .diags
            .iter()
            .filter(|d| d.rest.starts_with(&prefix))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected exactly one diagnostic for key `{key}`, found {}:\n{}",
            found.len(),
            self.stderr
        );
        found[0]
    }

    /// Assert the diagnostic for `key`: file, line, column, message fragments, fix fragment.
    fn expect(
        &self,
        line: usize,
        col: usize,
        key: &str,
        message: &[&str],
        fix: Option<&str>,
    ) -> &Self {
        let d = self.diag(key);
        let file = self.env.config.display().to_string();
        assert_eq!(
            d.file, file,
            "diagnostic names the wrong file:\n{}",
            self.stderr
        );
        assert_eq!(
            (d.line, d.col),
            (line, col),
            "wrong position for `{key}` (want line {line}, column {col}):\n{}",
            self.stderr
        );
        for m in message {
            assert!(
                d.rest.contains(m),
                "message for `{key}` lacks {m:?}: {:?}\nstderr:\n{}",
                d.rest,
                self.stderr
            );
        }
        if let Some(f) = fix {
            let got = d
                .fix
                .as_deref()
                .unwrap_or_else(|| panic!("no fix for `{key}`:\n{}", self.stderr));
            assert!(
                got.contains(f),
                "fix for `{key}` lacks {f:?}: {got:?}\nstderr:\n{}",
                self.stderr
            );
        }
        self
    }

    fn count(&self, n: usize) -> &Self {
        assert_eq!(
            self.diags.len(),
            n,
            "want {n} diagnostics:\n{}",
            self.stderr
        );
        self
    }
}

/// `taskd check -c FILE` on `text`: must exit 78 and print nothing on stdout.
fn check_bad(text: &str) -> Bad {
    check_bad_in(Env::raw(text))
}

/// [`check_bad`] on a config already written, with files beside it.
fn check_bad_in(env: Env) -> Bad {
    let text = std::fs::read_to_string(&env.config).expect("read the config");
    let out = run_with_deadline(env.cmd(&["check"]), Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(EX_CONFIG),
        "taskd check should exit 78 on:\n{text}\nstdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    let diags = parse_diags(&stderr);
    assert!(!diags.is_empty(), "no diagnostics printed:\n{stderr}");
    for d in &diags {
        assert!(
            d.fix.is_some(),
            "every diagnostic should carry a fix: {d:?}\nstderr:\n{stderr}"
        );
    }
    // The closing summary names the file and the number of errors.
    let n = diags.len();
    let summary = format!("{n} error{} found", if n == 1 { "" } else { "s" });
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(&env.config.display().to_string()) && last.contains(&summary),
        "last stderr line should be `FILE: {summary}...`, got {last:?}"
    );
    assert!(
        !env.path().join("state").exists(),
        "check must not create the state directory"
    );
    Bad { env, stderr, diags }
}

const STATE: &str = "[taskd]\nstate_dir = \"state\"\n";

// ----- unknown keys ------------------------------------------------------------------------

#[test]
fn unknown_key_near_miss_says_did_you_mean() {
    let text = "\
[queues.thumbs]
concurency = 4
command = [\"/bin/true\"]
";
    check_bad(text).count(1).expect(
        2,
        1,
        "queues.thumbs.concurency",
        &["unknown key `concurency`", "[queues.thumbs]"],
        Some("did you mean `concurrency`?"),
    );

    // The same in [taskd] and in a backoff table.
    let text = "\
[taskd]
state_dir = \"state\"
brokr = \"sqlite:x.db\"

[defaults]
backoff = { kind = \"fixed\", bsae = \"5s\" }

[queues.a]
shell = \"true\"
";
    check_bad(text)
        .count(2)
        .expect(
            3,
            1,
            "taskd.brokr",
            &["unknown key `brokr`"],
            Some("did you mean `broker`?"),
        )
        .expect(
            6,
            29,
            "defaults.backoff.bsae",
            &["unknown key `bsae`"],
            Some("did you mean `base`?"),
        );
}

#[test]
fn unknown_key_far_from_any_lists_the_allowed_keys() {
    let text = "\
[defaults]
timeout = \"1m\"
zzzzqqq = 1

[queues.a]
shell = \"true\"
";
    let bad = check_bad(text);
    bad.count(1).expect(
        3,
        1,
        "defaults.zzzzqqq",
        &["unknown key `zzzzqqq`", "[defaults]"],
        Some("the keys allowed here are:"),
    );
    let fix = bad.diag("defaults.zzzzqqq").fix.clone().unwrap();
    assert!(
        !fix.contains("did you mean"),
        "no near miss, so no `did you mean`: {fix}"
    );
    for key in ["concurrency", "timeout", "max_attempts", "backoff"] {
        assert!(
            fix.contains(key),
            "allowed keys should include {key}: {fix}"
        );
    }
    // A top-level stray table.
    let text = "[queue.a]\nshell = \"true\"\n";
    check_bad(text).count(1).expect(
        1,
        2,
        "queue",
        &["unknown key `queue`", "top level"],
        Some("did you mean `queues`?"),
    );
}

#[test]
fn key_in_the_wrong_table_says_where_it_belongs() {
    let text = "\
[taskd]
state_dir = \"state\"
concurrency = 4

[queues.a]
shell = \"true\"
broker = \"sqlite:x.db\"
";
    check_bad(text)
        .count(2)
        .expect(
            3,
            1,
            "taskd.concurrency",
            &["queue setting"],
            Some("[defaults]"),
        )
        .expect(
            7,
            1,
            "queues.a.broker",
            &["belongs in [taskd]"],
            Some("move it under the [taskd] table"),
        );
}

// ----- types and values --------------------------------------------------------------------

#[test]
fn wrong_types_name_expected_and_found() {
    let text = "\
[queues.thumbs]
command = [\"/bin/true\"]
concurrency = \"four\"
max_attempts = \"3\"
timeout = 30
env = { REPORT_DIR = 5 }
command_x = 1
";
    check_bad(text)
        .count(5)
        .expect(
            3,
            15,
            "queues.thumbs.concurrency",
            &["must be an integer", "found a string"],
            Some("concurrency = 4"),
        )
        .expect(
            4,
            16,
            "queues.thumbs.max_attempts",
            &["must be an integer", "found a string"],
            Some("remove the quotes: `max_attempts = 3`"),
        )
        .expect(
            5,
            11,
            "queues.thumbs.timeout",
            &["duration string", "found an integer"],
            Some("timeout = \"30s\""),
        )
        .expect(
            6,
            22,
            "queues.thumbs.env.REPORT_DIR",
            &["must be strings", "found an integer"],
            Some("REPORT_DIR = \"5\""),
        )
        .expect(
            7,
            1,
            "queues.thumbs.command_x",
            &["unknown key"],
            Some("did you mean `command`?"),
        );
}

#[test]
fn concurrency_zero_and_negative() {
    let text = "\
[queues.a]
shell = \"true\"
concurrency = 0

[queues.b]
shell = \"true\"
concurrency = -3
";
    check_bad(text)
        .count(2)
        .expect(
            3,
            15,
            "queues.a.concurrency",
            &["at least 1", "found 0"],
            Some("concurrency = 1"),
        )
        .expect(
            7,
            15,
            "queues.b.concurrency",
            &["cannot be negative", "-3"],
            Some("concurrency = 1"),
        );
}

#[test]
fn concurrency_zero_in_dotted_and_inline_forms_points_at_the_value() {
    check_bad("queues.thumbs.concurrency = 0\nqueues.thumbs.command = [\"/bin/true\"]\n")
        .count(1)
        .expect(
            1,
            29,
            "queues.thumbs.concurrency",
            &["at least 1"],
            Some("concurrency = 1"),
        );
    check_bad("queues = { a = { command = [\"/bin/true\"], concurrency = 0 } }\n")
        .count(1)
        .expect(
            1,
            57,
            "queues.a.concurrency",
            &["at least 1"],
            Some("concurrency = 1"),
        );
}

#[test]
fn durations_negative_zero_and_unparsable() {
    let text = "\
[taskd]
state_dir = \"state\"
shutdown_grace = \"-5s\"

[defaults]
timeout = \"0s\"
kill_grace = \"soon\"

[queues.a]
shell = \"true\"
timeout = \"5 parsecs\"
kill_grace = \"\"
";
    check_bad(text)
        .count(5)
        .expect(
            3,
            18,
            "taskd.shutdown_grace",
            &["cannot be negative", "-5s"],
            Some("positive duration"),
        )
        .expect(
            6,
            11,
            "defaults.timeout",
            &["longer than zero"],
            Some("positive duration"),
        )
        .expect(
            7,
            14,
            "defaults.kill_grace",
            &["\"soon\" is not a duration"],
            Some("\"90s\""),
        )
        .expect(
            11,
            11,
            "queues.a.timeout",
            &["\"5 parsecs\" is not a duration"],
            Some("\"1h 30m\""),
        )
        .expect(
            12,
            14,
            "queues.a.kill_grace",
            &["is not a duration", "empty"],
            Some("\"90s\""),
        );
}

#[test]
fn expires_must_be_a_positive_duration() {
    let text = "\
[taskd]
state_dir = \"state\"

[defaults]
expires = \"0s\"

[queues.a]
shell = \"true\"
expires = \"an hour\"

[queues.b]
shell = \"true\"
expires = 3600
";
    check_bad(text)
        .count(3)
        .expect(
            5,
            11,
            "defaults.expires",
            &["longer than zero"],
            Some("positive duration"),
        )
        .expect(
            9,
            11,
            "queues.a.expires",
            &["\"an hour\" is not a duration"],
            Some("\"1h 30m\""),
        )
        .expect(13, 11, "queues.b.expires", &["duration"], None);
}

#[test]
fn max_attempts_zero_and_too_many() {
    let text = "\
[defaults]
max_attempts = 0

[queues.a]
shell = \"true\"
max_attempts = 100000
";
    check_bad(text)
        .count(2)
        .expect(
            2,
            16,
            "defaults.max_attempts",
            &["at least 1", "found 0"],
            Some("max_attempts = 1"),
        )
        .expect(
            6,
            16,
            "queues.a.max_attempts",
            &["at most 1000", "never retries without limit"],
            Some("max_attempts = 1000"),
        );
}

#[test]
fn max_lost_and_max_crashes_out_of_range() {
    let text = "\
[defaults]
max_lost = -1

[queues.a]
worker = [\"/bin/true\"]
max_crashes = 0
max_lost = 1001
";
    check_bad(text)
        .count(3)
        .expect(
            2,
            12,
            "defaults.max_lost",
            &["max_lost cannot be negative (found -1)"],
            Some("max_lost = 0"),
        )
        .expect(
            6,
            15,
            "queues.a.max_crashes",
            &["max_crashes must be at least 1, found 0"],
            Some("max_crashes = 1"),
        )
        .expect(
            7,
            12,
            "queues.a.max_lost",
            &["at most 1000", "1001"],
            Some("max_lost = 1000"),
        );
}

#[test]
fn bad_size_strings() {
    let text = "\
[taskd]
state_dir = \"state\"
max_payload = \"1.5MiB\"

[queues.a]
shell = \"true\"
output_tail = \"5 parsecs\"
log_max = -1
";
    check_bad(text)
        .count(3)
        .expect(
            3,
            15,
            "taskd.max_payload",
            &["`1.5MiB` is not a size", "whole number"],
            Some("KiB"),
        )
        .expect(
            7,
            15,
            "queues.a.output_tail",
            &["`5 parsecs` is not a size", "unknown unit `parsecs`"],
            Some("output_tail = \"64KiB\""),
        )
        .expect(
            8,
            11,
            "queues.a.log_max",
            &["cannot be negative"],
            Some("log_max = \"10MiB\""),
        );
}

#[test]
fn max_result_out_of_range_or_not_a_size() {
    let text = "\
[defaults]
max_result = \"65MiB\"

[queues.a]
shell = \"true\"
max_result = true

[queues.b]
shell = \"true\"
max_result = -5
";
    check_bad(text)
        .count(3)
        .expect(
            2,
            14,
            "defaults.max_result",
            &[
                "max_result is too large (65MiB)",
                "the most accepted is 64MiB",
            ],
            Some("max_result = \"64MiB\"` or less"),
        )
        .expect(
            6,
            14,
            "queues.a.max_result",
            &["a size"],
            Some("max_result = \"1MiB\""),
        )
        .expect(
            10,
            14,
            "queues.b.max_result",
            &["cannot be negative"],
            Some("max_result = \"1MiB\""),
        );
}

#[test]
fn unknown_user_and_group() {
    let text = "\
[queues.a]
shell = \"true\"
user = \"no_such_user_taskd_test\"
group = \"no_such_group_taskd_test\"
";
    check_bad(text)
        .count(2)
        .expect(
            3,
            8,
            "queues.a.user",
            &["`no_such_user_taskd_test` does not exist"],
            Some("useradd --system no_such_user_taskd_test"),
        )
        .expect(
            4,
            9,
            "queues.a.group",
            &["`no_such_group_taskd_test` does not exist"],
            Some("groupadd"),
        );
}

// ----- what a queue runs -------------------------------------------------------------------

#[test]
fn queue_with_neither_command_nor_shell() {
    let text = "\
[taskd]
state_dir = \"state\"

[queues.idle]
concurrency = 2
timeout = \"1m\"
";
    check_bad(text).count(1).expect(
        4,
        1,
        "queues.idle",
        &[
            "queue `idle` has nothing to run",
            "`command`, `shell` or `worker`",
        ],
        Some("command = ["),
    );
}

#[test]
fn queue_with_both_command_and_shell() {
    let text = "\
[queues.both]
command = [\"/bin/true\"]
shell = \"true\"
";
    check_bad(text).count(1).expect(
        3,
        1,
        "queues.both.shell",
        &["one of `command`, `shell` or `worker`", "sets both"],
        Some("remove `command` or `shell`"),
    );
}

#[test]
fn empty_argv_and_empty_program() {
    let text = "\
[queues.none]
command = []

[queues.blank]
command = [\"  \", \"x\"]

[queues.str]
command = \"/bin/echo hi\"

[queues.sh]
shell = \"\"
";
    check_bad(text)
        .count(4)
        .expect(
            2,
            11,
            "queues.none.command",
            &["command is empty"],
            Some("argv list"),
        )
        .expect(
            5,
            12,
            "queues.blank.command[0]",
            &["program name", "empty"],
            Some("program's path first"),
        )
        .expect(
            8,
            11,
            "queues.str.command",
            &["array of strings", "found a string"],
            Some("shell = \"...\""),
        )
        .expect(
            11,
            9,
            "queues.sh.shell",
            &["shell is empty"],
            Some("/bin/sh -c"),
        );
}

#[test]
fn bad_field_placeholders() {
    let text = "\
[queues.a]
command = [\"/bin/echo\", \"{1x}\", \"{size\", \"{ size }\", \"{}\", \"a}b\"]

[queues.b]
command = [\"{prog}\", \"x\"]
";
    let bad = check_bad(text);
    bad.count(6)
        .expect(
            2,
            25,
            "queues.a.command[1]",
            &["invalid placeholder `{1x}`", "start with a letter"],
            Some("`{field}`"),
        )
        .expect(
            2,
            33,
            "queues.a.command[2]",
            &["unclosed `{`"],
            Some("`{{`"),
        )
        .expect(
            2,
            42,
            "queues.a.command[3]",
            &["invalid placeholder `{ size }`", "did you mean `{size}`?"],
            Some("`{field}`"),
        )
        .expect(
            2,
            54,
            "queues.a.command[4]",
            &["empty placeholder"],
            Some("`{field}`"),
        )
        .expect(
            2,
            60,
            "queues.a.command[5]",
            &["unmatched `}`"],
            Some("`}}`"),
        )
        .expect(
            5,
            12,
            "queues.b.command[0]",
            &["program name", "cannot hold a `{field}` placeholder"],
            Some("name the program literally"),
        );
}

#[test]
fn columns_count_characters_not_bytes() {
    // "é" and "ö" are two bytes each in UTF-8: the column is 25 in characters, 27 in bytes.
    let text = "[queues.a]\ncommand = [\"/bin/échö\", \"{a b}\"]\n";
    check_bad(text).count(1).expect(
        2,
        25,
        "queues.a.command[1]",
        &["invalid placeholder `{a b}`"],
        None,
    );
}

#[test]
fn duplicate_queue_tables() {
    let text = "\
[taskd]
state_dir = \"state\"

[queues.thumbs]
command = [\"/bin/true\"]

[queues.thumbs]
shell = \"true\"
";
    check_bad(text).count(1).expect(
        7,
        1,
        "queues.thumbs",
        &["queue `thumbs` is defined twice"],
        Some("keep one [queues.thumbs] table"),
    );

    // The same name, once quoted, is still the same queue.
    let text = "[queues.a]\ncommand = [\"/bin/true\"]\n[queues.\"a\"]\nshell = \"x\"\n";
    check_bad(text).count(1).expect(
        3,
        1,
        "queues.a",
        &["defined twice"],
        Some("rename one of them"),
    );

    // A key set twice inside one queue.
    let text = "[queues.a]\nshell = \"true\"\nconcurrency = 1\nconcurrency = 2\n";
    check_bad(text).count(1).expect(
        4,
        1,
        "queues.a.concurrency",
        &["`concurrency` is set twice in [queues.a]"],
        Some("remove one of them"),
    );
}

#[test]
fn array_of_queue_tables_is_refused() {
    let text = "[[queues]]\nname = \"a\"\nshell = \"true\"\n";
    check_bad(text)
        .count(1)
        .expect(1, 3, "queues", &["not [[queues]]"], Some("[queues.NAME]"));
}

#[test]
fn unusable_broker_urls() {
    let text = "\
[taskd]
state_dir = \"state\"
broker = \"postgres://taskd:s3cret@127.0.0.1/taskd?pool_size=0\"

[queues.a]
shell = \"true\"
";
    #[cfg(feature = "postgres")]
    check_bad(text).count(1).expect(
        3,
        10,
        "taskd.broker",
        &["`pool_size=0` is not a number of connections from 1 to 1000"],
        Some("postgres://user[:password]@host"),
    );
    #[cfg(not(feature = "postgres"))]
    check_bad(text).count(1).expect(
        3,
        10,
        "taskd.broker",
        &["built without the PostgreSQL broker"],
        Some("embedded SQLite"),
    );

    let text = "[taskd]\nbroker = \"ftp://example.com/q\"\n[queues.a]\nshell = \"true\"\n";
    check_bad(text).count(1).expect(
        2,
        10,
        "taskd.broker",
        &["unsupported broker URL \"ftp://example.com/q\"", "sqlite:"],
        Some("sqlite:///"),
    );

    // A bare path: the fix spells the sqlite URL for it.
    let text = "[taskd]\nbroker = \"/var/lib/taskd/t.db\"\n[queues.a]\nshell = \"true\"\n";
    check_bad(text).count(1).expect(
        2,
        10,
        "taskd.broker",
        &["unsupported broker URL"],
        Some("broker = \"sqlite:///var/lib/taskd/t.db\""),
    );

    let text = "[taskd]\nbroker = \"sqlite://\"\n[queues.a]\nshell = \"true\"\n";
    check_bad(text).count(1).expect(
        2,
        10,
        "taskd.broker",
        &["names no database file"],
        Some("sqlite:///"),
    );
}

#[test]
fn invalid_env_names_and_listen_address() {
    let text = "\
[taskd]
state_dir = \"state\"
listen = \"localhost:7070\"

[queues.a]
shell = \"true\"
env = { \"A-B\" = \"x\", TASKD_QUEUE = \"y\" }
";
    check_bad(text)
        .count(3)
        .expect(
            3,
            10,
            "taskd.listen",
            &["not an IP address and port"],
            Some("127.0.0.1:7070"),
        )
        .expect(
            7,
            9,
            "queues.a.env.A-B",
            &["not a valid environment variable name"],
            Some("A_B"),
        )
        .expect(
            7,
            22,
            "queues.a.env.TASKD_QUEUE",
            &["TASKD_"],
            Some("without the TASKD_ prefix"),
        );
}

#[test]
fn toml_syntax_error_points_at_the_spot() {
    let text = "\
[taskd]
state_dir = \"state\"

[queues.a]
shell = \"true\"
concurrency = = 4
";
    let bad = check_bad(text);
    assert_eq!(bad.diags.len(), 1, "{}", bad.stderr);
    let d = &bad.diags[0];
    assert_eq!(d.file, bad.env.config.display().to_string());
    assert_eq!((d.line, d.col), (6, 15), "{}", bad.stderr);
    assert!(d.rest.starts_with("invalid TOML:"), "{}", bad.stderr);
    assert!(
        d.fix.as_deref().unwrap().contains("TOML syntax"),
        "{}",
        bad.stderr
    );

    // An unterminated string.
    let bad = check_bad("[queues.a]\nshell = \"true\n");
    assert_eq!(bad.diags.len(), 1, "{}", bad.stderr);
    assert_eq!(bad.diags[0].line, 2, "{}", bad.stderr);
    assert!(
        bad.diags[0].rest.starts_with("invalid TOML:"),
        "{}",
        bad.stderr
    );
}

#[test]
fn other_impossible_values() {
    let text = "\
[defaults]
backoff = { base = \"10s\", max = \"1h\" }

[queues.\"a b\"]
shell = \"true\"

[queues.c]
shell = \"true\"
fail_exit_codes = [0, 300, \"x\"]
cwd = \"~/x\"
timeout = \"400d\"
backoff = { base = \"2h\" }

[queues.w]
worker = []
";
    check_bad(text)
        .count(8)
        .expect(
            4,
            9,
            "queues.\"a b\"",
            &["`a b` cannot be a queue name"],
            Some("[queues.a-b]"),
        )
        .expect(
            9,
            20,
            "queues.c.fail_exit_codes[0]",
            &["exit code 0 means success"],
            Some("remove 0"),
        )
        .expect(
            9,
            23,
            "queues.c.fail_exit_codes[1]",
            &["exit code 300 is impossible"],
            Some("1 to 255"),
        )
        .expect(
            9,
            28,
            "queues.c.fail_exit_codes[2]",
            &["must hold integers", "found a string"],
            Some("fail_exit_codes = [2, 64]"),
        )
        .expect(
            10,
            7,
            "queues.c.cwd",
            &["does not expand"],
            Some("absolute path"),
        )
        .expect(
            11,
            11,
            "queues.c.timeout",
            &["too long", "400d"],
            Some("shorter duration"),
        )
        .expect(
            12,
            20,
            "queues.c.backoff.base",
            &["base (2h) is longer than max (1h, inherited)"],
            Some("raise `max`"),
        )
        .expect(
            15,
            10,
            "queues.w.worker",
            &["worker is empty"],
            Some("worker = [\"python3\""),
        );
}

/// Three values `check` used to pass (or explain wrongly) though the daemon could not use
/// them: a queue no command line can address, a socket in a directory that does not exist
/// (the daemon logged "ready", then exited 1 and systemd restarted it in a loop), and a lease
/// past a year, whose message named the duration parser's maximum instead of the lease's.
#[test]
fn dash_queue_names_missing_socket_dirs_and_long_leases() {
    let text = "\
[taskd]
state_dir = \"state\"
lease = \"400d\"
control_socket = \"/nonexistent-taskd-dir/taskd.sock\"

[queues.-rf]
shell = \"true\"
";
    let bad = check_bad(text);
    bad.count(3)
        .expect(
            3,
            9,
            "taskd.lease",
            &["lease must be between 3s and 1h", "\"400d\""],
            Some("lease = \"30s\""),
        )
        .expect(
            4,
            18,
            "taskd.control_socket",
            &["/nonexistent-taskd-dir", "does not exist"],
            Some("RuntimeDirectory=taskd"),
        )
        .expect(
            6,
            9,
            "queues.-rf",
            &["`-rf` cannot be a queue name", "cannot start with `-`"],
            Some("[queues.rf]"),
        );
    // `start` refuses the socket before anything runs: exit 78, which the unit does not
    // restart, and no "ready".
    let env = Env::raw(&format!(
        "{STATE}control_socket = \"/nonexistent-taskd-dir/taskd.sock\"\n[queues.a]\nshell = \"true\"\n"
    ));
    let mut cmd = env.cmd(&["start"]);
    cmd.env("RUST_LOG", "info");
    let out = run_with_deadline(cmd, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "stderr:\n{stderr}");
    assert!(stderr.contains("taskd.control_socket"), "{stderr}");
    assert!(!stderr.contains("ready"), "{stderr}");
}

#[test]
fn allow_dash_values_is_a_boolean() {
    let text = "\
[defaults]
allow_dash_values = \"yes\"

[queues.q]
command = [\"/bin/echo\", \"{x}\"]
allow_dash_value = true
";
    check_bad(text)
        .count(2)
        .expect(
            2,
            21,
            "defaults.allow_dash_values",
            &["boolean", "found a string"],
            Some("true"),
        )
        .expect(
            6,
            1,
            "queues.q.allow_dash_value",
            &["allow_dash_value"],
            Some("allow_dash_values"),
        );
}

// ----- many errors at once -----------------------------------------------------------------

#[test]
fn every_error_is_reported_in_file_order_not_only_the_first() {
    let text = "\
[taskd]
state_dir = \"state\"
brokr = \"sqlite:x.db\"
shutdown_grace = \"-1s\"

[defaults]
max_attempts = 0
timout = \"1m\"

[queues.thumbs]
concurrency = 0
command = [\"/bin/echo\", \"{1x}\"]
output_tail = \"lots\"

[queues.both]
command = [\"/bin/true\"]
shell = \"true\"

[queues.none]
user = \"no_such_user_taskd_test\"
";
    let bad = check_bad(text);
    bad.count(10)
        .expect(
            3,
            1,
            "taskd.brokr",
            &["unknown key"],
            Some("did you mean `broker`?"),
        )
        .expect(4, 18, "taskd.shutdown_grace", &["negative"], None)
        .expect(7, 16, "defaults.max_attempts", &["at least 1"], None)
        .expect(
            8,
            1,
            "defaults.timout",
            &["unknown key"],
            Some("did you mean `timeout`?"),
        )
        .expect(11, 15, "queues.thumbs.concurrency", &["at least 1"], None)
        .expect(
            12,
            25,
            "queues.thumbs.command[1]",
            &["invalid placeholder `{1x}`"],
            None,
        )
        .expect(
            13,
            15,
            "queues.thumbs.output_tail",
            &["`lots` is not a size"],
            None,
        )
        .expect(17, 1, "queues.both.shell", &["sets both"], None)
        .expect(19, 1, "queues.none", &["nothing to run"], None)
        .expect(20, 8, "queues.none.user", &["does not exist"], None);
    let positions: Vec<(usize, usize)> = bad.diags.iter().map(|d| (d.line, d.col)).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(
        positions, sorted,
        "diagnostics should come in file order:\n{}",
        bad.stderr
    );
}

// ----- valid configs, other commands, missing files ----------------------------------------

#[test]
fn valid_config_checks_ok_and_lists_the_queues() {
    let env = Env::raw(&format!(
        "{STATE}
[defaults]
timeout = \"10m\"
max_attempts = 3

[queues.thumbnails]
concurrency = 4
command = [\"/bin/echo\", \"--size\", \"{{size}}\", \"{{src}}\"]
timeout = \"2m\"

[queues.reports]
shell = \"echo \\\"$TASKD_ARG_month\\\"\"
env = {{ REPORT_DIR = \"/tmp\" }}
"
    ));
    let out = run_with_deadline(env.cmd(&["check"]), Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("ok"), "{stdout}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("summary has no row for {name}:\n{stdout}"))
            .to_string()
    };
    let thumbs = row("thumbnails");
    assert!(
        thumbs.contains('4')
            && thumbs.contains("2m")
            && thumbs.contains("/bin/echo --size {size} {src}"),
        "{thumbs}"
    );
    let reports = row("reports");
    assert!(
        reports.contains("10m") && reports.contains('3') && reports.contains("sh -c"),
        "{reports}"
    );
    assert!(
        !env.path().join("state").exists(),
        "check must not create the state directory"
    );

    // The same through --json.
    let out = env.ok(&["check", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("check --json is JSON");
    let names: Vec<&str> = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["reports", "thumbnails"]);
    let thumbs = &v["queues"][1];
    assert_eq!(thumbs["concurrency"], 4);
    assert_eq!(thumbs["timeout_secs"], 120.0);
    assert_eq!(thumbs["max_attempts"], 3, "inherited from [defaults]");
}

#[test]
fn start_refuses_an_invalid_config_with_78() {
    let env = Env::raw(&format!(
        "{STATE}\n[queues.a]\nshell = \"true\"\nconcurrency = 0\n"
    ));
    let mut cmd = env.cmd(&["start"]);
    cmd.env("RUST_LOG", "info");
    let out = run_with_deadline(cmd, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "stderr:\n{stderr}");
    let want = format!(
        "{}:6:15: error: queues.a.concurrency:",
        env.config.display()
    );
    assert!(stderr.contains(&want), "want {want:?} in:\n{stderr}");
    assert!(!stderr.contains("ready"), "{stderr}");
    assert!(
        !env.path().join("state").exists(),
        "an invalid config must not create the state directory"
    );
}

#[test]
fn every_command_refuses_an_invalid_config_with_78() {
    let env = Env::raw(&format!(
        "{STATE}\n[queues.a]\nshell = \"true\"\ntimeout = \"0s\"\n"
    ));
    for args in [
        &["submit", "a", "{}"][..],
        &["status", "--json"][..],
        &["tasks"][..],
        &["pause", "a"][..],
    ] {
        let out = run_with_deadline(env.cmd(args), Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(EX_CONFIG),
            "taskd {args:?}: {stderr}"
        );
        let want = format!("{}:6:11: error: queues.a.timeout:", env.config.display());
        assert!(
            stderr.contains(&want),
            "taskd {args:?}: want {want:?} in:\n{stderr}"
        );
    }
    assert!(
        !env.path().join("state").exists(),
        "nothing may be written for an invalid config"
    );
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    for sub in ["check", "start", "submit"] {
        let mut cmd = Command::new(common::BIN);
        cmd.arg("-c")
            .arg(&path)
            .arg(sub)
            .env_remove("TASKD_CONFIG")
            .current_dir(dir.path());
        if sub == "submit" {
            cmd.arg("a");
        }
        let out = run_with_deadline(cmd, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EX_CONFIG), "taskd {sub}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "names the file: {stderr}"
        );
        assert!(
            stderr.contains("No such file or directory"),
            "says why: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn missing_config_file_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let out = Command::new(common::BIN)
        .arg("-c")
        .arg(&path)
        .arg("check")
        .env_remove("TASKD_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn config_is_found_through_taskd_config_and_the_current_directory() {
    let env = Env::raw(&format!("{STATE}\n[queues.from_env]\nshell = \"true\"\n"));
    let elsewhere = tempfile::tempdir().unwrap();
    // $TASKD_CONFIG, from another directory.
    let out = Command::new(common::BIN)
        .arg("check")
        .env("TASKD_CONFIG", &env.config)
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("from_env"));
    // ./taskd.toml, with no flag and no variable.
    let out = Command::new(common::BIN)
        .arg("check")
        .env_remove("TASKD_CONFIG")
        .current_dir(env.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("from_env"));
    // A bad config found through $TASKD_CONFIG is still named in the errors.
    let bad = Env::raw("[queues.x]\nconcurrency = 0\nshell = \"true\"\n");
    let out = Command::new(common::BIN)
        .arg("check")
        .env("TASKD_CONFIG", &bad.config)
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:2:15: error: queues.x.concurrency:",
            bad.config.display()
        )),
        "{stderr}"
    );
}

#[test]
fn log_tasks_takes_one_of_three_words() {
    check_bad("[taskd]\nstate_dir = \"state\"\nlog_tasks = \"failure\"\n")
        .count(1)
        .expect(
            3,
            13,
            "taskd.log_tasks",
            &[
                "unknown value \"failure\"",
                "\"failures\", \"all\" or \"none\"",
            ],
            Some("did you mean `log_tasks = \"failures\"`?"),
        );
    check_bad("[taskd]\nstate_dir = \"state\"\nlog_tasks = true\n")
        .count(1)
        .expect(
            3,
            13,
            "taskd.log_tasks",
            &["a string"],
            Some("log_tasks = \"failures\""),
        );
    for ok in ["failures", "all", "none"] {
        Env::raw(&format!(
            "[taskd]\nstate_dir = \"state\"\nlog_tasks = \"{ok}\"\n"
        ))
        .ok(&["check"]);
    }
}

#[test]
fn restart_on_change_is_a_boolean_for_worker_queues_only() {
    let text = "\
[taskd]
state_dir = \"state\"

[queues.w]
worker = [\"python3\", \"app.py\"]
restart_on_change = \"yes\"

[queues.e]
command = [\"/bin/true\"]
restart_on_change = true
";
    check_bad(text)
        .count(2)
        .expect(
            6,
            21,
            "queues.w.restart_on_change",
            &["restart_on_change must be a boolean, found a string"],
            Some("write `restart_on_change = true` or `restart_on_change = false`"),
        )
        .expect(
            10,
            1,
            "queues.e.restart_on_change",
            &["`restart_on_change` applies to long-lived workers, but queue `e` runs `command`"],
            Some("remove `restart_on_change`, or replace `command` with `worker = [\"/path/to/worker\"]`"),
        );
}

#[test]
fn worker_fork_is_a_boolean_for_worker_queues_only() {
    let text = "\
[taskd]
state_dir = \"state\"

[queues.w]
worker = [\"python3\", \"app.py\"]
worker_fork = 1

[queues.s]
shell = \"true\"
worker_fork = true
";
    check_bad(text)
        .count(2)
        .expect(
            6,
            15,
            "queues.w.worker_fork",
            &["worker_fork must be a boolean, found an integer"],
            Some("write `worker_fork = true` or `worker_fork = false`"),
        )
        .expect(
            10,
            1,
            "queues.s.worker_fork",
            &["`worker_fork` applies to long-lived workers, but queue `s` runs `shell`"],
            Some("remove `worker_fork`, or replace `shell` with `worker = [\"/path/to/worker\"]`"),
        );
}

// ----- schedules ---------------------------------------------------------------------------

#[test]
fn schedule_cron_and_zone_errors_name_what_is_wrong() {
    let text = "\
[queues.reports]
command = [\"/bin/echo\", \"{month}\"]

[schedules.a]
queue = \"reports\"
cron = \"0 25 * * *\"
payload = { month = \"last\" }

[schedules.b]
queue = \"reports\"
cron = \"0 3 * * *\"
timezone = \"Europe/Berln\"
payload = { month = \"last\" }

[schedules.c]
queue = \"reports\"
cron = \"0 0 31 2 *\"
payload = { month = \"last\" }

[schedules.d]
queue = \"reports\"
cron = \"@reboot\"
payload = { month = \"last\" }

[schedules.e]
queue = \"reports\"
cron = \"* * *\"
payload = { month = \"last\" }
";
    check_bad(text)
        .count(5)
        .expect(
            6,
            8,
            "schedules.a.cron",
            &["field 2 (hour) `25`", "0-23"],
            Some("5 fields"),
        )
        .expect(
            12,
            12,
            "schedules.b.timezone",
            &["unknown time zone \"Europe/Berln\""],
            Some("did you mean `timezone = \"Europe/Berlin\"`?"),
        )
        .expect(
            17,
            8,
            "schedules.c.cron",
            &["cron \"0 0 31 2 *\" never fires", "February 30th"],
            Some("day of month"),
        )
        .expect(
            22,
            8,
            "schedules.d.cron",
            &["`@reboot` names no time"],
            Some("systemd unit"),
        )
        .expect(
            27,
            8,
            "schedules.e.cron",
            &["5 fields", "has 3"],
            Some("6 with seconds first"),
        );
}

#[test]
fn schedule_needs_a_queue_one_spec_and_a_runnable_payload() {
    let text = "\
[queues.reports]
command = [\"/bin/echo\", \"{month}\"]

[schedules.nothing]
queue = \"reports\"
payload = { month = \"x\" }

[schedules.both]
queue = \"reports\"
cron = \"0 3 * * *\"
every = \"10m\"
payload = { month = \"x\" }

[schedules.typo]
queue = \"report\"
every = \"10m\"

[schedules.lacks]
queue = \"reports\"
every = \"10m\"
payload = { day = 1 }

[schedules.noqueue]
every = \"1500ms\"

[schedules.policy]
queue = \"reports\"
every = \"1m\"
payload = { month = \"x\" }
missed = \"newest\"
overlap = \"never\"
max_catch_up = 0
";
    check_bad(text)
        .count(9)
        .expect(
            23,
            1,
            "schedules.noqueue",
            &["has no `queue`"],
            Some("queue = \"NAME\""),
        )
        .expect(
            4,
            1,
            "schedules.nothing",
            &["schedule `nothing` has no time"],
            Some("cron = \"0 3 * * *\""),
        )
        .expect(
            11,
            9,
            "schedules.both.every",
            &["sets both `cron` and `every`"],
            Some("keep one"),
        )
        .expect(
            15,
            9,
            "schedules.typo.queue",
            &["unknown queue `report`"],
            Some("did you mean `queue = \"reports\"`?"),
        )
        .expect(
            21,
            11,
            "schedules.lacks.payload",
            &["queue `reports` cannot run", "month"],
            Some("payload = { month = \"…\" }"),
        )
        .expect(
            24,
            9,
            "schedules.noqueue.every",
            &["whole number of seconds"],
            Some("every = \"1s\""),
        )
        .expect(
            30,
            10,
            "schedules.policy.missed",
            &["one of \"skip\", \"latest\", \"all\"", "\"newest\""],
            Some("write one of"),
        )
        .expect(
            31,
            11,
            "schedules.policy.overlap",
            &["\"never\""],
            Some("\"skip\", \"allow\""),
        )
        .expect(
            32,
            16,
            "schedules.policy.max_catch_up",
            &["at least 1"],
            Some("max_catch_up = 1"),
        );
}

#[test]
fn a_valid_schedule_passes_check() {
    let env = Env::raw(&format!(
        "{STATE}
[queues.reports]
command = [\"/bin/echo\", \"{{month}}\"]

[schedules.nightly-report]
queue = \"reports\"
cron = \"30 2 * * mon-fri\"
timezone = \"Europe/Berlin\"
payload = {{ month = \"last\", n = 3, deep = {{ a = [1, 2] }} }}
args = [\"--\", \"x\"]
priority = 5
missed = \"all\"
max_catch_up = 10
overlap = \"allow\"

[schedules.ping]
queue = \"reports\"
every = \"10m\"
payload = {{ month = \"x\" }}
enabled = false
"
    ));
    let out = env.run(&["check"]);
    assert!(
        out.status.success(),
        "check failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file beside the config, with `mode`.
fn write_file(env: &Env, name: &str, text: &str, mode: u32) {
    let p = env.path().join(name);
    std::fs::write(&p, text).expect("write a file beside the config");
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .expect("chmod");
}

#[test]
fn named_tokens_each_error_at_its_entry() {
    let text = "\
[taskd]
state_dir = \"state\"
token = \"default-token-0123456789\"
tokens = [
  { name = \"ci\", token_file = \"ci.token\" },
  { name = \"ci\", token_file = \"ci2.token\" },
  { name = \"default\", token = \"another-token-0123456789\" },
  { name = \"bad name\", token_file = \"ci.token\" },
  { name = \"gone\", token_file = \"missing.token\" },
  { name = \"loose\", token_file = \"loose.token\" },
  { token_file = \"ci.token\" },
  { name = \"nofile\" },
  { name = \"typo\", token_fil = \"ci.token\" },
  { name = \"twin\", token = \"default-token-0123456789\" },
  { name = \"grouped\", token_file = \"group.token\" },
]
";
    let env = Env::raw(text);
    write_file(&env, "ci.token", "ci-token-0123456789abcdef\n", 0o600);
    write_file(&env, "ci2.token", "ci2-token-0123456789abcdef\n", 0o600);
    write_file(&env, "loose.token", "loose-token-0123456789abcdef\n", 0o644);
    write_file(&env, "group.token", "group-token-0123456789abcdef\n", 0o660);
    let missing = env.path().join("missing.token").display().to_string();
    let loose = env.path().join("loose.token").display().to_string();
    let bad = check_bad_in(env);
    bad.count(10)
        .expect(
            6,
            12,
            "taskd.tokens[1].name",
            &["the token name `ci` is used twice (first on line 5)"],
            Some("give each token its own name"),
        )
        .expect(
            7,
            12,
            "taskd.tokens[2].name",
            &["the token name `default` is taken by `token`/`token_file` (line 3)"],
            Some("give this token another name"),
        )
        .expect(
            8,
            12,
            "taskd.tokens[3].name",
            &["a token name may hold only ASCII letters, digits, `_`, `-` and `.`, not ' '"],
            Some("name = \"ci\""),
        )
        .expect(
            9,
            33,
            "taskd.tokens[4].token_file",
            &[&format!("failed to read the token file {missing}: No such file")],
            Some("mode 0600"),
        )
        .expect(
            10,
            34,
            "taskd.tokens[5].token_file",
            &[&format!(
                "the token file {loose} can be read or changed by every user of this machine (mode 0644)"
            )],
            Some(&format!("`chmod 600 {loose}`")),
        )
        .expect(
            11,
            3,
            "taskd.tokens[6]",
            &["this `tokens` entry has no `name`"],
            Some("add a name"),
        )
        .expect(
            12,
            3,
            "taskd.tokens[7]",
            &["the token `nofile` has neither `token_file` nor `token`"],
            Some("add the file that holds it"),
        )
        .expect(
            13,
            20,
            "taskd.tokens[8].token_fil",
            &["unknown key `token_fil` in a `tokens` entry"],
            Some("did you mean `token_file`?"),
        )
        .expect(
            14,
            28,
            "taskd.tokens[9].token",
            &["tokens `default` and `twin` hold the same token"],
            Some("generate a token per name"),
        )
        .expect(
            15,
            36,
            "taskd.tokens[10].token_file",
            &["can be changed by its group (mode 0660)"],
            Some("chmod 600"),
        );
    assert!(
        !bad.stderr.contains("token-0123456789"),
        "a diagnostic shows a token:\n{}",
        bad.stderr
    );
}

#[test]
fn tokens_as_tables_and_wrong_shapes() {
    let env = Env::raw(
        "\
[taskd]
state_dir = \"state\"

[[taskd.tokens]]
name = \"ci\"
token_file = \"ci.token\"

[[taskd.tokens]]
name = \"ci\"
token = \"other-token-0123456789\"
",
    );
    write_file(&env, "ci.token", "ci-token-0123456789abcdef\n", 0o600);
    check_bad_in(env).count(1).expect(
        9,
        8,
        "taskd.tokens[1].name",
        &["the token name `ci` is used twice (first on line 5)"],
        Some("give each token its own name"),
    );
    check_bad("[taskd]\nstate_dir = \"state\"\ntokens = \"ci\"\n")
        .count(1)
        .expect(
            3,
            10,
            "taskd.tokens",
            &["tokens must be an array of tables, found a string"],
            Some("tokens = [{ name = \"ci\", token_file = \"/etc/taskd/ci.token\" }]"),
        );
    check_bad("[taskd]\nstate_dir = \"state\"\ntokens = [\"ci\"]\n")
        .count(1)
        .expect(
            3,
            11,
            "taskd.tokens[0]",
            &["each entry of tokens must be a table with a name and a token file, found a string"],
            Some("tokens = [{ name = \"ci\""),
        );
    // A non-loopback listen with only a broken token is one error (the token's), not two.
    check_bad(
        "[taskd]\nstate_dir = \"state\"\nlisten = \"0.0.0.0:7070\"\ntokens = [{ name = \"ci\", token_file = \"/nonexistent/ci.token\" }]\n",
    )
    .count(1)
    .expect(
        4,
        39,
        "taskd.tokens[0].token_file",
        &["failed to read the token file /nonexistent/ci.token"],
        None,
    );
    // An empty list names no token: a non-loopback listen still needs one.
    check_bad("[taskd]\nstate_dir = \"state\"\nlisten = \"0.0.0.0:7070\"\ntokens = []\n")
        .count(1)
        .expect(
            3,
            10,
            "taskd.listen",
            &["no API token is set"],
            Some("tokens = [{ name = \"ci\""),
        );
}

#[test]
fn a_token_file_others_can_read_is_refused() {
    let env = Env::raw("[taskd]\nstate_dir = \"state\"\ntoken_file = \"token\"\n");
    write_file(&env, "token", "single-token-0123456789abcdef\n", 0o644);
    let file = env.path().join("token").display().to_string();
    check_bad_in(env).count(1).expect(
        3,
        14,
        "taskd.token_file",
        &["can be read or changed by every user of this machine (mode 0644)"],
        Some(&format!("`chmod 600 {file}`")),
    );
    // 0640 (a group only the daemon's user is in) and 0600 are accepted.
    for mode in [0o600, 0o640] {
        let env = Env::raw("[taskd]\nstate_dir = \"state\"\ntoken_file = \"token\"\n");
        write_file(&env, "token", "single-token-0123456789abcdef\n", mode);
        env.ok(&["check"]);
    }
}

#[test]
fn audit_keep_is_a_count() {
    check_bad("[taskd]\nstate_dir = \"state\"\naudit_keep = 0\n")
        .count(1)
        .expect(
            3,
            14,
            "taskd.audit_keep",
            &["audit_keep must be at least 1, found 0"],
            Some("set `audit_keep = 1` or more"),
        );
    check_bad("[taskd]\nstate_dir = \"state\"\naudit_keep = \"many\"\n")
        .count(1)
        .expect(
            3,
            14,
            "taskd.audit_keep",
            &["audit_keep must be an integer, found a string"],
            Some("audit_keep = 100000"),
        );
    check_bad("[taskd]\nstate_dir = \"state\"\naudit_kep = 10\n")
        .count(1)
        .expect(
            3,
            1,
            "taskd.audit_kep",
            &["unknown key `audit_kep` in [taskd]"],
            Some("did you mean `audit_keep`?"),
        );
}

#[test]
fn keep_times_must_be_durations_or_forever() {
    let text = "\
[defaults]
keep_succeeded = \"never\"

[queues.a]
shell = \"true\"
keep_failed = 30

[queues.b]
shell = \"true\"
keep_cancelled = \"a week\"
keep_succeeded = \"forever\"
keep_failed = \"-1d\"
";
    check_bad(text)
        .count(4)
        .expect(
            2,
            18,
            "defaults.keep_succeeded",
            &["\"never\" is not a retention time"],
            Some("`keep_succeeded = \"forever\"` to never delete them"),
        )
        .expect(
            6,
            15,
            "queues.a.keep_failed",
            &["keep_failed must be a duration string such as \"7d\", or \"forever\""],
            Some("write `keep_failed = \"30d\"`"),
        )
        .expect(
            10,
            18,
            "queues.b.keep_cancelled",
            &["\"a week\" is not a duration"],
            Some("\"1d\""),
        )
        .expect(
            12,
            15,
            "queues.b.keep_failed",
            &["keep_failed cannot be negative"],
            Some("keep_failed = \"30s\""),
        );
}

// ----- flow control ------------------------------------------------------------------------

#[test]
fn flow_control_keys_name_what_is_wrong() {
    let text = "\
[queues.a]
shell = \"true\"
concurrency_key = \"{customer\"
concurrency_per_key = 0
rate = \"100/w\"

[queues.b]
shell = \"true\"
rate = \"100\"
rate_key = \"\"
burst = 0
";
    check_bad(text)
        .count(6)
        .expect(
            3,
            19,
            "queues.a.concurrency_key",
            &["unclosed `{`"],
            Some("concurrency_key = \"{customer}\""),
        )
        .expect(
            4,
            23,
            "queues.a.concurrency_per_key",
            &["at least 1", "found 0"],
            Some("concurrency_per_key = 1"),
        )
        .expect(
            5,
            8,
            "queues.a.rate",
            &["unknown unit \"w\"", "s, m, h or d"],
            Some("rate = \"100/m\""),
        )
        .expect(9, 8, "queues.b.rate", &["no `/`"], Some("rate = \"100/m\""))
        .expect(
            10,
            12,
            "queues.b.rate_key",
            &["is empty"],
            Some("{customer}"),
        )
        .expect(
            11,
            9,
            "queues.b.burst",
            &["at least 1", "found 0"],
            Some("burst = 1"),
        );
}

#[test]
fn celery_table_names_what_is_wrong() {
    const QUEUE: &str = "[taskd]\nstate_dir = \"state\"\n[queues.default]\ncommand = [\"true\"]\n";
    // Lines 1-4 are QUEUE's.
    check_bad(&format!(
        "{QUEUE}[celery]\nbroker = \"kafka://x\"\nresult_backend = \"rpc://\"\nqueues = []\ntrack_startd = true\n[celery.tasks]\n\"app.*\" = \"defualt\"\n\"app.x\" = {{ queu = \"default\" }}\n"
    ))
    .count(5)
    .expect(
        6,
        10,
        "celery.broker",
        &["the Celery broker must be a `redis://`, `rediss://`, `amqp://` or `amqps://` URL"],
        Some("broker_url"),
    )
    .expect(
        8,
        10,
        "celery.queues",
        &["queues is empty: the bridge would consume nothing"],
        Some("queues = [\"celery\", \"alerts\"]"),
    )
    .expect(
        9,
        1,
        "celery.track_startd",
        &["unknown key `track_startd` in [celery]"],
        Some("did you mean `track_started`?"),
    )
    .expect(
        11,
        11,
        "celery.tasks.\"app.*\"",
        &["Celery tasks `app.*` go to queue \"defualt\", which this file does not define"],
        Some("did you mean \"default\"?"),
    )
    .expect(
        12,
        13,
        "celery.tasks.\"app.x\".queu",
        &["unknown key `queu` in celery.tasks.\"app.x\""],
        Some("did you mean `queue`?"),
    );
    // rpc:// needs an AMQP broker (a build without Redis refuses the Redis broker first);
    // [celery] needs a broker and tasks.
    #[cfg(feature = "redis")]
    check_bad(&format!(
        "{QUEUE}[celery]\nbroker = \"redis://127.0.0.1:6379/0\"\nresult_backend = \"rpc://\"\n[celery.tasks]\n\"a\" = \"default\"\n"
    ))
    .count(1)
    .expect(
        7,
        18,
        "celery.result_backend",
        &["`rpc://` replies over an AMQP broker, and the Celery broker here is Redis"],
        Some("redis://"),
    );
    check_bad(&format!(
        "{QUEUE}[celery]\nqueues = [\"celery\"]\n[celery.tasks]\n\"a\" = \"default\"\n"
    ))
    .count(1)
    .expect(
        5,
        1,
        "celery",
        &["[celery] has no `broker`"],
        Some("broker ="),
    );
    // (A build without AMQP refuses the broker first.)
    #[cfg(feature = "amqp")]
    check_bad(&format!("{QUEUE}[celery]\nbroker = \"amqp://h//\"\n"))
        .count(1)
        .expect(
            5,
            1,
            "celery",
            &["[celery] has no [celery.tasks] table"],
            Some("[celery.tasks]"),
        );
}
