//! Keep-alive HTTP/1.1 connections to upstream instances, one pool per
//! route, keyed by instance address. A request takes an idle connection or
//! dials a new one; the connection goes back to the pool when its response
//! body has been read to the end, and closes if the body is abandoned or
//! the connection is upgraded. Idle connections close after the route's
//! idle timeout. HTTP/2 upstreams keep hyper-util's client.
//!
//! A request without a body goes through muster's own exchange
//! (`exchange.rs`) on a bare connection, its head borrowed so that a
//! retry sends it again without a copy; one with a body or an upgrade
//! goes through hyper's client connection. Each kind of connection waits
//! in its own idle set.
//!
//! hyper-util's pooled client did the same for HTTP/1 but hashed its pool
//! key several times per request and spawned a task per request to wait
//! for the connection to become idle.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::http::request::Parts;
use hyper::http::uri::Authority;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::exchange::{Connection, ExchangeError, exchange};
use super::proxy::{Body, BoxError};
use super::watched::{Ending, Watched, Watcher};

/// Why an upstream request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to {authority}: {source}")]
    Connect {
        authority: Authority,
        source: io::Error,
    },
    #[error("connecting to {authority}: no connection within {timeout:?}")]
    ConnectTimeout {
        authority: Authority,
        timeout: Duration,
    },
    #[error("upstream connection: {0}")]
    Http(#[from] hyper::Error),
    #[error("upstream exchange: {0}")]
    Exchange(#[from] ExchangeError),
    /// From hyper-util's client (HTTP/2 upstreams).
    #[error("upstream connection: {0}")]
    Client(#[from] hyper_util::client::legacy::Error),
}

impl SendError {
    /// Nothing reached the upstream: any request may be tried elsewhere.
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::ConnectTimeout { .. } => true,
            Self::Http(_) | Self::Exchange(_) => false,
            Self::Client(error) => error.is_connect(),
        }
    }
}

/// A route's idle upstream connections.
pub struct Http1Pool {
    shared: Arc<Shared>,
}

struct Shared {
    /// hyper's client connections, for requests with a body or an upgrade.
    hyper: IdleSet<SendRequest<Body>>,
    /// Bare connections, for muster's own exchange.
    bare: IdleSet<Connection>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Whether a task is closing expired idle connections.
    sweeping: AtomicBool,
}

/// A connection that can wait in a pool.
trait Pooled {
    /// Whether it can still carry a request.
    fn is_usable(&self) -> bool;
}

impl Pooled for SendRequest<Body> {
    fn is_usable(&self) -> bool {
        !self.is_closed()
    }
}

impl Pooled for Connection {
    fn is_usable(&self) -> bool {
        self.is_idle()
    }
}

/// Idle connections of one kind, by `host:port` (hashing an `Authority`
/// goes byte by byte).
struct IdleSet<C> {
    by_authority: Mutex<HashMap<Box<str>, Vec<Idle<C>>, foldhash::fast::RandomState>>,
}

struct Idle<C> {
    connection: C,
    since: Instant,
}

impl<C: Pooled> IdleSet<C> {
    fn new() -> Self {
        Self {
            by_authority: Mutex::default(),
        }
    }

    /// The newest usable connection to `authority` idle for less than
    /// `idle_timeout`; older and broken ones on the way are dropped.
    fn take(&self, authority: &Authority, idle_timeout: Duration) -> Option<C> {
        let mut idle = self
            .by_authority
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let waiting = idle.get_mut(authority.as_str())?;
        while let Some(idle) = waiting.pop() {
            if idle.connection.is_usable() && idle.since.elapsed() < idle_timeout {
                return Some(idle.connection);
            }
        }
        None
    }

    /// Keeps `connection` if it is usable; whether it did.
    fn put(&self, authority: &Authority, connection: C) -> bool {
        if !connection.is_usable() {
            return false;
        }
        let since = Instant::now();
        let mut idle = self
            .by_authority
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let idle_at = match idle.get_mut(authority.as_str()) {
            Some(waiting) => waiting,
            None => idle.entry(authority.as_str().into()).or_default(),
        };
        idle_at.push(Idle { connection, since });
        true
    }

    /// Drops expired and broken connections; whether any are left.
    fn expire(&self, idle_timeout: Duration) -> bool {
        let mut idle = self
            .by_authority
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        idle.retain(|_, waiting| {
            waiting.retain(|c| c.connection.is_usable() && c.since.elapsed() < idle_timeout);
            !waiting.is_empty()
        });
        !idle.is_empty()
    }
}

impl Http1Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                hyper: IdleSet::new(),
                bare: IdleSet::new(),
                connect_timeout,
                idle_timeout,
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` (origin-form URI, Host set; one with a body or an
    /// upgrade, see [`Self::send_bare`] for the others) to `authority`
    /// through hyper's client, on a pooled connection or a new one. A
    /// request that a reused connection closed before sending goes again
    /// on another.
    pub async fn send(
        &self,
        authority: &Authority,
        request: Request<Body>,
    ) -> Result<Response<Body>, SendError> {
        let (mut request, upload) = track_upload(request);
        loop {
            let idle = self.shared.hyper.take(authority, self.shared.idle_timeout);
            let (mut sender, reused) = match idle {
                Some(sender) => (sender, true),
                None => (self.handshake(authority).await?, false),
            };
            // A reused connection may still be settling after its last
            // response, or be closing.
            if reused && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.lease(authority, sender, upload, response)),
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Http(failed.into_error())),
                },
            }
        }
    }

    /// [`Self::send`] for a request without a body (and no upgrade),
    /// through muster's own exchange, which only borrows the head. A
    /// reused connection that gives no answer at all was most likely
    /// closed by the upstream as the request went: a `repeatable`
    /// (idempotent) request goes again, once, on a new connection (the
    /// upstream may have acted on it, and its other idle connections are
    /// likely closed too).
    pub async fn send_bare(
        &self,
        authority: &Authority,
        request: &Parts,
        repeatable: bool,
    ) -> Result<Response<Body>, SendError> {
        let mut fresh_only = false;
        loop {
            let idle = match fresh_only {
                false => self.shared.bare.take(authority, self.shared.idle_timeout),
                true => None,
            };
            let (connection, reused) = match idle {
                Some(connection) => (connection, true),
                None => (Connection::new(self.connect(authority).await?), false),
            };
            let (pool, home) = (Arc::downgrade(&self.shared), authority.clone());
            let release = move |connection| {
                if let Some(pool) = pool.upgrade() {
                    pool.put(&pool.bare, &home, connection);
                }
            };
            match exchange(connection, request, release).await {
                Ok(response) => return Ok(response.map(BodyExt::boxed)),
                Err(error) if reused && repeatable && error.is_stale() => fresh_only = true,
                Err(error) => return Err(error.into()),
            }
        }
    }

    async fn handshake(&self, authority: &Authority) -> Result<SendRequest<Body>, SendError> {
        let stream = self.connect(authority).await?;
        let (sender, connection) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(connection.with_upgrades());
        Ok(sender)
    }

    async fn connect(&self, authority: &Authority) -> Result<TcpStream, SendError> {
        let timeout = self.shared.connect_timeout;
        let connecting = TcpStream::connect(authority.as_str());
        let stream = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                let authority = authority.clone();
                return Err(SendError::Connect { authority, source });
            }
            Err(_) => {
                let authority = authority.clone();
                return Err(SendError::ConnectTimeout { authority, timeout });
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// The response, with a body that returns the connection when read.
    fn lease(
        &self,
        authority: &Authority,
        sender: SendRequest<Body>,
        upload: Upload,
        response: Response<Incoming>,
    ) -> Response<Body> {
        // An upgraded connection belongs to the tunnel from now on.
        let reusable = response.status() != StatusCode::SWITCHING_PROTOCOLS;
        response.map(|inner| {
            if !reusable {
                return inner.map_err(BoxError::from).boxed();
            }
            let lease = Lease {
                sender,
                upload,
                authority: authority.clone(),
                pool: Arc::downgrade(&self.shared),
            };
            let mut body = Watched::new(inner, lease);
            body.end_if_empty();
            body.boxed()
        })
    }
}

impl Shared {
    /// Keeps `connection` in `set`, and makes sure a sweep will close it
    /// once it has been idle too long.
    fn put<C: Pooled>(self: &Arc<Self>, set: &IdleSet<C>, authority: &Authority, connection: C) {
        if !set.put(authority, connection) {
            return;
        }
        // Reached from a body's Drop: never assume a runtime.
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && !self.sweeping.swap(true, Ordering::AcqRel)
        {
            runtime.spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Drops expired and closed connections; whether any are left.
    fn expire(&self) -> bool {
        let hyper = self.hyper.expire(self.idle_timeout);
        let bare = self.bare.expire(self.idle_timeout);
        hyper || bare
    }
}

/// Closes idle connections as they expire, for as long as there are any
/// and the pool is in use (a reload drops the pool and ends this).
async fn sweep(pool: Weak<Shared>) {
    loop {
        let Some(shared) = pool.upgrade() else { return };
        let period = (shared.idle_timeout / 2).max(Duration::from_millis(10));
        drop(shared);
        tokio::time::sleep(period).await;
        let Some(shared) = pool.upgrade() else { return };
        if !shared.expire() {
            shared.sweeping.store(false, Ordering::Release);
            // A connection put back since the check starts a new sweep.
            if shared.expire() && !shared.sweeping.swap(true, Ordering::AcqRel) {
                continue;
            }
            return;
        }
    }
}

/// A connection on loan to one response.
struct Lease {
    sender: SendRequest<Body>,
    /// The request's body, if it had one, still going out or done.
    upload: Upload,
    authority: Authority,
    pool: Weak<Shared>,
}

/// Set once a request's body has gone out in full; `None` for a request
/// without a body.
type Upload = Option<Arc<AtomicBool>>;

/// `request` with its body (if any) watched for its end. An upstream may
/// answer before it has read the whole body (a 401, a 413); its
/// connection is busy until the upload ends and must not be handed to
/// another request meanwhile.
fn track_upload(request: Request<Body>) -> (Request<Body>, Upload) {
    if request.body().is_end_stream() {
        return (request, None);
    }
    let sent = Arc::new(AtomicBool::new(false));
    let watched = sent.clone();
    let request = request.map(|inner| Watched::new(inner, Uploaded(watched)).boxed());
    (request, Some(sent))
}

/// Sets its flag when the request body has gone out in full.
struct Uploaded(Arc<AtomicBool>);

impl Watcher for Uploaded {
    fn ended(self, how: Ending) {
        if how == Ending::Complete {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// A connection returns to its pool when the response body has been read
/// to the end and the request's body has gone out in full; otherwise it
/// closes.
impl Watcher for Lease {
    fn ended(self, how: Ending) {
        let uploading = self
            .upload
            .as_ref()
            .is_some_and(|sent| !sent.load(Ordering::Acquire));
        if how == Ending::Complete
            && !uploading
            && let Some(pool) = self.pool.upgrade()
        {
            pool.put(&pool.hyper, &self.authority, self.sender);
        }
    }
}
