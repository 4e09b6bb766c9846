//! Connections: opening one with the settings every connection needs (read back, since a
//! mistyped PRAGMA is silently ignored), the writer's connection (WAL, the schema brought up
//! to date), the read path on a second connection, and waiting out another process's write
//! lock; the modes of the store's files. It must not hold queries of the broker's operations.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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
pub(super) fn storage(error: rusqlite::Error) -> BrokerError {
    match error.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => BrokerError::Storage(
            "the disk is full: free space on the state directory's filesystem".into(),
        ),
        Some(ErrorCode::ReadOnly) => BrokerError::Storage(
            "the database is read-only: check the permissions of the state directory".into(),
        ),
        Some(ErrorCode::CannotOpen) | Some(ErrorCode::PermissionDenied) => {
            BrokerError::Unavailable(format!("cannot open the database: {error}"))
        }
        _ => BrokerError::Storage(error.to_string()),
    }
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked)
    )
}

/// Each connection's page cache, KiB (SQLite's default is 2,000). The pages the daemon keeps
/// going back to (the claim index's head, the newest rows) fit many times over, and a miss is
/// a read from the kernel's page cache; at the default the writer's and the reader's caches
/// filled to 2 MiB each on a busy queue, most of the daemon's own memory (W7 in
/// docs/performance.md).
const CACHE_KIB: i64 = 512;

/// Open a connection with the settings every connection needs.
fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| BrokerError::Unavailable(format!("failed to open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)
        .map_err(storage)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(storage)?;
    // A dependant cancelled by a trigger cancels its own dependants through the same trigger.
    conn.pragma_update(None, "recursive_triggers", "ON")
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

/// The mode of the store's files in `dir`: 0600, or 0660 when the directory is shared with
/// a group (set-group-id and group-writable, as the daemon makes `state_dir` for
/// `state_group`), so that the group's producers can enqueue.
pub(crate) fn store_file_mode(dir: &Path) -> u32 {
    match std::fs::metadata(dir) {
        Ok(m) if m.mode() & 0o2070 == 0o2070 => 0o660,
        _ => 0o600,
    }
}

/// Creates the store's directory (0700) and file with their modes whatever the umask, and
/// sets the mode of the store's files this process owns: SQLite creates a file 0644 less
/// the umask, and its `-wal` and `-shm` files with the mode of the database file. Payloads
/// and output tails must not be readable by every local user.
fn secure_store(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                BrokerError::Unavailable(format!(
                    "failed to create the state directory {}: {e}",
                    dir.display()
                ))
            })?;
    }
    let mode = store_file_mode(dir);
    if !path.exists() {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(BrokerError::Unavailable(format!(
                    "failed to create the store {}: {e}",
                    path.display()
                )))
            }
        }
    }
    let me = nix::unistd::geteuid().as_raw();
    for suffix in ["", "-wal", "-shm"] {
        let mut f = path.as_os_str().to_owned();
        f.push(suffix);
        let f = Path::new(&f);
        if let Ok(m) = std::fs::metadata(f) {
            // Another user's files (a producer's, or the daemon's seen by a producer) are
            // left to their owner.
            if m.uid() == me && m.mode() & 0o7777 != mode {
                std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode)).map_err(
                    |e| {
                        BrokerError::Unavailable(format!(
                            "failed to set the mode of {} to {mode:04o}: {e}",
                            f.display()
                        ))
                    },
                )?;
            }
        }
    }
    Ok(())
}

/// The writer's connection: WAL (refused unless it took), and the schema brought up to date.
/// An error names the file: a store that is not SQLite, or is damaged, says which one.
pub(super) fn open_writer(path: &Path) -> Result<Connection> {
    secure_store(path)?;
    open_writer_on(path).map_err(|e| match e {
        BrokerError::Storage(m) if !m.contains(&path.display().to_string()) => {
            let fix = if m.contains("not a database") || m.contains("malformed") {
                ": it is not a readable SQLite store; restore it from a backup, or move it away to start with an empty one"
            } else {
                ""
            };
            BrokerError::Storage(format!("the store {}: {m}{fix}", path.display()))
        }
        other => other,
    })
}

fn open_writer_on(path: &Path) -> Result<Connection> {
    let conn = connect(path)?;
    // A new store gives the pages of deleted tasks back to the file system a little at a
    // time (`incremental_vacuum` after each prune). It can only be chosen before the first
    // table exists; an older store keeps reusing its free pages in place.
    let tables: i64 =
        retry_busy(|| conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0)))
            .map_err(storage)?;
    if tables == 0 {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(storage)?;
    }
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

/// Run `operation` again while another process holds the write lock, for up to [`BUSY_GIVE_UP`].
pub(super) fn retry_busy<T>(
    mut operation: impl FnMut() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let start = Instant::now();
    loop {
        match operation() {
            Err(e) if is_busy(&e) && start.elapsed() < BUSY_GIVE_UP => {
                std::thread::sleep(Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

impl SqliteBroker {
    /// Run a read on the reader connection.
    pub(super) async fn read<T, F>(&self, work: F) -> Result<T>
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
            work(conn)
        })
        .await
        .map_err(|e| BrokerError::Storage(format!("a read panicked: {e}")))?
    }
}
