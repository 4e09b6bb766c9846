//! Results on their way to Redis: one writer per client batches them (see finish.lua).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redis::aio::ConnectionManager;

use super::{broker_error, prefix, scripts};
use crate::broker::{BrokerError, Result};
use crate::model::QueueName;

/// The `finish` script's arguments per result (see finish.lua).
pub(super) const FINISH_ARGS: usize = 9;

/// At most this many results go in one `finish` call.
const FINISH_BATCH: usize = 128;

/// A result waiting to be written: the `finish` script's arguments for it, and who waits.
pub(super) struct Finishing {
    pub(super) queue: QueueName,
    pub(super) args: [String; FINISH_ARGS],
    pub(super) done: tokio::sync::oneshot::Sender<Result<String>>,
}

/// Writes results as they come, in one `finish` call per queue for all those that are
/// ready at once: while one call is on its way, the next results gather behind it (as a
/// group commit does), so a busy node sends far fewer calls than it finishes tasks, and an
/// idle one sends each result at once.
pub(super) async fn finish_loop(
    conn: ConnectionManager,
    addr: String,
    trips: Arc<AtomicU64>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Finishing>,
) {
    while let Some(first) = rx.recv().await {
        let mut by_queue: BTreeMap<QueueName, Vec<Finishing>> = BTreeMap::new();
        by_queue.entry(first.queue.clone()).or_default().push(first);
        let mut n = 1;
        while n < FINISH_BATCH {
            let Ok(f) = rx.try_recv() else { break };
            by_queue.entry(f.queue.clone()).or_default().push(f);
            n += 1;
        }
        let calls = by_queue.into_iter().map(|(q, batch)| {
            let mut conn = conn.clone();
            let addr = addr.clone();
            let trips = trips.clone();
            async move {
                trips.fetch_add(1, Ordering::Relaxed);
                let args: Vec<&[String; FINISH_ARGS]> = batch.iter().map(|f| &f.args).collect();
                let answers = match finish_call(&mut conn, &addr, &q, &args).await {
                    // A script error that is not the connection's (a task's record it
                    // could not read) must not hold up the others: each goes alone.
                    Err(BrokerError::Storage(_)) if batch.len() > 1 => {
                        let mut each = Vec::with_capacity(batch.len());
                        for a in &args {
                            trips.fetch_add(1, Ordering::Relaxed);
                            each.push(finish_call(&mut conn, &addr, &q, &[a]).await.and_then(
                                |mut v| {
                                    v.pop().ok_or_else(|| {
                                        BrokerError::Storage("finish answered nothing".into())
                                    })
                                },
                            ));
                        }
                        each
                    }
                    Ok(out) => out.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(e); batch.len()],
                };
                for (f, a) in batch.into_iter().zip(answers) {
                    let _ = f.done.send(a);
                }
            }
        });
        futures_util::future::join_all(calls).await;
    }
}

/// One `finish` call for results of `queue`; one answer per result.
pub(super) async fn finish_call(
    conn: &mut ConnectionManager,
    addr: &str,
    queue: &QueueName,
    results: &[&[String; FINISH_ARGS]],
) -> Result<Vec<String>> {
    let mut inv = scripts().finish.key(prefix(queue));
    for r in results {
        for a in r.iter() {
            inv.arg(a);
        }
    }
    let out: Vec<String> = inv
        .invoke_async(conn)
        .await
        .map_err(|e| broker_error(addr, e))?;
    if out.len() != results.len() {
        return Err(BrokerError::Storage(format!(
            "finish answered {} results for {} tasks",
            out.len(),
            results.len()
        )));
    }
    Ok(out)
}
