//! 100 MiB through the gateway each way without buffering it: the peak
//! resident memory of this process (client, gateway and backend all
//! together) grows far less than the body. Alone in its test binary so no
//! other test's memory counts.

mod support;

use futures_util::stream;
use serde_json::{Value, json};
use support::upstream::Upstream;

const BODY: u64 = 100 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
/// Far below the body: buffering either way would blow through it.
const ALLOWED_GROWTH: u64 = 40 * 1024 * 1024;

/// Peak resident set size of this process so far, bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn a_100_mib_body_streams_through_both_ways() {
    let mut config = support::test_config();
    config.gateway = muster::Config::from_toml(
        "[[gateway.routes]]\nname = \"files\"\nservice = \"files\"\ntimeout = \"60s\"\n",
        "test",
    )
    .unwrap()
    .gateway;
    config.gateway.listen = "127.0.0.1:0".parse().unwrap();
    let muster = support::start_with(config).await;
    let backend = Upstream::start("files").await;
    muster
        .register_ok("files", "f-1", backend.instance(json!({})))
        .await;
    let url = |path: &str| format!("http://{}{path}", muster.gateway.unwrap());
    let before = peak_rss();

    let chunks = (BODY as usize) / CHUNK;
    let upload = stream::iter((0..chunks).map(|_| Ok::<_, std::io::Error>(vec![b'u'; CHUNK])));
    let response = muster
        .http
        .post(url("/upload"))
        .timeout(std::time::Duration::from_secs(120))
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["bytes"], BODY, "every byte reached the backend");

    let mut download = muster
        .http
        .get(url(&format!("/download/{BODY}")))
        .timeout(std::time::Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    let mut received = 0u64;
    while let Some(chunk) = download.chunk().await.unwrap() {
        received += chunk.len() as u64;
    }
    assert_eq!(received, BODY);

    let growth = peak_rss().saturating_sub(before);
    assert!(
        growth < ALLOWED_GROWTH,
        "peak memory grew by {} MiB for 2 × 100 MiB",
        growth / (1024 * 1024)
    );
    muster.stop().await;
}
