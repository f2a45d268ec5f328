//! The DNS handler alone: query bytes in, response bytes out, as the UDP
//! loop calls it. A, SRV and NXDOMAIN at 10 and 10,000 registered
//! services of 3 instances each, through the general path (`respond`) and
//! through a UDP worker's cache of encoded answers (`cached`, warm).

mod support;

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hickory_proto::rr::RecordType;
use hickory_server::net::xfer::Protocol;
use muster::dns::cache::{AnswerCache, Transport};
use muster::dns::respond;
use support::authority_and_registry;

fn query(name: &str, rtype: RecordType) -> Vec<u8> {
    support::query(name, rtype, 4242)
}

fn handler(c: &mut Criterion) {
    let client: SocketAddr = "127.0.0.1:53000".parse().unwrap();
    let mut group = c.benchmark_group("dns_handler");
    group.throughput(Throughput::Elements(1));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for services in [10, 10_000] {
        let (authority, _) = runtime.block_on(authority_and_registry(services));
        let target = format!("svc-{}", services / 2);
        let cases = [
            (
                "A",
                query(&format!("{target}.svc.internal."), RecordType::A),
            ),
            (
                "SRV",
                query(
                    &format!("_http._tcp.{target}.svc.internal."),
                    RecordType::SRV,
                ),
            ),
            ("NXDOMAIN", query("missing.svc.internal.", RecordType::A)),
        ];
        for (label, bytes) in &cases {
            assert!(respond(&authority, bytes, client, Protocol::Udp, None).is_some());
            group.bench_with_input(BenchmarkId::new(*label, services), bytes, |b, bytes| {
                b.iter(|| respond(&authority, black_box(bytes), client, Protocol::Udp, None))
            });
            let mut cache = AnswerCache::new();
            let mut out = Vec::with_capacity(1232);
            let id = BenchmarkId::new(format!("{label} cached"), services);
            group.bench_with_input(id, bytes, |b, bytes| {
                b.iter(|| {
                    cache.respond(
                        &authority,
                        black_box(bytes),
                        client,
                        Transport::Udp(None),
                        &mut out,
                    )
                })
            });
            assert!(
                cache.len() == 1 && !out.is_empty(),
                "answered from the cache"
            );
        }
    }
    group.finish();
}

criterion_group!(benches, handler);
criterion_main!(benches);
