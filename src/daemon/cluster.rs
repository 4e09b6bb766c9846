//! On a shared broker: keep this node's record fresh, and take back the tasks of nodes whose
//! leases expired (any node may; the first to look does). Their process groups are killed
//! when they ran on this machine.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::{Broker, BrokerError, NodeInfo, Orphan, Recover};
use crate::supervisor::Supervisor;

/// How often a node on a shared broker writes its record and looks for expired leases.
const CLUSTER_TICK: Duration = Duration::from_secs(5);

/// The note a task taken back from a node that stopped renewing gets in its history.
const EXPIRED: &str = "the node running this task stopped renewing its lease (it died or lost the broker); queued again, attempt not charged";

/// Heartbeat and reclaim every third of `lease` (at most every [`CLUSTER_TICK`]), until
/// aborted. Logs once when the broker becomes unreachable and once when it is back.
pub(super) async fn cluster_loop(
    broker: Arc<dyn Broker>,
    supervisor: Arc<Supervisor>,
    lease: Duration,
) {
    let host = super::host_name();
    // A dead node's tasks come back within a lease and a tick of it.
    let mut tick = tokio::time::interval((lease / 3).min(CLUSTER_TICK));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut down = false;
    loop {
        tick.tick().await;
        let reclaimed = match heartbeat(broker.as_ref(), &supervisor, &host).await {
            Ok(()) => {
                broker
                    .recover_limited(
                        Recover::Expired(crate::model::now_ms()),
                        EXPIRED,
                        &supervisor.lost_limits(),
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        match reclaimed {
            Ok(orphans) => {
                if down {
                    tracing::info!("the broker is reachable again");
                    down = false;
                }
                kill_reclaimed(&orphans);
            }
            // Said by the supervisor, which stops claiming until a write passes.
            Err(BrokerError::Full(_)) => {}
            Err(e) => {
                if !down {
                    tracing::error!(error = %e, "the broker is unreachable; running tasks go on, results are kept until it is back");
                    down = true;
                }
            }
        }
    }
}

/// Write this node's record. The heartbeat is a write: it tells whether a full broker has
/// room again, and the supervisor halts or resumes claiming accordingly.
async fn heartbeat(
    broker: &dyn Broker,
    supervisor: &Supervisor,
    host: &str,
) -> Result<(), BrokerError> {
    let me = NodeInfo {
        id: supervisor.node().clone(),
        host: host.to_string(),
        pid: std::process::id(),
        queues: supervisor.queue_names(),
        running: supervisor.snapshot().running,
        last_heartbeat: 0,
    };
    let beat = broker.heartbeat(&me).await;
    match &beat {
        Ok(()) => supervisor.broker_writes(),
        Err(BrokerError::Full(e)) => supervisor.broker_full(e),
        Err(_) => {}
    }
    beat
}

/// Kill what is left on this machine of tasks taken back from an expired lease. Only by pid
/// and start time: the tasks are already queued again, and a node on this machine may have
/// started a new run of one of them, which a search by task id would find and kill.
fn kill_reclaimed(orphans: &[Orphan]) {
    if orphans.is_empty() {
        return;
    }
    super::recovery::log_failed(orphans);
    let killed = orphans
        .iter()
        .filter(|o| match (o.pid, o.pid_start) {
            (Some(pid), Some(start)) => crate::executor::kill_orphan_group(pid, start),
            _ => false,
        })
        .count();
    tracing::warn!(
        tasks = orphans.len(),
        process_groups_killed = killed,
        "took back tasks whose lease expired"
    );
}
