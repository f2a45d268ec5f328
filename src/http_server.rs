//! The HTTP accept loop the API and the gateway share: at most
//! `max_connections` connections open at once (more wait in the kernel's
//! backlog), a connection's first bytes and every request head due within
//! `header_read_timeout` (which also ends idle keep-alive connections: an
//! h2c connection with no stream open for that long gets a GOAWAY),
//! HTTP/1.1 and h2c with upgrades,
//! and on shutdown no new connections and a drain of those open, bounded by
//! `drain`. Plain HTTP/1.1 requests (no body, no upgrade) are served by
//! muster's own HTTP/1.1 server (`h1`); the rest of a connection that
//! sends anything else goes to hyper's HTTP/1 server, and h2c connections
//! to hyper's HTTP/2 server. It owns no routing: each connection gets the
//! [`Handler`] that `handler_for` makes for its peer.

mod h1;

#[doc(hidden)]
pub use h1::feed_requests;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::header::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Bounds on what clients can hold open.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long open connections get to finish on shutdown.
    pub drain: Duration,
}

impl Limits {
    /// The bounds the API and the gateway serve with: each request head
    /// due within 30 s (which also closes idle keep-alive connections;
    /// blocking queries wait on their own clock), and 10 s for requests
    /// in flight to finish on shutdown.
    pub fn serving(max_connections: usize) -> Self {
        Self {
            max_connections,
            header_read_timeout: Duration::from_secs(30),
            drain: Duration::from_secs(10),
        }
    }
}

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What an h2c client sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection's first bytes show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    Http1,
    H2c,
}

/// Waits until the first bytes on `stream` tell HTTP/1 from h2c (they
/// stop matching the HTTP/2 preface, or hold all of it), without reading
/// them; `None` when the peer closed first.
async fn version_shown(stream: &TcpStream) -> Option<Shown> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        match stream.peek(&mut first).await {
            Ok(0) | Err(_) => return None,
            Ok(n) if first[..n] != H2_PREFACE[..n] => return Some(Shown::Http1),
            Ok(n) if n == first.len() => return Some(Shown::H2c),
            // Part of the preface: `peek` would return at once with the
            // same bytes, so look again a little later.
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// A connection's place under `max_connections`. It is given back when the
/// connection closes, unless its service took it first to outlive the
/// connection (the gateway's upgraded tunnels do).
#[derive(Clone)]
pub struct ConnectionSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        Self(Arc::new(Mutex::new(Some(permit))))
    }

    /// The permit, once: whoever holds it keeps the place taken.
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// How muster's HTTP/1 code (its own server and the gateway's upstream
/// exchange) runs httparse: its strict defaults, no obs-fold, so a field
/// value never holds a line break. `parsed_field_value` relies on this.
pub(crate) fn field_parser() -> httparse::ParserConfig {
    httparse::ParserConfig::default()
}

/// Writes the field line `name: value` (CRLF-ended), as muster's own
/// HTTP/1 code sends fields.
pub(crate) fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A field value `field_parser` has parsed, sharing its bytes; an ASCII
/// value (almost all) is not checked again.
pub(crate) fn parsed_field_value(value: Bytes) -> HeaderValue {
    if value.is_ascii() {
        // SAFETY: the function asks for UTF-8, which ASCII is. httparse
        // allows in a field value only HTAB, SP to `~` and 0x80 to 0xFF,
        // the bytes a `HeaderValue` may hold, so the check skipped would
        // have passed (hyper skips it too; `h1`'s tests check every byte
        // at every place in a value).
        return unsafe { HeaderValue::from_maybe_shared_unchecked(value) };
    }
    // obs-text: valid, but not UTF-8, so checked the long way.
    HeaderValue::from_maybe_shared(value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// What answers a connection's requests, whichever server read them:
/// hyper (a body of type `Incoming`) or muster's own (`h1::PlainBody`).
/// The future is the handler's own type, not boxed.
pub trait Handler: Clone + Send + Sync + 'static {
    type Body: Body<Data: Send, Error: Into<BoxError>> + Send + Unpin + 'static;

    fn handle<B>(&self, request: Request<B>) -> impl Future<Output = Response<Self::Body>> + Send
    where
        B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Sync + 'static;
}

/// Serves `listener` until `shutdown`; `what` names the server in logs.
pub async fn serve<F, H>(
    listener: TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
    what: &'static str,
    mut handler_for: F,
) -> io::Result<()>
where
    F: FnMut(SocketAddr, &ConnectionSlot) -> H,
    H: Handler,
{
    let hyper = HyperServers::new(limits.header_read_timeout);
    // Every connection's task holds a sender: when all are dropped, every
    // connection has ended.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.map_err(io::Error::other)?,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(server = what, error = %error, "accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let slot = ConnectionSlot::new(permit);
        let handler = handler_for(peer, &slot);
        let connection = Connection {
            hyper: hyper.clone(),
            head_timeout: limits.header_read_timeout,
            shutdown: shutdown.clone(),
        };
        let open = open.clone();
        tokio::spawn(async move {
            connection.serve(stream, handler).await;
            drop(slot.take());
            drop(open);
        });
    }
    drop(listener);
    drop(open);
    if tokio::time::timeout(limits.drain, all_closed.recv())
        .await
        .is_err()
    {
        warn!(server = what, "connections did not finish in time");
    }
    Ok(())
}

/// hyper's HTTP/1 and HTTP/2 servers, for what muster's own does not take.
#[derive(Clone)]
struct HyperServers {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl HyperServers {
    fn new(header_read_timeout: Duration) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .writev(false)
            .header_read_timeout(header_read_timeout);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        Self { http1, http2 }
    }
}

/// What serving one connection needs besides its stream and handler.
struct Connection {
    hyper: HyperServers,
    head_timeout: Duration,
    shutdown: CancellationToken,
}

impl Connection {
    async fn serve<H: Handler>(self, stream: TcpStream, handler: H) {
        // The h2c check reads the first bytes with no timer of its own:
        // a client that sends nothing, or part of the HTTP/2 preface,
        // would hold its slot for good.
        let shown = tokio::select! {
            shown = tokio::time::timeout(self.head_timeout, version_shown(&stream)) => {
                shown.ok().flatten()
            }
            () = self.shutdown.cancelled() => None,
        };
        match shown {
            Some(Shown::Http1) => {
                let served = h1::serve(stream, &handler, self.head_timeout, &self.shutdown);
                if let Some(rest) = served.await {
                    self.serve_http1(rest, handler).await;
                }
            }
            Some(Shown::H2c) => self.serve_h2c(stream, handler).await,
            None => {}
        }
    }

    /// Serves an h2c connection. One with no stream open for
    /// `head_timeout` is asked to close, as an idle HTTP/1 connection is:
    /// a GOAWAY, after which a stream that raced it still finishes.
    async fn serve_h2c<H: Handler>(self, stream: TcpStream, handler: H) {
        let activity = Arc::new(Activity::new());
        let service = h2c_service(handler, activity.clone());
        let connection = self
            .hyper
            .http2
            .serve_connection(TokioIo::new(stream), service);
        let mut connection = pin!(connection);
        let mut idle = pin!(tokio::time::sleep(self.head_timeout));
        loop {
            tokio::select! {
                _ = connection.as_mut() => return,
                () = self.shutdown.cancelled() => break,
                () = idle.as_mut() => {
                    let now = Instant::now();
                    let deadline = activity.idle_since().unwrap_or(now) + self.head_timeout;
                    if now >= deadline {
                        break;
                    }
                    idle.as_mut().reset(deadline);
                }
            }
        }
        connection.as_mut().graceful_shutdown();
        let _ = connection.await;
    }

    /// Serves the rest of an HTTP/1 connection muster's own server handed
    /// over (only ever HTTP/1: an HTTP/2 preface after HTTP/1 requests is
    /// a bad request, not a switch).
    async fn serve_http1<H: Handler>(self, rest: h1::Prefixed, handler: H) {
        let mut http1 = self.hyper.http1;
        // Once shutdown has begun, hyper is told to close after this one
        // request: asked to shut down gracefully before it has read a
        // byte, it would close without answering the request it was
        // handed.
        let stopping = self.shutdown.is_cancelled();
        http1.keep_alive(!stopping);
        let connection = http1
            .serve_connection(TokioIo::new(rest), hyper_service(handler))
            .with_upgrades();
        let mut connection = pin!(connection);
        if !stopping {
            tokio::select! {
                _ = connection.as_mut() => return,
                () = self.shutdown.cancelled() => connection.as_mut().graceful_shutdown(),
            }
        }
        let _ = connection.await;
    }
}

/// An h2c connection's streams: how many are open, and when the last one
/// ended (or the connection opened).
struct Activity {
    opened: Instant,
    open: AtomicUsize,
    /// Milliseconds from `opened` to when the last stream ended.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            open: AtomicUsize::new(0),
            last: AtomicU64::new(0),
        }
    }

    /// A stream begins; it ends when what this returns is dropped.
    fn start(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.clone())
    }

    /// Since when no stream has been open; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        if self.open.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.opened + Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// One open stream of an h2c connection: its handler's work and then its
/// response body.
struct OpenStream(Arc<Activity>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let activity = &self.0;
        let millis = u64::try_from(activity.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.last.store(millis, Ordering::Relaxed);
        activity.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its stream counted as open until it ends.
struct Counted<B> {
    body: B,
    _open: OpenStream,
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// `handler` as hyper calls it.
fn hyper_service<H: Handler>(
    handler: H,
) -> impl Service<
    Request<Incoming>,
    Response = Response<H::Body>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone {
    service_fn(move |request: Request<Incoming>| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler.handle(request).await) }
    })
}

/// `handler` as hyper's HTTP/2 server calls it, each stream counted in
/// `activity` from its request until its response body ends.
fn h2c_service<H: Handler>(
    handler: H,
    activity: Arc<Activity>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Counted<H::Body>>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone {
    service_fn(move |request: Request<Incoming>| {
        let (handler, open) = (handler.clone(), activity.start());
        async move {
            let response = handler.handle(request).await;
            Ok::<_, Infallible>(response.map(|body| Counted { body, _open: open }))
        }
    })
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Answers `hi` to any request, whichever server read it.
    #[derive(Clone)]
    struct Hello;

    impl Handler for Hello {
        type Body = Full<Bytes>;

        async fn handle<B>(&self, _request: Request<B>) -> Response<Full<Bytes>> {
            Response::new(Full::new(Bytes::from_static(b"hi")))
        }
    }

    /// A server answering `hi` under `limits`, and where it listens.
    async fn hello(limits: Limits, shutdown: CancellationToken) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, limits, shutdown, "test", |_, _| Hello));
        addr
    }

    /// What the server sends back to `request` on `stream`, up to `hi`.
    async fn exchange(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        let mut buffer = [0u8; 256];
        while !reply.ends_with(b"hi") {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(n > 0, "closed before answering");
            reply.extend_from_slice(&buffer[..n]);
        }
        String::from_utf8(reply).unwrap()
    }

    /// Whether the peer closes `stream` within the deadline (whatever it
    /// sends first).
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut rest = Vec::new();
        let read = stream.read_to_end(&mut rest);
        tokio::time::timeout(DEADLINE, read).await.is_ok()
    }

    /// Longest any condition here is waited for.
    const DEADLINE: Duration = Duration::from_secs(10);

    const LIMITS: Limits = Limits {
        max_connections: 2,
        header_read_timeout: Duration::from_millis(300),
        drain: Duration::from_secs(5),
    };

    #[tokio::test]
    async fn a_client_that_sends_no_request_head_is_disconnected() {
        let addr = hello(LIMITS, CancellationToken::new()).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut silent).await, "the silent client is let go");
        let mut idle = TcpStream::connect(addr).await.unwrap();
        assert!(exchange(&mut idle).await.starts_with("HTTP/1.1 200"));
        assert!(closed(&mut idle).await, "an idle keep-alive client too");
    }

    #[tokio::test]
    async fn connections_over_the_cap_wait_for_a_free_slot() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(60),
            ..LIMITS
        };
        let addr = hello(limits, CancellationToken::new()).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert!(exchange(&mut first).await.starts_with("HTTP/1.1 200"));
        assert!(exchange(&mut second).await.starts_with("HTTP/1.1 200"));
        // The kernel completes the third handshake, but muster does not
        // take the connection until one of the two closes.
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut waiting = tokio::spawn(async move { exchange(&mut third).await });
        // A slow machine can only make this pass without a cap, never
        // fail with one.
        let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
        assert!(early.is_err(), "served past the cap");
        drop(first);
        let reply = tokio::time::timeout(DEADLINE, waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }

    #[tokio::test]
    async fn an_idle_h2c_connection_is_closed() {
        let addr = hello(LIMITS, CancellationToken::new()).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut client, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let connection = tokio::spawn(connection);
        let request = Request::get("http://x/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        // No more requests: after the header timeout the server says
        // GOAWAY and the connection ends.
        let ended = tokio::time::timeout(DEADLINE, connection).await;
        assert!(ended.is_ok(), "the idle h2c connection stays open");
    }

    /// Answers `/open` with a body that never ends, anything else `hi`.
    #[derive(Clone)]
    struct Streams;

    /// A body with no end.
    struct Endless;

    impl Body for Endless {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            std::task::Poll::Pending
        }
    }

    impl Handler for Streams {
        type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

        async fn handle<B>(&self, request: Request<B>) -> Response<Self::Body> {
            use http_body_util::BodyExt;
            match request.uri().path() {
                "/open" => Response::new(Endless.boxed()),
                _ => Response::new(Full::new(Bytes::from_static(b"hi")).boxed()),
            }
        }
    }

    #[tokio::test]
    async fn an_h2c_connection_with_a_stream_open_is_not_idle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = serve(
            listener,
            LIMITS,
            CancellationToken::new(),
            "test",
            |_, _| Streams,
        );
        tokio::spawn(serving);
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut client, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let get = |path: &str| {
            let uri = format!("http://x{path}");
            Request::get(uri)
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap()
        };
        let open = client.send_request(get("/open")).await.unwrap();
        assert_eq!(open.status(), 200);
        // Well past the header timeout (300 ms) with only that stream open:
        // the connection must still take a new request.
        tokio::time::sleep(3 * LIMITS.header_read_timeout).await;
        let response = client.send_request(get("/")).await;
        assert_eq!(response.expect("refused: told to go away").status(), 200);
        drop(open);
    }

    #[tokio::test]
    async fn a_client_that_stalls_inside_the_h2_preface_is_disconnected() {
        let addr = hello(LIMITS, CancellationToken::new()).await;
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(&H2_PREFACE[..8]).await.unwrap();
        assert!(
            closed(&mut stalled).await,
            "let go after the header timeout"
        );
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_closes_idle_connections() {
        let shutdown = CancellationToken::new();
        // Idle connections outlive this test unless shutdown closes them.
        let limits = Limits {
            header_read_timeout: Duration::from_secs(60),
            ..LIMITS
        };
        let addr = hello(limits, shutdown.clone()).await;
        let mut open = TcpStream::connect(addr).await.unwrap();
        assert!(exchange(&mut open).await.starts_with("HTTP/1.1 200"));
        shutdown.cancel();
        assert!(closed(&mut open).await, "an idle connection is closed");
        let refused = async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        };
        assert!(
            tokio::time::timeout(DEADLINE, refused).await.is_ok(),
            "new connections are refused"
        );
    }
}
