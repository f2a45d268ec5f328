//! muster: DNS-based service discovery with an HTTP front door.
//!
//! This file holds the module tree and the assembly: [`start`] binds every
//! listener from a [`Config`], spawns the servers, and returns a
//! [`Running`] handle that reloads zones and stops everything together. Binding happens before
//! anything is served, so when `start` returns every socket is ready.

pub mod api;
pub mod config;
pub mod dns;
mod field_path;
pub mod gateway;
mod http_server;
pub mod registry;
pub mod telemetry;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::error;

pub use config::Config;
#[doc(hidden)]
pub use http_server::feed_requests;

use crate::config::{ApiConfig, DnsConfig, GatewayConfig, StoreKind};
use crate::dns::tls::{Certificates, TlsError};
use crate::dns::zones::{ZoneError, load_dir};
use crate::dns::{Authority, RegistryZone};
use crate::gateway::{Gateway, GatewayError};
use crate::registry::health::HealthHandle;
use crate::registry::{EmbeddedStore, MemoryStore, Registry, Store, StoreError};
use crate::telemetry::Metrics;

/// Why muster could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("zones: {0}")]
    Zones(#[from] ZoneError),
    #[error("registry store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("dns.tls: {0}")]
    Tls(#[from] TlsError),
    #[error("dns.zone {zone:?} is not a valid DNS name")]
    Zone { zone: String },
    #[error("cannot listen for {what} on {address}: {source}")]
    Bind {
        what: &'static str,
        address: String,
        source: io::Error,
    },
}

/// A started muster: its bound addresses and the handle to stop it.
pub struct Running {
    /// One address per `dns.listen` entry, each serving UDP and TCP.
    pub dns: Vec<SocketAddr>,
    /// DNS over TLS, when `dns.tls_listen` is set.
    pub dns_tls: Option<SocketAddr>,
    pub api: SocketAddr,
    /// The front door, unless `gateway.enabled = false`.
    pub gateway: Option<SocketAddr>,
    pub registry: Arc<Registry>,
    reloader: Reloader,
    shutdown: CancellationToken,
    tasks: JoinSet<io::Result<()>>,
}

/// Binds every listener in `config` and starts serving.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    // Destructured without `..`: a new key nobody wires up fails to compile.
    let Config {
        data_dir,
        store,
        zones_dir,
        dns,
        api,
        gateway,
        log: _, // applied by telemetry::init before start
    } = config;
    // The registry is loaded before any socket is bound: nothing answers
    // from a registry that is still loading.
    let registry = Arc::new(Registry::open(
        open_store(*store, data_dir)?,
        dns.only_passing,
    )?);
    let authority = Arc::new(authority(config, zones_dir, &registry)?);
    let metrics = Arc::new(Metrics::default());
    let front_door = Arc::new(Gateway::new(config, registry.clone(), metrics.clone())?);
    let certificates = match (&dns.tls_cert, &dns.tls_key) {
        (Some(cert), Some(key)) if dns.tls_listen.is_some() => {
            Some(Arc::new(Certificates::load(cert, key)?))
        }
        _ => None,
    };
    let reloader = Reloader {
        authority: authority.clone(),
        gateway: front_door.clone(),
        certificates: certificates.clone(),
        zones_dir: zones_dir.clone(),
    };
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let (health, checker) = registry::health::spawn(registry.clone(), shutdown.clone());
    tasks.spawn(async move { checker.await.map_err(io::Error::other) });
    let (dns_addrs, dns_tls) = start_dns(
        dns,
        authority,
        metrics.clone(),
        certificates,
        &shutdown,
        &mut tasks,
    )
    .await?;
    let api_addr = start_api(api, &registry, health, metrics, &shutdown, &mut tasks).await?;
    let gateway_addr = match gateway.enabled {
        true => Some(start_gateway(gateway, front_door, &shutdown, &mut tasks).await?),
        false => None,
    };
    Ok(Running {
        dns: dns_addrs,
        dns_tls,
        api: api_addr,
        gateway: gateway_addr,
        registry,
        reloader,
        shutdown,
        tasks,
    })
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("zones: {0}")]
    Zones(#[from] ZoneError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("dns.tls: {0}")]
    Tls(#[from] TlsError),
}

/// Reloads what can change without a restart (SIGHUP): the static zones,
/// the gateway's routes and policies, and the DoT certificate (from the
/// same files). Listen addresses, the data dir and DNS settings need a
/// restart.
#[derive(Clone)]
pub struct Reloader {
    authority: Arc<Authority>,
    gateway: Arc<Gateway>,
    certificates: Option<Arc<Certificates>>,
    zones_dir: PathBuf,
}

impl Reloader {
    /// Re-reads every zone file (from `config`'s `zones_dir` if given) and,
    /// with a `config`, rebuilds the gateway routes. Everything is checked
    /// before anything is swapped: on any error what is served stays as
    /// it was and the error is returned.
    pub fn reload(&self, config: Option<&Config>) -> Result<(), ReloadError> {
        let zones_dir = config.map_or(&self.zones_dir, |c| &c.zones_dir);
        let zones = load_dir(zones_dir)?;
        let policy = config
            .map(|c| self.gateway.prepare(&c.gateway))
            .transpose()?;
        let key = self
            .certificates
            .as_ref()
            .map(|c| c.read_again())
            .transpose()?;
        self.authority.replace_zones(zones);
        if let Some(policy) = policy {
            self.gateway.install(policy);
        }
        if let (Some(certificates), Some(key)) = (&self.certificates, key) {
            certificates.install(key);
        }
        Ok(())
    }
}

/// The store `kind` names, opened (and locked) in `data_dir`.
pub fn open_store(kind: StoreKind, data_dir: &Path) -> Result<Box<dyn Store>, StoreError> {
    Ok(match kind {
        StoreKind::Embedded => Box::new(EmbeddedStore::open(data_dir)?),
        StoreKind::Memory => Box::new(MemoryStore),
    })
}

fn authority(
    config: &Config,
    zones_dir: &std::path::Path,
    registry: &Arc<Registry>,
) -> Result<Authority, StartError> {
    let zones = load_dir(zones_dir)?;
    let zone = RegistryZone::from_config(config).ok_or_else(|| StartError::Zone {
        zone: config.zone_fqdn(),
    })?;
    Ok(Authority::new(registry.clone(), zones, zone))
}

async fn start_dns(
    dns: &DnsConfig,
    authority: Arc<Authority>,
    metrics: Arc<Metrics>,
    certificates: Option<Arc<Certificates>>,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<io::Result<()>>,
) -> Result<(Vec<SocketAddr>, Option<SocketAddr>), StartError> {
    let bind_error = |source| StartError::Bind {
        what: "dns",
        address: format!("{:?}", dns.listen),
        source,
    };
    let workers = match dns.udp_workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let listeners = dns::Listeners::bind(&dns.listen, workers)
        .await
        .map_err(bind_error)?;
    let addrs = listeners.local_addrs().map_err(bind_error)?;
    let rrl = dns::rrl::Rrl::new(&dns.rrl).map(Arc::new);
    let tls = match (dns.tls_listen, certificates) {
        (Some(address), Some(certificates)) => {
            let tls_error = |source| StartError::Bind {
                what: "dns over tls",
                address: address.to_string(),
                source,
            };
            let listener = TcpListener::bind(address).await.map_err(tls_error)?;
            Some((listener, certificates))
        }
        _ => None,
    };
    let tls_addr = tls.as_ref().and_then(|(l, _)| l.local_addr().ok());
    tasks.spawn(dns::serve(
        listeners,
        authority,
        metrics,
        rrl,
        tls,
        dns::TcpLimits {
            idle_timeout: dns.tcp_idle_timeout,
            max_connections: dns.max_tcp_connections,
        },
        shutdown.clone(),
    ));
    Ok((addrs, tls_addr))
}

async fn start_gateway(
    config: &GatewayConfig,
    gateway: Arc<Gateway>,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<io::Result<()>>,
) -> Result<SocketAddr, StartError> {
    let bind_error = |source| StartError::Bind {
        what: "gateway",
        address: config.listen.to_string(),
        source,
    };
    let listener = TcpListener::bind(config.listen).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let serving = gateway::serve(listener, gateway, config.max_connections, shutdown.clone());
    tasks.spawn(serving);
    Ok(addr)
}

async fn start_api(
    api: &ApiConfig,
    registry: &Arc<Registry>,
    health: HealthHandle,
    metrics: Arc<Metrics>,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<io::Result<()>>,
) -> Result<SocketAddr, StartError> {
    let bind_error = |source| StartError::Bind {
        what: "api",
        address: api.listen.to_string(),
        source,
    };
    let listener = TcpListener::bind(api.listen).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let router = api::router(api::AppState {
        registry: registry.clone(),
        health,
        metrics,
        started: Instant::now(),
    });
    tasks.spawn(api::serve(
        listener,
        router,
        api.max_connections,
        shutdown.clone(),
    ));
    Ok(addr)
}

impl Running {
    /// A handle that reloads the zones while serving.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// A token that stops every listener when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every server has ended. If one fails, the others are
    /// stopped too and its error is returned.
    pub async fn wait(mut self) -> io::Result<()> {
        let mut result = Ok(());
        while let Some(ended) = self.tasks.join_next().await {
            let ended = ended.map_err(io::Error::other).and_then(|r| r);
            if let Err(e) = ended {
                error!(error = %e, "a listener failed; stopping");
                self.shutdown.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Stops every listener and waits up to `drain` for requests in flight.
    pub async fn stop(self, drain: Duration) -> io::Result<()> {
        self.shutdown.cancel();
        match tokio::time::timeout(drain, self.wait()).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "listeners did not drain in time",
            )),
        }
    }
}
