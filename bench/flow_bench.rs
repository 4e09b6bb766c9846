//! The claim rate with per-key concurrency limits against a queue without keys, through the
//! broker (run by bench/flow.sh; figures in docs/performance.md, "Flow control"):
//!
//! 100,000 waiting tasks on 1,000 keys (`concurrency_per_key = 1`) in one queue and 100,000
//! without keys in another, in one store. A node with 8 slots claims what its free slots
//! take, finishes the oldest half of what it holds, and claims again, for 5,000 tasks
//! (the backlog stays above 95,000); tasks claimed and finished per second. The two queues
//! alternate, three rounds each; the medians and their ratio are printed. Every claim is
//! checked to keep the limit (no two held tasks share a key).
//!
//! Layouts: `interleaved` (task i has key i mod 1,000: consecutive tasks differ) and
//! `grouped` (the 100 tasks of a key one after the other: after a key's first task every
//! claim meets the key blocked, and parks what it meets).
//!
//! Usage: flow_bench URL LAYOUT   (URL `sqlite:PATH` or `redis://…`)

use std::sync::Arc;
use std::time::{Duration, Instant};

use taskd::broker::{Broker, Claimed, Finish, Flow, ListFilter};
use taskd::model::{AttemptReason, AttemptRecord, NewTask, NodeId, QueueName};

const WAITING: usize = 100_000;
const KEYS: usize = 1_000;
const SLOTS: usize = 8;
const RUNS: usize = 5_000;
const ROUNDS: usize = 3;

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

fn key_of(i: usize, grouped: bool) -> usize {
    if grouped {
        i / (WAITING / KEYS)
    } else {
        i % KEYS
    }
}

async fn fill(b: &dyn Broker, queue: &QueueName, keyed: bool, grouped: bool) {
    for chunk in 0..WAITING / 10_000 {
        let batch: Vec<NewTask> = (0..10_000)
            .map(|j| {
                let i = chunk * 10_000 + j;
                let k = key_of(i, grouped);
                let mut t = NewTask::new(queue.clone(), format!(r#"{{"k":{k}}}"#));
                if keyed {
                    t.flow_key = Some(format!("k{k}"));
                }
                t
            })
            .collect();
        b.enqueue(batch).await.expect("enqueue");
    }
    // Stored, not in Redis's inbox: the claims measure claiming only.
    b.list(&ListFilter {
        limit: 1,
        ..Default::default()
    })
    .await
    .expect("list");
}

/// Tasks claimed and finished per second over `RUNS` tasks.
async fn rate(b: &dyn Broker, queue: &QueueName, keyed: bool) -> f64 {
    let node: NodeId = "bench:1".into();
    let mut held: Vec<Claimed> = Vec::new();
    let mut done = 0;
    let t = Instant::now();
    while done < RUNS {
        let got = b
            .claim(&node, queue, SLOTS - held.len(), Duration::from_secs(600))
            .await
            .expect("claim");
        held.extend(got);
        if keyed {
            let mut keys: Vec<u64> = held
                .iter()
                .map(|c| c.task.payload["k"].as_u64().expect("k"))
                .collect();
            let n = keys.len();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), n, "two held tasks share a key");
        }
        assert!(!held.is_empty(), "nothing to claim");
        // Finish the oldest half, as slots free in turn.
        let finish: Vec<Claimed> = held.drain(..held.len().div_ceil(2)).collect();
        for c in &finish {
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
        done += finish.len();
    }
    // Give the rest back finished, so that the next round starts with nothing held.
    for c in held.drain(..) {
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
    done as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn run(url: &str, layout: &str) {
    let grouped = match layout {
        "grouped" => true,
        "interleaved" => false,
        other => panic!("layout {other}: interleaved or grouped"),
    };
    let b = open(url).await;
    let keyed: QueueName = "keyed".parse().expect("queue name");
    let plain: QueueName = "plain".parse().expect("queue name");
    b.set_flow(
        &keyed,
        Flow {
            per_key: Some(1),
            rate: None,
        },
    );
    fill(&*b, &keyed, true, grouped).await;
    fill(&*b, &plain, false, grouped).await;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(rate(&*b, &plain, false).await);
        with.push(rate(&*b, &keyed, true).await);
    }
    let (w, wo) = (median(with.clone()), median(without.clone()));
    println!(
        "claim layout={layout} waiting={WAITING} keys={KEYS} slots={SLOTS} tasks={RUNS} keyed_per_s={w:.0} plain_per_s={wo:.0} ratio={:.3} keyed_rounds={:?} plain_rounds={:?}",
        w / wo,
        with.iter().map(|x| x.round()).collect::<Vec<_>>(),
        without.iter().map(|x| x.round()).collect::<Vec<_>>(),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(url), Some(layout)) = (args.get(1), args.get(2)) else {
        panic!("usage: flow_bench URL interleaved|grouped");
    };
    // One thread, as a daemon's claims run on one.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(url, layout));
}
