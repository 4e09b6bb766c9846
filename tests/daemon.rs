//! Integration tests for `taskd start` with real processes: dispatch, timeouts, retries,
//! output, signals, control, crash recovery and the state-directory lock (as README.md and
//! docs/config.md describe them), on the embedded SQLite store. The cases are in `tests/daemon/cases.rs`;
//! `tests/daemon_redis.rs` and `tests/daemon_postgres.rs` run the same cases on Redis and
//! PostgreSQL.
//!
//! Every test has its own temp directory, config and daemon. Nothing sleeps a fixed time to
//! wait for an outcome: everything polls with a deadline. Timing assertions measure the
//! elapsed time directly and are loose enough for a loaded 2-core machine in a debug build.

mod common;
#[path = "common/postgres.rs"]
mod pg_server;
#[path = "common/redis.rs"]
mod redis_server;

#[path = "daemon/cases.rs"]
mod cases;

const BACKEND: cases::Backend = cases::Backend::Sqlite;
