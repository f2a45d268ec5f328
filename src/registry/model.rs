//! The registry's data model: what an instance is once it has passed
//! validation. Everything here is already normalised (lowercase names,
//! sorted tags) so readers never re-check it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

/// Transport protocol of a named port; the `_<proto>` label of SRV names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The protocol named by an SRV label without its underscore (`tcp`).
    pub fn from_label(label: &str) -> Option<Self> {
        match label {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            _ => None,
        }
    }
}

/// A port an instance exposes under a name, e.g. `http` → 8080/tcp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NamedPort {
    pub port: u16,
    pub protocol: Protocol,
}

/// An instance's named ports, sorted by name. A boxed slice rather than a
/// map: most instances have one or two, and a `BTreeMap` allocates a whole
/// node (room for eleven entries) for the first one. Serialized as a JSON
/// object, as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamedPorts(Box<[(String, NamedPort)]>);

impl NamedPorts {
    pub fn get(&self, name: &str) -> Option<&NamedPort> {
        self.0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|at| &self.0[at].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &NamedPort)> {
        self.0.iter().map(|(name, port)| (name.as_str(), port))
    }

    pub fn values(&self) -> impl Iterator<Item = &NamedPort> {
        self.0.iter().map(|(_, port)| port)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<BTreeMap<String, NamedPort>> for NamedPorts {
    fn from(ports: BTreeMap<String, NamedPort>) -> Self {
        Self(ports.into_iter().collect())
    }
}

impl Serialize for NamedPorts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

/// Health as DNS and the gateway see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Passing,
    Warning,
    Critical,
}

/// Longest health output kept; longer output is cut at a character boundary.
pub const MAX_OUTPUT: usize = 4096;

/// `output` cut to at most [`MAX_OUTPUT`] bytes.
pub fn truncate_output(mut output: String) -> String {
    if output.len() > MAX_OUTPUT {
        let mut end = MAX_OUTPUT;
        while !output.is_char_boundary(end) {
            end -= 1;
        }
        output.truncate(end);
    }
    output
}

/// How an instance's health is established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CheckKind {
    /// The instance heartbeats at least every `ttl`.
    Ttl {
        #[serde(serialize_with = "human")]
        ttl: Duration,
    },
    /// muster requests `http` every `interval`.
    Http {
        http: String,
        method: String,
        headers: BTreeMap<String, String>,
        #[serde(serialize_with = "human")]
        interval: Duration,
        #[serde(serialize_with = "human")]
        timeout: Duration,
    },
    /// muster opens a TCP connection to `tcp` every `interval`.
    Tcp {
        tcp: String,
        #[serde(serialize_with = "human")]
        interval: Duration,
        #[serde(serialize_with = "human")]
        timeout: Duration,
    },
}

/// A validated health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckSpec {
    #[serde(flatten)]
    pub kind: CheckKind,
    pub initial_status: HealthStatus,
    /// Consecutive good results needed to leave critical.
    pub success_before_passing: u32,
    /// Consecutive bad results needed to turn critical.
    pub failures_before_critical: u32,
    /// Remove the instance once it has been critical this long.
    #[serde(serialize_with = "human_option")]
    pub deregister_after: Option<Duration>,
}

impl CheckSpec {
    /// How often an active check probes; `None` for TTL checks.
    pub fn interval(&self) -> Option<Duration> {
        match &self.kind {
            CheckKind::Ttl { .. } => None,
            CheckKind::Http { interval, .. } | CheckKind::Tcp { interval, .. } => Some(*interval),
        }
    }
}

/// An operator has drained the instance (for a deploy) without removing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Maintenance {
    pub reason: String,
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
}

/// The current health of an instance and since when it has held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    pub status: HealthStatus,
    pub output: String,
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
}

impl Health {
    /// The health of an instance without a check: passing while registered.
    pub fn passing_now() -> Self {
        Self::now(HealthStatus::Passing, String::new())
    }

    pub fn now(status: HealthStatus, output: String) -> Self {
        Self {
            status,
            output: truncate_output(output),
            since: SystemTime::now(),
        }
    }

    /// The health a new registration starts with.
    pub fn initial(check: Option<&CheckSpec>) -> Self {
        match check {
            None => Self::passing_now(),
            Some(check) => Self::now(check.initial_status, "no check result yet".into()),
        }
    }
}

/// One registered instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub address: IpAddr,
    /// Port used for `<service>.Z` SRV answers and by default in the gateway.
    pub port: u16,
    pub ports: NamedPorts,
    /// Sorted and deduplicated.
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub weight: u16,
    pub priority: u16,
    /// The service's gRPC service config (a JSON array of choices),
    /// served as `_grpc_config.<service>.Z` TXT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_config: Option<serde_json::Value>,
    /// Boxed: most of an instance's size when present, nothing when not.
    pub check: Option<Box<CheckSpec>>,
    pub health: Health,
    pub maintenance: Option<Box<Maintenance>>,
    /// Registry version at which the current check began; health results
    /// for an older registration are stale and ignored.
    #[serde(skip)]
    pub generation: u64,
}

impl Instance {
    /// Whether DNS and the gateway may hand this instance out: not in
    /// maintenance, and passing (or warning, unless `only_passing`).
    pub fn is_serving(&self, only_passing: bool) -> bool {
        self.maintenance.is_none()
            && match self.health.status {
                HealthStatus::Passing => true,
                HealthStatus::Warning => !only_passing,
                HealthStatus::Critical => false,
            }
    }

    /// Whether the instance carries every one of `tags`.
    pub fn has_tags(&self, tags: &[&str]) -> bool {
        tags.iter()
            .all(|tag| self.tags.binary_search_by(|t| t.as_str().cmp(tag)).is_ok())
    }

    /// The port of the named port `name` if it uses `protocol`.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .get(name)
            .filter(|p| p.protocol == protocol)
            .map(|p| p.port)
    }
}

fn human<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*duration))
}

fn human_option<S: Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => human(duration, serializer),
        None => serializer.serialize_none(),
    }
}

fn rfc3339<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_rfc3339_millis(*time))
}
