//! `dig` (bind9-dnsutils) against a real muster: what operators type.
//! Ignored in plain `cargo test`; CI installs dig and runs them.

mod support;

use std::process::Command;

use serde_json::json;
use support::{Muster, instance, start};

async fn dig(muster: &Muster, args: &[&str]) -> String {
    let mut command = Command::new("dig");
    command
        .arg(format!("@{}", muster.dns.ip()))
        .arg("-p")
        .arg(muster.dns.port().to_string())
        .args(["+time=2", "+tries=1"])
        .args(args);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("dig runs (install bind9-dnsutils)");
    assert!(output.status.success(), "dig {args:?} failed");
    String::from_utf8(output.stdout).unwrap()
}

/// The header flags dig printed (`qr`, `aa`, `tc`, …).
fn flags(text: &str) -> Vec<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix(";; flags: "))
        .and_then(|l| l.split(';').next())
        .map(|f| f.split_whitespace().collect())
        .unwrap_or_default()
}

/// The output with every run of white space folded to one space.
fn folded(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    lines.sort_unstable();
    lines
}

#[tokio::test]
#[ignore = "needs dig"]
async fn dig_finds_registered_instances_and_loses_them_on_deregistration() {
    let muster = start().await;
    muster
        .register_ok(
            "payment",
            "p-1",
            json!({"address": "10.0.1.6", "port": 8080, "ports": {"http": 8081}}),
        )
        .await;
    muster
        .register_ok("payment", "p-2", instance("10.0.1.7", 8080))
        .await;

    let a = dig(&muster, &["payment.svc.internal", "A", "+short"]).await;
    assert_eq!(lines(&a), ["10.0.1.6", "10.0.1.7"]);
    let a_tcp = dig(&muster, &["payment.svc.internal", "A", "+short", "+tcp"]).await;
    assert_eq!(lines(&a_tcp), ["10.0.1.6", "10.0.1.7"]);
    let srv = dig(
        &muster,
        &["_http._tcp.payment.svc.internal", "SRV", "+short"],
    )
    .await;
    assert_eq!(lines(&srv), ["0 1 8081 p-1.payment.svc.internal."]);
    let full = dig(&muster, &["payment.svc.internal", "SRV"]).await;
    assert!(full.contains("status: NOERROR"), "{full}");
    let header = flags(&full);
    assert!(
        header.contains(&"aa") && !header.contains(&"ra"),
        "AA set, RA clear: {full}"
    );
    assert!(
        folded(&full).contains("p-2.payment.svc.internal. 5 IN A 10.0.1.7"),
        "glue: {full}"
    );

    assert_eq!(muster.deregister("payment", "p-1").await, 204);
    assert_eq!(muster.deregister("payment", "p-2").await, 204);
    let gone = dig(&muster, &["payment.svc.internal", "A"]).await;
    assert!(gone.contains("status: NXDOMAIN"), "{gone}");
    assert!(
        folded(&gone).contains("svc.internal. 5 IN SOA"),
        "SOA in authority: {gone}"
    );
    muster.stop().await;
}

#[tokio::test]
#[ignore = "needs dig"]
async fn dig_sees_refused_nodata_and_mixed_case() {
    let muster = start().await;
    muster
        .register_ok("web", "w-1", instance("10.0.2.1", 80))
        .await;
    let refused = dig(&muster, &["example.com", "A"]).await;
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let nodata = dig(&muster, &["web.svc.internal", "AAAA"]).await;
    assert!(nodata.contains("status: NOERROR"), "{nodata}");
    assert!(nodata.contains("ANSWER: 0"), "{nodata}");
    assert!(nodata.contains("AUTHORITY: 1"), "{nodata}");
    let mixed = dig(&muster, &["WeB.sVc.InTeRnAl", "A"]).await;
    assert!(
        mixed.contains(";WeB.sVc.InTeRnAl.\t\tIN\tA"),
        "question echoed: {mixed}"
    );
    assert!(mixed.contains("10.0.2.1"), "{mixed}");
    muster.stop().await;
}

#[tokio::test]
#[ignore = "needs dig"]
async fn dig_gets_tc_over_udp_and_everything_over_tcp() {
    let muster = start().await;
    for i in 0..200u16 {
        let address = format!("10.3.{}.{}", i / 250, i % 250 + 1);
        muster
            .register_ok("big", &format!("b-{i}"), instance(&address, 80))
            .await;
    }
    let udp_only = dig(
        &muster,
        &[
            "big.svc.internal",
            "A",
            "+ignore",
            "+notcp",
            "+bufsize=1232",
        ],
    )
    .await;
    assert!(flags(&udp_only).contains(&"tc"), "{udp_only}");
    assert!(
        udp_only.contains("ANSWER: 0"),
        "no partial RRset: {udp_only}"
    );
    // dig retries over TCP by itself after TC.
    let retried = dig(&muster, &["big.svc.internal", "A", "+short"]).await;
    assert_eq!(lines(&retried).len(), 200);
    let tcp = dig(&muster, &["big.svc.internal", "A", "+short", "+tcp"]).await;
    assert_eq!(lines(&tcp).len(), 200);
    muster.stop().await;
}

#[tokio::test]
#[ignore = "needs dig"]
async fn dig_transfers_an_allowed_static_zone() {
    let (muster, _zones) = support::start_with_transferable_zone("www IN A 10.8.0.1\n").await;
    let axfr = dig(&muster, &["example.internal", "AXFR"]).await;
    let records: Vec<&str> = axfr
        .lines()
        .filter(|l| !l.starts_with(';') && !l.is_empty())
        .collect();
    assert_eq!(records.len(), 5, "{axfr}");
    assert!(
        folded(records[0]).contains("IN SOA") && folded(records[4]).contains("IN SOA"),
        "{axfr}"
    );
    assert!(axfr.contains("10.8.0.1"));
    muster.stop().await;
}

#[tokio::test]
#[ignore = "needs dig"]
async fn dig_transfers_a_zone_too_large_for_one_message() {
    let (muster, _zones) = support::start_with_transferable_zone(&support::txt_records(3000)).await;
    let axfr = dig(&muster, &["example.internal", "AXFR"]).await;
    let records: Vec<&str> = axfr
        .lines()
        .filter(|l| !l.starts_with(';') && !l.is_empty())
        .collect();
    assert_eq!(
        records.len(),
        3000 + 4,
        "{}",
        &axfr[axfr.len().saturating_sub(600)..]
    );
    assert!(folded(records[0]).contains("IN SOA"));
    assert!(folded(records[3003]).contains("IN SOA"));
    // dig counts the messages it read: `;; XFR size: 3004 records (messages 6, …`.
    let messages: u32 = axfr
        .split("(messages ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no message count: {}", &axfr[axfr.len() - 300..]));
    assert!(messages > 1, "{messages} message");
    muster.stop().await;
}

/// dnsperf's summary line `label: N` as a number.
fn dnsperf_count(output: &str, label: &str) -> u64 {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in {output}"))
}

#[tokio::test]
#[ignore = "needs dnsperf"]
async fn rrl_holds_back_a_dnsperf_flood() {
    let mut config = support::test_config();
    config.dns.rrl.responses_per_second = 50;
    config.dns.rrl.slip = 2;
    config.dns.rrl.exempt = Vec::new();
    let muster = support::start_with(config).await;
    muster
        .register_ok("flood", "f-1", instance("10.13.0.1", 80))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let queries = dir.path().join("queries");
    std::fs::write(&queries, "flood.svc.internal A\n").unwrap();
    // A bounded loopback flood: 2,000 queries/s for 2 s from one client.
    let mut dnsperf = std::process::Command::new("dnsperf");
    dnsperf
        .args(["-s", "127.0.0.1", "-p", &muster.dns.port().to_string()])
        .arg("-d")
        .arg(&queries)
        .args(["-l", "2", "-Q", "2000", "-q", "5000", "-t", "1", "-c", "1"]);
    let output = tokio::task::spawn_blocking(move || dnsperf.output())
        .await
        .unwrap()
        .expect("dnsperf runs (apt dnsperf)");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let sent = dnsperf_count(&report, "Queries sent");
    let completed = dnsperf_count(&report, "Queries completed");
    let lost = dnsperf_count(&report, "Queries lost");
    let metrics = muster.metrics().await;
    let counter = |series: &str| support::metric(&metrics, series) as u64;
    let (dropped, slipped) = (
        counter("muster_dns_rrl_total{action=\"drop\"}"),
        counter("muster_dns_rrl_total{action=\"slip\"}"),
    );
    eprintln!(
        "dnsperf: sent {sent}, completed {completed}, lost {lost}; muster: dropped {dropped}, slipped {slipped}"
    );
    assert!(sent >= 2000, "{report}");
    assert_eq!(lost, dropped, "every lost query is one RRL dropped");
    assert!(
        dropped * 3 > sent,
        "most of the flood is held back: {report}"
    );
    assert!(
        slipped * 3 > sent,
        "every 2nd held-back answer slips: {report}"
    );
    assert!(
        completed - slipped <= 200,
        "about 50 answers a second get through whole"
    );
    muster.stop().await;
}
