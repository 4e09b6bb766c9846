//! The schema: an append-only list of migrations, each applied once in its own transaction
//! under an advisory lock (several daemons starting at once apply each step once), and the
//! check that refuses a database whose schema is newer than this taskd. It must not hold
//! queries of the broker's operations.
//!
//! Every object lives in the broker's own schema (`taskd` unless the URL says `schema=`);
//! `@S@` in a migration is that schema's name, `@C@` the wake-up channel (the same name).

use tokio_postgres::Client;

use super::conn::pg;
use crate::broker::{BrokerError, Result};

/// The schema, one entry per version. Never edit a released entry: append a new one.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: tasks and everything that belongs to them, the queues' and schedules' records, the
    // node registry, the audit trail and the counters. Times are ms since the epoch
    // (bigint), as the other backends keep them. Each index that a hot path reads is
    // partial to the states it reads, so that claims, promotions, expiry and retention cost
    // the same however many tasks have finished.
    r#"
    CREATE TABLE tasks (
        seq              bigserial PRIMARY KEY,
        id               text     NOT NULL UNIQUE,
        queue            text     NOT NULL,
        state            text     NOT NULL,
        payload          text     NOT NULL,
        args             text     NOT NULL DEFAULT '[]',
        priority         integer  NOT NULL DEFAULT 0,
        unique_key       text,
        run_at           bigint   NOT NULL,
        attempts         integer  NOT NULL DEFAULT 0,
        created_at       bigint   NOT NULL,
        updated_at       bigint   NOT NULL,
        finished_at      bigint,
        last_error       text,
        cancel_requested boolean  NOT NULL DEFAULT false,
        lease_node       text,
        lease_token      bigint   NOT NULL DEFAULT 0,
        lease_expires    bigint,
        started_at       bigint,
        pid              integer,
        pid_start        bigint,
        pid_boot         text,
        schedule         text,
        slot             bigint,
        after_ids        text,
        blocked          integer  NOT NULL DEFAULT 0,
        unique_for       bigint,
        expires_at       bigint,
        flow_key         text,
        rate_key         text,
        parked           smallint NOT NULL DEFAULT 0
    );
    -- Claims read only unreserved ready tasks, in claim order.
    CREATE INDEX tasks_ready ON tasks (queue, priority DESC, seq)
        WHERE state = 'queued' AND lease_node IS NULL AND parked = 0;
    -- Promotion (per queue) and the daemon's timer (every queue) read due waiting tasks.
    CREATE INDEX tasks_due ON tasks (queue, run_at)
        WHERE state IN ('scheduled', 'retrying') AND blocked = 0;
    CREATE INDEX tasks_due_at ON tasks (run_at)
        WHERE state IN ('scheduled', 'retrying') AND blocked = 0;
    CREATE INDEX tasks_cancel ON tasks (lease_node) WHERE cancel_requested;
    CREATE INDEX tasks_held ON tasks (lease_expires) WHERE lease_node IS NOT NULL;
    CREATE INDEX tasks_state ON tasks (state, queue);
    CREATE INDEX tasks_queue ON tasks (queue, seq);
    CREATE UNIQUE INDEX tasks_unique ON tasks (queue, unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'queued', 'running', 'retrying');
    CREATE INDEX tasks_unique_key ON tasks (queue, unique_key) WHERE unique_key IS NOT NULL;
    CREATE INDEX tasks_expiry ON tasks (expires_at)
        WHERE expires_at IS NOT NULL AND state IN ('scheduled', 'queued', 'retrying');
    CREATE INDEX tasks_key_held ON tasks (queue, flow_key)
        WHERE flow_key IS NOT NULL AND lease_node IS NOT NULL;
    CREATE INDEX tasks_parked_key ON tasks (queue, flow_key, priority DESC, seq) WHERE parked = 1;
    CREATE INDEX tasks_parked_rate ON tasks (queue, rate_key, priority DESC, seq) WHERE parked = 2;
    -- Retention: finished tasks by queue, state and finish time.
    CREATE INDEX tasks_finished ON tasks (queue, state, finished_at) WHERE finished_at IS NOT NULL;

    CREATE TABLE attempts (
        task_seq    bigint  NOT NULL REFERENCES tasks (seq) ON DELETE CASCADE,
        n           integer NOT NULL,
        number      integer NOT NULL,
        node        text    NOT NULL,
        pid         integer,
        started_at  bigint  NOT NULL,
        ended_at    bigint  NOT NULL,
        exit_code   integer,
        signal      integer,
        reason      text,
        error       text,
        stdout_tail text    NOT NULL DEFAULT '',
        stderr_tail text    NOT NULL DEFAULT '',
        memory_peak bigint,
        cpu_usec    bigint,
        PRIMARY KEY (task_seq, n)
    );
    -- What a succeeded task returned (compact JSON), beside its row.
    CREATE TABLE results (
        task_seq bigint PRIMARY KEY REFERENCES tasks (seq) ON DELETE CASCADE,
        value    text   NOT NULL
    );
    -- Dependencies (broker rule 13): a link per parent and dependant until the dependant
    -- finishes.
    CREATE TABLE deps (
        parent bigint NOT NULL REFERENCES tasks (seq) ON DELETE CASCADE,
        child  bigint NOT NULL REFERENCES tasks (seq) ON DELETE CASCADE,
        PRIMARY KEY (parent, child)
    );
    CREATE INDEX deps_child ON deps (child);
    CREATE TABLE paused_queues (
        queue     text   PRIMARY KEY,
        paused_at bigint NOT NULL
    );
    CREATE TABLE parked_keys (
        queue text     NOT NULL,
        kind  smallint NOT NULL,
        key   text     NOT NULL,
        until bigint   NOT NULL DEFAULT 0,
        PRIMARY KEY (queue, kind, key)
    );
    CREATE TABLE rate_state (
        queue text   NOT NULL,
        key   text   NOT NULL,
        tat   bigint NOT NULL,
        PRIMARY KEY (queue, key)
    );
    CREATE TABLE schedules (
        name       text    NOT NULL,
        queue      text    NOT NULL,
        spec       text    NOT NULL DEFAULT '',
        through    bigint  NOT NULL DEFAULT 0,
        last_task  text,
        fired      bigint  NOT NULL DEFAULT 0,
        caught_up  bigint  NOT NULL DEFAULT 0,
        skipped    bigint  NOT NULL DEFAULT 0,
        paused     boolean NOT NULL DEFAULT false,
        updated_at bigint  NOT NULL,
        PRIMARY KEY (name, queue)
    );
    CREATE TABLE schedule_slots (
        seq     bigserial PRIMARY KEY,
        name    text   NOT NULL,
        queue   text   NOT NULL,
        slot    bigint NOT NULL,
        first   bigint NOT NULL,
        count   bigint NOT NULL,
        outcome text   NOT NULL,
        task    text,
        reason  text,
        at      bigint NOT NULL,
        node    text   NOT NULL
    );
    CREATE INDEX schedule_slots_by_schedule ON schedule_slots (name, queue, seq);
    CREATE TABLE stats (
        minute      bigint NOT NULL,
        queue       text   NOT NULL,
        succeeded   bigint NOT NULL DEFAULT 0,
        failed      bigint NOT NULL DEFAULT 0,
        retried     bigint NOT NULL DEFAULT 0,
        cancelled   bigint NOT NULL DEFAULT 0,
        runs        bigint NOT NULL DEFAULT 0,
        run_ms_sum  bigint NOT NULL DEFAULT 0,
        run_ms_max  bigint NOT NULL DEFAULT 0,
        wait_ms_sum bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (minute, queue)
    );
    -- The audit trail (rule 11): `seq` orders the records; writers take an advisory lock,
    -- so the records kept have no gaps and the newest `keep` are those above seq − keep.
    CREATE TABLE audit (
        seq     bigint PRIMARY KEY,
        at      bigint NOT NULL,
        action  text   NOT NULL,
        task    text,
        queue   text,
        outcome text   NOT NULL,
        record  text   NOT NULL
    );
    CREATE TABLE nodes (
        id             text   PRIMARY KEY,
        record         text   NOT NULL,
        last_heartbeat bigint NOT NULL
    );

    -- The store's clock, in ms (rule 9).
    CREATE FUNCTION now_ms() RETURNS bigint LANGUAGE sql VOLATILE
        AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;

    -- When a parent ends, its dependants are settled in the same transaction (rule 13),
    -- transitively (the UPDATE fires this trigger again for them); and the daemons are
    -- woken for what a change makes claimable (rule 8): one channel, and PostgreSQL
    -- delivers a notification once per transaction however many rows raised it.
    CREATE FUNCTION tasks_changed() RETURNS trigger LANGUAGE plpgsql
        SET search_path = @S@, pg_catalog AS $$
    BEGIN
        IF NEW.state IS DISTINCT FROM OLD.state THEN
            IF NEW.state = 'succeeded' THEN
                UPDATE tasks SET blocked = blocked - 1, updated_at = NEW.updated_at
                 WHERE seq IN (SELECT child FROM deps WHERE parent = NEW.seq)
                   AND state = 'scheduled' AND blocked > 0;
            ELSIF NEW.state IN ('failed', 'cancelled')
                  AND OLD.state NOT IN ('succeeded', 'failed', 'cancelled') THEN
                UPDATE tasks SET state = 'cancelled', last_error = 'dependency ' || NEW.id || ' failed',
                       finished_at = NEW.updated_at, updated_at = NEW.updated_at
                 WHERE seq IN (SELECT child FROM deps WHERE parent = NEW.seq)
                   AND state = 'scheduled' AND blocked > 0;
            END IF;
            IF NEW.state IN ('succeeded', 'failed', 'cancelled') THEN
                DELETE FROM deps WHERE child = NEW.seq;
            END IF;
        END IF;
        IF NEW.state = 'queued' AND NEW.lease_node IS NULL AND NEW.parked = 0
           AND OLD.state NOT IN ('scheduled', 'retrying')
           AND (OLD.state <> 'queued' OR OLD.lease_node IS NOT NULL OR OLD.parked <> 0) THEN
            PERFORM pg_notify('@C@', 'work');
        ELSIF NEW.state IN ('scheduled', 'retrying') AND NEW.blocked = 0
              AND (OLD.state IS DISTINCT FROM NEW.state OR OLD.blocked <> 0) THEN
            PERFORM pg_notify('@C@', 'sched');
        END IF;
        IF NEW.cancel_requested AND NOT OLD.cancel_requested THEN
            PERFORM pg_notify('@C@', 'cancel');
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER tasks_changed AFTER UPDATE ON tasks FOR EACH ROW
        WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.cancel_requested <> NEW.cancel_requested
              OR OLD.blocked <> NEW.blocked OR OLD.parked <> NEW.parked
              OR (OLD.lease_node IS NOT NULL AND NEW.lease_node IS NULL))
        EXECUTE FUNCTION tasks_changed();

    -- New tasks wake the daemons once per statement: `work` for ready ones, `sched` for
    -- ones that wait for a time or for parents.
    CREATE FUNCTION tasks_inserted() RETURNS trigger LANGUAGE plpgsql
        SET search_path = @S@, pg_catalog AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM new_tasks WHERE state = 'queued') THEN
            PERFORM pg_notify('@C@', 'work');
        END IF;
        IF EXISTS (SELECT 1 FROM new_tasks WHERE state = 'scheduled' AND blocked = 0) THEN
            PERFORM pg_notify('@C@', 'sched');
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER tasks_inserted AFTER INSERT ON tasks REFERENCING NEW TABLE AS new_tasks
        FOR EACH STATEMENT EXECUTE FUNCTION tasks_inserted();

    -- A claim in one round trip: the queue's pause checked, its due waiting tasks promoted,
    -- and up to `max` ready ones reserved for `node` with new lease tokens, skipping rows
    -- another claim holds (FOR UPDATE SKIP LOCKED): claims of several nodes never wait on
    -- each other.
    CREATE FUNCTION claim(q text, node text, max_n integer, now bigint, lease_ms bigint)
        RETURNS SETOF tasks LANGUAGE plpgsql SET search_path = @S@, pg_catalog AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM paused_queues WHERE queue = q) THEN
            RETURN;
        END IF;
        -- Tasks parked under limits since removed (a reload, a restart) go back without
        -- limits.
        IF EXISTS (SELECT 1 FROM parked_keys WHERE queue = q) THEN
            UPDATE tasks SET parked = 0 WHERE queue = q AND parked <> 0;
            DELETE FROM parked_keys WHERE queue = q;
        END IF;
        UPDATE tasks SET state = 'queued', updated_at = now
         WHERE seq IN (SELECT seq FROM tasks
                        WHERE queue = q AND state IN ('scheduled', 'retrying') AND blocked = 0
                          AND run_at <= now AND (expires_at IS NULL OR expires_at > now)
                        FOR UPDATE SKIP LOCKED);
        RETURN QUERY
        UPDATE tasks t SET lease_node = node, lease_token = t.lease_token + 1,
               lease_expires = now + lease_ms, updated_at = now, pid = NULL, pid_start = NULL
          FROM (SELECT seq FROM tasks
                 WHERE queue = q AND state = 'queued' AND lease_node IS NULL AND parked = 0
                   AND (expires_at IS NULL OR expires_at > now)
                 ORDER BY priority DESC, seq LIMIT max_n
                 FOR UPDATE SKIP LOCKED) picked
         WHERE t.seq = picked.seq
        RETURNING t.*;
    END $$;

    -- A UUIDv7 (time-ordered, as taskd's own ids), for tasks enqueued from SQL.
    CREATE FUNCTION uuid_v7() RETURNS text LANGUAGE sql VOLATILE AS $$
        SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) PLACING
               substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
               FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid::text
    $$;

    -- Transactional enqueue from any language: called inside the application's own
    -- transaction, the task exists exactly when that transaction commits (and the commit
    -- wakes the daemons). Returns the task's id, or the holder's id when a waiting or
    -- running task of the queue already holds `unique_key` (nothing is added then).
    CREATE FUNCTION enqueue(queue text, payload jsonb, priority integer DEFAULT 0,
                            run_at timestamptz DEFAULT NULL, unique_key text DEFAULT NULL)
        RETURNS text LANGUAGE plpgsql SET search_path = @S@, pg_catalog AS $$
    DECLARE
        q ALIAS FOR queue;
        k ALIAS FOR unique_key;
        now bigint := now_ms();
        at bigint := coalesce((extract(epoch FROM run_at) * 1000)::bigint, now_ms());
        holder text;
        new_id text := uuid_v7();
    BEGIN
        IF q IS NULL OR q !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
            RAISE EXCEPTION 'taskd.enqueue: % is not a queue name (1 to 64 ASCII letters, digits, _, - and .)', q
                USING ERRCODE = '22023';
        END IF;
        IF payload IS NULL THEN
            RAISE EXCEPTION 'taskd.enqueue: the payload is NULL (pass a JSON value, e.g. ''{}''::jsonb)'
                USING ERRCODE = '22023';
        END IF;
        IF k IS NOT NULL THEN
            PERFORM pg_advisory_xact_lock(hashtextextended('taskd unique ' || q || chr(31) || k, 0));
            SELECT t.id INTO holder FROM tasks t
             WHERE t.queue = q AND t.unique_key = k
               AND (t.state IN ('scheduled', 'queued', 'running', 'retrying')
                    OR t.finished_at + t.unique_for > now)
             ORDER BY t.state IN ('scheduled', 'queued', 'running', 'retrying') DESC, t.seq DESC
             LIMIT 1;
            IF holder IS NOT NULL THEN
                RETURN holder;
            END IF;
        END IF;
        INSERT INTO tasks (id, queue, state, payload, priority, unique_key, run_at, created_at, updated_at)
        VALUES (new_id, q, CASE WHEN at > now THEN 'scheduled' ELSE 'queued' END, payload::text,
                coalesce(priority, 0), k, at, now, now);
        RETURN new_id;
    END $$;
    "#,
    // 2: an attempt's output tails as bytes. A task's output may hold NUL bytes
    // (`head -c N /dev/zero`), which a `text` column refuses ("invalid byte sequence for
    // encoding UTF8: 0x00"): the finish was refused and retried for ever, the task never
    // recorded. The other stores keep such tails as they are; so does `bytea`.
    r#"
    ALTER TABLE attempts
        ALTER COLUMN stdout_tail DROP DEFAULT,
        ALTER COLUMN stdout_tail TYPE bytea USING convert_to(stdout_tail, 'UTF8'),
        ALTER COLUMN stdout_tail SET DEFAULT ''::bytea,
        ALTER COLUMN stderr_tail DROP DEFAULT,
        ALTER COLUMN stderr_tail TYPE bytea USING convert_to(stderr_tail, 'UTF8'),
        ALTER COLUMN stderr_tail SET DEFAULT ''::bytea;
    "#,
    // 3: a claim's commit does not wait for the disk. Its fsync was most of the time from
    // enqueue to start (a WAL flush costs 2 to 10 ms on a loaded machine), and the claim is
    // the one write that needs none: the start or finish record that follows it commits
    // synchronously and flushes it too (the WAL is flushed in order), as SQLite (WAL mode,
    // synchronous=NORMAL) and Redis (AOF everysec) already acknowledge claims unflushed.
    // A claim lost in a server crash leaves its task queued and unleased: another claim
    // takes it, and the node that started it is refused by the fencing. For that, tokens
    // must not repeat when a crash undoes the last ones: a claim's token is at least the
    // server's clock in microseconds, so a token handed out after the crash differs from
    // every lost one (while the server's clock does not step back by more than the restart
    // took), even for the same node.
    r#"
    CREATE OR REPLACE FUNCTION claim(q text, node text, max_n integer, now bigint, lease_ms bigint)
        RETURNS SETOF tasks LANGUAGE plpgsql SET search_path = @S@, pg_catalog AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM paused_queues WHERE queue = q) THEN
            RETURN;
        END IF;
        PERFORM set_config('synchronous_commit', 'off', true);
        IF EXISTS (SELECT 1 FROM parked_keys WHERE queue = q) THEN
            UPDATE tasks SET parked = 0 WHERE queue = q AND parked <> 0;
            DELETE FROM parked_keys WHERE queue = q;
        END IF;
        UPDATE tasks SET state = 'queued', updated_at = now
         WHERE seq IN (SELECT seq FROM tasks
                        WHERE queue = q AND state IN ('scheduled', 'retrying') AND blocked = 0
                          AND run_at <= now AND (expires_at IS NULL OR expires_at > now)
                        FOR UPDATE SKIP LOCKED);
        RETURN QUERY
        UPDATE tasks t SET lease_node = node,
               lease_token = greatest(t.lease_token + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint),
               lease_expires = now + lease_ms, updated_at = now, pid = NULL, pid_start = NULL
          FROM (SELECT seq FROM tasks
                 WHERE queue = q AND state = 'queued' AND lease_node IS NULL AND parked = 0
                   AND (expires_at IS NULL OR expires_at > now)
                 ORDER BY priority DESC, seq LIMIT max_n
                 FOR UPDATE SKIP LOCKED) picked
         WHERE t.seq = picked.seq
        RETURNING t.*;
    END $$;
    "#,
    // 4: claims wait for the disk again. A claim a server crash undid, of a task the node had
    // already started, left that run out of every history (its start and finish were refused
    // by the fencing, rightly, so nothing recorded it), while another node ran the task
    // again: seen by the three-node crash test. The function's own SET restores the
    // session's setting when it returns, so the `set_config` inside it no longer reaches the
    // commit. Tokens stay at least the server's clock in microseconds.
    r#"
    ALTER FUNCTION claim(text, text, integer, bigint, bigint) SET synchronous_commit = on;
    "#,
    // 5: the row trigger of `tasks` fires only where its body acts. It fired at every finish
    // (a change of state), calling its PL/pgSQL function, which looked for dependants and
    // links in `deps` (two statements) for nothing in the common case of a task without
    // either: per task, a function call and two index probes on the server. A task now knows
    // that it has dependants (`dependants`, set by the database when a link to it is
    // written, whoever writes it) and that it has parents (`after_ids`, as before), and the
    // trigger's condition is that of its actions: settle dependants or links, or wake the
    // daemons (the body's own tests, unchanged).
    r#"
    ALTER TABLE tasks ADD COLUMN dependants boolean NOT NULL DEFAULT false;
    UPDATE tasks SET dependants = true WHERE seq IN (SELECT parent FROM deps);
    CREATE FUNCTION deps_linked() RETURNS trigger LANGUAGE plpgsql
        SET search_path = @S@, pg_catalog AS $$
    BEGIN
        UPDATE tasks SET dependants = true
         WHERE seq IN (SELECT parent FROM new_deps) AND NOT dependants;
        RETURN NULL;
    END $$;
    CREATE TRIGGER deps_linked AFTER INSERT ON deps REFERENCING NEW TABLE AS new_deps
        FOR EACH STATEMENT EXECUTE FUNCTION deps_linked();
    DROP TRIGGER tasks_changed ON tasks;
    CREATE TRIGGER tasks_changed AFTER UPDATE ON tasks FOR EACH ROW
        WHEN ((OLD.state IS DISTINCT FROM NEW.state AND (NEW.dependants OR NEW.after_ids IS NOT NULL))
              OR (NEW.state = 'queued' AND NEW.lease_node IS NULL AND NEW.parked = 0
                  AND OLD.state NOT IN ('scheduled', 'retrying')
                  AND (OLD.state <> 'queued' OR OLD.lease_node IS NOT NULL OR OLD.parked <> 0))
              OR (NEW.state IN ('scheduled', 'retrying') AND NEW.blocked = 0
                  AND (OLD.state IS DISTINCT FROM NEW.state OR OLD.blocked <> 0))
              OR (NEW.cancel_requested AND NOT OLD.cancel_requested))
        EXECUTE FUNCTION tasks_changed();
    "#,
];

/// The newest schema version this taskd knows.
pub(super) fn newest() -> i64 {
    MIGRATIONS.len() as i64
}

/// The schema's version in the database (0: none yet).
pub(super) async fn version(client: &Client, schema: &str) -> Result<i64> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{schema}.schema_version")],
        )
        .await
        .map_err(pg)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i64> = client
        .query_one(
            &format!("SELECT max(version) FROM {schema}.schema_version"),
            &[],
        )
        .await
        .map_err(pg)?
        .get(0);
    Ok(v.unwrap_or(0))
}

/// A database whose schema is newer than this taskd: refused, saying what to do.
pub(super) fn too_new(found: i64, schema: &str, addr: &str) -> BrokerError {
    BrokerError::Storage(format!(
        "the PostgreSQL schema `{schema}` at {addr} has version {found}, newer than this taskd understands ({}): another taskd was upgraded and migrated it; upgrade this taskd too",
        newest()
    ))
}

/// Bring `schema` up to the newest version, one transaction per step; returns the versions
/// (before, after). Each step takes an advisory lock and checks the version again, so
/// daemons starting at once apply it once.
pub(super) async fn migrate(client: &mut Client, schema: &str, addr: &str) -> Result<(i64, i64)> {
    let before = version(client, schema).await?;
    if before > newest() {
        return Err(too_new(before, schema, addr));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let v = i as i64 + 1;
        if before >= v {
            continue;
        }
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('taskd migrate ' || $1, 0))",
            &[&schema],
        )
        .await
        .map_err(pg)?;
        // `IF NOT EXISTS` answers a NOTICE for what exists (every step after the first):
        // noise in the daemon's log, where it read "... already exists" at every start.
        tx.batch_execute(&format!(
            "SET LOCAL client_min_messages = warning;
             CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.schema_version (version bigint PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
             SET LOCAL search_path = {schema}, pg_catalog;"
        ))
        .await
        .map_err(pg)?;
        let current: Option<i64> = tx
            .query_one("SELECT max(version) FROM schema_version", &[])
            .await
            .map_err(pg)?
            .get(0);
        if current.unwrap_or(0) >= v {
            tx.commit().await.map_err(pg)?;
            continue;
        }
        tx.batch_execute(&sql.replace("@S@", schema).replace("@C@", schema))
            .await
            .map_err(|e| {
                BrokerError::Storage(format!(
                    "migration {v} of schema `{schema}` failed: {}",
                    super::conn::text(&e)
                ))
            })?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&v])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
    }
    let after = version(client, schema).await?;
    if after > newest() {
        return Err(too_new(after, schema, addr));
    }
    Ok((before, after))
}
