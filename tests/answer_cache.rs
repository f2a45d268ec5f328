//! The UDP fast path (pre-encoded answers) against the general path: for
//! any query both can answer, the replies carry the same header, question
//! and records; rotation still hands every instance its turn; and a cached
//! answer never outlives a change to its service or to the static zones.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_server::net::xfer::Protocol;
use muster::Config;
use muster::dns::cache::{AnswerCache, Transport};
use muster::dns::zones::{ZoneSet, parse};
use muster::dns::{Authority, RegistryZone, respond};
use muster::registry::{Change, InstanceSpec, Registry};
use proptest::prelude::*;

const ZONE: &str = "\
$ORIGIN example.test.
@ 300 IN SOA ns.example.test. admin.example.test. 1 60 60 600 30
@ 300 IN NS ns.example.test.
ns 300 IN A 127.0.0.53
www 300 IN A 127.0.0.80
mail 300 IN MX 10 www.example.test.
";

/// A registry with web (three instances, two priorities, one IPv6) and
/// big (forty instances: its SRV answer needs TCP), served beside a
/// static zone.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    registry: Arc<Registry>,
    authority: Authority,
}

fn static_zones(www: &str) -> ZoneSet {
    let text = ZONE.replace("127.0.0.80", www);
    ZoneSet::new(vec![
        parse(&text, Path::new("example.test.zone"), "example.test.").unwrap(),
    ])
}

impl Fixture {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let registry = {
            let _inside = runtime.enter();
            Arc::new(Registry::default())
        };
        let fixture = Self {
            authority: Authority::new(
                registry.clone(),
                static_zones("127.0.0.80"),
                RegistryZone {
                    reverse: true,
                    ..RegistryZone::from_config(&Config::default()).unwrap()
                },
            ),
            registry,
            runtime,
        };
        let web = [("10.0.0.1", 10), ("10.0.0.2", 10), ("fd00::3", 20)];
        for (i, (address, priority)) in web.into_iter().enumerate() {
            fixture.register("web", &format!("w-{i}"), address, priority);
        }
        for i in 0..40 {
            let address = format!("10.1.0.{}", i + 1);
            fixture.register("big", &format!("big-instance-{i:02}"), &address, 1);
        }
        fixture
    }

    fn register(&self, service: &str, id: &str, address: &str, priority: u16) {
        let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
            "address": address, "port": 80, "ports": {"http": 8080},
            "tags": ["v1"], "priority": priority,
        }))
        .unwrap();
        let instance = spec.into_instance(service, id).unwrap();
        self.runtime
            .block_on(self.registry.apply(Change::Register(Box::new(instance))))
            .unwrap();
    }
}

fn client() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

/// A query as a client would send it.
#[derive(Debug, Clone)]
struct Ask {
    name: String,
    rtype: RecordType,
    id: u16,
    recursion_desired: bool,
    checking_disabled: bool,
    /// EDNS payload size; `None`: no OPT.
    edns: Option<u16>,
    cookie: bool,
}

impl Ask {
    fn simple(name: &str, rtype: RecordType) -> Self {
        Self {
            name: name.into(),
            rtype,
            id: 7,
            recursion_desired: true,
            checking_disabled: false,
            edns: Some(1232),
            cookie: false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = self.id;
        message.metadata.recursion_desired = self.recursion_desired;
        message.metadata.checking_disabled = self.checking_disabled;
        message.add_query(Query::query(
            Name::from_ascii(&self.name).unwrap(),
            self.rtype,
        ));
        if let Some(size) = self.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(size);
            if self.cookie {
                edns.options_mut()
                    .insert(EdnsOption::Unknown(10, vec![1, 2, 3, 4, 5, 6, 7, 8]));
            }
            message.set_edns(edns);
        }
        message.to_vec().unwrap()
    }
}

/// The reply from the fast path, which must take this query.
fn fast(fixture: &Fixture, cache: &mut AnswerCache, ask: &Ask) -> Vec<u8> {
    let mut out = Vec::new();
    cache
        .respond(
            &fixture.authority,
            &ask.bytes(),
            client(),
            Transport::Udp(None),
            &mut out,
        )
        .expect("a simple query takes the fast path");
    out
}

/// The reply over TCP from the cache.
fn fast_stream(fixture: &Fixture, cache: &mut AnswerCache, ask: &Ask) -> Vec<u8> {
    let mut out = Vec::new();
    cache
        .respond(
            &fixture.authority,
            &ask.bytes(),
            client(),
            Transport::Stream,
            &mut out,
        )
        .expect("a simple query takes the fast path");
    out
}

fn general_stream(fixture: &Fixture, ask: &Ask) -> Vec<u8> {
    respond(
        &fixture.authority,
        &ask.bytes(),
        client(),
        Protocol::Tcp,
        None,
    )
    .expect("a reply")
    .bytes
}

fn general(fixture: &Fixture, ask: &Ask) -> Vec<u8> {
    respond(
        &fixture.authority,
        &ask.bytes(),
        client(),
        Protocol::Udp,
        None,
    )
    .expect("a reply")
    .bytes
}

/// Records as text, sorted; names compared without case, since the fast
/// path's owner names point at the question and so keep the client's case.
fn sorted(records: &[Record]) -> Vec<String> {
    let mut shown: Vec<String> = records
        .iter()
        .map(|r| r.to_string().to_ascii_lowercase())
        .collect();
    shown.sort();
    shown
}

/// Everything a client can see in a reply, with records in a canonical
/// order (rotation may differ between the paths).
fn seen(bytes: &[u8]) -> String {
    let message = Message::from_vec(bytes).expect("the reply parses");
    let edns = message
        .edns
        .as_ref()
        .map(|e| (e.max_payload(), e.version()));
    format!(
        "{:?}\nquestion {:?}\nanswers {:?}\nauthorities {:?}\nadditionals {:?}\nedns {:?}",
        message.metadata,
        message
            .queries
            .iter()
            .map(|q| q.to_string())
            .collect::<Vec<_>>(),
        sorted(&message.answers),
        sorted(&message.authorities),
        sorted(&message.additionals),
        edns,
    )
}

/// Letters of `name` upper-cased where `mask` has a bit set.
fn mixed_case(name: &str, mask: u64) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

const NAMES: [&str; 12] = [
    "web.svc.internal.",
    "_http._tcp.web.svc.internal.",
    "w-2.web.svc.internal.",
    "v1.tag.web.svc.internal.",
    "nosuch.svc.internal.",
    "svc.internal.",
    "_tcp.web.svc.internal.",
    "2.0.0.10.in-addr.arpa.",
    "www.example.test.",
    "example.test.",
    "gone.example.test.",
    "elsewhere.test.",
];
const TYPES: [RecordType; 9] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::ANY,
    RecordType::TXT,
    RecordType::NS,
    RecordType::SOA,
    RecordType::MX,
    RecordType::PTR,
];

fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(Fixture::new)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn the_fast_path_says_what_the_general_path_says(
        name in 0..NAMES.len(),
        rtype in 0..TYPES.len(),
        mask in any::<u64>(),
        id in any::<u16>(),
        recursion_desired in any::<bool>(),
        checking_disabled in any::<bool>(),
        edns in prop_oneof![Just(None), Just(Some(512)), Just(Some(1232)), Just(Some(4096)), Just(Some(100))],
        cookie in any::<bool>(),
        repeat in 1usize..3,
    ) {
        let fixture = fixture();
        let ask = Ask {
            name: mixed_case(NAMES[name], mask),
            rtype: TYPES[rtype],
            id, recursion_desired, checking_disabled, edns, cookie,
        };
        let mut cache = AnswerCache::new();
        let expected = seen(&general(fixture, &ask));
        let expected_stream = seen(&general_stream(fixture, &ask));
        // The first answer fills the cache, the later ones come from it.
        for _ in 0..repeat + 1 {
            let reply = fast(fixture, &mut cache, &ask);
            prop_assert_eq!(&reply[..2], &id.to_be_bytes()[..]);
            prop_assert_eq!(seen(&reply), expected.clone());
            let stream = fast_stream(fixture, &mut cache, &ask);
            prop_assert_eq!(seen(&stream), expected_stream.clone());
        }
        prop_assert!(cache.encoded() <= 1, "encoded {} times", cache.encoded());
    }
}

/// How one query of a sequence differs from the others asking the same
/// question: everything but the name's letters, type and class.
#[derive(Debug, Clone)]
struct Variant {
    mask: u64,
    id: u16,
    recursion_desired: bool,
    checking_disabled: bool,
    edns: Option<u16>,
    cookie: bool,
    /// Asked over TCP rather than UDP.
    stream: bool,
}

fn variant() -> impl Strategy<Value = Variant> {
    (
        any::<u64>(),
        any::<u16>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just(None),
            Just(Some(512)),
            Just(Some(1232)),
            Just(Some(4096))
        ],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(mask, id, recursion_desired, checking_disabled, edns, cookie, stream)| Variant {
                mask,
                id,
                recursion_desired,
                checking_disabled,
                edns,
                cookie,
                stream,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// One cache serves a sequence of differently shaped queries for the
    /// same question, over UDP and TCP in any order: an entry filled by one
    /// must answer the others as the general path would.
    #[test]
    fn an_entry_filled_by_one_query_answers_differently_shaped_ones(
        name in 0..NAMES.len(),
        rtype in 0..TYPES.len(),
        variants in prop::collection::vec(variant(), 2..8),
    ) {
        let fixture = fixture();
        let mut cache = AnswerCache::new();
        for v in variants {
            let ask = Ask {
                name: mixed_case(NAMES[name], v.mask),
                rtype: TYPES[rtype],
                id: v.id,
                recursion_desired: v.recursion_desired,
                checking_disabled: v.checking_disabled,
                edns: v.edns,
                cookie: v.cookie,
            };
            let (reply, expected) = if v.stream {
                (fast_stream(fixture, &mut cache, &ask), general_stream(fixture, &ask))
            } else {
                (fast(fixture, &mut cache, &ask), general(fixture, &ask))
            };
            prop_assert_eq!(&reply[..2], &v.id.to_be_bytes()[..]);
            prop_assert_eq!(seen(&reply), seen(&expected), "{:?}", ask);
        }
    }
}

#[test]
fn an_srv_answer_too_big_for_udp_is_truncated_on_both_paths() {
    let fixture = fixture();
    let mut cache = AnswerCache::new();
    for edns in [None, Some(1232)] {
        let ask = Ask {
            edns,
            ..Ask::simple("big.svc.internal.", RecordType::SRV)
        };
        let reply = Message::from_vec(&fast(fixture, &mut cache, &ask)).unwrap();
        assert!(reply.metadata.truncation, "{edns:?}: TC set");
        assert!(reply.answers.is_empty(), "no partial answer");
        assert_eq!(
            seen(&general(fixture, &ask)),
            seen(&fast(fixture, &mut cache, &ask))
        );
    }
    // Over TCP the whole answer goes, as the general path sends it.
    let whole = Ask::simple("big.svc.internal.", RecordType::SRV);
    let reply = Message::from_vec(&fast_stream(fixture, &mut cache, &whole)).unwrap();
    assert!(!reply.metadata.truncation);
    assert_eq!(reply.answers.len(), 40);
    assert_eq!(
        seen(&general_stream(fixture, &whole)),
        seen(&fast_stream(fixture, &mut cache, &whole))
    );
    // 40 addresses fit in 1232 bytes but not in 512.
    let addresses = Ask::simple("big.svc.internal.", RecordType::A);
    let reply = Message::from_vec(&fast(fixture, &mut cache, &addresses)).unwrap();
    assert_eq!(reply.answers.len(), 40);
    let classic = Ask {
        edns: None,
        ..addresses
    };
    let reply = Message::from_vec(&fast(fixture, &mut cache, &classic)).unwrap();
    assert!(reply.metadata.truncation && reply.answers.is_empty());
}

#[test]
fn cached_answers_rotate_within_each_priority() {
    // A fixture of its own: the turn counter is the authority's, and
    // other tests would advance a shared one.
    let fixture = &Fixture::new();
    let mut cache = AnswerCache::new();
    let ask = Ask::simple("_http._tcp.web.svc.internal.", RecordType::SRV);
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let reply = Message::from_vec(&fast(fixture, &mut cache, &ask)).unwrap();
        let order: Vec<String> = reply.answers.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(order.len(), 3);
        assert!(
            order[2].starts_with("20 "),
            "the backup stays last: {order:?}"
        );
        // Each SRV answer's target address follows it in the additionals.
        let targets: Vec<String> = reply
            .answers
            .iter()
            .map(|r| r.data.to_string().rsplit(' ').next().unwrap().to_owned())
            .collect();
        let owners: Vec<String> = reply
            .additionals
            .iter()
            .filter(|r| r.record_type() != RecordType::OPT)
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(targets, owners);
        firsts.insert(order[0].clone());
    }
    assert_eq!(firsts.len(), 2, "both priority-10 instances lead in turn");
}

#[test]
fn a_cached_answer_follows_changes_to_its_service_and_zones() {
    let fixture = Fixture::new();
    let mut cache = AnswerCache::new();
    let ask = Ask::simple("web.svc.internal.", RecordType::A);
    let count = |cache: &mut AnswerCache| {
        Message::from_vec(&fast(&fixture, cache, &ask))
            .unwrap()
            .answers
            .len()
    };
    assert_eq!(count(&mut cache), 2);
    assert_eq!(cache.encoded(), 1);
    fixture.register("other", "o-1", "10.9.0.1", 1);
    assert_eq!(count(&mut cache), 2, "another service's change keeps it");
    assert_eq!(cache.encoded(), 1, "kept, not encoded again");
    fixture.register("web", "w-9", "10.0.0.9", 10);
    assert_eq!(
        count(&mut cache),
        3,
        "its own service's change shows at once"
    );
    assert_eq!(cache.encoded(), 2, "re-encoded once");
    fixture.register("web", "w-10", "10.0.0.10", 10);
    fixture.register("other", "o-2", "10.9.0.2", 1);
    assert_eq!(
        count(&mut cache),
        4,
        "a change behind another service's change shows too"
    );

    let nothing = Ask::simple("fresh.svc.internal.", RecordType::A);
    let rcode = |cache: &mut AnswerCache| {
        Message::from_vec(&fast(&fixture, cache, &nothing))
            .unwrap()
            .metadata
            .response_code
    };
    assert_eq!(rcode(&mut cache).to_string(), "Non-Existent Domain");
    fixture.register("fresh", "f-1", "10.8.0.1", 1);
    assert_eq!(rcode(&mut cache).to_string(), "No Error");

    let www = Ask::simple("www.example.test.", RecordType::A);
    let address = |cache: &mut AnswerCache| {
        let reply = Message::from_vec(&fast(&fixture, cache, &www)).unwrap();
        reply.answers[0].data.to_string()
    };
    assert_eq!(address(&mut cache), "127.0.0.80");
    fixture.authority.replace_zones(static_zones("127.0.0.81"));
    assert_eq!(
        address(&mut cache),
        "127.0.0.81",
        "a zone reload shows at once"
    );
}

#[test]
fn unusual_queries_go_the_general_way() {
    let fixture = fixture();
    let mut cache = AnswerCache::new();
    let mut out = Vec::new();
    let simple = Ask::simple("web.svc.internal.", RecordType::A).bytes();
    let mut take = |bytes: &[u8]| {
        cache
            .respond(
                &fixture.authority,
                bytes,
                client(),
                Transport::Udp(None),
                &mut out,
            )
            .is_some()
    };
    assert!(take(&simple));
    let mut response = simple.clone();
    response[2] |= 0x80;
    assert!(!take(&response), "a response");
    let mut update = simple.clone();
    update[2] |= 5 << 3;
    assert!(!take(&update), "an UPDATE");
    assert!(!take(&simple[..simple.len() - 3]), "cut short");
    let mut trailing = simple.clone();
    trailing.push(0);
    assert!(!take(&trailing), "trailing bytes");
    let transfer = Ask {
        edns: None,
        ..Ask::simple("example.test.", RecordType::AXFR)
    };
    assert!(!take(&transfer.bytes()), "a zone transfer");
    let mut version = simple.clone();
    let at = version.len() - 5; // the OPT's version byte
    version[at] = 1;
    assert!(!take(&version), "EDNS version 1 (BADVERS)");
}

#[test]
fn a_full_cache_starts_over_and_keeps_answering() {
    let fixture = fixture();
    // One of a million workers gets the smallest share: 16,384 answers.
    let mut cache = AnswerCache::shared_by(1 << 20);
    for n in 0..16_384 {
        let ask = Ask::simple(&format!("flood-{n}.svc.internal."), RecordType::A);
        fast(fixture, &mut cache, &ask);
    }
    assert_eq!(
        cache.len(),
        16_384,
        "every distinct name is kept up to the share"
    );
    let ask = Ask::simple("web.svc.internal.", RecordType::A);
    let reply = Message::from_vec(&fast(fixture, &mut cache, &ask)).unwrap();
    assert_eq!(cache.len(), 1, "full: it started over with this answer");
    assert_eq!(reply.answers.len(), 2);
}
