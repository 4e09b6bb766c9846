//! The daemon's schedules at run time: one loop that sleeps on one wall-clock timer until
//! the earliest next slot of every enabled, unpaused schedule, and at each wake-up asks
//! [`slots::plan`] what to do with the slots found due and applies it, step by step, through
//! [`Broker::schedule_step`] (rule 10 of the trait: each slot handled once, whoever asks).
//!
//! It keeps no state the broker does not also keep: each schedule's `through` (every slot up
//! to it is handled) is the broker's, as this node last heard it; a step another node took
//! first comes back `AlreadyHandled` with the newer `through`. What wakes the loop: the timer
//! ([`timer`]: a `timerfd` on `CLOCK_REALTIME`, which the kernel also wakes when the clock is
//! set), a reload ([`Scheduler::apply`]), a `schedules` wake-up from the broker (a pause or
//! resume), a refresh every [`REFRESH`] (the safety net for a lost wake-up), and a finished
//! step. docs/architecture.md ("Schedules") has the design.

mod timer;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::Doubling;
use crate::broker::{Broker, BrokerError, ScheduleKey, ScheduleStep, StepAnswer, Wakeups};
use crate::config::{Config, Overlap, ScheduleConfig, Schedules};
use crate::metrics::Metrics;
use crate::model::{now_ms, UnixMs};
use crate::slots::{self, Step};

/// How often the records are read again without a wake-up (a pause by a client whose
/// wake-up was lost, another node's spec).
const REFRESH: Duration = Duration::from_secs(30);

/// The most schedules handled at once. A handling is a few broker calls; on SQLite each
/// takes a blocking thread, so a thousand schedules due together (every one at start, or a
/// common minute) would start hundreds of threads whose memory stays with the process. The
/// rest wait their turn, a few milliseconds each.
const MAX_STEPS: usize = 16;

/// The schedules of one daemon. [`Scheduler::start`] spawns the loop.
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Schedules>,
    /// The schedules of the config last applied, to say what a reload changed.
    current: Mutex<Schedules>,
    stop: CancellationToken,
    done: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Scheduler {
    /// Start firing `config`'s schedules for `node`.
    pub fn start(
        broker: Arc<dyn Broker>,
        config: &Config,
        wakeups: Wakeups,
        metrics: Arc<Metrics>,
        node: String,
    ) -> Arc<Scheduler> {
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let run = Loop {
            broker,
            metrics,
            node,
            entries: BTreeMap::new(),
            steps: JoinSet::new(),
        };
        let first = config.schedules.clone();
        let handle = tokio::spawn(run.run(first, rx, wakeups, stop.clone()));
        Arc::new(Scheduler {
            tx,
            current: Mutex::new(config.schedules.clone()),
            stop,
            done: Mutex::new(Some(handle)),
        })
    }

    /// Take a reloaded config's schedules; one line per schedule added, removed or changed.
    pub fn apply(&self, config: &Config) -> Vec<String> {
        let mut current = self.current.lock().expect("not poisoned");
        let lines = diff(&current, &config.schedules);
        *current = config.schedules.clone();
        let _ = self.tx.send(config.schedules.clone());
        lines
    }

    /// Stop firing; returns once the steps under way are answered.
    pub async fn stop(&self) {
        self.stop.cancel();
        let handle = self.done.lock().expect("not poisoned").take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }
}

/// What a reload changes, one phrase per schedule (`taskd reload` prints them).
pub fn diff(old: &Schedules, new: &Schedules) -> Vec<String> {
    let mut out = Vec::new();
    for (name, n) in new {
        let Some(o) = old.get(name) else {
            out.push(format!(
                "schedule {name}: added ({} in {}, queue {})",
                n.spec(),
                n.calendar.zone.name(),
                n.queue
            ));
            continue;
        };
        let mut what = Vec::new();
        if o.calendar.spec != n.calendar.spec {
            what.push(format!("{} → {}", o.spec(), n.spec()));
        }
        if o.calendar.zone != n.calendar.zone {
            what.push(format!(
                "timezone {} → {}",
                o.calendar.zone.name(),
                n.calendar.zone.name()
            ));
        }
        if o.queue != n.queue {
            what.push(format!(
                "queue {} → {} (a new record there)",
                o.queue, n.queue
            ));
        }
        let restarts = !what.is_empty();
        if o.payload != n.payload || o.args != n.args || o.priority != n.priority {
            what.push("task changed".into());
        }
        if o.missed != n.missed || o.max_catch_up != n.max_catch_up {
            what.push(format!(
                "missed {} → {}",
                o.missed.as_str(),
                n.missed.as_str()
            ));
        }
        if o.overlap != n.overlap {
            what.push(format!(
                "overlap {} → {}",
                o.overlap.as_str(),
                n.overlap.as_str()
            ));
        }
        if o.enabled != n.enabled {
            what.push(if n.enabled { "enabled" } else { "disabled" }.to_string());
        }
        if what.is_empty() {
            continue;
        }
        let mut line = format!("schedule {name}: {}", what.join(", "));
        if restarts {
            line.push_str("; starts at the next slot of the new spec");
        }
        out.push(line);
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        out.push(format!(
            "schedule {name}: removed (its record stays in the broker)"
        ));
    }
    out
}

/// One schedule as the loop knows it.
struct Entry {
    cfg: Arc<ScheduleConfig>,
    key: ScheduleKey,
    /// Its calendar's fingerprint: the spec its record must be at.
    spec: String,
    /// Every slot up to here is handled, as the broker last said.
    through: UnixMs,
    paused: bool,
    /// The record is at another spec (another node's config): not fired here; the spec.
    foreign: Option<String>,
    /// Its record must be begun at `spec` (a new schedule, a changed spec, a fresh start).
    begin: bool,
    /// A step is under way.
    busy: bool,
    /// After a broker error: not before this time.
    retry_at: Option<UnixMs>,
    retry: Doubling,
    /// The next slot after `next_for` (computed once per `through`: a cron search costs
    /// microseconds, and the loop asks every schedule at every wake-up).
    next: Option<UnixMs>,
    next_for: Option<UnixMs>,
}

impl Entry {
    fn new(cfg: Arc<ScheduleConfig>) -> Entry {
        Entry {
            key: ScheduleKey {
                name: cfg.name.clone(),
                queue: cfg.queue.clone(),
            },
            spec: cfg.calendar.fingerprint(),
            cfg,
            through: 0,
            paused: false,
            foreign: None,
            begin: true,
            busy: false,
            retry_at: None,
            retry: Doubling::new(Duration::from_secs(1), Duration::from_secs(30)),
            next: None,
            next_for: None,
        }
    }

    fn active(&self) -> bool {
        self.cfg.enabled && !self.paused && self.foreign.is_none() && !self.busy
    }

    /// When it next needs the loop: its next slot (or a retry), if it fires at all.
    fn due_at(&mut self) -> Option<UnixMs> {
        if !self.active() {
            return None;
        }
        if self.begin {
            return Some(0);
        }
        if self.next_for != Some(self.through) {
            self.next = self.cfg.calendar.next_after(self.through);
            self.next_for = Some(self.through);
        }
        let next = self.next?;
        Some(match self.retry_at {
            Some(r) => next.max(r),
            None => next,
        })
    }
}

/// What a handling of one schedule ended with.
struct Handled {
    name: String,
    /// The spec it handled (a reload may have changed the schedule's meanwhile).
    spec: String,
    through: UnixMs,
    begun: bool,
    /// The record turned out to be at this other spec.
    foreign: Option<String>,
    error: Option<String>,
}

struct Loop {
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    node: String,
    entries: BTreeMap<String, Entry>,
    steps: JoinSet<Handled>,
}

impl Loop {
    async fn run(
        mut self,
        first: Schedules,
        mut rx: mpsc::UnboundedReceiver<Schedules>,
        wakeups: Wakeups,
        stop: CancellationToken,
    ) {
        let timer = timer::WallTimer::new();
        self.take(first);
        self.refresh().await;
        let mut refresh = tokio::time::interval(REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.launch_due();
            // At the cap, what is due waits for a handling to end (not for the timer, which
            // would fire at once).
            let next = if self.steps.len() >= MAX_STEPS {
                None
            } else {
                self.entries.values_mut().filter_map(|e| e.due_at()).min()
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                woke = timer.sleep_until(next) => {
                    if woke == timer::Woke::ClockSet {
                        tracing::info!("the wall clock was set: schedules look at their slots again");
                    }
                }
                Some(schedules) = rx.recv() => {
                    self.take(schedules);
                    self.refresh().await;
                }
                _ = wakeups.schedules.notified() => self.refresh().await,
                _ = refresh.tick() => self.refresh().await,
                Some(done) = self.steps.join_next(), if !self.steps.is_empty() => {
                    if let Ok(h) = done {
                        self.handled(h);
                    }
                }
            }
        }
        // Steps under way finish (each is one atomic change in the broker).
        while self.steps.join_next().await.is_some() {}
    }

    /// Take the schedules of a (new) config: keep what is unchanged, begin what is new or
    /// has a new spec.
    fn take(&mut self, schedules: Schedules) {
        let mut next = BTreeMap::new();
        for (name, cfg) in schedules {
            let entry = match self.entries.remove(&name) {
                Some(mut e) => {
                    let fresh = Entry::new(cfg.clone());
                    if fresh.spec != e.spec || fresh.key != e.key {
                        // A new spec starts at its next slot; the record is begun anew.
                        let mut f = fresh;
                        f.busy = e.busy;
                        f
                    } else {
                        if !e.cfg.enabled && cfg.enabled {
                            e.retry_at = None;
                        }
                        e.cfg = cfg;
                        e
                    }
                }
                None => Entry::new(cfg),
            };
            next.insert(name, entry);
        }
        self.entries = next;
    }

    /// Read every record again: pauses, and a spec another node began.
    async fn refresh(&mut self) {
        let keys: Vec<ScheduleKey> = self.entries.values().map(|e| e.key.clone()).collect();
        if keys.is_empty() {
            return;
        }
        let states = match self.broker.schedule_states(&keys).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "failed to read the schedules' records");
                return;
            }
        };
        for st in states {
            let Some(e) = self.entries.get_mut(&st.key.name) else {
                continue;
            };
            if e.key != st.key {
                continue;
            }
            if st.paused != e.paused {
                tracing::info!(schedule = %e.cfg.name, "schedule {}", if st.paused { "paused" } else { "resumed" });
            }
            e.paused = st.paused;
            if e.begin || e.busy {
                continue;
            }
            if st.spec == e.spec {
                e.through = e.through.max(st.through);
                if e.foreign.take().is_some() {
                    tracing::info!(schedule = %e.cfg.name, "the schedule's record is at this node's spec again; firing it");
                }
            } else if e.foreign.as_deref() != Some(st.spec.as_str()) {
                tracing::warn!(
                    schedule = %e.cfg.name,
                    recorded = %st.spec,
                    here = %e.spec,
                    "the schedule's record in the broker is at another spec (another node's config): not firing it here until this node's config matches, or a reload or restart here makes this spec the recorded one"
                );
                e.foreign = Some(st.spec);
            }
        }
    }

    /// Start handling the schedules that are due, earliest first, at most [`MAX_STEPS`] at
    /// once.
    fn launch_due(&mut self) {
        let room = MAX_STEPS.saturating_sub(self.steps.len());
        if room == 0 {
            return;
        }
        let now = now_ms();
        let mut due: Vec<(UnixMs, String)> = self
            .entries
            .iter_mut()
            .filter_map(|(n, e)| e.due_at().filter(|t| *t <= now).map(|t| (t, n.clone())))
            .collect();
        due.sort();
        let due = due.into_iter().take(room).map(|(_, n)| n);
        for name in due {
            let Some(e) = self.entries.get_mut(&name) else {
                continue;
            };
            e.busy = true;
            let job = Job {
                broker: self.broker.clone(),
                metrics: self.metrics.clone(),
                node: self.node.clone(),
                cfg: e.cfg.clone(),
                key: e.key.clone(),
                spec: e.spec.clone(),
                through: e.through,
                begin: e.begin,
            };
            self.steps.spawn(job.run());
        }
    }

    /// A handling ended: take what the broker said.
    fn handled(&mut self, handled: Handled) {
        let Some(e) = self.entries.get_mut(&handled.name) else {
            return;
        };
        e.busy = false;
        if handled.spec != e.spec {
            // Handled under the spec before a reload: the new one is begun on its own.
            return;
        }
        if handled.begun {
            e.begin = false;
        }
        e.through = e.through.max(handled.through);
        if let Some(spec) = handled.foreign {
            if e.foreign.as_deref() != Some(spec.as_str()) {
                tracing::warn!(
                    schedule = %e.cfg.name,
                    recorded = %spec,
                    here = %e.spec,
                    "the schedule's record in the broker is at another spec (another node's config): not firing it here until this node's config matches, or a reload or restart here makes this spec the recorded one"
                );
            }
            e.foreign = Some(spec);
        }
        match handled.error {
            Some(why) => {
                let delay = e.retry.next_delay();
                tracing::warn!(schedule = %e.cfg.name, error = %why, retry_in = %humantime::format_duration(delay), "failed to record a schedule's slot; its slots wait (and count as missed once late)");
                e.retry_at = Some(now_ms() + delay.as_millis() as i64);
            }
            None => {
                e.retry.reset();
                e.retry_at = None;
            }
        }
    }
}

/// The handling of one schedule: begin its record if it must, then plan the slots due and
/// apply the plan step by step.
struct Job {
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    node: String,
    cfg: Arc<ScheduleConfig>,
    key: ScheduleKey,
    spec: String,
    through: UnixMs,
    begin: bool,
}

impl Job {
    async fn run(self) -> Handled {
        let mut out = Handled {
            name: self.cfg.name.clone(),
            spec: self.spec.clone(),
            through: self.through,
            begun: false,
            foreign: None,
            error: None,
        };
        if let Err(e) = self.handle(&mut out).await {
            out.error = Some(e.to_string());
        }
        out
    }

    async fn handle(&self, out: &mut Handled) -> Result<(), BrokerError> {
        if self.begin {
            let now = now_ms();
            let state = self
                .broker
                .schedule_states(std::slice::from_ref(&self.key))
                .await?
                .remove(0);
            let step = ScheduleStep::Begin {
                spec: self.spec.clone(),
                through: now,
            };
            if let StepAnswer::Begun(true) = self.broker.schedule_step(&self.key, step).await? {
                if state.spec.is_empty() {
                    tracing::info!(schedule = %self.cfg.name, spec = %self.spec, "schedule begins: it fires from its next slot");
                } else {
                    tracing::info!(schedule = %self.cfg.name, from = %state.spec, to = %self.spec, "schedule's spec changed: it fires from the next slot of the new spec; the old spec's missed slots do not run");
                }
            }
            out.begun = true;
            let state = self
                .broker
                .schedule_states(std::slice::from_ref(&self.key))
                .await?
                .remove(0);
            if state.spec != self.spec {
                out.foreign = Some(state.spec);
                return Ok(());
            }
            out.through = state.through;
        }
        let now = now_ms();
        let plan = slots::plan(
            &self.cfg.calendar,
            out.through,
            now,
            self.cfg.missed,
            self.cfg.max_catch_up,
        );
        // `overlap` looks at the run before the plan, not at the catch-up runs it enqueues
        // itself: those of `missed = "all"` queue behind one another.
        let mut catching_up = false;
        for step in plan {
            if step.last() <= out.through {
                continue;
            }
            let last = step.last();
            let mut broker_step = self.step(&step);
            if let ScheduleStep::Fire {
                caught_up: true,
                skip_if_running,
                ..
            } = &mut broker_step
            {
                *skip_if_running &= !catching_up;
                catching_up = true;
            }
            let answer = self.broker.schedule_step(&self.key, broker_step).await?;
            match answer {
                StepAnswer::AlreadyHandled { through, spec } => {
                    if spec != self.spec {
                        out.foreign = Some(spec);
                        return Ok(());
                    }
                    out.through = out.through.max(through);
                    continue;
                }
                StepAnswer::Fired { task, existing } => {
                    let (outcome, late) = match step {
                        Step::Fire {
                            caught_up: true, ..
                        } => ("caught_up", true),
                        _ => ("fired", false),
                    };
                    self.metrics.schedule_slots(&self.cfg.name, outcome, 1);
                    let slot = slots::show_utc(last);
                    if late {
                        tracing::info!(schedule = %self.cfg.name, %slot, %task, existing, "missed slot caught up (`missed`)");
                    } else {
                        tracing::debug!(schedule = %self.cfg.name, %slot, %task, existing, late_ms = now_ms() - last, "slot fired");
                    }
                }
                StepAnswer::Skipped { running } => {
                    let n = match &step {
                        Step::Skip { count, .. } => *count,
                        Step::Fire { .. } => 1,
                    };
                    self.metrics.schedule_slots(&self.cfg.name, "skipped", n);
                    match (running, &step) {
                        (Some(prev), _) => {
                            tracing::info!(schedule = %self.cfg.name, slot = %slots::show_utc(last), previous = %prev, "slot skipped: the previous run is still waiting or running (`overlap = \"skip\"`)")
                        }
                        (
                            None,
                            Step::Skip {
                                first, count, why, ..
                            },
                        ) => {
                            tracing::info!(schedule = %self.cfg.name, first = %slots::show_utc(*first), last = %slots::show_utc(last), count, "{why}")
                        }
                        (None, Step::Fire { .. }) => {}
                    }
                }
                StepAnswer::Begun(_) | StepAnswer::Manual { .. } => {}
            }
            out.through = out.through.max(last);
        }
        Ok(())
    }

    /// The broker step of a plan step.
    fn step(&self, step: &Step) -> ScheduleStep {
        match step {
            Step::Fire { slot, caught_up } => {
                let mut task = self.cfg.task();
                task.unique_key = Some(slots::unique_key(&self.cfg.name, *slot));
                ScheduleStep::Fire {
                    spec: self.spec.clone(),
                    slot: *slot,
                    task,
                    caught_up: *caught_up,
                    skip_if_running: self.cfg.overlap == Overlap::Skip,
                    node: self.node.clone(),
                }
            }
            Step::Skip {
                first,
                last,
                count,
                exact,
                why,
            } => ScheduleStep::Skip {
                spec: self.spec.clone(),
                first: *first,
                last: *last,
                count: *count,
                reason: if *exact {
                    why.clone()
                } else {
                    format!("{why} (at least {count} slots)")
                },
                node: self.node.clone(),
            },
        }
    }
}
