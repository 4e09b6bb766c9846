//! Policy: what an attempt's outcome means for its task (succeed, retry when, fail).
//!
//! Pure functions of the queue config and the outcome, so they are tested without
//! processes or brokers.

use crate::broker::{Claimed, Finish};
use crate::config::QueueConfig;
use crate::executor::{signal_name, Outcome, Returned, Runner, SpawnFailure, Status, Verdict};
use crate::model::{AttemptReason, AttemptRecord, NodeId, UnixMs};

/// A failed attempt: retry after the backoff while attempts remain, else fail (and say so in
/// the attempt's error).
pub fn retry_or_fail(
    queue: &QueueConfig,
    claimed: &Claimed,
    attempt: &mut AttemptRecord,
    now: UnixMs,
    rng: &mut dyn rand::RngCore,
) -> Finish {
    if claimed.attempt >= queue.max_attempts {
        if let Some(e) = &mut attempt.error {
            e.push_str(&format!("; gave up after {} attempts", claimed.attempt));
        }
        Finish::Failed
    } else {
        let mut r = rng;
        let delay = queue.backoff.delay(claimed.attempt, &mut r);
        Finish::Retry {
            at: now + delay.as_millis() as i64,
        }
    }
}

/// A long-lived worker died running the task (`attempt`'s reason `crash`), `before` times
/// already on this task: at the queue's `max_crashes`-th death the task fails, attempts left
/// or not, since it is the likely cause. Any other attempt, or one not to be retried, keeps
/// `finish`.
pub fn limit_crashes(
    queue: &QueueConfig,
    before: u32,
    attempt: &mut AttemptRecord,
    finish: Finish,
) -> Finish {
    if attempt.reason != Some(AttemptReason::Crash) || !matches!(finish, Finish::Retry { .. }) {
        return finish;
    }
    let crashes = before + 1;
    if crashes < queue.max_crashes {
        return finish;
    }
    let note = format!(
        "the worker died running this task {crashes} times (max_crashes = {}): failed, not retried, as the likely cause",
        queue.max_crashes
    );
    attempt.error = Some(match attempt.error.take() {
        Some(e) => format!("{e}; {note}"),
        None => note,
    });
    Finish::Failed
}

/// The record of one run of `claimed` task on `node`, before its reason and error are
/// known: number, pid, start and end, and the output tails (`(stdout, stderr)`).
fn attempt_of(
    claimed: &Claimed,
    node: &NodeId,
    pid: Option<i32>,
    (started_at, ended_at): (UnixMs, UnixMs),
    (stdout, stderr): (&[u8], &[u8]),
) -> AttemptRecord {
    AttemptRecord {
        number: claimed.attempt,
        node: node.clone(),
        pid,
        started_at,
        ended_at,
        stdout_tail: String::from_utf8_lossy(stdout).into_owned(),
        stderr_tail: String::from_utf8_lossy(stderr).into_owned(),
        ..Default::default()
    }
}

/// Turn an attempt's outcome into the attempt to record and where the task goes next.
///
/// A process of its own: exit 0 succeeds; another exit code, a signal or a timeout is a
/// failed attempt under the retry policy (unless the code is in `fail_exit_codes`); a
/// program that cannot start fails at once. A long-lived worker: `ok` succeeds; `error`
/// fails at once; `retry`, a crash, a protocol error and a timeout are failed attempts under
/// the retry policy; a task no worker took goes back uncharged. Either way a cancel ends
/// the task `cancelled`, and a shutdown puts it back uncharged.
///
/// A success carries what the task returned into the attempt (the broker stores it with
/// the task), unless the result cannot be kept: over `max_result`, or a result file the
/// task swapped for something else. That fails the task at once, with reason `result`,
/// like a worker's `error`: running it again would redo its work to return the same.
pub fn decide(
    queue: &QueueConfig,
    claimed: &Claimed,
    node: &NodeId,
    outcome: Outcome,
    now: UnixMs,
    rng: &mut impl rand::Rng,
) -> (AttemptRecord, Finish) {
    let mut a = attempt_of(
        claimed,
        node,
        outcome.pid,
        (outcome.started_at_ms, outcome.ended_at_ms),
        (&outcome.stdout_tail, &outcome.stderr_tail),
    );
    let retry_or_fail = |a: &mut AttemptRecord, rng: &mut dyn rand::RngCore| {
        retry_or_fail(queue, claimed, a, now, rng)
    };
    let returned = outcome.returned;
    let usage = outcome.usage.unwrap_or_default();
    a.memory_peak = usage.memory_peak;
    a.cpu_usec = usage.cpu_usec;
    // The OOM killer ended a process of the task's cgroup: the attempt's reason, whatever
    // the leader then did (died of it, or exited with an error).
    let oom = |a: &mut AttemptRecord| {
        if usage.oom_kills > 0 {
            a.reason = Some(AttemptReason::Oom);
            let what = match &a.error {
                Some(e) => format!(" ({e})"),
                None => String::new(),
            };
            a.error = Some(format!(
                "out of memory: the kernel's OOM killer ended {} of the task's processes at memory_max {}{what}",
                usage.oom_kills,
                queue
                    .memory_max
                    .map(crate::config::show_size)
                    .unwrap_or_else(|| "?".into())
            ));
        }
    };
    let finish = match outcome.status {
        Status::Exited(0) => {
            a.exit_code = Some(0);
            a.reason = Some(AttemptReason::Exit);
            succeed(queue, &mut a, returned, outcome.ran_on)
        }
        Status::Exited(code) => {
            a.exit_code = Some(code);
            a.reason = Some(AttemptReason::Exit);
            if queue.fail_exit_codes.contains(&code) {
                a.error = Some(format!(
                    "exit code {code} (in fail_exit_codes: not retried)"
                ));
                Finish::Failed
            } else {
                a.error = Some(format!("exit code {code}"));
                oom(&mut a);
                retry_or_fail(&mut a, rng)
            }
        }
        Status::Signaled(sig) => {
            a.signal = Some(sig);
            a.reason = Some(AttemptReason::Signal);
            a.error = Some(format!("killed by {}", signal_name(sig)));
            oom(&mut a);
            retry_or_fail(&mut a, rng)
        }
        Status::TimedOut { killed_with } => {
            a.signal = Some(killed_with);
            a.reason = Some(AttemptReason::Timeout);
            a.error = Some(match outcome.ran_on {
                Runner::Process => format!(
                    "timed out after {} (process group stopped with {})",
                    humantime::format_duration(claimed.task.timeout(queue.timeout)),
                    signal_name(killed_with)
                ),
                Runner::Worker => format!(
                    "timed out after {} (the worker's process group was stopped with {}; the worker was restarted)",
                    humantime::format_duration(claimed.task.timeout(queue.timeout)),
                    signal_name(killed_with)
                ),
            });
            retry_or_fail(&mut a, rng)
        }
        Status::Cancelled => {
            a.reason = Some(AttemptReason::Cancelled);
            a.error = Some(match outcome.ran_on {
                Runner::Process => "cancelled by an operator while running".into(),
                Runner::Worker => {
                    "cancelled by an operator while running (its worker was restarted)".into()
                }
            });
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
        Status::Answered { verdict, message } => {
            a.reason = Some(AttemptReason::Result);
            match verdict {
                Verdict::Ok => succeed(queue, &mut a, returned, outcome.ran_on),
                Verdict::Error => {
                    a.error = Some(format!(
                        "the worker reported an error (not retried): {}",
                        message.as_deref().unwrap_or("no message")
                    ));
                    Finish::Failed
                }
                Verdict::Retry => {
                    a.error = Some(format!(
                        "the worker asked for a retry: {}",
                        message.as_deref().unwrap_or("no message")
                    ));
                    retry_or_fail(&mut a, rng)
                }
            }
        }
        Status::Crashed { how, signal } => {
            a.reason = Some(AttemptReason::Crash);
            a.signal = signal;
            a.error = Some(format!(
                "the worker{} died while running the task: {how}",
                pid_note(outcome.pid)
            ));
            retry_or_fail(&mut a, rng)
        }
        Status::Protocol { line, why } => {
            a.reason = Some(AttemptReason::Protocol);
            a.error = Some(format!(
                "the worker{} broke the protocol ({why}): {line}; it was restarted",
                pid_note(outcome.pid)
            ));
            retry_or_fail(&mut a, rng)
        }
        Status::Unavailable => Finish::Release,
    };
    (a, finish)
}

/// A successful run: the task succeeds with what it returned, or fails at once (reason
/// `result`, not retried) when that cannot be kept.
fn succeed(
    queue: &QueueConfig,
    attempt: &mut AttemptRecord,
    returned: Returned,
    ran_on: Runner,
) -> Finish {
    let whose = match ran_on {
        Runner::Process => "the task's result file",
        Runner::Worker => "the worker's result",
    };
    match returned {
        Returned::Nothing => Finish::Succeeded,
        Returned::Value(v) => {
            attempt.result = Some(v);
            Finish::Succeeded
        }
        Returned::TooBig { bytes } => {
            attempt.reason = Some(AttemptReason::Result);
            attempt.error = Some(if queue.max_result == 0 {
                format!(
                    "the task returned a result ({whose}: {bytes} bytes), but its queue keeps none (max_result = 0); failed, not retried"
                )
            } else {
                format!(
                    "the task's result is too big: {whose} holds {bytes} bytes, over max_result ({}); failed, not retried (raise max_result, or return less)",
                    crate::config::show_size(queue.max_result)
                )
            });
            Finish::Failed
        }
        Returned::Unreadable(why) => {
            attempt.reason = Some(AttemptReason::Result);
            attempt.error = Some(format!(
                "the task's result was not kept: {why}; failed, not retried"
            ));
            Finish::Failed
        }
    }
}

/// " (pid 42)", or nothing when no process is known.
fn pid_note(pid: Option<i32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// A claimed task for unit tests: a fresh id in queue `q`, run number `attempt`.
#[cfg(test)]
pub(crate) fn test_claimed(attempt: u32) -> Claimed {
    use crate::broker::Lease;
    use crate::model::{TaskId, TaskRecord, TaskState};
    let task = TaskRecord {
        id: TaskId::new(),
        queue: "q".parse().expect("name"),
        state: TaskState::Queued,
        payload: serde_json::json!({}),
        args: vec![],
        priority: 0,
        unique_key: None,
        run_at: 0,
        attempts: attempt - 1,
        created_at: 0,
        updated_at: 0,
        finished_at: None,
        last_error: None,
        cancel_requested: false,
        node: None,
        schedule: None,
        slot: None,
        after: Vec::new(),
        expires_at: None,
        payload_b64: None,
    };
    Claimed {
        lease: Lease {
            task: task.id,
            token: 1,
            node: "n".into(),
        },
        task,
        attempt,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rand::SeedableRng;

    use super::*;
    use crate::config::{ArgTemplate, Backoff, BackoffKind, Program};

    fn queue(max_attempts: u32) -> QueueConfig {
        let mut q = QueueConfig::new(
            "q".parse().expect("a valid name"),
            Program::Command(vec![ArgTemplate::parse("/bin/true").expect("a literal")]),
        );
        q.max_attempts = max_attempts;
        q.fail_exit_codes = vec![64];
        q.backoff = Backoff {
            kind: BackoffKind::Exponential,
            base: Duration::from_secs(10),
            max: Duration::from_secs(60),
            jitter: false,
        };
        q
    }

    fn outcome(status: Status) -> Outcome {
        Outcome {
            status,
            pid: Some(42),
            started_at_ms: 1_000,
            ended_at_ms: 2_000,
            stdout_tail: b"out".to_vec(),
            stderr_tail: b"err".to_vec(),
            stdout_total: 3,
            stderr_total: 3,
            stray_killed: false,
            ran_on: Runner::Process,
            returned: Returned::Nothing,
            usage: None,
        }
    }

    fn decide_with(max: u32, attempt: u32, status: Status) -> (AttemptRecord, Finish) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        decide(
            &queue(max),
            &super::test_claimed(attempt),
            &"n".into(),
            outcome(status),
            100_000,
            &mut rng,
        )
    }

    #[test]
    fn exit_zero_succeeds_and_keeps_the_tails() {
        let (a, f) = decide_with(3, 1, Status::Exited(0));
        assert_eq!(f, Finish::Succeeded);
        assert_eq!(
            (a.reason, a.exit_code, a.number),
            (Some(AttemptReason::Exit), Some(0), 1)
        );
        assert_eq!(
            (a.stdout_tail.as_str(), a.stderr_tail.as_str()),
            ("out", "err")
        );
        assert_eq!((a.started_at, a.ended_at, a.pid), (1_000, 2_000, Some(42)));
    }

    #[test]
    fn a_failed_attempt_is_retried_after_the_backoff_until_the_budget_is_spent() {
        let (a, f) = decide_with(3, 1, Status::Exited(3));
        assert_eq!(
            f,
            Finish::Retry {
                at: 100_000 + 10_000
            }
        );
        assert_eq!(a.error.as_deref(), Some("exit code 3"));
        let (_, f) = decide_with(3, 2, Status::Exited(3));
        assert_eq!(
            f,
            Finish::Retry {
                at: 100_000 + 20_000
            },
            "exponential: twice the base"
        );
        let (a, f) = decide_with(3, 3, Status::Exited(3));
        assert_eq!(f, Finish::Failed);
        assert!(
            a.error
                .as_deref()
                .unwrap_or("")
                .contains("gave up after 3 attempts"),
            "{a:?}"
        );
    }

    #[test]
    fn listed_exit_codes_and_spawn_failures_fail_at_once() {
        let (a, f) = decide_with(5, 1, Status::Exited(64));
        assert_eq!(f, Finish::Failed);
        assert!(a.error.as_deref().unwrap_or("").contains("fail_exit_codes"));
        let (a, f) = decide_with(
            5,
            1,
            Status::SpawnFailed {
                kind: SpawnFailure::NotFound,
                message: "program not found: /nope".into(),
            },
        );
        assert_eq!(f, Finish::Failed);
        assert_eq!(a.reason, Some(AttemptReason::Spawn));
        assert!(a.error.as_deref().unwrap_or("").contains("/nope"));
    }

    #[test]
    fn signals_timeouts_cancels_and_shutdowns() {
        let (a, f) = decide_with(5, 1, Status::Signaled(9));
        assert_eq!((a.reason, a.signal), (Some(AttemptReason::Signal), Some(9)));
        assert!(a.error.as_deref().unwrap_or("").contains("SIGKILL"));
        assert!(matches!(f, Finish::Retry { .. }));
        let (a, f) = decide_with(5, 1, Status::TimedOut { killed_with: 15 });
        assert_eq!(a.reason, Some(AttemptReason::Timeout));
        assert!(
            a.error
                .as_deref()
                .unwrap_or("")
                .contains("timed out after 30m"),
            "{a:?}"
        );
        assert!(matches!(f, Finish::Retry { .. }));
        let (a, f) = decide_with(5, 1, Status::Cancelled);
        assert_eq!(
            (a.reason, f),
            (Some(AttemptReason::Cancelled), Finish::Cancelled)
        );
        let (a, f) = decide_with(5, 5, Status::Interrupted);
        assert_eq!(
            (a.reason, f),
            (Some(AttemptReason::Shutdown), Finish::Requeue),
            "never charged, even on the last attempt"
        );
    }

    /// Decide a long-lived worker's outcome for run `attempt` of a task of a `worker`
    /// queue with three attempts.
    fn decide_end(attempt: u32, status: Status) -> (AttemptRecord, Finish) {
        let mut q = QueueConfig::new(
            "q".parse().expect("a valid name"),
            Program::Worker(crate::config::WorkerProgram::new(vec!["w".into()])),
        );
        q.max_attempts = 3;
        let o = Outcome {
            status,
            pid: Some(42),
            started_at_ms: 1,
            ended_at_ms: 2,
            stdout_tail: b"out".to_vec(),
            stderr_tail: Vec::new(),
            stdout_total: 3,
            stderr_total: 0,
            stray_killed: false,
            ran_on: Runner::Worker,
            returned: Returned::Nothing,
            usage: None,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        decide(
            &q,
            &super::test_claimed(attempt),
            &"n".into(),
            o,
            1_000,
            &mut rng,
        )
    }

    #[test]
    fn answers_map_to_success_failure_and_retry() {
        let ok = Status::Answered {
            verdict: Verdict::Ok,
            message: None,
        };
        let (a, f) = decide_end(1, ok);
        assert_eq!(
            (a.reason, f),
            (Some(AttemptReason::Result), Finish::Succeeded)
        );
        assert_eq!(a.stdout_tail, "out");
        let error = Status::Answered {
            verdict: Verdict::Error,
            message: Some("bad payload".into()),
        };
        let (a, f) = decide_end(1, error);
        assert_eq!(f, Finish::Failed, "error is not retried");
        assert!(a.error.unwrap().contains("bad payload"));
        let retry = Status::Answered {
            verdict: Verdict::Retry,
            message: Some("busy".into()),
        };
        assert!(matches!(
            decide_end(1, retry.clone()).1,
            Finish::Retry { .. }
        ));
        assert_eq!(decide_end(3, retry).1, Finish::Failed, "attempts spent");
    }

    #[test]
    fn a_success_carries_its_result_and_one_that_cannot_be_kept_fails_at_once() {
        let mut q = queue(5);
        q.max_result = 10;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut run = |status: Status, returned: Returned, ran_on: Runner| {
            let mut o = outcome(status);
            o.returned = returned;
            o.ran_on = ran_on;
            decide(
                &q,
                &super::test_claimed(1),
                &"n".into(),
                o,
                100_000,
                &mut rng,
            )
        };
        let ok = Status::Answered {
            verdict: Verdict::Ok,
            message: None,
        };
        let v = serde_json::json!({"n": 1});
        for (status, on) in [
            (Status::Exited(0), Runner::Process),
            (ok.clone(), Runner::Worker),
        ] {
            let (a, f) = run(status.clone(), Returned::Value(v.clone()), on);
            assert_eq!((f, a.result.as_ref()), (Finish::Succeeded, Some(&v)));
            assert_eq!(a.error, None);
            let (a, f) = run(status.clone(), Returned::Nothing, on);
            assert_eq!((f, a.result), (Finish::Succeeded, None));
            let (a, f) = run(status.clone(), Returned::TooBig { bytes: 11 }, on);
            assert_eq!(f, Finish::Failed, "not retried, with attempts left");
            assert_eq!(a.reason, Some(AttemptReason::Result));
            assert_eq!(a.result, None);
            let e = a.error.unwrap();
            assert!(
                e.contains("too big") && e.contains("11 bytes") && e.contains("max_result (10B)"),
                "{e}"
            );
            let (a, f) = run(status, Returned::Unreadable("a symbolic link".into()), on);
            assert_eq!((f, a.reason), (Finish::Failed, Some(AttemptReason::Result)));
            assert!(a.error.unwrap().contains("a symbolic link"));
        }
        let (a, _) = run(
            Status::Exited(0),
            Returned::TooBig { bytes: 11 },
            Runner::Process,
        );
        assert!(a.error.unwrap().contains("result file"));
        assert_eq!(a.exit_code, Some(0), "the exit code is kept");
        let (a, _) = run(ok, Returned::TooBig { bytes: 11 }, Runner::Worker);
        assert!(a.error.unwrap().contains("the worker's result"));
        q.max_result = 0;
        let o = Outcome {
            returned: Returned::TooBig { bytes: 2 },
            ..outcome(Status::Exited(0))
        };
        let (a, f) = decide(&q, &super::test_claimed(1), &"n".into(), o, 0, &mut rng);
        assert_eq!(f, Finish::Failed);
        assert!(a.error.unwrap().contains("keeps none (max_result = 0)"));
    }

    #[test]
    fn the_max_crashes_th_death_of_a_worker_on_a_task_fails_it() {
        let mut q = queue(10);
        q.max_crashes = 3;
        let crash = || Status::Crashed {
            how: "killed by SIGKILL".into(),
            signal: Some(9),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let run = |q: &QueueConfig, before: u32, rng: &mut rand::rngs::StdRng| {
            let (mut a, f) = decide(
                q,
                &super::test_claimed(before + 1),
                &"n".into(),
                outcome(crash()),
                100_000,
                rng,
            );
            let f = limit_crashes(q, before, &mut a, f);
            (a, f)
        };
        for before in 0..2 {
            let (_, f) = run(&q, before, &mut rng);
            assert!(matches!(f, Finish::Retry { .. }), "crash {}", before + 1);
        }
        let (a, f) = run(&q, 2, &mut rng);
        assert_eq!(f, Finish::Failed, "attempts left, but the third crash");
        let e = a.error.unwrap();
        assert!(
            e.contains("died while running the task")
                && e.contains("died running this task 3 times (max_crashes = 3)"),
            "{e}"
        );
        // Only a crash counts, and only what would be retried.
        let (mut a, f) = decide_with(10, 1, Status::Exited(1));
        assert!(matches!(
            limit_crashes(&q, 5, &mut a, f),
            Finish::Retry { .. }
        ));
        q.max_crashes = 1;
        let (_, f) = run(&q, 0, &mut rng);
        assert_eq!(f, Finish::Failed, "max_crashes = 1: the first crash");
    }

    #[test]
    fn crashes_protocol_errors_and_timeouts_are_failed_attempts() {
        let (a, f) = decide_end(
            1,
            Status::Crashed {
                how: "killed by SIGKILL".into(),
                signal: Some(9),
            },
        );
        assert_eq!((a.reason, a.signal), (Some(AttemptReason::Crash), Some(9)));
        assert!(a.error.unwrap().contains("(pid 42) died"));
        assert!(matches!(f, Finish::Retry { .. }));
        let (a, f) = decide_end(
            3,
            Status::Protocol {
                line: "\"junk\"".into(),
                why: "not JSON".into(),
            },
        );
        assert_eq!(
            (a.reason, f),
            (Some(AttemptReason::Protocol), Finish::Failed)
        );
        assert!(a.error.unwrap().contains("junk"));
        let (a, _) = decide_end(1, Status::TimedOut { killed_with: 15 });
        assert_eq!(a.reason, Some(AttemptReason::Timeout));
        let (a, f) = decide_end(3, Status::Interrupted);
        assert_eq!(
            (a.reason, f),
            (Some(AttemptReason::Shutdown), Finish::Requeue)
        );
        assert_eq!(decide_end(1, Status::Unavailable).1, Finish::Release);
    }
}
