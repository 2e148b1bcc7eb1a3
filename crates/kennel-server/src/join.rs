//! One-time join tokens for build agents. An admin mints one (`kennel agent-tokens create`);
//! the agent exchanges it, once and before it expires, for an API key of its own with the
//! `agent` scope. The token is the only credential of the exchange, so that call needs no key;
//! the store keeps its keyed hash, never the token.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use kennel_proto::api::{
    CreateJoinToken, CreatedJoinToken, CreatedKey, ErrorBody, ExchangeJoinToken, JoinedAgent, Scope,
};
use kennel_store::{rfc3339, Redeem};
use utoipa::OpenApi;

use crate::api::{property, text, JsonBody, NOT_BLANK};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::AppState;

type AppResult<T> = Result<T, ApiError>;
type S = State<Arc<AppState>>;

const DEFAULT_TTL_SECS: u64 = 3_600;
const MAX_TTL_SECS: u64 = 30 * 24 * 3_600;
const MAX_NAME: usize = 100;

#[derive(OpenApi)]
#[openapi(paths(create_join_token, exchange_join_token), modifiers(&JoinConstraints))]
pub struct JoinDoc;

struct JoinConstraints;

impl utoipa::Modify for JoinConstraints {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        let schemas = &mut components.schemas;
        if let Some(o) = property(schemas, "CreateJoinToken", "name") {
            text(o, 1, MAX_NAME, Some(NOT_BLANK));
        }
        if let Some(o) = property(schemas, "CreateJoinToken", "ttlSecs") {
            o.minimum = Some(1.into());
            o.maximum = Some(MAX_TTL_SECS.into());
        }
    }
}

/// Mint a one-time join token for a build agent (admin).
#[utoipa::path(post, path = "/api/v1/agent-tokens", request_body = CreateJoinToken, tag = "stories",
    responses(
        (status = 201, description = "the token, shown once", body = CreatedJoinToken),
        (status = 400, description = "the body is invalid", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn create_join_token(
    p: Principal,
    State(app): S,
    body: Result<JsonBody<CreateJoinToken>, ApiError>,
) -> AppResult<(StatusCode, Json<CreatedJoinToken>)> {
    p.require(&[])?;
    let JsonBody(req) = body?;
    if req.name.trim().is_empty() || req.name.chars().count() > MAX_NAME {
        return Err(ApiError::invalid(format!(
            "`name` must be 1 to {MAX_NAME} characters, not all blank"
        )));
    }
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::invalid(format!(
            "`ttlSecs` {ttl} is out of range: 1 to {MAX_TTL_SECS}"
        )));
    }
    let token = kennel_auth::new_join_token();
    let id = kennel_auth::join_token_id(&token)
        .ok_or_else(|| ApiError::internal("a new join token has no id"))?
        .to_string();
    let now = app.clock.now_ms();
    let expires_at = now + (ttl as i64) * 1000;
    let hash = kennel_auth::hex(&app.keys.hash(&token));
    app.agents
        .create_join_token(&id, &req.name, &hash, expires_at, now)
        .await?;
    tracing::info!(token_id = %id, name = %req.name, "join token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedJoinToken {
            token,
            id,
            name: req.name,
            expires_at: rfc3339(expires_at),
        }),
    ))
}

/// Exchange a join token for an `agent` key (once; no key needed: the token is the
/// credential).
#[utoipa::path(post, path = "/api/v1/agent-tokens/exchange", request_body = ExchangeJoinToken,
    tag = "stories", security(()),
    responses(
        (status = 201, description = "the agent's key, shown once, and the mesh secret", body = JoinedAgent),
        (status = 400, description = "the body is invalid", body = ErrorBody),
        (status = 401, description = "the token is unknown, used or expired", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
        (status = 503, description = "the coordinator's store failed; retry", body = ErrorBody),
    ))]
pub async fn exchange_join_token(
    State(app): S,
    body: Result<JsonBody<ExchangeJoinToken>, ApiError>,
) -> AppResult<(StatusCode, Json<JoinedAgent>)> {
    let JsonBody(req) = body?;
    let refused = || ApiError::unauthorized("unknown join token; ask an admin for a new one");
    let id = kennel_auth::join_token_id(&req.token).ok_or_else(refused)?;
    let stored = app.agents.join_token_hash(id).await?.ok_or_else(refused)?;
    if !app.keys.matches(&req.token, &decode_hex(&stored)) {
        return Err(refused());
    }
    let now = app.clock.now_ms();
    let (key, record) = app
        .keys
        .mint("agent (joined)", vec![Scope::Agent], rfc3339(now));
    match app
        .agents
        .redeem_join_token(id, &record.info.id, now)
        .await?
    {
        Redeem::Taken { name } => {
            let record = kennel_store::KeyRecord {
                info: kennel_proto::api::ApiKey {
                    name: format!("agent {name}"),
                    ..record.info
                },
                ..record
            };
            app.store.insert_key(&record).await?;
            tracing::info!(token_id = %id, key_id = %record.info.id, "join token exchanged");
            Ok((
                StatusCode::CREATED,
                Json(JoinedAgent {
                    created: CreatedKey {
                        key,
                        info: record.info,
                    },
                    mesh_secret: app
                        .rendezvous
                        .as_ref()
                        .map(|rv| rv.mesh_secret().to_string()),
                }),
            ))
        }
        Redeem::Used => Err(ApiError::unauthorized(
            "this join token was used already; ask an admin for a new one",
        )),
        Redeem::Expired => Err(ApiError::unauthorized(
            "this join token expired; ask an admin for a new one",
        )),
        Redeem::Unknown => Err(refused()),
    }
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// The routes of this module, under `/api/v1`.
pub fn routes() -> axum::Router<Arc<AppState>> {
    use axum::routing::post;
    axum::Router::new()
        .route("/agent-tokens", post(create_join_token))
        .route("/agent-tokens/exchange", post(exchange_join_token))
}
