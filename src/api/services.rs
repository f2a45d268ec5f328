//! Registration, deregistration and reads, including blocking queries
//! (`?index=N&wait=30s`) that return when a service's view changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::body::JsonBody;
use super::{
    ApiError, AppState, InstancePath, ServicePath, instance_key, not_registered, path_error,
};
use crate::registry::validate::service_name;
use crate::registry::{Change, Instance, InstanceSpec, Service, Snapshot};

/// The header carrying the index a blocking query can wait past.
pub const INDEX_HEADER: HeaderName = HeaderName::from_static("x-muster-index");
/// How long a blocking query waits when it names no `wait`.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// The longest a blocking query waits.
const MAX_WAIT: Duration = Duration::from_secs(600);

pub async fn health() -> Json<serde_json::Value> {
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

pub async fn status(State(state): State<AppState>) -> Json<impl Serialize> {
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

pub async fn list(State(state): State<AppState>) -> Json<serde_json::Value> {
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

/// `?healthy=true&index=N&wait=30s`, each optional.
struct ShowQuery {
    healthy: bool,
    index: Option<u64>,
    wait: Duration,
}

impl ShowQuery {
    fn parse(
        query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ) -> Result<Self, ApiError> {
        let Query(params) = query.map_err(|e| ApiError::BadRequest {
            field: None,
            message: e.body_text(),
        })?;
        let bad = |field: &str, message: String| ApiError::BadRequest {
            field: Some(field.into()),
            message: format!("{field}: {message}"),
        };
        let healthy = match params.get("healthy").map(String::as_str) {
            None | Some("false") => false,
            Some("true" | "") => true,
            Some(other) => return Err(bad("healthy", format!("{other:?} is not true or false"))),
        };
        let index = params
            .get("index")
            .map(|i| {
                i.parse::<u64>()
                    .map_err(|_| bad("index", format!("{i:?} is not an index")))
            })
            .transpose()?;
        let wait = params
            .get("wait")
            .map(|w| {
                humantime::parse_duration(w)
                    .map_err(|_| bad("wait", format!("{w:?} is not a duration like \"30s\"")))
            })
            .transpose()?
            .unwrap_or(DEFAULT_WAIT)
            .min(MAX_WAIT);
        Ok(Self {
            healthy,
            index,
            wait,
        })
    }
}

#[derive(Serialize)]
struct ServiceView<'a> {
    name: &'a str,
    index: u64,
    instances: Vec<&'a Arc<Instance>>,
}

/// A service with its instances. With `index`, waits until the service's
/// view has changed past it (or `wait` ends) before answering.
pub async fn show(
    State(state): State<AppState>,
    path: ServicePath,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(service) = path.map_err(path_error)?;
    let service = service_name(&service)?;
    let query = ShowQuery::parse(query)?;
    let snapshot = match query.index {
        Some(index) => wait_for_change(&state, &service, index, query.wait).await,
        None => state.registry.snapshot(),
    };
    let index = view_index(&snapshot, &service);
    let Some(found) = snapshot.service(&service) else {
        let error = ApiError::NotFound(format!("service {service:?} is not registered"));
        return Ok(with_index(error.into_response(), index));
    };
    let view = ServiceView {
        name: found.name(),
        index,
        instances: found
            .instances()
            .iter()
            .filter(|i| !query.healthy || found.serves(i))
            .collect(),
    };
    Ok(with_index(Json(view).into_response(), index))
}

/// The index of `service`'s view: when it last changed, or, while it is
/// not registered, the registry's version (so its removal is a change).
fn view_index(snapshot: &Snapshot, service: &str) -> u64 {
    snapshot
        .service(service)
        .map_or(snapshot.version(), |s| s.index())
}

async fn wait_for_change(
    state: &AppState,
    service: &str,
    index: u64,
    wait: Duration,
) -> Arc<Snapshot> {
    let mut versions = state.registry.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let snapshot = state.registry.snapshot();
        // An index from the future (a restarted muster) answers at once.
        if view_index(&snapshot, service) > index || index > snapshot.version() {
            return snapshot;
        }
        tokio::select! {
            changed = versions.changed() => if changed.is_err() { return snapshot },
            () = tokio::time::sleep_until(deadline) => return snapshot,
        }
    }
}

fn with_index(mut response: Response, index: u64) -> Response {
    response
        .headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index));
    response
}

pub async fn get_instance(
    State(state): State<AppState>,
    path: InstancePath,
) -> Result<Json<Arc<Instance>>, ApiError> {
    let key = instance_key(path)?;
    state
        .registry
        .snapshot()
        .instance(&key.service, &key.id)
        .cloned()
        .map(Json)
        .ok_or_else(|| not_registered(&key))
}

pub async fn register(
    State(state): State<AppState>,
    path: InstancePath,
    JsonBody(spec): JsonBody<InstanceSpec>,
) -> Result<Json<Arc<Instance>>, ApiError> {
    let Path((service, id)) = path.map_err(path_error)?;
    let instance = spec.into_instance(&service, &id)?;
    let applied = state
        .registry
        .apply(Change::Register(Box::new(instance)))
        .await?;
    Ok(Json(applied.instance))
}

pub async fn deregister(
    State(state): State<AppState>,
    path: InstancePath,
) -> Result<StatusCode, ApiError> {
    let key = instance_key(path)?;
    state
        .registry
        .apply(Change::Deregister {
            service: key.service,
            id: key.id,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
