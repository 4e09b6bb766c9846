//! A validated `[schedules.NAME]`: when it fires (a `slots::Calendar`), the task it enqueues
//! (queue, payload, args, priority) and its policies. The keys are `keys::SCHEDULE`, read by
//! `validate/schedule.rs`.

use crate::model::{NewTask, QueueName};
use crate::slots::{Calendar, Missed};

/// What a slot does while the previous slot's task still waits or runs (`overlap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Record the slot as skipped.
    #[default]
    Skip,
    /// Enqueue it anyway.
    Allow,
}

impl Overlap {
    pub(crate) const NAMES: [&'static str; 2] = ["skip", "allow"];

    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Allow => "allow",
        }
    }

    pub fn parse(text: &str) -> Option<Overlap> {
        match text {
            "skip" => Some(Overlap::Skip),
            "allow" => Some(Overlap::Allow),
            _ => None,
        }
    }
}

/// One schedule, with its defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleConfig {
    pub name: String,
    pub queue: QueueName,
    /// Its spec in its zone.
    pub calendar: Calendar,
    /// `timezone` was set; otherwise the zone is the machine's.
    pub zone_set: bool,
    /// The payload's compact JSON text (an object; `{}` by default); it fills the queue's
    /// placeholders (checked when the config is read).
    pub payload: String,
    pub args: Vec<String>,
    pub priority: i32,
    pub missed: Missed,
    /// With `missed = "all"`, the most missed slots run (the newest).
    pub max_catch_up: u32,
    pub overlap: Overlap,
    pub enabled: bool,
    /// The key values its payload gives the queue's `concurrency_key` and `rate_key`
    /// (filled when the config is read).
    pub flow_key: Option<String>,
    pub rate_key: Option<String>,
    /// The queue's `expires`: a slot's task not started that long after it was enqueued is
    /// cancelled (`expired`), recorded in the task, not the slot.
    pub expires: Option<std::time::Duration>,
}

impl ScheduleConfig {
    /// A new task for this schedule (the caller sets the unique key of a slot's task).
    pub fn task(&self) -> NewTask {
        let mut t = NewTask::new(self.queue.clone(), self.payload.clone());
        t.args = self.args.clone();
        t.priority = self.priority;
        t.flow_key = self.flow_key.clone();
        t.rate_key = self.rate_key.clone();
        t.expires_at = self
            .expires
            .map(|d| crate::model::now_ms() + d.as_millis() as i64);
        t
    }

    /// The spec as the config writes it, with the zone when it matters: `cron "0 3 * * *"`.
    pub(crate) fn spec(&self) -> String {
        self.calendar.spec.show()
    }
}

/// The default of `max_catch_up`.
pub(crate) const MAX_CATCH_UP: u32 = 100;
/// The largest `max_catch_up`.
pub(crate) const MAX_CATCH_UP_LIMIT: i64 = 10_000;
