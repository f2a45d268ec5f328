//! What the in-process DNS benches share: the registry they answer from
//! and the queries they send.

use std::sync::Arc;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RecordType};
use muster::Config;
use muster::dns::zones::ZoneSet;
use muster::dns::{Authority, RegistryZone};
use muster::registry::{Change, InstanceSpec, Registry};

/// An authority over `services` services (`svc-N`) of 3 instances each,
/// every instance with the named port `http`, and the registry it answers
/// from. Call inside a runtime.
pub async fn authority_and_registry(services: usize) -> (Authority, Arc<Registry>) {
    let registry = Arc::new(Registry::default());
    for s in 0..services {
        for i in 0..3 {
            register(&registry, s, i).await;
        }
    }
    let authority = Authority::new(
        registry.clone(),
        ZoneSet::default(),
        RegistryZone::from_config(&Config::default()).expect("the default zone"),
    );
    (authority, registry)
}

/// Registers instance `i-{instance}` of `svc-{service}`.
pub async fn register(registry: &Registry, service: usize, instance: usize) {
    let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
        "address": format!("10.{}.{}.{}", service / 256 % 256, service % 256, instance + 1),
        "port": 8080,
        "ports": {"http": 8080},
    }))
    .unwrap();
    let instance = spec
        .into_instance(&format!("svc-{service}"), &format!("i-{instance}"))
        .unwrap();
    registry
        .apply(Change::Register(Box::new(instance)))
        .await
        .unwrap();
}

/// A query for `name` `rtype` with id `id` and EDNS (payload 1232).
pub fn query(name: &str, rtype: RecordType, id: u16) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = id;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    message.set_edns(edns);
    message.to_vec().unwrap()
}
