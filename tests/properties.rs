//! Property tests: the name rules and the DNS handler hold for any input,
//! not just the examples in the other suites.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use hickory_server::net::xfer::Protocol;
use muster::Config;
use muster::dns::names::{RegistryName, classify};
use muster::dns::zones::ZoneSet;
use muster::dns::{Authority, RegistryZone, respond};
use muster::registry::validate::dns_label;
use muster::registry::{Change, InstanceSpec, Registry};
use proptest::prelude::*;

/// What RFC 1123 allows in a label, written independently of the code.
fn is_rfc1123_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// One authority with a few instances, shared by every case.
fn authority() -> &'static Authority {
    static AUTHORITY: OnceLock<(tokio::runtime::Runtime, Authority)> = OnceLock::new();
    &AUTHORITY
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let authority = runtime.block_on(async {
                let registry = Arc::new(Registry::default());
                for i in 0..3 {
                    let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
                        "address": format!("10.0.0.{}", i + 1), "port": 80,
                        "ports": {"http": 8080}, "tags": ["v1"],
                    }))
                    .unwrap();
                    let instance = spec.into_instance("web", &format!("w-{i}")).unwrap();
                    registry
                        .apply(Change::Register(Box::new(instance)))
                        .await
                        .unwrap();
                }
                Authority::new(
                    registry,
                    ZoneSet::default(),
                    RegistryZone {
                        reverse: true,
                        ..RegistryZone::from_config(&Config::default()).unwrap()
                    },
                )
            });
            (runtime, authority)
        })
        .1
}

fn client() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

/// A well-formed query for one of the interesting names.
fn query_bytes(name: &str, rtype: RecordType, id: u16) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = id;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    message.to_vec().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn labels_are_accepted_exactly_when_rfc_1123_allows_them(label in "[a-zA-Z0-9_.-]{0,70}|\\PC{0,10}") {
        let checked = dns_label("f", &label);
        prop_assert_eq!(checked.is_ok(), is_rfc1123_label(&label), "{:?}", label);
        if let Ok(lower) = checked {
            prop_assert_eq!(lower, label.to_ascii_lowercase());
        }
    }

    #[test]
    fn classify_never_panics(labels in prop::collection::vec("[a-z0-9_-]{0,8}", 0..8)) {
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let _ = classify(&labels);
    }

    #[test]
    fn instance_and_service_names_classify_as_such(
        service in "[a-z][a-z0-9-]{0,10}[a-z0-9]",
        instance in "[a-z][a-z0-9-]{0,10}[a-z0-9]",
    ) {
        prop_assume!(instance != "tag");
        prop_assert_eq!(classify(&[&service]), RegistryName::Service(&service));
        prop_assert_eq!(
            classify(&[&instance, &service]),
            RegistryName::Instance { service: &service, instance: &instance }
        );
    }

    #[test]
    fn the_handler_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Some(reply) = respond(authority(), &bytes, client(), Protocol::Udp, None) {
            prop_assert!(reply.bytes.len() >= 12);
            prop_assert_eq!(&reply.bytes[..2], &bytes[..2], "the reply keeps the query id");
        }
    }

    #[test]
    fn the_handler_never_panics_on_mutated_queries(
        pick in 0usize..6,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let names = [
            ("web.svc.internal.", RecordType::A),
            ("_http._tcp.web.svc.internal.", RecordType::SRV),
            ("v1.tag.web.svc.internal.", RecordType::AAAA),
            ("w-1.web.svc.internal.", RecordType::ANY),
            ("1.0.0.10.in-addr.arpa.", RecordType::PTR),
            ("example.com.", RecordType::MX),
        ];
        let (name, rtype) = names[pick];
        let mut bytes = query_bytes(name, rtype, 0x1234);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Some(reply) = respond(authority(), &bytes, client(), Protocol::Udp, None) {
            prop_assert!(Message::from_vec(&reply.bytes).is_ok(), "every reply parses");
        }
    }

    #[test]
    fn well_formed_queries_get_well_formed_replies(pick in 0usize..4, id in any::<u16>()) {
        let names = ["web.svc.internal.", "w-2.web.svc.internal.", "nope.svc.internal.", "other.test."];
        let reply = respond(authority(), &query_bytes(names[pick], RecordType::A, id), client(), Protocol::Udp, None)
            .expect("a query gets a reply");
        let parsed = Message::from_vec(&reply.bytes).unwrap();
        prop_assert_eq!(parsed.metadata.id, id);
        prop_assert_eq!(parsed.queries.len(), 1);
    }
}
