//! The schema: an append-only list of migrations and the step that brings a database up to
//! the newest one. It must not hold queries of the broker's operations.

use rusqlite::{params, Connection};

use super::conn::{retry_busy, storage};
use crate::broker::{BrokerError, Result};
use crate::model::now_ms;

/// The schema, one entry per version. Never edit a released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: tasks, attempts, paused queues.
    r#"
    CREATE TABLE tasks (
        seq              INTEGER PRIMARY KEY,
        id               TEXT    NOT NULL UNIQUE,
        queue            TEXT    NOT NULL,
        state            TEXT    NOT NULL,
        payload          TEXT    NOT NULL,
        args             TEXT    NOT NULL DEFAULT '[]',
        priority         INTEGER NOT NULL DEFAULT 0,
        unique_key       TEXT,
        run_at           INTEGER NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL,
        finished_at      INTEGER,
        last_error       TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        lease_node       TEXT,
        lease_token      INTEGER NOT NULL DEFAULT 0,
        lease_expires    INTEGER,
        started_at       INTEGER,
        pid              INTEGER,
        pid_start        INTEGER
    );
    -- Claiming reads only ready tasks, in claim order: this index stays small however many
    -- tasks have finished, and its first entry is the next task to run.
    -- A claimed task stays `queued`, reserved by its node (lease_node set), until its process
    -- has started; only unreserved ones are in this index.
    CREATE INDEX tasks_ready   ON tasks(queue, priority DESC, seq) WHERE state = 'queued' AND lease_node IS NULL;
    CREATE INDEX tasks_waiting ON tasks(run_at) WHERE state IN ('scheduled', 'retrying');
    CREATE INDEX tasks_cancel  ON tasks(lease_node) WHERE cancel_requested = 1;
    CREATE INDEX tasks_held    ON tasks(lease_node) WHERE lease_node IS NOT NULL;
    CREATE INDEX tasks_state   ON tasks(state, queue);
    CREATE UNIQUE INDEX tasks_unique ON tasks(queue, unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'queued', 'running', 'retrying');
    CREATE TABLE attempts (
        task_seq    INTEGER NOT NULL REFERENCES tasks(seq) ON DELETE CASCADE,
        n           INTEGER NOT NULL,
        number      INTEGER NOT NULL,
        node        TEXT    NOT NULL,
        pid         INTEGER,
        started_at  INTEGER NOT NULL,
        ended_at    INTEGER NOT NULL,
        exit_code   INTEGER,
        signal      INTEGER,
        reason      TEXT,
        error       TEXT,
        stdout_tail TEXT    NOT NULL DEFAULT '',
        stderr_tail TEXT    NOT NULL DEFAULT '',
        PRIMARY KEY (task_seq, n)
    );
    CREATE TABLE paused_queues (
        queue     TEXT PRIMARY KEY,
        paused_at INTEGER NOT NULL
    );
    "#,
    // 2: the boot a recorded pid belongs to. A pid (and its start time) means nothing on
    // another machine or after a reboot, where the number may name someone else's group.
    r#"
    ALTER TABLE tasks ADD COLUMN pid_boot TEXT;
    "#,
    // 3: schedules. A task records the schedule and slot it was enqueued for; each schedule
    // (by name and queue) has a record of its handled slots and its newest slot records.
    r#"
    ALTER TABLE tasks ADD COLUMN schedule TEXT;
    ALTER TABLE tasks ADD COLUMN slot INTEGER;
    CREATE TABLE schedules (
        name       TEXT    NOT NULL,
        queue      TEXT    NOT NULL,
        spec       TEXT    NOT NULL DEFAULT '',
        through    INTEGER NOT NULL DEFAULT 0,
        last_task  TEXT,
        fired      INTEGER NOT NULL DEFAULT 0,
        caught_up  INTEGER NOT NULL DEFAULT 0,
        skipped    INTEGER NOT NULL DEFAULT 0,
        paused     INTEGER NOT NULL DEFAULT 0,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (name, queue)
    );
    CREATE TABLE schedule_slots (
        seq     INTEGER PRIMARY KEY,
        name    TEXT    NOT NULL,
        queue   TEXT    NOT NULL,
        slot    INTEGER NOT NULL,
        first   INTEGER NOT NULL,
        count   INTEGER NOT NULL,
        outcome TEXT    NOT NULL,
        task    TEXT,
        reason  TEXT,
        at      INTEGER NOT NULL,
        node    TEXT    NOT NULL
    );
    CREATE INDEX schedule_slots_by_schedule ON schedule_slots(name, queue, seq);
    "#,
    // 4: throughput and latency counters per queue and minute (the dashboard's charts),
    // written by the daemon every few seconds, kept for a day.
    r#"
    CREATE TABLE stats (
        minute      INTEGER NOT NULL,
        queue       TEXT    NOT NULL,
        succeeded   INTEGER NOT NULL DEFAULT 0,
        failed      INTEGER NOT NULL DEFAULT 0,
        retried     INTEGER NOT NULL DEFAULT 0,
        cancelled   INTEGER NOT NULL DEFAULT 0,
        runs        INTEGER NOT NULL DEFAULT 0,
        run_ms_sum  INTEGER NOT NULL DEFAULT 0,
        run_ms_max  INTEGER NOT NULL DEFAULT 0,
        wait_ms_sum INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (minute, queue)
    ) WITHOUT ROWID;
    "#,
    // 5: the audit trail: who changed what (broker rule 11). `seq` orders the records and is
    // never reused (AUTOINCREMENT), so that a cursor stays valid after old records are
    // dropped; `record` is the whole entry as JSON; `action`, `task` and `queue` are there to
    // be read with sqlite3.
    r#"
    CREATE TABLE audit (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,
        at      INTEGER NOT NULL,
        action  TEXT    NOT NULL,
        task    TEXT,
        queue   TEXT,
        outcome TEXT    NOT NULL,
        record  TEXT    NOT NULL
    );
    CREATE INDEX audit_at ON audit(at);
    "#,
    // 6: results. What a succeeded task returned (compact JSON), beside its row rather than
    // in it: the tasks table stays narrow for claims and lists, and whatever deletes a task
    // deletes its result.
    r#"
    CREATE TABLE results (
        task_seq INTEGER PRIMARY KEY REFERENCES tasks(seq) ON DELETE CASCADE,
        value    TEXT    NOT NULL
    );
    "#,
    // 7: flow control. Dependencies (broker rule 13): a dependant keeps its parents' ids
    // (`after_ids`, comma-separated, as given) and counts those not yet succeeded
    // (`blocked`); `deps` links each parent to its dependants, by seq, until the dependant
    // finishes (a parent with a link has a dependant that has not finished: pruning keeps
    // it). While `blocked` > 0 the dependant stays `scheduled` and out of the index of due
    // tasks, so a claim's promotion never reads it. The triggers settle the dependants when
    // a parent ends, whichever operation ends it: a success counts down, a failure or a
    // cancel cancels them (and theirs, transitively: every connection sets
    // `recursive_triggers`).
    // `unique_for`: how long (ms) the unique key holds after the task finished.
    // `expires_at`: a task not started by then is cancelled, reason `expired`.
    r#"
    ALTER TABLE tasks ADD COLUMN after_ids TEXT;
    ALTER TABLE tasks ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN unique_for INTEGER;
    ALTER TABLE tasks ADD COLUMN expires_at INTEGER;
    CREATE TABLE deps (
        parent INTEGER NOT NULL REFERENCES tasks(seq) ON DELETE CASCADE,
        child  INTEGER NOT NULL REFERENCES tasks(seq) ON DELETE CASCADE,
        PRIMARY KEY (parent, child)
    ) WITHOUT ROWID;
    CREATE INDEX deps_child ON deps(child);
    DROP INDEX tasks_waiting;
    CREATE INDEX tasks_due ON tasks(run_at) WHERE state IN ('scheduled', 'retrying') AND blocked = 0;
    CREATE INDEX tasks_unique_key ON tasks(queue, unique_key) WHERE unique_key IS NOT NULL;
    CREATE INDEX tasks_expiry ON tasks(expires_at)
        WHERE expires_at IS NOT NULL AND state IN ('scheduled', 'queued', 'retrying');
    CREATE TRIGGER tasks_parent_succeeded AFTER UPDATE OF state ON tasks
        WHEN NEW.state = 'succeeded' AND OLD.state <> 'succeeded'
    BEGIN
        UPDATE tasks SET blocked = blocked - 1, updated_at = NEW.updated_at
         WHERE seq IN (SELECT child FROM deps WHERE parent = NEW.seq)
           AND state = 'scheduled' AND blocked > 0;
    END;
    CREATE TRIGGER tasks_parent_failed AFTER UPDATE OF state ON tasks
        WHEN NEW.state IN ('failed', 'cancelled') AND OLD.state NOT IN ('succeeded', 'failed', 'cancelled')
    BEGIN
        UPDATE tasks SET state = 'cancelled', last_error = 'dependency ' || NEW.id || ' failed',
            finished_at = NEW.updated_at, updated_at = NEW.updated_at
         WHERE seq IN (SELECT child FROM deps WHERE parent = NEW.seq)
           AND state = 'scheduled' AND blocked > 0;
    END;
    CREATE TRIGGER tasks_dependant_finished AFTER UPDATE OF state ON tasks
        WHEN NEW.state IN ('succeeded', 'failed', 'cancelled')
    BEGIN
        DELETE FROM deps WHERE child = NEW.seq;
    END;
    "#,
    // 8: per-key and rate limits (broker rule 15). A task keeps its `concurrency_key` and `rate_key`
    // values; `parked` takes a task of a blocked key out of the ready index (1: its key is
    // at its limit, 2: its rate key waits for its time), `parked_keys` lists the keys that
    // have parked tasks, so that a claim puts them back without reading the tasks, and
    // `rate_state` holds each rate limit's TAT (µs). Held tasks are counted per key through
    // `tasks_key_held`.
    r#"
    ALTER TABLE tasks ADD COLUMN flow_key TEXT;
    ALTER TABLE tasks ADD COLUMN rate_key TEXT;
    ALTER TABLE tasks ADD COLUMN parked INTEGER NOT NULL DEFAULT 0;
    DROP INDEX tasks_ready;
    CREATE INDEX tasks_ready ON tasks(queue, priority DESC, seq)
        WHERE state = 'queued' AND lease_node IS NULL AND parked = 0;
    CREATE INDEX tasks_key_held ON tasks(queue, flow_key)
        WHERE flow_key IS NOT NULL AND lease_node IS NOT NULL;
    CREATE INDEX tasks_parked_key ON tasks(queue, flow_key, priority DESC, seq) WHERE parked = 1;
    CREATE INDEX tasks_parked_rate ON tasks(queue, rate_key, priority DESC, seq) WHERE parked = 2;
    CREATE TABLE parked_keys (
        queue TEXT    NOT NULL,
        kind  INTEGER NOT NULL,
        key   TEXT    NOT NULL,
        until INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (queue, kind, key)
    ) WITHOUT ROWID;
    CREATE TABLE rate_state (
        queue TEXT    NOT NULL,
        key   TEXT    NOT NULL,
        tat   INTEGER NOT NULL,
        PRIMARY KEY (queue, key)
    ) WITHOUT ROWID;
    "#,
    // 9: retention. Finished tasks by queue, state and finish time, so that the tasks whose
    // `keep_*` ran out are found without reading any other (a partial index: only finished
    // tasks have a finish time).
    r#"
    CREATE INDEX tasks_finished ON tasks(queue, state, finished_at) WHERE finished_at IS NOT NULL;
    "#,
    // 10: what an attempt's cgroup counted: its peak memory (bytes) and CPU time (µs), NULL
    // where nothing was measured.
    r#"
    ALTER TABLE attempts ADD COLUMN memory_peak INTEGER;
    ALTER TABLE attempts ADD COLUMN cpu_usec INTEGER;
    "#,
];

/// Bring the schema up to the newest version, one transaction per step.
pub(super) fn migrate(conn: &Connection) -> Result<()> {
    // The common case, on every open, is a current schema: find that out with a plain read.
    let current: i64 = match conn.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    ) {
        Ok(v) => v,
        Err(_) => {
            retry_busy(|| {
                conn.execute_batch(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at INTEGER NOT NULL)",
                )
            })
            .map_err(storage)?;
            0
        }
    };
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if current >= version {
            continue; // checked without a write lock: the common case on every open
        }
        retry_busy(|| conn.execute_batch("BEGIN IMMEDIATE")).map_err(storage)?;
        let step = (|| -> rusqlite::Result<()> {
            let current: i64 = conn.query_row(
                "SELECT coalesce(max(version), 0) FROM schema_version",
                [],
                |r| r.get(0),
            )?;
            if current >= version {
                return Ok(());
            }
            conn.execute_batch(sql)?;
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
                params![version, now_ms()],
            )?;
            Ok(())
        })();
        match step {
            Ok(()) => conn.execute_batch("COMMIT").map_err(storage)?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(storage(e));
            }
        }
    }
    let newest: i64 = conn
        .query_row(
            "SELECT coalesce(max(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )
        .map_err(storage)?;
    if newest > MIGRATIONS.len() as i64 {
        return Err(BrokerError::Storage(format!(
            "the database has schema version {newest}, newer than this taskd understands ({}); upgrade taskd",
            MIGRATIONS.len()
        )));
    }
    Ok(())
}
