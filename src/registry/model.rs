//! The registry's data model: what an instance is once it has passed
//! validation. Everything here is already normalised (lowercase names,
//! sorted tags) so readers never re-check it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

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

/// Health as DNS and the gateway see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Passing,
    Warning,
    Critical,
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
        Self {
            status: HealthStatus::Passing,
            output: String::new(),
            since: SystemTime::now(),
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
    pub ports: BTreeMap<String, NamedPort>,
    /// Sorted and deduplicated.
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub weight: u16,
    pub priority: u16,
    pub health: Health,
}

impl Instance {
    /// Whether DNS and the gateway may hand this instance out.
    pub fn is_serving(&self) -> bool {
        matches!(
            self.health.status,
            HealthStatus::Passing | HealthStatus::Warning
        )
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

fn rfc3339<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_rfc3339_millis(*time))
}
