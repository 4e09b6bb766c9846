use std::time::{Duration, Instant};
use taskd::executor::{run, Spec, Stop};
fn main() {
    let mt = std::env::args().nth(1).as_deref() == Some("mt");
    let rt = if mt {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    rt.block_on(async {
        let n = 2000;
        let env: Vec<(String, String)> = std::env::vars().collect();
        let t0 = Instant::now();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(2));
        let mut hs = Vec::new();
        for _ in 0..n {
            let p = sem.clone().acquire_owned().await.unwrap();
            let env = env.clone();
            hs.push(tokio::spawn(async move {
                let spec = Spec {
                    argv: vec!["/bin/true".into()],
                    env,
                    cwd: None,
                    stdin: b"{}".to_vec(),
                    timeout: Duration::from_secs(60),
                    kill_grace: Duration::from_secs(1),
                    tail_bytes: 65536,
                    log: None,
                    user: None,
                };
                let _ = run(spec, Stop::default(), None).await;
                drop(p);
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        let el = t0.elapsed().as_secs_f64();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        println!(
            "exec only ({}): {:.0}/s, own cpu {} ticks",
            if mt { "mt" } else { "ct" },
            n as f64 / el,
            f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
        );
    });
}
