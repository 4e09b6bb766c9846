//! Skipping a test that needs something optional here (a browser, `redis-server`, `openssl`,
//! `systemd-analyze`, root): visibly, and never under `CI=true`, where it is a failure.
//!
//! libtest captures what a passing test prints with `println!`/`eprintln!` and shows it only
//! for failures, so a skip message written that way is never seen under `cargo test`. A skip
//! is written straight to the process's stderr instead (which libtest does not capture), and
//! when the test binary exits it prints a summary of every test it skipped.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Mutex, Once};

static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());
static SUMMARY: Once = Once::new();

extern "C" {
    fn atexit(f: extern "C" fn()) -> i32;
}

/// Printed at exit: the skipped tests of this binary, one per line.
extern "C" fn summary() {
    let list = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    if list.is_empty() {
        return;
    }
    let mut text = format!(
        "\n{} test{} SKIPPED in {} (they passed without running; under CI=true they fail):\n",
        list.len(),
        if list.len() == 1 { "" } else { "s" },
        std::env::args().next().unwrap_or_default()
    );
    for l in list.iter() {
        text.push_str(&format!("  {l}\n"));
    }
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// The running test's name (libtest names each test's thread after it).
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string()
}

/// Skip the running test: `why` it cannot run here and the `fix` that makes it run
/// ("apt-get install -y chromium"). Panics under `CI=true`. The caller returns after it.
pub fn skip(why: &str, fix: &str) {
    skip_named(&current_test(), why, fix)
}

/// [`skip`] for a test whose name the caller knows better than the thread does.
pub fn skip_named(test: &str, why: &str, fix: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why}, and CI=true forbids skipping it ({fix}; .ci/run does it)");
    }
    let line = format!("SKIPPED {test}: {why} ({fix})");
    // Straight to stderr: libtest's capture would hide an eprintln! of a passing test.
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
    SKIPPED.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    SUMMARY.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn()` that only touches a static; atexit
        // keeps the pointer until exit, and the function lives as long as the program.
        unsafe {
            atexit(summary);
        }
    });
}
