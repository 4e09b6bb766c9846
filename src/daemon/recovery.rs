//! At start-up: the tasks a previous daemon left behind. On the embedded store this daemon is
//! the only one (it holds the store lock): every task the store shows running or held is
//! taken back (`recover(All)`), its process group killed. On a shared broker other nodes hold
//! leases too, so nothing is taken back here; only what is left on this machine of this
//! node's own runs from before a crash is killed, and their leases expire.

use crate::broker::{Broker, LostLimits, Orphan, Recover};
use crate::config::Config;
use crate::exit::{self, Failure};
use crate::model::TaskId;
use crate::supervisor::startlog::StartLog;

/// The note a task recovered at start-up gets in its history.
const LEFT_RUNNING: &str =
    "the daemon running this task went away (crash or kill); queued again, attempt not charged";

/// Open the start log (`state_dir/started.log`) and take back what the previous daemon left:
/// the tasks it noted as starting count as started (their history then says `lost`), and
/// the result files of its runs are removed. The start log is handed on to the supervisor,
/// with how many tasks were taken back (for the audit record of the daemon's start).
pub(super) async fn recover(
    config: &Config,
    broker: &dyn Broker,
) -> anyhow::Result<(StartLog, Recovered)> {
    if let Err(e) = crate::executor::ResultDir::reset(&config.state_dir) {
        tracing::warn!(state_dir = %config.state_dir.display(), error = %e, "could not remove the result files a previous daemon left");
    }
    let results = crate::executor::ResultDir::prepare(&config.state_dir);
    tracing::debug!(dir = %results.display(), "the tasks' result files go here");
    let (start_log, noted) = StartLog::open(&config.state_dir).map_err(|e| {
        Failure::new(
            exit::FAILURE,
            format!(
                "failed to open the start log in {}: {e}",
                config.state_dir.display()
            ),
        )
    })?;
    let noted: Vec<TaskId> = noted.into_iter().collect();
    let recovered = if broker.shared() {
        kill_own_leftovers(broker, &noted).await;
        Recovered::default()
    } else {
        recover_all(broker, &noted, &LostLimits::of_config(config)).await?
    };
    Ok((start_log, recovered))
}

/// What the start took back from a previous daemon: tasks queued again (or cancelled, as an
/// operator had asked), and tasks failed for being lost more often than `max_lost`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Recovered {
    pub queued: usize,
    pub failed: usize,
}

/// The embedded store: every task left running is queued again (or failed, when it was lost
/// more often than its queue's `max_lost`), its processes killed; how many of each.
async fn recover_all(
    broker: &dyn Broker,
    noted: &[TaskId],
    limits: &LostLimits,
) -> anyhow::Result<Recovered> {
    if !noted.is_empty() {
        broker.adopt_started(noted).await?;
    }
    let orphans = broker
        .recover_limited(Recover::All, LEFT_RUNNING, limits)
        .await?;
    log_failed(&orphans);
    let killed = kill_orphans(&orphans);
    if !orphans.is_empty() {
        tracing::warn!(
            tasks = orphans.len(),
            process_groups_killed = killed,
            "recovered tasks left running by a previous daemon"
        );
    }
    let failed = orphans.iter().filter(|o| o.failed).count();
    Ok(Recovered {
        queued: orphans.len() - failed,
        failed,
    })
}

/// A shared broker: never `Recover::All`. This node's own tasks from before a crash are taken
/// back when their leases expire (by any node); what is left of their processes on this
/// machine is killed now, so that they do not run twice.
async fn kill_own_leftovers(broker: &dyn Broker, noted: &[TaskId]) {
    if noted.is_empty() {
        return;
    }
    let ids = stale_local_runs(broker, noted).await;
    let killed = crate::executor::kill_task_processes(&ids);
    if killed > 0 {
        tracing::warn!(
            process_groups_killed = killed,
            "killed tasks left running by a previous daemon on this machine; their leases expire and they are queued again"
        );
    }
}

/// Of the tasks a previous daemon of this state directory noted as started, those whose
/// processes may be killed by task id: every one not held by a live process of this machine
/// (on a shared broker another node here may already run a new attempt of it).
async fn stale_local_runs(broker: &dyn Broker, noted: &[TaskId]) -> Vec<String> {
    let host = super::host_name();
    // Only the few with a process still alive are looked up (the log may hold many ids).
    let noted: Vec<String> = noted.iter().map(|id| id.to_string()).collect();
    let mut out = Vec::new();
    for id in crate::executor::task_ids_with_processes(&noted) {
        let Ok(task) = id.parse::<TaskId>() else {
            continue;
        };
        let holder = match broker.get(task).await {
            Ok(Some(detail)) => detail.task.node,
            Ok(None) => None,
            // Unknown: leave its processes alone rather than risk another node's run.
            Err(_) => continue,
        };
        let held_here_by_a_live_node = holder.is_some_and(|node| {
            node.host() == Some(host.as_str())
                && node
                    .pid()
                    .and_then(|pid| i32::try_from(pid).ok())
                    .is_some_and(|pid| {
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
                    })
        });
        if !held_here_by_a_live_node {
            out.push(id);
        }
    }
    out
}

/// Say which recovered tasks failed for being lost too often (rule 13 of the broker).
pub(super) fn log_failed(orphans: &[Orphan]) {
    for o in orphans.iter().filter(|o| o.failed) {
        tracing::error!(
            task = %o.task,
            queue = %o.queue,
            "task failed: its runs were lost more often than max_lost (the daemon or node running it died each time); not queued again, as the likely cause"
        );
    }
}

/// Kill what is left of recovered tasks' process groups on this machine; how many.
fn kill_orphans(orphans: &[Orphan]) -> usize {
    let mut killed = 0;
    for orphan in orphans {
        if let (Some(pid), Some(start)) = (orphan.pid, orphan.pid_start) {
            if crate::executor::kill_orphan_group(pid, start) {
                killed += 1;
            }
        }
    }
    let ids: Vec<String> = orphans.iter().map(|o| o.task.to_string()).collect();
    killed + crate::executor::kill_task_processes(&ids)
}
