//! Health: real HTTP and TCP targets that the tests kill and restart, TTL
//! heartbeats, flap damping, maintenance, `deregister_after`, filtering
//! and blocking queries. TTL timing is checked exactly on a paused clock.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use muster::registry::health::{self, HeartbeatError};
use muster::registry::{Change, HealthStatus, InstanceKey, InstanceSpec, Registry};
use serde_json::{Value, json};
use support::{HttpTarget, Muster, resolved, start, start_with, test_config, wait_until};
use tokio_util::sync::CancellationToken;

async fn heartbeat(muster: &Muster, service: &str, id: &str, body: Option<Value>) -> (u16, Value) {
    let request = muster
        .http
        .put(muster.url(&format!("/v1/services/{service}/instances/{id}/heartbeat")));
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    support::status_and_json(request.send().await.unwrap()).await
}

async fn maintenance(muster: &Muster, service: &str, id: &str, body: Value) -> (u16, Value) {
    let response = muster
        .http
        .put(muster.url(&format!(
            "/v1/services/{service}/instances/{id}/maintenance"
        )))
        .json(&body)
        .send()
        .await
        .unwrap();
    support::status_and_json(response).await
}

async fn health_of(muster: &Muster, service: &str, id: &str) -> String {
    let (_, instance) = muster
        .get(&format!("/v1/services/{service}/instances/{id}"))
        .await;
    instance["health"]["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

async fn until_resolved(muster: &Muster, name: &str, expected: &[&str]) {
    wait_until(&format!("{name} resolves to {expected:?}"), || async {
        (resolved(muster, name).await == expected).then_some(())
    })
    .await
}

#[tokio::test]
async fn an_http_checked_instance_leaves_dns_when_its_target_dies_and_returns_with_it() {
    let muster = start().await;
    let mut target = HttpTarget::start(200).await;
    let registered = muster
        .register_ok(
            "orders",
            "o-1",
            json!({"address": "10.0.0.1", "port": 80,
                   "check": {"http": target.url(), "interval": "200ms", "timeout": "100ms"}}),
        )
        .await;
    assert_eq!(
        registered["health"]["status"], "critical",
        "critical until the first pass"
    );
    assert_eq!(registered["check"]["http"], target.url());
    assert_eq!(registered["check"]["interval"], "200ms");
    until_resolved(&muster, "orders.svc.internal.", &["10.0.0.1"]).await;
    assert_eq!(health_of(&muster, "orders", "o-1").await, "passing");

    target.kill();
    until_resolved(&muster, "orders.svc.internal.", &[]).await;
    let (_, instance) = muster.get("/v1/services/orders/instances/o-1").await;
    assert_eq!(instance["health"]["status"], "critical");
    assert!(!instance["health"]["output"].as_str().unwrap().is_empty());
    // The name still exists: NODATA with the SOA, not NXDOMAIN.
    let reply = muster.udp("orders.svc.internal.", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(reply.authorities.len(), 1);

    target.restart().await;
    until_resolved(&muster, "orders.svc.internal.", &["10.0.0.1"]).await;
    muster.stop().await;
}

#[tokio::test]
async fn a_tcp_checked_instance_follows_its_listener() {
    let muster = start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    muster
        .register_ok(
            "cache",
            "c-1",
            json!({"address": "10.0.0.2", "port": 6379,
                   "check": {"tcp": address.to_string(), "interval": "200ms", "timeout": "100ms"}}),
        )
        .await;
    until_resolved(&muster, "cache.svc.internal.", &["10.0.0.2"]).await;
    drop(listener);
    until_resolved(&muster, "cache.svc.internal.", &[]).await;
    let _listener = wait_until("the port is free again", || async {
        tokio::net::TcpListener::bind(address).await.ok()
    })
    .await;
    until_resolved(&muster, "cache.svc.internal.", &["10.0.0.2"]).await;
    muster.stop().await;
}

#[tokio::test]
async fn http_429_is_warning_and_other_statuses_are_critical() {
    let muster = start().await;
    let target = HttpTarget::start(429).await;
    let check = json!({"http": target.url(), "interval": "200ms", "timeout": "100ms"});
    muster
        .register_ok(
            "api",
            "a-1",
            json!({"address": "10.0.0.3", "port": 80, "check": check}),
        )
        .await;
    until_resolved(&muster, "api.svc.internal.", &["10.0.0.3"]).await;
    assert_eq!(
        health_of(&muster, "api", "a-1").await,
        "warning",
        "warning still serves"
    );
    target.set_status(503);
    until_resolved(&muster, "api.svc.internal.", &[]).await;
    assert_eq!(health_of(&muster, "api", "a-1").await, "critical");
    target.set_status(204);
    until_resolved(&muster, "api.svc.internal.", &["10.0.0.3"]).await;
    assert_eq!(health_of(&muster, "api", "a-1").await, "passing");
    muster.stop().await;
}

#[tokio::test]
async fn only_passing_keeps_warning_instances_out_of_dns_and_healthy_views() {
    let mut config = test_config();
    config.dns.only_passing = true;
    let muster = start_with(config).await;
    let target = HttpTarget::start(429).await;
    let check = json!({"http": target.url(), "interval": "200ms", "timeout": "100ms"});
    muster
        .register_ok(
            "api",
            "a-1",
            json!({"address": "10.0.0.4", "port": 80, "check": check}),
        )
        .await;
    muster
        .register_ok("api", "a-2", support::instance("10.0.0.5", 80))
        .await;
    wait_until("a-1 is warning", || async {
        (health_of(&muster, "api", "a-1").await == "warning").then_some(())
    })
    .await;
    assert_eq!(resolved(&muster, "api.svc.internal.").await, ["10.0.0.5"]);
    let (_, healthy) = muster.get("/v1/services/api?healthy=true").await;
    let ids: Vec<&str> = healthy["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a-2"]);
    let (_, all) = muster.get("/v1/services/api").await;
    assert_eq!(all["instances"].as_array().unwrap().len(), 2);
    muster.stop().await;
}

#[tokio::test]
async fn a_ttl_instance_lives_by_its_heartbeats() {
    let muster = start().await;
    let registered = muster
        .register_ok(
            "jobs",
            "j-1",
            json!({"address": "10.0.0.6", "port": 80, "check": {"ttl": "1s"}}),
        )
        .await;
    assert_eq!(registered["health"]["status"], "critical");
    assert_eq!(
        resolved(&muster, "jobs.svc.internal.").await,
        Vec::<String>::new()
    );

    let (status, after) = heartbeat(&muster, "jobs", "j-1", None).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(
        after["health"]["status"], "passing",
        "the reply shows the new status"
    );
    assert_eq!(resolved(&muster, "jobs.svc.internal.").await, ["10.0.0.6"]);

    let (_, warned) = heartbeat(
        &muster,
        "jobs",
        "j-1",
        Some(json!({"status": "warning", "output": "slow disk"})),
    )
    .await;
    assert_eq!(warned["health"]["status"], "warning");
    assert_eq!(warned["health"]["output"], "slow disk");

    // No more heartbeats: critical once the TTL runs out.
    until_resolved(&muster, "jobs.svc.internal.", &[]).await;
    let (_, instance) = muster.get("/v1/services/jobs/instances/j-1").await;
    assert_eq!(instance["health"]["status"], "critical");
    assert!(
        instance["health"]["output"]
            .as_str()
            .unwrap()
            .contains("ttl")
    );
    muster.stop().await;
}

#[tokio::test]
async fn heartbeats_are_refused_where_they_do_not_apply() {
    let muster = start().await;
    let (status, body) = heartbeat(&muster, "ghost", "g-1", None).await;
    assert_eq!(status, 404, "unknown instances re-register: {body}");

    let target = HttpTarget::start(200).await;
    muster
        .register_ok(
            "web",
            "w-1",
            json!({"address": "10.0.0.7", "port": 80,
            "check": {"http": target.url(), "interval": "1s"}}),
        )
        .await;
    let (status, body) = heartbeat(&muster, "web", "w-1", None).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["field"], "check");

    muster
        .register_ok("plain", "p-1", support::instance("10.0.0.8", 80))
        .await;
    let (status, body) = heartbeat(&muster, "plain", "p-1", Some(json!({"status": "dead"}))).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "status");
    let (status, body) = heartbeat(
        &muster,
        "plain",
        "p-1",
        Some(json!({"status": "critical", "output": "x".repeat(5000)})),
    )
    .await;
    assert_eq!(
        status, 200,
        "an unchecked instance takes the status as sent"
    );
    assert_eq!(body["health"]["status"], "critical");
    assert_eq!(
        body["health"]["output"].as_str().unwrap().len(),
        4096,
        "output cut at 4 KiB"
    );
    assert_eq!(
        resolved(&muster, "plain.svc.internal.").await,
        Vec::<String>::new()
    );
    heartbeat(&muster, "plain", "p-1", None).await;
    assert_eq!(resolved(&muster, "plain.svc.internal.").await, ["10.0.0.8"]);
    muster.stop().await;
}

#[tokio::test]
async fn maintenance_drains_an_instance_but_keeps_it_registered() {
    let muster = start().await;
    muster
        .register_ok("pay", "p-1", support::instance("10.0.1.1", 80))
        .await;
    muster
        .register_ok("pay", "p-2", support::instance("10.0.1.2", 80))
        .await;
    let (status, drained) = maintenance(
        &muster,
        "pay",
        "p-1",
        json!({"enabled": true, "reason": "deploy 42"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(drained["maintenance"]["reason"], "deploy 42");
    assert_eq!(resolved(&muster, "pay.svc.internal.").await, ["10.0.1.2"]);
    let reply = muster.udp("p-1.pay.svc.internal.", RecordType::A).await;
    assert!(reply.answers.is_empty());
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::NoError,
        "still registered"
    );

    // A re-registration during a deploy keeps the instance drained.
    muster
        .register_ok("pay", "p-1", support::instance("10.0.1.1", 80))
        .await;
    assert_eq!(resolved(&muster, "pay.svc.internal.").await, ["10.0.1.2"]);

    let (status, back) = maintenance(&muster, "pay", "p-1", json!({"enabled": false})).await;
    assert_eq!(status, 200);
    assert!(back["maintenance"].is_null());
    assert_eq!(
        resolved(&muster, "pay.svc.internal.").await,
        ["10.0.1.1", "10.0.1.2"]
    );

    let (status, _) = maintenance(&muster, "pay", "nope", json!({"enabled": true})).await;
    assert_eq!(status, 404);
    let (status, body) = maintenance(&muster, "pay", "p-1", json!({"reason": "no flag"})).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("enabled")));
    muster.stop().await;
}

#[tokio::test]
async fn deregister_after_removes_an_instance_that_stays_critical() {
    let muster = start().await;
    muster
        .register_ok(
            "batch",
            "b-1",
            json!({"address": "10.0.2.1", "port": 80,
            "check": {"ttl": "1s", "deregister_after": "1s"}}),
        )
        .await;
    muster
        .register_ok(
            "batch",
            "b-2",
            json!({"address": "10.0.2.2", "port": 80,
            "check": {"ttl": "30s", "deregister_after": "1s"}}),
        )
        .await;
    heartbeat(&muster, "batch", "b-2", None).await;
    wait_until("b-1 is deregistered", || async {
        let (status, _) = muster.get("/v1/services/batch/instances/b-1").await;
        (status == 404).then_some(())
    })
    .await;
    let (status, _) = muster.get("/v1/services/batch/instances/b-2").await;
    assert_eq!(status, 200, "a passing instance is never reaped");
    muster.stop().await;
}

#[tokio::test]
async fn changing_the_check_resets_health_and_keeping_it_does_not() {
    let muster = start().await;
    let body = json!({"address": "10.0.3.1", "port": 80, "check": {"ttl": "30s"}});
    muster.register_ok("svc", "s-1", body.clone()).await;
    heartbeat(&muster, "svc", "s-1", None).await;
    let mut retagged = body.clone();
    retagged["tags"] = json!(["blue"]);
    let kept = muster.register_ok("svc", "s-1", retagged).await;
    assert_eq!(
        kept["health"]["status"], "passing",
        "same check, same health"
    );
    let mut rechecked = body;
    rechecked["check"] = json!({"ttl": "20s"});
    let reset = muster.register_ok("svc", "s-1", rechecked).await;
    assert_eq!(
        reset["health"]["status"], "critical",
        "a new check starts over"
    );
    let passing = json!({"address": "10.0.3.1", "port": 80, "check": {"ttl": "20s", "initial_status": "passing"}});
    let started = muster.register_ok("svc", "s-2", passing).await;
    assert_eq!(started["health"]["status"], "passing");
    muster.stop().await;
}

#[tokio::test]
async fn a_blocking_query_returns_on_a_change_and_at_the_end_of_its_wait() {
    let muster = Arc::new(start().await);
    muster
        .register_ok("watched", "w-1", support::instance("10.0.4.1", 80))
        .await;
    let response = muster
        .http
        .get(muster.url("/v1/services/watched"))
        .send()
        .await
        .unwrap();
    let index: u64 = response.headers()["x-muster-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();

    let mut waiter = {
        let muster = muster.clone();
        tokio::spawn(async move {
            let url = muster.url(&format!("/v1/services/watched?index={index}&wait=60s"));
            let response = muster
                .http
                .get(url)
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .unwrap();
            let header: u64 = response.headers()["x-muster-index"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            (header, response.json::<Value>().await.unwrap())
        })
    };
    // Deliberate pauses proving a negative: the watcher is parked, and
    // another service changing does not wake it.
    let parked = Duration::from_millis(300);
    assert!(
        tokio::time::timeout(parked, &mut waiter).await.is_err(),
        "parked before any change"
    );
    muster
        .register_ok("other", "x-1", support::instance("10.0.4.9", 80))
        .await;
    assert!(
        tokio::time::timeout(parked, &mut waiter).await.is_err(),
        "another service's change does not wake the watcher"
    );
    muster
        .register_ok("watched", "w-2", support::instance("10.0.4.2", 80))
        .await;
    let (new_index, view) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the blocking query returns promptly on a change")
        .unwrap();
    assert!(new_index > index);
    assert_eq!(view["instances"].as_array().unwrap().len(), 2, "{view}");

    let started = std::time::Instant::now();
    let (status, same) = muster
        .get(&format!(
            "/v1/services/watched?index={new_index}&wait=300ms"
        ))
        .await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited");
    assert_eq!(same["index"].as_u64(), Some(new_index));

    let (status, body) = muster.get("/v1/services/watched?index=abc").await;
    assert_eq!((status, body["field"].as_str()), (400, Some("index")));
    let (status, body) = muster
        .get("/v1/services/watched?index=1&wait=forever")
        .await;
    assert_eq!((status, body["field"].as_str()), (400, Some("wait")));
    Arc::into_inner(muster).unwrap().stop().await;
}

/// A registry with a checker and no network, for the paused clock.
async fn checked_registry(
    check: Value,
) -> (
    Arc<Registry>,
    health::HealthHandle,
    CancellationToken,
    InstanceKey,
) {
    let registry = Arc::new(Registry::default());
    let shutdown = CancellationToken::new();
    let (handle, _task) = health::spawn(registry.clone(), shutdown.clone());
    let spec: InstanceSpec =
        serde_json::from_value(json!({"address": "10.9.0.1", "port": 80, "check": check})).unwrap();
    registry
        .apply(Change::Register(Box::new(
            spec.into_instance("ttl", "t-1").unwrap(),
        )))
        .await
        .unwrap();
    let key = InstanceKey {
        service: "ttl".into(),
        id: "t-1".into(),
    };
    (registry, handle, shutdown, key)
}

fn status_of(registry: &Registry, key: &InstanceKey) -> HealthStatus {
    registry
        .snapshot()
        .instance(&key.service, &key.id)
        .unwrap()
        .health
        .status
}

/// Lets the checker task run everything that is ready at this instant.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_missed_heartbeat_turns_critical_exactly_at_the_ttl() {
    let (registry, handle, shutdown, key) =
        checked_registry(json!({"ttl": "15s", "failures_before_critical": 3})).await;
    settle().await;
    let status = handle
        .heartbeat(key.clone(), HealthStatus::Passing, String::new())
        .await
        .unwrap();
    assert_eq!(status, HealthStatus::Passing);

    tokio::time::advance(Duration::from_millis(14_999)).await;
    settle().await;
    assert_eq!(
        status_of(&registry, &key),
        HealthStatus::Passing,
        "1 ms before the TTL"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(
        status_of(&registry, &key),
        HealthStatus::Critical,
        "at the TTL, whatever the damping"
    );

    // A heartbeat restarts the clock from its own moment.
    handle
        .heartbeat(key.clone(), HealthStatus::Passing, String::new())
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    handle
        .heartbeat(key.clone(), HealthStatus::Passing, String::new())
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(
        status_of(&registry, &key),
        HealthStatus::Passing,
        "20 s, but 10 s since the last"
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    settle().await;
    assert_eq!(status_of(&registry, &key), HealthStatus::Critical);
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn flap_damping_counts_consecutive_results() {
    let (registry, handle, shutdown, key) = checked_registry(json!({
        "ttl": "1m", "success_before_passing": 3, "failures_before_critical": 2
    }))
    .await;
    settle().await;
    use HealthStatus::{Critical, Passing};
    // (reported, status afterwards, why)
    let steps = [
        (Passing, Critical, "one pass of three"),
        (Passing, Critical, "two passes of three"),
        (Critical, Critical, "a failure: the count starts over"),
        (Passing, Critical, "one pass again"),
        (Passing, Critical, "two passes again"),
        (Passing, Passing, "third pass in a row"),
        (Critical, Passing, "one failure is damped"),
        (Passing, Passing, "a pass resets the failures"),
        (Critical, Passing, "one failure again"),
        (Critical, Critical, "second failure in a row"),
    ];
    for (reported, expected, why) in steps {
        let status = handle
            .heartbeat(key.clone(), reported, String::new())
            .await
            .unwrap();
        assert_eq!(status, expected, "{why}");
    }
    assert_eq!(status_of(&registry, &key), HealthStatus::Critical);

    // A heartbeat for an instance that is not TTL-checked is refused.
    let other = InstanceKey {
        service: "ttl".into(),
        id: "nope".into(),
    };
    assert_eq!(
        handle
            .heartbeat(other, HealthStatus::Passing, String::new())
            .await,
        Err(HeartbeatError::NotTtlChecked)
    );
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn health_is_published_only_when_it_flips() {
    let (registry, handle, shutdown, key) = checked_registry(json!({"ttl": "1m"})).await;
    settle().await;
    handle
        .heartbeat(key.clone(), HealthStatus::Passing, String::new())
        .await
        .unwrap();
    let version = registry.snapshot().version();
    for _ in 0..10 {
        handle
            .heartbeat(key.clone(), HealthStatus::Passing, "fine".into())
            .await
            .unwrap();
    }
    assert_eq!(
        registry.snapshot().version(),
        version,
        "same status: no new snapshot"
    );
    handle
        .heartbeat(key.clone(), HealthStatus::Warning, String::new())
        .await
        .unwrap();
    assert_eq!(registry.snapshot().version(), version + 1);
    shutdown.cancel();
}
