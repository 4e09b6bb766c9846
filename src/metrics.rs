//! The daemon's Prometheus metrics: a registry of its own (no global state, so test daemons
//! in one process never share counters), fed by the API (enqueues, broker errors) and the
//! supervisor (starts, finishes, attempt durations), and rendered by the API at `/metrics`.
//!
//! It sits below both of them: it knows queue names and the broker's counts, never the
//! supervisor or the API. Queue depth and running counts are read from the broker at scrape
//! time (the broker is the system of record; counting in memory would drift). Process
//! metrics come from /proc/self.

use std::fmt::Write as _;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::broker::{QueueCounts, StatRow};
use crate::model::{QueueName, TaskState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    queue: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScheduleLabels {
    schedule: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    queue: String,
    state: String,
}

/// How an attempt ended, as the `outcome` label of `taskd_tasks_finished_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishOutcome {
    Succeeded,
    /// Failed, will run again after a backoff.
    Retry,
    Failed,
    Cancelled,
    /// Put back without charging (shutdown, lost).
    Requeued,
}

impl FinishOutcome {
    fn as_str(self) -> &'static str {
        match self {
            FinishOutcome::Succeeded => "succeeded",
            FinishOutcome::Retry => "retry",
            FinishOutcome::Failed => "failed",
            FinishOutcome::Cancelled => "cancelled",
            FinishOutcome::Requeued => "requeued",
        }
    }
}

fn attempt_histogram() -> Histogram {
    // 5 ms .. ~45 min.
    Histogram::new(exponential_buckets(0.005, 2.0, 20))
}

/// The registry and its metrics. Cheap to share (`Arc<Metrics>`); every update is atomic.
pub struct Metrics {
    registry: Registry,
    enqueued: Family<QueueLabel, Counter>,
    started: Family<QueueLabel, Counter>,
    finished: Family<OutcomeLabels, Counter>,
    attempt_seconds: Family<QueueLabel, Histogram, fn() -> Histogram>,
    depth: Family<StateLabels, Gauge>,
    running: Family<QueueLabel, Gauge>,
    broker_errors: Counter,
    schedule_slots: Family<ScheduleLabels, Counter>,
    expired: Family<QueueLabel, Counter>,
    oom: Family<QueueLabel, Counter>,
    pruned: Family<StateLabels, Counter>,
    celery_ingested: Family<QueueLabel, Counter>,
    celery_refused: Family<ReasonLabel, Counter>,
    store_bytes: Gauge,
    /// Finished attempts by (minute, queue) not yet written to the broker's counters (the
    /// dashboard's charts): [`Metrics::take_stats`].
    pending: std::sync::Mutex<std::collections::BTreeMap<(i64, QueueName), StatRow>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let enqueued = Family::<QueueLabel, Counter>::default();
        let started = Family::<QueueLabel, Counter>::default();
        let finished = Family::<OutcomeLabels, Counter>::default();
        let attempt_seconds: Family<QueueLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(attempt_histogram);
        let depth = Family::<StateLabels, Gauge>::default();
        let running = Family::<QueueLabel, Gauge>::default();
        let broker_errors = Counter::default();
        let schedule_slots = Family::<ScheduleLabels, Counter>::default();
        let expired = Family::<QueueLabel, Counter>::default();
        let oom = Family::<QueueLabel, Counter>::default();
        registry.register(
            "taskd_tasks_oom_killed",
            "Attempts that ended because the kernel's OOM killer ended a process of theirs at the queue's memory_max (reason `oom`)",
            oom.clone(),
        );
        registry.register(
            "taskd_tasks_expired",
            "Tasks this daemon cancelled because they had not started by their expiry (`expires`)",
            expired.clone(),
        );
        let pruned = Family::<StateLabels, Counter>::default();
        let store_bytes = Gauge::default();
        registry.register(
            "taskd_tasks_pruned",
            "Finished tasks this daemon deleted because their keep_succeeded, keep_failed or keep_cancelled ran out, by queue and state",
            pruned.clone(),
        );
        registry.register(
            "taskd_store_bytes",
            "The store's size (read at scrape time): SQLite, the database file with its WAL and shared-memory files; Redis, the server's used_memory; PostgreSQL, the schema's tables with their indexes and TOAST",
            store_bytes.clone(),
        );
        registry.register(
            "taskd_tasks_enqueued",
            "Tasks enqueued through this daemon's API",
            enqueued.clone(),
        );
        registry.register(
            "taskd_tasks_started",
            "Attempts started by this daemon",
            started.clone(),
        );
        registry.register(
            "taskd_tasks_finished",
            "Attempts finished by this daemon, by outcome",
            finished.clone(),
        );
        registry.register(
            "taskd_attempt_duration_seconds",
            "How long attempts ran",
            attempt_seconds.clone(),
        );
        registry.register(
            "taskd_queue_depth",
            "Tasks in the broker by queue and state (read at scrape time)",
            depth.clone(),
        );
        registry.register(
            "taskd_running",
            "Tasks running by queue (read from the broker at scrape time)",
            running.clone(),
        );
        registry.register(
            "taskd_broker_errors",
            "Broker calls of the API and the scraper that failed",
            broker_errors.clone(),
        );
        let celery_ingested = Family::<QueueLabel, Counter>::default();
        let celery_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "taskd_celery_ingested",
            "Celery messages the bridge made taskd tasks of, by taskd queue",
            celery_ingested.clone(),
        );
        registry.register(
            "taskd_celery_refused",
            "Celery messages the bridge refused (their task failed at once), by reason: serializer, compression, workflow, unmapped, malformed, invalid",
            celery_refused.clone(),
        );
        registry.register(
            "taskd_schedule_slots",
            "Slots of each schedule this daemon handled, by outcome: fired, caught_up (a missed slot run late) or skipped",
            schedule_slots.clone(),
        );
        Metrics {
            celery_ingested,
            celery_refused,
            schedule_slots,
            expired,
            oom,
            pruned,
            store_bytes,
            registry,
            enqueued,
            started,
            finished,
            attempt_seconds,
            depth,
            running,
            broker_errors,
            pending: Default::default(),
        }
    }

    pub fn enqueued(&self, queue: &QueueName, count: u64) {
        self.enqueued
            .get_or_create(&QueueLabel {
                queue: queue.to_string(),
            })
            .inc_by(count);
    }

    /// Tasks cancelled by expiry (`Broker::expire`).
    pub fn expired(&self, queue: &QueueName, count: u64) {
        self.expired
            .get_or_create(&QueueLabel {
                queue: queue.to_string(),
            })
            .inc_by(count);
    }

    pub fn started(&self, queue: &QueueName) {
        self.started
            .get_or_create(&QueueLabel {
                queue: queue.to_string(),
            })
            .inc();
    }

    /// An attempt ended with reason `oom`.
    pub fn oom_killed(&self, queue: &QueueName) {
        self.oom
            .get_or_create(&QueueLabel {
                queue: queue.to_string(),
            })
            .inc();
    }

    /// An attempt ended: `ran` is how long its process ran (if one started), `waited` how
    /// long the task waited from due to start.
    pub fn finished(
        &self,
        queue: &QueueName,
        outcome: FinishOutcome,
        ran: Option<Duration>,
        waited: Option<Duration>,
    ) {
        self.count_for_stats(queue, outcome, ran, waited);
        self.finished
            .get_or_create(&OutcomeLabels {
                queue: queue.to_string(),
                outcome: outcome.as_str().to_string(),
            })
            .inc();
        if let Some(d) = ran {
            self.attempt_seconds
                .get_or_create(&QueueLabel {
                    queue: queue.to_string(),
                })
                .observe(d.as_secs_f64());
        }
    }

    /// `count` Celery messages ingested as tasks of `queue` (as [`Metrics::enqueued`] counts).
    pub fn celery_ingested(&self, queue: &QueueName, count: u64) {
        self.celery_ingested
            .get_or_create(&QueueLabel {
                queue: queue.to_string(),
            })
            .inc_by(count);
    }

    /// A Celery message refused, for `reason` (`serializer`, `compression`, `workflow`,
    /// `unmapped`, `malformed`, `invalid`).
    pub fn celery_refused(&self, reason: &str) {
        self.celery_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// `n` slots of `schedule` handled with `outcome` (`fired`, `caught_up`, `skipped`).
    pub fn schedule_slots(&self, schedule: &str, outcome: &str, count: u64) {
        self.schedule_slots
            .get_or_create(&ScheduleLabels {
                schedule: schedule.to_string(),
                outcome: outcome.to_string(),
            })
            .inc_by(count);
    }

    fn count_for_stats(
        &self,
        queue: &QueueName,
        outcome: FinishOutcome,
        ran: Option<Duration>,
        waited: Option<Duration>,
    ) {
        if outcome == FinishOutcome::Requeued {
            return; // not a finished attempt: it runs again, uncharged
        }
        let minute = crate::model::now_ms().div_euclid(60_000);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let r = pending
            .entry((minute, queue.clone()))
            .or_insert_with(|| StatRow::new(queue.clone(), minute));
        match outcome {
            FinishOutcome::Succeeded => r.succeeded += 1,
            FinishOutcome::Retry => r.retried += 1,
            FinishOutcome::Failed => r.failed += 1,
            FinishOutcome::Cancelled => r.cancelled += 1,
            FinishOutcome::Requeued => {}
        }
        if let Some(d) = ran {
            let ms = d.as_millis().min(u64::MAX as u128) as u64;
            r.runs += 1;
            r.run_ms_sum += ms;
            r.run_ms_max = r.run_ms_max.max(ms);
            r.wait_ms_sum += waited.map_or(0, |w| w.as_millis().min(u64::MAX as u128) as u64);
        }
    }

    /// The attempt counters gathered since the last call, to add to the broker's
    /// ([`crate::broker::Broker::add_stats`]); [`Metrics::untake_stats`] puts them back if
    /// the broker refused them.
    pub fn take_stats(&self) -> Vec<StatRow> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
            .into_values()
            .collect()
    }

    /// Gives back counters [`Metrics::take_stats`] took, to be written with the next ones.
    pub fn untake_stats(&self, rows: Vec<StatRow>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for r in rows {
            pending
                .entry((r.minute, r.queue.clone()))
                .or_insert_with(|| StatRow::new(r.queue.clone(), r.minute))
                .add(&r);
        }
    }

    /// `count` tasks of `queue` in `state` deleted by retention.
    pub fn pruned(&self, queue: &QueueName, state: TaskState, count: u64) {
        self.pruned
            .get_or_create(&StateLabels {
                queue: queue.to_string(),
                state: state.to_string(),
            })
            .inc_by(count);
    }

    /// The store's size, read at scrape time.
    pub fn set_store_bytes(&self, bytes: u64) {
        self.store_bytes.set(bytes.min(i64::MAX as u64) as i64);
    }

    pub fn broker_error(&self) {
        self.broker_errors.inc();
    }

    /// Set the depth and running gauges from a fresh read of the broker's counts.
    pub fn set_counts(&self, counts: &[QueueCounts]) {
        self.depth.clear();
        self.running.clear();
        for c in counts {
            let queue = c.queue.as_ref().map(|q| q.to_string()).unwrap_or_default();
            for state in TaskState::ALL {
                let n = c.counts.get(&state).copied().unwrap_or(0);
                self.depth
                    .get_or_create(&StateLabels {
                        queue: queue.clone(),
                        state: state.to_string(),
                    })
                    .set(n as i64);
            }
            self.running
                .get_or_create(&QueueLabel {
                    queue: queue.clone(),
                })
                .set(c.counts.get(&TaskState::Running).copied().unwrap_or(0) as i64);
        }
    }

    /// The text exposition: the registry, then the process metrics.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        // The OpenMetrics text ends with `# EOF`; the process metrics go before it.
        if let Some(i) = out.rfind("# EOF") {
            out.truncate(i);
        }
        process_metrics(&mut out);
        out.push_str("# EOF\n");
        out
    }
}

/// Log lines the process could not write (its stderr's reader went away, a full disk). The
/// log belongs to the process, not to one daemon, so this one count is global.
static LOG_LINES_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Count a log line that could not be written.
pub fn log_line_dropped() {
    LOG_LINES_DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// How many log lines could not be written since the process started.
pub fn log_lines_dropped() -> u64 {
    LOG_LINES_DROPPED.load(std::sync::atomic::Ordering::Relaxed)
}

/// RSS, CPU time, open descriptors, threads and start time of this process, from /proc/self;
/// log lines dropped.
fn process_metrics(out: &mut String) {
    use nix::unistd::{sysconf, SysconfVar};
    let var = |v| sysconf(v).ok().flatten().unwrap_or(1).max(1) as f64;
    let (ticks, page) = (var(SysconfVar::CLK_TCK), var(SysconfVar::PAGE_SIZE));
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let fields: Vec<&str> = stat
        .rfind(')')
        .map(|i| stat[i + 1..].split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
    let mut metric = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            // OpenMetrics names a counter's sample `NAME_total`.
            let sample = if kind == "counter" { "_total" } else { "" };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{sample} {v}"
            );
        }
    };
    let cpu = match (field(14), field(15)) {
        (Some(u), Some(s)) => Some((u + s) / ticks),
        _ => None,
    };
    metric(
        "taskd_process_cpu_seconds",
        "counter",
        "User and system CPU time of the daemon",
        cpu,
    );
    metric(
        "taskd_process_resident_memory_bytes",
        "gauge",
        "Resident set size of the daemon",
        field(24).map(|p| p * page),
    );
    metric(
        "taskd_process_threads",
        "gauge",
        "Threads of the daemon",
        field(20),
    );
    let fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as f64);
    metric(
        "taskd_process_open_fds",
        "gauge",
        "Open file descriptors of the daemon",
        fds,
    );
    metric(
        "taskd_log_lines_dropped",
        "counter",
        "Log lines the daemon could not write (the reader of its stderr went away, a full disk)",
        Some(log_lines_dropped() as f64),
    );
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    metric(
        "taskd_process_start_time_seconds",
        "gauge",
        "When the daemon started, in seconds since the Unix epoch",
        match (boot, field(22)) {
            (Some(b), Some(s)) => Some(b + s / ticks),
            _ => None,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_process_metrics() {
        let m = Metrics::new();
        let q: QueueName = "mail".parse().expect("valid");
        m.enqueued(&q, 3);
        m.started(&q);
        m.finished(
            &q,
            FinishOutcome::Failed,
            Some(Duration::from_millis(20)),
            None,
        );
        let text = m.render();
        assert!(
            text.contains("taskd_tasks_enqueued_total{queue=\"mail\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("taskd_tasks_finished_total{queue=\"mail\",outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("taskd_attempt_duration_seconds_count{queue=\"mail\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("taskd_process_resident_memory_bytes "),
            "{text}"
        );
        assert!(text.contains("taskd_process_cpu_seconds_total "), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
