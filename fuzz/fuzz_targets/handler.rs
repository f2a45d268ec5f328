//! Raw bytes into the DNS handler, as a UDP datagram or a TCP message:
//! whatever arrives, muster must answer or stay silent, never panic.

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use hickory_server::net::xfer::Protocol;
use libfuzzer_sys::fuzz_target;
use muster::dns::cache::{AnswerCache, Transport};
use muster::dns::rrl::Rrl;
use muster::dns::zones::ZoneSet;
use muster::dns::{Authority, RegistryZone, respond};
use muster::registry::{Change, InstanceSpec, Registry};

struct Setup {
    _runtime: tokio::runtime::Runtime,
    authority: Authority,
    rrl: Rrl,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let authority = runtime.block_on(async {
            let registry = Arc::new(Registry::default());
            for (i, address) in ["10.0.0.1", "fd00::2", "10.0.0.3"].iter().enumerate() {
                let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
                    "address": address, "port": 80, "ports": {"http": 8080}, "tags": ["v1"],
                }))
                .unwrap();
                let instance = spec.into_instance("web", &format!("w-{i}")).unwrap();
                registry
                    .apply(Change::Register(Box::new(instance)))
                    .await
                    .unwrap();
            }
            let mut config = muster::Config::default();
            config.dns.max_answers = 2;
            config.dns.reverse = true;
            config
                .dns
                .transfers
                .insert("svc.internal.".into(), vec!["0.0.0.0/0".parse().unwrap()]);
            let zone = RegistryZone::from_config(&config).unwrap();
            Authority::new(registry, ZoneSet::default(), zone)
        });
        let mut rrl_config = muster::config::RrlConfig::default();
        rrl_config.responses_per_second = 1000;
        rrl_config.exempt = Vec::new();
        Setup {
            _runtime: runtime,
            authority,
            rrl: Rrl::new(&rrl_config).unwrap(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    let client: SocketAddr = "192.0.2.1:5300".parse().unwrap();
    let _ = respond(
        &setup.authority,
        data,
        client,
        Protocol::Udp,
        Some(&setup.rrl),
    );
    let _ = respond(&setup.authority, data, client, Protocol::Tcp, None);
    // The UDP fast path: a fresh cache answers (or declines) without
    // panicking, and what it writes parses as DNS.
    // Twice: once filling the cache, once from it.
    let mut cache = AnswerCache::new();
    let mut out = Vec::new();
    for _ in 0..2 {
        if cache
            .respond(&setup.authority, data, client, Transport::Udp(Some(&setup.rrl)), &mut out)
            .is_some()
            && !out.is_empty()
        {
            assert!(hickory_proto::op::Message::from_vec(&out).is_ok());
        }
    }
});
