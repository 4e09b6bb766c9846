//! How many tasks a queue's dispatcher claims, and whether it needs them now: a pure
//! function of what the queue holds and runs, so that the arithmetic is tested without a
//! runtime or a store. The dispatcher only reads the numbers and acts on the plan.

/// Most tasks one claim takes.
pub const CLAIM_BATCH: usize = 64;
/// Tasks shorter than this are claimed further ahead ([`HOLD_AHEAD_SHORT`]): for them a
/// claim per task would cost more than the task. Longer tasks hold at most `concurrency`.
pub const SHORT_TASK_MS: u64 = 100;
pub const HOLD_AHEAD_SHORT: usize = 32;
/// For short tasks on long-lived workers, which take a task in tens of microseconds: one
/// claim per commit must cover the time a commit takes (an fsync), or the workers idle.
pub const WORKER_CLAIM_BATCH: usize = 256;
pub const WORKER_HOLD_AHEAD_SHORT: usize = 256;

/// What the dispatcher knows about its queue when it decides whether to claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLoad {
    /// The queue's `concurrency`.
    pub concurrency: usize,
    /// Its tasks whose process runs now.
    pub running: usize,
    /// Tasks this node claimed and holds, not started yet.
    pub held: usize,
    /// For a `worker` queue: its idle long-lived workers (tasks start only on one).
    pub idle_workers: Option<usize>,
    /// The last claim got all it asked for: more tasks are probably waiting.
    pub backlog: bool,
    /// How long the queue's last task ran (`u64::MAX` before the first).
    pub last_run_ms: u64,
}

/// What the dispatcher does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimPlan {
    /// Nothing to claim: every slot is busy or has a held task, and the held buffer is full
    /// enough (or the queue is dry). Wait for news.
    Wait,
    /// Claim up to `want` tasks. `now`: a free slot waits with nothing to start, so the
    /// answer is needed at once; otherwise the claim only tops up the held buffer and may
    /// share a commit with results ([`crate::broker::Broker::claim_ahead`]).
    Claim { want: usize, now: bool },
}

/// The claim for `load`: enough to fill the free slots and, while the queue has a backlog,
/// a held buffer ahead of them (up to `concurrency`, or further for short tasks), so that a
/// finishing task is replaced at once instead of after a round trip to the store.
pub fn plan(load: QueueLoad) -> ClaimPlan {
    let mut free = load.concurrency.saturating_sub(load.running);
    // A worker queue starts a task only on an idle worker: with none (all starting,
    // backing off or FATAL) its tasks stay queued, unclaimed and uncharged.
    if let Some(idle) = load.idle_workers {
        free = free.min(idle);
    }
    let (batch, short_ahead) = match load.idle_workers {
        Some(_) => (WORKER_CLAIM_BATCH, WORKER_HOLD_AHEAD_SHORT),
        None => (CLAIM_BATCH, HOLD_AHEAD_SHORT),
    };
    let ahead = if !load.backlog || (load.idle_workers == Some(0) && load.running == 0) {
        0
    } else if load.last_run_ms < SHORT_TASK_MS {
        short_ahead.max(load.concurrency).min(batch)
    } else {
        load.concurrency.min(batch)
    };
    // Claim when a free slot has nothing to start, or when the held buffer ran low.
    let claim = free > load.held || (ahead > 0 && load.held <= ahead / 2);
    let want = (free + ahead).saturating_sub(load.held).min(batch);
    if claim && want > 0 {
        ClaimPlan::Claim {
            want,
            now: free > load.held,
        }
    } else {
        ClaimPlan::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(concurrency: usize, running: usize, held: usize) -> QueueLoad {
        QueueLoad {
            concurrency,
            running,
            held,
            idle_workers: None,
            backlog: false,
            last_run_ms: u64::MAX,
        }
    }

    #[test]
    fn without_a_backlog_it_claims_only_the_free_slots_at_once() {
        assert_eq!(plan(load(4, 0, 0)), ClaimPlan::Claim { want: 4, now: true });
        assert_eq!(plan(load(4, 3, 0)), ClaimPlan::Claim { want: 1, now: true });
        assert_eq!(plan(load(4, 4, 0)), ClaimPlan::Wait, "every slot busy");
        assert_eq!(
            plan(load(4, 2, 2)),
            ClaimPlan::Wait,
            "the held tasks fill the free slots"
        );
        assert_eq!(
            plan(load(1000, 0, 0)),
            ClaimPlan::Claim {
                want: CLAIM_BATCH,
                now: true
            },
            "one claim takes at most a batch"
        );
    }

    #[test]
    fn with_a_backlog_it_holds_up_to_the_concurrency_ahead() {
        let busy = QueueLoad {
            backlog: true,
            last_run_ms: 5_000,
            ..load(4, 4, 0)
        };
        assert_eq!(
            plan(busy),
            ClaimPlan::Claim {
                want: 4,
                now: false
            },
            "every slot busy: top up the held buffer, no hurry"
        );
        let half = QueueLoad { held: 2, ..busy };
        assert_eq!(
            plan(half),
            ClaimPlan::Claim {
                want: 2,
                now: false
            },
            "half full: top up"
        );
        let enough = QueueLoad { held: 3, ..busy };
        assert_eq!(plan(enough), ClaimPlan::Wait, "more than half full: wait");
    }

    #[test]
    fn short_tasks_are_held_further_ahead() {
        let short = QueueLoad {
            backlog: true,
            last_run_ms: 2,
            ..load(4, 4, 0)
        };
        assert_eq!(
            plan(short),
            ClaimPlan::Claim {
                want: HOLD_AHEAD_SHORT,
                now: false
            }
        );
        let wide = QueueLoad {
            backlog: true,
            last_run_ms: 2,
            ..load(50, 0, 0)
        };
        assert_eq!(
            plan(wide),
            ClaimPlan::Claim {
                want: CLAIM_BATCH,
                now: true
            },
            "50 free and 50 ahead, capped at a batch"
        );
    }

    #[test]
    fn a_worker_queue_claims_only_for_idle_workers() {
        let none_idle = QueueLoad {
            idle_workers: Some(0),
            backlog: true,
            ..load(4, 0, 0)
        };
        assert_eq!(
            plan(none_idle),
            ClaimPlan::Wait,
            "no worker is up: nothing is claimed or held"
        );
        let two_idle = QueueLoad {
            idle_workers: Some(2),
            ..load(4, 0, 0)
        };
        assert_eq!(plan(two_idle), ClaimPlan::Claim { want: 2, now: true });
        let short = QueueLoad {
            idle_workers: Some(4),
            backlog: true,
            last_run_ms: 0,
            ..load(4, 0, 0)
        };
        assert_eq!(
            plan(short),
            ClaimPlan::Claim {
                want: WORKER_CLAIM_BATCH,
                now: true
            },
            "four free, and a worker-sized buffer ahead, capped at the worker batch"
        );
    }
}
