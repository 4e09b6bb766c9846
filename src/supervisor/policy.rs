//! Policy: what an attempt's outcome means for its task (succeed, retry when, fail).
//!
//! Pure functions of the queue config and the outcome, so they are tested without
//! processes or brokers.

use crate::broker::{Claimed, Finish};
use crate::config::QueueConfig;
use crate::executor::{Outcome, SpawnFailure, Status};
use crate::model::{AttemptReason, AttemptRecord, UnixMs};

/// A signal's name for people ("SIGTERM"), falling back to its number.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// Turn an executor outcome into the attempt to record and where the task goes next.
pub fn decide(
    q: &QueueConfig,
    c: &Claimed,
    node: &str,
    o: Outcome,
    now: UnixMs,
    rng: &mut impl rand::Rng,
) -> (AttemptRecord, Finish) {
    let mut a = AttemptRecord {
        number: c.attempt,
        node: node.to_string(),
        pid: o.pid,
        started_at: o.started_at_ms,
        ended_at: o.ended_at_ms,
        stdout_tail: String::from_utf8_lossy(&o.stdout_tail).into_owned(),
        stderr_tail: String::from_utf8_lossy(&o.stderr_tail).into_owned(),
        ..Default::default()
    };
    let retry_or_fail = |a: &mut AttemptRecord, rng: &mut dyn rand::RngCore| {
        if c.attempt >= q.max_attempts {
            if let Some(e) = &mut a.error {
                e.push_str(&format!("; gave up after {} attempts", c.attempt));
            }
            Finish::Failed
        } else {
            let mut r = rng;
            let delay = q.backoff.delay(c.attempt, &mut r);
            Finish::Retry {
                at: now + delay.as_millis() as i64,
            }
        }
    };
    let finish = match o.status {
        Status::Exited(0) => {
            a.exit_code = Some(0);
            a.reason = Some(AttemptReason::Exit);
            Finish::Succeeded
        }
        Status::Exited(code) => {
            a.exit_code = Some(code);
            a.reason = Some(AttemptReason::Exit);
            if q.fail_exit_codes.contains(&code) {
                a.error = Some(format!(
                    "exit code {code} (in fail_exit_codes: not retried)"
                ));
                Finish::Failed
            } else {
                a.error = Some(format!("exit code {code}"));
                retry_or_fail(&mut a, rng)
            }
        }
        Status::Signaled(sig) => {
            a.signal = Some(sig);
            a.reason = Some(AttemptReason::Signal);
            a.error = Some(format!("killed by {}", signal_name(sig)));
            retry_or_fail(&mut a, rng)
        }
        Status::TimedOut { killed_with } => {
            a.signal = Some(killed_with);
            a.reason = Some(AttemptReason::Timeout);
            a.error = Some(format!(
                "timed out after {} (process group stopped with {})",
                humantime::format_duration(q.timeout),
                signal_name(killed_with)
            ));
            retry_or_fail(&mut a, rng)
        }
        Status::Cancelled => {
            a.reason = Some(AttemptReason::Cancelled);
            a.error = Some("cancelled by an operator while running".into());
            Finish::Cancelled
        }
        Status::Interrupted => {
            a.reason = Some(AttemptReason::Shutdown);
            a.error =
                Some("the daemon shut down; put back in the queue (attempt not charged)".into());
            Finish::Requeue
        }
        Status::SpawnFailed { kind, message } => {
            a.reason = Some(AttemptReason::Spawn);
            a.error = Some(match kind {
                SpawnFailure::NotFound
                | SpawnFailure::NotExecutable
                | SpawnFailure::BadCwd
                | SpawnFailure::Other => {
                    format!("could not start: {message}")
                }
            });
            Finish::Failed
        }
    };
    (a, finish)
}
