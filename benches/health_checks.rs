//! Health checking at scale, against the real binary: registers 10,000
//! instances with HTTP checks at a 1 s interval against local targets,
//! then reports muster's CPU while it checks them and how long after a
//! target dies its instances leave DNS (p50 / p99).
//!
//! `cargo bench --bench health_checks` (about a minute). Environment:
//! `INSTANCES` (10000), `TARGETS` (1000; instances share them evenly),
//! `KILLS` (50 targets killed one after another), `CPU_WINDOW` (10 s).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use support::{HttpTarget, query, query_udp};

const INTERVAL: &str = "1s";
const TIMEOUT: &str = "500ms";

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) used so far by process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let per_second = clock_ticks_per_second();
    ticks / per_second
}

/// `getconf CLK_TCK`, asked of the system rather than assumed.
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let instances = setting("INSTANCES", 10_000);
    let target_count = setting("TARGETS", 1_000).min(instances).max(1);
    let kills = setting("KILLS", 50).min(target_count);
    let window = Duration::from_secs(setting("CPU_WINDOW", 10) as u64);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("muster.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nzones_dir = {:?}\n[dns]\nlisten = [\"127.0.0.1:0\"]\n[api]\nlisten = \"127.0.0.1:0\"\n[gateway]\nenabled = false\n[log]\nlevel = \"info\"\n",
            dir.path().join("data"),
            support::repo_zones()
        ),
    )
    .unwrap();
    let served = support::serve(config.to_str().unwrap());
    let pid = served.child.id();

    let mut targets = Vec::new();
    for _ in 0..target_count {
        targets.push(HttpTarget::start(200).await);
    }
    println!("{instances} instances, {target_count} targets, http checks every {INTERVAL}");

    let client = reqwest::Client::new();
    let registered = Instant::now();
    let bodies: Vec<(String, serde_json::Value)> = (0..instances)
        .map(|i| {
            let target = &targets[i % target_count];
            let body = serde_json::json!({
                "address": format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256),
                "port": 80,
                "check": {"http": target.url(), "interval": INTERVAL, "timeout": TIMEOUT},
            });
            (
                format!("/v1/services/svc-{}/instances/i-{i}", i % 100),
                body,
            )
        })
        .collect();
    for chunk in bodies.chunks(64) {
        let puts: Vec<_> = chunk
            .iter()
            .map(|(path, body)| {
                let request = client
                    .put(format!("http://{}{path}", served.api))
                    .json(body)
                    .send();
                tokio::spawn(request)
            })
            .collect();
        for put in puts {
            assert!(put.await.unwrap().unwrap().status().is_success());
        }
    }
    println!("registered in {:.1?}", registered.elapsed());

    let all_passing = Instant::now();
    loop {
        let list: serde_json::Value = client
            .get(format!("http://{}/v1/services", served.api))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let healthy: u64 = list
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["healthy"].as_u64().unwrap())
            .sum();
        if healthy as usize == instances {
            break;
        }
        assert!(
            all_passing.elapsed() < Duration::from_secs(120),
            "only {healthy} passing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "all passing {:.1?} after registration",
        all_passing.elapsed()
    );

    let cpu_before = cpu_seconds(pid);
    let measured = Instant::now();
    tokio::time::sleep(window).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    let elapsed = measured.elapsed().as_secs_f64();
    let checks = instances as f64 * elapsed;
    println!(
        "muster CPU while checking: {:.1}% of one core, {:.1} µs per check ({:.0} checks/s)",
        100.0 * cpu / elapsed,
        cpu * 1e6 / checks,
        checks / elapsed
    );

    let mut removals = Vec::new();
    for (t, target) in targets.iter_mut().enumerate().take(kills) {
        let victims: Vec<usize> = (t..instances).step_by(target_count).collect();
        let killed = Instant::now();
        target.kill();
        let mut pending = victims.clone();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for i in pending {
                let name = format!("i-{i}.svc-{}.svc.internal.", i % 100);
                let reply = query_udp(served.dns, &query(&name, RecordType::A, None)).await;
                if reply.answers.is_empty() {
                    removals.push(killed.elapsed());
                } else {
                    still.push(i);
                }
            }
            pending = still;
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "instances never left DNS"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    removals.sort();
    println!(
        "target death -> removal from DNS ({} instances, {kills} targets killed): p50 {:.0?}, p99 {:.0?}, max {:.0?} (contract: interval x failures + timeout = 1.5 s)",
        removals.len(),
        percentile(&removals, 0.50),
        percentile(&removals, 0.99),
        removals.last().unwrap()
    );
}
