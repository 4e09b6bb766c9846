//! taskd: a job-queue daemon that runs programs as background tasks.
//!
//! The map of the crate:
//!
//! - [`model`]: shared types (task ids, queue names, states, records). Knows nothing else.
//! - [`config`]: reads `taskd.toml` raw, then validates it into a [`config::Config`] with
//!   defaults applied; every error names the file, line, column and key.
//! - [`broker`]: the [`broker::Broker`] trait (the system of record) and its backends
//!   (SQLite and Redis). Knows tasks and leases, never processes.
//! - [`executor`]: runs one attempt of one task as a process group: pipes, output tails,
//!   timeout, SIGTERM → grace → SIGKILL. Knows processes, never brokers.
//! - [`supervisor`]: owns the runtime state of a daemon: per-queue slots, claiming, retries
//!   with backoff, cancellation, draining. Glues broker records to executor runs.
//! - [`worker`]: long-lived worker processes of `worker` queues: supervision (STARTING,
//!   RUNNING, BACKOFF, FATAL), the pipe protocol, `workers.json`. Never touches the broker.
//! - [`daemon`]: the only place that wires config + broker + supervisor + api together (`taskd start`).
//! - [`api`]: the HTTP API, dashboard and Prometheus metrics on `listen` (axum). Sees the
//!   broker trait and the config, never supervisor internals.
//! - [`cli`]: one function per subcommand; talks to the broker, never to supervisor internals.
//! - [`control`]: the daemon's control socket (`taskd reload`), mode 0600 in the state directory.
//! - [`notify`]: the systemd notification protocol (READY, STATUS, RELOADING, STOPPING, WATCHDOG).

pub mod api;
pub mod broker;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod executor;
pub mod model;
pub mod notify;
pub mod supervisor;
pub mod worker;
