//! What durability costs, against the real binary: registrations per
//! second from 64 concurrent clients with the embedded store and with the
//! in-memory store (interleaved runs), and the time from `muster serve`
//! to ready with 100,000 instances stored.
//!
//! `cargo bench --bench registry_store`. Environment: `SECONDS` per run
//! (5), `ROUNDS` of interleaved runs (2), `STORED` instances for the
//! restart (100000).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use muster::registry::InstanceSpec;
use muster::registry::store::{self, EmbeddedStore};

const CLIENTS: usize = 64;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn write_config(dir: &Path, store: &str) -> String {
    let path = dir.join(format!("{store}.toml"));
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\nstore = {store:?}\nzones_dir = {:?}\n[dns]\nlisten = [\"127.0.0.1:0\"]\n[api]\nlisten = \"127.0.0.1:0\"\n[gateway]\nenabled = false\n[log]\nlevel = \"info\"\n",
            dir.join(format!("data-{store}")),
            support::repo_zones()
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// Registrations acknowledged per second by `CLIENTS` concurrent clients.
async fn registrations_per_second(api: std::net::SocketAddr, seconds: u64) -> f64 {
    let client = reqwest::Client::new();
    let done = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (client, done, next) = (client.clone(), done.clone(), next.clone());
        clients.spawn(async move {
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let url = format!("http://{api}/v1/services/svc-{}/instances/i-{n}", n % 100);
                let body = serde_json::json!({"address": "10.0.0.1", "port": 80, "tags": ["a"]});
                let response = client.put(url).json(&body).send().await.unwrap();
                assert!(response.status().is_success());
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while clients.join_next().await.is_some() {}
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let seconds = setting("SECONDS", 5);
    let rounds = setting("ROUNDS", 2);
    let stored = setting("STORED", 100_000) as usize;
    let dir = tempfile::tempdir().unwrap();

    let mut results: Vec<(&str, Vec<f64>)> = vec![("embedded", Vec::new()), ("memory", Vec::new())];
    for _ in 0..rounds {
        for (kind, rates) in results.iter_mut() {
            let _ = std::fs::remove_dir_all(dir.path().join(format!("data-{kind}")));
            let config = write_config(dir.path(), kind);
            let served = support::serve(&config);
            rates.push(registrations_per_second(served.api, seconds).await);
        }
    }
    let embedded = median(&mut results[0].1.clone());
    let memory = median(&mut results[1].1.clone());
    println!(
        "registrations/s, {CLIENTS} concurrent clients, {rounds} interleaved runs of {seconds} s each (median):"
    );
    println!(
        "  embedded (fsync'd, group commit): {embedded:.0}  runs {:?}",
        results[0].1.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    println!(
        "  in-memory only:                   {memory:.0}  runs {:?}",
        results[1].1.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    println!(
        "  durable / in-memory:              {:.2}",
        embedded / memory
    );

    let data = dir.path().join("data-restart");
    let mut store = EmbeddedStore::open(&data).unwrap();
    let instances = (0..stored)
        .map(|i| {
            let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
                "address": format!("10.{}.{}.{}", i / 65536, i / 256 % 256, i % 256),
                "port": 8080, "ports": {"http": 8080}, "tags": ["v1"],
                "check": {"http": format!("http://10.0.0.1:8080/health/{i}"), "interval": "10s"},
            }))
            .unwrap();
            spec.into_instance(&format!("svc-{}", i % 1000), &format!("i-{i}"))
                .unwrap()
        })
        .collect();
    store::import(&mut store, instances).unwrap();
    drop(store);
    let size = std::fs::metadata(data.join("registry.redb")).unwrap().len();
    let config = dir.path().join("restart.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\nzones_dir = {:?}\n[dns]\nlisten = [\"127.0.0.1:0\"]\n[api]\nlisten = \"127.0.0.1:0\"\n[gateway]\nenabled = false\n[log]\nlevel = \"info\"\n",
            support::repo_zones()
        ),
    )
    .unwrap();
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let mut served = support::serve(config.to_str().unwrap());
        times.push(started.elapsed().as_secs_f64());
        served.child.kill().unwrap();
        served.child.wait().unwrap();
    }
    println!(
        "restart with {stored} instances stored ({:.0} MB file): {:.2} s to ready (median of 3; runs {:?})",
        size as f64 / 1e6,
        median(&mut times.clone()),
        times
            .iter()
            .map(|t| (t * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
}
