//! Instructions per DNS query, a figure that does not move with machine
//! load. Builds the registry of the performance issue (1,000 services × 3
//! instances), makes the query mix (45% A, 45% SRV, 10% NXDOMAIN) and
//! answers it through the UDP worker's cache (`fast`) or the general path
//! (`general`). `benches/dns_instructions.sh` runs it under callgrind,
//! counting only inside `measured`; run directly (`cargo bench --bench
//! dns_instructions`) it prints wall-clock time per query instead.
//!
//! Usage: `dns_instructions [fast|general] [QUERIES] [SERVICES]`.

mod support;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use hickory_proto::rr::RecordType;
use hickory_server::net::xfer::Protocol;
use muster::dns::cache::AnswerCache;
use muster::dns::{Authority, respond};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let modes: Vec<&str> = match args.first().map(String::as_str) {
        Some(mode @ ("fast" | "general")) => vec![mode],
        _ => vec!["fast", "general"],
    };
    let queries: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let services: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let authority = runtime.block_on(support::authority(services));
    let mix = query_mix(queries, services);
    for mode in modes {
        let mut cache = AnswerCache::new();
        // Warm: every question answered once, so the cache is full.
        answer_mix(&authority, &mut cache, &mix, mode);
        let started = Instant::now();
        let sent = measured(&authority, &mut cache, &mix, mode);
        let per_query = started.elapsed().as_nanos() as f64 / mix.len() as f64;
        println!("{mode}: {per_query:.0} ns per query ({sent} bytes answered)");
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
        sent += if mode == "fast" {
            cache.respond(authority, query, client, None, &mut out);
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
