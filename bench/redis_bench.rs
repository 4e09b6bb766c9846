//! Broker-level figures for the Redis backend (run by bench/redis.sh, see docs/performance.md):
//!
//! - `enqueue`: N tasks in batches of B from C clients at once (each client its own
//!   connection, as separate producers would be), tasks/s; and the rate until they are
//!   all stored as well (on Redis plain tasks wait in the queue's inbox until stored).
//! - `claim`: N pre-filled (stored) tasks claimed 64 at a time and finished (succeeded) by K nodes,
//!   each finish sent as soon as its claim returns (as the daemon does); tasks/s, the
//!   broker calls per task, and on Redis the calls that reached the server per task
//!   (results ready together share one `finish` call), counted.
//!
//! Usage: redis_bench enqueue URL N B C | redis_bench claim URL N K
//! (URL `sqlite:PATH` measures the embedded store the same way.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use taskd::broker::redis::RedisBroker;
use taskd::broker::{Broker, Finish, ListFilter};
use taskd::model::{AttemptReason, AttemptRecord, NewTask, NodeId, QueueName};

async fn open(url: &str) -> Arc<dyn Broker> {
    open_counted(url).await.0
}

/// The broker, and for Redis a handle on its count of calls sent to the server.
async fn open_counted(url: &str) -> (Arc<dyn Broker>, Option<Arc<RedisBroker>>) {
    match url.strip_prefix("sqlite:") {
        Some(p) => (
            Arc::new(
                taskd::broker::sqlite::SqliteBroker::open(std::path::Path::new(p))
                    .await
                    .expect("open sqlite"),
            ),
            None,
        ),
        None => {
            let r = Arc::new(RedisBroker::open(url).await.expect("open redis"));
            (r.clone(), Some(r))
        }
    }
}

fn batch(q: &QueueName, n: usize) -> Vec<NewTask> {
    (0..n)
        .map(|_| NewTask::new(q.clone(), "{}".into()))
        .collect()
}

async fn enqueue(url: &str, n: usize, b: usize, c: usize) {
    let q: QueueName = "bench".parse().expect("queue name");
    let mut clients = Vec::new();
    for _ in 0..c {
        clients.push(open(url).await);
    }
    // Warm up: scripts loaded, the queue known.
    for cl in &clients {
        cl.enqueue(batch(&q, 1)).await.expect("enqueue");
    }
    let per = n / c;
    let start = Instant::now();
    let runs = clients.into_iter().map(|cl| {
        let q = q.clone();
        tokio::spawn(async move {
            let mut left = per;
            while left > 0 {
                let k = left.min(b);
                cl.enqueue(batch(&q, k)).await.expect("enqueue");
                left -= k;
            }
        })
    });
    for r in join_all(runs).await {
        r.expect("client");
    }
    let t = start.elapsed();
    // On Redis the plain tasks wait in the queue's inbox; a list stores them all (what a
    // daemon does in the background): the time to enqueue and store, end to end.
    stored(&*open(url).await).await;
    let all = start.elapsed();
    println!(
        "enqueue tasks={} batch={b} clients={c} seconds={:.3} tasks_per_s={:.0} stored_per_s={:.0}",
        per * c,
        t.as_secs_f64(),
        (per * c) as f64 / t.as_secs_f64(),
        (per * c) as f64 / all.as_secs_f64()
    );
}

/// Wait until every enqueued task is stored (on Redis, a list stores the inboxes first).
async fn stored(b: &dyn Broker) {
    b.list(&ListFilter {
        limit: 1,
        ..Default::default()
    })
    .await
    .expect("list");
}

async fn claim(url: &str, n: usize, k: usize) {
    let q: QueueName = "bench".parse().expect("queue name");
    let filler = open(url).await;
    let mut left = n;
    while left > 0 {
        let m = left.min(10_000);
        filler.enqueue(batch(&q, m)).await.expect("fill");
        left -= m;
    }
    // Pre-filled means stored: the claims below measure claiming and finishing only.
    stored(&*filler).await;
    let trips = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut nodes = Vec::new();
    let mut counters = Vec::new();
    for i in 0..k {
        let (b, counter) = open_counted(url).await;
        nodes.push((NodeId::from(format!("bench-{i}")), b));
        counters.extend(counter);
    }
    let sent = |cs: &[Arc<RedisBroker>]| cs.iter().map(|c| c.round_trips()).sum::<u64>();
    let sent_before = sent(&counters);
    let start = Instant::now();
    let runs = nodes.into_iter().map(|(node, b)| {
        let q = q.clone();
        let trips = trips.clone();
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                let got = b
                    .claim(&node, &q, 64, Duration::from_secs(60))
                    .await
                    .expect("claim");
                trips.fetch_add(1, Ordering::Relaxed);
                if got.is_empty() {
                    return;
                }
                let finishes = got.into_iter().map(|c| {
                    let b = b.clone();
                    async move {
                        let a = AttemptRecord {
                            number: c.attempt,
                            node: c.lease.node.clone(),
                            reason: Some(AttemptReason::Exit),
                            exit_code: Some(0),
                            ..Default::default()
                        };
                        b.finish(&c.lease, a, Finish::Succeeded)
                            .await
                            .expect("finish");
                    }
                });
                let m = join_all(finishes).await.len() as u64;
                trips.fetch_add(m, Ordering::Relaxed);
                done.fetch_add(m, Ordering::Relaxed);
            }
        })
    });
    for r in join_all(runs).await {
        r.expect("node");
    }
    let t = start.elapsed();
    let d = done.load(Ordering::Relaxed);
    // Calls made through the broker API; on Redis also the calls that reached the server
    // (results finished together share one).
    let calls = trips.load(Ordering::Relaxed);
    let sent = if counters.is_empty() {
        calls
    } else {
        sent(&counters) - sent_before
    };
    println!(
        "claim nodes={k} tasks={d} seconds={:.3} tasks_per_s={:.0} calls_per_task={:.3} round_trips_per_task={:.3}",
        t.as_secs_f64(),
        d as f64 / t.as_secs_f64(),
        calls as f64 / d as f64,
        sent as f64 / d as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| -> usize {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("usage: redis_bench enqueue URL N B C | claim URL N K"))
    };
    // One thread per node, as each daemon runs on one thread.
    let threads = match args.get(1).map(String::as_str) {
        Some("claim") => arg(4).max(1),
        _ => 1,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    match args.get(1).map(String::as_str) {
        Some("enqueue") => rt.block_on(enqueue(&args[2], arg(3), arg(4), arg(5))),
        Some("claim") => rt.block_on(claim(&args[2], arg(3), arg(4))),
        _ => panic!("usage: redis_bench enqueue URL N B C | claim URL N K"),
    }
}
