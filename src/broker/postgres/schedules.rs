//! Schedules: the `schedules` table (one record per schedule name and queue) and
//! `schedule_slots` (the newest slot records of each). A step is one transaction holding
//! the record's row lock (`FOR UPDATE`, the row created first when missing): the check of
//! `through` and the spec, the task's insert and the record's update commit together, and
//! two clients racing for one slot are serialised on the row (rule 10).

use deadpool_postgres::{GenericClient, Transaction};

use super::conn::pg;
use super::rows::{exec, insert_task, opt, rows, sql_limit};
use super::PgBroker;
use crate::broker::schedules::{Plan, SLOT_HISTORY};
use crate::broker::{
    BrokerError, Result, ScheduleKey, ScheduleState, ScheduleStep, SlotOutcome, SlotRecord,
    StepAnswer,
};
use crate::model::{NewTask, TaskId, TaskState, UnixMs};

const SLOT_COLS: &str = "slot, first, count, outcome, task, reason, at, node";

fn slot_row(row: &tokio_postgres::Row) -> Result<SlotRecord> {
    let outcome: String = row.get(3);
    let task: Option<String> = row.get(4);
    Ok(SlotRecord {
        slot: row.get(0),
        first: row.get(1),
        count: row.get::<_, i64>(2).max(0) as u64,
        outcome: SlotOutcome::parse(&outcome).unwrap_or(SlotOutcome::Skipped),
        task: task
            .map(|t| t.parse())
            .transpose()
            .map_err(BrokerError::Storage)?,
        reason: row.get(5),
        at: row.get(6),
        node: row.get(7),
    })
}

async fn read_state<C: GenericClient>(
    client: &C,
    key: &ScheduleKey,
    lock: bool,
) -> Result<ScheduleState> {
    let mut st = ScheduleState::empty(key.clone());
    let sql = format!(
        "SELECT spec, through, last_task, fired, caught_up, skipped, paused FROM schedules
         WHERE name = $1 AND queue = $2{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    if let Some(r) = opt(client, &sql, &[&key.name, &key.queue.as_str()]).await? {
        let last: Option<String> = r.get(2);
        st.spec = r.get(0);
        st.through = r.get(1);
        st.last_task = last
            .map(|t| t.parse())
            .transpose()
            .map_err(BrokerError::Storage)?;
        st.fired = r.get::<_, i64>(3) as u64;
        st.caught_up = r.get::<_, i64>(4) as u64;
        st.skipped = r.get::<_, i64>(5) as u64;
        st.paused = r.get(6);
        st.last = history(client, key, 1).await?.pop();
    }
    Ok(st)
}

async fn history<C: GenericClient>(
    client: &C,
    key: &ScheduleKey,
    limit: usize,
) -> Result<Vec<SlotRecord>> {
    rows(
        client,
        &format!(
            "SELECT {SLOT_COLS} FROM schedule_slots WHERE name = $1 AND queue = $2 ORDER BY seq DESC LIMIT $3"
        ),
        &[&key.name, &key.queue.as_str(), &sql_limit(limit)],
    )
    .await?
    .iter()
    .map(slot_row)
    .collect()
}

async fn write_state(tx: &Transaction<'_>, st: &ScheduleState, now: UnixMs) -> Result<()> {
    exec(
        tx,
        "INSERT INTO schedules (name, queue, spec, through, last_task, fired, caught_up, skipped, paused, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (name, queue) DO UPDATE SET spec = $3, through = $4, last_task = $5, fired = $6,
            caught_up = $7, skipped = $8, paused = $9, updated_at = $10",
        &[
            &st.key.name,
            &st.key.queue.as_str(),
            &st.spec,
            &st.through,
            &st.last_task.map(|t| t.to_string()),
            &(st.fired as i64),
            &(st.caught_up as i64),
            &(st.skipped as i64),
            &st.paused,
            &now,
        ],
    )
    .await?;
    Ok(())
}

async fn add_record(tx: &Transaction<'_>, key: &ScheduleKey, rec: &SlotRecord) -> Result<()> {
    exec(
        tx,
        "INSERT INTO schedule_slots (name, queue, slot, first, count, outcome, task, reason, at, node)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            &key.name,
            &key.queue.as_str(),
            &rec.slot,
            &rec.first,
            &(rec.count as i64),
            &rec.outcome.as_str(),
            &rec.task.map(|t| t.to_string()),
            &rec.reason,
            &rec.at,
            &rec.node,
        ],
    )
    .await?;
    exec(
        tx,
        "DELETE FROM schedule_slots WHERE name = $1 AND queue = $2 AND seq <=
            (SELECT seq FROM schedule_slots WHERE name = $1 AND queue = $2 ORDER BY seq DESC LIMIT 1 OFFSET $3)",
        &[&key.name, &key.queue.as_str(), &(SLOT_HISTORY as i64)],
    )
    .await?;
    Ok(())
}

async fn insert_for(
    tx: &Transaction<'_>,
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
    let e = insert_task(tx, task, now).await?;
    if !e.existing {
        exec(
            tx,
            "UPDATE tasks SET schedule = $2, slot = $3 WHERE id = $1",
            &[&e.id.to_string(), &key.name, &slot],
        )
        .await?;
    }
    Ok(e)
}

/// Lock the record's row for this transaction, creating it (empty) when missing.
async fn lock_record(
    tx: &Transaction<'_>,
    key: &ScheduleKey,
    now: UnixMs,
) -> Result<ScheduleState> {
    exec(
        tx,
        "INSERT INTO schedules (name, queue, updated_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        &[&key.name, &key.queue.as_str(), &now],
    )
    .await?;
    read_state(tx, key, true).await
}

/// Whether `task` (a schedule's previous slot task) still waits or runs.
async fn still_live(tx: &Transaction<'_>, task: TaskId) -> Result<bool> {
    let state: Option<String> = opt(
        tx,
        "SELECT state FROM tasks WHERE id = $1",
        &[&task.to_string()],
    )
    .await?
    .map(|r| r.get(0));
    Ok(state
        .and_then(|s| s.parse::<TaskState>().ok())
        .is_some_and(|s| !s.is_terminal()))
}

async fn step(
    tx: &Transaction<'_>,
    key: &ScheduleKey,
    step: ScheduleStep,
    now: UnixMs,
) -> Result<StepAnswer> {
    // A manual run leaves the record as it is: no need for its row lock.
    if let ScheduleStep::Manual { task } = &step {
        let e = insert_for(tx, key, task, None, now).await?;
        return Ok(StepAnswer::Manual { task: e.id });
    }
    let mut st = lock_record(tx, key, now).await?;
    let (record, answer) = match st.plan(step, now) {
        Plan::Answer(answer) => return Ok(answer),
        Plan::Begin => {
            write_state(tx, &st, now).await?;
            return Ok(StepAnswer::Begun(true));
        }
        Plan::Manual(_) => unreachable!("answered above"),
        Plan::Record(record, answer) => (record, answer),
        Plan::Fire {
            slot,
            task,
            caught_up,
            overlap,
            node,
        } => match overlap {
            Some(prev) if still_live(tx, prev).await? => st.overlapped(slot, prev, node, now),
            _ => {
                let e = insert_for(tx, key, &task, Some(slot), now).await?;
                st.fired(slot, e.id, e.existing, caught_up, node, now)
            }
        },
    };
    write_state(tx, &st, now).await?;
    add_record(tx, key, &record).await?;
    Ok(answer)
}

impl PgBroker {
    pub(super) async fn schedule_states_in(
        &self,
        keys: &[ScheduleKey],
    ) -> Result<Vec<ScheduleState>> {
        let c = self.client().await?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(read_state(&c, k, false).await?);
        }
        Ok(out)
    }

    pub(super) async fn schedule_step_in(
        &self,
        key: &ScheduleKey,
        what: ScheduleStep,
    ) -> Result<StepAnswer> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let answer = step(&tx, key, what, self.now()).await?;
        tx.commit().await.map_err(pg)?;
        Ok(answer)
    }

    pub(super) async fn schedule_history_in(
        &self,
        key: &ScheduleKey,
        limit: usize,
    ) -> Result<Vec<SlotRecord>> {
        let c = self.client().await?;
        history(&c, key, limit).await
    }

    pub(super) async fn prune_slots_in(&self, key: &ScheduleKey, before: UnixMs) -> Result<u64> {
        let c = self.client().await?;
        exec(
            &c,
            "DELETE FROM schedule_slots WHERE name = $1 AND queue = $2 AND at < $3
               AND seq < (SELECT max(seq) FROM schedule_slots WHERE name = $1 AND queue = $2)",
            &[&key.name, &key.queue.as_str(), &before],
        )
        .await
    }

    pub(super) async fn set_schedule_paused_in(
        &self,
        key: &ScheduleKey,
        paused: bool,
    ) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let now = self.now();
        let mut st = lock_record(&tx, key, now).await?;
        st.paused = paused;
        write_state(&tx, &st, now).await?;
        self.notify(&tx, "schedules").await?;
        tx.commit().await.map_err(pg)?;
        Ok(())
    }
}
