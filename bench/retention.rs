//! Retention's bound (docs/performance.md, "Retention: the store stays bounded"): TOTAL
//! tasks cycle through enqueue → claim → start → finish (succeeded, with a result and an
//! output tail) → prune, through the broker as the daemon drives it, with
//! `keep_succeeded = "1s"` and the daemon's pruning pass every 5 s (`broker::prune_due`,
//! 200 tasks per call). Every REPORT tasks it prints the store's size (SQLite: the file,
//! its WAL and shared-memory file; Redis: `used_memory`, beside the server's RSS,
//! `used_memory_rss`, and its AOF files on disk when `RETENTION_REDIS_DIR` names their
//! directory), the tasks alive, and the claim
//! rate of that window (claimed, started and finished per second), so that the size can be
//! seen to stay bounded and the claim rate not to degrade. At the end: the first and last
//! windows' rates and the prune calls' durations (each call is one write: its job in the
//! writer, the commit and its fsync; p50, p99, max).
//!
//! Usage: retention_bench sqlite:PATH|redis://… TOTAL [REPORT]
//! (`bench/retention.sh` builds it and runs the documented 1,000,000.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use taskd::broker::{prune_due, Broker, Finish, PruneRule};
use taskd::model::{now_ms, AttemptReason, AttemptRecord, NewTask, NodeId, QueueName, TaskState};

const KEEP_MS: i64 = 1_000;
const PRUNE_EVERY: Duration = Duration::from_secs(5);
/// Tasks enqueued ahead of the claims: a steady backlog, as under load.
const BACKLOG: usize = 2_000;

async fn open(url: &str) -> Arc<dyn Broker> {
    match url.strip_prefix("sqlite:") {
        Some(p) => Arc::new(
            taskd::broker::sqlite::SqliteBroker::open(std::path::Path::new(p))
                .await
                .expect("open sqlite"),
        ),
        None => Arc::new(
            taskd::broker::redis::RedisBroker::open(url)
                .await
                .expect("open redis"),
        ),
    }
}

fn batch(q: &QueueName, n: usize) -> Vec<NewTask> {
    (0..n)
        .map(|i| {
            NewTask::new(
                q.clone(),
                format!(r#"{{"user_id":{i},"to":"user{i}@example.com","template":"welcome"}}"#),
            )
        })
        .collect()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / 1048576.0)
}

/// A field of the Redis server's `INFO memory`.
async fn redis_info(conn: &mut redis::aio::MultiplexedConnection, field: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .expect("INFO memory");
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes of the files under `dir` (the server's AOF directory).
fn du(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: retention_bench sqlite:PATH|redis://… TOTAL [REPORT]");
        std::process::exit(2);
    }
    let url = args[1].clone();
    let total: u64 = args[2].parse().expect("TOTAL");
    let report: u64 = args.get(3).map_or(50_000, |r| r.parse().expect("REPORT"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(url, total, report));
}

async fn run(url: String, total: u64, report: u64) {
    let b = open(&url).await;
    let q: QueueName = "bench".parse().expect("queue name");
    let node = NodeId::from("bench-node".to_string());
    let stop = Arc::new(AtomicBool::new(false));
    let pruned = Arc::new(AtomicU64::new(0));
    let calls: Arc<Mutex<Vec<f64>>> = Arc::default();
    // The daemon's pass: every 5 s, everything finished more than KEEP_MS ago.
    let pruner = {
        let (b, q, stop, pruned, calls) = (
            b.clone(),
            q.clone(),
            stop.clone(),
            pruned.clone(),
            calls.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(PRUNE_EVERY).await;
                let rules = vec![PruneRule {
                    queue: q.clone(),
                    state: TaskState::Succeeded,
                    before: now_ms() - KEEP_MS,
                }];
                let mut last = Instant::now();
                prune_due(&*b, &rules, |batch| {
                    calls
                        .lock()
                        .unwrap()
                        .push(last.elapsed().as_secs_f64() * 1000.0);
                    last = Instant::now();
                    pruned.fetch_add(batch.total(), Ordering::Relaxed);
                })
                .await
                .expect("prune");
            }
        })
    };
    let mut info = match url.strip_prefix("sqlite:") {
        Some(_) => None,
        None => Some(
            redis::Client::open(url.as_str())
                .expect("redis url")
                .get_multiplexed_async_connection()
                .await
                .expect("connect to redis"),
        ),
    };
    let aof_dir = std::env::var_os("RETENTION_REDIS_DIR").map(std::path::PathBuf::from);
    if info.is_some() {
        println!("| tasks done | elapsed (s) | used_memory (MiB) | RSS (MiB) | AOF on disk (MiB) | tasks in store | pruned | claim rate in the window (tasks/s) |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    } else {
        println!("| tasks done | elapsed (s) | store (MiB) | of it WAL (MiB) | tasks in store | pruned | claim rate in the window (tasks/s) |");
        println!("|---:|---:|---:|---:|---:|---:|---:|");
    }
    let mut max_rss = 0u64;
    let (mut enqueued, mut done) = (0u64, 0u64);
    let start = Instant::now();
    let mut window = (Instant::now(), 0u64);
    let mut rates = Vec::new();
    let mut max_bytes = 0u64;
    while done < total {
        if enqueued - done < BACKLOG as u64 && enqueued < total {
            let n = (BACKLOG as u64).min(total - enqueued) as usize;
            b.enqueue(batch(&q, n)).await.expect("enqueue");
            enqueued += n as u64;
        }
        let got = b
            .claim(&node, &q, 64, Duration::from_secs(60))
            .await
            .expect("claim");
        let runs = got.into_iter().map(|c| {
            let b = b.clone();
            async move {
                b.started(&c.lease, 4242, 1).await.expect("started");
                let now = now_ms();
                let a = AttemptRecord {
                    number: c.attempt,
                    node: c.lease.node.clone(),
                    pid: Some(4242),
                    started_at: now - 3,
                    ended_at: now,
                    reason: Some(AttemptReason::Exit),
                    exit_code: Some(0),
                    stdout_tail: "sent welcome mail to user@example.com (message id 1f0c2a)\n"
                        .into(),
                    result: Some(serde_json::json!({"sent": true})),
                    ..Default::default()
                };
                b.finish(&c.lease, a, Finish::Succeeded)
                    .await
                    .expect("finish");
            }
        });
        done += join_all(runs).await.len() as u64;
        if done - window.1 >= report || done >= total {
            let rate = (done - window.1) as f64 / window.0.elapsed().as_secs_f64();
            rates.push(rate);
            let size = b.store_size().await.expect("size").map_or(0, |s| s.bytes);
            max_bytes = max_bytes.max(size);
            let second = match info.as_mut() {
                Some(conn) => {
                    let rss = redis_info(conn, "used_memory_rss").await;
                    max_rss = max_rss.max(rss);
                    let aof = aof_dir.as_deref().map_or("—".to_string(), |d| mib(du(d)));
                    format!("{} | {aof}", mib(rss))
                }
                None => mib(url
                    .strip_prefix("sqlite:")
                    .and_then(|p| std::fs::metadata(format!("{p}-wal")).ok())
                    .map_or(0, |m| m.len())),
            };
            let alive: u64 = b
                .counts()
                .await
                .expect("counts")
                .iter()
                .flat_map(|c| c.counts.values())
                .sum();
            println!(
                "| {done} | {:.0} | {} | {second} | {alive} | {} | {rate:.0} |",
                start.elapsed().as_secs_f64(),
                mib(size),
                pruned.load(Ordering::Relaxed),
            );
            window = (Instant::now(), done);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = pruner.await;
    let mut c = calls.lock().unwrap().clone();
    c.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!();
    println!(
        "{done} tasks in {:.0} s; claim rate first window {:.0}/s, last {:.0}/s; largest store {} MiB",
        start.elapsed().as_secs_f64(),
        rates.first().copied().unwrap_or(0.0),
        rates.last().copied().unwrap_or(0.0),
        mib(max_bytes)
    );
    if info.is_some() {
        println!("largest RSS of the Redis server {} MiB", mib(max_rss));
    }
    println!(
        "prune calls: {} (200 tasks each at most), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        c.len(),
        pct(&c, 0.5),
        pct(&c, 0.99),
        c.last().copied().unwrap_or(0.0)
    );
}
