//! Real upstream servers for gateway tests, on ephemeral loopback ports:
//! an HTTP/1.1 + h2c backend that reports what it received, and a
//! WebSocket echo server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Reply = Response<BoxBody<Bytes, Infallible>>;

/// A backend that answers every request with JSON describing it:
/// `{"backend", "method", "path", "version", "headers", "bytes"}`.
/// A path containing `/status/<code>` answers that status, one ending in
/// `/slow` waits 5 s first, and one containing `/download/<n>` streams n
/// bytes.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// Connections accepted so far, and those still open.
    pub accepted: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Upstream {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let upstream = Self {
            name: name.to_string(),
            addr,
            hits: hits.clone(),
            accepted: accepted.clone(),
            open: open.clone(),
            stop: stop.clone(),
        };
        let name = name.to_string();
        tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap(),
                    () = stop.cancelled() => break,
                };
                let (name, hits) = (name.clone(), hits.clone());
                let service =
                    service_fn(move |request| respond(name.clone(), hits.clone(), request));
                accepted.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                let open = open.clone();
                connections.spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            // Killing a backend closes its connections too.
            connections.abort_all();
        });
        upstream
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection: the port refuses.
    pub fn kill(&self) {
        self.stop.cancel();
    }

    /// A registration body pointing at this backend (named port `http`).
    pub fn instance(&self, extra: serde_json::Value) -> serde_json::Value {
        let mut body = serde_json::json!({
            "address": self.addr.ip().to_string(),
            "port": self.addr.port(),
            "ports": {"http": self.addr.port()},
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        body
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn respond(
    name: String,
    hits: Arc<AtomicUsize>,
    request: Request<Incoming>,
) -> Result<Reply, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = request.uri().path().to_string();
    if let Some((_, code)) = path.split_once("/status/") {
        let status = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        return Ok(reply(status, serde_json::json!({"backend": name})));
    }
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    if let Some((_, size)) = path.split_once("/download/") {
        let body = Repeat {
            left: size.parse().unwrap_or(0),
        };
        return Ok(Response::new(BoxBody::new(body)));
    }
    let method = request.method().to_string();
    let version = format!("{:?}", request.version());
    let query = request.uri().query().map(str::to_string);
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v.to_str().unwrap_or(""))))
        .collect();
    // Count the body as it streams in; nothing is kept.
    let mut body = request.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    let report = serde_json::json!({
        "backend": name, "method": method, "path": path, "query": query,
        "version": version, "headers": headers, "bytes": bytes,
    });
    Ok(reply(StatusCode::OK, report))
}

fn reply(status: StatusCode, json: serde_json::Value) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(json.to_string())).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

/// `left` bytes of `x`, 64 KiB at a time, made as they are sent.
struct Repeat {
    left: u64,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let chunk = self.left.min(64 * 1024);
        self.left -= chunk;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![
            b'x';
            chunk as usize
        ])))))
    }
}

/// A WebSocket server that sends every message back.
pub async fn websocket_echo() -> (SocketAddr, CancellationToken) {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => accepted.unwrap(),
                () = stopped.cancelled() => break,
            };
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_close() || socket.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, stop)
}
