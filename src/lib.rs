//! taskd: a job-queue daemon that runs programs as background tasks.
//!
//! The map of the crate:
//!
//! - [`model`]: shared types (task ids, queue names, states, records). Knows nothing else.
//! - [`config`]: reads `taskd.toml` raw, then validates it into a [`config::Config`] with
//!   defaults applied; every error names the file, line, column and key.
//! - [`broker`]: the [`broker::Broker`] trait (the system of record) and its backends
//!   (SQLite, Redis, and in memory for in-process tests). Knows tasks and leases, never
//!   processes.
//! - [`executor`]: runs one attempt of one task as a process group: pipes, output tails,
//!   timeout, SIGTERM → grace → SIGKILL. Knows processes, never brokers.
//! - [`supervisor`]: owns the runtime state of a daemon: per-queue slots, claiming, retries
//!   with backoff, cancellation, draining. Glues broker records to executor runs.
//! - [`worker`]: long-lived worker processes of `worker` queues: supervision (STARTING,
//!   RUNNING, BACKOFF, FATAL), the pipe protocol, `workers.json`. Never touches the broker.
//! - [`daemon`]: the only place that wires config + broker + supervisor + api together:
//!   [`daemon::run`] is the daemon as a function (an opened broker, bound listeners, a
//!   handle to stop it), which a test can call in-process; the process set-up around it
//!   (config lookup, logging, locks, runtime, signals) is `cli::start`.
//! - [`api`]: the HTTP API, dashboard and Prometheus metrics on `listen` (axum). Sees the
//!   broker trait and the config, never supervisor internals.
//! - [`cli`]: one function per subcommand; talks to the broker, never to supervisor internals.
//! - [`submission`]: what a submitted task must be (payload, delay, run-at), for the CLI and
//!   the API alike.
//! - [`metrics`]: the Prometheus registry the supervisor and the API feed and `/metrics` shows.
//! - [`exit`]: exit codes, and the error that carries one.
//! - [`control`]: the daemon's control socket (`taskd reload`), mode 0600 in the state directory.
//! - [`notify`]: the systemd notification protocol (READY, STATUS, RELOADING, STOPPING, WATCHDOG).
//! - [`backoff`]: the doubling delays of every loop that waits and tries again.
//! - [`view`]: the JSON shapes the API and the CLI's `--json` share, defined once.
//! - [`audit`]: the audit trail's records (who changed what, how it went) and how a caller
//!   is identified; the broker keeps the trail.
//! - [`slots`]: slot arithmetic of schedules (cron, every, time zones), pure.
//! - [`scheduler`]: the daemon's schedules at run time, enqueuing each slot's task through
//!   the broker.
//! - [`follow`]: following a task's or a queue's output (`taskd logs`, `taskd tail`, the
//!   API's output streams): live from the daemon's rings, stored tails from the broker.
//! - [`why`]: why a task is not running (`taskd why`, the API, the dashboard), every
//!   reason from the broker, the config and the daemon serving the queue.

pub(crate) mod api;
pub mod audit;
pub(crate) mod backoff;
pub mod broker;
pub mod celery;
pub(crate) mod cgroupfs;
pub mod cli;
pub mod config;
pub(crate) mod control;
pub mod daemon;
pub(crate) mod executor;
pub(crate) mod exit;
pub(crate) mod follow;
pub(crate) mod metrics;
pub mod model;
pub(crate) mod notify;
pub(crate) mod scheduler;
pub(crate) mod slots;
pub(crate) mod submission;
pub(crate) mod supervisor;
pub(crate) mod view;
pub(crate) mod why;
pub(crate) mod worker;
