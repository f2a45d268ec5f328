//! The front door: an HTTP gateway that routes external requests to
//! healthy instances chosen from the registry snapshot, through the same
//! `Service::endpoints` function that builds SRV answers, so the gateway
//! and DNS never disagree.
//!
//! Owns routing (`routes`), balancing and outlier ejection (`balance`),
//! header hygiene (`headers`), forwarding (`proxy`), upstream HTTP/1
//! connections (`pool`) and the limit on an upstream's silence mid-body
//! (`quiet`). Routes live in an
//! immutable [`Policy`] swapped whole on reload; requests in flight finish
//! with the policy they started with. Never writes to the registry.

mod balance;
mod discovery;
mod exchange;
mod headers;
mod pool;
mod proxy;
mod quiet;
mod routes;
mod watched;

#[doc(hidden)]
pub use exchange::feed_response;

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body as HttpBody;
use hyper::http::uri::Authority;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use routes::validate_route;

use crate::config::{Config, GatewayConfig, UpstreamProtocol};
use crate::http_server::{self, ConnectionSlot, Handler};
use crate::registry::Registry;
use crate::telemetry::{Metrics, RouteMeters, UpstreamError};
use balance::{Backend, Outliers, Picker};
use discovery::{BackendCache, Discovery, DnsDiscovery};
use headers::{Ids, Peer};
use pool::{Http1Pool, SendError};
use proxy::{Body, BoxError};
use routes::{Route, RouteTable};

/// Why routes could not be built.
#[derive(Debug, thiserror::Error)]
#[error("gateway route {key}: {message}")]
pub struct GatewayError {
    key: String,
    message: String,
}

/// A route's connection pool, balancing state and last backends.
struct Upstream {
    picker: Picker,
    meters: Arc<RouteMeters>,
    client: UpstreamClient,
    backends: BackendCache,
}

/// How a route reaches its instances.
enum UpstreamClient {
    Http1(Http1Pool),
    H2(Box<Client<HttpConnector, Body>>),
}

impl UpstreamClient {
    fn new(route: &Route, idle_timeout: Duration) -> Self {
        match route.upstream {
            UpstreamProtocol::Http1 => {
                Self::Http1(Http1Pool::new(route.connect_timeout, idle_timeout))
            }
            UpstreamProtocol::H2 => Self::H2(Box::new(h2_client(route, idle_timeout))),
        }
    }

    /// Sends `request`, addressed in the form its protocol wants (see
    /// `proxy::build_request`), to the instance at `authority`.
    async fn send(
        &self,
        authority: &Authority,
        request: Request<Body>,
    ) -> Result<Response<Body>, SendError> {
        match self {
            Self::Http1(pool) => pool.send(authority, request).await,
            Self::H2(client) => {
                let response = client.request(request).await?;
                Ok(response.map(|body| body.map_err(BoxError::from).boxed()))
            }
        }
    }
}

/// Everything a reload replaces: routes, their upstream state, and who is
/// trusted to forward.
pub struct Policy {
    table: RouteTable,
    /// In the table's order.
    upstreams: Vec<Upstream>,
    trusted: Vec<IpNet>,
}

impl Policy {
    fn new(config: &GatewayConfig) -> Result<Self, GatewayError> {
        let table = RouteTable::new(&config.routes).map_err(|(key, message)| GatewayError {
            key: key.into(),
            message,
        })?;
        let upstreams = table
            .routes()
            .iter()
            .map(|route| Upstream {
                picker: Picker::new(route.balance),
                meters: Arc::default(),
                client: UpstreamClient::new(route, config.upstream_idle_timeout),
                backends: BackendCache::empty(),
            })
            .collect();
        Ok(Self {
            table,
            upstreams,
            trusted: config.trusted_proxies.clone(),
        })
    }

    fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&peer))
    }
}

fn h2_client(route: &Route, idle_timeout: Duration) -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(route.connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle_timeout)
        .pool_timer(TokioTimer::new())
        .http2_only(true)
        .build(connector)
}

/// The running front door.
pub struct Gateway {
    policy: ArcSwap<Policy>,
    discovery: Discovery,
    outliers: Outliers,
    ids: Ids,
    metrics: Arc<Metrics>,
    /// `-`, the route and service of a request no route matched (shared,
    /// not allocated per request).
    unnamed: Arc<str>,
}

impl Gateway {
    /// With `gateway.resolver` set, backends come from SRV lookups under
    /// `dns.zone`; otherwise from `registry`.
    pub fn new(
        config: &Config,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, GatewayError> {
        let gateway = &config.gateway;
        let discovery = match gateway.resolver {
            None => Discovery::Registry(registry),
            Some(server) => {
                let error = |message: String| GatewayError {
                    key: "resolver".into(),
                    message,
                };
                let zone = hickory_proto::rr::Name::from_ascii(config.zone_fqdn())
                    .map_err(|e| error(e.to_string()))?;
                let dns = DnsDiscovery::new(server, zone, gateway.stale_for).map_err(error)?;
                Discovery::Dns(Arc::new(dns))
            }
        };
        Ok(Self {
            policy: ArcSwap::from_pointee(Policy::new(gateway)?),
            discovery,
            outliers: Outliers::new(
                gateway.eject_after_errors,
                gateway.eject_for,
                gateway.eject_max,
            ),
            ids: Ids::default(),
            unnamed: "-".into(),
            metrics,
        })
    }

    /// Builds the routes of `config` without serving them yet.
    pub fn prepare(&self, config: &GatewayConfig) -> Result<Policy, GatewayError> {
        Policy::new(config)
    }

    /// Serves `policy` from the next request on; requests in flight finish
    /// with the one they started with.
    pub fn install(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    /// The instances a route may use now.
    async fn backends(&self, route: &Route, upstream: &Upstream) -> Arc<[Backend]> {
        self.discovery
            .backends(route, &upstream.backends, &self.outliers)
            .await
    }

    /// One failed upstream attempt of the route named `route`.
    fn count_error(&self, route: &Arc<str>, kind: &'static str) {
        self.metrics
            .gateway_upstream_errors
            .get_or_create(&UpstreamError {
                route: route.clone(),
                kind,
            })
            .inc();
    }
}

/// A client connection, as its requests see it.
pub(crate) struct ClientConnection {
    pub peer: Peer,
    /// Its place under `gateway.max_connections`, which an upgraded
    /// tunnel takes over from the connection.
    pub slot: ConnectionSlot,
}

/// Serves the gateway on `listener`, `max_connections` at a time, until
/// `shutdown`, then lets open connections finish their requests (up to a
/// bound).
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    max_connections: usize,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let limits = http_server::Limits::serving(max_connections);
    http_server::serve(listener, limits, shutdown, "gateway", |peer, slot| {
        FrontDoor {
            gateway: gateway.clone(),
            client: Arc::new(ClientConnection {
                peer: Peer::new(peer.ip()),
                slot: slot.clone(),
            }),
        }
    })
    .await
}

/// One client connection's handler: every request through
/// `proxy::handle`, whichever HTTP server read it (hyper, with its body, or
/// muster's own for plain requests).
#[derive(Clone)]
struct FrontDoor {
    gateway: Arc<Gateway>,
    client: Arc<ClientConnection>,
}

impl Handler for FrontDoor {
    type Body = Body;

    fn handle<B>(&self, request: Request<B>) -> impl Future<Output = Response<Body>> + Send
    where
        B: HttpBody<Data = Bytes, Error: Into<BoxError>> + Send + Sync + 'static,
    {
        proxy::handle(self.gateway.clone(), self.client.clone(), request)
    }
}
