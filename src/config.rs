//! The TOML configuration: typed structs, the defaults (one place), and
//! validation whose errors name the file and the key. `muster serve` with
//! no file runs on these defaults, on loopback only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Everything muster can be told at start-up.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the registry keeps its data.
    pub data_dir: PathBuf,
    /// Whether registrations survive a restart.
    pub store: StoreKind,
    /// Where `*.zone` files are read from; a missing folder means no static zones.
    pub zones_dir: PathBuf,
    pub dns: DnsConfig,
    pub api: ApiConfig,
    pub gateway: GatewayConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Each address is served over both UDP and TCP.
    pub listen: Vec<SocketAddr>,
    /// The zone registry names live under.
    pub zone: String,
    /// TTL of records built from the registry; short so clients follow changes.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// SOA minimum of the registry zone: how long resolvers cache NXDOMAIN/NODATA.
    #[serde(with = "duration")]
    pub negative_ttl: Duration,
    /// A TCP connection that sends no query for this long is closed.
    #[serde(with = "duration")]
    pub tcp_idle_timeout: Duration,
    /// TCP (and DoT) connections served at once; more wait to be accepted.
    pub max_tcp_connections: usize,
    /// UDP sockets (each its own task) per listen address, sharing the
    /// port; 0 means one per available core.
    pub udp_workers: usize,
    /// Hand out only passing instances; by default warning ones serve too.
    pub only_passing: bool,
    /// Most A, AAAA or SRV records in one answer, after rotation; 0: no cap.
    pub max_answers: usize,
    /// Answer PTR queries for registered addresses under `in-addr.arpa.`
    /// and `ip6.arpa.`.
    pub reverse: bool,
    pub rrl: RrlConfig,
    /// Static zones that may be transferred (AXFR, IXFR as a full
    /// transfer, over TCP) and the peers allowed to: `{"zone." = ["10.0.0.0/8"]}`.
    pub transfers: std::collections::BTreeMap<String, Vec<ipnet::IpNet>>,
    /// DNS over TLS on this address (off when absent); needs `tls_cert`
    /// and `tls_key` (PEM), which SIGHUP reads again.
    pub tls_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// Response rate limiting for UDP (off while `responses_per_second` is 0).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RrlConfig {
    /// Identical answers per second to one client /24 (IPv6 /56).
    pub responses_per_second: u32,
    /// Every `slip`-th limited answer is sent truncated; the rest are
    /// dropped (0: drop all, 1: truncate all).
    pub slip: u32,
    /// Prefixes never limited (trusted resolvers).
    pub exempt: Vec<ipnet::IpNet>,
}

impl Default for RrlConfig {
    fn default() -> Self {
        Self {
            responses_per_second: 0,
            slip: 2,
            exempt: vec![
                "127.0.0.0/8".parse().expect("a valid prefix"),
                "::1/128".parse().expect("a valid prefix"),
            ],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Client connections served at once; more wait in the kernel's
    /// backlog.
    pub max_connections: usize,
    /// Peers whose `X-Forwarded-*` / `Forwarded` headers are extended
    /// rather than replaced (CIDR prefixes or single addresses).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Idle pooled upstream connections are closed after this, below the
    /// keep-alive timeout of common upstream servers (Node.js: 5 s).
    #[serde(with = "duration")]
    pub upstream_idle_timeout: Duration,
    /// Consecutive connect errors or 5xx that eject an instance.
    pub eject_after_errors: u32,
    /// The first ejection's length; each further one doubles, up to `eject_max`.
    #[serde(with = "duration")]
    pub eject_for: Duration,
    #[serde(with = "duration")]
    pub eject_max: Duration,
    /// A standalone gateway: find backends by SRV lookups to this DNS
    /// server (under `dns.zone`) instead of the local registry.
    pub resolver: Option<SocketAddr>,
    /// How long the last good SRV answer keeps serving when lookups fail.
    #[serde(with = "duration")]
    pub stale_for: Duration,
    pub routes: Vec<RouteConfig>,
}

/// One `[[gateway.routes]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// `api.example.com` or `*.example.com`; any host when absent.
    pub host: Option<String>,
    #[serde(default = "root_path")]
    pub path_prefix: String,
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    pub service: String,
    /// A named port; the instance's default port when absent.
    pub port: Option<String>,
    pub strip_prefix: Option<String>,
    pub replace_prefix: Option<ReplacePrefix>,
    /// The Host header upstream; the client's when absent.
    pub host_rewrite: Option<String>,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub upstream: UpstreamProtocol,
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default = "default_request_timeout", with = "duration")]
    pub timeout: Duration,
    /// Longest the upstream may send nothing in the middle of a response
    /// body.
    #[serde(default = "default_read_timeout", with = "duration")]
    pub read_timeout: Duration,
    #[serde(default = "default_retries")]
    pub retries: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplacePrefix {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastRequest,
}

/// How the gateway speaks to upstream instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    H2,
}

fn root_path() -> String {
    "/".into()
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

/// As nginx's `proxy_read_timeout`.
fn default_read_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_retries() -> u32 {
    2
}

/// Most retries a route may ask for.
pub const MAX_RETRIES: u32 = 10;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `muster=debug,warn`); `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// `<data_dir>/registry.redb`: every acknowledged write survives a crash.
    Embedded,
    /// Nothing is kept: for tests and for measuring what durability costs.
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            store: StoreKind::Embedded,
            zones_dir: PathBuf::from("./zones"),
            dns: DnsConfig::default(),
            api: ApiConfig::default(),
            gateway: GatewayConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8600))],
            zone: "svc.internal.".into(),
            ttl: Duration::from_secs(5),
            negative_ttl: Duration::from_secs(5),
            tcp_idle_timeout: Duration::from_secs(10),
            max_tcp_connections: 1024,
            udp_workers: 0,
            only_passing: false,
            max_answers: 0,
            reverse: false,
            rrl: RrlConfig::default(),
            transfers: std::collections::BTreeMap::new(),
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8500)),
            max_connections: 4_096,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 16_384,
            trusted_proxies: Vec::new(),
            upstream_idle_timeout: Duration::from_secs(4),
            eject_after_errors: 5,
            eject_for: Duration::from_secs(10),
            eject_max: Duration::from_secs(300),
            resolver: None,
            stale_for: Duration::from_secs(300),
            routes: Vec::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}{line}: key `{key}`: {message}", line = line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        file: String,
        line: Option<usize>,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The dotted key the error is about.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Read { .. } => None,
            Self::Invalid { key, .. } => Some(key),
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `file` only labels errors.
    pub fn from_toml(text: &str, file: &str) -> Result<Self, ConfigError> {
        let deserializer =
            toml::de::Deserializer::parse(text).map_err(|e| ConfigError::Invalid {
                file: file.into(),
                line: e.span().map(|s| line_of(text, s.start)),
                key: String::new(),
                message: e.message().to_string(),
            })?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = crate::field_path::field_of(&e.path().to_string(), e.inner().message())
                .unwrap_or_default();
            ConfigError::Invalid {
                file: file.into(),
                line: e.inner().span().map(|s| line_of(text, s.start)),
                key,
                message: e.inner().message().to_string(),
            }
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                file: file.into(),
                line: None,
                key,
                message,
            })?;
        Ok(config)
    }

    /// The first problem found, as (dotted key, message).
    fn validate(&self) -> Result<(), (String, String)> {
        fn at(key: &str) -> impl Fn(String) -> (String, String) + '_ {
            move |message| (key.to_string(), message)
        }
        if self.dns.listen.is_empty() {
            return Err(at("dns.listen")("needs at least one address".into()));
        }
        validate_zone(&self.dns.zone).map_err(at("dns.zone"))?;
        whole_seconds(self.dns.ttl).map_err(at("dns.ttl"))?;
        whole_seconds(self.dns.negative_ttl).map_err(at("dns.negative_ttl"))?;
        if self.dns.tls_listen.is_some() {
            if self.dns.tls_cert.is_none() {
                return Err(at("dns.tls_cert")("is needed with dns.tls_listen".into()));
            }
            if self.dns.tls_key.is_none() {
                return Err(at("dns.tls_key")("is needed with dns.tls_listen".into()));
            }
        }
        for zone in self.dns.transfers.keys() {
            validate_zone(zone).map_err(|m| (format!("dns.transfers.{zone}"), m))?;
        }
        if self.dns.max_tcp_connections == 0 {
            return Err(at("dns.max_tcp_connections")("must be at least 1".into()));
        }
        if self.dns.tcp_idle_timeout.is_zero() {
            return Err(at("dns.tcp_idle_timeout")("must be more than 0".into()));
        }
        if self.api.max_connections == 0 {
            return Err(at("api.max_connections")("must be at least 1".into()));
        }
        tracing_subscriber::EnvFilter::builder()
            .parse(&self.log.level)
            .map_err(|e| at("log.level")(format!("{:?}: {e}", self.log.level)))?;
        self.validate_gateway()
    }

    fn validate_gateway(&self) -> Result<(), (String, String)> {
        let gateway = &self.gateway;
        if gateway.max_connections == 0 {
            return Err((
                "gateway.max_connections".into(),
                "must be at least 1".into(),
            ));
        }
        if gateway.upstream_idle_timeout.is_zero() {
            return Err((
                "gateway.upstream_idle_timeout".into(),
                "must be more than 0".into(),
            ));
        }
        if gateway.eject_after_errors == 0 {
            return Err((
                "gateway.eject_after_errors".into(),
                "must be at least 1".into(),
            ));
        }
        if gateway.eject_for.is_zero() || gateway.eject_max < gateway.eject_for {
            return Err((
                "gateway.eject_max".into(),
                "eject_for must be more than 0 and eject_max at least eject_for".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, route) in gateway.routes.iter().enumerate() {
            let key = |field: &str| format!("gateway.routes[{i}].{field}");
            if !names.insert(route.name.as_str()) {
                return Err((key("name"), format!("{:?} names two routes", route.name)));
            }
            crate::gateway::validate_route(route)
                .map_err(|(field, message)| (key(field), message))?;
        }
        Ok(())
    }

    /// The registry zone as an absolute, lowercase name (`svc.internal.`).
    pub fn zone_fqdn(&self) -> String {
        fqdn(&self.dns.zone)
    }
}

/// A zone name as an absolute, lowercase name: `Example.internal` →
/// `example.internal.`.
pub fn fqdn(zone: &str) -> String {
    format!("{}.", zone.trim_end_matches('.').to_ascii_lowercase())
}

/// DNS TTLs are whole seconds that fit in 31 bits (RFC 2181 §8).
pub fn ttl_seconds(duration: Duration) -> u32 {
    u32::try_from(duration.as_secs()).unwrap_or(i32::MAX as u32)
}

fn whole_seconds(duration: Duration) -> Result<(), String> {
    if duration.subsec_nanos() != 0 {
        return Err("DNS TTLs are whole seconds".into());
    }
    if duration.as_secs() > i32::MAX as u64 {
        return Err("longer than a DNS TTL can be (2^31 - 1 s)".into());
    }
    Ok(())
}

fn validate_zone(zone: &str) -> Result<(), String> {
    let trimmed = zone.strip_suffix('.').unwrap_or(zone);
    if trimmed.is_empty() {
        return Err("must name a zone, not the root".into());
    }
    for label in trimmed.split('.') {
        crate::registry::validate::dns_label("dns.zone", label).map_err(|e| e.message)?;
    }
    Ok(())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Durations written as `"5s"`, `"500ms"`, `"1m"`.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de::Error};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|e| {
            D::Error::custom(format!(
                "{text:?} is not a duration like \"5s\" or \"500ms\" ({e})"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(text: &str) -> ConfigError {
        Config::from_toml(text, "test.toml").unwrap_err()
    }

    #[test]
    fn empty_file_gives_loopback_defaults() {
        let config = Config::from_toml("", "test.toml").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.dns.listen[0].to_string(), "127.0.0.1:8600");
        assert_eq!(config.api.listen.to_string(), "127.0.0.1:8500");
        assert_eq!(config.zone_fqdn(), "svc.internal.");
    }

    #[test]
    fn every_key_can_be_set() {
        let config = Config::from_toml(
            r#"
            data_dir = "/var/lib/muster"
            store = "memory"
            zones_dir = "/etc/muster/zones"
            [dns]
            listen = ["127.0.0.1:53", "[::1]:53"]
            zone = "Example.Internal"
            ttl = "10s"
            negative_ttl = "1m"
            tcp_idle_timeout = "500ms"
            only_passing = true
            max_answers = 3
            reverse = true
            [api]
            listen = "127.0.0.1:9500"
            max_connections = 64
            [gateway]
            enabled = false
            listen = "127.0.0.1:9080"
            max_connections = 128
            [log]
            level = "muster=debug,warn"
            format = "json"
            "#,
            "test.toml",
        )
        .unwrap();
        assert_eq!(config.dns.listen.len(), 2);
        assert_eq!(config.dns.ttl, Duration::from_secs(10));
        assert_eq!(config.dns.negative_ttl, Duration::from_secs(60));
        assert_eq!(config.zone_fqdn(), "example.internal.");
        assert!(!config.gateway.enabled);
        assert_eq!(config.api.max_connections, 64);
        assert_eq!(config.gateway.max_connections, 128);
        assert!(config.dns.only_passing);
        assert_eq!(config.dns.max_answers, 3);
        assert!(config.dns.reverse);
        assert_eq!(config.store, StoreKind::Memory);
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_keys_are_named_with_file_and_line() {
        let error = invalid("[dns]\nzone = \"a.b\"\nttls = \"5s\"\n");
        assert_eq!(error.key(), Some("dns.ttls"));
        let text = error.to_string();
        assert!(text.starts_with("test.toml:3: key `dns.ttls`"), "{text}");
        assert_eq!(invalid("colour = 1").key(), Some("colour"));
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(invalid("[dns]\nttl = \"soon\"").key(), Some("dns.ttl"));
        assert_eq!(invalid("[dns]\nttl = \"1500ms\"").key(), Some("dns.ttl"));
        assert_eq!(invalid("[dns]\nlisten = []").key(), Some("dns.listen"));
        assert_eq!(
            invalid("[dns]\nlisten = [\"nowhere\"]").key(),
            Some("dns.listen[0]")
        );
        assert_eq!(
            invalid("[dns]\nzone = \"bad_zone\"").key(),
            Some("dns.zone")
        );
        assert_eq!(invalid("[dns]\nzone = \".\"").key(), Some("dns.zone"));
        assert_eq!(
            invalid("[dns]\ntls_listen = \"127.0.0.1:853\"").key(),
            Some("dns.tls_cert")
        );
        assert_eq!(invalid("[api]\nlisten = 8500").key(), Some("api.listen"));
        assert_eq!(invalid("[log]\nformat = \"xml\"").key(), Some("log.format"));
        assert_eq!(invalid("[log]\nlevel = \"=[\"").key(), Some("log.level"));
        assert_eq!(
            invalid("[gateway]\nupstream_idle_timeout = \"0s\"").key(),
            Some("gateway.upstream_idle_timeout")
        );
        assert_eq!(
            invalid("[gateway]\nmax_connections = 0").key(),
            Some("gateway.max_connections")
        );
        assert_eq!(
            invalid("[api]\nmax_connections = 0").key(),
            Some("api.max_connections")
        );
    }

    #[test]
    fn syntax_errors_carry_the_line() {
        let text = invalid("[dns]\nttl = \n").to_string();
        assert!(text.starts_with("test.toml:2"), "{text}");
    }
}
