//! Heartbeats and maintenance: how an instance reports its own health and
//! how an operator drains it for a deploy.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use serde::Deserialize;

use super::body::{JsonBody, OptionalJsonBody};
use super::{ApiError, AppState, InstancePath, instance_key, not_registered};
use crate::registry::health::HeartbeatError;
use crate::registry::{
    Change, CheckKind, Health, HealthStatus, Instance, InstanceKey, Maintenance,
};

/// Longest maintenance reason accepted.
const MAX_REASON: usize = 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    status: Option<HealthStatus>,
    output: Option<String>,
}

/// `PUT …/heartbeat`: restarts a TTL check's clock and reports a status
/// (passing by default). For an instance without a check the status is
/// taken as it is. 404 tells the client to register again.
pub async fn heartbeat(
    State(state): State<AppState>,
    path: InstancePath,
    OptionalJsonBody(body): OptionalJsonBody<HeartbeatBody>,
) -> Result<Json<Arc<Instance>>, ApiError> {
    let key = instance_key(path)?;
    let instance = current(&state, &key)?;
    let status = body.status.unwrap_or(HealthStatus::Passing);
    let output = body.output.unwrap_or_default();
    match instance.check.as_ref().map(|c| &c.kind) {
        None => {
            state
                .registry
                .apply(Change::SetHealth {
                    service: key.service.clone(),
                    id: key.id.clone(),
                    generation: instance.generation,
                    health: Health::now(status, output),
                })
                .await?;
        }
        Some(CheckKind::Ttl { .. }) => {
            state
                .health
                .heartbeat(key.clone(), status, output)
                .await
                .map_err(|e| heartbeat_error(e, &key))?;
        }
        Some(CheckKind::Http { .. } | CheckKind::Tcp { .. }) => {
            return Err(heartbeat_error(HeartbeatError::NotTtlChecked, &key));
        }
    }
    current(&state, &key).map(Json)
}

fn heartbeat_error(error: HeartbeatError, key: &InstanceKey) -> ApiError {
    match error {
        HeartbeatError::NotTtlChecked => ApiError::Conflict {
            field: Some("check".into()),
            message: format!(
                "instance {:?} of service {:?} is checked by muster; heartbeats are for ttl checks",
                key.id, key.service
            ),
        },
        HeartbeatError::Stopped => ApiError::Unavailable("the health checker is stopping".into()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceBody {
    enabled: bool,
    reason: Option<String>,
}

/// `PUT …/maintenance`: drains the instance from DNS (and the gateway)
/// while it stays registered, or puts it back.
pub async fn maintenance(
    State(state): State<AppState>,
    path: InstancePath,
    JsonBody(body): JsonBody<MaintenanceBody>,
) -> Result<Json<Arc<Instance>>, ApiError> {
    let key = instance_key(path)?;
    let reason = body.reason.unwrap_or_default();
    if reason.len() > MAX_REASON {
        return Err(ApiError::BadRequest {
            field: Some("reason".into()),
            message: format!("reason: longer than {MAX_REASON} bytes"),
        });
    }
    let maintenance = body.enabled.then(|| Maintenance {
        reason,
        since: SystemTime::now(),
    });
    let applied = state
        .registry
        .apply(Change::SetMaintenance {
            service: key.service,
            id: key.id,
            maintenance,
        })
        .await?;
    Ok(Json(applied.instance))
}

fn current(state: &AppState, key: &InstanceKey) -> Result<Arc<Instance>, ApiError> {
    state
        .registry
        .snapshot()
        .instance(&key.service, &key.id)
        .cloned()
        .ok_or_else(|| not_registered(key))
}
