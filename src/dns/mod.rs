//! Authoritative DNS for the registry zone and the static zones.
//!
//! Owns the naming scheme (`names`), static zone files (`zones`), the
//! answer logic (`answer`), the wire rules (`wire`) and the listeners:
//! muster's own UDP loop per socket and TCP accept loop (so connections
//! can be capped and idle ones closed), and hickory-server's `Server` for
//! DNS over TLS. Answers are computed from the current registry snapshot;
//! this module never writes to the registry and never blocks on it.

mod answer;
mod handler;
pub mod names;
pub mod rrl;
mod tcp;
pub mod tls;
mod wire;
pub mod zones;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::xfer::Protocol;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::telemetry::Metrics;
use rrl::Rrl;
use tcp::TcpContext;

pub use answer::{Answer, Authority, RegistryZone};
pub use wire::{MAX_UDP_PAYLOAD, Outcome, Reply, answer_request, respond};

/// Largest datagram read; queries are far smaller, the rest is dropped.
const RECV_BUFFER: usize = 4096;

/// Bound DNS sockets: UDP and TCP on each configured address.
pub struct Listeners {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

impl Listeners {
    /// Binds UDP and TCP on every address. With port 0, TCP takes the port
    /// the kernel gave UDP, so each address is one port for both.
    pub async fn bind(addresses: &[SocketAddr]) -> io::Result<Self> {
        let mut listeners = Self {
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        for &address in addresses {
            let (udp, tcp) = bind_pair(address).await?;
            listeners.udp.push(udp);
            listeners.tcp.push(tcp);
        }
        Ok(listeners)
    }

    /// The bound addresses, one per configured address.
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.udp.iter().map(UdpSocket::local_addr).collect()
    }
}

async fn bind_pair(address: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    const ATTEMPTS: usize = 16;
    let mut last_error = None;
    for _ in 0..ATTEMPTS {
        let udp = UdpSocket::bind(address).await?;
        let bound = udp.local_addr()?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // Only an ephemeral port can be retried on another number.
            Err(e) if address.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                last_error = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no free port")))
}

/// Serves DNS on `listeners` until `shutdown` is cancelled.
/// How the TCP listeners treat connections.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    /// A connection that sends no complete query for this long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once (TCP and DoT each).
    pub max_connections: usize,
}

/// Serves DNS on `listeners` until `shutdown` is cancelled.
pub async fn serve(
    listeners: Listeners,
    authority: Arc<Authority>,
    metrics: Arc<Metrics>,
    rrl: Option<Arc<Rrl>>,
    tls: Option<(TcpListener, Arc<tls::Certificates>)>,
    limits: TcpLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut tasks = JoinSet::new();
    for socket in listeners.udp {
        let (authority, metrics, rrl) = (authority.clone(), metrics.clone(), rrl.clone());
        tasks.spawn(serve_udp(socket, authority, metrics, rrl, shutdown.clone()));
    }
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    for listener in listeners.tcp {
        let context = TcpContext {
            authority: authority.clone(),
            metrics: metrics.clone(),
            idle_timeout: limits.idle_timeout,
        };
        tasks.spawn(tcp::serve(
            listener,
            context,
            slots.clone(),
            shutdown.clone(),
        ));
    }
    let mut dot = Server::new(handler::Handler::new(authority, metrics));
    if let Some((listener, certificates)) = tls {
        dot.register_tls_listener(listener, limits.idle_timeout, certificates)?;
        shutdown.cancelled().await;
        if let Err(error) = dot.shutdown_gracefully().await {
            warn!(error = %error, "dns over tls listener ended with an error");
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(io::Error::other)??;
    }
    Ok(())
}

/// One socket's receive–answer–send loop. Answering is pure CPU work on a
/// snapshot, so it runs inline: no task per query.
async fn serve_udp(
    socket: UdpSocket,
    authority: Arc<Authority>,
    metrics: Arc<Metrics>,
    rrl: Option<Arc<Rrl>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut buffer = vec![0u8; RECV_BUFFER];
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buffer) => received,
            () = shutdown.cancelled() => return Ok(()),
        };
        let (length, peer) = match received {
            Ok(received) => received,
            Err(error) => {
                // ICMP errors from earlier sends surface here; keep serving.
                debug!(error = %error, "dns udp receive failed");
                continue;
            }
        };
        if peer.port() == 0 {
            continue;
        }
        let received = std::time::Instant::now();
        let query = &buffer[..length];
        let Some(reply) = respond(&authority, query, peer, Protocol::Udp, rrl.as_deref()) else {
            continue;
        };
        if !reply.bytes.is_empty()
            && let Err(error) = socket.send_to(&reply.bytes, peer).await
        {
            debug!(error = %error, peer = %peer, "dns udp send failed");
        }
        metrics.record_dns("udp", &reply.outcome, received.elapsed());
    }
}
