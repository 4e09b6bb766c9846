//! The command line: one file per group of subcommands.
//!
//! Commands are clients of the broker (the system of record): `submit` writes straight into
//! it, so it works while no daemon runs. They see `model`, `config` and the broker trait,
//! never supervisor internals. Errors carry their exit code (see [`exit`]).

mod audit;
mod check;
mod control;
mod generate;
mod inspect;
mod logs;
mod migrate;
mod prune;
mod reload;
mod result;
mod schedules;
pub(crate) mod start;
pub(crate) mod submit;
mod unix_http;
mod visible;
mod why;

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::broker::{Broker, BrokerError};
use crate::config::{Config, ConfigError};
use crate::exit::{self, Failure};

const AFTER_HELP: &str = "\
Config file: -c FILE, else $TASKD_CONFIG, else ./taskd.toml, else /etc/taskd/taskd.toml.

Exit codes:
  0   ok
  1   failure
  2   usage error (bad flags, bad payload, unknown queue)
  3   broker unreachable
  4   the task that --wait, `logs --follow` or `result` followed failed or was cancelled
  78  invalid config (EX_CONFIG)";

/// taskd: a job-queue daemon that runs your scripts and programs as background tasks.
#[derive(Parser, Debug)]
#[command(name = "taskd", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// The config file.
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        value_name = "FILE",
        env = "TASKD_CONFIG"
    )]
    pub(crate) config: Option<PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run the daemon in the foreground until SIGTERM/SIGINT.
    Start(start::StartArgs),
    /// Validate the config file and print its queues; exit 78 when it is invalid.
    Check(check::CheckArgs),
    /// Enqueue a task (or a batch) straight into the broker and print its id.
    Submit(submit::SubmitArgs),
    /// Queues with their counts by state, paused flags, the daemon, the store's size (SQLite:
    /// the file with its WAL; Redis: the server's used_memory; PostgreSQL: the schema's
    /// tables with their indexes), and every long-lived worker
    /// (queue, pid, state, uptime, tasks done, last exit and why).
    Status(inspect::StatusArgs),
    /// List tasks, newest first.
    Tasks(inspect::TasksArgs),
    /// One task with all its attempts and output tails.
    Show(inspect::ShowArgs),
    /// Why a task is not running: every reason, one line each, with the numbers (its run-at
    /// time, parents still waiting, a paused queue, full slots and the oldest running task,
    /// its key's limit and the tasks holding it, the rate limit's next start, no daemon
    /// serving its queue, FATAL workers, the node holding it). For a running or finished
    /// task it says so. Exits 2 for a malformed id, 1 for an unknown one.
    Why(why::WhyArgs),
    /// Print what a task returned: its result alone, as compact JSON on one line (nothing
    /// when it succeeded without one). Exits 0 when the task succeeded; 4 when it failed or
    /// was cancelled (its error on stderr); 1 when it has not finished (without --wait, or
    /// past --timeout); 2 for an unknown id.
    Result(result::ResultArgs),
    /// A task's output: the stored output of its latest attempt (or --attempt N), or, with
    /// --follow, its output as it is written, through retries, until the task ends. The
    /// task's stdout goes to stdout and its stderr to stderr; taskd's own lines ("── attempt
    /// 2 … ──") go to stderr. Exits 2 for an unknown id; with --follow, 0 once the task
    /// succeeded and 4 if it failed or was cancelled.
    ///
    /// Live output comes from the daemon running the task, over its control socket (or its
    /// API with --server). A finished attempt's stored tails need no daemon. Without access
    /// to a daemon, or for a task running on another node (Redis), --follow shows each
    /// attempt's stored tails when it ends, and says so. A follower that falls behind what
    /// the daemon keeps (the last 256 KiB of a running attempt) sees "[… N bytes skipped]";
    /// the task itself is never slowed down.
    Logs(logs::LogsArgs),
    /// Follow the output of a queue's tasks as they run on the daemon, each line prefixed
    /// with its task's short id (the last 8 hex digits), until Ctrl-C.
    ///
    /// Tasks already running are shown from now on, new ones from their start; taskd's own
    /// lines (a task's start and end) go to stderr. Needs the daemon: its control socket,
    /// or its API with --server.
    Tail(logs::TailArgs),
    /// Re-queue a failed or cancelled task with a fresh attempt budget (recorded in the
    /// audit trail, as every change is: see `taskd audit`).
    Retry(control::IdArgs),
    /// Cancel a waiting task, or stop a running one (recorded in the audit trail).
    Cancel(control::IdArgs),
    /// Stop claiming tasks from a queue (persists across restarts; recorded in the audit
    /// trail).
    Pause(control::QueueArgs),
    /// Start claiming tasks from a paused queue again (recorded in the audit trail).
    Resume(control::QueueArgs),
    /// Ask the running daemon (found through the state directory of -c FILE) to re-read the
    /// config file it was started with; print what changed per queue. Exits 78, and the
    /// daemon keeps its config, when the file is invalid. SIGHUP does the same, silently.
    Reload(reload::ReloadArgs),
    /// Restart a `worker` queue's long-lived workers one at a time, so that they run new
    /// code: each finishes its current task first (bounded by its timeout and kill_grace),
    /// and the next stops only once the previous replacement is RUNNING. Exits 2 for an
    /// unknown queue or one that runs `command`/`shell`.
    Restart(reload::RestartArgs),
    /// The config's schedules: spec, time zone, next fire time (local and UTC), the last
    /// slot and its task's state, counts of fired, caught-up and skipped slots, and whether
    /// each is enabled or paused. `show NAME` lists a schedule's slot records, `fire NAME`
    /// enqueues its task now, `pause NAME` / `resume NAME` stop and restart its firing. An
    /// unknown NAME exits 2 and lists the known ones.
    Schedules(schedules::SchedulesArgs),
    /// The audit trail: who cancelled, retried, paused, resumed, restarted or reloaded
    /// what, and when (from the CLI: the Unix user; the control socket: the peer's uid; the
    /// HTTP API: the token's name), with the outcome; also the daemon's starts and stops.
    /// The newest N records, newest last (--reverse: newest first).
    Audit(audit::AuditArgs),
    /// Delete now the finished tasks past their queue's keep_succeeded, keep_failed or
    /// keep_cancelled (with their attempts, output tails and results; the audit trail is
    /// kept), as the daemon does every few seconds, and print how many per queue and
    /// state; also the slot records of schedules older than their queue's longest keep
    /// time (the newest of each schedule stays). Works without the daemon, straight
    /// against the store; recorded in the audit trail. --dry-run only counts the tasks and
    /// deletes nothing. Queues not in the config are left alone.
    Prune(prune::PruneArgs),
    /// Bring the store's schema up to this taskd's version and say what was applied (a
    /// deploy step before restarting the daemons; `taskd start` also does it). A re-run
    /// changes nothing; a schema newer than this taskd is refused, saying so. For a
    /// PostgreSQL broker it applies the versioned migrations of its schema (docs/postgres.md).
    Migrate(migrate::MigrateArgs),
    /// Write the man pages, or print shell completions (bash, zsh, fish, …).
    Generate(generate::GenerateArgs),
}

/// Run a parsed command line and return the process exit code.
pub fn run(cli: Cli) -> u8 {
    let result = match cli.command {
        Command::Start(args) => start::run(cli.config, args),
        Command::Generate(args) => generate::run(args),
        command => {
            // A CLI whose output is piped into `head` should end quietly when the pipe closes,
            // as other Unix tools do. (Only here: the daemon must survive a task that closes
            // its stdin early, so it keeps Rust's ignored SIGPIPE.)
            // (libc's `signal`: nix's is unsafe as well, and says no more.)
            // SAFETY: restoring the default disposition of one signal before any thread starts.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("taskd: failed to start the async runtime: {e}");
                    return exit::FAILURE;
                }
            };
            rt.block_on(dispatch(cli.config, command))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let code = code_for(&e);
            eprintln!("taskd: {}", render_error(&e));
            code
        }
    }
}

async fn dispatch(config: Option<PathBuf>, command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Start(_) | Command::Generate(_) => unreachable!("handled by run"),
        Command::Check(a) => check::run(config, a),
        Command::Submit(a) => submit::run(config, a).await,
        Command::Status(a) => inspect::status(config, a).await,
        Command::Tasks(a) => inspect::tasks(config, a).await,
        Command::Show(a) => inspect::show(config, a).await,
        Command::Why(a) => why::run(config, a).await,
        Command::Result(a) => result::run(config, a).await,
        Command::Logs(a) => logs::logs(config, a).await,
        Command::Tail(a) => logs::tail(config, a).await,
        Command::Retry(a) => control::retry(config, a).await,
        Command::Cancel(a) => control::cancel(config, a).await,
        Command::Pause(a) => control::pause(config, a, true).await,
        Command::Resume(a) => control::pause(config, a, false).await,
        Command::Reload(a) => reload::run(config, a).await,
        Command::Restart(a) => reload::restart(config, a).await,
        Command::Schedules(a) => schedules::run(config, a).await,
        Command::Audit(a) => audit::run(config, a).await,
        Command::Prune(a) => prune::run(config, a).await,
        Command::Migrate(a) => migrate::run(config, a).await,
    }
}

fn render_error(error: &anyhow::Error) -> String {
    // taskd's own errors already say their cause in their message (and config errors carry
    // their file:line:column per diagnostic): print the chain only for context added on top.
    let mut s = error.to_string();
    for cause in error.chain().skip(1) {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(&format!(": {c}"));
        }
    }
    s
}

/// Map an error to the exit code README.md ("Exit codes") and `--help` promise.
pub(crate) fn code_for(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.code;
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return exit::CONFIG;
        }
        if let Some(b) = cause.downcast_ref::<BrokerError>() {
            return match b {
                BrokerError::Unavailable(_) | BrokerError::Full(_) => exit::BROKER,
                BrokerError::NotFound(_) | BrokerError::Conflict(_) => exit::FAILURE,
                _ => exit::FAILURE,
            };
        }
    }
    exit::FAILURE
}

/// Find the config file: the flag (or $TASKD_CONFIG, which clap folds in), then
/// ./taskd.toml, then /etc/taskd/taskd.toml.
pub(crate) fn config_path(flag: Option<PathBuf>) -> Result<PathBuf, Failure> {
    if let Some(p) = flag {
        return Ok(p);
    }
    for candidate in ["taskd.toml", "/etc/taskd/taskd.toml"] {
        let p = PathBuf::from(candidate);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(Failure::new(
        exit::CONFIG,
        "no config file: pass -c FILE, set TASKD_CONFIG, or create ./taskd.toml or /etc/taskd/taskd.toml \
         (config/taskd.toml in the source tree is a commented example)",
    ))
}

/// Load the config for a command that must not go on with an invalid one (`check`,
/// `reload`, `start`): on errors, print every diagnostic and a closing line
/// `FILE: N errors found; CONSEQUENCE` to stderr and return `None` (the caller exits 78).
pub(crate) fn load_or_report(
    path: &std::path::Path,
    consequence: &str,
) -> anyhow::Result<Option<Config>> {
    match crate::config::load(path) {
        Ok(c) => Ok(Some(c)),
        Err(ConfigError::Invalid(diags)) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!(
                "{}: {} error{} found; {consequence}",
                path.display(),
                diags.len(),
                if diags.len() == 1 { "" } else { "s" }
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn load_config(flag: Option<PathBuf>) -> anyhow::Result<Config> {
    let path = config_path(flag)?;
    // A client (submit, status, …) may run as any user: a queue's `user` is checked by the
    // daemon, not here.
    Ok(crate::config::load_as_client(&path)?)
}

pub(crate) async fn open_broker(config: &Config) -> anyhow::Result<Arc<dyn Broker>> {
    refuse_a_vanished_store(config)?;
    Ok(crate::broker::open(&config.broker).await?)
}

/// An embedded store whose file is missing while a daemon serves it: the file (or the whole
/// state directory) was deleted under that daemon. Opening it would create a fresh store
/// that the daemon never reads, and a task stored there would never run: refuse instead.
fn refuse_a_vanished_store(config: &Config) -> Result<(), Failure> {
    let crate::config::BrokerUrl::Sqlite { path } = &config.broker else {
        return Ok(());
    };
    if path.exists() {
        return Ok(());
    }
    let Some(holder) = crate::daemon::storelock::holder(config) else {
        return Ok(());
    };
    Err(Failure::new(
        exit::BROKER,
        format!(
            "the store {} does not exist, but the taskd daemon with pid {} serves it: the file (or its state directory) was deleted under the running daemon, which no longer claims tasks. Nothing was done; restart the daemon (`systemctl restart taskd`, or stop pid {} and `taskd start`), then try again",
            path.display(),
            holder.pid,
            holder.pid
        ),
    ))
}

/// Print `value` as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A time for people: RFC 3339 in UTC, to the second.
pub(crate) fn fmt_time(ms: i64) -> String {
    crate::model::fmt_time(ms)
}

/// A duration for people: "1.2s", "3m 5s".
pub(crate) fn fmt_duration_ms(ms: i64) -> String {
    crate::model::fmt_duration_ms(ms)
}
