//! The HTTP API over a real socket: registration, reads, and every way a
//! request can be rejected without changing anything.

mod support;

use serde_json::{Value, json};
use support::{instance, start, status_and_json};

#[tokio::test]
async fn registration_stores_a_normalised_instance() {
    let muster = start().await;
    let stored = muster
        .register_ok(
            "Payment",
            "P-1",
            json!({
                "address": "10.0.0.1", "port": 8080,
                "ports": {"HTTP": 8081, "dns": {"port": 53, "protocol": "udp"}},
                "tags": ["V2", "eu", "v2"], "meta": {"version": "1.4.2"},
            }),
        )
        .await;
    assert_eq!(stored["service"], "payment");
    assert_eq!(stored["id"], "p-1");
    assert_eq!(stored["address"], "10.0.0.1");
    assert_eq!(
        stored["ports"]["http"],
        json!({"port": 8081, "protocol": "tcp"})
    );
    assert_eq!(
        stored["ports"]["dns"],
        json!({"port": 53, "protocol": "udp"})
    );
    assert_eq!(stored["tags"], json!(["eu", "v2"]));
    assert_eq!(stored["meta"]["version"], "1.4.2");
    assert_eq!(stored["weight"], 1);
    assert_eq!(stored["priority"], 0);
    assert_eq!(stored["health"]["status"], "passing");

    let (status, fetched) = muster.get("/v1/services/payment/instances/p-1").await;
    assert_eq!(status, 200);
    assert_eq!(fetched, stored);
    let (status, fetched) = muster.get("/v1/services/PAYMENT/instances/P-1").await;
    assert_eq!(status, 200, "names are case-insensitive");
    assert_eq!(fetched["id"], "p-1");
    muster.stop().await;
}

#[tokio::test]
async fn put_is_idempotent_and_replaces() {
    let muster = start().await;
    muster
        .register_ok("web", "w-1", instance("10.0.0.1", 80))
        .await;
    let (_, before) = muster.get("/v1/status").await;
    muster
        .register_ok("web", "w-1", instance("10.0.0.1", 80))
        .await;
    let (_, same) = muster.get("/v1/status").await;
    assert_eq!(
        same["index"].as_u64().unwrap(),
        before["index"].as_u64().unwrap(),
        "an identical PUT changes nothing"
    );
    let replaced = muster
        .register_ok("web", "w-1", instance("10.0.0.2", 81))
        .await;
    assert_eq!(replaced["address"], "10.0.0.2");
    let (_, after) = muster.get("/v1/status").await;
    assert_eq!(after["instances"], 1);
    assert_eq!(
        after["index"].as_u64(),
        before["index"].as_u64().map(|i| i + 1)
    );
    muster.stop().await;
}

#[tokio::test]
async fn services_list_detail_and_status() {
    let muster = start().await;
    muster
        .register_ok("web", "w-1", instance("10.0.0.1", 80))
        .await;
    muster
        .register_ok("web", "w-2", instance("10.0.0.2", 80))
        .await;
    muster
        .register_ok("api", "a-1", instance("10.0.0.3", 80))
        .await;
    let (status, list) = muster.get("/v1/services").await;
    assert_eq!(status, 200);
    assert_eq!(
        list,
        json!([
            {"name": "api", "instances": 1, "healthy": 1},
            {"name": "web", "instances": 2, "healthy": 2},
        ])
    );
    let (status, web) = muster.get("/v1/services/web").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = web["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["w-1", "w-2"]);
    assert!(web["index"].as_u64().unwrap() >= 2);

    let (status, summary) = muster.get("/v1/status").await;
    assert_eq!(status, 200);
    assert_eq!(summary["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(summary["services"], 2);
    assert_eq!(summary["instances"], 3);
    assert!(summary["uptime_seconds"].is_u64());
    let (status, health) = muster.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "serving");
    muster.stop().await;
}

#[tokio::test]
async fn delete_removes_and_unknown_is_404() {
    let muster = start().await;
    muster
        .register_ok("web", "w-1", instance("10.0.0.1", 80))
        .await;
    assert_eq!(muster.deregister("web", "w-1").await, 204);
    assert_eq!(muster.deregister("web", "w-1").await, 404);
    let (status, body) = muster.get("/v1/services/web/instances/w-1").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("w-1"));
    let (status, _) = muster.get("/v1/services/web").await;
    assert_eq!(status, 404, "a service with no instances is gone");
    muster.stop().await;
}

/// A body that passes every rule, to break one field at a time.
fn valid() -> Value {
    json!({
        "address": "10.0.0.1", "port": 80, "ports": {"http": 8080},
        "tags": ["a"], "meta": {"k": "v"}, "weight": 5, "priority": 1
    })
}

/// `{"k0": value, "k1": value, …}` with `count` keys.
fn map_of(count: usize, value: Value) -> Value {
    Value::Object(
        (0..count)
            .map(|i| (format!("k{i}"), value.clone()))
            .collect(),
    )
}

fn with(field: &str, value: Value) -> Value {
    let mut body = valid();
    body[field] = value;
    body
}

#[tokio::test]
async fn every_validation_rule_names_its_field_and_changes_nothing() {
    let muster = start().await;
    muster
        .register_ok("web", "w-1", instance("10.0.0.9", 80))
        .await;
    let (_, before) = muster.get("/v1/status").await;
    let (_, stored_before) = muster.get("/v1/services/web/instances/w-1").await;

    let long_label = "a".repeat(64);
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("we_b", "w-1", valid(), "service"),
        (&long_label, "w-1", valid(), "service"),
        ("-web", "w-1", valid(), "service"),
        ("web", "tag", valid(), "id"),
        ("web", "w.1", valid(), "id"),
        ("web", "w-1", with("address", json!("10.0.0")), "address"),
        ("web", "w-1", with("address", json!("0.0.0.0")), "address"),
        ("web", "w-1", with("address", json!(17)), "address"),
        ("web", "w-1", with("port", json!(0)), "port"),
        ("web", "w-1", with("port", json!(65536)), "port"),
        ("web", "w-1", with("port", json!("80")), "port"),
        ("web", "w-1", with("weight", json!(0)), "weight"),
        ("web", "w-1", with("weight", json!(65536)), "weight"),
        ("web", "w-1", with("priority", json!(-1)), "priority"),
        ("web", "w-1", with("priority", json!(65536)), "priority"),
        (
            "web",
            "w-1",
            with("tags", json!(["ok", "not ok"])),
            "tags[1]",
        ),
        (
            "web",
            "w-1",
            with(
                "tags",
                json!((0..33).map(|i| format!("t{i}")).collect::<Vec<_>>()),
            ),
            "tags",
        ),
        ("web", "w-1", with("meta", map_of(65, json!("v"))), "meta"),
        (
            "web",
            "w-1",
            with("meta", json!({"k": "v".repeat(513)})),
            "meta.k",
        ),
        (
            "web",
            "w-1",
            with("meta", json!({"bad key": "v"})),
            "meta.bad key",
        ),
        ("web", "w-1", with("ports", map_of(17, json!(1))), "ports"),
        (
            "web",
            "w-1",
            with("ports", json!({"_http": 80})),
            "ports._http",
        ),
        (
            "web",
            "w-1",
            with("ports", json!({"http": 0})),
            "ports.http",
        ),
        (
            "web",
            "w-1",
            with("ports", json!({"dns": {"port": 53, "protocol": "sctp"}})),
            "ports.dns.protocol",
        ),
        (
            "web",
            "w-1",
            with("ports", json!({"dns": {"port": 70000}})),
            "ports.dns.port",
        ),
        ("web", "w-1", with("colour", json!("blue")), "colour"),
        ("web", "w-1", json!({"port": 80}), "address"),
        ("web", "w-1", json!({"address": "10.0.0.1"}), "port"),
    ];
    for (service, id, body, field) in cases {
        let (status, error) = muster.register(service, id, body.clone()).await;
        assert_eq!(status, 400, "{service}/{id} {body}: {error}");
        assert_eq!(error["field"], field, "{service}/{id} {body}: {error}");
        assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (_, after) = muster.get("/v1/status").await;
    assert_eq!(
        after["index"].as_u64().unwrap(),
        before["index"].as_u64().unwrap(),
        "no rejected request changed anything"
    );
    assert_eq!(after["instances"], before["instances"]);
    let (_, stored_after) = muster.get("/v1/services/web/instances/w-1").await;
    assert_eq!(stored_after, stored_before);
    muster.stop().await;
}

#[tokio::test]
async fn transport_level_rejections_are_json() {
    let muster = start().await;
    let path = muster.url("/v1/services/web/instances/w-1");

    let not_json = muster
        .http
        .put(&path)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(not_json).await;
    assert_eq!(status, 415);
    assert!(body["error"].is_string());
    let no_type = muster
        .http
        .put(&path)
        .body(valid().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(no_type.status().as_u16(), 415);

    let huge = json!({"address": "10.0.0.1", "port": 80, "meta": {"k": "v".repeat(70 * 1024)}});
    let (status, body) =
        status_and_json(muster.http.put(&path).json(&huge).send().await.unwrap()).await;
    assert_eq!(status, 413);
    assert!(body["error"].as_str().unwrap().contains("65536"));

    let broken = muster
        .http
        .put(&path)
        .header("content-type", "application/json")
        .body("{\"address\": ")
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(broken).await;
    assert_eq!(status, 400);
    assert!(body["error"].is_string());

    let (status, body) =
        status_and_json(muster.http.post(&path).json(&valid()).send().await.unwrap()).await;
    assert_eq!(status, 405);
    assert!(body["error"].is_string());
    let (status, body) = muster.get("/v2/nothing").await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());

    let (_, summary) = muster.get("/v1/status").await;
    assert_eq!(summary["instances"], 0);
    muster.stop().await;
}
