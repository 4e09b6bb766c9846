//! The daemon's log line for the end of an attempt, by `[taskd] log_tasks`: a task that
//! failed for good at `warn` with what an operator needs to start (attempts, reason, error,
//! the last line of stderr), a retried attempt at `info` with when it runs again, and, with
//! `all`, every other end at `info`.
//!
//! Which line (if any) an end gets is a plain function ([`line_for`]), tested without a
//! runtime; this module only writes log events and never touches the broker.

use crate::broker::Finish;
use crate::config::LogTasks;
use crate::model::{AttemptReason, AttemptRecord};

/// What the log says about one attempt's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// `warn`: the task failed for good.
    Failed,
    /// `info`: the attempt failed; the task runs again later.
    Retrying,
    /// `info`: the task succeeded (only with `log_tasks = "all"`).
    Succeeded,
    /// `info`: the task was cancelled (only with `log_tasks = "all"`).
    Cancelled,
    /// `debug`: nothing an operator asked for (a task put back, or a quiet setting).
    Quiet,
}

/// The line for an attempt that ended as `finish` under `mode`.
pub fn line_for(mode: LogTasks, finish: &Finish) -> Line {
    match (mode, finish) {
        (LogTasks::None, _) | (_, Finish::Requeue | Finish::Release) => Line::Quiet,
        (_, Finish::Failed) => Line::Failed,
        (_, Finish::Retry { .. }) => Line::Retrying,
        (LogTasks::All, Finish::Succeeded) => Line::Succeeded,
        (LogTasks::All, Finish::Cancelled) => Line::Cancelled,
        (LogTasks::Failures, Finish::Succeeded | Finish::Cancelled) => Line::Quiet,
    }
}

/// The last non-blank line of an output tail, cut to 240 characters: enough to name the
/// cause ("can't open file …", "connection refused") without copying a page into the log.
pub fn last_line(tail: &str) -> &str {
    let line = tail
        .lines()
        .rev()
        .map(str::trim_end)
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    match line.char_indices().nth(240) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

/// The message of a task's `failed` line: a program that could not be started at all
/// (not found, not executable, a user that does not exist) says so first, because the fix is
/// in the config or on the machine, not in the task.
fn failed_message(reason: Option<AttemptReason>) -> &'static str {
    match reason {
        Some(AttemptReason::Spawn | AttemptReason::Invalid) => "task failed: it cannot run",
        _ => "task failed",
    }
}

fn ms(millis: i64) -> std::time::Duration {
    std::time::Duration::from_millis(millis.max(0) as u64)
}

/// Log the end of `attempt` (of at most `max_attempts`) as `mode` asks. The caller's span
/// carries the queue, the task id and the attempt number.
pub fn log_end(mode: LogTasks, max_attempts: u32, attempt: &AttemptRecord, finish: &Finish) {
    let reason = attempt.reason.map(|r| r.to_string()).unwrap_or_default();
    let error = attempt.error.as_deref().unwrap_or("");
    let stderr = last_line(&attempt.stderr_tail);
    match line_for(mode, finish) {
        Line::Failed => tracing::warn!(
            attempts = attempt.number,
            max_attempts,
            reason,
            error,
            stderr,
            "{}",
            failed_message(attempt.reason)
        ),
        Line::Retrying => {
            let (next, wait) = match finish {
                Finish::Retry { at } => {
                    let t = std::time::UNIX_EPOCH + ms(*at);
                    let wait = ms(*at - attempt.ended_at);
                    (
                        humantime::format_rfc3339_seconds(t).to_string(),
                        // To the second above one second: the jitter's milliseconds are noise.
                        if wait.as_secs() == 0 {
                            format!("{}ms", wait.as_millis())
                        } else {
                            humantime::format_duration(std::time::Duration::from_secs(
                                wait.as_secs(),
                            ))
                            .to_string()
                        },
                    )
                }
                _ => (String::new(), String::new()),
            };
            tracing::info!(
                attempts = attempt.number,
                max_attempts,
                reason,
                error,
                stderr,
                next,
                "attempt failed; retrying in {wait}"
            )
        }
        Line::Succeeded => tracing::info!(attempts = attempt.number, "task succeeded"),
        Line::Cancelled => tracing::info!(attempts = attempt.number, error, "task cancelled"),
        Line::Quiet => tracing::debug!(reason, next = ?finish, "attempt finished"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_logs_what_it_says() {
        let retry = Finish::Retry { at: 5 };
        let ends = [
            Finish::Succeeded,
            Finish::Failed,
            retry,
            Finish::Cancelled,
            Finish::Requeue,
            Finish::Release,
        ];
        let lines = |mode| ends.iter().map(|f| line_for(mode, f)).collect::<Vec<_>>();
        use Line::*;
        assert_eq!(
            lines(LogTasks::Failures),
            [Quiet, Failed, Retrying, Quiet, Quiet, Quiet]
        );
        assert_eq!(
            lines(LogTasks::All),
            [Succeeded, Failed, Retrying, Cancelled, Quiet, Quiet]
        );
        assert_eq!(lines(LogTasks::None), [Quiet; 6]);
    }

    #[test]
    fn last_line_skips_blank_lines_and_is_bounded() {
        assert_eq!(last_line("first\nsecond\n\n  \n"), "second");
        assert_eq!(last_line(""), "");
        let long = "é".repeat(300);
        assert_eq!(last_line(&long).chars().count(), 240);
    }
}
