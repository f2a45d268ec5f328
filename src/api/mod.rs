//! The HTTP API (axum): the native REST API over the registry.
//!
//! Owns routing, request parsing and response shapes. Every write goes
//! through `Registry::apply`; reads come from one snapshot each, so a
//! response is always consistent. Never holds registry state of its own.

mod body;
mod error;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use body::MAX_BODY;
pub use error::ApiError;

use crate::registry::validate::{instance_id, service_name};
use crate::registry::{Change, Instance, InstanceSpec, Registry, Service};
use body::JsonBody;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub started: Instant,
}

/// The API's routes over `state`; no sockets, so tests can call it directly.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/status", get(status))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{service}", get(get_service))
        .route(
            "/v1/services/{service}/instances/{id}",
            get(get_instance).put(put_instance).delete(delete_instance),
        )
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown`, then drains requests
/// in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

type InstancePath = Result<Path<(String, String)>, PathRejection>;
type ServicePath = Result<Path<String>, PathRejection>;

fn path_error(rejection: PathRejection) -> ApiError {
    ApiError::BadRequest {
        field: None,
        message: rejection.body_text(),
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "serving"}))
}

#[derive(Serialize)]
struct Status {
    version: &'static str,
    uptime_seconds: u64,
    index: u64,
    services: usize,
    instances: usize,
}

async fn status(State(state): State<AppState>) -> Json<Status> {
    let snapshot = state.registry.snapshot();
    Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        index: snapshot.version(),
        services: snapshot.service_count(),
        instances: snapshot.instance_count(),
    })
}

#[derive(Serialize)]
struct ServiceSummary<'a> {
    name: &'a str,
    instances: usize,
    healthy: usize,
}

async fn list_services(State(state): State<AppState>) -> Json<serde_json::Value> {
    let snapshot = state.registry.snapshot();
    let mut services: Vec<&Arc<Service>> = snapshot.services().collect();
    services.sort_unstable_by(|a, b| a.name().cmp(b.name()));
    let summaries: Vec<ServiceSummary<'_>> = services
        .iter()
        .map(|s| ServiceSummary {
            name: s.name(),
            instances: s.instances().len(),
            healthy: s.serving_count(),
        })
        .collect();
    Json(serde_json::json!(summaries))
}

#[derive(Serialize)]
struct ServiceView<'a> {
    name: &'a str,
    index: u64,
    instances: &'a [Arc<Instance>],
}

async fn get_service(
    State(state): State<AppState>,
    path: ServicePath,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(service) = path.map_err(path_error)?;
    let service = service_name(&service)?;
    let snapshot = state.registry.snapshot();
    let found = snapshot
        .service(&service)
        .ok_or_else(|| ApiError::NotFound(format!("service {service:?} is not registered")))?;
    Ok(Json(serde_json::json!(ServiceView {
        name: found.name(),
        index: found.index(),
        instances: found.instances(),
    })))
}

async fn get_instance(
    State(state): State<AppState>,
    path: InstancePath,
) -> Result<Json<Arc<Instance>>, ApiError> {
    let Path((service, id)) = path.map_err(path_error)?;
    let (service, id) = (service_name(&service)?, instance_id(&id)?);
    let snapshot = state.registry.snapshot();
    snapshot
        .service(&service)
        .and_then(|s| s.instance(&id))
        .cloned()
        .map(Json)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "instance {id:?} of service {service:?} is not registered"
            ))
        })
}

async fn put_instance(
    State(state): State<AppState>,
    path: InstancePath,
    JsonBody(spec): JsonBody<InstanceSpec>,
) -> Result<Json<Arc<Instance>>, ApiError> {
    let Path((service, id)) = path.map_err(path_error)?;
    let instance = spec.into_instance(&service, &id)?;
    let applied = state.registry.apply(Change::Register(instance))?;
    Ok(Json(applied.instance))
}

async fn delete_instance(
    State(state): State<AppState>,
    path: InstancePath,
) -> Result<StatusCode, ApiError> {
    let Path((service, id)) = path.map_err(path_error)?;
    let (service, id) = (service_name(&service)?, instance_id(&id)?);
    state.registry.apply(Change::Deregister { service, id })?;
    Ok(StatusCode::NO_CONTENT)
}
