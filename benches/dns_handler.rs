//! The DNS handler alone: query bytes in, response bytes out, as the UDP
//! loop calls it. A, SRV and NXDOMAIN at 10 and 10,000 registered
//! services of 3 instances each, through the general path (`respond`) and
//! through a UDP worker's cache of encoded answers (`cached`, warm).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RecordType};
use hickory_server::net::xfer::Protocol;
use muster::dns::cache::AnswerCache;
use muster::dns::zones::ZoneSet;
use muster::dns::{Authority, RegistryZone, respond};
use muster::registry::{Change, InstanceSpec, Registry};

async fn authority(services: usize) -> Authority {
    let registry = Arc::new(Registry::default());
    for s in 0..services {
        for i in 0..3 {
            let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
                "address": format!("10.{}.{}.{}", s / 256 % 256, s % 256, i + 1),
                "port": 8080,
                "ports": {"http": 8080},
            }))
            .unwrap();
            let instance = spec
                .into_instance(&format!("svc-{s}"), &format!("i-{i}"))
                .unwrap();
            registry
                .apply(Change::Register(Box::new(instance)))
                .await
                .unwrap();
        }
    }
    Authority::new(
        registry,
        ZoneSet::default(),
        RegistryZone {
            origin: Name::from_ascii("svc.internal.").unwrap(),
            ttl: 5,
            negative_ttl: 5,
            max_answers: 0,
            reverse: false,
            transfers: Vec::new(),
        },
    )
}

fn query(name: &str, rtype: RecordType) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = 4242;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    message.set_edns(edns);
    message.to_vec().unwrap()
}

fn handler(c: &mut Criterion) {
    let client: SocketAddr = "127.0.0.1:53000".parse().unwrap();
    let mut group = c.benchmark_group("dns_handler");
    group.throughput(Throughput::Elements(1));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for services in [10, 10_000] {
        let authority = runtime.block_on(authority(services));
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
                b.iter(|| cache.respond(&authority, black_box(bytes), client, None, &mut out))
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
