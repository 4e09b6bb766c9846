//! Schedules in the embedded store: the `schedules` table (one record per schedule name and
//! queue) and `schedule_slots` (the newest slot records of each). A step is one write: the
//! check of `through` and the spec, the task's insert and the record's update commit in one
//! transaction (rule 10 of the trait).

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::conn::storage;
use super::rows::insert_task;
use super::SqliteBroker;
use crate::broker::schedules::{Plan, SLOT_HISTORY};
use crate::broker::{
    BrokerError, Result, ScheduleKey, ScheduleState, ScheduleStep, SlotOutcome, SlotRecord,
    StepAnswer,
};
use crate::model::{now_ms, NewTask, TaskId, TaskState, UnixMs};

const STATE_COLS: &str = "spec, through, last_task, fired, caught_up, skipped, paused";
const SLOT_COLS: &str = "slot, first, count, outcome, task, reason, at, node";

fn parse<T: std::str::FromStr<Err = String>>(text: Option<String>) -> rusqlite::Result<Option<T>> {
    text.map(|s| {
        s.parse().map_err(|e: String| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
        })
    })
    .transpose()
}

fn slot_row(row: &Row<'_>) -> rusqlite::Result<SlotRecord> {
    let outcome: String = row.get(3)?;
    Ok(SlotRecord {
        slot: row.get(0)?,
        first: row.get(1)?,
        count: row.get::<_, i64>(2)? as u64,
        outcome: SlotOutcome::parse(&outcome).unwrap_or(SlotOutcome::Skipped),
        task: parse(row.get(4)?)?,
        reason: row.get(5)?,
        at: row.get(6)?,
        node: row.get(7)?,
    })
}

/// The record of `key`, or the empty one.
fn read_state(conn: &Connection, key: &ScheduleKey) -> Result<ScheduleState> {
    let mut st = ScheduleState::empty(key.clone());
    let row = conn
        .prepare_cached(&format!(
            "SELECT {STATE_COLS} FROM schedules WHERE name = ?1 AND queue = ?2"
        ))
        .and_then(|mut s| {
            s.query_row(params![key.name, key.queue.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    parse(r.get(2)?)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)? != 0,
                ))
            })
            .optional()
        })
        .map_err(storage)?;
    if let Some((spec, through, last_task, fired, caught_up, skipped, paused)) = row {
        st.spec = spec;
        st.through = through;
        st.last_task = last_task;
        st.fired = fired as u64;
        st.caught_up = caught_up as u64;
        st.skipped = skipped as u64;
        st.paused = paused;
        st.last = history(conn, key, 1)?.pop();
    }
    Ok(st)
}

fn history(conn: &Connection, key: &ScheduleKey, limit: usize) -> Result<Vec<SlotRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {SLOT_COLS} FROM schedule_slots WHERE name = ?1 AND queue = ?2 ORDER BY seq DESC LIMIT ?3"
    ))
    .and_then(|mut s| {
        s.query_map(params![key.name, key.queue.as_str(), limit as i64], slot_row)
            .and_then(|it| it.collect())
    })
    .map_err(storage)
}

/// Write the record's fields (creating it when missing).
fn write_state(conn: &Connection, st: &ScheduleState, now: UnixMs) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO schedules (name, queue, spec, through, last_task, fired, caught_up, skipped, paused, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (name, queue) DO UPDATE SET spec = ?3, through = ?4, last_task = ?5, fired = ?6,
            caught_up = ?7, skipped = ?8, paused = ?9, updated_at = ?10",
    )
    .and_then(|mut s| {
        s.execute(params![
            st.key.name,
            st.key.queue.as_str(),
            st.spec,
            st.through,
            st.last_task.map(|t| t.to_string()),
            st.fired as i64,
            st.caught_up as i64,
            st.skipped as i64,
            st.paused,
            now
        ])
    })
    .map_err(storage)?;
    Ok(())
}

/// Add a slot record and drop those past the history's length.
fn add_record(conn: &Connection, key: &ScheduleKey, rec: &SlotRecord) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO schedule_slots (name, queue, slot, first, count, outcome, task, reason, at, node)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .and_then(|mut s| {
        s.execute(params![
            key.name,
            key.queue.as_str(),
            rec.slot,
            rec.first,
            rec.count as i64,
            rec.outcome.as_str(),
            rec.task.map(|t| t.to_string()),
            rec.reason,
            rec.at,
            rec.node
        ])
    })
    .map_err(storage)?;
    conn.prepare_cached(
        "DELETE FROM schedule_slots WHERE name = ?1 AND queue = ?2 AND seq <=
            (SELECT seq FROM schedule_slots WHERE name = ?1 AND queue = ?2 ORDER BY seq DESC LIMIT 1 OFFSET ?3)",
    )
    .and_then(|mut s| s.execute(params![key.name, key.queue.as_str(), SLOT_HISTORY as i64]))
    .map_err(storage)?;
    Ok(())
}

/// Insert a schedule's task and mark it with the schedule and slot; a waiting or running
/// task holding its unique key is answered instead (`existing`).
fn insert_for(
    conn: &Connection,
    key: &ScheduleKey,
    task: &NewTask,
    slot: Option<UnixMs>,
    now: UnixMs,
) -> Result<crate::broker::Enqueued> {
    if task.queue != key.queue {
        return Err(BrokerError::Conflict(format!(
            "schedule {}'s task is for queue {}, not {}",
            key.name, task.queue, key.queue
        )));
    }
    let e = insert_task(conn, task, now)?;
    if !e.existing {
        conn.prepare_cached("UPDATE tasks SET schedule = ?2, slot = ?3 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![e.id.to_string(), key.name, slot]))
            .map_err(storage)?;
    }
    Ok(e)
}

/// Whether `task` (a schedule's previous slot task) still waits or runs.
fn still_live(conn: &Connection, task: TaskId) -> Result<bool> {
    let state: Option<String> = conn
        .prepare_cached("SELECT state FROM tasks WHERE id = ?1")
        .and_then(|mut s| s.query_row([task.to_string()], |r| r.get(0)).optional())
        .map_err(storage)?;
    Ok(state
        .and_then(|s| s.parse::<TaskState>().ok())
        .is_some_and(|s| !s.is_terminal()))
}

/// One step, inside the writer's transaction. Also whether a task was enqueued.
fn step(
    conn: &Connection,
    key: &ScheduleKey,
    step: ScheduleStep,
    now: UnixMs,
) -> Result<(StepAnswer, bool)> {
    let mut st = read_state(conn, key)?;
    let (record, answer, work) = match st.plan(step, now) {
        Plan::Answer(answer) => return Ok((answer, false)),
        Plan::Begin => {
            write_state(conn, &st, now)?;
            return Ok((StepAnswer::Begun(true), false));
        }
        Plan::Manual(task) => {
            let e = insert_for(conn, key, &task, None, now)?;
            return Ok((StepAnswer::Manual { task: e.id }, !e.existing));
        }
        Plan::Record(record, answer) => (record, answer, false),
        Plan::Fire {
            slot,
            task,
            caught_up,
            overlap,
            node,
        } => match overlap {
            Some(prev) if still_live(conn, prev)? => {
                let (record, answer) = st.overlapped(slot, prev, node, now);
                (record, answer, false)
            }
            _ => {
                let e = insert_for(conn, key, &task, Some(slot), now)?;
                let (record, answer) = st.fired(slot, e.id, e.existing, caught_up, node, now);
                (record, answer, !e.existing)
            }
        },
    };
    write_state(conn, &st, now)?;
    add_record(conn, key, &record)?;
    Ok((answer, work))
}

impl SqliteBroker {
    pub(super) async fn schedule_states_in(
        &self,
        keys: &[ScheduleKey],
    ) -> Result<Vec<ScheduleState>> {
        let keys = keys.to_vec();
        self.read(move |conn| keys.iter().map(|k| read_state(conn, k)).collect())
            .await
    }

    pub(super) async fn schedule_step_in(
        &self,
        key: &ScheduleKey,
        what: ScheduleStep,
    ) -> Result<StepAnswer> {
        let key = key.clone();
        // A fired slot's task is a new task: the daemon's dispatcher is told after the commit.
        let wakes = matches!(
            what,
            ScheduleStep::Fire { .. } | ScheduleStep::Manual { .. }
        );
        let (answer, work) = self
            .write(move |conn| step(conn, &key, what, now_ms()))
            .await?;
        if wakes && work {
            self.wake(b"work");
        }
        Ok(answer)
    }

    pub(super) async fn schedule_history_in(
        &self,
        key: &ScheduleKey,
        limit: usize,
    ) -> Result<Vec<SlotRecord>> {
        let key = key.clone();
        self.read(move |conn| history(conn, &key, limit)).await
    }

    /// Retention of slot records (rule 18): at most the schedule's 500, through its index.
    pub(super) async fn prune_slots_in(&self, key: &ScheduleKey, before: UnixMs) -> Result<u64> {
        let key = key.clone();
        self.write_as(false, move |conn| {
            conn.prepare_cached(
                "DELETE FROM schedule_slots WHERE name = ?1 AND queue = ?2 AND at < ?3
                   AND seq < (SELECT max(seq) FROM schedule_slots WHERE name = ?1 AND queue = ?2)",
            )
            .and_then(|mut s| s.execute(params![key.name, key.queue.as_str(), before]))
            .map(|n| n as u64)
            .map_err(storage)
        })
        .await
    }

    pub(super) async fn set_schedule_paused_in(
        &self,
        key: &ScheduleKey,
        paused: bool,
    ) -> Result<()> {
        let key = key.clone();
        self.write(move |conn| {
            let mut st = read_state(conn, &key)?;
            st.paused = paused;
            write_state(conn, &st, now_ms())
        })
        .await?;
        self.wake(b"schedules");
        Ok(())
    }
}
