//! What the broker keeps about `[schedules.NAME]`: each schedule's record (the spec its
//! slots belong to, every slot handled up to `through`, counts, the pause flag, recent slot
//! records) and the one atomic step that changes it ([`super::Broker::schedule_step`], rule
//! 10 of the trait). The slot arithmetic is `crate::slots`; the timer is `crate::scheduler`.

use serde::{Deserialize, Serialize};

use crate::model::{NewTask, QueueName, TaskId, UnixMs};

/// How many slot records a schedule keeps, newest first (older ones are dropped in the same
/// step that adds one).
pub const SLOT_HISTORY: usize = 500;

/// Which record: a schedule's name and its queue (a schedule moved to another queue starts a
/// new record, as its tasks live with that queue).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ScheduleKey {
    pub name: String,
    pub queue: QueueName,
}

/// How a slot was handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotOutcome {
    /// Its task was enqueued on time.
    Fired,
    /// It was missed, and its task was enqueued late because of `missed`.
    CaughtUp,
    /// No task: the previous one was still waiting or running (`overlap = "skip"`), or it
    /// was missed and `missed` runs no task for it.
    Skipped,
}

impl SlotOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotOutcome::Fired => "fired",
            SlotOutcome::CaughtUp => "caught_up",
            SlotOutcome::Skipped => "skipped",
        }
    }

    pub fn parse(text: &str) -> Option<SlotOutcome> {
        match text {
            "fired" => Some(SlotOutcome::Fired),
            "caught_up" => Some(SlotOutcome::CaughtUp),
            "skipped" => Some(SlotOutcome::Skipped),
            _ => None,
        }
    }
}

/// One record of a schedule's history: a slot, or a run of skipped missed slots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// The slot (the newest of a run), ms since the epoch.
    pub slot: UnixMs,
    /// The oldest slot of a run of skipped slots; `slot` otherwise.
    pub first: UnixMs,
    /// How many slots the record covers (1 unless a run of skipped slots).
    pub count: u64,
    pub outcome: SlotOutcome,
    /// The slot's task; for a slot skipped by `overlap`, the previous task still running.
    pub task: Option<TaskId>,
    /// Why it was skipped.
    pub reason: Option<String>,
    /// When it was recorded, and by which node.
    pub at: UnixMs,
    pub node: String,
}

/// A schedule's record as the broker keeps it; a schedule without one reads as the default
/// (empty `spec`, `through` 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleState {
    pub key: ScheduleKey,
    /// The fingerprint of the spec its slots belong to (`slots::Calendar::fingerprint`);
    /// empty before the first `Begin`.
    pub spec: String,
    /// Every slot up to this instant is handled (the newest handled slot, or when the
    /// schedule began); 0 before the first `Begin`.
    pub through: UnixMs,
    /// The task of the newest fired slot (what `overlap` looks at).
    pub last_task: Option<TaskId>,
    pub fired: u64,
    pub caught_up: u64,
    pub skipped: u64,
    pub paused: bool,
    /// The newest slot record.
    pub last: Option<SlotRecord>,
}

impl ScheduleState {
    pub(crate) fn empty(key: ScheduleKey) -> ScheduleState {
        ScheduleState {
            key,
            spec: String::new(),
            through: 0,
            last_task: None,
            fired: 0,
            caught_up: 0,
            skipped: 0,
            paused: false,
            last: None,
        }
    }
}

/// One change to a schedule's record (see [`super::Broker::schedule_step`]).
#[derive(Clone, Debug)]
pub enum ScheduleStep {
    /// Start the record at `spec`, unless it already is at `spec`: every slot up to
    /// `through` counts as handled, none of them fires.
    Begin { spec: String, through: UnixMs },
    /// Enqueue `task` for `slot` (the caller set its unique key) and record it, `caught_up`
    /// when it runs late for a missed slot. With `skip_if_running`, record the slot as
    /// skipped instead while the previous slot's task is still waiting or running.
    Fire {
        spec: String,
        slot: UnixMs,
        task: NewTask,
        caught_up: bool,
        skip_if_running: bool,
        node: String,
    },
    /// Record `count` slots from `first` to `last` as skipped, saying why.
    Skip {
        spec: String,
        first: UnixMs,
        last: UnixMs,
        count: u64,
        reason: String,
        node: String,
    },
    /// Enqueue `task` for the schedule now, with no slot; the record is left as it is.
    Manual { task: NewTask },
}

/// What a [`ScheduleStep`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepAnswer {
    /// `Begin`: the record starts at the spec (`false`: it already did; nothing changed).
    Begun(bool),
    /// The slot's task (`existing`: a waiting or running task already held its unique key).
    Fired { task: TaskId, existing: bool },
    /// Recorded as skipped; for `overlap`, the previous task still waiting or running.
    Skipped { running: Option<TaskId> },
    /// Nothing written: the slot is not after `through`, or the record is at another spec.
    AlreadyHandled { through: UnixMs, spec: String },
    /// `Manual`: the task.
    Manual { task: TaskId },
}

/// The reason of a slot skipped because its previous task still waits or runs.
pub(crate) fn overlap_reason(previous: TaskId) -> String {
    format!(
        "overlap: the previous run {previous} is still waiting or running (`overlap = \"skip\"`)"
    )
}

/// What a [`ScheduleStep`] asks of a backend, decided from the record alone (rule 10's
/// checks, the same on every backend); the backend does the I/O around it, inside its one
/// atomic step.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Answer this, with nothing written (`Begin` at the record's spec, or a slot already
    /// handled or of another spec).
    Answer(StepAnswer),
    /// `Begin` at a new spec: the record was updated; write it and answer `Begun(true)`.
    Begin,
    /// `Manual`: insert the task with no slot; the record stays as it is.
    Manual(NewTask),
    /// `Fire`: when `overlap` names a task that still waits or runs, record the slot with
    /// [`ScheduleState::overlapped`]; otherwise insert `task` and record it with
    /// [`ScheduleState::fired`].
    Fire {
        slot: UnixMs,
        task: NewTask,
        caught_up: bool,
        overlap: Option<TaskId>,
        node: String,
    },
    /// `Skip`: the record was updated; write it and add `record`.
    Record(SlotRecord, StepAnswer),
}

impl ScheduleState {
    /// Decide `step` against this record (updating it for `Begin` and `Skip`).
    pub(crate) fn plan(&mut self, step: ScheduleStep, now: UnixMs) -> Plan {
        let step = match step {
            ScheduleStep::Begin { spec, through } => {
                if self.spec == spec {
                    return Plan::Answer(StepAnswer::Begun(false));
                }
                self.spec = spec;
                self.through = self.through.max(through);
                self.last_task = None;
                return Plan::Begin;
            }
            ScheduleStep::Manual { task } => return Plan::Manual(task),
            fire_or_skip => fire_or_skip,
        };
        let (spec, slot) = match &step {
            ScheduleStep::Fire { spec, slot, .. } => (spec.as_str(), *slot),
            ScheduleStep::Skip { spec, last, .. } => (spec.as_str(), *last),
            ScheduleStep::Begin { .. } | ScheduleStep::Manual { .. } => {
                unreachable!("answered above")
            }
        };
        if self.spec != spec || slot <= self.through {
            return Plan::Answer(StepAnswer::AlreadyHandled {
                through: self.through,
                spec: self.spec.clone(),
            });
        }
        match step {
            ScheduleStep::Fire {
                slot,
                task,
                caught_up,
                skip_if_running,
                node,
                ..
            } => Plan::Fire {
                slot,
                task,
                caught_up,
                overlap: self.last_task.filter(|_| skip_if_running),
                node,
            },
            ScheduleStep::Skip {
                first,
                last,
                count,
                reason,
                node,
                ..
            } => {
                self.skipped += count;
                self.through = last;
                let record = SlotRecord {
                    slot: last,
                    first,
                    count,
                    outcome: SlotOutcome::Skipped,
                    task: None,
                    reason: Some(reason),
                    at: now,
                    node,
                };
                Plan::Record(record, StepAnswer::Skipped { running: None })
            }
            ScheduleStep::Begin { .. } | ScheduleStep::Manual { .. } => {
                unreachable!("answered above")
            }
        }
    }

    /// A `Fire` slot skipped because `previous` still waits or runs (`overlap = "skip"`).
    pub(crate) fn overlapped(
        &mut self,
        slot: UnixMs,
        previous: TaskId,
        node: String,
        now: UnixMs,
    ) -> (SlotRecord, StepAnswer) {
        self.skipped += 1;
        self.through = slot;
        let record = SlotRecord {
            slot,
            first: slot,
            count: 1,
            outcome: SlotOutcome::Skipped,
            task: Some(previous),
            reason: Some(overlap_reason(previous)),
            at: now,
            node,
        };
        let answer = StepAnswer::Skipped {
            running: Some(previous),
        };
        (record, answer)
    }

    /// A `Fire` slot whose task was inserted as `task` (`existing`: a waiting or running task
    /// already held its unique key).
    pub(crate) fn fired(
        &mut self,
        slot: UnixMs,
        task: TaskId,
        existing: bool,
        caught_up: bool,
        node: String,
        now: UnixMs,
    ) -> (SlotRecord, StepAnswer) {
        self.last_task = Some(task);
        self.through = slot;
        let outcome = if caught_up {
            self.caught_up += 1;
            SlotOutcome::CaughtUp
        } else {
            self.fired += 1;
            SlotOutcome::Fired
        };
        let record = SlotRecord {
            slot,
            first: slot,
            count: 1,
            outcome,
            task: Some(task),
            reason: None,
            at: now,
            node,
        };
        (record, StepAnswer::Fired { task, existing })
    }
}

/// The records of `keys` with the state of each one's newest slot task (for the views of
/// `taskd schedules` and the API).
pub(crate) async fn states_with_tasks(
    broker: &dyn super::Broker,
    keys: &[ScheduleKey],
) -> super::Result<Vec<(ScheduleState, Option<crate::model::TaskState>)>> {
    let states = broker.schedule_states(keys).await?;
    let mut out = Vec::with_capacity(states.len());
    for st in states {
        let task_state = match st.last.as_ref().and_then(|r| r.task) {
            Some(id) => broker.get(id).await?.map(|d| d.task.state),
            None => None,
        };
        out.push((st, task_state));
    }
    Ok(out)
}

/// The state now of each record's task, by task (for a schedule's history).
pub(crate) async fn task_states(
    broker: &dyn super::Broker,
    records: &[SlotRecord],
) -> super::Result<Vec<Option<crate::model::TaskState>>> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        out.push(match r.task {
            Some(id) => broker.get(id).await?.map(|d| d.task.state),
            None => None,
        });
    }
    Ok(out)
}
