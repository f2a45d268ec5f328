//! Authoritative DNS for the registry zone and the static zones.
//!
//! Owns the naming scheme (`names`), static zone files (`zones`), the
//! answer logic (`answer`), the wire rules (`wire`), the per-worker cache
//! of encoded answers that most UDP queries are served from (`cache`) with
//! its own encoder for the records it rotates (`movable`), and
//! the listeners:
//! muster's own UDP loop per socket and TCP accept loop (so connections
//! can be capped and idle ones closed), and hickory-server's `Server` for
//! DNS over TLS. Answers are computed from the current registry snapshot;
//! this module never writes to the registry and never blocks on it.

mod answer;
pub mod cache;
mod handler;
mod movable;
pub mod names;
pub mod rrl;
mod tcp;
pub mod tls;
mod udp;
mod wire;
pub mod zones;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::telemetry::Metrics;
use rrl::Rrl;
use tcp::TcpContext;

pub use answer::{Answer, Authority, RegistryZone};
pub use wire::{MAX_UDP_PAYLOAD, Outcome, Reply, answer_request, respond};

/// Bound DNS sockets: on each configured address, one UDP socket per
/// worker (sharing the port through `SO_REUSEPORT`, so the kernel spreads
/// queries over them and the cores) and one TCP listener.
pub struct Listeners {
    /// Per address, its workers' sockets; the first is the address's own.
    udp: Vec<Vec<UdpSocket>>,
    tcp: Vec<TcpListener>,
}

impl Listeners {
    /// Binds `udp_workers` UDP sockets (at least one) and a TCP listener on
    /// every address. With port 0, all take the port the kernel gave the
    /// first UDP socket, so each address is one port for both.
    pub async fn bind(addresses: &[SocketAddr], udp_workers: usize) -> io::Result<Self> {
        let mut listeners = Self {
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        for &address in addresses {
            let (udp, tcp) = bind_group(address, udp_workers.max(1)).await?;
            listeners.udp.push(udp);
            listeners.tcp.push(tcp);
        }
        Ok(listeners)
    }

    /// The bound addresses, one per configured address.
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.udp.iter().map(|group| group[0].local_addr()).collect()
    }
}

/// One UDP socket per worker on `address`, and TCP on the same port.
async fn bind_group(
    address: SocketAddr,
    workers: usize,
) -> io::Result<(Vec<UdpSocket>, TcpListener)> {
    const ATTEMPTS: usize = 16;
    let mut last_error = None;
    for _ in 0..ATTEMPTS {
        let first = reuse_port_udp(address)?;
        let bound = first.local_addr()?;
        let tcp = match TcpListener::bind(bound).await {
            Ok(tcp) => tcp,
            // Only an ephemeral port can be retried on another number.
            Err(e) if address.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                last_error = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut group = vec![first];
        for _ in 1..workers {
            group.push(reuse_port_udp(bound)?);
        }
        return Ok((group, tcp));
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no free port")))
}

/// The receive buffer each UDP socket asks for, in bytes.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// A non-blocking UDP socket on `address` that others of this process
/// may share (`SO_REUSEPORT`; Linux only lets the same user join).
fn reuse_port_udp(address: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol as IpProtocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::DGRAM,
        Some(IpProtocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    // Room for a burst of queries while the worker is busy; the kernel
    // caps it at net.core.rmem_max (see the README's DNS section).
    let _ = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER);
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    UdpSocket::from_std(socket.into())
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
    let workers = listeners.udp.iter().map(Vec::len).sum();
    for socket in listeners.udp.into_iter().flatten() {
        let (authority, metrics, rrl) = (authority.clone(), metrics.clone(), rrl.clone());
        tasks.spawn(udp::serve(
            socket,
            workers,
            authority,
            metrics,
            rrl,
            shutdown.clone(),
        ));
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
