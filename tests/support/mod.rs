//! Shared by the black-box tests: a real muster on ephemeral loopback
//! ports, an HTTP client, and a DNS client that speaks the wire format
//! over real UDP and TCP sockets (hickory-proto's codec).

#![allow(dead_code)]

pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RecordType};
use muster::{Config, Running};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// How long any single network exchange in a test may take.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// A muster started for one test.
pub struct Muster {
    pub dns: SocketAddr,
    pub dns_tls: Option<SocketAddr>,
    pub api: SocketAddr,
    pub gateway: Option<SocketAddr>,
    pub http: reqwest::Client,
    running: Option<Running>,
    _data: tempfile::TempDir,
}

/// The repository's `zones/` folder.
pub fn repo_zones() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("zones")
}

/// The head of the static zone `example.internal.`: its SOA, NS and the
/// name server's address.
pub const EXAMPLE_ZONE: &str =
    "$TTL 60\n@ IN SOA ns hostmaster 1 3600 600 86400 30\n@ IN NS ns\nns IN A 127.0.0.1\n";

/// A muster serving [`EXAMPLE_ZONE`] followed by `records` (zone-file
/// lines) as a static zone that loopback peers may transfer. The zone's
/// directory lasts as long as the returned one.
pub async fn start_with_transferable_zone(records: &str) -> (Muster, tempfile::TempDir) {
    let zones = tempfile::tempdir().unwrap();
    let text = format!("{EXAMPLE_ZONE}{records}");
    std::fs::write(zones.path().join("example.internal.zone"), text).unwrap();
    let mut config = test_config();
    config.zones_dir = zones.path().to_path_buf();
    config.dns.transfers = [(
        "example.internal".to_string(),
        vec!["127.0.0.0/8".parse().unwrap()],
    )]
    .into();
    (start_with(config).await, zones)
}

/// `count` TXT records of 100 bytes each, as zone-file lines (3,000 make
/// a zone of about 350 KB, too large for one DNS message).
pub fn txt_records(count: usize) -> String {
    let text = "x".repeat(100);
    (0..count)
        .map(|n| format!("t{n} IN TXT \"{text}\"\n"))
        .collect()
}

/// A config on ephemeral loopback ports with the repository's zones.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.dns.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.gateway.listen = "127.0.0.1:0".parse().unwrap();
    config.zones_dir = repo_zones();
    config
}

pub async fn start() -> Muster {
    start_with(test_config()).await
}

pub async fn start_with(mut config: Config) -> Muster {
    let data = tempfile::tempdir().unwrap();
    config.data_dir = data.path().to_path_buf();
    let running = muster::start(&config).await.expect("muster starts");
    Muster {
        dns: running.dns[0],
        dns_tls: running.dns_tls,
        api: running.api,
        gateway: running.gateway,
        http: reqwest::Client::builder()
            .timeout(DEADLINE)
            .build()
            .unwrap(),
        running: Some(running),
        _data: data,
    }
}

impl Muster {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    /// PUTs `body` as the instance `service/id`; returns status and JSON.
    pub async fn register(&self, service: &str, id: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .put(self.url(&format!("/v1/services/{service}/instances/{id}")))
            .json(&body)
            .send()
            .await
            .unwrap();
        status_and_json(response).await
    }

    /// Registers and insists it worked.
    pub async fn register_ok(&self, service: &str, id: &str, body: Value) -> Value {
        let (status, json) = self.register(service, id, body).await;
        assert_eq!(status, 200, "registering {service}/{id}: {json}");
        json
    }

    pub async fn deregister(&self, service: &str, id: &str) -> u16 {
        self.http
            .delete(self.url(&format!("/v1/services/{service}/instances/{id}")))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        status_and_json(response).await
    }

    pub async fn udp(&self, name: &str, rtype: RecordType) -> Message {
        query_udp(self.dns, &query(name, rtype, Some(1232))).await
    }

    pub async fn tcp(&self, name: &str, rtype: RecordType) -> Message {
        query_tcp(self.dns, &query(name, rtype, Some(1232))).await
    }

    /// The Prometheus text at `GET /metrics`.
    pub async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        assert!(response.status().is_success());
        response.text().await.unwrap()
    }

    pub fn reloader(&self) -> muster::Reloader {
        self.running.as_ref().unwrap().reloader()
    }

    /// Stops the server and checks it drained cleanly.
    pub async fn stop(mut self) {
        let running = self.running.take().unwrap();
        running.stop(DEADLINE).await.expect("clean shutdown");
    }
}

pub async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    };
    (status, json)
}

/// A query message; `edns` is the advertised UDP payload size, if any.
pub fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let mut message = Message::query();
    message.metadata.id = rand_id();
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut opt = Edns::new();
        opt.set_max_payload(size);
        message.set_edns(opt);
    }
    message
}

fn rand_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0x4d55);
    NEXT.fetch_add(7919, Ordering::Relaxed)
}

/// Sends raw bytes over UDP; the reply's bytes, or `None` if none came
/// before `wait`.
pub async fn exchange_udp(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let local = if server.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let socket = UdpSocket::bind(local).await.unwrap();
    socket.send_to(bytes, server).await.unwrap();
    let mut buffer = vec![0u8; 65535];
    let received = tokio::time::timeout(wait, socket.recv(&mut buffer)).await;
    received.ok().map(|n| buffer[..n.unwrap()].to_vec())
}

pub async fn query_udp(server: SocketAddr, message: &Message) -> Message {
    let reply = exchange_udp(server, &message.to_vec().unwrap(), DEADLINE)
        .await
        .expect("a UDP reply before the deadline");
    let reply = Message::from_vec(&reply).expect("a well-formed reply");
    assert_eq!(reply.metadata.id, message.metadata.id);
    reply
}

/// Sends raw bytes over TCP with the two-byte length prefix.
pub async fn exchange_tcp(server: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = tokio::time::timeout(DEADLINE, TcpStream::connect(server))
        .await
        .unwrap()
        .unwrap();
    let length = u16::try_from(bytes.len()).unwrap().to_be_bytes();
    stream.write_all(&length).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut length = [0u8; 2];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut length))
        .await
        .expect("a TCP reply before the deadline")
        .unwrap();
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut reply).await.unwrap();
    reply
}

pub async fn query_tcp(server: SocketAddr, message: &Message) -> Message {
    let reply = exchange_tcp(server, &message.to_vec().unwrap()).await;
    let reply = Message::from_vec(&reply).expect("a well-formed reply");
    assert_eq!(reply.metadata.id, message.metadata.id);
    reply
}

/// An instance body with an address and port.
pub fn instance(address: &str, port: u16) -> Value {
    serde_json::json!({"address": address, "port": port})
}

/// A real HTTP server to be health-checked: answers `GET /health` with a
/// status the test sets, and can be killed and started again on its port.
pub struct HttpTarget {
    pub addr: SocketAddr,
    pub status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    stop: Option<tokio_util::sync::CancellationToken>,
}

impl HttpTarget {
    pub async fn start(status: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut target = Self {
            addr,
            status: std::sync::Arc::new(std::sync::atomic::AtomicU16::new(status)),
            stop: None,
        };
        target.serve(listener);
        target
    }

    pub fn url(&self) -> String {
        format!("http://{}/health", self.addr)
    }

    pub fn set_status(&self, status: u16) {
        self.status
            .store(status, std::sync::atomic::Ordering::SeqCst);
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        use axum::http::StatusCode;
        let status = self.status.clone();
        let app = axum::Router::new().route(
            "/health",
            axum::routing::get(move || {
                let status = status.load(std::sync::atomic::Ordering::SeqCst);
                async move { StatusCode::from_u16(status).unwrap() }
            }),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await
                .unwrap();
        });
        self.stop = Some(stop);
    }

    /// Stops answering: the port refuses connections.
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
    }

    /// Serves again on the same port.
    pub async fn restart(&mut self) {
        let listener = wait_until("the target's port is free again", || async {
            tokio::net::TcpListener::bind(self.addr).await.ok()
        })
        .await;
        self.serve(listener);
    }
}

impl Drop for HttpTarget {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How long a condition may take to come true in a test.
pub const CONDITION_DEADLINE: Duration = Duration::from_secs(15);

/// Polls `check` until it yields a value, or panics naming `what` at the
/// deadline.
pub async fn wait_until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The A/AAAA addresses DNS gives for `name` (over UDP), as strings.
pub async fn resolved(muster: &Muster, name: &str) -> Vec<String> {
    let reply = muster.udp(name, RecordType::A).await;
    let mut found: Vec<String> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_proto::rr::RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    found.sort();
    found
}

/// A running `muster serve` and the addresses it reported.
pub struct Served {
    pub child: Child,
    pub dns: SocketAddr,
    pub api: SocketAddr,
    /// Every stderr line so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Reads stderr until the process closes it.
    pub reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(config: &str) -> Served {
    serve_with(config, &[])
}

/// [`serve`] with these environment variables set.
pub fn serve_with(config: &str, env: &[(&str, &str)]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["serve", "--config", config])
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines = log.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("muster ready") {
                let _ = sender.send(line.clone());
            }
            lines.lock().unwrap().push(line);
        }
    });
    let line = receiver
        .recv_timeout(Duration::from_secs(30))
        .expect("muster reports ready");
    let field = |key: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.split(',').next())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
            .parse()
            .unwrap()
    };
    Served {
        dns: field("dns="),
        api: field("api="),
        child,
        log,
        reader: Some(reader),
    }
}

/// The value of one `series` (name and labels, as printed) in Prometheus
/// text; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
