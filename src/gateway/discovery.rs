//! Where the gateway's backends come from: the local registry snapshot
//! (through `Service::endpoints`, the function behind SRV answers), or,
//! for a standalone gateway with `gateway.resolver`, the SRV records of
//! any muster (or other DNS server) looked up over DNS.
//!
//! Over DNS, an answer is reused until its TTL runs out. After that the
//! expired answer still serves (for `stale_for` at most) while one
//! background lookup refreshes it, as RFC 8767 describes: requests never
//! wait on a slow or dead DNS server once a name has been resolved, and a
//! DNS outage does not take the front door down with it. Only the first
//! lookup of a name is waited for, and that for a bounded time.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tracing::warn;

use arc_swap::ArcSwapOption;

use super::balance::{Backend, Outliers};
use super::routes::Route;
use crate::registry::{PortSelector, Protocol, Registry};

/// The source of backends.
pub enum Discovery {
    Registry(Arc<Registry>),
    Dns(Arc<DnsDiscovery>),
}

/// A route's backends as last built from the registry, and the service
/// index they were built at.
pub struct Built {
    index: u64,
    backends: Arc<[Backend]>,
}

/// Where a route keeps its last backends between requests.
pub type BackendCache = ArcSwapOption<Built>;

impl Discovery {
    /// The instances `route` may use now.
    pub async fn backends(
        &self,
        route: &Route,
        cache: &BackendCache,
        outliers: &Outliers,
    ) -> Arc<[Backend]> {
        match self {
            Self::Registry(registry) => from_registry(registry, route, cache, outliers),
            Self::Dns(dns) => dns.backends(route, outliers).await,
        }
    }
}

/// The route's backends from the current snapshot, rebuilt only when the
/// service has changed since they were last built.
fn from_registry(
    registry: &Registry,
    route: &Route,
    cache: &BackendCache,
    outliers: &Outliers,
) -> Arc<[Backend]> {
    let snapshot = registry.load();
    let Some(service) = snapshot.service(&route.service) else {
        return Arc::from([]);
    };
    if let Some(built) = cache.load().as_ref()
        && built.index == service.index()
    {
        return built.backends.clone();
    }
    let selector = match &route.port {
        Some(port) => PortSelector::Named(port, Protocol::Tcp),
        None => PortSelector::Default,
    };
    let backends: Arc<[Backend]> = service
        .endpoints(selector, &[])
        .map(|endpoint| {
            let instance = endpoint.instance;
            let key = format!("{}/{}", service.name(), instance.id).into();
            let addr = SocketAddr::new(instance.address, endpoint.port);
            Backend::new(key, addr, instance.priority, instance.weight, outliers)
        })
        .collect();
    cache.store(Some(Arc::new(Built {
        index: service.index(),
        backends: backends.clone(),
    })));
    backends
}

/// An answer kept for reuse.
struct Cached {
    backends: Arc<[Backend]>,
    valid_until: Instant,
}

/// The longest a request waits for the first lookup of a name.
const FIRST_LOOKUP: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Cache {
    answers: HashMap<Name, Cached>,
    /// Names with a background refresh under way.
    refreshing: HashSet<Name>,
}

/// Backends from SRV records over DNS.
pub struct DnsDiscovery {
    resolver: TokioResolver,
    zone: Name,
    stale_for: Duration,
    cache: Mutex<Cache>,
}

impl DnsDiscovery {
    /// Asks only `server` (UDP, then TCP for truncated answers) about
    /// names under `zone`.
    pub fn new(server: SocketAddr, zone: Name, stale_for: Duration) -> Result<Self, String> {
        let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
        for connection in &mut name_server.connections {
            connection.port = server.port();
        }
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![name_server]),
            TokioRuntimeProvider::default(),
        );
        let options: &mut ResolverOpts = builder.options_mut();
        options.timeout = Duration::from_secs(1);
        options.attempts = 1;
        let resolver = builder.build().map_err(|e| e.to_string())?;
        Ok(Self {
            resolver,
            zone,
            stale_for,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// `_<port>._tcp.<service>.<zone>`, or `<service>.<zone>`.
    fn srv_name(&self, route: &Route) -> Option<Name> {
        let relative = match &route.port {
            Some(port) => format!("_{port}._tcp.{}", route.service),
            None => route.service.to_string(),
        };
        Name::from_ascii(relative)
            .ok()?
            .append_domain(&self.zone)
            .ok()
    }

    async fn backends(self: &Arc<Self>, route: &Route, outliers: &Outliers) -> Arc<[Backend]> {
        let Some(name) = self.srv_name(route) else {
            return Arc::from([]);
        };
        let now = Instant::now();
        let (answer, refresh) = {
            let mut cache = self.lock();
            let (answer, expired) = match cache.answers.get(&name) {
                Some(c) if now < c.valid_until => (Some(c.backends.clone()), false),
                Some(c) if now < c.valid_until + self.stale_for => (Some(c.backends.clone()), true),
                _ => (None, false),
            };
            let refresh = expired && cache.refreshing.insert(name.clone());
            (answer, refresh)
        };
        if refresh {
            let discovery = self.clone();
            let name = name.clone();
            let outliers = outliers.clone();
            tokio::spawn(async move { discovery.refresh(name, &outliers).await });
        }
        if let Some(answer) = answer {
            return answer;
        }
        match tokio::time::timeout(FIRST_LOOKUP, self.lookup(&name, outliers)).await {
            Ok(Ok(answer)) => {
                let backends = answer.backends.clone();
                self.lock().answers.insert(name, answer);
                backends
            }
            Ok(Err(error)) => {
                warn!(name = %name, error = %error, "srv lookup failed");
                Arc::from([])
            }
            Err(_) => {
                warn!(name = %name, "srv lookup timed out");
                Arc::from([])
            }
        }
    }

    /// Replaces an expired answer; a failure keeps the old one (until it
    /// is too stale to serve).
    async fn refresh(&self, name: Name, outliers: &Outliers) {
        let looked_up = self.lookup(&name, outliers).await;
        let mut cache = self.lock();
        cache.refreshing.remove(&name);
        match looked_up {
            Ok(answer) => {
                cache.answers.insert(name, answer);
            }
            Err(error) => {
                warn!(name = %name, error = %error, "srv refresh failed; serving the last answer")
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The SRV records of `name` with their targets' addresses (from the
    /// additional section, else looked up).
    async fn lookup(&self, name: &Name, outliers: &Outliers) -> Result<Cached, String> {
        let lookup = match self.resolver.lookup(name.clone(), RecordType::SRV).await {
            Ok(lookup) => lookup,
            // A name with no instances is an answer, not an outage.
            Err(error) if error.is_no_records_found() => {
                return Ok(Cached {
                    backends: Arc::from([]),
                    valid_until: Instant::now() + Duration::from_secs(1),
                });
            }
            Err(error) => return Err(error.to_string()),
        };
        let mut addresses: HashMap<Name, IpAddr> = HashMap::new();
        for record in lookup.additionals() {
            match &record.data {
                RData::A(a) => addresses.insert(record.name.clone(), IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => addresses.insert(record.name.clone(), IpAddr::V6(aaaa.0)),
                _ => None,
            };
        }
        let mut backends = Vec::new();
        for record in lookup.answers() {
            let RData::SRV(srv) = &record.data else {
                continue;
            };
            let address = match addresses.get(&srv.target) {
                Some(address) => Some(*address),
                None => self
                    .resolver
                    .lookup_ip(srv.target.clone())
                    .await
                    .ok()
                    .and_then(|ips| ips.iter().next()),
            };
            if let Some(address) = address {
                let key = srv.target.to_string().into();
                let addr = SocketAddr::new(address, srv.port);
                backends.push(Backend::new(key, addr, srv.priority, srv.weight, outliers));
            }
        }
        Ok(Cached {
            backends: backends.into(),
            valid_until: lookup.valid_until(),
        })
    }
}
