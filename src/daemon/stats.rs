//! The attempt counters behind the dashboard's charts: gathered in memory by the supervisor
//! (`Metrics::finished`), added to the broker's every [`STATS_EVERY`] so that they outlive
//! the daemon and, on a shared broker, add up over every node.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::metrics::Metrics;

/// How often the gathered counters are written (the charts lag by at most this).
const STATS_EVERY: Duration = Duration::from_secs(5);

/// The loop that writes the counters; [`StatsWriter::finish`] writes the last ones.
pub(super) struct StatsWriter {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl StatsWriter {
    pub(super) fn start(broker: Arc<dyn Broker>, metrics: Arc<Metrics>) -> StatsWriter {
        let stop = CancellationToken::new();
        let task = tokio::spawn(stats_loop(broker, metrics, stop.clone()));
        StatsWriter { stop, task }
    }

    /// Once the drain has finished every task: write what gathered since the last write,
    /// and stop. A write under way is never cut short.
    pub(super) async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn stats_loop(broker: Arc<dyn Broker>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(STATS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        write_stats(broker.as_ref(), &metrics).await;
        if last {
            return;
        }
    }
}

/// One write of the gathered counters; kept for the next one if the broker refuses it.
async fn write_stats(broker: &dyn Broker, metrics: &Metrics) {
    let rows = metrics.take_stats();
    if rows.is_empty() {
        return;
    }
    if let Err(e) = broker.add_stats(&rows).await {
        tracing::debug!(error = %e, "could not write the throughput counters; trying again later");
        metrics.untake_stats(rows);
    }
}
