//! Real resolvers in front of a real muster: unbound (a caching recursive
//! resolver with a stub zone for `svc.internal.`) and nginx (`resolver` with
//! a variable `proxy_pass`). They check what caching clients see: A and SRV
//! answers through a resolver (asking with strict QNAME minimisation and
//! 0x20 case randomisation, so empty non-terminals and the echoed question
//! are exercised too), a deregistration showing once `dns.ttl` passes,
//! NXDOMAIN cached only for `dns.negative_ttl`, TC answers retried over
//! TCP, and nginx following instances as they come and go.
//!
//! Ignored in plain `cargo test`; CI installs unbound and nginx (`.ci/run`)
//! and runs them with `--include-ignored`. Every process runs on ephemeral
//! loopback ports from a tempdir and is killed when its test ends. Nothing
//! leaves loopback: unbound knows only the stub zone, sends from 127.0.0.1,
//! may not query any address outside 127.0.0.0/8, and the tests ask it for
//! names under `svc.internal.` only.

mod support;

use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use serde_json::json;
use support::{instance, start, start_with, test_config, wait_until};
use tokio_util::sync::CancellationToken;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// ---------------------------------------------------------------- processes

/// A port free for both UDP and TCP on `ip` (bound, then released).
fn free_port(ip: IpAddr) -> u16 {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind((ip, 0)).unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on {ip}");
}

/// The path of a program that Debian puts in `/usr/sbin`, which is not
/// on every user's PATH.
fn program(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} not found: install the {package} package"))
}

/// A child process killed (and reaped) when dropped, so a failing assert
/// does not leak it. Its stdout and stderr go to `log`.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, mut command: Command, log: PathBuf) -> Self {
        let file = fs::File::create(&log).unwrap();
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        Self { name, child, log }
    }

    /// Everything the process wrote so far.
    fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the process's output if it has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status}):\n{}", self.name, self.output());
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- unbound

/// unbound on its own loopback port, resolving `svc.internal.` by asking
/// only muster (a stub zone), and nothing else.
struct Unbound {
    addr: SocketAddr,
    process: Process,
    _dir: tempfile::TempDir,
}

impl Unbound {
    async fn start(muster_dns: SocketAddr) -> Self {
        assert!(
            muster_dns.ip().is_loopback(),
            "muster must be on loopback: {muster_dns}"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port(LOOPBACK);
        let conf = dir.path().join("unbound.conf");
        fs::write(&conf, unbound_conf(dir.path(), port, muster_dns)).unwrap();
        let mut command = Command::new(program("unbound", "unbound"));
        command.arg("-d").arg("-c").arg(&conf);
        let process = Process::spawn("unbound", command, dir.path().join("unbound.log"));
        let mut unbound = Self {
            addr: SocketAddr::new(LOOPBACK, port),
            process,
            _dir: dir,
        };
        unbound.wait_until_answering().await;
        unbound
    }

    /// Polls until unbound answers the zone's SOA (a name in the stub
    /// zone, so the probe itself never leaves loopback).
    async fn wait_until_answering(&mut self) {
        let mut probe = support::query("svc.internal.", RecordType::SOA, Some(1232));
        // Without RD unbound answers from its (empty) cache only.
        probe.metadata.recursion_desired = true;
        let probe = probe.to_vec().unwrap();
        let addr = self.addr;
        let process = &mut self.process;
        wait_until("unbound answers the svc.internal SOA", || {
            process.assert_running();
            let probe = probe.clone();
            async move {
                let reply = support::exchange_udp(addr, &probe, Duration::from_millis(200)).await?;
                let reply = Message::from_vec(&reply).ok()?;
                (reply.metadata.response_code == ResponseCode::NoError && !reply.answers.is_empty())
                    .then_some(())
            }
        })
        .await;
    }

    async fn dig(&self, name: &str, rtype: &str) -> Dig {
        dig(self.addr, name, rtype, &[]).await
    }
}

fn unbound_conf(dir: &Path, port: u16, muster_dns: SocketAddr) -> String {
    let dir = dir.display();
    // Every IPv4 block but 127.0.0.0/8: unbound may not query any of them.
    let elsewhere = [
        "0.0.0.0/2",
        "64.0.0.0/3",
        "96.0.0.0/4",
        "112.0.0.0/5",
        "120.0.0.0/6",
        "124.0.0.0/7",
        "126.0.0.0/8",
        "128.0.0.0/1",
    ];
    let mut conf = format!(
        r#"server:
    verbosity: 1
    chroot: ""
    username: ""
    directory: "{dir}"
    pidfile: "{dir}/unbound.pid"
    use-syslog: no
    logfile: ""
    log-time-ascii: yes
    do-daemonize: no
    num-threads: 1
    interface: 127.0.0.1
    port: {port}
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    # Queries go out from loopback, to loopback only (muster), never to
    # the root servers.
    outgoing-interface: 127.0.0.1
    do-not-query-localhost: no
"#
    );
    for block in elsewhere {
        writeln!(conf, "    do-not-query-address: {block}").unwrap();
    }
    write!(
        conf,
        r#"    # Strict: an empty non-terminal answered NXDOMAIN would fail the
    # lookup instead of unbound retrying with the full name. 0x20: every
    # reply must echo the question's random case.
    qname-minimisation: yes
    qname-minimisation-strict: yes
    use-caps-for-id: yes
    # No validator, no trust anchors: nothing to fetch at start.
    module-config: "iterator"
    domain-insecure: "svc.internal."

remote-control:
    control-enable: no

stub-zone:
    name: "svc.internal."
    stub-addr: {ip}@{dns_port}
"#,
        ip = muster_dns.ip(),
        dns_port = muster_dns.port(),
    )
    .unwrap();
    conf
}

// ---------------------------------------------------------------- dig

/// One record as dig prints it.
#[derive(Debug, Clone)]
struct Rr {
    name: String,
    ttl: u32,
    rtype: String,
    data: String,
}

/// What dig printed, parsed.
#[derive(Debug)]
struct Dig {
    text: String,
    status: String,
    flags: Vec<String>,
    answers: Vec<Rr>,
    authority: Vec<Rr>,
}

impl Dig {
    fn parse(text: String) -> Self {
        let status = text
            .split_once("status: ")
            .and_then(|(_, rest)| rest.split(',').next())
            .unwrap_or("")
            .to_string();
        let flags = text
            .lines()
            .find_map(|l| l.strip_prefix(";; flags: "))
            .and_then(|l| l.split(';').next())
            .map(|f| f.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let section = |title: &str| -> Vec<Rr> {
            text.lines()
                .skip_while(|l| !l.starts_with(title))
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| {
                    let mut fields = l.split_whitespace();
                    let name = fields.next()?.to_string();
                    let ttl = fields.next()?.parse().ok()?;
                    let _class = fields.next()?;
                    let rtype = fields.next()?.to_string();
                    let data = fields.collect::<Vec<_>>().join(" ");
                    Some(Rr {
                        name,
                        ttl,
                        rtype,
                        data,
                    })
                })
                .collect()
        };
        let answers = section(";; ANSWER SECTION:");
        let authority = section(";; AUTHORITY SECTION:");
        Self {
            status,
            flags,
            answers,
            authority,
            text,
        }
    }

    /// The data of the answers of `rtype`, sorted.
    fn data(&self, rtype: &str) -> Vec<String> {
        let mut data: Vec<String> = self
            .answers
            .iter()
            .filter(|r| r.rtype == rtype)
            .map(|r| r.data.clone())
            .collect();
        data.sort();
        data
    }

    fn addresses(&self) -> Vec<String> {
        self.data("A")
    }
}

/// `dig @server name rtype`, one try of at most 2 s.
async fn dig(server: SocketAddr, name: &str, rtype: &str, extra: &[&str]) -> Dig {
    let mut command = Command::new("dig");
    command
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=2", "+tries=1", name, rtype])
        .args(extra);
    let what = format!("dig @{server} {name} {rtype} {extra:?}");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("dig runs (install bind9-dnsutils)");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{what} failed:\n{text}");
    Dig::parse(text)
}

// ---------------------------------------------------------------- unbound tests

#[tokio::test]
#[ignore = "needs unbound"]
async fn unbound_resolves_registered_services_a_and_srv() {
    let muster = start().await;
    muster
        .register_ok(
            "web",
            "w-1",
            json!({"address": "10.0.1.6", "port": 8080, "ports": {"http": 8081}}),
        )
        .await;
    muster
        .register_ok(
            "web",
            "w-2",
            json!({"address": "10.0.1.7", "port": 8080, "ports": {"http": 8082}}),
        )
        .await;
    let unbound = Unbound::start(muster.dns).await;

    let a = unbound.dig("web.svc.internal", "A").await;
    assert_eq!(a.status, "NOERROR", "{}", a.text);
    assert!(
        a.flags.iter().any(|f| f == "ra"),
        "unbound answers as a recursive resolver (RA): {}",
        a.text
    );
    assert_eq!(
        a.addresses(),
        ["10.0.1.6", "10.0.1.7"],
        "both instances through unbound:\n{}",
        a.text
    );

    // Asked with QNAME minimisation, this goes web → _tcp.web (an empty
    // non-terminal: NODATA, not NXDOMAIN) → _http._tcp.web.
    let srv = unbound.dig("_http._tcp.web.svc.internal", "SRV").await;
    assert_eq!(srv.status, "NOERROR", "{}", srv.text);
    assert_eq!(
        srv.data("SRV"),
        [
            "0 1 8081 w-1.web.svc.internal.",
            "0 1 8082 w-2.web.svc.internal."
        ],
        "named-port SRV through unbound:\n{}",
        srv.text
    );
    // The SRV targets resolve through the resolver too.
    let target = unbound.dig("w-2.web.svc.internal", "A").await;
    assert_eq!(target.addresses(), ["10.0.1.7"], "{}", target.text);
    // And so do the static records beside the registry.
    let gateway = unbound.dig("gateway.svc.internal", "A").await;
    assert_eq!(gateway.addresses(), ["127.0.0.1"], "{}", gateway.text);
    // A name that exists without the type: NODATA with the SOA, cached as
    // such (not turned into an error).
    let nodata = unbound.dig("web.svc.internal", "AAAA").await;
    assert_eq!(nodata.status, "NOERROR", "{}", nodata.text);
    assert!(nodata.answers.is_empty(), "{}", nodata.text);
    assert!(
        nodata.authority.iter().any(|r| r.rtype == "SOA"),
        "SOA in authority: {}",
        nodata.text
    );
    muster.stop().await;
}

#[tokio::test]
#[ignore = "needs unbound"]
async fn unbound_follows_a_deregistration_once_the_ttl_passes() {
    let mut config = test_config();
    config.dns.ttl = Duration::from_secs(1);
    let muster = start_with(config).await;
    muster
        .register_ok("pay", "p-1", instance("10.0.2.1", 80))
        .await;
    muster
        .register_ok("pay", "p-2", instance("10.0.2.2", 80))
        .await;
    let unbound = Unbound::start(muster.dns).await;

    let before = unbound.dig("pay.svc.internal", "A").await;
    assert_eq!(
        before.addresses(),
        ["10.0.2.1", "10.0.2.2"],
        "{}",
        before.text
    );
    assert!(
        before.answers.iter().all(|r| r.ttl <= 1),
        "unbound hands out at most muster's 1 s TTL:\n{}",
        before.text
    );

    // How soon unbound follows is its TTL, checked above and below; the
    // time it takes is not asserted (a loaded machine would make that
    // flaky), only that it follows within the deadline.
    assert_eq!(muster.deregister("pay", "p-1").await, 204);
    let after = wait_until("unbound's answer loses the deregistered p-1", || async {
        let answer = unbound.dig("pay.svc.internal", "A").await;
        (answer.addresses() == ["10.0.2.2"]).then_some(answer)
    })
    .await;
    assert!(
        after.answers.iter().all(|r| r.ttl <= 1),
        "the fresh answer keeps the 1 s TTL:\n{}",
        after.text
    );
    muster.stop().await;
}

#[tokio::test]
#[ignore = "needs unbound"]
async fn unbound_caches_nxdomain_only_for_the_negative_ttl() {
    let mut config = test_config();
    config.dns.negative_ttl = Duration::from_secs(1);
    let muster = start_with(config).await;
    let unbound = Unbound::start(muster.dns).await;

    let missing = unbound.dig("late.svc.internal", "A").await;
    assert_eq!(
        missing.status, "NXDOMAIN",
        "not registered yet:\n{}",
        missing.text
    );
    let soa = missing
        .authority
        .iter()
        .find(|r| r.rtype == "SOA")
        .unwrap_or_else(|| panic!("SOA in authority for negative caching:\n{}", missing.text));
    assert_eq!(soa.name, "svc.internal.", "{}", missing.text);
    assert!(
        soa.ttl <= 1,
        "the negative answer lives min(SOA TTL, MINIMUM) = 1 s:\n{}",
        missing.text
    );

    muster
        .register_ok("late", "l-1", instance("10.0.3.1", 80))
        .await;
    let found = wait_until("unbound stops answering NXDOMAIN for late", || async {
        let answer = unbound.dig("late.svc.internal", "A").await;
        (answer.status == "NOERROR").then_some(answer)
    })
    .await;
    assert_eq!(found.addresses(), ["10.0.3.1"], "{}", found.text);
    muster.stop().await;
}

#[tokio::test]
#[ignore = "needs unbound"]
async fn unbound_retries_over_tcp_when_muster_truncates() {
    let muster = start().await;
    // 100 A records (about 1.6 KB) do not fit in unbound's 1232-byte EDNS
    // buffer: muster answers TC with no records, unbound asks again over
    // TCP.
    for i in 0..100u16 {
        let address = format!("10.4.0.{}", i + 1);
        muster
            .register_ok("big", &format!("b-{i}"), instance(&address, 80))
            .await;
    }
    let unbound = Unbound::start(muster.dns).await;
    let answer = dig(unbound.addr, "big.svc.internal", "A", &["+tcp"]).await;
    assert_eq!(answer.status, "NOERROR", "{}", answer.text);
    assert_eq!(
        answer.addresses().len(),
        100,
        "every record, fetched by unbound over TCP:\n{}",
        answer.text
    );
    muster.stop().await;
}

// ---------------------------------------------------------------- nginx

/// An HTTP server on one address that answers every request with its name.
struct NamedBackend {
    stop: CancellationToken,
}

impl NamedBackend {
    fn serve(listener: tokio::net::TcpListener, name: &'static str) -> Self {
        let app = axum::Router::new().fallback(move || async move { name });
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await
                .unwrap();
        });
        Self { stop }
    }
}

impl Drop for NamedBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// HTTP servers named `name` on `ip`:P, one port P for all of them, so
/// nginx (which resolves A records only and needs the port in the config)
/// reaches any of them through one `proxy_pass http://$backend:P`.
async fn backends_on_one_port(hosts: &[(IpAddr, &'static str)]) -> (Vec<NamedBackend>, u16) {
    'attempt: for _ in 0..50 {
        let (first_ip, _) = hosts[0];
        let first = tokio::net::TcpListener::bind((first_ip, 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for &(ip, _) in &hosts[1..] {
            match tokio::net::TcpListener::bind((ip, port)).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => continue 'attempt,
            }
        }
        let backends = listeners
            .into_iter()
            .zip(hosts)
            .map(|(listener, &(_, name))| NamedBackend::serve(listener, name))
            .collect();
        return (backends, port);
    }
    panic!("no port free on all of {hosts:?}");
}

struct Nginx {
    addr: SocketAddr,
    process: Process,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx proxying every request to `<service>.svc.internal:<backend_port>`,
    /// resolved through muster at request time and kept for 1 s.
    async fn start(muster_dns: SocketAddr, service: &str, backend_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port(LOOPBACK);
        let d = dir.path().display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
error_log {d}/error.log info;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    resolver {muster_dns} valid=1s ipv6=off;
    resolver_timeout 2s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            set $backend "{service}.svc.internal";
            proxy_pass http://$backend:{backend_port};
            proxy_connect_timeout 2s;
            proxy_read_timeout 5s;
        }}
    }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        fs::write(&conf_path, conf).unwrap();
        let mut command = Command::new(program("nginx", "nginx"));
        // -e: the error log before the config is read (not /var/log/nginx).
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path);
        let process = Process::spawn("nginx", command, dir.path().join("nginx.out"));
        let mut nginx = Self {
            addr: SocketAddr::new(LOOPBACK, port),
            process,
            dir,
        };
        let addr = nginx.addr;
        let process = &mut nginx.process;
        wait_until("nginx accepts connections", || {
            process.assert_running();
            async move { tokio::net::TcpStream::connect(addr).await.ok() }
        })
        .await;
        nginx
    }

    fn error_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(support::DEADLINE)
        .build()
        .unwrap()
}

/// Which backend answered a GET through nginx, or the failure.
async fn through(nginx: &Nginx, client: &reqwest::Client) -> Result<String, String> {
    let response = client
        .get(format!("http://{}/", nginx.addr))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.text().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

#[tokio::test]
#[ignore = "needs nginx"]
async fn nginx_resolver_follows_instances_as_they_come_and_go() {
    let mut config = test_config();
    config.dns.ttl = Duration::from_secs(1);
    let muster = start_with(config).await;
    let (_backends, port) =
        backends_on_one_port(&[(LOOPBACK, "a"), ("127.0.0.2".parse().unwrap(), "b")]).await;
    muster
        .register_ok("web", "a", instance("127.0.0.1", port))
        .await;
    let nginx = Nginx::start(muster.dns, "web", port).await;
    let client = client();

    for _ in 0..3 {
        let backend = through(&nginx, &client).await;
        assert_eq!(
            backend.as_deref(),
            Ok("a"),
            "nginx resolves web.svc.internal to a:\n{}",
            nginx.error_log()
        );
    }

    // b comes, a goes.
    muster
        .register_ok("web", "b", instance("127.0.0.2", port))
        .await;
    assert_eq!(muster.deregister("web", "a").await, 204);
    wait_until("nginx sends five requests in a row to b", || async {
        for _ in 0..5 {
            if through(&nginx, &client).await.ok()? != "b" {
                return None;
            }
        }
        Some(())
    })
    .await;
    for _ in 0..20 {
        let backend = through(&nginx, &client).await;
        assert_eq!(
            backend.as_deref(),
            Ok("b"),
            "a is deregistered: only b gets traffic:\n{}",
            nginx.error_log()
        );
    }
    muster.stop().await;
}

#[tokio::test]
#[ignore = "needs nginx"]
async fn nginx_resolver_retries_truncated_answers_over_tcp() {
    // nginx asks without EDNS, so muster's UDP limit is 512 bytes; 40 A
    // records (about 700 bytes) come back TC with no records, and nginx
    // must ask again over TCP to get any backend at all.
    let hosts: Vec<(IpAddr, &'static str)> = (1..=40u8)
        .map(|i| (IpAddr::V4(Ipv4Addr::new(127, 0, 2, i)), "many"))
        .collect();
    let (_backends, port) = backends_on_one_port(&hosts).await;
    let muster = start().await;
    for (i, (ip, _)) in hosts.iter().enumerate() {
        muster
            .register_ok("many", &format!("m-{i}"), instance(&ip.to_string(), port))
            .await;
    }
    let udp = support::query_udp(
        muster.dns,
        &support::query("many.svc.internal.", RecordType::A, None),
    )
    .await;
    assert!(
        udp.metadata.truncation && udp.answers.is_empty(),
        "without EDNS the answer does not fit in 512 bytes: {udp:?}"
    );

    let nginx = Nginx::start(muster.dns, "many", port).await;
    let client = client();
    for _ in 0..5 {
        let backend = through(&nginx, &client).await;
        assert_eq!(
            backend.as_deref(),
            Ok("many"),
            "nginx resolves the truncated answer over TCP:\n{}",
            nginx.error_log()
        );
    }
    muster.stop().await;
}
