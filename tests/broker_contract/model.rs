//! The contract as a state machine: random sequences of operations (enqueue with priorities,
//! run-at times, unique keys and expiry; claim; start; finish in every way; cancel; retry;
//! pause and resume; renew; lease expiry and recovery; expire) driven through the [`Broker`]
//! trait, each checked against a small model of what every task's state must then be. Any
//! difference is a bug in the backend or in the model; proptest shrinks it to the shortest
//! sequence that shows it.
//!
//! It runs as one contract case (`model_random_operations`), so every backend the suite
//! knows runs it. `TASKD_MODEL_CASES` sets how many sequences (default [`DEFAULT_CASES`], a
//! few seconds to half a minute per backend); a long run is
//! `TASKD_MODEL_CASES=5000 cargo test --test broker_contract model_random_operations`.
//!
//! One store serves every sequence of a run: each sequence has queues of its own, and only
//! its own tasks are checked (a recovery or an expiry that touches the tasks an earlier
//! sequence left is filtered out).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use super::*;

/// Sequences per backend in a plain `cargo test`.
pub const DEFAULT_CASES: u32 = 48;
/// The longest sequence.
const MAX_OPS: usize = 40;
/// `max_lost` of the recoveries (rule 17).
const MAX_LOST: u32 = 2;
/// A time far enough away that no sequence reaches it.
const HOUR_MS: i64 = 3_600_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Now,
    Past,
    Future,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    Succeeded,
    Failed,
    Retry(When),
    /// Cancelled after its process ran (charged) or before (uncharged).
    Cancelled {
        ran: bool,
    },
    Requeue,
    Release,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    /// `Recover::Expired` past every lease: as if every node holding one died.
    ExpiredAll,
    /// `Recover::Expired` now: no lease of a minute has run out.
    ExpiredNone,
}

#[derive(Clone, Debug)]
pub enum Op {
    Enqueue {
        queue: usize,
        priority: i32,
        run_at: When,
        unique: Option<u8>,
        /// `Some(true)`: expired already; `Some(false)`: in an hour.
        expires: Option<bool>,
    },
    Claim {
        queue: usize,
        max: usize,
    },
    /// `started` with one of the leases handed out so far (maybe a stale one).
    Start(Index),
    Finish(Index, How),
    Cancel(Index),
    Retry(Index),
    Pause {
        queue: usize,
        paused: bool,
    },
    Renew,
    Recover(Scope),
    Expire,
}

fn when() -> impl Strategy<Value = When> {
    prop_oneof![Just(When::Now), Just(When::Past), Just(When::Future)]
}

fn op() -> impl Strategy<Value = Op> {
    let how = prop_oneof![
        Just(How::Succeeded),
        Just(How::Failed),
        when().prop_map(How::Retry),
        any::<bool>().prop_map(|ran| How::Cancelled { ran }),
        Just(How::Requeue),
        Just(How::Release),
    ];
    prop_oneof![
        6 => (0..2usize, -1..=1i32, when(), proptest::option::weighted(0.4, 0..2u8),
              proptest::option::weighted(0.2, any::<bool>()))
            .prop_map(|(queue, priority, run_at, unique, expires)| Op::Enqueue {
                queue, priority, run_at, unique, expires
            }),
        5 => (0..2usize, 1..4usize).prop_map(|(queue, max)| Op::Claim { queue, max }),
        4 => any::<Index>().prop_map(Op::Start),
        5 => (any::<Index>(), how).prop_map(|(i, h)| Op::Finish(i, h)),
        2 => any::<Index>().prop_map(Op::Cancel),
        2 => any::<Index>().prop_map(Op::Retry),
        1 => (0..2usize, any::<bool>()).prop_map(|(queue, paused)| Op::Pause { queue, paused }),
        1 => Just(Op::Renew),
        2 => prop_oneof![Just(Scope::All), Just(Scope::ExpiredAll), Just(Scope::ExpiredNone)]
            .prop_map(Op::Recover),
        1 => Just(Op::Expire),
    ]
}

fn terminal(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
    )
}

/// What one task must be, by the contract.
#[derive(Clone, Debug)]
struct Model {
    id: TaskId,
    queue: usize,
    priority: i32,
    unique: Option<String>,
    expired: bool,
    state: TaskState,
    /// A due `scheduled` or `retrying` task (a claim may promote it).
    due: bool,
    /// A claim of its queue ran while it was due: it may show as `queued` now.
    maybe_promoted: bool,
    attempts: u32,
    /// `attempts` when it was claimed: what an uncharged finish leaves.
    base: u32,
    /// The lease (an index into `Machine::leases`) that holds it.
    held: Option<usize>,
    cancel_requested: bool,
    /// Attempt records in its history, and how many of them are `lost`.
    history: usize,
    lost: u32,
    last_error: Option<&'static str>,
}

impl Model {
    fn waiting(&self) -> bool {
        matches!(self.state, TaskState::Scheduled | TaskState::Retrying)
            || (self.state == TaskState::Queued && self.held.is_none())
    }

    fn claimable(&self) -> bool {
        self.held.is_none()
            && !self.expired
            && (self.state == TaskState::Queued
                || (matches!(self.state, TaskState::Scheduled | TaskState::Retrying) && self.due))
    }

    /// Ends held, and running or reserved: a finish, a recovery.
    fn release(&mut self) {
        self.held = None;
        self.cancel_requested = false;
        self.due = false;
        self.maybe_promoted = false;
    }
}

struct Machine {
    b: B,
    queues: [QueueName; 2],
    tasks: Vec<Model>,
    leases: Vec<(usize, Lease)>,
    paused: [bool; 2],
}

/// A failed check, with the step it failed at.
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($msg)+)));
        }
    };
}

impl Machine {
    fn by_id(&self, id: TaskId) -> Option<usize> {
        self.tasks.iter().position(|t| t.id == id)
    }

    fn unique_holder(&self, queue: usize, key: &str, not: Option<usize>) -> Option<usize> {
        self.tasks.iter().enumerate().position(|(i, t)| {
            Some(i) != not
                && t.queue == queue
                && t.unique.as_deref() == Some(key)
                && !terminal(t.state)
        })
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let now = now_ms();
        match *op {
            Op::Enqueue {
                queue,
                priority,
                run_at,
                unique,
                expires,
            } => {
                let mut t = NewTask::new(self.queues[queue].clone(), r#"{"m":1}"#.into());
                t.priority = priority;
                t.run_at = match run_at {
                    When::Now => None,
                    When::Past => Some(now - 60_000),
                    When::Future => Some(now + HOUR_MS),
                };
                t.unique_key = unique.map(|k| format!("key-{k}"));
                t.expires_at = expires.map(|past| if past { now - 1_000 } else { now + HOUR_MS });
                let holder = t
                    .unique_key
                    .as_deref()
                    .and_then(|k| self.unique_holder(queue, k, None));
                let out = self
                    .b
                    .enqueue(vec![t.clone()])
                    .await
                    .map_err(|e| TestCaseError::fail(format!("enqueue: {e}")))?;
                check!(
                    out.len() == 1,
                    "enqueue answered {} for one task",
                    out.len()
                );
                match holder {
                    Some(h) => {
                        check!(
                            out[0].existing && out[0].id == self.tasks[h].id,
                            "enqueue with a held unique key: want the holder #{h}, got {:?}",
                            out[0]
                        );
                    }
                    None => {
                        let state = if run_at == When::Future {
                            TaskState::Scheduled
                        } else {
                            TaskState::Queued
                        };
                        check!(
                            !out[0].existing && out[0].id == t.id && out[0].state == state,
                            "enqueue: want new task {} {state}, got {:?}",
                            t.id,
                            out[0]
                        );
                        self.tasks.push(Model {
                            id: t.id,
                            queue,
                            priority,
                            unique: t.unique_key.clone(),
                            expired: expires == Some(true),
                            state,
                            due: false,
                            maybe_promoted: false,
                            attempts: 0,
                            base: 0,
                            held: None,
                            cancel_requested: false,
                            history: 0,
                            lost: 0,
                            last_error: None,
                        });
                    }
                }
            }
            Op::Claim { queue, max } => {
                let mut want: Vec<usize> = if self.paused[queue] {
                    Vec::new()
                } else {
                    (0..self.tasks.len())
                        .filter(|&i| self.tasks[i].queue == queue && self.tasks[i].claimable())
                        .collect()
                };
                // Highest priority first, then oldest (enqueue order) first.
                want.sort_by_key(|&i| (-self.tasks[i].priority, i));
                want.truncate(max);
                let got = self
                    .b
                    .claim(&NODE.into(), &self.queues[queue], max, LEASE)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("claim: {e}")))?;
                let got_ids: Vec<usize> = got
                    .iter()
                    .map(|c| self.by_id(c.task.id).unwrap_or(usize::MAX))
                    .collect();
                let mut sorted = got_ids.clone();
                sorted.sort_by_key(|&i| (-self.tasks.get(i).map_or(0, |t| t.priority), i));
                check!(
                    sorted == want,
                    "claim(max {max}) of queue {queue}: want tasks {want:?}, got {got_ids:?}"
                );
                for c in got {
                    let i = self.by_id(c.task.id).expect("checked above");
                    let t = &mut self.tasks[i];
                    check!(
                        c.attempt == t.attempts + 1 && c.task.attempts == t.attempts,
                        "claim of #{i}: attempt {} of a task with {} attempts (model {})",
                        c.attempt,
                        c.task.attempts,
                        t.attempts
                    );
                    check!(
                        c.task.state == TaskState::Queued,
                        "claim of #{i}: a claimed task is {} (want queued)",
                        c.task.state
                    );
                    t.state = TaskState::Queued;
                    t.due = false;
                    t.maybe_promoted = false;
                    t.base = t.attempts;
                    self.leases.push((i, c.lease));
                    t.held = Some(self.leases.len() - 1);
                }
                if !self.paused[queue] {
                    for t in self.tasks.iter_mut() {
                        if t.queue == queue && t.due && !t.expired {
                            t.maybe_promoted = true;
                        }
                    }
                }
            }
            Op::Start(pick) => {
                if self.leases.is_empty() {
                    return Ok(());
                }
                let l = pick.index(self.leases.len());
                let (i, lease) = self.leases[l].clone();
                let r = self.b.started(&lease, PID, PID_START).await;
                let t = &mut self.tasks[i];
                if t.held == Some(l) {
                    check!(r.is_ok(), "started with the lease of #{i}: {r:?}");
                    if t.state == TaskState::Queued {
                        t.attempts += 1;
                    }
                    t.state = TaskState::Running;
                } else {
                    check!(
                        matches!(r, Err(BrokerError::LeaseLost(x)) if x == t.id),
                        "started with a stale lease of #{i}: want LeaseLost, got {r:?}"
                    );
                }
            }
            Op::Finish(pick, how) => {
                if self.leases.is_empty() {
                    return Ok(());
                }
                let l = pick.index(self.leases.len());
                let (i, lease) = self.leases[l].clone();
                let next = match how {
                    How::Succeeded => Finish::Succeeded,
                    How::Failed => Finish::Failed,
                    How::Retry(w) => Finish::Retry {
                        at: match w {
                            When::Now => now,
                            When::Past => now - 60_000,
                            When::Future => now + HOUR_MS,
                        },
                    },
                    How::Cancelled { .. } => Finish::Cancelled,
                    How::Requeue => Finish::Requeue,
                    How::Release => Finish::Release,
                };
                // A released task never started; nor did one cancelled before it ran.
                let ran = !matches!(how, How::Cancelled { ran: false } | How::Release);
                let attempt = AttemptRecord {
                    number: self.tasks[i].base + 1,
                    node: lease.node.clone(),
                    pid: ran.then_some(PID),
                    started_at: now - 5,
                    ended_at: now,
                    exit_code: Some(if how == How::Succeeded { 0 } else { 1 }),
                    reason: Some(AttemptReason::Exit),
                    error: (how != How::Succeeded).then(|| "model: it failed".to_string()),
                    ..Default::default()
                };
                let r = self.b.finish(&lease, attempt, next).await;
                let t = &mut self.tasks[i];
                if t.held != Some(l) {
                    check!(
                        matches!(r, Err(BrokerError::LeaseLost(x)) if x == t.id),
                        "finish with a stale lease of #{i}: want LeaseLost, got {r:?}"
                    );
                    return Ok(());
                }
                check!(r.is_ok(), "finish({how:?}) of #{i}: {r:?}");
                let how = match how {
                    How::Retry(_) | How::Requeue | How::Release if t.cancel_requested => {
                        t.last_error = Some("cancelled by an operator");
                        How::Cancelled { ran: true }
                    }
                    How::Cancelled { .. } if t.cancel_requested => {
                        t.last_error = Some("cancelled by an operator");
                        how
                    }
                    other => {
                        t.last_error = None;
                        other
                    }
                };
                let charged = match how {
                    How::Requeue | How::Release => false,
                    How::Cancelled { .. } => ran,
                    _ => true,
                };
                t.attempts = t.base + u32::from(charged);
                if !matches!(op, Op::Finish(_, How::Release)) {
                    t.history += 1;
                }
                t.release();
                t.state = match how {
                    How::Succeeded => TaskState::Succeeded,
                    How::Failed => TaskState::Failed,
                    How::Retry(w) => {
                        t.due = w != When::Future;
                        TaskState::Retrying
                    }
                    How::Cancelled { .. } => TaskState::Cancelled,
                    How::Requeue | How::Release => TaskState::Queued,
                };
            }
            Op::Cancel(pick) => {
                if self.tasks.is_empty() {
                    return Ok(());
                }
                let i = pick.index(self.tasks.len());
                let r = self
                    .b
                    .cancel(self.tasks[i].id)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("cancel of #{i}: {e}")))?;
                let t = &mut self.tasks[i];
                let want = if terminal(t.state) {
                    CancelOutcome::AlreadyFinished(t.state)
                } else if t.held.is_some() {
                    t.cancel_requested = true;
                    CancelOutcome::Requested
                } else {
                    t.state = TaskState::Cancelled;
                    t.due = false;
                    t.maybe_promoted = false;
                    t.last_error = Some("cancelled before it ran");
                    CancelOutcome::Cancelled
                };
                check!(r == want, "cancel of #{i}: want {want:?}, got {r:?}");
            }
            Op::Retry(pick) => {
                if self.tasks.is_empty() {
                    return Ok(());
                }
                let i = pick.index(self.tasks.len());
                let r = self.b.retry(self.tasks[i].id).await;
                let t = &self.tasks[i];
                let refused = !matches!(t.state, TaskState::Failed | TaskState::Cancelled)
                    || t.unique
                        .as_deref()
                        .is_some_and(|k| self.unique_holder(t.queue, k, Some(i)).is_some());
                if refused {
                    check!(
                        matches!(r, Err(BrokerError::Conflict(_))),
                        "retry of #{i} ({}): want Conflict, got {r:?}",
                        t.state
                    );
                } else {
                    check!(r.is_ok(), "retry of #{i}: {r:?}");
                    let t = &mut self.tasks[i];
                    t.state = TaskState::Queued;
                    t.attempts = 0;
                    t.cancel_requested = false;
                    t.last_error = None;
                }
            }
            Op::Pause { queue, paused } => {
                self.b
                    .set_paused(&self.queues[queue], paused)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("set_paused: {e}")))?;
                self.paused[queue] = paused;
                let all = self
                    .b
                    .paused()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("paused: {e}")))?;
                for (q, name) in self.queues.iter().enumerate() {
                    check!(
                        all.contains(name) == self.paused[q],
                        "paused() says queue {q} paused: {}, want {}",
                        all.contains(name),
                        self.paused[q]
                    );
                }
            }
            Op::Renew => {
                let leases: Vec<Lease> = self.leases.iter().map(|(_, l)| l.clone()).collect();
                let mut lost = self
                    .b
                    .renew(&leases, LEASE)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("renew: {e}")))?;
                let mut want: Vec<TaskId> = self
                    .leases
                    .iter()
                    .enumerate()
                    .filter(|(l, (i, _))| self.tasks[*i].held != Some(*l))
                    .map(|(_, (_, lease))| lease.task)
                    .collect();
                lost.sort();
                want.sort();
                check!(lost == want, "renew: want lost {want:?}, got {lost:?}");
            }
            Op::Recover(scope) => {
                let scope_arg = match scope {
                    Scope::All => Recover::All,
                    Scope::ExpiredAll => Recover::Expired(now + 2 * LEASE.as_millis() as i64),
                    Scope::ExpiredNone => Recover::Expired(now),
                };
                let orphans = self
                    .b
                    .recover_limited(scope_arg, "model: node gone", &LostLimits::all(MAX_LOST))
                    .await
                    .map_err(|e| TestCaseError::fail(format!("recover: {e}")))?;
                let mut got: BTreeMap<usize, bool> = BTreeMap::new();
                for o in &orphans {
                    if let Some(i) = self.by_id(o.task) {
                        got.insert(i, o.failed);
                    }
                }
                let mut want: BTreeMap<usize, bool> = BTreeMap::new();
                if scope != Scope::ExpiredNone {
                    for (i, t) in self.tasks.iter_mut().enumerate() {
                        if t.held.is_none() {
                            continue;
                        }
                        let started = t.state == TaskState::Running;
                        if started {
                            t.history += 1;
                            t.lost += 1;
                            t.attempts -= 1;
                        }
                        let failed = started && !t.cancel_requested && t.lost > MAX_LOST;
                        want.insert(i, failed);
                        t.state = if failed {
                            t.last_error = None; // its own words (lost_too_often)
                            TaskState::Failed
                        } else if t.cancel_requested {
                            t.last_error = Some("cancelled by an operator");
                            TaskState::Cancelled
                        } else {
                            TaskState::Queued
                        };
                        t.release();
                    }
                }
                check!(
                    got == want,
                    "recover({scope:?}): want orphans (task, failed) {want:?}, got {got:?}"
                );
            }
            Op::Expire => {
                let out = self
                    .b
                    .expire()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("expire: {e}")))?;
                let got: BTreeSet<usize> =
                    out.iter().filter_map(|(id, _)| self.by_id(*id)).collect();
                let mut want = BTreeSet::new();
                for (i, t) in self.tasks.iter_mut().enumerate() {
                    if t.expired && t.waiting() {
                        t.state = TaskState::Cancelled;
                        t.due = false;
                        t.maybe_promoted = false;
                        t.last_error = Some(taskd::model::EXPIRED);
                        want.insert(i);
                    }
                }
                check!(got == want, "expire: want {want:?}, got {got:?}");
            }
        }
        Ok(())
    }

    /// Every task as the store has it against the model; the queues' counts against what
    /// the tasks say.
    async fn check_all(&mut self) -> Result<(), TestCaseError> {
        let mut tally: [BTreeMap<TaskState, u64>; 2] = Default::default();
        for (i, t) in self.tasks.iter_mut().enumerate() {
            let d = self
                .b
                .get(t.id)
                .await
                .map_err(|e| TestCaseError::fail(format!("get #{i}: {e}")))?
                .ok_or_else(|| TestCaseError::fail(format!("task #{i} is gone")))?;
            let r = &d.task;
            let promoted = t.maybe_promoted && r.state == TaskState::Queued;
            check!(
                r.state == t.state || promoted,
                "task #{i}: state {}, want {} ({t:?})",
                r.state,
                t.state
            );
            if promoted {
                // Promoted by a claim: it waits in `queued` now.
                t.state = TaskState::Queued;
                t.due = false;
                t.maybe_promoted = false;
            }
            check!(
                r.attempts == t.attempts,
                "task #{i}: attempts {}, want {} ({t:?})",
                r.attempts,
                t.attempts
            );
            check!(
                r.node.is_some() == t.held.is_some(),
                "task #{i}: held by {:?}, want held: {} ({t:?})",
                r.node,
                t.held.is_some()
            );
            check!(
                r.cancel_requested == t.cancel_requested,
                "task #{i}: cancel_requested {}, want {} ({t:?})",
                r.cancel_requested,
                t.cancel_requested
            );
            check!(
                d.history.len() == t.history,
                "task #{i}: {} attempt records, want {} ({t:?})",
                d.history.len(),
                t.history
            );
            let lost = d
                .history
                .iter()
                .filter(|a| a.reason == Some(AttemptReason::Lost))
                .count() as u32;
            check!(
                lost == t.lost && d.lost == t.lost,
                "task #{i}: {lost} lost runs in its history, `lost` {}, want {}",
                d.lost,
                t.lost
            );
            if let Some(e) = t.last_error {
                check!(
                    r.last_error.as_deref() == Some(e),
                    "task #{i}: last_error {:?}, want {e:?}",
                    r.last_error
                );
            }
            *tally[t.queue].entry(r.state).or_default() += 1;
        }
        let counts = self
            .b
            .counts()
            .await
            .map_err(|e| TestCaseError::fail(format!("counts: {e}")))?;
        for (q, name) in self.queues.iter().enumerate() {
            let got: BTreeMap<TaskState, u64> = counts
                .iter()
                .find(|c| c.queue.as_ref() == Some(name))
                .map(|c| {
                    c.counts
                        .iter()
                        .filter(|(_, n)| **n > 0)
                        .map(|(s, n)| (*s, *n))
                        .collect()
                })
                .unwrap_or_default();
            check!(
                got == tally[q],
                "counts of queue {q}: {got:?}, but its tasks are {:?}",
                tally[q]
            );
        }
        Ok(())
    }
}

/// Sequences run so far (in this process): each gets queues of its own.
static SEQUENCE: AtomicUsize = AtomicUsize::new(0);

async fn run_sequence(b: B, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let mut m = Machine {
        b,
        queues: [qn(&format!("model{n}.a")), qn(&format!("model{n}.b"))],
        tasks: Vec::new(),
        leases: Vec::new(),
        paused: [false; 2],
    };
    for (step, op) in ops.iter().enumerate() {
        let checked = match m.step(op).await {
            Ok(()) => m.check_all().await,
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            return Err(TestCaseError::fail(format!("step {step} ({op:?}): {e}")));
        }
    }
    Ok(())
}

/// How many sequences: `TASKD_MODEL_CASES`, else [`DEFAULT_CASES`].
pub fn cases() -> u32 {
    match std::env::var("TASKD_MODEL_CASES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("TASKD_MODEL_CASES={v:?}: want a number of sequences")),
        Err(_) => DEFAULT_CASES,
    }
}

/// Runs the sequences against `b` (on a thread that may block: proptest is synchronous).
pub fn run(b: B, rt: tokio::runtime::Handle) {
    let cases = cases();
    let started = Instant::now();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        // A failing sequence shrinks against the live store: bound the time it may take.
        max_shrink_iters: 2_000,
        ..Config::default()
    });
    let strategy = proptest::collection::vec(op(), 1..=MAX_OPS);
    let result = runner.run(&strategy, |ops| rt.block_on(run_sequence(b.clone(), ops)));
    match result {
        Ok(()) => eprintln!(
            "model: {cases} sequences of up to {MAX_OPS} operations matched the model in {:.1?}",
            started.elapsed()
        ),
        Err(TestError::Fail(why, ops)) => {
            panic!("the broker differs from the model: {why}\nshortest sequence found:\n{ops:#?}")
        }
        Err(e) => panic!("model run: {e}"),
    }
}
