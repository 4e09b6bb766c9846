//! The cases of `tests/daemon.rs` (in `tests/daemon/cases.rs`) on the Redis broker: one
//! private `redis-server` for this binary, a database of its own for every test (so that
//! parallel tests never see each other's queues), and a short lease.
//!
//! Where `redis-server` is missing each test prints a skip message and passes, except under
//! `CI=true`, where it fails. A case that tests something only the embedded store does
//! prints why it is skipped here.

// The Redis broker exists only in builds with the `redis` feature (the default).
#![cfg(feature = "redis")]

mod common;
#[path = "common/postgres.rs"]
mod pg_server;
#[path = "common/redis.rs"]
mod redis_server;

#[path = "daemon/cases.rs"]
mod cases;

const BACKEND: cases::Backend = cases::Backend::Redis;
