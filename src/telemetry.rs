//! Logging and metrics: a tracing subscriber writing to stderr, as text
//! or JSON lines (`RUST_LOG` overrides the configured level), and the
//! Prometheus metrics the other modules count into.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

pub use crate::dns::Outcome as DnsOutcome;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

mod access;
pub use access::{ACCESS_TARGET, Access};

/// hickory-server logs every TCP query at `info`; muster logs no query at
/// `info`, so hickory is held to warnings unless a filter names it.
const QUIET_HICKORY: &str = "hickory_server=warn";

/// The filter for `level` (from the config) unless `RUST_LOG` is set and
/// parses, and the directives it was built from.
fn filter(level: &str) -> (EnvFilter, String) {
    if let Ok(directives) = std::env::var(EnvFilter::DEFAULT_ENV)
        && let Ok(filter) = EnvFilter::builder().parse(&directives)
    {
        return (filter, directives);
    }
    let level = if level.contains("hickory") {
        level.to_string()
    } else {
        format!("{level},{QUIET_HICKORY}")
    };
    match EnvFilter::builder().parse(&level) {
        Ok(filter) => (filter, level),
        Err(_) => (EnvFilter::new("info"), "info".to_string()),
    }
}

/// Installs the global subscriber; call once, before anything logs.
pub fn init(log: &LogConfig) {
    let (filter, directives) = filter(&log.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let colours = std::io::stderr().is_terminal();
    let installed = match log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(colours)
            .event_format(access::TextFormat::default())
            .try_init(),
    };
    // A second init (tests in one process) keeps the first subscriber.
    if installed.is_ok() {
        // Span and field directives (`target[span{field=value}]=level`)
        // can only be matched against a tracing event.
        let text = matches!(log.format, LogFormat::Text);
        access::write_directly(text && !colours && !directives.contains('['));
    }
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
    pub dns_duration: DnsDurations,
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
    /// Shared with the route table: no copy per request.
    pub route: Arc<str>,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Shared with the route table: no copy per request.
    pub route: Arc<str>,
}

/// One gateway route's metric handles, taken from the families on first
/// use instead of being looked up (hashed, locked) on every request.
#[derive(Default)]
pub struct RouteMeters {
    duration: OnceLock<Histogram>,
    /// Requests by status code; a route sees a handful of codes.
    by_status: RwLock<Vec<(u16, Counter)>>,
}

impl RouteMeters {
    /// Counts one finished request on `route`.
    pub fn record(&self, metrics: &Metrics, route: &Arc<str>, status: u16, seconds: f64) {
        self.duration
            .get_or_init(|| {
                let label = RouteLabel {
                    route: route.clone(),
                };
                metrics.gateway_duration.get_or_create(&label).clone()
            })
            .observe(seconds);
        self.requests(metrics, route, status).inc();
    }

    fn requests(&self, metrics: &Metrics, route: &Arc<str>, status: u16) -> Counter {
        let known = self
            .by_status
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, counter)) = known.iter().find(|(code, _)| *code == status) {
            return counter.clone();
        }
        drop(known);
        let label = RouteStatus {
            route: route.clone(),
            code: status,
        };
        let counter = metrics.gateway_requests.get_or_create(&label).clone();
        let mut known = self
            .by_status
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if !known.iter().any(|(code, _)| *code == status) {
            known.push((status, counter.clone()));
        }
        counter
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamError {
    /// Shared with the route table: no copy per request.
    pub route: Arc<str>,
    /// `connect`, `reset`, `timeout`, `status_5xx`, or `body` (the
    /// response body failed midway: reset, or quiet past `read_timeout`).
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
        let dns_duration = DnsDurations::default();
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
    /// Counts one answered DNS query, through a tally of one (the loops
    /// that answer many keep a [`DnsTally`] of their own).
    pub fn record_dns(
        self: &Arc<Self>,
        transport: &'static str,
        outcome: &DnsOutcome,
        elapsed: std::time::Duration,
    ) {
        let mut one = DnsTally::new(self.clone(), transport);
        one.record(outcome, elapsed);
        one.flush();
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

/// Upper bounds of the DNS duration buckets: 1 µs to about 16 ms, doubling.
const DNS_DURATION_BUCKETS: usize = 15;

/// The DNS answer-time histogram. Observations arrive in batches from each
/// UDP worker's [`DnsTally`], so the hot path takes no lock; the shared
/// counts are atomics a batch is added to. Clones share the counts.
#[derive(Debug, Default, Clone)]
pub struct DnsDurations(Arc<SharedDurations>);

#[derive(Debug, Default)]
struct SharedDurations {
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; DNS_DURATION_BUCKETS + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// Durations counted locally, before they are added to [`DnsDurations`].
#[derive(Debug, Default, Clone)]
pub struct LocalDurations {
    buckets: [u64; DNS_DURATION_BUCKETS + 1],
    count: u64,
    sum_nanos: u64,
}

impl LocalDurations {
    /// One observation.
    pub fn of(elapsed: Duration) -> Self {
        let mut local = Self::default();
        local.observe(elapsed);
        local
    }

    pub fn observe(&mut self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // Bucket i holds (2^(i-1) µs, 2^i µs]; bucket 0 everything up to 1 µs.
        let micros_up = nanos.div_ceil(1_000).max(1);
        let bucket = (u64::BITS - (micros_up - 1).leading_zeros()) as usize;
        self.buckets[bucket.min(DNS_DURATION_BUCKETS)] += 1;
        self.count += 1;
        self.sum_nanos = self.sum_nanos.saturating_add(nanos);
    }
}

impl DnsDurations {
    /// Adds a batch of observations.
    pub fn add(&self, local: &LocalDurations) {
        let shared = &self.0;
        for (bucket, &count) in shared.buckets.iter().zip(&local.buckets) {
            if count > 0 {
                bucket.fetch_add(count, Ordering::Relaxed);
            }
        }
        shared.count.fetch_add(local.count, Ordering::Relaxed);
        shared
            .sum_nanos
            .fetch_add(local.sum_nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for DnsDurations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DnsDurations {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.0;
        let buckets: Vec<(f64, u64)> = shared
            .buckets
            .iter()
            .enumerate()
            .map(|(i, count)| {
                let bound = if i < DNS_DURATION_BUCKETS {
                    1e-6 * f64::from(1u32 << i)
                } else {
                    f64::MAX
                };
                (bound, count.load(Ordering::Relaxed))
            })
            .collect();
        let sum = shared.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let count = shared.count.load(Ordering::Relaxed);
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One UDP worker's DNS counts, added to the shared [`Metrics`] in
/// batches (every [`DnsTally::BATCH`] queries, and whenever the worker
/// goes idle), so answering a query touches no shared cache line.
pub struct DnsTally {
    metrics: Arc<Metrics>,
    transport: &'static str,
    /// Counts per (question type, rcode) label pair since the last flush.
    queries: Vec<(&'static str, &'static str, Counter, u64)>,
    truncated: u64,
    drops: u64,
    slips: u64,
    durations: LocalDurations,
}

impl DnsTally {
    /// Queries counted locally before they are added to the shared metrics.
    pub const BATCH: u64 = 1024;

    pub fn new(metrics: Arc<Metrics>, transport: &'static str) -> Self {
        Self {
            metrics,
            transport,
            queries: Vec::new(),
            truncated: 0,
            drops: 0,
            slips: 0,
            durations: LocalDurations::default(),
        }
    }

    /// Counts one answered query.
    pub fn record(&mut self, outcome: &DnsOutcome, elapsed: Duration) {
        let (qtype, rcode) = (qtype_label(outcome.qtype), rcode_label(outcome.rcode));
        let found = self
            .queries
            .iter_mut()
            .find(|(q, r, _, _)| std::ptr::eq(*q, qtype) && std::ptr::eq(*r, rcode));
        match found {
            Some((_, _, _, count)) => *count += 1,
            None => {
                let counter = self
                    .metrics
                    .dns_queries
                    .get_or_create(&DnsQuery {
                        transport: self.transport,
                        qtype,
                        rcode,
                    })
                    .clone();
                self.queries.push((qtype, rcode, counter, 1));
            }
        }
        self.truncated += u64::from(outcome.truncated);
        match outcome.rrl {
            Some(crate::dns::rrl::Decision::Drop) => self.drops += 1,
            Some(crate::dns::rrl::Decision::Slip) => self.slips += 1,
            _ => {}
        }
        self.durations.observe(elapsed);
        if self.durations.count >= Self::BATCH {
            self.flush();
        }
    }

    /// Adds everything counted since the last flush to the shared metrics.
    pub fn flush(&mut self) {
        if self.durations.count == 0 {
            return;
        }
        for (_, _, counter, count) in &mut self.queries {
            if *count > 0 {
                counter.inc_by(*count);
                *count = 0;
            }
        }
        self.metrics
            .dns_truncated
            .inc_by(std::mem::take(&mut self.truncated));
        for (action, count) in [("drop", &mut self.drops), ("slip", &mut self.slips)] {
            if *count > 0 {
                let family = &self.metrics.dns_rrl;
                family.get_or_create(&RrlAction { action }).inc_by(*count);
                *count = 0;
            }
        }
        self.metrics.dns_duration.add(&self.durations);
        self.durations = LocalDurations::default();
    }
}

impl Drop for DnsTally {
    fn drop(&mut self) {
        self.flush();
    }
}
