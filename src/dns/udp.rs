//! muster's own UDP loop, one per socket: datagrams come in and answers go
//! out in batches, with one `recvmmsg` and one `sendmmsg` system call per
//! batch instead of one `recvfrom` and one `sendto` per query. Answering is
//! pure CPU work on a snapshot, so it runs inline: no task per query.
//! Queries of the common shape are answered from the worker's own
//! [`AnswerCache`]; counts go to the shared metrics through a
//! [`DnsTally`], in batches and whenever the socket is idle.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use socket2::SockAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::answer::Authority;
use super::cache::{AnswerCache, Transport};
use super::rrl::Rrl;
use super::wire::{MAX_UDP_PAYLOAD, Outcome};
use crate::telemetry::{DnsTally, Metrics};

/// Datagrams taken from the socket per system call.
const BATCH: usize = 32;
/// Largest datagram read; queries are far smaller, the rest is cut off.
const RECV_BUFFER: usize = 4096;
/// Batches a worker answers before it yields to the runtime's other tasks
/// (at most 128 queries, well under a millisecond: the API stays
/// responsive while DNS is under full load).
const YIELD_EVERY: u32 = 4;

/// Serves `socket`, one of `workers` UDP workers, until `shutdown` is
/// cancelled.
pub async fn serve(
    socket: UdpSocket,
    workers: usize,
    authority: Arc<Authority>,
    metrics: Arc<Metrics>,
    rrl: Option<Arc<Rrl>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    let mut batch = Batch::new();
    let mut cache = AnswerCache::shared_by(workers);
    let mut tally = DnsTally::new(metrics, "udp");
    let mut batches: u32 = 0;
    while !shutdown.is_cancelled() {
        match socket.try_io(Interest::READABLE, || batch.receive(fd)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                // Idle: the counts go out now, then wait for the next query.
                tally.flush();
                tokio::select! {
                    ready = socket.readable() => ready?,
                    () = shutdown.cancelled() => break,
                }
                continue;
            }
            Err(error) => {
                // ICMP errors from earlier sends surface here; keep serving.
                debug!(error = %error, "dns udp receive failed");
                continue;
            }
        }
        let arrived = Instant::now();
        batch.answer(&authority, &mut cache, rrl.as_deref());
        send_all(&socket, fd, &mut batch).await;
        let elapsed = arrived.elapsed();
        for outcome in batch.outcomes.iter().flatten() {
            tally.record(outcome, elapsed);
        }
        batches = batches.wrapping_add(1);
        if batches.is_multiple_of(YIELD_EVERY) {
            // Under steady load the socket is always ready; let the
            // runtime's other tasks run.
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

/// Sends every answer of `batch`, waiting while the socket's buffer is
/// full. An answer the kernel refuses is dropped (and logged), as a
/// lost datagram would be.
async fn send_all(socket: &UdpSocket, fd: RawFd, batch: &mut Batch) {
    while batch.unsent < batch.replies.len() {
        match socket.try_io(Interest::WRITABLE, || batch.send(fd)) {
            Ok(sent) => batch.unsent += sent,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    return;
                }
            }
            Err(error) => {
                let peer = batch.replies[batch.unsent].1.as_socket();
                debug!(error = %error, peer = ?peer, "dns udp send failed");
                batch.unsent += 1;
            }
        }
    }
}

/// One batch's buffers, reused for every batch.
struct Batch {
    queries: Vec<[u8; RECV_BUFFER]>,
    sources: Vec<libc::sockaddr_storage>,
    /// Length of each datagram received, and its source.
    received: Vec<(usize, Option<SocketAddr>)>,
    /// Answer bytes by slot; only those listed in `replies` are sent.
    answers: Vec<Vec<u8>>,
    /// (slot in `answers`, destination) of each answer to send, in order.
    replies: Vec<(usize, SockAddr)>,
    /// How many of `replies` are already sent.
    unsent: usize,
    /// What each datagram's answer said (`None`: nothing was answered).
    outcomes: Vec<Option<Outcome>>,
}

impl Batch {
    fn new() -> Self {
        Self {
            queries: vec![[0; RECV_BUFFER]; BATCH],
            // SAFETY: all zeroes is a valid (empty) sockaddr_storage.
            sources: vec![unsafe { std::mem::zeroed() }; BATCH],
            received: Vec::with_capacity(BATCH),
            answers: (0..BATCH)
                .map(|_| Vec::with_capacity(usize::from(MAX_UDP_PAYLOAD)))
                .collect(),
            replies: Vec::with_capacity(BATCH),
            unsent: 0,
            outcomes: Vec::with_capacity(BATCH),
        }
    }

    /// Reads up to [`BATCH`] waiting datagrams without blocking (one
    /// `recvmmsg`) into `received`.
    fn receive(&mut self, fd: RawFd) -> io::Result<()> {
        // On the stack: the raw pointers inside must not live across an
        // await (they would make the loop's future !Send).
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.queries[i].as_mut_ptr().cast(),
            iov_len: RECV_BUFFER,
        });
        let mut headers: [libc::mmsghdr; BATCH] = std::array::from_fn(|i| {
            let name = (&raw mut self.sources[i]).cast();
            let name_len = size_of::<libc::sockaddr_storage>() as u32;
            message_header(name, name_len, &raw mut iovecs[i])
        });
        // SAFETY: `headers` holds BATCH valid headers whose name and iovec
        // pointers refer to `self.sources` and `self.queries`, which live
        // (unmoved) until after the call.
        let count = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if count < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received.clear();
        for (header, source) in headers.iter().zip(&self.sources).take(count as usize) {
            let length = (header.msg_len as usize).min(RECV_BUFFER);
            self.received.push((length, socket_addr(source)));
        }
        Ok(())
    }

    /// Answers the datagrams received, queueing the replies to send and
    /// noting the outcome of each (`None`: nothing to count).
    fn answer(&mut self, authority: &Authority, cache: &mut AnswerCache, rrl: Option<&Rrl>) {
        self.replies.clear();
        self.unsent = 0;
        let outcomes = &mut self.outcomes;
        outcomes.clear();
        for (slot, &(length, source)) in self.received.iter().enumerate() {
            let Some(peer) = source.filter(|peer| peer.port() != 0) else {
                outcomes.push(None);
                continue;
            };
            let query = &self.queries[slot][..length];
            let out = &mut self.answers[slot];
            let outcome = cache.answer(authority, query, peer, Transport::Udp(rrl), out);
            if outcome.is_some() && !out.is_empty() {
                self.replies.push((slot, SockAddr::from(peer)));
            }
            outcomes.push(outcome);
        }
    }

    /// Sends the unsent replies (one `sendmmsg`); how many went.
    fn send(&mut self, fd: RawFd) -> io::Result<usize> {
        let pending = &self.replies[self.unsent..];
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|i| {
            let answer = pending
                .get(i)
                .map_or(&[][..], |(slot, _)| &self.answers[*slot]);
            libc::iovec {
                iov_base: answer.as_ptr().cast_mut().cast(),
                iov_len: answer.len(),
            }
        });
        // sendmmsg only reads the names and the buffers; the headers past
        // `pending` are not sent.
        let mut headers: [libc::mmsghdr; BATCH] = std::array::from_fn(|i| match pending.get(i) {
            Some((_, destination)) => {
                let name = destination.as_ptr().cast_mut().cast();
                message_header(name, destination.len(), &raw mut iovecs[i])
            }
            None => message_header(std::ptr::null_mut(), 0, std::ptr::null_mut()),
        });
        // SAFETY: the first `pending.len()` headers point at answer buffers
        // and destination addresses owned by `self`, alive and unchanged
        // during the call.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                headers.as_mut_ptr(),
                pending.len() as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }
}

/// The header of one datagram for `recvmmsg`/`sendmmsg`: its address
/// (`name`, `name_len` bytes) and its one buffer (`iovec`). The pointers
/// must stay valid until the call that uses the header returns.
fn message_header(
    name: *mut libc::c_void,
    name_len: libc::socklen_t,
    iovec: *mut libc::iovec,
) -> libc::mmsghdr {
    // SAFETY: all zeroes is a valid empty header.
    let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
    header.msg_hdr.msg_name = name;
    header.msg_hdr.msg_namelen = name_len;
    header.msg_hdr.msg_iov = iovec;
    header.msg_hdr.msg_iovlen = if iovec.is_null() { 0 } else { 1 };
    header
}

/// The IPv4 or IPv6 address the kernel wrote into `source`.
fn socket_addr(source: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(source.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4 =
                unsafe { &*(source as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(v4.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6 =
                unsafe { &*(source as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
            let port = u16::from_be(v6.sin6_port);
            Some(SocketAddrV6::new(ip, port, v6.sin6_flowinfo, v6.sin6_scope_id).into())
        }
        _ => None,
    }
}
