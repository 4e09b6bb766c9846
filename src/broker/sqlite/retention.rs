//! Retention (broker rule 18): deleting finished tasks whose `keep_*` ran out, a bounded
//! batch per write, found through the `tasks_finished` index; giving freed pages back to
//! the file system a little at a time; the store's size on disk.

use rusqlite::{params, Connection};

use super::conn::storage;
use super::SqliteBroker;
use crate::broker::{PruneRule, Pruned, Result, StoreSize};
use crate::model::now_ms;

/// The most free pages one prune gives back to the file system (`incremental_vacuum`):
/// moving pages costs writes, so a burst of deletions shrinks the file over several
/// batches rather than in one long transaction.
const VACUUM_STEP: i64 = 256;

/// The tasks a rule makes due, oldest finish first: only the `tasks_finished` index is
/// read (`finished_at < ?` implies its `finished_at IS NOT NULL`).
/// Kept: a parent with a dependant that has not finished (its `deps` link stays until
/// the dependant finishes, rule 13), and a task whose unique key still holds (rule 14).
const DUE: &str = "SELECT seq FROM tasks INDEXED BY tasks_finished
    WHERE queue = ?1 AND state = ?2 AND finished_at IS NOT NULL AND finished_at < ?3
      AND (unique_for IS NULL OR finished_at + unique_for <= ?5)
      AND NOT EXISTS (SELECT 1 FROM deps WHERE deps.parent = tasks.seq)
    ORDER BY finished_at LIMIT ?4";

fn terminal(rule: &PruneRule) -> bool {
    rule.state.is_terminal()
}

/// Delete up to `limit` due tasks in the current transaction; their attempts and result go
/// with them (`ON DELETE CASCADE`); a finished task holds no unique key (the unique index
/// covers waiting and running tasks only).
fn prune_in(conn: &Connection, rules: &[PruneRule], limit: usize) -> Result<Pruned> {
    let now = now_ms();
    let mut pruned = Pruned::default();
    let mut left = limit as i64;
    for (i, rule) in rules.iter().enumerate() {
        if !terminal(rule) {
            continue;
        }
        let n = conn
            .prepare_cached(&format!("DELETE FROM tasks WHERE seq IN ({DUE})"))
            .and_then(|mut s| {
                s.execute(params![
                    rule.queue.as_str(),
                    rule.state.as_str(),
                    rule.before,
                    left,
                    now
                ])
            })
            .map_err(storage)? as i64;
        pruned.add(&rule.queue, rule.state, n as u64);
        left -= n;
        if left <= 0 {
            // Are more due? One indexed probe per rule not done yet.
            for r in rules[i..].iter().filter(|r| terminal(r)) {
                let due = conn
                    .prepare_cached(DUE)
                    .and_then(|mut s| {
                        s.exists(params![
                            r.queue.as_str(),
                            r.state.as_str(),
                            r.before,
                            1,
                            now
                        ])
                    })
                    .map_err(storage)?;
                if due {
                    pruned.more = true;
                    break;
                }
            }
            break;
        }
    }
    // Also when nothing was due: the daemon's next passes finish shrinking after a burst.
    give_back_pages(conn)?;
    Ok(pruned)
}

/// In a store created with `auto_vacuum = INCREMENTAL`, give free pages beyond a quarter
/// of the file back to the file system, at most [`VACUUM_STEP`] per call. The quarter
/// kept free is reused by the next tasks without growing the file again. A store created
/// before retention existed has `auto_vacuum = NONE`: its free pages are reused in place
/// and the file never shrinks (docs/config.md, "Retention", says how to convert it).
fn give_back_pages(conn: &Connection) -> Result<()> {
    let mode: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
        .map_err(storage)?;
    if mode != 2 {
        return Ok(());
    }
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(storage)?;
    let free: i64 = conn
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .map_err(storage)?;
    let excess = free - pages / 4;
    if excess > 0 {
        let n = excess.min(VACUUM_STEP);
        // The pragma returns no rows; a prepared statement steps it to completion.
        conn.prepare(&format!("PRAGMA incremental_vacuum({n})"))
            .and_then(|mut s| {
                let mut rows = s.query([])?;
                while rows.next()?.is_some() {}
                Ok(())
            })
            .map_err(storage)?;
    }
    Ok(())
}

fn prunable_in(conn: &Connection, rules: &[PruneRule]) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    for rule in rules.iter().filter(|r| terminal(r)) {
        let n: i64 = conn
            .prepare_cached(&format!("SELECT count(*) FROM ({DUE})"))
            .and_then(|mut s| {
                s.query_row(
                    params![
                        rule.queue.as_str(),
                        rule.state.as_str(),
                        rule.before,
                        -1,
                        now_ms()
                    ],
                    |r| r.get(0),
                )
            })
            .map_err(storage)?;
        pruned.add(&rule.queue, rule.state, n as u64);
    }
    Ok(pruned)
}

impl SqliteBroker {
    pub(super) async fn prune_in(&self, rules: &[PruneRule], limit: usize) -> Result<Pruned> {
        let rules = rules.to_vec();
        // Not urgent: it may share a commit with the results being written.
        self.write_as(false, move |conn| prune_in(conn, &rules, limit))
            .await
    }

    pub(super) async fn prunable_in(&self, rules: &[PruneRule]) -> Result<Pruned> {
        let rules = rules.to_vec();
        self.read(move |conn| prunable_in(conn, &rules)).await
    }

    /// The database, its WAL and its shared-memory file, as they are on disk now.
    pub(super) fn store_size_now(&self) -> StoreSize {
        let mut bytes = 0;
        for suffix in ["", "-wal", "-shm"] {
            let mut f = self.path.as_os_str().to_owned();
            f.push(suffix);
            bytes += std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
        }
        StoreSize {
            bytes,
            measure: "file",
        }
    }
}
