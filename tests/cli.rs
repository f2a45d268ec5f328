//! The real `muster` binary: version, check-config, and serve end to end
//! (start, register over HTTP, resolve over DNS, SIGTERM, clean exit).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hickory_proto::rr::{RData, RecordType};
use support::{query, query_udp};

const BIN: &str = env!("CARGO_BIN_EXE_muster");

fn run(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN).args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A config on ephemeral ports with `zones_dir` as given.
fn ephemeral_config(dir: &Path, zones_dir: &Path) -> String {
    let text = format!(
        "data_dir = {data:?}\nzones_dir = {zones:?}\n[dns]\nlisten = [\"127.0.0.1:0\"]\n\
         [api]\nlisten = \"127.0.0.1:0\"\n[gateway]\nlisten = \"127.0.0.1:0\"\n",
        data = dir.join("data").display().to_string(),
        zones = zones_dir.display().to_string(),
    );
    write(dir, "muster.toml", &text)
}

#[test]
fn version_is_printed() {
    let expected = env!("CARGO_PKG_VERSION");
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.contains(expected), "{stdout}");
    let (code, stdout, _) = run(&["version"]);
    assert_eq!(code, 0);
    assert_eq!(stdout.trim(), format!("muster {expected}"));
}

#[test]
fn check_config_accepts_good_files_and_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = ephemeral_config(dir.path(), &support::repo_zones());
    let (code, stdout, stderr) = run(&["check-config", &good]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok"));

    let bad = write(
        dir.path(),
        "bad.toml",
        "[dns]\nzone = \"svc.internal\"\nttl = \"fast\"\n",
    );
    let (code, _, stderr) = run(&["check-config", &bad]);
    assert_eq!(code, 1);
    assert!(stderr.contains("bad.toml:3"), "{stderr}");
    assert!(stderr.contains("dns.ttl"), "{stderr}");

    let (code, _, stderr) = run(&[
        "check-config",
        &dir.path().join("missing.toml").display().to_string(),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("missing.toml"), "{stderr}");
}

fn bad_zone_dir(dir: &Path) -> std::path::PathBuf {
    let zones = dir.join("zones");
    std::fs::create_dir(&zones).unwrap();
    write(
        &zones,
        "broken.internal.zone",
        "$TTL 60\n@ IN SOA ns hostmaster 1 2 3 4 5\n@ IN NS ns\nns IN A 300.1.1.1\n",
    );
    zones
}

#[test]
fn a_bad_zone_file_stops_startup_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let zones = bad_zone_dir(dir.path());
    let config = ephemeral_config(dir.path(), &zones);
    let (code, _, stderr) = run(&["serve", "--config", &config]);
    assert_ne!(code, 0);
    assert!(stderr.contains("broken.internal.zone:4"), "{stderr}");
    let (code, _, stderr) = run(&["check-config", &config]);
    assert_eq!(code, 1);
    assert!(stderr.contains("broken.internal.zone:4"), "{stderr}");
}

/// A `key=value` field of the ready line.
fn log_field(served: &support::Served, key: &str) -> String {
    let log = served.log.lock().unwrap();
    let ready = log.iter().find(|l| l.contains("muster ready")).unwrap();
    ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap()
        .to_string()
}

fn wait_for_exit(child: &mut Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Asks until `check` holds for the reply, or panics at the deadline.
async fn until_reply(
    dns: SocketAddr,
    name: &str,
    check: impl Fn(&hickory_proto::op::Message) -> bool,
) {
    support::wait_until(&format!("a matching reply for {name}"), || async {
        let reply = query_udp(dns, &query(name, RecordType::A, None)).await;
        check(&reply).then_some(())
    })
    .await;
}

#[test]
fn serve_tells_systemd_when_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let config = ephemeral_config(dir.path(), &support::repo_zones());
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let receive = || {
        let mut message = [0u8; 512];
        let length = socket
            .recv(&mut message)
            .expect("a notification within the deadline");
        String::from_utf8_lossy(&message[..length]).into_owned()
    };
    let mut served =
        support::serve_with(&config, &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
    assert_eq!(receive(), "READY=1\n", "once serving");
    signal(&served.child, "HUP");
    let reloading = receive();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(receive(), "READY=1\n", "after the reload");
    signal(&served.child, "TERM");
    assert_eq!(receive(), "STOPPING=1\n");
    let exit =
        wait_for_exit(&mut served.child, Duration::from_secs(15)).expect("exits after SIGTERM");
    assert!(exit.success(), "clean exit: {exit:?}");
}

#[tokio::test]
async fn serve_registers_resolves_reloads_on_sighup_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let zones = dir.path().join("zones");
    std::fs::create_dir(&zones).unwrap();
    let zone_file = zones.join("svc.internal.zone");
    std::fs::copy(support::repo_zones().join("svc.internal.zone"), &zone_file).unwrap();
    let config = ephemeral_config(dir.path(), &zones);
    let mut served = support::serve(&config);

    let client = reqwest::Client::new();
    let response = client
        .put(format!(
            "http://{}/v1/services/payment/instances/p-1",
            served.api
        ))
        .json(&serde_json::json!({"address": "10.7.0.1", "port": 8080}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);

    let reply = query_udp(
        served.dns,
        &query("payment.svc.internal.", RecordType::A, None),
    )
    .await;
    assert!(
        matches!(&reply.answers[..], [r] if matches!(&r.data, RData::A(a) if a.0.to_string() == "10.7.0.1"))
    );

    let front_door = log_field(&served, "gateway=");
    let missing = client
        .get(format!("http://{front_door}/no/route"))
        .header("x-request-id", "e2e-1")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);

    for _ in 0..3 {
        let over_tcp = support::query_tcp(
            served.dns,
            &query("payment.svc.internal.", RecordType::A, None),
        )
        .await;
        assert_eq!(over_tcp.answers.len(), 1);
    }

    let mut text = std::fs::read_to_string(&zone_file).unwrap();
    text.push_str("added IN A 10.7.0.2\n");
    std::fs::write(&zone_file, text).unwrap();
    signal(&served.child, "HUP");
    until_reply(served.dns, "added.svc.internal.", |m| m.answers.len() == 1).await;
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "SIGHUP does not stop muster"
    );

    signal(&served.child, "TERM");
    let exit =
        wait_for_exit(&mut served.child, Duration::from_secs(15)).expect("exits after SIGTERM");
    assert!(exit.success(), "clean exit: {exit:?}");
    served.reader.take().unwrap().join().unwrap();
    let log = served.log.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l.contains("zones and routes reloaded")),
        "{log:#?}"
    );
    assert!(log.iter().any(|l| l.contains("shutting down")), "{log:#?}");
    let access: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("muster::access"))
        .collect();
    assert_eq!(
        access.len(),
        1,
        "one access-log event per request: {log:#?}"
    );
    for field in [
        "status=404",
        "request_id=e2e-1",
        "path=/no/route",
        "bytes=",
        "latency_ms=",
    ] {
        assert!(access[0].contains(field), "{field} in {}", access[0]);
    }
    let per_query: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("payment.svc.internal") || l.contains("request:"))
        .collect();
    assert!(
        per_query.is_empty(),
        "no per-query lines at info: {per_query:#?}"
    );
}
