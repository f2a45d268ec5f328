//! The front door against real backends the tests start: balancing,
//! failover, retries and ejection, failures, header hygiene, WebSocket,
//! HTTP/2, reload and metrics.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use muster::Config;
use serde_json::{Value, json};
use support::upstream::{Upstream, websocket_echo};
use support::{Muster, start_with, test_config};

/// A test config with these `[[gateway.routes]]` (and other `[gateway]`
/// keys) on ephemeral ports.
fn with_gateway(gateway_toml: &str) -> Config {
    let parsed = Config::from_toml(gateway_toml, "gateway.toml").expect("valid test config");
    let mut config = test_config();
    let listen = config.gateway.listen;
    config.gateway = parsed.gateway;
    config.gateway.listen = listen;
    config
}

const ORDERS: &str = r#"
[gateway]
eject_after_errors = 2
[[gateway.routes]]
name = "orders"
path_prefix = "/api/orders"
service = "orders"
port = "http"
strip_prefix = "/api"
timeout = "500ms"
"#;

/// ORDERS with `from` replaced by `to`; `from` must be there, so a test
/// cannot quietly run on the unchanged config.
fn orders_with(from: &str, to: &str) -> String {
    assert!(ORDERS.contains(from), "ORDERS has no {from:?}");
    ORDERS.replace(from, to)
}

fn gateway_url(muster: &Muster, path: &str) -> String {
    format!("http://{}{}", muster.gateway.unwrap(), path)
}

async fn get(muster: &Muster, path: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    let response = muster
        .http
        .get(gateway_url(muster, path))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let json = response.json().await.unwrap_or(Value::Null);
    (status, json, headers)
}

/// Which backend answered each of `n` GETs of `path`.
async fn spread(muster: &Muster, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let (status, body, _) = get(muster, path).await;
        assert_eq!(status, 200, "{body}");
        *counts
            .entry(body["backend"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[tokio::test]
async fn upstream_connections_are_reused_then_closed_when_idle() {
    // Long enough that no gap between the 20 requests outlasts it, even on
    // a loaded machine; short enough to wait out below.
    let toml = orders_with(
        "eject_after_errors = 2",
        "eject_after_errors = 2\nupstream_idle_timeout = \"2s\"",
    );
    let muster = start_with(with_gateway(&toml)).await;
    let backend = Upstream::start("o-1").await;
    muster
        .register_ok("orders", "o-1", backend.instance(json!({})))
        .await;
    for _ in 0..20 {
        let (status, body, _) = get(&muster, "/api/orders/1").await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(backend.hits(), 20);
    assert_eq!(
        backend.accepted.load(Ordering::SeqCst),
        1,
        "one request at a time needs one kept-alive connection"
    );
    support::wait_until("the idle upstream connection is closed", || async {
        (backend.open.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    let (status, body, _) = get(&muster, "/api/orders/1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        backend.accepted.load(Ordering::SeqCst),
        2,
        "a new connection"
    );
}

/// Connections a raw test upstream accepted, and those it has closed.
#[derive(Clone, Default)]
struct Counts {
    accepted: std::sync::Arc<AtomicUsize>,
    closed: std::sync::Arc<AtomicUsize>,
}

/// A raw HTTP/1.1 upstream on loopback; `serve` handles each connection.
async fn raw_upstream<F, Fut>(serve: F) -> (std::net::SocketAddr, Counts)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Counts::default();
    let seen = counts.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            seen.accepted.fetch_add(1, Ordering::SeqCst);
            let (handled, closed) = (serve(stream), seen.closed.clone());
            tokio::spawn(async move {
                handled.await;
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

/// What the raw test upstreams answer a request they accept.
const OK_REPLY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// Reads one request head; `None` at end of stream.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A raw upstream that answers every request with [`OK_REPLY`], except
/// one whose head contains `marker`: that gets `reply`, and its connection
/// is then held, swallowing whatever else comes, until muster closes it.
async fn raw_upstream_holding_after(
    marker: &'static str,
    reply: &'static [u8],
) -> (std::net::SocketAddr, Counts) {
    use tokio::io::AsyncWriteExt;
    raw_upstream(move |mut stream| async move {
        while let Some(head) = read_head(&mut stream).await {
            if head.contains(marker) {
                let _ = stream.write_all(reply).await;
                let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
                return;
            }
            let _ = stream.write_all(OK_REPLY).await;
        }
    })
    .await
}

fn register_raw(addr: std::net::SocketAddr) -> Value {
    json!({"address": addr.ip().to_string(), "port": addr.port(), "ports": {"http": addr.port()}})
}

/// muster on ORDERS with the route's `timeout` and no route retries (so
/// only the upstream pool can send a request again), in front of a raw
/// upstream (`serve`) registered as the orders instance.
async fn without_retries_before<F, Fut>(timeout: &str, serve: F) -> (Muster, Counts)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let to = format!("timeout = \"{timeout}\"\nretries = 0");
    let muster = start_with(with_gateway(&orders_with("timeout = \"500ms\"", &to))).await;
    let (addr, counts) = raw_upstream(serve).await;
    muster
        .register_ok("orders", "o-1", register_raw(addr))
        .await;
    (muster, counts)
}

#[tokio::test]
async fn a_kept_alive_connection_the_upstream_closed_is_not_reused() {
    use tokio::io::AsyncWriteExt;
    // Only the pool's handling of a dead kept-alive connection (skip it,
    // or resend what it never sent) can save a request. One request per
    // connection, then a close the response did not announce.
    let (muster, counts) = without_retries_before("500ms", |mut stream| async move {
        if read_head(&mut stream).await.is_some() {
            let _ = stream.write_all(OK_REPLY).await;
        }
    })
    .await;
    for round in 1..=10 {
        let response = muster
            .http
            .get(gateway_url(&muster, "/api/orders/1"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "request {round}");
        assert_eq!(response.text().await.unwrap(), "ok");
        support::wait_until("the upstream has closed the connection", || async {
            (counts.closed.load(Ordering::SeqCst) == round).then_some(())
        })
        .await;
    }
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        10,
        "a connection per request"
    );
}

/// A request's body, status and headers through the gateway.
async fn fetch(
    muster: &Muster,
    method: reqwest::Method,
    path: &str,
) -> (u16, String, reqwest::header::HeaderMap) {
    let response = muster
        .http
        .request(method, gateway_url(muster, path))
        .send()
        .await
        .unwrap();
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    (status, response.text().await.unwrap(), headers)
}

#[tokio::test]
async fn chunked_interim_head_and_close_delimited_responses_pass_through() {
    use tokio::io::AsyncWriteExt;
    let (muster, counts) = without_retries_before("2s", |mut stream| async move {
        while let Some(head) = read_head(&mut stream).await {
            let reply: &[u8] = if head.starts_with("HEAD ") {
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
            } else if head.contains("/chunked") {
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                  4;ext=1\r\nchun\r\n3\r\nked\r\n0\r\nx-trailer: 1\r\n\r\n"
            } else if head.contains("/interim") {
                b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n\
                  HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal"
            } else if head.contains("/until-close") {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\nto the end").await;
                return;
            } else {
                OK_REPLY
            };
            let _ = stream.write_all(reply).await;
        }
    })
    .await;
    let (status, body, _) = fetch(&muster, reqwest::Method::GET, "/api/orders/chunked").await;
    assert_eq!((status, body.as_str()), (200, "chunked"));
    // The upstream's trailers reach an HTTP/2 client.
    let stream = tokio::net::TcpStream::connect(muster.gateway.unwrap())
        .await
        .unwrap();
    let (mut h2, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get(gateway_url(&muster, "/api/orders/chunked"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = h2.send_request(request).await.unwrap();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
    assert_eq!(body.trailers().expect("trailers")["x-trailer"], "1");
    assert_eq!(body.to_bytes(), "chunked");
    let (status, body, _) = fetch(&muster, reqwest::Method::GET, "/api/orders/interim").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "final"),
        "the 103 is not the answer"
    );
    let (status, body, headers) = fetch(&muster, reqwest::Method::HEAD, "/api/orders/1").await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(
        headers["content-length"], "5",
        "HEAD keeps the length of what GET would send"
    );
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        1,
        "each of those left the connection reusable"
    );
    let (status, body, _) = fetch(&muster, reqwest::Method::GET, "/api/orders/until-close").await;
    assert_eq!((status, body.as_str()), (200, "to the end"));
    let (status, body, _) = fetch(&muster, reqwest::Method::GET, "/api/orders/1").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        2,
        "a body delimited by the close ends its connection"
    );
}

#[tokio::test]
async fn a_malformed_upstream_response_is_a_502_and_the_gateway_serves_on() {
    use tokio::io::AsyncWriteExt;
    let toml = orders_with("eject_after_errors = 2", "eject_after_errors = 100");
    let muster = start_with(with_gateway(&toml)).await;
    let (addr, _) = raw_upstream(|mut stream| async move {
        while let Some(head) = read_head(&mut stream).await {
            let reply: &[u8] = if head.contains("/lengths") {
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nxy"
            } else if head.contains("/garbage") {
                b"SMTP ready\r\n\r\n"
            } else if head.contains("/chunks") {
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"
            } else {
                OK_REPLY
            };
            let _ = stream.write_all(reply).await;
        }
    })
    .await;
    muster
        .register_ok("orders", "o-1", register_raw(addr))
        .await;
    for path in ["/api/orders/lengths", "/api/orders/garbage"] {
        let (status, body, _) = get(&muster, path).await;
        assert_eq!(status, 502, "{path}: {body}");
    }
    // The body fails before its first byte: hyper cuts the client's
    // connection, with or without the head sent.
    let sent = muster
        .http
        .get(gateway_url(&muster, "/api/orders/chunks"))
        .send()
        .await;
    let whole = match sent {
        Ok(response) => response.bytes().await.map(drop),
        Err(error) => Err(error),
    };
    assert!(
        whole.is_err(),
        "a bad chunked body does not arrive as a whole one"
    );
    let (status, body, _) = fetch(&muster, reqwest::Method::GET, "/api/orders/1").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
}

#[tokio::test]
async fn a_get_the_upstream_dropped_unanswered_goes_again_and_a_post_does_not() {
    use tokio::io::AsyncWriteExt;
    // Answers the first request on a connection; closes on the second
    // without a word, as an upstream whose keep-alive timer just ran out.
    let (muster, counts) = without_retries_before("2s", |mut stream| async move {
        if read_head(&mut stream).await.is_some() {
            let _ = stream.write_all(OK_REPLY).await;
            let _ = read_head(&mut stream).await;
        }
    })
    .await;
    for round in 1..=2 {
        let (status, body, _) = fetch(&muster, reqwest::Method::GET, "/api/orders/1").await;
        assert_eq!((status, body.as_str()), (200, "ok"), "GET {round}");
    }
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        2,
        "the second GET went again on a new connection"
    );
    let (status, _, _) = fetch(&muster, reqwest::Method::POST, "/api/orders/1").await;
    assert_eq!(status, 502, "a POST may have been acted on: not sent again");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_unanswered_get_goes_again_only_once() {
    use tokio::io::AsyncWriteExt;
    // Answers the first two requests once both have arrived (so they hold
    // a connection each), then closes on every request without a word.
    let heads = std::sync::Arc::new(AtomicUsize::new(0));
    let both = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let seen = heads.clone();
    let (muster, counts) = without_retries_before("2s", move |mut stream| {
        let (heads, both) = (seen.clone(), both.clone());
        async move {
            while read_head(&mut stream).await.is_some() {
                if heads.fetch_add(1, Ordering::SeqCst) >= 2 {
                    return;
                }
                both.wait().await;
                let _ = stream.write_all(OK_REPLY).await;
            }
        }
    })
    .await;
    let (first, second) = tokio::join!(
        fetch(&muster, reqwest::Method::GET, "/api/orders/1"),
        fetch(&muster, reqwest::Method::GET, "/api/orders/2"),
    );
    assert_eq!((first.0, second.0), (200, 200));
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        2,
        "two kept connections"
    );
    let (status, _, _) = fetch(&muster, reqwest::Method::GET, "/api/orders/3").await;
    assert_eq!(
        status, 502,
        "a kept connection and then a new one gave nothing"
    );
    assert_eq!(
        heads.load(Ordering::SeqCst),
        4,
        "the third GET went out twice: not again on the other kept connection"
    );
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_connection_still_uploading_is_not_handed_to_the_next_request() {
    let muster = start_with(with_gateway(ORDERS)).await;
    // POSTs are refused before their body is read; anything else is
    // answered.
    let refusal = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
    let (addr, counts) = raw_upstream_holding_after("POST ", refusal).await;
    muster
        .register_ok("orders", "o-1", register_raw(addr))
        .await;
    // A client whose upload stalls after its first chunk.
    let first = futures_util::stream::once(async { Ok::<_, std::io::Error>("part") });
    let stalled = futures_util::StreamExt::chain(first, futures_util::stream::pending());
    let refused = muster
        .http
        .post(gateway_url(&muster, "/api/orders/upload"))
        .body(reqwest::Body::wrap_stream(stalled))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    // With a body, so that it goes the way the upload went (hyper's
    // client) and could be handed the uploading connection; one without
    // a body takes muster's own exchange and never could.
    let next = muster
        .http
        .put(gateway_url(&muster, "/api/orders/1"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        next.status(),
        200,
        "the next request does not wait behind the stalled upload"
    );
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        2,
        "a fresh connection"
    );
    drop(refused);
}

#[tokio::test]
async fn an_upstream_that_goes_quiet_mid_body_is_cut_off() {
    let toml = orders_with(
        "timeout = \"500ms\"",
        "timeout = \"500ms\"\nread_timeout = \"300ms\"",
    );
    let muster = start_with(with_gateway(&toml)).await;
    // Promises 100 bytes, sends 10 and goes quiet (but stays connected)
    // on /stall; answers anything else.
    let partial = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789";
    let (addr, counts) = raw_upstream_holding_after("/stall", partial).await;
    muster
        .register_ok("orders", "o-1", register_raw(addr))
        .await;
    let response = muster
        .http
        .get(gateway_url(&muster, "/api/orders/stall"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the headers came in time");
    let body = response.bytes().await;
    assert!(body.is_err(), "the body cannot complete: {body:?}");
    support::wait_until("muster closes the quiet upstream connection", || async {
        (counts.closed.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let text = muster.metrics().await;
    assert_eq!(
        support::metric(
            &text,
            "muster_gateway_upstream_errors_total{route=\"orders\",kind=\"body\"}"
        ),
        1.0,
        "{text}"
    );
    let (status, _, _) = get(&muster, "/api/orders/1").await;
    assert_eq!(status, 200, "the gateway serves on");
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        2,
        "the quiet connection was not pooled"
    );
    muster.stop().await;
}

#[tokio::test]
async fn requests_round_robin_by_weight() {
    let muster = start_with(with_gateway(ORDERS)).await;
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    muster
        .register_ok("orders", "a", a.instance(json!({"weight": 2})))
        .await;
    muster
        .register_ok("orders", "b", b.instance(json!({"weight": 1})))
        .await;
    muster
        .register_ok("orders", "c", c.instance(json!({"weight": 1})))
        .await;
    assert_eq!(
        spread(&muster, "/api/orders/1", 40).await,
        counts(&[("a", 20), ("b", 10), ("c", 10)])
    );
    muster.stop().await;
}

#[tokio::test]
async fn least_request_spreads_over_idle_instances() {
    let config = with_gateway(&orders_with(
        "timeout = \"500ms\"",
        "balance = \"least_request\"",
    ));
    let muster = start_with(config).await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    muster
        .register_ok("orders", "a", a.instance(json!({})))
        .await;
    muster
        .register_ok("orders", "b", b.instance(json!({})))
        .await;
    let spread_out = spread(&muster, "/api/orders", 40).await;
    assert_eq!(spread_out.values().sum::<usize>(), 40);
    assert!(
        spread_out.len() == 2,
        "both instances get requests: {spread_out:?}"
    );
    // Round robin would do that too. Keep one instance busy with a slow
    // request: least-request must send everything else to the other.
    let hits = || (a.hits.load(Ordering::SeqCst), b.hits.load(Ordering::SeqCst));
    let (a_before, b_before) = hits();
    let slow = tokio::spawn(
        muster
            .http
            .get(gateway_url(&muster, "/api/orders/slow"))
            .send(),
    );
    let busy = support::wait_until("the slow request reaches an instance", || async {
        let (a_now, b_now) = hits();
        (a_now + b_now > a_before + b_before).then_some(if a_now > a_before { "a" } else { "b" })
    })
    .await;
    let while_busy = spread(&muster, "/api/orders", 20).await;
    assert_eq!(
        while_busy.keys().collect::<Vec<_>>(),
        [if busy == "a" { "b" } else { "a" }],
        "all to the idle instance while {busy} is busy"
    );
    slow.abort();
    muster.stop().await;
}

#[tokio::test]
async fn the_lowest_priority_level_serves_and_fails_over() {
    let muster = start_with(with_gateway(ORDERS)).await;
    let (primary, backup) = (
        Upstream::start("primary").await,
        Upstream::start("backup").await,
    );
    muster
        .register_ok(
            "orders",
            "primary",
            primary.instance(json!({"priority": 0})),
        )
        .await;
    muster
        .register_ok("orders", "backup", backup.instance(json!({"priority": 1})))
        .await;
    assert_eq!(
        spread(&muster, "/api/orders", 10).await,
        counts(&[("primary", 10)])
    );
    // Critical (a heartbeat says so): the backup level takes over.
    let response = muster
        .http
        .put(muster.url("/v1/services/orders/instances/primary/heartbeat"))
        .json(&json!({"status": "critical"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        spread(&muster, "/api/orders", 10).await,
        counts(&[("backup", 10)])
    );
    muster.stop().await;
}

#[tokio::test]
async fn deregistered_and_drained_instances_get_no_new_requests() {
    let muster = start_with(with_gateway(ORDERS)).await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    muster
        .register_ok("orders", "a", a.instance(json!({})))
        .await;
    muster
        .register_ok("orders", "b", b.instance(json!({})))
        .await;
    assert_eq!(muster.deregister("orders", "a").await, 204);
    assert_eq!(spread(&muster, "/api/orders", 6).await, counts(&[("b", 6)]));
    muster
        .register_ok("orders", "a", a.instance(json!({})))
        .await;
    let drained = muster
        .http
        .put(muster.url("/v1/services/orders/instances/b/maintenance"))
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200);
    assert_eq!(spread(&muster, "/api/orders", 6).await, counts(&[("a", 6)]));
    muster.stop().await;
}

#[tokio::test]
async fn a_killed_backend_costs_get_clients_nothing_and_is_ejected() {
    let muster = start_with(with_gateway(ORDERS)).await;
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    for (id, upstream) in [("a", &a), ("b", &b), ("c", &c)] {
        muster
            .register_ok("orders", id, upstream.instance(json!({})))
            .await;
    }
    b.kill();
    let spread = spread(&muster, "/api/orders", 60).await;
    assert_eq!(spread.values().sum::<usize>(), 60, "every GET succeeded");
    assert!(!spread.contains_key("b"));
    let metrics = muster.metrics().await;
    let connect_errors = support::metric(
        &metrics,
        "muster_gateway_upstream_errors_total{route=\"orders\",kind=\"connect\"}",
    );
    assert!(
        (1.0..=2.0).contains(&connect_errors),
        "ejected after 2 errors, tried {connect_errors} times"
    );
    muster.stop().await;
}

/// What the gateway answers a `CONNECT target` (reqwest cannot send one).
async fn connect_through(muster: &Muster, target: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(muster.gateway.unwrap())
        .await
        .unwrap();
    let request = format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = vec![0u8; 512];
    let n = stream.read(&mut reply).await.unwrap();
    String::from_utf8_lossy(&reply[..n]).into_owned()
}

#[tokio::test]
async fn failures_answer_503_502_504_405_and_404_in_json() {
    let muster = start_with(with_gateway(ORDERS)).await;
    let (status, body, headers) = get(&muster, "/api/orders").await;
    assert_eq!(status, 503, "no instance: {body}");
    assert_eq!(
        body["request_id"],
        headers["x-request-id"].to_str().unwrap()
    );
    let (status, body, _) = get(&muster, "/nowhere").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("no route"));
    let connect = connect_through(&muster, "example.com:443").await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");

    let dead = Upstream::start("dead").await;
    muster
        .register_ok("orders", "dead", dead.instance(json!({})))
        .await;
    dead.kill();
    let (status, body, _) = get(&muster, "/api/orders").await;
    assert_eq!(status, 502, "{body}");
    let post = muster
        .http
        .post(gateway_url(&muster, "/api/orders"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 502);

    let slow = Upstream::start("slow").await;
    muster.deregister("orders", "dead").await;
    muster
        .register_ok("orders", "slow", slow.instance(json!({})))
        .await;
    let (status, body, _) = get(&muster, "/api/orders/slow").await;
    assert_eq!(status, 504, "{body}");
    let (status, body, _) = get(&muster, "/api/orders/status/503").await;
    assert_eq!(
        (status, body["backend"].as_str()),
        (503, Some("slow")),
        "upstream errors pass through"
    );
    muster.stop().await;
}

#[tokio::test]
async fn headers_are_cleaned_forwarded_and_traced() {
    let config = with_gateway(&orders_with(
        "[[gateway.routes]]",
        "[[gateway.routes]]\nhost_rewrite = \"orders.internal\"",
    ));
    let muster = start_with(config).await;
    let a = Upstream::start("a").await;
    muster
        .register_ok("orders", "a", a.instance(json!({})))
        .await;
    let response = muster
        .http
        .get(gateway_url(&muster, "/api/orders/42?x=1"))
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-request-id", "client-chosen-1")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-chosen-1");
    let seen: Value = response.json().await.unwrap();
    let headers = &seen["headers"];
    assert_eq!(seen["path"], "/orders/42", "strip_prefix");
    assert_eq!(seen["query"], "x=1");
    for gone in ["x-private", "keep-alive", "proxy-connection", "connection"] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} reached the upstream: {headers}"
        );
    }
    assert_eq!(headers["te"], "trailers");
    assert_eq!(
        headers["x-forwarded-for"], "127.0.0.1",
        "spoofed value replaced"
    );
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert!(
        headers["x-forwarded-host"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(
        headers["forwarded"]
            .as_str()
            .unwrap()
            .starts_with("for=127.0.0.1;proto=http")
    );
    assert_eq!(headers["host"], "orders.internal", "host_rewrite");
    assert_eq!(headers["x-request-id"], "client-chosen-1");
    let traceparent = headers["traceparent"].as_str().unwrap();
    assert!(traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "a new span for this hop"
    );

    let (_, fresh, response_headers) = get(&muster, "/api/orders").await;
    assert_eq!(
        response_headers["x-request-id"].len(),
        32,
        "generated when absent"
    );
    assert_eq!(
        fresh["headers"]["x-request-id"],
        response_headers["x-request-id"].to_str().unwrap()
    );
    let trace = fresh["headers"]["traceparent"].as_str().unwrap();
    assert_eq!(
        &trace[3..35],
        response_headers["x-request-id"].to_str().unwrap(),
        "a new trace is keyed by the generated request id: {trace}"
    );
    muster.stop().await;
}

#[tokio::test]
async fn trusted_proxies_extend_the_forwarding_headers() {
    let config = with_gateway(&orders_with(
        "[gateway]",
        "[gateway]\ntrusted_proxies = [\"127.0.0.0/8\"]",
    ));
    let muster = start_with(config).await;
    let a = Upstream::start("a").await;
    muster
        .register_ok("orders", "a", a.instance(json!({})))
        .await;
    let seen: Value = muster
        .http
        .get(gateway_url(&muster, "/api/orders"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    muster.stop().await;
}

type WebSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// muster with `[gateway]` keys `gateway_keys` and a route `/ws` to a
/// WebSocket echo service (its stop token), and a WebSocket opened
/// through the gateway, with the handshake's response.
async fn websocket_through_gateway(
    gateway_keys: &str,
) -> (
    Muster,
    tokio_util::sync::CancellationToken,
    WebSocket,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    let config = with_gateway(&format!(
        "[gateway]\n{gateway_keys}\n\
         [[gateway.routes]]\nname = \"ws\"\npath_prefix = \"/ws\"\nservice = \"chat\"\n"
    ));
    let muster = start_with(config).await;
    let (echo, stop) = websocket_echo().await;
    muster
        .register_ok(
            "chat",
            "c-1",
            json!({"address": echo.ip().to_string(), "port": echo.port()}),
        )
        .await;
    let gateway = muster.gateway.unwrap();
    let stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let (socket, response) = tokio_tungstenite::client_async(format!("ws://{gateway}/ws"), stream)
        .await
        .expect("the WebSocket opens through the gateway");
    (muster, stop, socket, response)
}

#[tokio::test]
async fn websockets_pass_through() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (muster, _stop, mut socket, response) = websocket_through_gateway("").await;
    assert_eq!(response.status(), 101);
    for text in ["hello", "through the front door"] {
        socket.send(Message::text(text)).await.unwrap();
        let echoed = socket.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    muster.stop().await;
}

#[tokio::test]
async fn an_open_tunnel_keeps_its_connection_slot() {
    use std::time::Duration;
    let (muster, _stop, tunnel, _) = websocket_through_gateway("max_connections = 1").await;
    // The tunnel holds the only slot, so the next client waits in the
    // backlog (a deliberate pause proving the negative).
    let url = gateway_url(&muster, "/elsewhere");
    let mut waiting = tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "a second client was served while the tunnel held max_connections = 1"
    );
    drop(tunnel);
    let status = tokio::time::timeout(support::DEADLINE, waiting)
        .await
        .expect("served once the tunnel closed")
        .unwrap()
        .unwrap();
    assert_eq!(status, 404);
    muster.stop().await;
}

#[tokio::test]
async fn h2c_from_clients_and_h2_to_upstreams() {
    let config = with_gateway(&format!(
        "{ORDERS}\n[[gateway.routes]]\nname = \"h2\"\npath_prefix = \"/h2\"\nservice = \"orders\"\nupstream = \"h2\"\n"
    ));
    let muster = start_with(config).await;
    let a = Upstream::start("a").await;
    muster
        .register_ok("orders", "a", a.instance(json!({})))
        .await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2
        .get(gateway_url(&muster, "/api/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["version"], "HTTP/1.1", "http1 upstream by default");
    let seen: Value = muster
        .http
        .get(gateway_url(&muster, "/h2/x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["version"], "HTTP/2.0", "upstream = \"h2\"");
    muster.stop().await;
}

#[tokio::test]
async fn routes_reload_and_a_bad_reload_keeps_the_old_ones() {
    let muster = start_with(with_gateway(ORDERS)).await;
    let a = Upstream::start("a").await;
    muster
        .register_ok("orders", "a", a.instance(json!({})))
        .await;
    muster
        .register_ok("billing", "b", a.instance(json!({})))
        .await;
    assert_eq!(get(&muster, "/billing").await.0, 404);
    let new = with_gateway(
        "[[gateway.routes]]\nname = \"billing\"\npath_prefix = \"/billing\"\nservice = \"billing\"\n",
    );
    muster.reloader().reload(Some(&new)).unwrap();
    assert_eq!(get(&muster, "/billing").await.0, 200);
    assert_eq!(
        get(&muster, "/api/orders").await.0,
        404,
        "the old routes are gone"
    );

    let mut bad = new.clone();
    bad.zones_dir = "/nonexistent/zones/dir/file.zone".into();
    std::fs::write(std::env::temp_dir().join("muster-not-a-dir"), "").ok();
    bad.zones_dir = std::env::temp_dir().join("muster-not-a-dir");
    assert!(muster.reloader().reload(Some(&bad)).is_err());
    assert_eq!(get(&muster, "/billing").await.0, 200, "still served");
    muster.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_and_latency_per_route() {
    let muster = start_with(with_gateway(ORDERS)).await;
    let a = Upstream::start("a").await;
    muster
        .register_ok("orders", "a", a.instance(json!({})))
        .await;
    for _ in 0..3 {
        get(&muster, "/api/orders").await;
    }
    get(&muster, "/api/orders/status/500").await;
    let text = muster.metrics().await;
    assert_eq!(
        support::metric(
            &text,
            "muster_gateway_requests_total{route=\"orders\",code=\"200\"}"
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        support::metric(
            &text,
            "muster_gateway_requests_total{route=\"orders\",code=\"500\"}"
        ),
        1.0
    );
    assert_eq!(
        support::metric(
            &text,
            "muster_gateway_request_duration_seconds_count{route=\"orders\"}"
        ),
        4.0
    );
    assert_eq!(
        support::metric(
            &text,
            "muster_gateway_upstream_errors_total{route=\"orders\",kind=\"status_5xx\"}"
        ),
        1.0
    );
    muster.stop().await;
}

#[tokio::test]
async fn a_standalone_gateway_follows_srv_records_over_dns() {
    let mut registry_config = test_config();
    registry_config.gateway.enabled = false;
    registry_config.dns.ttl = std::time::Duration::from_secs(1);
    let registry = start_with(registry_config).await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    registry
        .register_ok("orders", "a", a.instance(json!({})))
        .await;
    registry
        .register_ok("orders", "b", b.instance(json!({})))
        .await;

    let mut config = with_gateway(ORDERS);
    config.gateway.resolver = Some(registry.dns);
    let front = start_with(config).await;
    assert_eq!(
        spread(&front, "/api/orders", 10).await,
        counts(&[("a", 5), ("b", 5)])
    );

    // The gateway follows DNS once the TTL has passed.
    assert_eq!(registry.deregister("orders", "a").await, 204);
    support::wait_until("the gateway stops sending to a", || async {
        let spread = spread(&front, "/api/orders", 4).await;
        (spread == counts(&[("b", 4)])).then_some(())
    })
    .await;

    // DNS gone: the last good answer keeps serving. The pause outlasts the
    // 1 s TTL, so the expired answer (not a fresh one) is what serves.
    registry.stop().await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(spread(&front, "/api/orders", 3).await, counts(&[("b", 3)]));
    front.stop().await;
}
