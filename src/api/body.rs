//! Request bodies: JSON only, at most [`MAX_BODY`] bytes, parsed so that
//! every error names the field it is about.

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// A JSON body of type `T`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = read_limited(request).await?;
        parse(&bytes).map(JsonBody)
    }
}

/// A JSON body of type `T`, or `T::default()` when the body is empty.
pub struct OptionalJsonBody<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let json = is_json(request.headers());
        let bytes = read_limited(request).await?;
        if bytes.is_empty() {
            return Ok(Self(T::default()));
        }
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        parse(&bytes).map(OptionalJsonBody)
    }
}

async fn read_limited(request: Request) -> Result<axum::body::Bytes, ApiError> {
    if declared_length(request.headers()).is_some_and(|l| l > MAX_BODY) {
        return Err(ApiError::TooLarge { limit: MAX_BODY });
    }
    axum::body::to_bytes(request.into_body(), MAX_BODY)
        .await
        .map_err(|_| ApiError::TooLarge { limit: MAX_BODY })
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Parses `bytes` as `T`, naming the field where parsing failed.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let message = e.inner().to_string();
        ApiError::BadRequest {
            field: crate::field_path::field_of(&e.path().to_string(), &message),
            message,
        }
    })?;
    deserializer.end().map_err(|e| ApiError::BadRequest {
        field: None,
        message: e.to_string(),
    })?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::InstanceSpec;

    fn field(json: &str) -> Option<String> {
        match parse::<InstanceSpec>(json.as_bytes()) {
            Err(ApiError::BadRequest { field, .. }) => field,
            other => panic!("expected a bad request, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn parse_errors_name_the_field() {
        assert_eq!(field(r#"{"port": 80}"#).as_deref(), Some("address"));
        assert_eq!(
            field(r#"{"address": "10.0.0.1", "port": "80"}"#).as_deref(),
            Some("port")
        );
        assert_eq!(
            field(r#"{"address": "10.0.0.1", "port": 80, "colour": 1}"#).as_deref(),
            Some("colour")
        );
        assert_eq!(
            field(r#"{"address": "10.0.0.1", "port": 80, "meta": {"a": 1}}"#).as_deref(),
            Some("meta.a")
        );
        assert_eq!(
            field(r#"{"address": "10.0.0.1", "port": 80, "ports": {"x": {"port": 1, "proto": "udp"}}}"#)
                .as_deref(),
            Some("ports.x")
        );
        assert_eq!(field("{"), None);
        assert_eq!(field(r#"{"address": "10.0.0.1", "port": 80} x"#), None);
    }
}
