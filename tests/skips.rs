//! A test that cannot run here (no browser, no `redis-server`, not root) is skipped through
//! `common::skip`: the skip is printed where `cargo test` shows it (libtest hides what a
//! passing test prints with `eprintln!`), the test binary ends with a summary of its skips,
//! and under `CI=true` the skip is a failure. This binary runs itself to see what a user
//! of `cargo test` sees.

mod common;

use std::process::Command;

/// Skips when asked to by the parent test below; passes otherwise.
#[test]
fn probe_that_skips_on_request() {
    if std::env::var_os("TASKD_SKIP_PROBE").is_some() {
        common::skip::skip("the probe was asked to skip", "nothing to install");
    }
}

fn run_probe(ci: Option<&str>) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(std::env::current_exe().expect("this test binary"));
    cmd.args([
        "--exact",
        "probe_that_skips_on_request",
        "--test-threads",
        "1",
    ])
    .env("TASKD_SKIP_PROBE", "1");
    match ci {
        Some(v) => cmd.env("CI", v),
        None => cmd.env_remove("CI"),
    };
    let out = cmd.output().expect("run the probe");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_skip_is_visible_under_cargo_test_and_summarised() {
    let (code, stdout, stderr) = run_probe(None);
    assert_eq!(
        code,
        Some(0),
        "a skip passes outside CI:\n{stdout}\n{stderr}"
    );
    let line =
        "SKIPPED probe_that_skips_on_request: the probe was asked to skip (nothing to install)";
    assert!(
        stderr.contains(line),
        "the skip is not on the binary's stderr (cargo test shows it; libtest hides captured output):\n{stderr}"
    );
    assert!(
        stderr.contains("1 test SKIPPED in ") && stderr.ends_with(&format!("  {line}\n")),
        "no summary of the skips at the end:\n{stderr}"
    );
}

#[test]
fn a_skip_fails_under_ci() {
    let (code, stdout, stderr) = run_probe(Some("true"));
    assert_eq!(
        code,
        Some(101),
        "a skip under CI=true is a failure:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("CI=true forbids skipping it")
            || stderr.contains("CI=true forbids skipping it"),
        "{stdout}\n{stderr}"
    );
    assert!(!stderr.contains("SKIPPED"), "{stderr}");
}

/// Every test that can skip goes through `common::skip` (which obeys CI=true), not a bare
/// `eprintln!` that `cargo test` never shows.
#[test]
fn every_skip_in_the_tests_goes_through_common_skip() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut files = vec![];
    let mut todo = vec![dir];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read tests/").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut bare = Vec::new();
    for f in files {
        if f.ends_with("common/skip.rs") || f.ends_with("skips.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("read a test file");
        for (n, line) in text.lines().enumerate() {
            let l = line.to_lowercase();
            if (l.contains("eprintln!") || l.contains("println!")) && l.contains("skip") {
                bare.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        bare.is_empty(),
        "skips printed with eprintln! (hidden by cargo test, and blind to CI=true); use common::skip::skip:\n{}",
        bare.join("\n")
    );
}
