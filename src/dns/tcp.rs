//! DNS over TCP (RFC 7766): two-byte length-prefixed queries on a
//! connection, answered in order by the same code as UDP (the common
//! shape from a per-thread cache of encoded answers), with a cap on
//! connections served at once and idle connections closed. A connection
//! over the cap waits in the kernel's accept queue.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::answer::Authority;
use super::cache::{AnswerCache, Transport};
use super::wire::Outcome;
use crate::telemetry::{DnsTally, Metrics};

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

thread_local! {
    /// Encoded answers for TCP queries, one cache per runtime thread (a
    /// share of the total, one thread per core): a connection's task
    /// borrows it only between awaits, so no lock.
    static STREAM_CACHE: RefCell<AnswerCache> = RefCell::new(AnswerCache::shared_by(
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
    ));
}

/// Answers queries on one connection until it closes, idles out, or
/// muster shuts down. Reads are buffered (a length and its query, or
/// several pipelined queries, in one system call) and each answer goes
/// out with its length in one write.
async fn connection(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    context: &TcpContext,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let mut query = Vec::with_capacity(512);
    let mut message = Vec::with_capacity(512);
    let mut out = Vec::with_capacity(514);
    let mut tally = DnsTally::new(context.metrics.clone(), "tcp");
    loop {
        if reader.buffer().is_empty() {
            // Nothing pipelined: the counts go out before waiting.
            tally.flush();
        }
        let read = tokio::select! {
            read = tokio::time::timeout(context.idle_timeout, read_query(&mut reader, &mut query)) => read,
            () = shutdown.cancelled() => return Ok(()),
        };
        match read {
            Ok(Ok(())) => {}
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(error)) => return Err(error),
            Err(_) => return Ok(()),
        }
        let received = std::time::Instant::now();
        let answered = answer(&context.authority, &query, peer, &mut message, &mut out);
        let Some(outcome) = answered else {
            continue;
        };
        writer.write_all(&out).await?;
        tally.record(&outcome, received.elapsed());
    }
}

/// Bytes read from a connection at a time.
const READ_BUFFER: usize = 4096;

/// Reads one length-prefixed query into `query`.
async fn read_query(
    reader: &mut BufReader<OwnedReadHalf>,
    query: &mut Vec<u8>,
) -> std::io::Result<()> {
    let length = reader.read_u16().await?;
    query.resize(usize::from(length), 0);
    reader.read_exact(query).await?;
    Ok(())
}

/// The answer to `query` into `out`, behind its two-byte length (built
/// in `message` first) from the thread's cache. `None` when nothing is to
/// be sent.
fn answer(
    authority: &Authority,
    query: &[u8],
    peer: std::net::SocketAddr,
    message: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Option<Outcome> {
    let (outcome, more) = STREAM_CACHE.with_borrow_mut(|cache| {
        let outcome = cache.answer(authority, query, peer, Transport::Stream, message)?;
        Some((outcome, cache.take_more()))
    })?;
    out.clear();
    for message in std::iter::once(&*message).chain(more.iter()) {
        let length = u16::try_from(message.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(message);
    }
    Some(outcome)
}
