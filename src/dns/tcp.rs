//! DNS over TCP (RFC 7766): two-byte length-prefixed queries on a
//! connection, answered in order by the same code as UDP, with a cap on
//! connections served at once and idle connections closed. A connection
//! over the cap waits in the kernel's accept queue.

use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::xfer::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::answer::Authority;
use super::wire::respond;
use crate::telemetry::Metrics;

/// What every connection needs.
#[derive(Clone)]
pub struct TcpContext {
    pub authority: Arc<Authority>,
    pub metrics: Arc<Metrics>,
    pub idle_timeout: Duration,
}

/// Accepts until `shutdown`, at most `slots` connections at a time; then
/// lets open connections finish the query they are on.
pub async fn serve(
    listener: TcpListener,
    context: TcpContext,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(std::io::Error::other)?,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(error = %error, "dns tcp accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let context = context.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            if let Err(error) = connection(stream, peer, &context, &shutdown).await {
                debug!(peer = %peer, error = %error, "dns tcp connection ended");
            }
            drop(slot);
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Answers queries on one connection until it closes, idles out, or
/// muster shuts down.
async fn connection(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    context: &TcpContext,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut query = Vec::with_capacity(512);
    loop {
        let mut length = [0u8; 2];
        let read = tokio::select! {
            read = tokio::time::timeout(context.idle_timeout, stream.read_exact(&mut length)) => read,
            () = shutdown.cancelled() => return Ok(()),
        };
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(error)) => return Err(error),
            Err(_) => return Ok(()),
        }
        query.resize(usize::from(u16::from_be_bytes(length)), 0);
        // The rest of a query must come as promptly as its first bytes.
        match tokio::time::timeout(context.idle_timeout, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => return Ok(()),
        }
        let received = std::time::Instant::now();
        let Some(reply) = respond(&context.authority, &query, peer, Protocol::Tcp, None) else {
            continue;
        };
        let length = u16::try_from(reply.bytes.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes();
        stream.write_all(&length).await?;
        stream.write_all(&reply.bytes).await?;
        context
            .metrics
            .record_dns("tcp", &reply.outcome, received.elapsed());
    }
}
