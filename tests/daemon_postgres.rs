//! The cases of `tests/daemon.rs` (in `tests/daemon/cases.rs`) on the PostgreSQL broker:
//! one private PostgreSQL for this binary (tests/common/postgres.rs), a database of its own
//! for every test (so that parallel tests never see each other's queues), and a short
//! lease.
//!
//! Where PostgreSQL is not installed each test prints a skip message and passes, except
//! under `CI=true`, where it fails. Every case applies: none tests something only another
//! store has (the state directory's lock and the store line of `taskd status` hold on every
//! backend, each in its own words).

// The PostgreSQL broker exists only in builds with the `postgres` feature (the default).
#![cfg(feature = "postgres")]

mod common;
#[path = "common/postgres.rs"]
mod pg_server;
#[path = "common/redis.rs"]
mod redis_server;

#[path = "daemon/cases.rs"]
mod cases;

const BACKEND: cases::Backend = cases::Backend::Postgres;
