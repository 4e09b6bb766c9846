//! What the service manager is told: READY, STATUS= lines for `systemctl status`, and
//! WATCHDOG=1 pings when the unit sets `WatchdogSec=`.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::notify::Notifier;
use crate::supervisor::Supervisor;

pub(super) fn status_line(supervisor: &Supervisor) -> String {
    let snap = supervisor.snapshot();
    format!("{} queues, {} tasks running", snap.queues, snap.running)
}

/// The STATUS= line `systemctl status` shows: queues, running, retrying, failed, broker.
async fn full_status(supervisor: &Supervisor, broker: &dyn Broker) -> String {
    use crate::model::TaskState;
    let base = status_line(supervisor);
    match (
        broker.count_state(TaskState::Retrying).await,
        broker.count_state(TaskState::Failed).await,
    ) {
        (Ok(retrying), Ok(failed)) => {
            format!("{base}, {retrying} retrying, {failed} failed; broker up")
        }
        (Err(e), _) | (_, Err(e)) => format!("{base}; broker DOWN: {e}"),
    }
}

/// STATUS= for `systemctl status` every few seconds, and WATCHDOG=1 when the unit sets
/// WatchdogSec=: sent from the daemon's runtime, so a wedged runtime stops the pings. Runs
/// until aborted; returns at once outside systemd.
pub(super) async fn ping(
    notifier: Arc<Notifier>,
    supervisor: Arc<Supervisor>,
    broker: Arc<dyn Broker>,
) {
    if !notifier.enabled() {
        return;
    }
    let every = notifier
        .watchdog
        .unwrap_or(Duration::from_secs(5))
        .min(Duration::from_secs(5));
    loop {
        tokio::time::sleep(every).await;
        if notifier.watchdog.is_some() {
            // Sent before the status query, which a slow store could hold up.
            notifier.send("WATCHDOG=1");
        }
        notifier.send(&format!(
            "STATUS={}",
            full_status(&supervisor, broker.as_ref()).await
        ));
    }
}
