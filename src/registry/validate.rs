//! Validation at the edge: turns what a client sent into a normalised
//! [`Instance`], or a [`ValidationError`] that names the offending field.
//! Nothing invalid ever reaches `Registry::apply`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use super::model::{
    CheckKind, CheckSpec, Health, HealthStatus, Instance, Maintenance, NamedPort, Protocol,
    truncate_output,
};

pub const MAX_TAGS: usize = 32;
pub const MAX_NAMED_PORTS: usize = 16;
pub const MAX_META_KEYS: usize = 64;
pub const MAX_META_KEY_LEN: usize = 128;
pub const MAX_META_VALUE_LEN: usize = 512;
/// An instance id that would make `<tag>.tag.<service>` ambiguous.
pub const RESERVED_INSTANCE_ID: &str = "tag";
pub const MAX_CHECK_HEADERS: usize = 32;
pub const MIN_TTL: Duration = Duration::from_secs(1);
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
pub const MAX_DAMPING: i64 = 100;
/// Largest gRPC service config, as compact JSON.
pub const MAX_GRPC_CONFIG: usize = 4096;

/// A rejected input: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The registration body as clients send it, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub address: String,
    pub port: i64,
    #[serde(default)]
    pub ports: BTreeMap<String, PortSpec>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    pub weight: Option<i64>,
    pub priority: Option<i64>,
    pub grpc_config: Option<serde_json::Value>,
    pub check: Option<CheckInput>,
}

/// A health check as clients send it: exactly one of `ttl`, `http`, `tcp`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckInput {
    pub ttl: Option<String>,
    pub http: Option<String>,
    pub tcp: Option<String>,
    pub method: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub initial_status: Option<HealthStatus>,
    pub success_before_passing: Option<i64>,
    pub failures_before_critical: Option<i64>,
    pub deregister_after: Option<String>,
}

/// A named port: a bare number (tcp) or `{"port": 53, "protocol": "udp"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    Number(i64),
    Full(FullPortSpec),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullPortSpec {
    pub port: i64,
    pub protocol: Option<String>,
}

/// Checks `label` is an RFC 1123 label (1–63 of `a-z0-9-`, no hyphen at
/// either end, any case) and returns it lowercased.
pub fn dns_label(field: &str, label: &str) -> Result<String, ValidationError> {
    let invalid = |why: &str| ValidationError::new(field, format!("{label:?} {why}"));
    if label.is_empty() || label.len() > 63 {
        return Err(invalid("must be 1 to 63 characters long"));
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(invalid("may only contain letters, digits and hyphens"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(invalid("must not start or end with a hyphen"));
    }
    Ok(label.to_ascii_lowercase())
}

/// Validates a service name from a path or body.
pub fn service_name(name: &str) -> Result<String, ValidationError> {
    dns_label("service", name)
}

/// Validates an instance id from a path or body.
pub fn instance_id(id: &str) -> Result<String, ValidationError> {
    let id = dns_label("id", id)?;
    if id == RESERVED_INSTANCE_ID {
        return Err(ValidationError::new(
            "id",
            "\"tag\" is reserved (it names the tag subdomain)",
        ));
    }
    Ok(id)
}

impl InstanceSpec {
    /// Validates every field and builds the instance to store.
    pub fn into_instance(self, service: &str, id: &str) -> Result<Instance, ValidationError> {
        let check = self.check.map(CheckInput::into_spec).transpose()?;
        let check = check.map(Box::new);
        Ok(Instance {
            service: service_name(service)?,
            id: instance_id(id)?,
            address: address(&self.address)?,
            port: port("port", self.port)?,
            ports: named_ports(self.ports)?.into(),
            tags: tags(self.tags)?,
            meta: meta(self.meta)?,
            weight: in_range("weight", self.weight.unwrap_or(1), 1)?,
            priority: in_range("priority", self.priority.unwrap_or(0), 0)?,
            grpc_config: self.grpc_config.map(grpc_config).transpose()?,
            health: Health::initial(check.as_deref()),
            check,
            maintenance: None,
            generation: 0,
        })
    }
}

impl CheckInput {
    /// Validates the check and fills in its defaults.
    pub fn into_spec(self) -> Result<CheckSpec, ValidationError> {
        let kind = match (&self.ttl, &self.http, &self.tcp) {
            (Some(ttl), None, None) => self.ttl_kind(ttl)?,
            (None, Some(url), None) => {
                let (interval, timeout) = self.timing()?;
                CheckKind::Http {
                    http: http_url(url)?,
                    method: http_method(self.method.as_deref())?,
                    headers: http_headers(self.headers.clone().unwrap_or_default())?,
                    interval,
                    timeout,
                }
            }
            (None, None, Some(address)) => {
                self.reject_http_only()?;
                let (interval, timeout) = self.timing()?;
                CheckKind::Tcp {
                    tcp: tcp_address(address)?,
                    interval,
                    timeout,
                }
            }
            _ => {
                return Err(ValidationError::new(
                    "check",
                    "needs exactly one of \"ttl\", \"http\" or \"tcp\"",
                ));
            }
        };
        Ok(CheckSpec {
            kind,
            initial_status: self.initial_status.unwrap_or(HealthStatus::Critical),
            success_before_passing: damping(
                "check.success_before_passing",
                self.success_before_passing,
            )?,
            failures_before_critical: damping(
                "check.failures_before_critical",
                self.failures_before_critical,
            )?,
            deregister_after: self
                .deregister_after
                .as_deref()
                .map(|d| at_least("check.deregister_after", d, MIN_TTL))
                .transpose()?,
        })
    }

    fn ttl_kind(&self, ttl: &str) -> Result<CheckKind, ValidationError> {
        for (field, present) in [
            ("check.interval", self.interval.is_some()),
            ("check.timeout", self.timeout.is_some()),
        ] {
            if present {
                return Err(ValidationError::new(
                    field,
                    "only http and tcp checks have it",
                ));
            }
        }
        self.reject_http_only()?;
        Ok(CheckKind::Ttl {
            ttl: at_least("check.ttl", ttl, MIN_TTL)?,
        })
    }

    fn reject_http_only(&self) -> Result<(), ValidationError> {
        for (field, present) in [
            ("check.method", self.method.is_some()),
            ("check.headers", self.headers.is_some()),
        ] {
            if present {
                return Err(ValidationError::new(field, "only http checks have it"));
            }
        }
        Ok(())
    }

    /// Interval (default 10 s, at least 100 ms) and timeout (default the
    /// lesser of 2 s and half the interval; below the interval).
    fn timing(&self) -> Result<(Duration, Duration), ValidationError> {
        let interval = match &self.interval {
            Some(text) => at_least("check.interval", text, MIN_INTERVAL)?,
            None => DEFAULT_INTERVAL,
        };
        let timeout = match &self.timeout {
            Some(text) => duration("check.timeout", text)?,
            None => (interval / 2).min(Duration::from_secs(2)),
        };
        if timeout.is_zero() || timeout >= interval {
            return Err(ValidationError::new(
                "check.timeout",
                format!(
                    "must be more than 0 and less than the interval ({})",
                    humantime::format_duration(interval)
                ),
            ));
        }
        Ok((interval, timeout))
    }
}

fn duration(field: &str, text: &str) -> Result<Duration, ValidationError> {
    humantime::parse_duration(text).map_err(|_| {
        ValidationError::new(
            field,
            format!("{text:?} is not a duration like \"10s\" or \"500ms\""),
        )
    })
}

fn at_least(field: &str, text: &str, min: Duration) -> Result<Duration, ValidationError> {
    let value = duration(field, text)?;
    if value < min {
        return Err(ValidationError::new(
            field,
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    Ok(value)
}

fn damping(field: &str, value: Option<i64>) -> Result<u32, ValidationError> {
    match value.unwrap_or(1) {
        v @ 1..=MAX_DAMPING => Ok(v as u32),
        v => Err(ValidationError::new(
            field,
            format!("{v} is out of range (1 to {MAX_DAMPING})"),
        )),
    }
}

fn http_url(text: &str) -> Result<String, ValidationError> {
    let field = "check.http";
    let url = reqwest::Url::parse(text)
        .map_err(|e| ValidationError::new(field, format!("{text:?} is not a URL ({e})")))?;
    match url.scheme() {
        "http" if url.host().is_some() => Ok(url.to_string()),
        "http" => Err(ValidationError::new(field, "the URL needs a host")),
        "https" => Err(ValidationError::new(
            field,
            "https checks are not supported yet; use an http:// URL",
        )),
        other => Err(ValidationError::new(
            field,
            format!("{other:?} is not http"),
        )),
    }
}

fn http_method(text: Option<&str>) -> Result<String, ValidationError> {
    let text = text.unwrap_or("GET");
    reqwest::Method::from_bytes(text.as_bytes())
        .map(|m| m.to_string())
        .map_err(|_| {
            ValidationError::new("check.method", format!("{text:?} is not an HTTP method"))
        })
}

fn http_headers(
    headers: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ValidationError> {
    if headers.len() > MAX_CHECK_HEADERS {
        return Err(ValidationError::new(
            "check.headers",
            format!("at most {MAX_CHECK_HEADERS} headers"),
        ));
    }
    for (name, value) in &headers {
        let field = format!("check.headers.{name}");
        reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ValidationError::new(&field, "not a valid header name"))?;
        reqwest::header::HeaderValue::from_str(value)
            .map_err(|_| ValidationError::new(&field, "not a valid header value"))?;
    }
    Ok(headers)
}

fn tcp_address(text: &str) -> Result<String, ValidationError> {
    let invalid = || ValidationError::new("check.tcp", format!("{text:?} is not host:port"));
    let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match port.parse::<u16>() {
        Ok(port) if port > 0 && !host.is_empty() => Ok(text.to_string()),
        _ => Err(invalid()),
    }
}

/// An instance as the API returns it (and `muster export` writes it),
/// validated like a registration, keeping its health and maintenance.
pub fn instance_from_json(mut value: serde_json::Value) -> Result<Instance, ValidationError> {
    let object = value
        .as_object_mut()
        .ok_or_else(|| ValidationError::new("", "an instance is a JSON object"))?;
    let service = take_string(object, "service")?;
    let id = take_string(object, "id")?;
    let health = object.remove("health").filter(|h| !h.is_null());
    let maintenance = object.remove("maintenance").filter(|m| !m.is_null());
    let spec: InstanceSpec = from_value(value)?;
    let mut instance = spec.into_instance(&service, &id)?;
    if let Some(health) = health {
        instance.health = stored_health(health)?;
    }
    if let Some(maintenance) = maintenance {
        instance.maintenance = Some(Box::new(stored_maintenance(maintenance)?));
    }
    Ok(instance)
}

fn take_string(
    object: &mut serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<String, ValidationError> {
    match object.remove(field) {
        Some(serde_json::Value::String(text)) => Ok(text),
        _ => Err(ValidationError::new(field, "missing or not a string")),
    }
}

fn from_value<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let message = e.inner().to_string();
        let field =
            crate::field_path::field_of(&e.path().to_string(), &message).unwrap_or_default();
        ValidationError::new(field, message)
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredHealth {
    status: HealthStatus,
    output: String,
    since: String,
}

fn stored_health(value: serde_json::Value) -> Result<Health, ValidationError> {
    let stored: StoredHealth = from_value(value).map_err(|e| prefixed("health", e))?;
    Ok(Health {
        status: stored.status,
        output: truncate_output(stored.output),
        since: timestamp("health.since", &stored.since)?,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredMaintenance {
    reason: String,
    since: String,
}

fn stored_maintenance(value: serde_json::Value) -> Result<Maintenance, ValidationError> {
    let stored: StoredMaintenance = from_value(value).map_err(|e| prefixed("maintenance", e))?;
    Ok(Maintenance {
        reason: stored.reason,
        since: timestamp("maintenance.since", &stored.since)?,
    })
}

fn prefixed(prefix: &str, error: ValidationError) -> ValidationError {
    let field = if error.field.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}.{}", error.field)
    };
    ValidationError::new(field, error.message)
}

fn timestamp(field: &str, text: &str) -> Result<std::time::SystemTime, ValidationError> {
    humantime::parse_rfc3339(text)
        .map_err(|_| ValidationError::new(field, format!("{text:?} is not an RFC 3339 time")))
}

/// gRPC's DNS resolver expects a JSON array of choices, each with a
/// `serviceConfig` object (gRPC A2 "Service Config via DNS").
fn grpc_config(value: serde_json::Value) -> Result<serde_json::Value, ValidationError> {
    let invalid = |message: &str| ValidationError::new("grpc_config", message);
    let choices = value
        .as_array()
        .ok_or_else(|| invalid("must be a JSON array of choices"))?;
    if choices.is_empty() {
        return Err(invalid("needs at least one choice"));
    }
    for choice in choices {
        if !choice.get("serviceConfig").is_some_and(|c| c.is_object()) {
            return Err(invalid("every choice needs a \"serviceConfig\" object"));
        }
    }
    if value.to_string().len() > MAX_GRPC_CONFIG {
        return Err(invalid(&format!("longer than {MAX_GRPC_CONFIG} bytes")));
    }
    Ok(value)
}

fn address(text: &str) -> Result<IpAddr, ValidationError> {
    let ip: IpAddr = text.trim().parse().map_err(|_| {
        ValidationError::new(
            "address",
            format!("{text:?} is not an IPv4 or IPv6 address"),
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(ValidationError::new(
            "address",
            format!("{ip} cannot be an instance address (unspecified or multicast)"),
        ));
    }
    Ok(ip)
}

fn in_range(field: &str, value: i64, min: u16) -> Result<u16, ValidationError> {
    match u16::try_from(value) {
        Ok(v) if v >= min => Ok(v),
        _ => Err(ValidationError::new(
            field,
            format!("{value} is out of range ({min} to 65535)"),
        )),
    }
}

fn port(field: &str, value: i64) -> Result<u16, ValidationError> {
    in_range(field, value, 1)
}

fn named_ports(
    specs: BTreeMap<String, PortSpec>,
) -> Result<BTreeMap<String, NamedPort>, ValidationError> {
    if specs.len() > MAX_NAMED_PORTS {
        return Err(ValidationError::new(
            "ports",
            format!("at most {MAX_NAMED_PORTS} named ports"),
        ));
    }
    let mut ports = BTreeMap::new();
    for (name, spec) in specs {
        let field = format!("ports.{name}");
        let label = dns_label(&field, &name)?;
        let named = match spec {
            PortSpec::Number(number) => NamedPort {
                port: port(&field, number)?,
                protocol: Protocol::Tcp,
            },
            PortSpec::Full(full) => NamedPort {
                port: port(&format!("{field}.port"), full.port)?,
                protocol: protocol(&format!("{field}.protocol"), full.protocol.as_deref())?,
            },
        };
        if ports.insert(label, named).is_some() {
            return Err(ValidationError::new(
                field,
                "named twice (port names are case-insensitive)",
            ));
        }
    }
    Ok(ports)
}

fn protocol(field: &str, text: Option<&str>) -> Result<Protocol, ValidationError> {
    match text.map(str::to_ascii_lowercase).as_deref() {
        None | Some("tcp") => Ok(Protocol::Tcp),
        Some("udp") => Ok(Protocol::Udp),
        Some(other) => Err(ValidationError::new(
            field,
            format!("{other:?} is not a protocol (tcp or udp)"),
        )),
    }
}

fn tags(raw: Vec<String>) -> Result<Vec<String>, ValidationError> {
    if raw.len() > MAX_TAGS {
        return Err(ValidationError::new(
            "tags",
            format!("at most {MAX_TAGS} tags"),
        ));
    }
    let mut tags = raw
        .iter()
        .enumerate()
        .map(|(i, tag)| dns_label(&format!("tags[{i}]"), tag))
        .collect::<Result<Vec<_>, _>>()?;
    tags.sort_unstable();
    tags.dedup();
    Ok(tags)
}

fn meta(raw: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, ValidationError> {
    if raw.len() > MAX_META_KEYS {
        return Err(ValidationError::new(
            "meta",
            format!("at most {MAX_META_KEYS} keys"),
        ));
    }
    for (key, value) in &raw {
        let field = format!("meta.{key}");
        let key_ok = !key.is_empty()
            && key.len() <= MAX_META_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !key_ok {
            return Err(ValidationError::new(
                field,
                format!("keys are 1 to {MAX_META_KEY_LEN} of letters, digits, '-' and '_'"),
            ));
        }
        if value.len() > MAX_META_VALUE_LEN {
            return Err(ValidationError::new(
                field,
                format!("value is longer than {MAX_META_VALUE_LEN} bytes"),
            ));
        }
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        serde_json::from_str(r#"{"address": "10.0.0.1", "port": 80}"#).unwrap()
    }

    fn rejected_field(spec: InstanceSpec) -> String {
        spec.into_instance("web", "web-1").unwrap_err().field
    }

    #[test]
    fn labels_are_lowercased_and_checked() {
        assert_eq!(dns_label("f", "Web-2").unwrap(), "web-2");
        assert!(dns_label("f", "").is_err());
        assert!(dns_label("f", &"a".repeat(64)).is_err());
        assert!(dns_label("f", &"a".repeat(63)).is_ok());
        assert!(dns_label("f", "-web").is_err());
        assert!(dns_label("f", "web-").is_err());
        assert!(dns_label("f", "we_b").is_err());
        assert!(dns_label("f", "wé").is_err());
    }

    #[test]
    fn a_minimal_spec_gets_defaults() {
        let instance = spec().into_instance("Web", "Web-1").unwrap();
        assert_eq!(instance.service, "web");
        assert_eq!(instance.id, "web-1");
        assert_eq!(instance.weight, 1);
        assert_eq!(instance.priority, 0);
        assert!(instance.is_serving(true));
        assert!(instance.check.is_none());
    }

    #[test]
    fn instance_id_tag_is_reserved() {
        assert_eq!(spec().into_instance("web", "TAG").unwrap_err().field, "id");
    }

    #[test]
    fn each_numeric_field_is_range_checked() {
        let mut s = spec();
        s.port = 0;
        assert_eq!(rejected_field(s), "port");
        let mut s = spec();
        s.port = 65536;
        assert_eq!(rejected_field(s), "port");
        let mut s = spec();
        s.weight = Some(0);
        assert_eq!(rejected_field(s), "weight");
        let mut s = spec();
        s.priority = Some(-1);
        assert_eq!(rejected_field(s), "priority");
    }

    #[test]
    fn named_ports_accept_both_shapes() {
        let s: InstanceSpec = serde_json::from_str(
            r#"{"address": "::1", "port": 80,
                "ports": {"HTTP": 8080, "dns": {"port": 53, "protocol": "udp"}}}"#,
        )
        .unwrap();
        let instance = s.into_instance("web", "a").unwrap();
        assert_eq!(instance.named_port("http", Protocol::Tcp), Some(8080));
        assert_eq!(instance.named_port("dns", Protocol::Udp), Some(53));
        assert_eq!(instance.named_port("dns", Protocol::Tcp), None);
    }

    #[test]
    fn limits_on_collections() {
        let mut s = spec();
        s.tags = (0..33).map(|i| format!("t{i}")).collect();
        assert_eq!(rejected_field(s), "tags");
        let mut s = spec();
        s.meta = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(rejected_field(s), "meta");
        let mut s = spec();
        s.meta.insert("k".into(), "v".repeat(513));
        assert_eq!(rejected_field(s), "meta.k");
        let mut s = spec();
        s.ports = (0..17)
            .map(|i| (format!("p{i}"), PortSpec::Number(1)))
            .collect();
        assert_eq!(rejected_field(s), "ports");
        let mut s = spec();
        s.tags = vec!["ok".into(), "not ok".into()];
        assert_eq!(rejected_field(s), "tags[1]");
    }

    fn check(json: serde_json::Value) -> Result<CheckSpec, ValidationError> {
        serde_json::from_value::<CheckInput>(json)
            .unwrap()
            .into_spec()
    }

    fn check_field(json: serde_json::Value) -> String {
        check(json).unwrap_err().field
    }

    #[test]
    fn checks_get_defaults() {
        use serde_json::json;
        let ttl = check(json!({"ttl": "15s"})).unwrap();
        assert_eq!(
            ttl.kind,
            CheckKind::Ttl {
                ttl: Duration::from_secs(15)
            }
        );
        assert_eq!(ttl.initial_status, HealthStatus::Critical);
        assert_eq!(
            (ttl.success_before_passing, ttl.failures_before_critical),
            (1, 1)
        );
        let http = check(json!({"http": "http://10.0.1.6:8080/health"})).unwrap();
        let CheckKind::Http {
            method,
            interval,
            timeout,
            ..
        } = http.kind
        else {
            panic!("not http")
        };
        assert_eq!(method, "GET");
        assert_eq!(interval, Duration::from_secs(10));
        assert_eq!(timeout, Duration::from_secs(2));
        let tcp = check(json!({"tcp": "[::1]:8080", "interval": "500ms"})).unwrap();
        assert_eq!(tcp.interval(), Some(Duration::from_millis(500)));
    }

    #[test]
    fn check_bounds_name_their_field() {
        use serde_json::json;
        assert_eq!(check_field(json!({})), "check");
        assert_eq!(check_field(json!({"ttl": "5s", "tcp": "a:1"})), "check");
        assert_eq!(check_field(json!({"ttl": "500ms"})), "check.ttl");
        assert_eq!(check_field(json!({"ttl": "soon"})), "check.ttl");
        assert_eq!(
            check_field(json!({"ttl": "5s", "interval": "1s"})),
            "check.interval"
        );
        assert_eq!(
            check_field(json!({"tcp": "a:1", "interval": "50ms"})),
            "check.interval"
        );
        assert_eq!(
            check_field(json!({"tcp": "a:1", "interval": "1s", "timeout": "1s"})),
            "check.timeout"
        );
        assert_eq!(
            check_field(json!({"tcp": "a:1", "method": "GET"})),
            "check.method"
        );
        assert_eq!(check_field(json!({"tcp": "nohost"})), "check.tcp");
        assert_eq!(check_field(json!({"tcp": "a:0"})), "check.tcp");
        assert_eq!(
            check_field(json!({"http": "https://a/health"})),
            "check.http"
        );
        assert_eq!(check_field(json!({"http": "ftp://a/"})), "check.http");
        assert_eq!(
            check_field(json!({"http": "http://a/", "method": "GE T"})),
            "check.method"
        );
        assert_eq!(
            check_field(json!({"http": "http://a/", "headers": {"bad name": "x"}})),
            "check.headers.bad name"
        );
        assert_eq!(
            check_field(json!({"ttl": "5s", "success_before_passing": 0})),
            "check.success_before_passing"
        );
        assert_eq!(
            check_field(json!({"ttl": "5s", "failures_before_critical": 101})),
            "check.failures_before_critical"
        );
        assert_eq!(
            check_field(json!({"ttl": "5s", "deregister_after": "10ms"})),
            "check.deregister_after"
        );
    }

    #[test]
    fn the_api_json_of_an_instance_reads_back_as_the_same_instance() {
        use serde_json::json;
        let spec: InstanceSpec = serde_json::from_value(json!({
            "address": "10.0.0.1", "port": 80, "ports": {"dns": {"port": 53, "protocol": "udp"}},
            "tags": ["b", "a"], "meta": {"k": "v"}, "weight": 3, "priority": 2,
            "check": {"http": "http://10.0.0.1:80/health", "interval": "5s", "headers": {"x": "y"},
                      "deregister_after": "1m", "success_before_passing": 2}
        }))
        .unwrap();
        let mut original = spec.into_instance("web", "w-1").unwrap();
        original.health = Health::now(HealthStatus::Warning, "slow".into());
        original.maintenance = Some(Box::new(Maintenance {
            reason: "deploy".into(),
            since: humantime::parse_rfc3339("2026-01-02T03:04:05.678Z").unwrap(),
        }));
        let json = serde_json::to_value(&original).unwrap();
        let back = instance_from_json(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), json);
        assert_eq!(back.check, original.check);
    }

    #[test]
    fn damaged_instance_json_names_the_field() {
        use serde_json::json;
        let good = json!({"service": "web", "id": "w-1", "address": "10.0.0.1", "port": 80});
        assert!(instance_from_json(good.clone()).is_ok());
        let mut bad = good.clone();
        bad["port"] = json!(0);
        assert_eq!(instance_from_json(bad).unwrap_err().field, "port");
        let mut bad = good.clone();
        bad["health"] = json!({"status": "great", "output": "", "since": "2026-01-01T00:00:00Z"});
        assert_eq!(instance_from_json(bad).unwrap_err().field, "health.status");
        let mut bad = good;
        bad["maintenance"] = json!({"reason": "x", "since": "yesterday"});
        assert_eq!(
            instance_from_json(bad).unwrap_err().field,
            "maintenance.since"
        );
        assert_eq!(instance_from_json(json!([1])).unwrap_err().field, "");
    }

    #[test]
    fn addresses_must_be_usable() {
        for bad in ["", "10.0.0", "0.0.0.0", "::", "224.0.0.1", "host.example"] {
            let mut s = spec();
            s.address = bad.into();
            assert_eq!(rejected_field(s), "address", "{bad}");
        }
    }
}
