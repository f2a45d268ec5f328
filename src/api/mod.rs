//! The HTTP API (axum): the native REST API over the registry.
//!
//! Owns routing, request parsing and response shapes. Every write goes
//! through `Registry::apply` (heartbeats through the health checker,
//! which applies them); reads come from one snapshot each, so a response
//! is always consistent. Never holds registry state of its own.

mod body;
mod error;
mod health;
mod services;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, put};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use body::MAX_BODY;
pub use error::ApiError;

use crate::http_server;
use crate::registry::health::HealthHandle;
use crate::registry::validate::{instance_id, service_name};
use crate::registry::{InstanceKey, Registry};
use crate::telemetry::Metrics;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub health: HealthHandle,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
}

/// The API's routes over `state`; no sockets, so tests can call it directly.
pub fn router(state: AppState) -> Router {
    let instance = "/v1/services/{service}/instances/{id}";
    Router::new()
        .route("/health", get(services::health))
        .route("/v1/status", get(services::status))
        .route("/metrics", get(metrics))
        .route("/v1/services", get(services::list))
        .route("/v1/services/{service}", get(services::show))
        .route(
            instance,
            get(services::get_instance)
                .put(services::register)
                .delete(services::deregister),
        )
        .route(&format!("{instance}/heartbeat"), put(health::heartbeat))
        .route(&format!("{instance}/maintenance"), put(health::maintenance))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}

/// Serves `router` on `listener`, `max_connections` at a time, until
/// `shutdown`, then drains requests in flight (up to a bound).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    max_connections: usize,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = http_server::Limits::serving(max_connections);
    http_server::serve(listener, limits, shutdown, "api", |_peer, _slot| {
        ApiHandler(TowerToHyperService::new(router.clone()))
    })
    .await
}

/// The router, as the HTTP servers call it.
#[derive(Clone)]
struct ApiHandler(TowerToHyperService<Router>);

impl http_server::Handler for ApiHandler {
    type Body = axum::body::Body;

    fn handle<B>(
        &self,
        request: axum::http::Request<B>,
    ) -> impl Future<Output = axum::http::Response<axum::body::Body>> + Send
    where
        B: hyper::body::Body<Data = bytes::Bytes, Error: Into<http_server::BoxError>>
            + Send
            + Sync
            + 'static,
    {
        let routed = hyper::service::Service::call(&self.0, request);
        async move {
            match routed.await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    }
}

/// Prometheus metrics in the OpenMetrics text format.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, Metrics::CONTENT_TYPE)],
        state.metrics.encode(),
    )
}

type InstancePath = Result<Path<(String, String)>, PathRejection>;
type ServicePath = Result<Path<String>, PathRejection>;

/// The validated `{service}/{id}` of an instance path.
fn instance_key(path: InstancePath) -> Result<InstanceKey, ApiError> {
    let Path((service, id)) = path.map_err(path_error)?;
    Ok(InstanceKey {
        service: service_name(&service)?,
        id: instance_id(&id)?,
    })
}

fn path_error(rejection: PathRejection) -> ApiError {
    ApiError::BadRequest {
        field: None,
        message: rejection.body_text(),
    }
}

fn not_registered(key: &InstanceKey) -> ApiError {
    ApiError::NotFound(format!(
        "instance {:?} of service {:?} is not registered",
        key.id, key.service
    ))
}
