//! Retention: every [`PRUNE_EVERY`], the daemon deletes the finished tasks of its queues
//! whose `keep_succeeded`, `keep_failed` or `keep_cancelled` ran out, and the slot records
//! of schedules older than their queue's longest `keep_*`, and the rate states whose time
//! has passed (broker rule 19) ([`crate::broker::prune_due`]: [`crate::broker::PRUNE_BATCH`] tasks per broker call, each
//! call its own short write, so claims and results go between them). The config is read
//! at each pass, so a reload applies at the next one. On a shared broker every node does
//! it; the broker's atomic steps make that safe (a task is deleted once).

use std::sync::Arc;
use std::time::Duration;

use crate::api::AppState;
use crate::broker::{prune_due, prune_flow_states, prune_schedule_slots, Broker, PruneRule};
use crate::metrics::Metrics;
use crate::model::{now_ms, QueueName};

/// How often the daemon looks for tasks to delete (an indexed probe per queue and state
/// when nothing is due).
pub(super) const PRUNE_EVERY: Duration = Duration::from_secs(5);

/// The pruning loop; it ends with the daemon (aborted with the other background loops).
pub(super) async fn prune_loop(broker: Arc<dyn Broker>, api: AppState, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let config = api.config();
        let now = now_ms();
        let rules: Vec<PruneRule> = config
            .queues
            .values()
            .flat_map(|q| PruneRule::for_queue(q, now))
            .collect();
        let started = std::time::Instant::now();
        match prune_due(broker.as_ref(), &rules, |batch| {
            for ((queue, state), n) in &batch.counts {
                metrics.pruned(queue, *state, *n);
            }
        })
        .await
        {
            Ok(done) if done.total() > 0 => {
                tracing::info!(
                    deleted = done.total(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "deleted finished tasks past their keep_* time"
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not delete finished tasks past their keep_* time; trying again in {}s", PRUNE_EVERY.as_secs());
            }
        }
        // Schedules' slot records follow their queue's retention (the longest keep_*).
        match prune_schedule_slots(broker.as_ref(), &config, None, now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                deleted = n,
                "deleted schedules' slot records older than their queue's longest keep_* time"
            ),
            Err(e) => tracing::warn!(error = %e, "could not delete old slot records of schedules"),
        }
        // Rate states whose time has passed carry nothing (rule 19).
        let queues: Vec<QueueName> = config.queues.keys().cloned().collect();
        match prune_flow_states(broker.as_ref(), &queues, now_ms() * 1000).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "deleted rate states whose time had passed"),
            Err(e) => tracing::warn!(error = %e, "could not delete lapsed rate states"),
        }
    }
}
