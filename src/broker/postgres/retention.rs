//! Retention (broker rule 18): deleting finished tasks whose `keep_*` ran out, a bounded
//! batch per transaction, found through the `tasks_finished` index; their attempts, result
//! and dependency links go with them (`ON DELETE CASCADE`). Batched deletes rather than
//! partitions by finish time: see docs/postgres.md, "Retention", for why. The store's size.

use super::conn::pg;
use super::rows::{exec, one, sql_limit};
use super::PgBroker;
use crate::broker::{PruneRule, Pruned, Result, StoreSize};

/// The tasks a rule makes due, oldest finish first. Kept: a parent with a dependant that
/// has not finished (its `deps` link stays until the dependant finishes, rule 13), and a
/// task whose unique key still holds (rule 14). Rows another prune holds are skipped.
const DUE: &str = "SELECT seq FROM tasks
    WHERE queue = $1 AND state = $2 AND finished_at IS NOT NULL AND finished_at < $3
      AND (unique_for IS NULL OR finished_at + unique_for <= $5)
      AND NOT EXISTS (SELECT 1 FROM deps WHERE deps.parent = tasks.seq)
    ORDER BY finished_at LIMIT $4";

impl PgBroker {
    pub(super) async fn prune_in(&self, rules: &[PruneRule], limit: usize) -> Result<Pruned> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let now = self.now();
        let mut pruned = Pruned::default();
        let mut left = sql_limit(limit);
        let rules: Vec<&PruneRule> = rules.iter().filter(|r| r.state.is_terminal()).collect();
        for (i, rule) in rules.iter().enumerate() {
            let n = exec(
                &tx,
                &format!("DELETE FROM tasks WHERE seq IN ({DUE} FOR UPDATE SKIP LOCKED)"),
                &[
                    &rule.queue.as_str(),
                    &rule.state.as_str(),
                    &rule.before,
                    &left,
                    &now,
                ],
            )
            .await? as i64;
            pruned.add(&rule.queue, rule.state, n as u64);
            left -= n;
            if left <= 0 {
                for r in &rules[i..] {
                    let due: bool = one(
                        &tx,
                        &format!("SELECT EXISTS ({DUE})"),
                        &[&r.queue.as_str(), &r.state.as_str(), &r.before, &1i64, &now],
                    )
                    .await?
                    .get(0);
                    if due {
                        pruned.more = true;
                        break;
                    }
                }
                break;
            }
        }
        tx.commit().await.map_err(pg)?;
        Ok(pruned)
    }

    pub(super) async fn prunable_in(&self, rules: &[PruneRule]) -> Result<Pruned> {
        let c = self.client().await?;
        let now = self.now();
        let mut pruned = Pruned::default();
        for rule in rules.iter().filter(|r| r.state.is_terminal()) {
            let n: i64 = one(
                &c,
                &format!("SELECT count(*) FROM ({DUE}) due"),
                &[
                    &rule.queue.as_str(),
                    &rule.state.as_str(),
                    &rule.before,
                    &i64::MAX,
                    &now,
                ],
            )
            .await?
            .get(0);
            pruned.add(&rule.queue, rule.state, n as u64);
        }
        Ok(pruned)
    }

    /// The schema's tables with their indexes and TOAST, as PostgreSQL counts them.
    pub(super) async fn store_size_in(&self) -> Result<Option<StoreSize>> {
        let c = self.client().await?;
        let bytes: i64 = one(
            &c,
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c
              WHERE c.relnamespace = $1::text::regnamespace AND c.relkind = 'r'",
            &[&self.settings.schema],
        )
        .await?
        .get(0);
        Ok(Some(StoreSize {
            bytes: bytes.max(0) as u64,
            measure: "tables",
        }))
    }
}
