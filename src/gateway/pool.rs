//! Keep-alive HTTP/1.1 connections to upstream instances, one pool per
//! route, keyed by instance address. A request takes an idle connection or
//! dials a new one; the connection goes back to the pool when its response
//! body has been read to the end, and closes if the body is abandoned or
//! the connection is upgraded. Idle connections close after the route's
//! idle timeout. HTTP/2 upstreams keep hyper-util's client.
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
use hyper::http::uri::Authority;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

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
    /// From hyper-util's client (HTTP/2 upstreams).
    #[error("upstream connection: {0}")]
    Client(#[from] hyper_util::client::legacy::Error),
}

impl SendError {
    /// Nothing reached the upstream: any request may be tried elsewhere.
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::ConnectTimeout { .. } => true,
            Self::Http(_) => false,
            Self::Client(error) => error.is_connect(),
        }
    }
}

/// A route's idle upstream connections.
pub struct Http1Pool {
    shared: Arc<Shared>,
}

struct Shared {
    /// By `host:port`: hashing an `Authority` goes byte by byte.
    idle: Mutex<HashMap<Box<str>, Vec<Idle>, foldhash::fast::RandomState>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Whether a task is closing expired idle connections.
    sweeping: AtomicBool,
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

impl Http1Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                idle: Mutex::default(),
                connect_timeout,
                idle_timeout,
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` (origin-form URI, Host set) to `authority` on a
    /// pooled connection, or a new one. A request that a reused connection
    /// closed before sending goes again on another.
    pub async fn send(
        &self,
        authority: &Authority,
        request: Request<Body>,
    ) -> Result<Response<Body>, SendError> {
        let (mut request, upload) = track_upload(request);
        loop {
            let (mut sender, reused) = match self.shared.take_idle(authority) {
                Some(sender) => (sender, true),
                None => (self.connect(authority).await?, false),
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

    async fn connect(&self, authority: &Authority) -> Result<SendRequest<Body>, SendError> {
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
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection.with_upgrades());
        Ok(sender)
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
    fn take_idle(&self, authority: &Authority) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let waiting = idle.get_mut(authority.as_str())?;
        while let Some(connection) = waiting.pop() {
            if !connection.sender.is_closed() && connection.since.elapsed() < self.idle_timeout {
                return Some(connection.sender);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, authority: Authority, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let idle_at = match idle.get_mut(authority.as_str()) {
            Some(waiting) => waiting,
            None => idle.entry(authority.as_str().into()).or_default(),
        };
        idle_at.push(Idle { sender, since });
        drop(idle);
        // Reached from a body's Drop: never assume a runtime.
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && !self.sweeping.swap(true, Ordering::AcqRel)
        {
            runtime.spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Drops expired and closed connections; whether any are left.
    fn expire(&self) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|_, waiting| {
            waiting.retain(|c| !c.sender.is_closed() && c.since.elapsed() < self.idle_timeout);
            !waiting.is_empty()
        });
        !idle.is_empty()
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
            pool.put(self.authority, self.sender);
        }
    }
}
