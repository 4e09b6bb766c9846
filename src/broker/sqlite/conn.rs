//! Connections: opening one with the settings every connection needs (read back, since a
//! mistyped PRAGMA is silently ignored), the writer's connection (WAL, the schema brought up
//! to date), the read path on a second connection, and waiting out another process's write
//! lock. It must not hold queries of the broker's operations.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode};

use super::schema::migrate;
use super::SqliteBroker;
use crate::broker::{BrokerError, Result};

/// How long one attempt to take the write lock waits before it is retried.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write keeps retrying a busy database before giving up.
const BUSY_GIVE_UP: Duration = Duration::from_secs(60);

/// A SQLite error as the broker reports it, with what to do for the ones an operator can fix.
pub(super) fn storage(e: rusqlite::Error) -> BrokerError {
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

/// The writer's connection: WAL (refused unless it took), and the schema brought up to date.
pub(super) fn open_writer(path: &Path) -> Result<Connection> {
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

/// Run `f` again while another process holds the write lock, for up to [`BUSY_GIVE_UP`].
pub(super) fn retry_busy<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
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

impl SqliteBroker {
    /// Run a read on the reader connection.
    pub(super) async fn read<T, F>(&self, f: F) -> Result<T>
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
}
