//! The embedded broker: one SQLite file in WAL mode with `synchronous = FULL`.
//!
//! Writes go through one writer thread per process that batches whatever is waiting into a
//! single transaction (group commit): the daemon's claims and completions share one fsync,
//! and an `.await` never holds a transaction. Each write runs inside its own savepoint, so
//! one refused write does not undo its neighbours in the batch. Reads use a separate
//! connection (WAL lets them run beside the writer).
//!
//! Several processes may use the file at once (the daemon and any number of CLI calls):
//! `BEGIN IMMEDIATE` waits on the busy timeout and is retried, so contention is never
//! surfaced as an error. Producers wake the daemon with a datagram on a Unix socket next
//! to the database (`<db>.wake`); losing one only delays a task until the daemon's next
//! periodic check.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row};

use super::{
    Broker, BrokerError, CancelOutcome, Claimed, Enqueued, Finish, Lease, ListFilter, Orphan,
    QueueCounts, Recover, Result, Wakeups,
};
use crate::model::{
    now_ms, AttemptReason, AttemptRecord, NewTask, QueueName, TaskDetail, TaskId, TaskRecord,
    TaskState, UnixMs,
};

/// How long one attempt to take the write lock waits before it is retried.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write keeps retrying a busy database before giving up.
const BUSY_GIVE_UP: Duration = Duration::from_secs(60);
/// A commit this soon after the previous one means writes are arriving back to back.
const BUSY_WINDOW: Duration = Duration::from_millis(2);
/// How long non-urgent writes wait for company when the store is busy.
const LINGER: Duration = Duration::from_millis(3);
/// Most writes folded into one transaction.
const MAX_BATCH: usize = 512;

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
];

/// This machine's boot id (`/proc/sys/kernel/random/boot_id`), stored with every recorded pid.
fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

const TASK_COLS: &str = "id, queue, state, payload, args, priority, unique_key, run_at, attempts, \
     created_at, updated_at, finished_at, last_error, cancel_requested, lease_node, lease_token";

type Deliver = Box<dyn FnOnce(Option<&BrokerError>) + Send>;
type Work = Box<dyn FnOnce(&Connection) -> Deliver + Send>;

/// One write for the writer thread.
struct Job {
    work: Work,
    /// Someone is waiting on this write to go on (an enqueue, a claim). A write that is only
    /// bookkeeping (an attempt's result) may wait a little for company instead.
    urgent: bool,
    /// The wake-up datagram to send once this write is committed. The writer sends each
    /// kind once per commit, so a burst of enqueues costs one datagram, not one each.
    wake: Option<&'static [u8]>,
}

/// The SQLite backend. Cheap to share behind an `Arc`.
pub struct SqliteBroker {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    /// Opened on the first read: a producer that only enqueues never needs it.
    reader: Arc<Mutex<Option<Connection>>>,
    wake_path: PathBuf,
    wake_tx: Mutex<Option<UnixDatagram>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Why this process may only read the store (`None`: it may write).
    read_only: Option<String>,
}

impl Drop for SqliteBroker {
    /// Close the database cleanly: the writer thread ends when its channel closes and drops
    /// its connection. A last connection that closes checkpoints the WAL and removes it; one
    /// that is never closed (a process that just exits) leaves the WAL for the next opener to
    /// read through in full, which makes every later `taskd submit` slower.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Ok(mut r) = self.reader.lock() {
            r.take();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn storage(e: rusqlite::Error) -> BrokerError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => BrokerError::Storage(
            "the disk is full: free space on the state directory's filesystem".into(),
        ),
        Some(ErrorCode::ReadOnly) => BrokerError::Storage(
            "the database is read-only: check the permissions of the state directory".into(),
        ),
        Some(ErrorCode::CannotOpen) | Some(ErrorCode::PermissionDenied) => {
            BrokerError::Unavailable(format!("cannot open the database: {e}"))
        }
        _ => BrokerError::Storage(e.to_string()),
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked)
    )
}

/// Open a connection with the settings every connection needs.
fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| BrokerError::Unavailable(format!("failed to open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(storage)?;
    // FULL: a commit is on disk when it returns; with WAL this costs one fsync per commit,
    // and group commit shares it. A typo'd PRAGMA is silently ignored, so read it back.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(storage)?;
    let sync: i64 = conn
        .pragma_query_value(None, "synchronous", |r| r.get(0))
        .map_err(storage)?;
    if sync != 2 {
        return Err(BrokerError::Storage(format!(
            "SQLite refused synchronous=FULL (it reports {sync}); refusing to run without durable commits"
        )));
    }
    Ok(conn)
}

fn open_writer(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            BrokerError::Unavailable(format!(
                "failed to create the state directory {}: {e}",
                dir.display()
            ))
        })?;
    }
    let conn = connect(path)?;
    let mode: String = retry_busy(|| conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)))
        .map_err(storage)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(BrokerError::Storage(format!(
            "SQLite refused journal_mode=WAL for {} (it reports `{mode}`); is the file on a network filesystem?",
            path.display()
        )));
    }
    // After a checkpoint, cut the WAL back to this size: a big batch must not leave a big
    // file behind.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
        .map_err(storage)?;
    persist_wal(&conn);
    migrate(&conn)?;
    Ok(conn)
}

/// Keep the WAL file when the last connection closes (SQLITE_FCNTL_PERSIST_WAL): creating it
/// again costs a directory fsync on the next write.
fn persist_wal(conn: &Connection) {
    let mut on: std::os::raw::c_int = 1;
    // SAFETY: a file-control call on the open main database of a live connection, with a
    // pointer to an int as SQLITE_FCNTL_PERSIST_WAL expects; the handle outlives the call.
    unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            (&mut on as *mut std::os::raw::c_int).cast(),
        );
    }
}

fn retry_busy<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Err(e) if is_busy(&e) && start.elapsed() < BUSY_GIVE_UP => {
                std::thread::sleep(Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

/// Bring the schema up to the newest version, one transaction per step.
fn migrate(conn: &Connection) -> Result<()> {
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

/// The writer thread: take one job, fold in whatever else is waiting, commit once.
///
/// Urgent writes (enqueues, claims) commit at once with whatever else is waiting. A batch of
/// only non-urgent writes (attempt results) waits up to [`LINGER`] for more when writes are
/// arriving back to back, so that under load several results share one fsync; an urgent
/// write arriving meanwhile ends the wait.
fn writer_loop(conn: Connection, jobs: mpsc::Receiver<Job>, wake_path: PathBuf) {
    let mut last_commit = Instant::now() - BUSY_WINDOW;
    let waker = UnixDatagram::unbound().ok();
    if let Some(w) = &waker {
        let _ = w.set_nonblocking(true);
    }
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        let mut urgent = batch[0].urgent;
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => {
                    urgent |= j.urgent;
                    batch.push(j);
                }
                Err(_) => break,
            }
        }
        if !urgent && last_commit.elapsed() < BUSY_WINDOW {
            // Parked, not blocked on the channel: a sender of a non-urgent write then does not
            // wake this thread (no futex call, no context switch per result); an urgent one
            // unparks it (see `send`).
            let until = Instant::now() + LINGER;
            'linger: while batch.len() < MAX_BATCH {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
                while batch.len() < MAX_BATCH {
                    match jobs.try_recv() {
                        Ok(j) => {
                            let u = j.urgent;
                            batch.push(j);
                            if u {
                                break 'linger;
                            }
                        }
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => break 'linger,
                    }
                }
            }
        }
        if let Err(e) = retry_busy(|| conn.execute_batch("BEGIN IMMEDIATE")) {
            // A job must not run outside a transaction: dropping it unrun tells its caller
            // that the write did not happen.
            tracing::error!(error = %storage(e), "failed to begin a write transaction");
            drop(batch);
            continue;
        }
        let mut delivers: Vec<Deliver> = Vec::with_capacity(batch.len());
        let mut wakes: Vec<&'static [u8]> = Vec::new();
        for job in batch {
            if let Some(w) = job.wake {
                if !wakes.contains(&w) {
                    wakes.push(w);
                }
            }
            if let Err(e) = conn.execute_batch("SAVEPOINT job") {
                tracing::error!(error = %e, "failed to open a savepoint");
            }
            delivers.push((job.work)(&conn));
        }
        let commit = conn.execute_batch("COMMIT").map_err(storage);
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        last_commit = Instant::now();
        if commit.is_ok() {
            if let Some(w) = &waker {
                for kind in wakes {
                    let _ = w.send_to(kind, &wake_path);
                }
            }
        }
        let err = commit.err();
        for d in delivers {
            d(err.as_ref());
        }
    }
}

impl SqliteBroker {
    /// Open (creating when missing) the database at `path` and start its writer thread.
    pub async fn open(path: &Path) -> Result<Self> {
        // Opened on this thread: it is a one-off at start-up, and a short-lived CLI call
        // should not pay for starting a blocking thread pool.
        // A store this process may not use fails with SQLite's "unable to open database
        // file"; say which file and what to do instead.
        let writer = open_writer(path)
            .map_err(|e| super::access::problem(path).map_or(e, BrokerError::Unavailable))?;
        // SQLite opens a file it may only read read-only, silently: reads work, and every
        // write would fail. Refuse writes up front with the reason.
        let read_only = writer
            .is_readonly(rusqlite::DatabaseName::Main)
            .unwrap_or(false)
            .then(|| {
                super::access::problem(path)
                    .unwrap_or_else(|| format!("{} is read-only to this process", path.display()))
            });
        let (tx, rx) = mpsc::channel::<Job>();
        let mut wake = path.as_os_str().to_owned();
        wake.push(".wake");
        let wake_path = PathBuf::from(wake);
        let writer_wake = wake_path.clone();
        let writer = std::thread::Builder::new()
            .name("taskd-sqlite-writer".into())
            .spawn(move || writer_loop(writer, rx, writer_wake))
            .map_err(|e| BrokerError::Storage(format!("failed to start the writer thread: {e}")))?;
        Ok(SqliteBroker {
            path: path.to_path_buf(),
            jobs: tx,
            reader: Arc::new(Mutex::new(None)),
            wake_path,
            wake_tx: Mutex::new(None),
            writer: Some(writer),
            read_only,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` in the next write transaction, inside its own savepoint.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.write_as(true, f).await
    }

    /// Like [`Self::write`]; a non-`urgent` write may wait a little to share a commit.
    async fn write_as<T, F>(&self, urgent: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.send(urgent, None, f).await
    }

    /// Queue a write for the writer thread; `wake` is sent once it is committed.
    async fn send<T, F>(&self, urgent: bool, wake: Option<&'static [u8]>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        if let Some(why) = &self.read_only {
            return Err(BrokerError::Unavailable(why.clone()));
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T>>();
        let work: Work = Box::new(move |conn: &Connection| {
            let r = f(conn);
            let end = if r.is_ok() {
                "RELEASE job"
            } else {
                "ROLLBACK TO job; RELEASE job"
            };
            if let Err(e) = conn.execute_batch(end) {
                tracing::error!(error = %e, "failed to close a savepoint");
            }
            Box::new(move |commit: Option<&BrokerError>| {
                let r = match commit {
                    Some(e) => Err(e.clone()),
                    None => r,
                };
                let _ = tx.send(r);
            })
        });
        self.jobs
            .send(Job { work, urgent, wake })
            .map_err(|_| BrokerError::Storage("the database writer thread stopped".into()))?;
        if urgent {
            // Ends a linger at once (a no-op unless the writer is parked in one).
            if let Some(w) = &self.writer {
                w.thread().unpark();
            }
        }
        rx.await.map_err(|_| {
            BrokerError::Storage(
                "the write was dropped: the database could not begin a transaction".into(),
            )
        })?
    }

    /// Run a read on the reader connection.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let reader = self.reader.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = reader
                .lock()
                .map_err(|_| BrokerError::Storage("reader poisoned".into()))?;
            if guard.is_none() {
                *guard = Some(connect(&path)?);
            }
            let conn = guard.as_ref().expect("opened just above");
            f(conn)
        })
        .await
        .map_err(|e| BrokerError::Storage(format!("a read panicked: {e}")))?
    }

    async fn claim_as(
        &self,
        urgent: bool,
        node: &str,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let node = node.to_string();
        let queue = queue.clone();
        let lease_ms = lease.as_millis() as i64;
        self.write_as(urgent, move |conn| {
            let now = now_ms();
            let paused: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM paused_queues WHERE queue = ?1)")
                .and_then(|mut s| s.query_row([queue.as_str()], |r| r.get(0)))
                .map_err(storage)?;
            if paused {
                return Ok(Vec::new());
            }
            conn.prepare_cached(
                "UPDATE tasks SET state = 'queued', updated_at = ?2
                 WHERE state IN ('scheduled', 'retrying') AND run_at <= ?2 AND queue = ?1",
            )
            .and_then(|mut s| s.execute(params![queue.as_str(), now]))
            .map_err(storage)?;
            let mut stmt = conn
                .prepare_cached(&format!(
                    "UPDATE tasks SET lease_node = ?1, lease_token = lease_token + 1, lease_expires = ?2,
                        updated_at = ?3, pid = NULL, pid_start = NULL
                     WHERE seq IN (SELECT seq FROM tasks WHERE queue = ?4 AND state = 'queued' AND lease_node IS NULL
                                   ORDER BY priority DESC, seq LIMIT ?5)
                     RETURNING {TASK_COLS}, seq"
                ))
                .map_err(storage)?;
            let mut rows: Vec<(i64, Claimed)> = stmt
                .query_map(params![node, now + lease_ms, now, queue.as_str(), max as i64], |r| {
                    let task = row_to_task(r)?;
                    let token: i64 = r.get(15)?;
                    let seq: i64 = r.get(16)?;
                    Ok((
                        seq,
                        Claimed {
                            lease: Lease {
                                task: task.id,
                                token,
                                node: node.clone(),
                            },
                            attempt: task.attempts + 1,
                            task,
                        },
                    ))
                })
                .and_then(|it| it.collect())
                .map_err(storage)?;
            rows.sort_by_key(|(seq, c)| (-c.task.priority, *seq));
            Ok(rows.into_iter().map(|(_, c)| c).collect())
        })
        .await
    }

    /// Tell a daemon listening on this database that something changed. Best effort.
    fn wake(&self, what: &[u8]) {
        let mut guard = match self.wake_tx.lock() {
            Ok(g) => g,
            Err(_) => return,
        };
        if guard.is_none() {
            *guard = UnixDatagram::unbound().ok();
            if let Some(s) = guard.as_ref() {
                let _ = s.set_nonblocking(true);
            }
        }
        if let Some(s) = guard.as_ref() {
            let _ = s.send_to(what, &self.wake_path);
        }
    }
}

fn row_to_task(r: &Row<'_>) -> rusqlite::Result<TaskRecord> {
    let id: String = r.get(0)?;
    let queue: String = r.get(1)?;
    let state: String = r.get(2)?;
    let payload: String = r.get(3)?;
    let args: String = r.get(4)?;
    let conv = |what: &str, e: String| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("{what}: {e}").into(),
        )
    };
    Ok(TaskRecord {
        id: id.parse().map_err(|e| conv("id", e))?,
        queue: queue.parse().map_err(|e| conv("queue", e))?,
        state: state.parse().map_err(|e| conv("state", e))?,
        payload: serde_json::from_str(&payload).map_err(|e| conv("payload", e.to_string()))?,
        args: serde_json::from_str(&args).map_err(|e| conv("args", e.to_string()))?,
        priority: r.get(5)?,
        unique_key: r.get(6)?,
        run_at: r.get(7)?,
        attempts: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        finished_at: r.get(11)?,
        last_error: r.get(12)?,
        cancel_requested: r.get::<_, i64>(13)? != 0,
        node: r.get(14)?,
    })
}

const ACTIVE: &str = "('scheduled', 'queued', 'running', 'retrying')";

fn insert_task(conn: &Connection, t: &NewTask, now: UnixMs) -> Result<Enqueued> {
    if let Some(key) = &t.unique_key {
        let existing: Option<(String, String, i64, i64)> = conn
            .prepare_cached(&format!(
                "SELECT id, state, created_at, run_at FROM tasks
                 WHERE queue = ?1 AND unique_key = ?2 AND state IN {ACTIVE}"
            ))
            .and_then(|mut s| {
                s.query_row(params![t.queue.as_str(), key], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()
            })
            .map_err(storage)?;
        if let Some((id, state, created_at, run_at)) = existing {
            return Ok(Enqueued {
                id: id.parse().map_err(BrokerError::Storage)?,
                state: state.parse().map_err(BrokerError::Storage)?,
                existing: true,
                created_at,
                run_at,
            });
        }
    }
    let run_at = t.run_at.unwrap_or(now);
    let state = if run_at > now {
        TaskState::Scheduled
    } else {
        TaskState::Queued
    };
    let args = serde_json::to_string(&t.args).map_err(|e| BrokerError::Storage(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO tasks (id, queue, state, payload, args, priority, unique_key, run_at, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
    )
    .and_then(|mut s| {
        s.execute(params![
            t.id.to_string(),
            t.queue.as_str(),
            state.as_str(),
            t.payload,
            args,
            t.priority,
            t.unique_key,
            run_at,
            now
        ])
    })
    .map_err(|e| match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => {
            BrokerError::Conflict(format!("a task with id {} already exists", t.id))
        }
        _ => storage(e),
    })?;
    Ok(Enqueued {
        id: t.id,
        state,
        existing: false,
        created_at: now,
        run_at,
    })
}

fn task_seq(conn: &Connection, id: TaskId) -> Result<(i64, TaskState)> {
    let row: Option<(i64, String)> = conn
        .prepare_cached("SELECT seq, state FROM tasks WHERE id = ?1")
        .and_then(|mut s| {
            s.query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(storage)?;
    let (seq, state) = row.ok_or(BrokerError::NotFound(id))?;
    Ok((seq, state.parse().map_err(BrokerError::Storage)?))
}

fn insert_attempt(conn: &Connection, seq: i64, a: &AttemptRecord) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO attempts (task_seq, n, number, node, pid, started_at, ended_at, exit_code, signal,
                               reason, error, stdout_tail, stderr_tail)
         VALUES (?1, (SELECT coalesce(max(n), 0) + 1 FROM attempts WHERE task_seq = ?1),
                 ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )
    .and_then(|mut s| {
        s.execute(params![
            seq,
            a.number,
            a.node,
            a.pid,
            a.started_at,
            a.ended_at,
            a.exit_code,
            a.signal,
            a.reason.map(|r| r.as_str()),
            a.error,
            a.stdout_tail,
            a.stderr_tail
        ])
    })
    .map_err(storage)?;
    Ok(())
}

/// Mark a held task running (counting its attempt once) and/or record its pid.
fn mark_running(conn: &Connection, lease: &Lease, pid: Option<(i32, u64)>) -> Result<()> {
    let now = now_ms();
    let (pid, pid_start) = match pid {
        Some((p, s)) => (Some(p), Some(s as i64)),
        None => (None, None),
    };
    let n = conn
        .prepare_cached(
            "UPDATE tasks SET attempts = attempts + (state = 'queued'), state = 'running',
                started_at = CASE WHEN state = 'queued' THEN ?5 ELSE started_at END,
                updated_at = ?5, pid = coalesce(?1, pid), pid_start = coalesce(?2, pid_start),
                pid_boot = CASE WHEN ?1 IS NULL THEN pid_boot ELSE ?7 END
             WHERE id = ?3 AND lease_token = ?4 AND lease_node = ?6 AND state IN ('queued', 'running')",
        )
        .and_then(|mut s| {
            s.execute(params![pid, pid_start, lease.task.to_string(), lease.token, now, lease.node, boot_id()])
        })
        .map_err(storage)?;
    if n == 0 {
        return Err(BrokerError::LeaseLost(lease.task));
    }
    Ok(())
}

#[async_trait]
impl Broker for SqliteBroker {
    async fn enqueue(&self, tasks: Vec<NewTask>) -> Result<Vec<Enqueued>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        // A task that waits for its time moves the daemon's timer; a ready one only needs
        // its queue looked at. The writer sends the wake-up after the commit.
        let now = now_ms();
        let later = tasks.iter().any(|t| t.run_at.is_some_and(|r| r > now));
        let kind: &'static [u8] = if later { b"sched" } else { b"work" };
        let out: Vec<Enqueued> = self
            .send(true, Some(kind), move |conn| {
                let now = now_ms();
                tasks.iter().map(|t| insert_task(conn, t, now)).collect()
            })
            .await?;
        Ok(out)
    }

    async fn claim(
        &self,
        node: &str,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        self.claim_as(true, node, queue, max, lease).await
    }

    async fn claim_ahead(
        &self,
        node: &str,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        self.claim_as(false, node, queue, max, lease).await
    }

    async fn started(&self, lease: &Lease, pid: i32, pid_start: u64) -> Result<()> {
        let lease = lease.clone();
        // The process already runs; nobody waits on this record, so it may share a commit.
        self.write_as(false, move |conn| {
            mark_running(conn, &lease, Some((pid, pid_start)))
        })
        .await
    }

    async fn renew(&self, leases: &[Lease], lease: Duration) -> Result<Vec<TaskId>> {
        let leases = leases.to_vec();
        let lease_ms = lease.as_millis() as i64;
        self.write(move |conn| {
            let until = now_ms() + lease_ms;
            let mut lost = Vec::new();
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE tasks SET lease_expires = ?1
                     WHERE id = ?2 AND lease_token = ?3 AND lease_node = ?4 AND state IN ('queued', 'running')",
                )
                .map_err(storage)?;
            for l in &leases {
                let n = stmt
                    .execute(params![until, l.task.to_string(), l.token, l.node])
                    .map_err(storage)?;
                if n == 0 {
                    lost.push(l.task);
                }
            }
            Ok(lost)
        })
        .await
    }

    async fn finish(&self, lease: &Lease, attempt: AttemptRecord, next: Finish) -> Result<()> {
        let lease = lease.clone();
        // Nobody waits on a result to go on: it may share a commit with its neighbours.
        let requeued = self
            .write_as(false, move |conn| {
                let now = now_ms();
                let row: Option<(i64, bool, String)> = conn
                    .prepare_cached(
                        "SELECT seq, cancel_requested, state FROM tasks
                         WHERE id = ?1 AND lease_token = ?2 AND lease_node = ?3 AND state IN ('queued', 'running')",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![lease.task.to_string(), lease.token, lease.node], |r| {
                            Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?))
                        })
                        .optional()
                    })
                    .map_err(storage)?;
                let (seq, cancel_requested, state) = row.ok_or(BrokerError::LeaseLost(lease.task))?;
                // `started` counts the attempt when it is recorded; a task finished before that
                // record (it never started, or the record is still on its way) is counted here.
                let counted = state == "running";
                if next != Finish::Release {
                    insert_attempt(conn, seq, &attempt)?;
                }
                // An operator's cancel that arrived while the task ran outweighs a retry or
                // a requeue: it must not silently run again.
                let next = match next {
                    Finish::Retry { .. } | Finish::Requeue | Finish::Release if cancel_requested => Finish::Cancelled,
                    n => n,
                };
                // Not charged: a run put back, or a cancel of a task that never started.
                let charged = match next {
                    Finish::Requeue | Finish::Release => false,
                    Finish::Cancelled => attempt.pid.is_some(),
                    _ => true,
                };
                // The change to `attempts`: +1 for a charged attempt `started` did not count,
                // -1 for an uncharged one it did.
                let delta: i64 = match (charged, counted) {
                    (true, false) => 1,
                    (false, true) => -1,
                    _ => 0,
                };
                let (state, run_at, finished) = match next {
                    Finish::Succeeded => (TaskState::Succeeded, None, Some(now)),
                    Finish::Retry { at } => (TaskState::Retrying, Some(at), None),
                    Finish::Failed => (TaskState::Failed, None, Some(now)),
                    Finish::Cancelled => (TaskState::Cancelled, None, Some(now)),
                    Finish::Requeue | Finish::Release => (TaskState::Queued, None, None),
                };
                let error = match next {
                    Finish::Succeeded | Finish::Release => None,
                    Finish::Cancelled if cancel_requested => Some("cancelled by an operator".to_string()),
                    _ => attempt.error.clone(),
                };
                conn.prepare_cached(
                    "UPDATE tasks SET state = ?2, run_at = coalesce(?3, run_at), finished_at = ?4,
                        attempts = max(attempts + ?5, 0), last_error = CASE WHEN ?8 THEN last_error ELSE ?6 END,
                        updated_at = ?7,
                        lease_node = NULL, lease_expires = NULL, cancel_requested = 0, pid = NULL, pid_start = NULL
                     WHERE seq = ?1",
                )
                .and_then(|mut s| {
                    s.execute(params![seq, state.as_str(), run_at, finished, delta, error, now, next == Finish::Release])
                })
                .map_err(storage)?;
                Ok(matches!(next, Finish::Requeue | Finish::Release | Finish::Retry { .. }))
            })
            .await?;
        if requeued {
            self.wake(b"work");
        }
        Ok(())
    }

    async fn cancel(&self, id: TaskId) -> Result<CancelOutcome> {
        let out = self
            .write(move |conn| {
                let (seq, state) = task_seq(conn, id)?;
                let now = now_ms();
                let held: bool = conn
                    .query_row("SELECT lease_node IS NOT NULL FROM tasks WHERE seq = ?1", [seq], |r| r.get(0))
                    .map_err(storage)?;
                match state {
                    // Running, or claimed by a node that is about to start it: that node stops it.
                    TaskState::Running | TaskState::Queued if state == TaskState::Running || held => {
                        conn.execute(
                            "UPDATE tasks SET cancel_requested = 1, updated_at = ?2 WHERE seq = ?1",
                            params![seq, now],
                        )
                        .map_err(storage)?;
                        Ok(CancelOutcome::Requested)
                    }
                    s if s.is_terminal() => Ok(CancelOutcome::AlreadyFinished(s)),
                    _ => {
                        conn.execute(
                            "UPDATE tasks SET state = 'cancelled', finished_at = ?2, updated_at = ?2,
                                last_error = 'cancelled before it ran' WHERE seq = ?1",
                            params![seq, now],
                        )
                        .map_err(storage)?;
                        Ok(CancelOutcome::Cancelled)
                    }
                }
            })
            .await?;
        if out == CancelOutcome::Requested {
            self.wake(b"cancel");
        }
        Ok(out)
    }

    async fn retry(&self, id: TaskId) -> Result<()> {
        self.write(move |conn| {
            let (seq, state) = task_seq(conn, id)?;
            if !matches!(state, TaskState::Failed | TaskState::Cancelled) {
                return Err(BrokerError::Conflict(format!(
                    "task {id} is {state}; only failed or cancelled tasks can be retried"
                )));
            }
            let now = now_ms();
            conn.execute(
                "UPDATE tasks SET state = 'queued', attempts = 0, run_at = ?2, finished_at = NULL,
                    last_error = NULL, cancel_requested = 0, updated_at = ?2 WHERE seq = ?1",
                params![seq, now],
            )
            .map_err(|e| match e.sqlite_error_code() {
                Some(ErrorCode::ConstraintViolation) => BrokerError::Conflict(format!(
                    "another waiting or running task of this queue holds task {id}'s unique key"
                )),
                _ => storage(e),
            })?;
            Ok(())
        })
        .await?;
        self.wake(b"work");
        Ok(())
    }

    async fn set_paused(&self, queue: &QueueName, paused: bool) -> Result<()> {
        let queue = queue.clone();
        self.write(move |conn| {
            if paused {
                conn.execute(
                    "INSERT INTO paused_queues (queue, paused_at) VALUES (?1, ?2) ON CONFLICT (queue) DO NOTHING",
                    params![queue.as_str(), now_ms()],
                )
            } else {
                conn.execute("DELETE FROM paused_queues WHERE queue = ?1", [queue.as_str()])
            }
            .map_err(storage)?;
            Ok(())
        })
        .await?;
        self.wake(b"pause");
        Ok(())
    }

    async fn paused(&self) -> Result<BTreeSet<QueueName>> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT queue FROM paused_queues")
                .map_err(storage)?;
            let names: Vec<String> = stmt
                .query_map([], |r| r.get(0))
                .and_then(|it| it.collect())
                .map_err(storage)?;
            Ok(names.into_iter().filter_map(|n| n.parse().ok()).collect())
        })
        .await
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskDetail>> {
        self.read(move |conn| {
            let row: Option<(i64, TaskRecord)> = conn
                .prepare_cached(&format!("SELECT {TASK_COLS}, seq FROM tasks WHERE id = ?1"))
                .and_then(|mut s| {
                    s.query_row([id.to_string()], |r| Ok((r.get(16)?, row_to_task(r)?)))
                        .optional()
                })
                .map_err(storage)?;
            let Some((seq, task)) = row else {
                return Ok(None);
            };
            let mut stmt = conn
                .prepare_cached(
                    "SELECT number, node, pid, started_at, ended_at, exit_code, signal, reason, error,
                            stdout_tail, stderr_tail
                     FROM attempts WHERE task_seq = ?1 ORDER BY n",
                )
                .map_err(storage)?;
            let history = stmt
                .query_map([seq], |r| {
                    let reason: Option<String> = r.get(7)?;
                    Ok(AttemptRecord {
                        number: r.get(0)?,
                        node: r.get(1)?,
                        pid: r.get(2)?,
                        started_at: r.get(3)?,
                        ended_at: r.get(4)?,
                        exit_code: r.get(5)?,
                        signal: r.get(6)?,
                        reason: reason.and_then(|s| s.parse::<AttemptReason>().ok()),
                        error: r.get(8)?,
                        stdout_tail: r.get(9)?,
                        stderr_tail: r.get(10)?,
                    })
                })
                .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(storage)?;
            Ok(Some(TaskDetail { task, history }))
        })
        .await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>> {
        let filter = filter.clone();
        self.read(move |conn| {
            let mut sql = format!("SELECT {TASK_COLS} FROM tasks WHERE 1 = 1");
            if filter.queue.is_some() {
                sql.push_str(" AND queue = ?1");
            }
            if filter.state.is_some() {
                sql.push_str(" AND state = ?2");
            }
            sql.push_str(" ORDER BY seq DESC LIMIT ?3");
            let mut stmt = conn.prepare_cached(&sql).map_err(storage)?;
            let limit = if filter.limit == 0 {
                -1
            } else {
                filter.limit as i64
            };
            let q = filter.queue.as_ref().map(|q| q.as_str().to_string());
            let s = filter.state.map(|s| s.as_str());
            // Unused numbered parameters are fine in SQLite; bind all three every time.
            let rows = stmt
                .query_map(params![q, s, limit], row_to_task)
                .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(storage)?;
            Ok(rows)
        })
        .await
    }

    async fn counts(&self) -> Result<Vec<QueueCounts>> {
        self.read(|conn| {
            let mut by_queue: BTreeMap<String, QueueCounts> = BTreeMap::new();
            let mut stmt = conn
                .prepare_cached("SELECT queue, state, count(*) FROM tasks GROUP BY state, queue")
                .map_err(storage)?;
            let rows: Vec<(String, String, i64)> = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .and_then(|it| it.collect())
                .map_err(storage)?;
            for (q, s, n) in rows {
                let entry = by_queue.entry(q.clone()).or_insert_with(|| QueueCounts {
                    queue: q.parse().ok(),
                    ..Default::default()
                });
                if let Ok(state) = s.parse::<TaskState>() {
                    entry.counts.insert(state, n as u64);
                }
            }
            let mut stmt = conn
                .prepare_cached("SELECT queue FROM paused_queues")
                .map_err(storage)?;
            let paused: Vec<String> = stmt
                .query_map([], |r| r.get(0))
                .and_then(|it| it.collect())
                .map_err(storage)?;
            for q in paused {
                by_queue
                    .entry(q.clone())
                    .or_insert_with(|| QueueCounts {
                        queue: q.parse().ok(),
                        ..Default::default()
                    })
                    .paused = true;
            }
            Ok(by_queue.into_values().collect())
        })
        .await
    }

    async fn next_due(&self) -> Result<Option<UnixMs>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT run_at FROM tasks INDEXED BY tasks_waiting WHERE state IN ('scheduled', 'retrying')
                   AND queue NOT IN (SELECT queue FROM paused_queues) ORDER BY run_at LIMIT 1",
            )
                .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
                .map_err(storage)
        })
        .await
    }

    async fn count_state(&self, state: TaskState) -> Result<u64> {
        self.read(move |conn| {
            conn.prepare_cached("SELECT count(*) FROM tasks WHERE state = ?1")
                .and_then(|mut s| s.query_row([state.as_str()], |r| r.get::<_, i64>(0)))
                .map(|n| n as u64)
                .map_err(storage)
        })
        .await
    }

    async fn cancel_requested(&self, node: &str) -> Result<Vec<TaskId>> {
        let node = node.to_string();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id FROM tasks WHERE cancel_requested = 1 AND lease_node = ?1",
                )
                .map_err(storage)?;
            let ids: Vec<String> = stmt
                .query_map([node], |r| r.get(0))
                .and_then(|it| it.collect())
                .map_err(storage)?;
            Ok(ids.into_iter().filter_map(|s| s.parse().ok()).collect())
        })
        .await
    }

    async fn adopt_started(&self, ids: &[TaskId]) -> Result<u64> {
        let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        self.write(move |conn| {
            let now = now_ms();
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE tasks SET state = 'running', attempts = attempts + 1, started_at = ?2, updated_at = ?2
                     WHERE id = ?1 AND state = 'queued' AND lease_node IS NOT NULL",
                )
                .map_err(storage)?;
            let mut n = 0;
            for id in &ids {
                n += stmt.execute(params![id, now]).map_err(storage)? as u64;
            }
            Ok(n)
        })
        .await
    }

    async fn recover(&self, scope: Recover, note: &str) -> Result<Vec<Orphan>> {
        let note = note.to_string();
        let out = self
            .write(move |conn| {
                let now = now_ms();
                let (cond, bound) = match scope {
                    Recover::All => ("lease_node IS NOT NULL", i64::MAX),
                    Recover::Expired(t) => ("lease_node IS NOT NULL AND lease_expires < ?1", t),
                };
                let sql = format!(
                    // A pid recorded on another boot (or machine) is not returned: it could
                    // name an unrelated process group now.
                    "SELECT seq, id, queue, lease_node,
                            CASE WHEN pid_boot = ?2 THEN pid END, CASE WHEN pid_boot = ?2 THEN pid_start END,
                            started_at, attempts, cancel_requested, state
                     FROM tasks WHERE {cond} AND state IN ('queued', 'running') AND ?1 = ?1"
                );
                let mut stmt = conn.prepare(&sql).map_err(storage)?;
                type R = (i64, String, String, Option<String>, Option<i32>, Option<i64>, Option<i64>, u32, bool, String);
                let rows: Vec<R> = stmt
                    .query_map(params![bound, boot_id()], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                            r.get(7)?,
                            r.get::<_, i64>(8)? != 0,
                            r.get(9)?,
                        ))
                    })
                    .and_then(|it| it.collect())
                    .map_err(storage)?;
                let mut orphans = Vec::with_capacity(rows.len());
                for (seq, id, queue, node, pid, pid_start, started_at, attempts, cancel_requested, state) in rows {
                    let started = state == "running";
                    if started {
                        // It ran: the history says it was lost, and the attempt is given back.
                        let attempt = AttemptRecord {
                            number: attempts,
                            node: node.clone().unwrap_or_default(),
                            pid,
                            started_at: started_at.unwrap_or(now),
                            ended_at: now,
                            reason: Some(AttemptReason::Lost),
                            error: Some(note.clone()),
                            ..Default::default()
                        };
                        insert_attempt(conn, seq, &attempt)?;
                    }
                    // A held task that was never recorded as started leaves no history: if its
                    // process did start, it is killed and the run did not count.
                    if cancel_requested {
                        // The operator asked to cancel it before its node went away: honour it.
                        conn.execute(
                            "UPDATE tasks SET state = 'cancelled', finished_at = ?2, updated_at = ?2,
                                last_error = 'cancelled by an operator', cancel_requested = 0,
                                attempts = max(attempts - ?3, 0),
                                lease_node = NULL, lease_expires = NULL, pid = NULL, pid_start = NULL
                             WHERE seq = ?1",
                            params![seq, now, started as i64],
                        )
                    } else {
                        conn.execute(
                            "UPDATE tasks SET state = 'queued', attempts = max(attempts - ?3, 0), updated_at = ?2,
                                lease_node = NULL, lease_expires = NULL, pid = NULL, pid_start = NULL
                             WHERE seq = ?1",
                            params![seq, now, started as i64],
                        )
                    }
                    .map_err(storage)?;
                    orphans.push(Orphan {
                        task: id.parse().map_err(BrokerError::Storage)?,
                        queue: queue.parse().map_err(BrokerError::Storage)?,
                        node,
                        pid,
                        pid_start: pid_start.map(|p| p as u64),
                    });
                }
                Ok(orphans)
            })
            .await?;
        if !out.is_empty() {
            self.wake(b"work");
        }
        Ok(out)
    }

    async fn subscribe(&self) -> Result<Wakeups> {
        let _ = std::fs::remove_file(&self.wake_path);
        let sock = tokio::net::UnixDatagram::bind(&self.wake_path).map_err(|e| {
            BrokerError::Unavailable(format!(
                "failed to bind the wake-up socket {}: {e}",
                self.wake_path.display()
            ))
        })?;
        let wakeups = Wakeups::default();
        let w = wakeups.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let mut n = match sock.recv(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "wake-up socket failed; falling back to periodic checks");
                        return;
                    }
                };
                // A burst of producers sends a burst of datagrams: take all that are waiting
                // and raise each kind of wake-up once.
                let (mut work, mut cancel, mut pause, mut sched) = (false, false, false, false);
                let mut first = true;
                loop {
                    if !first {
                        match sock.try_recv(&mut buf) {
                            Ok(m) => n = m,
                            Err(_) => break,
                        }
                    }
                    first = false;
                    match &buf[..n.min(buf.len())] {
                        b"cancel" => cancel = true,
                        b"pause" => pause = true,
                        b"sched" => sched = true,
                        _ => work = true,
                    }
                }
                if work {
                    w.work.notify_one();
                }
                if cancel {
                    w.cancel.notify_one();
                }
                if pause {
                    w.pause.notify_one();
                }
                if sched {
                    w.sched.notify_one();
                }
            }
        });
        Ok(wakeups)
    }
}
