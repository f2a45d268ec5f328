//! Instructions per DNS query, a figure that does not move with machine
//! load. Builds the registry of the performance issue (1,000 services × 3
//! instances), makes the query mix (45% A, 45% SRV, 10% NXDOMAIN) and
//! answers it through the UDP worker's cache (`fast`) or the general path
//! (`general`), or through the cache while the registry changes once
//! every 260 queries (`churn`: 1,000 changes a second at 260,000 queries a
//! second; the changes themselves are not counted).
//! `benches/dns_instructions.sh` runs it under callgrind, counting only
//! inside `measured`; run directly (`cargo bench --bench
//! dns_instructions`) it prints wall-clock time per query instead.
//!
//! Usage: `dns_instructions [fast|general|churn] [QUERIES] [SERVICES]`.

mod support;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use hickory_proto::rr::RecordType;
use hickory_server::net::xfer::Protocol;
use muster::dns::cache::{AnswerCache, Transport};
use muster::dns::{Authority, respond};
use muster::registry::{Change, Registry};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let modes: Vec<&str> = match args.first().map(String::as_str) {
        Some(mode @ ("fast" | "general" | "churn")) => vec![mode],
        _ => vec!["fast", "general", "churn"],
    };
    let queries: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let services: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (authority, registry) = runtime.block_on(support::authority_and_registry(services));
    let mix = query_mix(queries, services);
    for mode in modes {
        let mut cache = AnswerCache::new();
        // Warm: every question answered once, so the cache is full.
        answer_mix(&authority, &mut cache, &mix, mode);
        let mut elapsed = std::time::Duration::ZERO;
        let mut sent = 0;
        let chunk = if mode == "churn" {
            QUERIES_PER_CHANGE
        } else {
            mix.len()
        };
        for (n, queries) in mix.chunks(chunk).enumerate() {
            if mode == "churn" {
                runtime.block_on(change(&registry, n, services));
            }
            let started = Instant::now();
            sent += measured(&authority, &mut cache, queries, mode);
            elapsed += started.elapsed();
        }
        let per_query = elapsed.as_nanos() as f64 / mix.len() as f64;
        println!("{mode}: {per_query:.0} ns per query ({sent} bytes answered)");
    }
}

/// Queries between two registry changes in `churn` mode.
const QUERIES_PER_CHANGE: usize = 260;

/// The `n`th change: a fourth instance of one service after another,
/// added on even turns and removed on odd ones.
async fn change(registry: &Registry, n: usize, services: usize) {
    let service = n / 2 % services;
    if n.is_multiple_of(2) {
        support::register(registry, service, 3).await;
    } else {
        let change = Change::Deregister {
            service: format!("svc-{service}"),
            id: "i-3".to_string(),
        };
        registry.apply(change).await.unwrap();
    }
}

/// The measured pass over a warm cache. Callgrind counts instructions
/// only inside this function.
#[inline(never)]
fn measured(authority: &Authority, cache: &mut AnswerCache, mix: &[Vec<u8>], mode: &str) -> usize {
    answer_mix(authority, cache, mix, mode)
}

/// Answers every query of `mix`; returns the bytes answered.
fn answer_mix(
    authority: &Authority,
    cache: &mut AnswerCache,
    mix: &[Vec<u8>],
    mode: &str,
) -> usize {
    let client: SocketAddr = "127.0.0.1:53000".parse().unwrap();
    let mut out = Vec::with_capacity(1232);
    let mut sent = 0;
    for query in mix {
        let query = black_box(query.as_slice());
        sent += if mode != "general" {
            cache.respond(authority, query, client, Transport::Udp(None), &mut out);
            out.len()
        } else {
            respond(authority, query, client, Protocol::Udp, None).map_or(0, |r| r.bytes.len())
        };
    }
    sent
}

/// `count` queries, 45% A, 45% SRV and 10% NXDOMAIN over `services`
/// services, in a fixed pseudo-random order.
fn query_mix(count: usize, services: usize) -> Vec<Vec<u8>> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..count)
        .map(|n| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let pick = (state >> 33) as usize;
            let service = pick / 100 % services;
            let (name, rtype) = match pick % 100 {
                0..45 => (format!("svc-{service}.svc.internal."), RecordType::A),
                45..90 => (
                    format!("_http._tcp.svc-{service}.svc.internal."),
                    RecordType::SRV,
                ),
                _ => (format!("nosuch-{}.svc.internal.", n % 1000), RecordType::A),
            };
            support::query(&name, rtype, n as u16)
        })
        .collect()
}
