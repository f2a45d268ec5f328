//! Logging and metrics: a tracing subscriber writing to stderr, as text
//! or JSON lines (`RUST_LOG` overrides the configured level), and the
//! Prometheus metrics the other modules count into.

use std::io::IsTerminal;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::EncodeLabelSet;

pub use crate::dns::Outcome as DnsOutcome;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// hickory-server logs every TCP query at `info`; muster logs no query at
/// `info`, so hickory is held to warnings unless a filter names it.
const QUIET_HICKORY: &str = "hickory_server=warn";

/// The filter for `level` (from the config) unless `RUST_LOG` is set.
pub fn filter(level: &str) -> EnvFilter {
    if let Ok(filter) = EnvFilter::try_from_default_env() {
        return filter;
    }
    let level = if level.contains("hickory") {
        level.to_string()
    } else {
        format!("{level},{QUIET_HICKORY}")
    };
    EnvFilter::builder()
        .parse(&level)
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber; call once, before anything logs.
pub fn init(log: &LogConfig) {
    let filter = filter(&log.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // A second init (tests in one process) keeps the first subscriber.
    let _ = installed;
}

/// Prometheus metrics, encoded in the OpenMetrics text format at
/// `GET /metrics` on the API port.
pub struct Metrics {
    registry: prometheus_client::registry::Registry,
    /// Requests through the gateway by route and response status.
    pub gateway_requests: Family<RouteStatus, Counter>,
    /// Time from request to the end of the response body, by route.
    pub gateway_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    /// Upstream attempts that failed, by route and kind.
    pub gateway_upstream_errors: Family<UpstreamError, Counter>,
    /// DNS queries answered, by transport, question type and rcode.
    pub dns_queries: Family<DnsQuery, Counter>,
    /// UDP answers that did not fit and were sent with TC set.
    pub dns_truncated: Counter,
    /// Time from a query's arrival to its answer being handed to the socket.
    pub dns_duration: Histogram,
    /// UDP answers held back by response rate limiting, by action.
    pub dns_rrl: Family<RrlAction, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RrlAction {
    /// `drop` or `slip`.
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsQuery {
    pub transport: &'static str,
    pub qtype: &'static str,
    pub rcode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamError {
    pub route: String,
    /// `connect`, `reset`, `timeout` or `status_5xx`.
    pub kind: &'static str,
}

/// 0.5 ms to about 16 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = prometheus_client::registry::Registry::with_prefix("muster");
        let gateway_requests = Family::default();
        let gateway_duration: Family<RouteLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let gateway_upstream_errors = Family::default();
        let dns_queries = Family::default();
        let dns_truncated = Counter::default();
        // 1 µs to about 16 ms, doubling.
        let dns_duration = Histogram::new(exponential_buckets(0.000_001, 2.0, 15));
        let dns_rrl = Family::default();
        registry.register(
            "dns_rrl",
            "UDP answers held back by response rate limiting",
            dns_rrl.clone(),
        );
        registry.register(
            "gateway_requests",
            "Requests through the gateway, by route and status",
            gateway_requests.clone(),
        );
        registry.register(
            "gateway_request_duration_seconds",
            "Time from request to the end of the response, by route",
            gateway_duration.clone(),
        );
        registry.register(
            "gateway_upstream_errors",
            "Failed upstream attempts, by route and kind",
            gateway_upstream_errors.clone(),
        );
        registry.register(
            "dns_queries",
            "DNS queries answered, by transport, question type and rcode",
            dns_queries.clone(),
        );
        registry.register(
            "dns_truncated",
            "UDP answers sent truncated (TC) for the client to retry over TCP",
            dns_truncated.clone(),
        );
        registry.register(
            "dns_query_duration_seconds",
            "Time to answer a DNS query",
            dns_duration.clone(),
        );
        Self {
            registry,
            gateway_requests,
            gateway_duration,
            gateway_upstream_errors,
            dns_queries,
            dns_truncated,
            dns_duration,
            dns_rrl,
        }
    }
}

impl Metrics {
    /// Counts one answered DNS query.
    pub fn record_dns(
        &self,
        transport: &'static str,
        outcome: &DnsOutcome,
        elapsed: std::time::Duration,
    ) {
        self.dns_queries
            .get_or_create(&DnsQuery {
                transport,
                qtype: qtype_label(outcome.qtype),
                rcode: rcode_label(outcome.rcode),
            })
            .inc();
        if outcome.truncated {
            self.dns_truncated.inc();
        }
        let action = match outcome.rrl {
            Some(crate::dns::rrl::Decision::Drop) => Some("drop"),
            Some(crate::dns::rrl::Decision::Slip) => Some("slip"),
            _ => None,
        };
        if let Some(action) = action {
            self.dns_rrl.get_or_create(&RrlAction { action }).inc();
        }
        self.dns_duration.observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics content type `encode` produces.
    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// Everything, as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

fn qtype_label(qtype: Option<RecordType>) -> &'static str {
    match qtype {
        None => "none",
        Some(RecordType::A) => "A",
        Some(RecordType::AAAA) => "AAAA",
        Some(RecordType::SRV) => "SRV",
        Some(RecordType::PTR) => "PTR",
        Some(RecordType::TXT) => "TXT",
        Some(RecordType::SOA) => "SOA",
        Some(RecordType::NS) => "NS",
        Some(RecordType::CNAME) => "CNAME",
        Some(RecordType::ANY) => "ANY",
        Some(_) => "other",
    }
}

fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::ServFail => "SERVFAIL",
        _ => "other",
    }
}
