//! API keys at the coordinator's HTTP edge: the `Principal` extractor that reads the key of a
//! request and verifies it, and the mapping of a missing scope to 403. Everything else about
//! keys (format, minting, keyed hashing, constant-time comparison, verification against the
//! store, scopes, recovery) is `kennel_auth`, re-exported here.
//!
//! Keys are never logged: a [`Principal`] carries the id only.

use std::ops::Deref;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

pub use kennel_auth::{key_id, write_private, KeyRing, MissingScope};
pub use kennel_auth::{RecoverError, Recovered};

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::AppState;

/// The verified caller of a request, as an axum extractor: a [`kennel_auth::Principal`]
/// (which it derefs to) read from `Authorization: Bearer <key>` or `X-Api-Key: <key>`. A
/// wrapper because the extractor trait and the principal both belong to other crates.
#[derive(Debug, Clone)]
pub struct Principal(pub kennel_auth::Principal);

impl Deref for Principal {
    type Target = kennel_auth::Principal;

    fn deref(&self) -> &kennel_auth::Principal {
        &self.0
    }
}

impl From<MissingScope> for ApiError {
    fn from(e: MissingScope) -> Self {
        ApiError::forbidden(e.to_string())
    }
}

/// Mints a new admin key straight into the store of `cfg.data_dir`, hashed with the server's
/// hash key ([`kennel_auth::recover_admin`]).
pub async fn recover_admin(cfg: &ServerConfig, now_ms: i64) -> Result<Recovered, RecoverError> {
    kennel_auth::recover_admin(&cfg.data_dir, &cfg.auth, now_ms).await
}

/// The key presented with a request: `Authorization: Bearer <key>` or `X-Api-Key: <key>`.
pub fn presented_key(parts: &Parts) -> Option<&str> {
    if let Some(v) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        return v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim);
    }
    parts
        .headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

impl FromRequestParts<Arc<AppState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(key) = presented_key(parts) else {
            return Err(ApiError::unauthorized(
                "missing API key: send `Authorization: Bearer <key>` (kennel keys create makes one)",
            ));
        };
        match state
            .keys
            .verify(state.store.as_ref(), key, state.clock.now_ms())
            .await?
        {
            Some(p) => Ok(Principal(p)),
            None => Err(ApiError::unauthorized(
                "invalid or revoked API key: check the key, or ask an admin for a new one",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use kennel_proto::api::Scope;

    #[test]
    fn a_missing_scope_is_forbidden() {
        let client = Principal(kennel_auth::Principal {
            key_id: "y".into(),
            scopes: vec![Scope::Client],
        });
        let err = ApiError::from(client.require(&[Scope::Daemon]).unwrap_err());
        assert_eq!(err.status, StatusCode::FORBIDDEN);
        assert!(err.message.contains("needs one of: admin, daemon"), "{err}");
    }

    #[test]
    fn keys_are_read_from_either_header() {
        let parts = |name: &str, value: &str| {
            axum::http::Request::builder()
                .header(name, value)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        assert_eq!(
            presented_key(&parts("authorization", "Bearer kn_a ")),
            Some("kn_a")
        );
        assert_eq!(
            presented_key(&parts("authorization", "bearer kn_a")),
            Some("kn_a")
        );
        assert_eq!(presented_key(&parts("authorization", "Basic x")), None);
        assert_eq!(presented_key(&parts("x-api-key", " kn_b")), Some("kn_b"));
    }
}
