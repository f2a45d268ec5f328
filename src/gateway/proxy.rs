//! One request through the front door: route, pick, forward, retry,
//! and answer; every failure becomes a small JSON error with the request
//! id, and every request ends in one access-log event and its metrics.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Body as HttpBody;
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::debug;

use super::balance::InFlight;
use super::headers::{REQUEST_ID, TRACEPARENT, set_forwarded, strip_hop_by_hop, tokens};
use super::pool::{Http1Pool, SendError};
use super::quiet::QuietLimit;
use super::watched::{Ending, Watched, Watcher};
use super::{ClientConnection, Gateway, Policy, UpstreamClient};
use crate::config::UpstreamProtocol;
use crate::telemetry::{Access, RouteLabel, RouteMeters, RouteStatus};

pub use crate::http_server::BoxError;
/// Every body the gateway sends or receives, boxed.
pub type Body = BoxBody<Bytes, BoxError>;

/// Why a request got no upstream response.
struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// What the access log and metrics record once the response is done.
struct Completion {
    gateway: Arc<Gateway>,
    route: Arc<str>,
    /// The matched route's metric handles; none when no route matched.
    meters: Option<Arc<RouteMeters>>,
    service: Arc<str>,
    instance: Option<Arc<str>>,
    status: u16,
    method: Method,
    /// Shares the request's bytes; no copy.
    uri: Uri,
    request_id: HeaderValue,
    started: Instant,
    /// Response body bytes sent so far.
    bytes: u64,
}

/// The record completes when the response body ends, or is dropped if
/// the client goes away.
impl Watcher for Completion {
    fn data(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
    }

    fn ended(self, how: Ending) {
        if how == Ending::Failed {
            self.gateway.count_error(&self.route, "body");
        }
        self.finish();
    }
}

impl Completion {
    fn finish(self) {
        let bytes = self.bytes;
        let seconds = self.started.elapsed().as_secs_f64();
        let access = Access {
            route: &self.route,
            service: &self.service,
            instance: self.instance.as_deref().unwrap_or("-"),
            status: self.status,
            method: self.method.as_str(),
            path: self.uri.path(),
            bytes,
            latency_ms: seconds * 1000.0,
            request_id: self.request_id.to_str().unwrap_or("-"),
        };
        access.log();
        let metrics = &self.gateway.metrics;
        match &self.meters {
            Some(meters) => meters.record(metrics, &self.route, self.status, seconds),
            None => {
                let status = RouteStatus {
                    route: self.route.clone(),
                    code: self.status,
                };
                metrics.gateway_requests.get_or_create(&status).inc();
                let route = RouteLabel { route: self.route };
                metrics
                    .gateway_duration
                    .get_or_create(&route)
                    .observe(seconds);
            }
        }
    }
}

/// Serves one request from `peer`.
pub async fn handle<B>(
    gateway: Arc<Gateway>,
    client: Arc<ClientConnection>,
    request: Request<B>,
) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let request_id = gateway.ids.request_id(request.headers());
    let policy = gateway.policy.load_full();
    let mut completion = Completion {
        gateway: gateway.clone(),
        route: gateway.unnamed.clone(),
        meters: None,
        service: gateway.unnamed.clone(),
        instance: None,
        status: 0,
        method: request.method().clone(),
        uri: request.uri().clone(),
        request_id: request_id.clone(),
        started,
        bytes: 0,
    };
    // A reverse proxy opens no tunnels to where clients name.
    if request.method() == Method::CONNECT {
        let failure = Failure::new(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied");
        return error_response(failure, completion);
    }
    let found = policy.table.find(
        request_host(&request),
        request.uri().path(),
        request.method(),
        request.headers(),
    );
    let Some((index, route)) = found else {
        let failure = Failure::new(StatusCode::NOT_FOUND, "no route matches this request");
        return error_response(failure, completion);
    };
    completion.route = route.name.clone();
    completion.meters = Some(policy.upstreams[index].meters.clone());
    completion.service = route.service.clone();
    let read_timeout = route.read_timeout;
    let outcome = forward(&gateway, &policy, index, &client, request_id, request).await;
    match outcome {
        Ok((response, instance)) => {
            completion.instance = Some(instance);
            completion.status = response.status().as_u16();
            response.map(|inner| {
                let limited = QuietLimit::new(inner, read_timeout);
                BoxBody::new(Watched::new(limited, completion))
            })
        }
        Err((failure, instance)) => {
            completion.instance = instance;
            error_response(failure, completion)
        }
    }
}

/// Host as the client addressed it (HTTP/1 Host or HTTP/2 authority).
fn request_host<B>(request: &Request<B>) -> Option<&str> {
    request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket and the like).
fn wants_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && tokens(request.headers(), header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

type Forwarded = Result<(Response<Body>, Arc<str>), (Failure, Option<Arc<str>>)>;

async fn forward<B>(
    gateway: &Gateway,
    policy: &Policy,
    index: usize,
    client: &ClientConnection,
    request_id: HeaderValue,
    mut request: Request<B>,
) -> Forwarded
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let route = &policy.table.routes()[index];
    let upstream = &policy.upstreams[index];
    let upgrade = wants_upgrade(&request);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    // Only a request without a body can be sent again.
    let replayable = body.is_end_stream();
    let retryable_method = is_idempotent(&parts.method);
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    strip_hop_by_hop(&mut parts.headers, upgrade);
    // Room for the six fields added below, so the map grows at most once.
    parts.headers.reserve(6);
    set_forwarded(
        &mut parts.headers,
        &client.peer,
        policy.trusts(client.peer.ip),
        original_host.as_ref(),
    );
    parts.headers.insert(REQUEST_ID, request_id.clone());
    let traceparent = gateway.ids.traceparent(&parts.headers, &request_id);
    parts.headers.insert(TRACEPARENT, traceparent);
    match route.upstream {
        UpstreamProtocol::Http1 => {
            if let Some(host) = route.host_rewrite.clone().or(original_host) {
                parts.headers.insert(header::HOST, host);
            }
        }
        // HTTP/2 carries the host as :authority, from the request's URI.
        UpstreamProtocol::H2 => {
            parts.headers.remove(header::HOST);
        }
    }
    let Some(path) = route.upstream_path(&parts.uri) else {
        return Err(unaddressable(None));
    };
    let attempts = if replayable { 1 + route.retries } else { 1 };
    let mut bare = match &upstream.client {
        UpstreamClient::Http1(pool) if replayable && !upgrade => {
            Some(BareRequest::new(pool, &mut parts, &path, retryable_method))
        }
        _ => None,
    };
    let mut body = Some(body);
    let mut tried: Vec<Arc<str>> = Vec::new();
    let mut last: Option<(Failure, Arc<str>)> = None;
    for attempt in 1..=attempts {
        let backends = gateway.backends(route, upstream).await;
        if backends.is_empty() {
            let message = format!("no healthy instance of service {:?}", route.service);
            return Err((Failure::new(StatusCode::SERVICE_UNAVAILABLE, message), None));
        }
        let Some(chosen) =
            upstream
                .picker
                .pick(&backends, &tried, &gateway.outliers, Instant::now())
        else {
            break;
        };
        let backend = &backends[chosen];
        tried.push(backend.key.clone());
        let stats = &backend.stats;
        let instance = || Some(backend.key.clone());
        // Counted in flight from here: an early return drops the count.
        let in_flight = InFlight::start(stats);
        let sent = match &mut bare {
            Some(bare) => {
                if !bare.address(&backend.authority) {
                    return Err(unaddressable(instance()));
                }
                tokio::time::timeout(route.timeout, bare.send(&backend.authority)).await
            }
            None => {
                let body = match body.take() {
                    Some(body) => body.map_err(Into::into).boxed(),
                    None => Empty::new().map_err(|never| match never {}).boxed(),
                };
                // Only an attempt that may be followed by another needs a copy.
                let headers = if attempt == attempts {
                    std::mem::take(&mut parts.headers)
                } else {
                    parts.headers.clone()
                };
                let outgoing = build_request(
                    &parts.method,
                    headers,
                    &backend.authority,
                    path.clone(),
                    route.upstream,
                    body,
                );
                let Some(outgoing) = outgoing else {
                    return Err(unaddressable(instance()));
                };
                let sending = upstream.client.send(&backend.authority, outgoing);
                tokio::time::timeout(route.timeout, sending).await
            }
        };
        drop(in_flight);
        let now = Instant::now();
        match sent {
            Err(_) => {
                gateway.outliers.record(stats, false, now);
                gateway.count_error(&route.name, "timeout");
                let failure = Failure::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the upstream did not answer in time",
                );
                return Err((failure, Some(backend.key.clone())));
            }
            Ok(Err(error)) => {
                gateway.outliers.record(stats, false, now);
                let connect = error.is_connect();
                gateway.count_error(&route.name, if connect { "connect" } else { "reset" });
                debug!(route = %route.name, instance = %backend.key, error = %error, "upstream attempt failed");
                let failure = Failure::new(
                    StatusCode::BAD_GATEWAY,
                    "the upstream failed before responding",
                );
                last = Some((failure, backend.key.clone()));
                if !(connect || retryable_method) {
                    break;
                }
            }
            Ok(Ok(mut response)) => {
                let success = !response.status().is_server_error();
                gateway.outliers.record(stats, success, now);
                if !success {
                    gateway.count_error(&route.name, "status_5xx");
                }
                let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                if let (true, Some(upgraded)) = (switching, client_upgrade) {
                    // The tunnel keeps the connection's place under the limit.
                    tunnel(
                        upgraded,
                        hyper::upgrade::on(&mut response),
                        client.slot.take(),
                    );
                    strip_hop_by_hop(response.headers_mut(), true);
                } else {
                    strip_hop_by_hop(response.headers_mut(), false);
                }
                response.headers_mut().insert(REQUEST_ID, request_id);
                return Ok((response, backend.key.clone()));
            }
        }
    }
    match last {
        Some((failure, instance)) => Err((failure, Some(instance))),
        None => Err((
            Failure::new(StatusCode::SERVICE_UNAVAILABLE, "no instance left to try"),
            None,
        )),
    }
}

/// No URI or Host can be made for the upstream (of `instance`, once one
/// was chosen).
fn unaddressable(instance: Option<Arc<str>>) -> (Failure, Option<Arc<str>>) {
    let failure = Failure::new(StatusCode::BAD_GATEWAY, "cannot address the upstream");
    (failure, instance)
}

/// A request without a body to an HTTP/1 upstream, sent through the
/// pool's own exchange, which borrows its head: every attempt sends the
/// same one, never a copy.
struct BareRequest<'a> {
    pool: &'a Http1Pool,
    head: Parts,
    /// The client named no host: each attempt names its instance.
    host_per_instance: bool,
    /// It may be sent again when a reused connection gives no answer.
    repeatable: bool,
}

impl<'a> BareRequest<'a> {
    /// Takes the method and the (prepared) headers from `parts`.
    fn new(pool: &'a Http1Pool, parts: &mut Parts, path: &PathAndQuery, repeatable: bool) -> Self {
        let mut head = Request::new(()).into_parts().0;
        head.method = parts.method.clone();
        head.uri = Uri::from(path.clone());
        head.headers = std::mem::take(&mut parts.headers);
        let host_per_instance = !head.headers.contains_key(header::HOST);
        Self {
            pool,
            head,
            host_per_instance,
            repeatable,
        }
    }

    /// Addresses the head to the instance at `authority`, where the
    /// client named no host; false if that cannot be a Host field.
    fn address(&mut self, authority: &Authority) -> bool {
        if !self.host_per_instance {
            return true;
        }
        let Some(host) = host_of(authority) else {
            return false;
        };
        self.head.headers.insert(header::HOST, host);
        true
    }

    async fn send(&self, authority: &Authority) -> Result<Response<Body>, SendError> {
        let pool = self.pool;
        pool.send_bare(authority, &self.head, self.repeatable).await
    }
}

/// The Host field naming the instance at `authority`; `None` if it cannot
/// be one.
fn host_of(authority: &Authority) -> Option<HeaderValue> {
    HeaderValue::from_str(authority.as_str()).ok()
}

/// The request to send: HTTP/1 in origin form (`/path?query`, with Host
/// set), HTTP/2 in absolute form (its `:authority` comes from the URI).
fn build_request(
    method: &Method,
    mut headers: hyper::HeaderMap,
    authority: &Authority,
    path: PathAndQuery,
    protocol: UpstreamProtocol,
    body: Body,
) -> Option<Request<Body>> {
    let mut uri = hyper::http::uri::Parts::default();
    let version = match protocol {
        UpstreamProtocol::Http1 => {
            if !headers.contains_key(header::HOST) {
                headers.insert(header::HOST, host_of(authority)?);
            }
            Version::HTTP_11
        }
        UpstreamProtocol::H2 => {
            uri.scheme = Some(hyper::http::uri::Scheme::HTTP);
            uri.authority = Some(authority.clone());
            Version::HTTP_2
        }
    };
    uri.path_and_query = Some(path);
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = Uri::from_parts(uri).ok()?;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Some(request)
}

/// Joins the client's and the upstream's upgraded connections.
fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    slot: Option<OwnedSemaphorePermit>,
) {
    tokio::spawn(async move {
        let _slot = slot;
        if let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream) {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    });
}

fn error_response(failure: Failure, mut completion: Completion) -> Response<Body> {
    completion.status = failure.status.as_u16();
    let request_id = completion.request_id.clone();
    let body = serde_json::json!({
        "error": failure.message,
        "request_id": request_id.to_str().unwrap_or(""),
    })
    .to_string();
    let body = Full::new(Bytes::from(body)).map_err(|never| match never {});
    let mut response = Response::new(BoxBody::new(Watched::new(body, completion)));
    *response.status_mut() = failure.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(REQUEST_ID, request_id);
    response
}
