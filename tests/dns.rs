//! DNS answers from the registry and the static zones, over UDP and TCP,
//! against a real muster on ephemeral ports.

mod support;

use std::collections::BTreeSet;
use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::json;
use support::{EXAMPLE_ZONE, Muster, exchange_udp, instance, query, query_tcp, query_udp, start};

#[derive(Clone, Copy, Debug)]
enum Transport {
    Udp,
    Tcp,
}

const BOTH: [Transport; 2] = [Transport::Udp, Transport::Tcp];

async fn ask(muster: &Muster, transport: Transport, name: &str, rtype: RecordType) -> Message {
    match transport {
        Transport::Udp => muster.udp(name, rtype).await,
        Transport::Tcp => muster.tcp(name, rtype).await,
    }
}

fn addresses(message: &Message) -> BTreeSet<IpAddr> {
    addresses_in(&message.answers)
}

fn addresses_in(records: &[hickory_proto::rr::Record]) -> BTreeSet<IpAddr> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect()
}

/// (target, port, priority, weight) of each SRV answer, sorted.
fn srv(message: &Message) -> Vec<(String, u16, u16, u16)> {
    let mut found: Vec<_> = message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.target.to_string(), s.port, s.priority, s.weight)),
            _ => None,
        })
        .collect();
    found.sort();
    found
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn assert_authoritative(message: &Message) {
    assert!(message.metadata.authoritative, "AA set");
    assert!(!message.metadata.recursion_available, "RA clear");
    assert_eq!(message.metadata.message_type, MessageType::Response);
}

/// A negative answer: the zone's SOA in authority, nothing else.
fn assert_negative(message: &Message, rcode: ResponseCode) {
    assert_eq!(message.metadata.response_code, rcode);
    assert_authoritative(message);
    assert!(message.answers.is_empty());
    assert_eq!(message.authorities.len(), 1);
    let soa = &message.authorities[0];
    assert_eq!(soa.name, Name::from_ascii("svc.internal.").unwrap());
    let RData::SOA(data) = &soa.data else {
        panic!("authority is not an SOA: {soa:?}")
    };
    assert_eq!(data.minimum, 5, "SOA minimum is dns.negative_ttl");
    assert_eq!(soa.ttl, 5, "negative TTL is min(SOA TTL, minimum)");
}

async fn payment_service(muster: &Muster) {
    muster
        .register_ok(
            "payment",
            "p-1",
            json!({
                "address": "10.0.1.1", "port": 8080, "tags": ["v2", "eu"],
                "ports": {"http": 8081, "metrics": {"port": 9100, "protocol": "udp"}},
                "weight": 10, "priority": 1
            }),
        )
        .await;
    muster
        .register_ok(
            "payment",
            "p-2",
            json!({"address": "10.0.1.2", "port": 8080, "tags": ["v1"], "ports": {"http": 8082}}),
        )
        .await;
    muster
        .register_ok("payment", "p-3", instance("fd00::3", 8080))
        .await;
}

#[tokio::test]
async fn registered_instances_resolve_over_udp_and_tcp() {
    let muster = start().await;
    payment_service(&muster).await;
    for transport in BOTH {
        let a = ask(&muster, transport, "payment.svc.internal.", RecordType::A).await;
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert_authoritative(&a);
        assert_eq!(
            addresses(&a),
            ips(&["10.0.1.1", "10.0.1.2"]),
            "{transport:?}"
        );
        assert!(a.answers.iter().all(|r| r.ttl == 5), "default TTL 5 s");

        let aaaa = ask(
            &muster,
            transport,
            "payment.svc.internal.",
            RecordType::AAAA,
        )
        .await;
        assert_eq!(addresses(&aaaa), ips(&["fd00::3"]));

        let default_srv = ask(&muster, transport, "payment.svc.internal.", RecordType::SRV).await;
        assert_eq!(
            srv(&default_srv),
            vec![
                ("p-1.payment.svc.internal.".into(), 8080, 1, 10),
                ("p-2.payment.svc.internal.".into(), 8080, 0, 1),
                ("p-3.payment.svc.internal.".into(), 8080, 0, 1),
            ]
        );
        let glue: BTreeSet<(String, IpAddr)> = default_srv
            .additionals
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some((r.name.to_string(), IpAddr::V4(a.0))),
                RData::AAAA(a) => Some((r.name.to_string(), IpAddr::V6(a.0))),
                _ => None,
            })
            .collect();
        assert!(glue.contains(&(
            "p-1.payment.svc.internal.".into(),
            "10.0.1.1".parse().unwrap()
        )));
        assert!(glue.contains(&(
            "p-3.payment.svc.internal.".into(),
            "fd00::3".parse().unwrap()
        )));

        let named = ask(
            &muster,
            transport,
            "_http._tcp.payment.svc.internal.",
            RecordType::SRV,
        )
        .await;
        assert_eq!(
            srv(&named),
            vec![
                ("p-1.payment.svc.internal.".into(), 8081, 1, 10),
                ("p-2.payment.svc.internal.".into(), 8082, 0, 1),
            ]
        );
        let udp_port = ask(
            &muster,
            transport,
            "_metrics._udp.payment.svc.internal.",
            RecordType::SRV,
        )
        .await;
        assert_eq!(
            srv(&udp_port),
            vec![("p-1.payment.svc.internal.".into(), 9100, 1, 10)]
        );
        let wrong_proto = ask(
            &muster,
            transport,
            "_metrics._tcp.payment.svc.internal.",
            RecordType::SRV,
        )
        .await;
        assert_eq!(wrong_proto.metadata.response_code, ResponseCode::NXDomain);

        let tagged = ask(
            &muster,
            transport,
            "v2.tag.payment.svc.internal.",
            RecordType::A,
        )
        .await;
        assert_eq!(addresses(&tagged), ips(&["10.0.1.1"]));
        let both_tags = ask(
            &muster,
            transport,
            "v2.eu.tag.payment.svc.internal.",
            RecordType::SRV,
        )
        .await;
        assert_eq!(srv(&both_tags).len(), 1);

        let one = ask(
            &muster,
            transport,
            "p-2.payment.svc.internal.",
            RecordType::A,
        )
        .await;
        assert_eq!(addresses(&one), ips(&["10.0.1.2"]));
    }
    muster.stop().await;
}

#[tokio::test]
async fn a_real_dns_client_library_resolves_over_udp_and_tcp() {
    use hickory_net::client::{Client, ClientHandle};
    use hickory_net::runtime::TokioRuntimeProvider;
    use hickory_net::tcp::TcpClientStream;
    use hickory_net::udp::UdpClientStream;
    use hickory_proto::rr::DNSClass;

    let muster = start().await;
    payment_service(&muster).await;
    let name = Name::from_ascii("payment.svc.internal.").unwrap();

    let udp = UdpClientStream::builder(muster.dns, TokioRuntimeProvider::default()).build();
    let (mut client, background) = Client::<TokioRuntimeProvider>::from_sender(udp);
    tokio::spawn(background);
    let response = client
        .query(name.clone(), DNSClass::IN, RecordType::A)
        .await
        .unwrap();
    assert_eq!(addresses(&response), ips(&["10.0.1.1", "10.0.1.2"]));

    let (connect, handle) = TcpClientStream::new(
        muster.dns,
        None,
        Some(support::DEADLINE),
        TokioRuntimeProvider::default(),
    );
    let stream = connect.await.unwrap();
    let (mut client, background) = Client::<TokioRuntimeProvider>::new(stream, handle);
    tokio::spawn(background);
    let response = client
        .query(name, DNSClass::IN, RecordType::SRV)
        .await
        .unwrap();
    assert_eq!(srv(&response).len(), 3);
    muster.stop().await;
}

#[tokio::test]
async fn deregistered_instances_leave_dns() {
    let muster = start().await;
    muster
        .register_ok("cart", "c-1", instance("10.0.2.1", 80))
        .await;
    muster
        .register_ok("cart", "c-2", instance("10.0.2.2", 80))
        .await;
    assert_eq!(muster.deregister("cart", "c-1").await, 204);
    let after_one = muster.udp("cart.svc.internal.", RecordType::A).await;
    assert_eq!(addresses(&after_one), ips(&["10.0.2.2"]));
    let gone_instance = muster.udp("c-1.cart.svc.internal.", RecordType::A).await;
    assert_negative(&gone_instance, ResponseCode::NXDomain);

    assert_eq!(muster.deregister("cart", "c-2").await, 204);
    for transport in BOTH {
        let gone = ask(&muster, transport, "cart.svc.internal.", RecordType::A).await;
        assert_negative(&gone, ResponseCode::NXDomain);
    }
    muster.stop().await;
}

#[tokio::test]
async fn negative_answers_carry_the_soa() {
    let muster = start().await;
    muster
        .register_ok(
            "web",
            "w-1",
            json!({"address": "10.0.3.1", "port": 80, "ports": {"http": 80}, "tags": ["blue"]}),
        )
        .await;
    for transport in BOTH {
        let unknown = ask(&muster, transport, "nothing.svc.internal.", RecordType::A).await;
        assert_negative(&unknown, ResponseCode::NXDomain);
        let deeper = ask(
            &muster,
            transport,
            "a.b.w-1.web.svc.internal.",
            RecordType::A,
        )
        .await;
        assert_negative(&deeper, ResponseCode::NXDomain);
        let no_aaaa = ask(&muster, transport, "web.svc.internal.", RecordType::AAAA).await;
        assert_negative(&no_aaaa, ResponseCode::NoError);
        let no_mx = ask(&muster, transport, "w-1.web.svc.internal.", RecordType::MX).await;
        assert_negative(&no_mx, ResponseCode::NoError);
        // Empty non-terminals above names that exist are NODATA, never NXDOMAIN.
        for ent in ["_tcp.web.svc.internal.", "tag.web.svc.internal."] {
            let answer = ask(&muster, transport, ent, RecordType::A).await;
            assert_negative(&answer, ResponseCode::NoError);
        }
        let no_udp_ports = ask(&muster, transport, "_udp.web.svc.internal.", RecordType::A).await;
        assert_negative(&no_udp_ports, ResponseCode::NXDomain);
        let unknown_tag = ask(
            &muster,
            transport,
            "green.tag.web.svc.internal.",
            RecordType::A,
        )
        .await;
        assert_negative(&unknown_tag, ResponseCode::NXDomain);
    }
    muster.stop().await;
}

#[tokio::test]
async fn names_outside_every_zone_are_refused() {
    let muster = start().await;
    for transport in BOTH {
        for name in ["example.com.", "internal.", "."] {
            let answer = ask(&muster, transport, name, RecordType::A).await;
            assert_eq!(
                answer.metadata.response_code,
                ResponseCode::Refused,
                "{name}"
            );
            assert!(!answer.metadata.authoritative);
            assert!(answer.answers.is_empty());
        }
    }
    muster.stop().await;
}

#[tokio::test]
async fn static_zone_records_and_apex_are_served() {
    let muster = start().await;
    let gateway = muster.udp("gateway.svc.internal.", RecordType::A).await;
    assert_eq!(addresses(&gateway), ips(&["127.0.0.1"]));
    let soa = muster.udp("svc.internal.", RecordType::SOA).await;
    assert_authoritative(&soa);
    assert!(matches!(soa.answers[0].data, RData::SOA(_)));
    let ns = muster.tcp("svc.internal.", RecordType::NS).await;
    assert!(matches!(ns.answers[0].data, RData::NS(_)));
    assert_eq!(addresses_in(&ns.additionals), ips(&["127.0.0.1"]));

    // A registered service hides a static record of the same name.
    muster
        .register_ok("gateway", "g-1", instance("10.9.9.9", 80))
        .await;
    let overlaid = muster.udp("gateway.svc.internal.", RecordType::A).await;
    assert_eq!(addresses(&overlaid), ips(&["10.9.9.9"]));
    muster.stop().await;
}

#[tokio::test]
async fn udp_truncates_large_answers_and_tcp_carries_them_whole() {
    let muster = start().await;
    for i in 0..200u16 {
        let address = format!("10.1.{}.{}", i / 250, i % 250 + 1);
        muster
            .register_ok("big", &format!("b-{i}"), instance(&address, 80))
            .await;
    }
    for edns in [None, Some(512), Some(1232), Some(4096)] {
        let reply = query_udp(muster.dns, &query("big.svc.internal.", RecordType::A, edns)).await;
        assert!(reply.metadata.truncation, "TC set with EDNS {edns:?}");
        assert!(reply.answers.is_empty(), "no partial RRset");
        assert_eq!(reply.queries.len(), 1);
        assert_eq!(
            reply.edns.is_some(),
            edns.is_some(),
            "OPT kept when the query had one"
        );
    }
    let whole = query_tcp(
        muster.dns,
        &query("big.svc.internal.", RecordType::A, Some(1232)),
    )
    .await;
    assert!(!whole.metadata.truncation);
    assert_eq!(addresses(&whole).len(), 200);
    let srv_whole = muster.tcp("big.svc.internal.", RecordType::SRV).await;
    assert_eq!(srv(&srv_whole).len(), 200);
    muster.stop().await;
}

#[tokio::test]
async fn udp_answers_respect_the_payload_size() {
    let muster = start().await;
    // 40 A records: ~660 bytes, over 512 but within 1232.
    for i in 0..40u16 {
        muster
            .register_ok(
                "mid",
                &format!("m-{i}"),
                instance(&format!("10.2.0.{}", i + 1), 80),
            )
            .await;
    }
    let classic = query_udp(muster.dns, &query("mid.svc.internal.", RecordType::A, None)).await;
    assert!(classic.metadata.truncation);
    let metrics = muster.metrics().await;
    assert!(
        metrics.lines().any(|l| l == "muster_dns_truncated_total 1"),
        "{metrics}"
    );
    let edns = query_udp(
        muster.dns,
        &query("mid.svc.internal.", RecordType::A, Some(1232)),
    )
    .await;
    assert!(!edns.metadata.truncation);
    assert_eq!(edns.answers.len(), 40);
    assert_eq!(edns.edns.as_ref().unwrap().max_payload(), 1232);
    muster.stop().await;
}

#[tokio::test]
async fn answers_rotate_between_queries() {
    let muster = start().await;
    for i in 1..=3u8 {
        muster
            .register_ok(
                "rr",
                &format!("r-{i}"),
                instance(&format!("10.3.0.{i}"), 80),
            )
            .await;
    }
    let mut firsts = BTreeSet::new();
    for _ in 0..3 {
        let reply = muster.udp("rr.svc.internal.", RecordType::A).await;
        assert_eq!(reply.answers.len(), 3);
        firsts.insert(addresses_in(&reply.answers[..1]));
    }
    assert!(firsts.len() > 1, "the first record changes between queries");
    muster.stop().await;
}

#[tokio::test]
async fn the_question_is_echoed_in_the_clients_case() {
    let muster = start().await;
    muster
        .register_ok("mixed", "m-1", instance("10.4.0.1", 80))
        .await;
    let reply = muster.udp("MiXeD.SvC.InTeRnAl.", RecordType::A).await;
    assert_eq!(reply.queries[0].name().to_string(), "MiXeD.SvC.InTeRnAl.");
    assert_eq!(addresses(&reply), ips(&["10.4.0.1"]));
    muster.stop().await;
}

#[tokio::test]
async fn other_opcodes_are_not_implemented() {
    let muster = start().await;
    let mut message = query("svc.internal.", RecordType::SOA, None);
    message.metadata.op_code = OpCode::Status;
    for reply in [
        query_udp(muster.dns, &message).await,
        query_tcp(muster.dns, &message).await,
    ] {
        assert_eq!(reply.metadata.response_code, ResponseCode::NotImp);
    }
    muster.stop().await;
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_nothing_and_serving_goes_on() {
    let muster = start().await;
    muster
        .register_ok("alive", "a-1", instance("10.5.0.1", 80))
        .await;
    // A header that promises one question, and no question.
    let header_only = [0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    let reply = exchange_udp(muster.dns, &header_only, support::DEADLINE)
        .await
        .expect("FORMERR");
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.metadata.id, 0xabcd);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    // Too short to be a header, and a response instead of a query: no reply.
    let short_wait = std::time::Duration::from_millis(300);
    assert!(
        exchange_udp(muster.dns, &[1, 2, 3], short_wait)
            .await
            .is_none()
    );
    let mut response = query("alive.svc.internal.", RecordType::A, None);
    response.metadata.message_type = MessageType::Response;
    assert!(
        exchange_udp(muster.dns, &response.to_vec().unwrap(), short_wait)
            .await
            .is_none()
    );

    // Garbage of many shapes, then a real query still answers.
    for seed in 0..200u32 {
        let garbage: Vec<u8> = (0..(seed % 64 + 12))
            .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 40503) >> 7) as u8)
            .collect();
        let _ = exchange_udp(muster.dns, &garbage, std::time::Duration::from_millis(5)).await;
    }
    let mut two_questions = query("alive.svc.internal.", RecordType::A, None);
    two_questions.add_query(hickory_proto::op::Query::query(
        Name::from_ascii("alive.svc.internal.").unwrap(),
        RecordType::AAAA,
    ));
    let reply = query_udp(muster.dns, &two_questions).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    let alive = muster.udp("alive.svc.internal.", RecordType::A).await;
    assert_eq!(addresses(&alive), ips(&["10.5.0.1"]));
    muster.stop().await;
}

#[tokio::test]
async fn edns_versions_above_zero_get_badvers() {
    let muster = start().await;
    let mut message = query("svc.internal.", RecordType::SOA, Some(1232));
    message.edns.as_mut().unwrap().set_version(1);
    let reply = query_udp(muster.dns, &message).await;
    // BADVERS and BADSIG share the value 16; hickory decodes it as BADSIG.
    assert_eq!(u16::from(reply.metadata.response_code), 16, "BADVERS");
    assert!(reply.edns.is_some());
    muster.stop().await;
}

#[tokio::test]
async fn ttls_follow_the_config() {
    let mut config = support::test_config();
    config.dns.ttl = std::time::Duration::from_secs(30);
    config.dns.negative_ttl = std::time::Duration::from_secs(2);
    let muster = support::start_with(config).await;
    muster
        .register_ok("slow", "s-1", instance("10.6.0.1", 80))
        .await;
    let reply = muster.udp("slow.svc.internal.", RecordType::A).await;
    assert_eq!(reply.answers[0].ttl, 30);
    let missing = muster.udp("fast.svc.internal.", RecordType::A).await;
    let RData::SOA(soa) = &missing.authorities[0].data else {
        panic!("no SOA")
    };
    assert_eq!(soa.minimum, 2);
    assert_eq!(missing.authorities[0].ttl, 2);
    muster.stop().await;
}

#[tokio::test]
async fn zones_reload_while_serving_and_a_bad_reload_keeps_the_old_zones() {
    let zones = tempfile::tempdir().unwrap();
    let file = zones.path().join("example.internal.zone");
    std::fs::write(&file, format!("{EXAMPLE_ZONE}www IN A 10.8.0.1\n")).unwrap();
    let mut config = support::test_config();
    config.zones_dir = zones.path().to_path_buf();
    let muster = support::start_with(config).await;
    let before = muster.udp("www.example.internal.", RecordType::A).await;
    assert_eq!(addresses(&before), ips(&["10.8.0.1"]));
    let registry_zone = muster.udp("svc.internal.", RecordType::SOA).await;
    assert_eq!(
        registry_zone.metadata.response_code,
        ResponseCode::NoError,
        "synthesized SOA"
    );

    std::fs::write(
        &file,
        format!("{EXAMPLE_ZONE}www IN A 10.8.0.2\napi IN A 10.8.0.3\n"),
    )
    .unwrap();
    muster.reloader().reload(None).unwrap();
    let after = muster.udp("www.example.internal.", RecordType::A).await;
    assert_eq!(addresses(&after), ips(&["10.8.0.2"]));
    let added = muster.tcp("api.example.internal.", RecordType::A).await;
    assert_eq!(addresses(&added), ips(&["10.8.0.3"]));

    std::fs::write(&file, format!("{EXAMPLE_ZONE}www IN A 10.8.0.999\n")).unwrap();
    let error = muster.reloader().reload(None).unwrap_err();
    assert!(
        error.to_string().contains("example.internal.zone:5"),
        "{error}"
    );
    let kept = muster.udp("www.example.internal.", RecordType::A).await;
    assert_eq!(
        addresses(&kept),
        ips(&["10.8.0.2"]),
        "the old zones still serve"
    );
    muster.stop().await;
}

#[tokio::test]
async fn updates_notifies_and_zone_transfers_are_refused() {
    let muster = start().await;
    for op_code in [OpCode::Update, OpCode::Notify] {
        let mut message = query("svc.internal.", RecordType::SOA, None);
        message.metadata.op_code = op_code;
        let reply = query_udp(muster.dns, &message).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::Refused,
            "{op_code:?}"
        );
    }
    for rtype in [RecordType::AXFR, RecordType::IXFR] {
        let reply = query_tcp(muster.dns, &query("svc.internal.", rtype, None)).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::Refused,
            "{rtype:?}"
        );
    }
    muster.stop().await;
}

#[tokio::test]
async fn any_gets_one_hinfo_record_per_rfc_8482() {
    let muster = start().await;
    payment_service(&muster).await;
    for name in [
        "payment.svc.internal.",
        "gateway.svc.internal.",
        "svc.internal.",
    ] {
        let reply = muster.udp(name, RecordType::ANY).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert_eq!(reply.answers.len(), 1, "{name}: {:?}", reply.answers);
        assert!(matches!(&reply.answers[0].data, RData::HINFO(h) if &h.cpu[..] == b"RFC8482"));
        assert!(reply.additionals.is_empty());
    }
    let missing = muster.udp("missing.svc.internal.", RecordType::ANY).await;
    assert_negative(&missing, ResponseCode::NXDomain);
    muster.stop().await;
}

#[tokio::test]
async fn max_answers_caps_each_answer_after_rotation() {
    let mut config = support::test_config();
    config.dns.max_answers = 2;
    // Each query comes from a new port, so the kernel spreads them over
    // both workers; rotation must not depend on which one answers.
    config.dns.udp_workers = 2;
    let muster = support::start_with(config).await;
    for i in 1..=5u8 {
        let body = json!({"address": format!("10.7.0.{i}"), "port": 80, "ports": {"http": 80}});
        muster.register_ok("capped", &format!("c-{i}"), body).await;
    }
    let mut seen = BTreeSet::new();
    for _ in 0..5 {
        let a = muster.udp("capped.svc.internal.", RecordType::A).await;
        assert_eq!(a.answers.len(), 2);
        seen.extend(addresses(&a));
        let srv_reply = muster
            .udp("_http._tcp.capped.svc.internal.", RecordType::SRV)
            .await;
        assert_eq!(srv(&srv_reply).len(), 2);
        assert_eq!(
            srv_reply.additionals.len(),
            2,
            "glue only for the records sent"
        );
    }
    assert_eq!(
        seen.len(),
        5,
        "rotation still gives every instance its turn"
    );
    muster.stop().await;
}

#[tokio::test]
async fn reverse_lookups_name_the_instances_at_an_address() {
    let mut config = support::test_config();
    config.dns.reverse = true;
    let muster = support::start_with(config).await;
    muster
        .register_ok("web", "w-1", instance("10.8.1.2", 80))
        .await;
    muster
        .register_ok("api", "a-1", instance("10.8.1.2", 81))
        .await;
    muster
        .register_ok("db", "d-1", instance("fd00::1:2", 5432))
        .await;
    let ptrs = |m: &Message| -> BTreeSet<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.to_string()),
                _ => None,
            })
            .collect()
    };
    let v4 = muster.udp("2.1.8.10.in-addr.arpa.", RecordType::PTR).await;
    assert_authoritative(&v4);
    assert_eq!(
        ptrs(&v4),
        [
            "a-1.api.svc.internal.".to_string(),
            "w-1.web.svc.internal.".to_string()
        ]
        .into()
    );
    let v6_name = "2.0.0.0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
    let v6 = muster.tcp(v6_name, RecordType::PTR).await;
    assert_eq!(ptrs(&v6), ["d-1.db.svc.internal.".to_string()].into());
    let partial = muster.udp("8.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(
        (partial.metadata.response_code, partial.answers.len()),
        (ResponseCode::NoError, 0),
        "a node above addresses is NODATA"
    );
    let unknown = muster.udp("9.9.9.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
    // A drained instance is not named.
    let drained = muster
        .http
        .put(muster.url("/v1/services/web/instances/w-1/maintenance"))
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200);
    let after = muster.udp("2.1.8.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(ptrs(&after), ["a-1.api.svc.internal.".to_string()].into());
    muster.deregister("api", "a-1").await;
    muster.deregister("web", "w-1").await;
    let gone = muster.udp("2.1.8.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
    muster.stop().await;
}

#[tokio::test]
async fn reverse_zones_are_refused_unless_enabled() {
    let muster = start().await;
    muster
        .register_ok("web", "w-1", instance("10.8.1.2", 80))
        .await;
    let reply = muster.udp("2.1.8.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    muster.stop().await;
}

#[tokio::test]
async fn metrics_count_queries_by_transport_type_and_rcode() {
    let muster = start().await;
    muster
        .register_ok("m", "m-1", instance("10.9.0.1", 80))
        .await;
    for _ in 0..3 {
        muster.udp("m.svc.internal.", RecordType::A).await;
    }
    muster.tcp("nope.svc.internal.", RecordType::AAAA).await;
    let text = muster.metrics().await;
    let value = |series: &str| support::metric(&text, series);
    assert_eq!(
        value("muster_dns_queries_total{transport=\"udp\",qtype=\"A\",rcode=\"NOERROR\"}"),
        3.0,
        "{text}"
    );
    assert_eq!(
        value("muster_dns_queries_total{transport=\"tcp\",qtype=\"AAAA\",rcode=\"NXDOMAIN\"}"),
        1.0
    );
    assert_eq!(value("muster_dns_query_duration_seconds_count"), 4.0);
    assert_eq!(value("muster_dns_truncated_total"), 0.0);
    muster.stop().await;
}

/// Sends `count` identical queries at once from one socket and sorts the
/// replies into (full answers, slipped TC replies); the rest were dropped.
/// Waits until no reply has come for 300 ms.
async fn flood(server: std::net::SocketAddr, count: u16) -> (usize, usize) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for id in 0..count {
        let mut message = query("flood.svc.internal.", RecordType::A, None);
        message.metadata.id = id;
        socket
            .send_to(&message.to_vec().unwrap(), server)
            .await
            .unwrap();
    }
    let (mut answered, mut slipped) = (0, 0);
    let mut buffer = vec![0u8; 4096];
    let idle = std::time::Duration::from_millis(300);
    while let Ok(Ok(length)) = tokio::time::timeout(idle, socket.recv(&mut buffer)).await {
        let reply = Message::from_vec(&buffer[..length]).unwrap();
        if reply.metadata.truncation && reply.answers.is_empty() {
            slipped += 1;
        } else {
            assert_eq!(reply.answers.len(), 1);
            answered += 1;
        }
    }
    (answered, slipped)
}

#[tokio::test]
async fn response_rate_limiting_slips_some_and_drops_the_rest_of_a_flood() {
    let mut config = support::test_config();
    config.dns.rrl.responses_per_second = 5;
    config.dns.rrl.slip = 2;
    config.dns.rrl.exempt = Vec::new();
    let muster = support::start_with(config).await;
    muster
        .register_ok("flood", "f-1", instance("10.10.0.1", 80))
        .await;
    let (answered, slipped) = flood(muster.dns, 100).await;
    let dropped = 100 - answered - slipped;
    assert!(
        (5..=10).contains(&answered),
        "about one second's budget answered: {answered}"
    );
    assert!(
        slipped >= 35 && dropped >= 35,
        "every 2nd limited answer slips: {slipped} slipped, {dropped} dropped"
    );
    let over_tcp = muster.tcp("flood.svc.internal.", RecordType::A).await;
    assert_eq!(over_tcp.answers.len(), 1, "TCP is never limited");
    let metrics = muster.metrics().await;
    assert!(
        metrics.contains(&format!(
            "muster_dns_rrl_total{{action=\"drop\"}} {dropped}"
        )),
        "{metrics}"
    );
    muster.stop().await;
}

#[tokio::test]
async fn exempt_prefixes_and_the_default_are_never_limited() {
    let muster = start().await;
    muster
        .register_ok("flood", "f-1", instance("10.10.0.1", 80))
        .await;
    assert_eq!(
        flood(muster.dns, 100).await,
        (100, 0),
        "RRL is off by default"
    );
    muster.stop().await;
    let mut config = support::test_config();
    config.dns.rrl.responses_per_second = 5;
    let muster = support::start_with(config).await;
    muster
        .register_ok("flood", "f-1", instance("10.10.0.1", 80))
        .await;
    assert_eq!(
        flood(muster.dns, 100).await,
        (100, 0),
        "loopback is exempt by default"
    );
    muster.stop().await;
}

/// Sends one length-prefixed query on `stream` and reads the answer,
/// giving up after `wait`.
async fn ask_on(
    stream: &mut tokio::net::TcpStream,
    name: &str,
    wait: std::time::Duration,
) -> Option<Message> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bytes = query(name, RecordType::A, None).to_vec().unwrap();
    stream
        .write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&bytes).await.unwrap();
    let read = async {
        let mut length = [0u8; 2];
        stream.read_exact(&mut length).await.ok()?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(length))];
        stream.read_exact(&mut reply).await.ok()?;
        Message::from_vec(&reply).ok()
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

#[tokio::test]
async fn tcp_connections_are_capped_and_pipelined() {
    let mut config = support::test_config();
    config.dns.max_tcp_connections = 2;
    let muster = support::start_with(config).await;
    muster
        .register_ok("tcp", "t-1", instance("10.11.0.1", 53))
        .await;
    let deadline = support::DEADLINE;
    let mut first = tokio::net::TcpStream::connect(muster.dns).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(muster.dns).await.unwrap();
    assert!(
        ask_on(&mut first, "tcp.svc.internal.", deadline)
            .await
            .is_some()
    );
    assert!(
        ask_on(&mut second, "tcp.svc.internal.", deadline)
            .await
            .is_some(),
        "queries on one connection in turn"
    );
    assert!(
        ask_on(&mut second, "tcp.svc.internal.", deadline)
            .await
            .is_some()
    );
    let mut third = tokio::net::TcpStream::connect(muster.dns).await.unwrap();
    let short = std::time::Duration::from_millis(300);
    assert!(
        ask_on(&mut third, "tcp.svc.internal.", short)
            .await
            .is_none(),
        "a third connection waits"
    );
    drop(first);
    use tokio::io::AsyncReadExt;
    let mut length = [0u8; 2];
    tokio::time::timeout(deadline, third.read_exact(&mut length))
        .await
        .expect("the waiting connection is served once a slot frees")
        .unwrap();
    muster.stop().await;
}

#[tokio::test]
async fn idle_tcp_connections_are_closed() {
    let mut config = support::test_config();
    config.dns.tcp_idle_timeout = std::time::Duration::from_millis(200);
    let muster = support::start_with(config).await;
    let mut idle = tokio::net::TcpStream::connect(muster.dns).await.unwrap();
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(support::DEADLINE, idle.read(&mut byte))
        .await
        .expect("the server closes an idle connection");
    assert_eq!(closed.unwrap(), 0, "EOF");
    muster.stop().await;
}

#[tokio::test]
async fn static_zones_transfer_to_allowed_peers_over_tcp_only() {
    let zones = tempfile::tempdir().unwrap();
    let text = format!("{EXAMPLE_ZONE}www IN A 10.8.0.1\napi IN AAAA fd00::8\n");
    std::fs::write(zones.path().join("example.internal.zone"), text).unwrap();
    let mut config = support::test_config();
    config.zones_dir = zones.path().to_path_buf();
    config.dns.transfers = [
        (
            "example.internal".to_string(),
            vec!["127.0.0.0/8".parse().unwrap()],
        ),
        (
            "svc.internal.".to_string(),
            vec!["127.0.0.0/8".parse().unwrap()],
        ),
    ]
    .into();
    let muster = support::start_with(config).await;
    let axfr = query_tcp(
        muster.dns,
        &query("example.internal.", RecordType::AXFR, None),
    )
    .await;
    assert_eq!(axfr.metadata.response_code, ResponseCode::NoError);
    let types: Vec<RecordType> = axfr.answers.iter().map(|r| r.record_type()).collect();
    assert_eq!(types.first(), Some(&RecordType::SOA));
    assert_eq!(types.last(), Some(&RecordType::SOA));
    assert_eq!(
        axfr.answers.len(),
        2 + 4,
        "SOA, NS, ns A, www A, api AAAA, SOA"
    );
    let ixfr = query_tcp(
        muster.dns,
        &query("example.internal.", RecordType::IXFR, None),
    )
    .await;
    assert_eq!(
        ixfr.answers.len(),
        axfr.answers.len(),
        "IXFR gets the whole zone"
    );

    let registry = query_tcp(muster.dns, &query("svc.internal.", RecordType::AXFR, None)).await;
    assert_eq!(
        registry.metadata.response_code,
        ResponseCode::Refused,
        "never the registry zone"
    );
    let over_udp = query_udp(
        muster.dns,
        &query("example.internal.", RecordType::AXFR, None),
    )
    .await;
    assert_eq!(
        over_udp.metadata.response_code,
        ResponseCode::Refused,
        "never over UDP"
    );
    muster.stop().await;

    let mut config = support::test_config();
    config.zones_dir = zones.path().to_path_buf();
    config.dns.transfers = [(
        "example.internal.".to_string(),
        vec!["10.0.0.0/8".parse().unwrap()],
    )]
    .into();
    let muster = support::start_with(config).await;
    let stranger = query_tcp(
        muster.dns,
        &query("example.internal.", RecordType::AXFR, None),
    )
    .await;
    assert_eq!(
        stranger.metadata.response_code,
        ResponseCode::Refused,
        "a peer not listed"
    );
    muster.stop().await;
}

/// The TXT strings of the answers, each record's strings joined.
fn txt(message: &Message) -> Vec<String> {
    message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn grpc_service_config_is_served_as_txt() {
    let muster = start().await;
    let long_name = "x".repeat(300);
    let config_a = json!([{"serviceConfig": {"loadBalancingConfig": [{"round_robin": {}}], "note": long_name}}]);
    let config_b = json!([{"serviceConfig": {"loadBalancingConfig": [{"pick_first": {}}]}}]);
    let mut a = instance("10.12.0.1", 50051);
    a["grpc_config"] = config_a.clone();
    let mut b = instance("10.12.0.2", 50051);
    b["grpc_config"] = config_b.clone();
    let stored = muster.register_ok("greeter", "g-b", b).await;
    assert_eq!(stored["grpc_config"], config_b);
    muster.register_ok("greeter", "g-a", a).await;
    muster
        .register_ok("plain", "p-1", instance("10.12.0.3", 80))
        .await;

    for transport in BOTH {
        let reply = ask(
            &muster,
            transport,
            "_grpc_config.greeter.svc.internal.",
            RecordType::TXT,
        )
        .await;
        let values = txt(&reply);
        assert_eq!(values.len(), 1);
        let json = values[0]
            .strip_prefix("grpc_config=")
            .expect("gRPC's prefix");
        let parsed: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(
            parsed, config_a,
            "the lowest id's config, joined across 255-byte strings"
        );
        let RData::TXT(record) = &reply.answers[0].data else {
            panic!()
        };
        assert!(record.txt_data.len() > 1 && record.txt_data.iter().all(|s| s.len() <= 255));
    }
    let other_type = muster
        .udp("_grpc_config.greeter.svc.internal.", RecordType::A)
        .await;
    assert_negative(&other_type, ResponseCode::NoError);
    let without = muster
        .udp("_grpc_config.plain.svc.internal.", RecordType::TXT)
        .await;
    assert_negative(&without, ResponseCode::NXDomain);

    // Drained, g-a stops speaking for the service.
    let drained = muster
        .http
        .put(muster.url("/v1/services/greeter/instances/g-a/maintenance"))
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200);
    let reply = muster
        .udp("_grpc_config.greeter.svc.internal.", RecordType::TXT)
        .await;
    let json = txt(&reply)[0]
        .strip_prefix("grpc_config=")
        .unwrap()
        .to_string();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&json).unwrap(),
        config_b
    );

    for bad in [
        json!({"serviceConfig": {}}),
        json!([]),
        json!([{"no": 1}]),
        json!([{"serviceConfig": "x".repeat(5000)}]),
    ] {
        let mut body = instance("10.12.0.9", 80);
        body["grpc_config"] = bad.clone();
        let (status, error) = muster.register("greeter", "g-z", body).await;
        assert_eq!(
            (status, error["field"].as_str()),
            (400, Some("grpc_config")),
            "{bad}"
        );
    }
    muster.stop().await;
}

#[tokio::test]
async fn srv_answers_rotate_within_each_priority_level() {
    let mut config = support::test_config();
    config.dns.max_answers = 3;
    let muster = support::start_with(config).await;
    for (id, priority) in [("p-1", 0), ("p-2", 0), ("p-3", 0), ("b-1", 1), ("b-2", 1)] {
        let body = json!({"address": "10.14.0.1", "port": 80, "priority": priority});
        muster.register_ok("levels", id, body).await;
    }
    let mut firsts = BTreeSet::new();
    for _ in 0..4 {
        let reply = muster.udp("levels.svc.internal.", RecordType::SRV).await;
        let order: Vec<(u16, String)> = reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.priority, s.target.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(order.len(), 3);
        assert!(
            order.iter().all(|(p, _)| *p == 0),
            "the cap keeps the preferred level: {order:?}"
        );
        firsts.insert(order[0].1.clone());
    }
    assert!(firsts.len() > 1, "the preferred level rotates");
    muster.stop().await;
}

#[tokio::test]
async fn every_udp_worker_socket_answers() {
    let mut config = support::test_config();
    config.dns.udp_workers = 4;
    let muster = support::start_with(config).await;
    muster
        .register_ok("spread", "s-1", instance("10.15.0.1", 80))
        .await;
    // The kernel hashes each client address onto one of the group's
    // sockets; a socket nobody served would lose about a quarter of these.
    for _ in 0..40 {
        let reply = query_udp(
            muster.dns,
            &query("spread.svc.internal.", RecordType::A, None),
        )
        .await;
        assert_eq!(addresses(&reply), ips(&["10.15.0.1"]));
    }
    muster.stop().await;
}

#[tokio::test]
async fn a_burst_of_queries_is_answered_whole_and_to_each_sender() {
    let muster = start().await;
    // Two services, so an answer that went with the wrong query of a
    // batch shows.
    let services = [("burst-a", "10.16.0.1"), ("burst-b", "10.16.0.2")];
    for (service, address) in services {
        muster
            .register_ok(service, "b-1", instance(address, 80))
            .await;
    }
    // Four clients take turns sending 100 queries each without waiting,
    // so the server takes them from its socket in batches that mix
    // senders; every reply must go back to the client that asked,
    // carrying that query's id and the answer to that query.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    for n in 0..100u16 {
        for (client, socket) in clients.iter().enumerate() {
            let (service, _) = services[usize::from(n) % 2];
            let mut message = query(&format!("{service}.svc.internal."), RecordType::A, None);
            message.metadata.id = client as u16 * 1000 + n;
            socket
                .send_to(&message.to_vec().unwrap(), muster.dns)
                .await
                .unwrap();
        }
    }
    for (client, socket) in clients.iter().enumerate() {
        let mut ids = BTreeSet::new();
        let mut buffer = [0u8; 512];
        while ids.len() < 100 {
            let received =
                tokio::time::timeout(std::time::Duration::from_secs(10), socket.recv(&mut buffer))
                    .await
                    .expect("every query of the burst is answered")
                    .unwrap();
            let reply = Message::from_vec(&buffer[..received]).unwrap();
            let (service, address) = services[usize::from(reply.metadata.id % 1000) % 2];
            assert_eq!(
                reply.queries[0].name().to_string(),
                format!("{service}.svc.internal.")
            );
            assert_eq!(addresses(&reply), ips(&[address]));
            assert_eq!(
                usize::from(reply.metadata.id / 1000),
                client,
                "a reply to this client"
            );
            assert!(ids.insert(reply.metadata.id), "each query answered once");
        }
    }
    muster.stop().await;
}

#[tokio::test]
#[ignore = "needs IPv6 loopback"]
async fn queries_over_ipv6_are_answered_to_their_ipv6_sender() {
    let mut config = support::test_config();
    config.dns.listen = vec!["[::1]:0".parse().unwrap()];
    let muster = support::start_with(config).await;
    muster
        .register_ok("six", "s-1", instance("fd00::16", 80))
        .await;
    let reply = query_udp(
        muster.dns,
        &query("six.svc.internal.", RecordType::AAAA, None),
    )
    .await;
    assert_eq!(addresses(&reply), ips(&["fd00::16"]));
    muster.stop().await;
}

#[tokio::test]
async fn a_zone_too_large_for_one_message_transfers_in_several() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // About 350 KB: six messages or so.
    let (muster, _zones) = support::start_with_transferable_zone(&support::txt_records(3000)).await;
    let request = query("example.internal.", RecordType::AXFR, None);
    let bytes = request.to_vec().unwrap();
    let mut stream = tokio::net::TcpStream::connect(muster.dns).await.unwrap();
    let length = u16::try_from(bytes.len()).unwrap().to_be_bytes();
    stream
        .write_all(&[&length[..], &bytes].concat())
        .await
        .unwrap();
    // Messages until the SOA comes again, as a secondary reads them.
    let (mut messages, mut records) = (0, Vec::new());
    while records.len() < 2 || records.last() != Some(&RecordType::SOA) {
        let mut length = [0u8; 2];
        let read = tokio::time::timeout(support::DEADLINE, stream.read_exact(&mut length));
        read.await.expect("the rest of the transfer").unwrap();
        let mut message = vec![0u8; usize::from(u16::from_be_bytes(length))];
        stream.read_exact(&mut message).await.unwrap();
        let message = Message::from_vec(&message).expect("a well-formed message");
        assert_eq!(message.metadata.id, request.metadata.id);
        assert_eq!(message.metadata.response_code, ResponseCode::NoError);
        assert!(message.metadata.authoritative);
        records.extend(message.answers.iter().map(|r| r.record_type()));
        messages += 1;
    }
    assert!(messages > 1, "one message of {} records", records.len());
    assert_eq!(records.first(), Some(&RecordType::SOA));
    assert_eq!(records.len(), 3000 + 4, "SOA, NS, ns A, the TXTs, SOA");
    let txts = records.iter().filter(|&&t| t == RecordType::TXT).count();
    assert_eq!(txts, 3000);
    // And muster still answers.
    let after = query_tcp(
        muster.dns,
        &query("example.internal.", RecordType::SOA, None),
    )
    .await;
    assert_eq!(after.answers.len(), 1);
    muster.stop().await;
}
