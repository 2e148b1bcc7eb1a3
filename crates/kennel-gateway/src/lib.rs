//! `kennel gateway`: an OpenAI- and Anthropic-compatible LLM router. It sits in front of
//! several upstream providers, keeps per-upstream health with cooldowns, fails over before
//! the first byte reaches the client, relays streams unbuffered, watches the local agent's
//! heartbeats and records incidents. Clients authenticate with kennel API keys (scope
//! `gateway` or `admin`) from the kennel store in the same data directory.
//!
//! This crate does not parse command lines or config files (the binary does) and never logs
//! a key: neither the client's nor an upstream's.

pub mod config;
pub mod error;
pub mod health;
pub mod metrics;
mod proxy;
mod ratelimit;
pub mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kennel_auth::{AuthConfig, KeyRing};
use kennel_clock::{Clock, SystemClock};
use kennel_proto::api::Scope;
use kennel_store::{rfc3339, GatewayStore, SqliteStore, Store};
use serde_json::{json, Value};

pub use config::{GatewayConfig, UpstreamConfig, UpstreamKind};
use error::{ApiFormat, GatewayError};
use health::FailureClass;
use metrics::Metrics;
use state::{GatewayState, Heartbeat, Incident};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("failed to use the data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to open the kennel store for API keys")]
    Store(#[from] kennel_store::StoreError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(
        "upstream {upstream}: the environment variable {var} (its api_key_env) is not set; \
         export it or remove api_key_env"
    )]
    MissingKey { upstream: String, var: String },
    #[error("upstream {upstream}: failed to build its HTTP client")]
    Client {
        upstream: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("failed to listen on {addr} (pick another address with --listen)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the gateway's listener failed")]
    Serve(#[source] std::io::Error),
}

/// One upstream, ready to use.
pub(crate) struct Upstream {
    pub(crate) cfg: UpstreamConfig,
    pub(crate) client: reqwest::Client,
    /// The key read from `api_key_env`; never logged.
    pub(crate) key: Option<String>,
}

/// What every handler can reach.
pub(crate) struct Shared {
    pub(crate) cfg: GatewayConfig,
    pub(crate) upstreams: Vec<Upstream>,
    pub(crate) state: Arc<GatewayState>,
    pub(crate) metrics: Metrics,
    pub(crate) clock: Arc<dyn Clock>,
    store: Arc<dyn Store>,
    keys: KeyRing,
    limiter: Option<ratelimit::KeyedLimiter>,
}

impl Shared {
    /// Checks the presented kennel key (scope `gateway`, or `admin` when `admin`) and the
    /// key's rate limit.
    pub(crate) async fn authorize(
        &self,
        headers: &HeaderMap,
        format: ApiFormat,
        admin: bool,
    ) -> Result<(), GatewayError> {
        let unauthorized = |m: &str| {
            GatewayError::new(
                format,
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                m.to_string(),
            )
        };
        let key = presented_key(headers).ok_or_else(|| {
            unauthorized(
                "no API key; send a kennel key with scope gateway as `Authorization: Bearer <key>` \
                 or `x-api-key: <key>` (create one with `kennel keys create --scope gateway`)",
            )
        })?;
        let principal = self
            .keys
            .verify(self.store.as_ref(), key, self.clock.now_ms())
            .await
            .map_err(|e| {
                GatewayError::new(
                    format,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "api_error",
                    format!("the key store is unavailable ({e}); retry shortly"),
                )
            })?
            .ok_or_else(|| {
                unauthorized("unknown or revoked API key; check the key or create a new one")
            })?;
        let allowed: &[Scope] = if admin { &[] } else { &[Scope::Gateway] };
        principal.require(allowed).map_err(|_| {
            GatewayError::new(
                format,
                StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "key {} lacks the scope for this call; it needs {}",
                    principal.key_id,
                    if admin { "admin" } else { "gateway or admin" }
                ),
            )
        })?;
        if let Some(limiter) = &self.limiter {
            if let Err(wait) = limiter.check(&principal.key_id, std::time::Instant::now()) {
                let mut e = GatewayError::new(
                    format,
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    format!(
                        "key {} exceeded gateway.rate_limit; retry in {} ms",
                        principal.key_id,
                        wait.as_millis()
                    ),
                );
                e.retry_after = Some(wait.as_secs().max(1));
                return Err(e);
            }
        }
        Ok(())
    }

    /// An answer from `name` for the client's `model`.
    pub(crate) fn record_success(&self, name: &str, model: &str, latency: Duration) {
        let now = self.clock.now_ms();
        let mut s = self.state.lock();
        let h = s.health.entry(name.to_string()).or_default();
        h.record_success(model, latency, now);
        self.state.mark_health(&mut s, name);
    }

    /// An answer that is neither success nor failure (a 4xx): only the request count moves.
    pub(crate) fn record_neutral(&self, name: &str) {
        let mut s = self.state.lock();
        self.state.mark_health(&mut s, name);
    }

    pub(crate) fn record_failure(&self, name: &str, failure: health::Failure<'_>) {
        let now = self.clock.now_ms();
        self.metrics.failure(name, failure.class);
        let mut s = self.state.lock();
        let h = s.health.entry(name.to_string()).or_default();
        let d = h.record_failure(failure, &self.cfg.cooldowns, now);
        self.state.save_health(name, h);
        s.totals.failures += 1;
        self.state.save_totals(&s.totals);
        if failure.class == FailureClass::NotFound {
            tracing::info!(upstream = %name, model = %failure.model, cooldown_ms = d.as_millis() as u64, "upstream does not serve the model; skipping it for that model");
        } else {
            tracing::info!(upstream = %name, class = failure.class.as_str(), cooldown_ms = d.as_millis() as u64, "upstream cooling down");
        }
    }
}

/// The key presented with a request: `Authorization: Bearer <key>` or `x-api-key: <key>`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        return v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim);
    }
    headers.get("x-api-key")?.to_str().ok().map(str::trim)
}

/// A gateway bound to its address, ready to serve.
pub struct Gateway {
    pub addr: SocketAddr,
    /// An admin key created because the store had none (print it once).
    pub new_admin_key: Option<String>,
    listener: tokio::net::TcpListener,
    router: Router,
    shared: Arc<Shared>,
}

impl Gateway {
    /// Opens the stores in `data_dir`, builds the upstream clients and binds `cfg.listen`.
    /// `auth` is the server's `[server.auth]`: keys hash the same way on both, and a
    /// configured admin key is accepted here too.
    pub async fn start(
        cfg: GatewayConfig,
        data_dir: &Path,
        auth: &AuthConfig,
    ) -> Result<Gateway, StartError> {
        cfg.validate()?;
        let data_err = |source| StartError::DataDir {
            path: data_dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(data_err)?;
        let store = Arc::new(SqliteStore::open(&data_dir.join("kennel.db")).await?);
        Self::start_with_store(cfg, data_dir, auth, store.clone(), store).await
    }

    /// Like [`Gateway::start`], verifying keys against a store that is already open and
    /// keeping its state in `state` (the coordinator's database, when embedded in `kennel up`).
    pub async fn start_with_store(
        cfg: GatewayConfig,
        data_dir: &Path,
        auth: &AuthConfig,
        store: Arc<dyn Store>,
        state: Arc<dyn GatewayStore>,
    ) -> Result<Gateway, StartError> {
        Self::start_with_clock(cfg, data_dir, auth, store, state, Arc::new(SystemClock)).await
    }

    /// [`Gateway::start_with_store`] with cooldowns, heartbeats and records timed on `clock`.
    pub async fn start_with_clock(
        cfg: GatewayConfig,
        data_dir: &Path,
        auth: &AuthConfig,
        store: Arc<dyn Store>,
        state: Arc<dyn GatewayStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Gateway, StartError> {
        cfg.validate()?;
        let data_err = |source| StartError::DataDir {
            path: data_dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(data_err)?;
        let keys = KeyRing::new(
            KeyRing::load_hash_key(auth.hash_key.as_deref(), data_dir).map_err(data_err)?,
        );
        if let Some(k) = &auth.admin_key {
            if store.find_key(&kennel_auth::key_id(k)).await?.is_none() {
                if let Some(rec) = keys.record_for(
                    k,
                    "configured admin",
                    vec![Scope::Admin],
                    rfc3339(clock.now_ms()),
                ) {
                    store.insert_key(&rec).await?;
                }
            }
        }
        let new_admin_key = if auth.admin_key.is_none() && store.count_keys().await? == 0 {
            let (key, rec) = keys.mint("admin", vec![Scope::Admin], rfc3339(clock.now_ms()));
            store.insert_key(&rec).await?;
            kennel_auth::write_private(&data_dir.join("admin.key"), &key).map_err(data_err)?;
            Some(key)
        } else {
            None
        };
        let mut upstreams = Vec::new();
        for u in cfg.resolved_upstreams(|k| std::env::var(k).ok()) {
            let key = match &u.api_key_env {
                Some(var) => Some(std::env::var(var).map_err(|_| StartError::MissingKey {
                    upstream: u.name.clone(),
                    var: var.clone(),
                })?),
                None => None,
            };
            let client = reqwest::Client::builder()
                .connect_timeout(u.connect_timeout())
                .tcp_nodelay(true)
                .build()
                .map_err(|source| StartError::Client {
                    upstream: u.name.clone(),
                    source,
                })?;
            upstreams.push(Upstream {
                cfg: u,
                client,
                key,
            });
        }
        if upstreams.is_empty() {
            tracing::warn!(
                "no upstreams configured: add [[gateway.upstreams]] to kennel.toml or set \
                 ZEPTOCLAW_GATEWAY_URL; every model request will get 404"
            );
        }
        let limiter = ratelimit::KeyedLimiter::new(cfg.rate_limit.per_minute, cfg.rate_limit.burst);
        let state = GatewayState::open(state, cfg.max_kept_report_bytes).await?;
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            upstreams,
            state,
            metrics: Metrics::default(),
            clock,
            store,
            keys,
            limiter,
        });
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(StartError::Serve)?;
        Ok(Gateway {
            addr,
            new_admin_key,
            listener,
            router: router(shared.clone()),
            shared,
        })
    }

    /// Serves until `shutdown` resolves, then flushes the state to disk. Slow, idle and
    /// surplus connections are closed per `[gateway.http]` (`kennel_http::serve`).
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let watch = tokio::spawn(watch_heartbeats(self.shared.clone()));
        let writer = tokio::spawn(self.shared.state.clone().write_behind());
        let result = kennel_http::serve(
            self.listener,
            self.router,
            &self.shared.cfg.http,
            2,
            shutdown,
        )
        .await
        .map_err(StartError::Serve);
        watch.abort();
        writer.abort();
        self.shared.state.flush().await;
        result
    }
}

/// Every route of the gateway.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/reset", post(reset))
        .route("/heartbeat", post(heartbeat))
        .route("/state", get(get_state))
        .route("/state/reset", post(reset_state))
        .route("/gateway/incident", post(add_incident))
        .route("/gateway/incidents", get(incidents))
        .route("/gateway/incidents/clear", post(clear_incidents))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

type S = State<Arc<Shared>>;

async fn chat_completions(State(s): S, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let path = "/chat/completions";
    match proxy::forward(s, ApiFormat::Openai, path, uri.query(), headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn messages(State(s): S, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let path = "/v1/messages";
    match proxy::forward(s, ApiFormat::Anthropic, path, uri.query(), headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Claude Code asks for token counts; they go to Anthropic upstreams like messages do.
async fn count_tokens(State(s): S, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let path = "/v1/messages/count_tokens";
    match proxy::forward(s, ApiFormat::Anthropic, path, uri.query(), headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/models`: the models named in the upstreams' allow-lists and renames.
async fn models(State(s): S, headers: HeaderMap) -> Result<Json<Value>, GatewayError> {
    s.authorize(&headers, ApiFormat::Openai, false).await?;
    let mut seen = std::collections::BTreeMap::new();
    for u in &s.upstreams {
        for m in u.cfg.models.iter().chain(u.cfg.renames.keys()) {
            seen.entry(m.clone()).or_insert_with(|| u.cfg.name.clone());
        }
    }
    let data: Vec<Value> = seen
        .into_iter()
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `GET /health` (no auth): every upstream's health: whether it is cooling down, for how
/// much longer (`cooldownRemainingMs`), and why (`health.lastFailureClass`, `lastError`,
/// per-model 404 cooldowns in `modelCooldowns`).
async fn health(State(s): S) -> Json<Value> {
    let now = s.clock.now_ms();
    let st = s.state.lock();
    let ups: Vec<Value> = s
        .upstreams
        .iter()
        .map(|u| {
            let h = st.health.get(&u.cfg.name).cloned().unwrap_or_default();
            let remaining = h
                .cooldown_until_ms
                .map(|t| t.saturating_sub(now))
                .filter(|ms| *ms > 0);
            json!({
                "name": u.cfg.name,
                "kind": u.cfg.kind.as_str(),
                "priority": u.cfg.priority,
                "coolingDown": h.cooling(now),
                "cooldownRemainingMs": remaining,
                "health": h,
            })
        })
        .collect();
    let healthy = ups
        .iter()
        .filter(|u| u["coolingDown"] == Value::Bool(false))
        .count();
    Json(json!({
        "status": if healthy > 0 || ups.is_empty() { "ok" } else { "degraded" },
        "upstreams": ups,
    }))
}

/// `POST /reset` (admin): clears every cooldown.
async fn reset(State(s): S, headers: HeaderMap) -> Result<Json<Value>, GatewayError> {
    s.authorize(&headers, ApiFormat::Openai, true).await?;
    {
        let mut st = s.state.lock();
        for (name, h) in st.health.iter_mut() {
            h.reset();
            s.state.save_health(name, h);
        }
    }
    s.state.flush().await;
    Ok(Json(json!({"reset": true})))
}

/// The body of a heartbeat or an incident report, once the caller is authorized: at most
/// `gateway.max_report_bytes` (413 otherwise, before anything is stored), parsed as `T`.
async fn read_report<T: serde::de::DeserializeOwned>(
    s: &Shared,
    headers: &HeaderMap,
    body: Body,
    what: &str,
) -> Result<T, GatewayError> {
    s.authorize(headers, ApiFormat::Openai, false).await?;
    let limit = s.cfg.max_report_bytes;
    let too_large = || {
        GatewayError::new(
            ApiFormat::Openai,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!(
                "the {what} body is larger than gateway.max_report_bytes ({limit} bytes); \
                 send a smaller {what} (shorten its longest fields) or raise \
                 gateway.max_report_bytes"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())?;
    serde_json::from_slice(&bytes).map_err(|e| {
        GatewayError::bad_request(
            ApiFormat::Openai,
            format!("the request body is not the expected JSON: {e}; send a JSON {what} object"),
        )
    })
}

/// `POST /heartbeat`: the local agent says it is alive.
async fn heartbeat(
    State(s): S,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, GatewayError> {
    let mut hb: Heartbeat = read_report(&s, &headers, body, "heartbeat").await?;
    let now = s.clock.now_ms();
    hb.received_at_ms = now;
    if s.state.heartbeat(hb) {
        s.state.incident(Incident {
            at_ms: now,
            kind: "recovered".to_string(),
            message: "heartbeats from the local agent resumed".to_string(),
            details: None,
        });
    }
    s.state.flush().await;
    Ok(Json(json!({"ok": true, "receivedAtMs": now})))
}

/// `GET /state`: last seen, recent heartbeats, incidents and totals.
async fn get_state(State(s): S, headers: HeaderMap) -> Result<Json<Value>, GatewayError> {
    s.authorize(&headers, ApiFormat::Openai, false).await?;
    let st = s.state.lock();
    let recent = st.recent_incidents();
    Ok(Json(json!({
        "lastSeenMs": st.last_seen_ms,
        "lastSeen": st.last_seen_ms.map(rfc3339),
        "down": st.down,
        "heartbeats": st.heartbeats,
        "incidents": recent,
        "totals": st.totals,
    })))
}

/// `POST /state/reset` (admin).
async fn reset_state(State(s): S, headers: HeaderMap) -> Result<Json<Value>, GatewayError> {
    s.authorize(&headers, ApiFormat::Openai, true).await?;
    s.state.reset_state();
    s.state.flush().await;
    Ok(Json(json!({"reset": true})))
}

/// What a reporter sends to `POST /gateway/incident`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewIncident {
    #[serde(default = "default_kind")]
    kind: String,
    message: String,
    #[serde(default)]
    details: Option<Value>,
}

fn default_kind() -> String {
    "reported".to_string()
}

/// `POST /gateway/incident`: a reporter records something worth a human's attention.
async fn add_incident(
    State(s): S,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, GatewayError> {
    let n: NewIncident = read_report(&s, &headers, body, "incident").await?;
    let inc = Incident {
        at_ms: s.clock.now_ms(),
        kind: n.kind,
        message: n.message,
        details: n.details,
    };
    s.state.incident(inc.clone());
    s.state.flush().await;
    Ok(Json(json!({"recorded": inc})))
}

async fn incidents(State(s): S, headers: HeaderMap) -> Result<Json<Value>, GatewayError> {
    s.authorize(&headers, ApiFormat::Openai, false).await?;
    let st = s.state.lock();
    let recent = st.recent_incidents();
    Ok(Json(json!({"incidents": recent})))
}

async fn clear_incidents(State(s): S, headers: HeaderMap) -> Result<Json<Value>, GatewayError> {
    s.authorize(&headers, ApiFormat::Openai, true).await?;
    s.state.clear_incidents();
    s.state.flush().await;
    Ok(Json(json!({"cleared": true})))
}

async fn metrics(State(s): S, headers: HeaderMap) -> Result<Response, GatewayError> {
    s.authorize(&headers, ApiFormat::Openai, false).await?;
    let text = {
        let st = s.state.lock();
        s.metrics
            .render(&st.health, st.totals.takeovers, s.clock.now_ms())
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// Records a downtime incident when no heartbeat arrives for `takeover_after` after the
/// last one: one timer per heartbeat, reset by the next heartbeat, no polling.
async fn watch_heartbeats(shared: Arc<Shared>) {
    let after = shared.cfg.heartbeat.takeover_after.as_millis();
    if after == 0 {
        return;
    }
    loop {
        let notified = shared.state.heartbeat_seen.notified();
        let (seen, down) = {
            let st = shared.state.lock();
            (st.last_seen_ms, st.down)
        };
        match seen {
            Some(seen) if !down => {
                let deadline = seen.saturating_add(after as i64);
                let wait = deadline.saturating_sub(shared.clock.now_ms()).max(0) as u64;
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {
                        let now = shared.clock.now_ms();
                        if shared.state.takeover(seen, now) {
                            tracing::warn!(silent_ms = now - seen, "no heartbeat from the local agent; downtime incident recorded");
                        }
                    }
                }
            }
            _ => notified.await,
        }
    }
}

/// Whether `kennel up` should run a gateway: upstreams are configured (or given through
/// `ZEPTOCLAW_GATEWAY_URL`).
pub fn configured(cfg: &GatewayConfig) -> bool {
    !cfg.resolved_upstreams(|k| std::env::var(k).ok()).is_empty()
}

/// The data directory the gateway uses when none is configured: the server's.
pub fn data_dir(cfg: &GatewayConfig, server_data_dir: &Path) -> PathBuf {
    cfg.data_dir
        .clone()
        .unwrap_or_else(|| server_data_dir.to_path_buf())
}

/// Cooldowns on a [`kennel_clock::ManualClock`]: an upstream that failed is skipped for exactly
/// its cooldown, measured on the gateway's clock, without the test sleeping.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod clock_tests {
    use super::*;
    use kennel_clock::ManualClock;

    async fn gateway(clock: &ManualClock) -> (tempfile::TempDir, Gateway) {
        let dir = tempfile::tempdir().unwrap();
        let cfg: GatewayConfig = toml::from_str(
            "listen = \"127.0.0.1:0\"\n\
             [[upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n",
        )
        .unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("kennel.db"))
                .await
                .unwrap(),
        );
        let gw = Gateway::start_with_clock(
            cfg,
            dir.path(),
            &AuthConfig::default(),
            store.clone(),
            store,
            Arc::new(clock.clone()),
        )
        .await
        .unwrap();
        (dir, gw)
    }

    fn cooling(gw: &Gateway, clock: &ManualClock) -> bool {
        let s = gw.shared.state.lock();
        s.health.get("a").is_some_and(|h| h.cooling(clock.now_ms()))
    }

    #[tokio::test]
    async fn a_failed_upstream_cools_down_for_its_cooldown_on_the_gateway_clock() {
        let clock = ManualClock::new(1_800_000_000_000);
        let (_dir, gw) = gateway(&clock).await;
        let failure = |class, retry_after| health::Failure {
            class,
            model: "m",
            retry_after,
            error: "test",
        };

        // A 503: the first overload cooldown (overload_base, 60 s by default).
        gw.shared
            .record_failure("a", failure(FailureClass::Overloaded, None));
        let base = gw.shared.cfg.cooldowns.overload_base.as_millis();
        clock.advance(Duration::from_millis(base - 1));
        assert!(cooling(&gw, &clock), "a millisecond before the end");
        clock.advance(Duration::from_millis(1));
        assert!(!cooling(&gw, &clock), "over at the end");

        // A 429 with Retry-After: 7 s, whatever the configured default.
        gw.shared.record_failure(
            "a",
            failure(FailureClass::RateLimited, Some(Duration::from_secs(7))),
        );
        clock.advance(Duration::from_millis(6_999));
        assert!(cooling(&gw, &clock));
        clock.advance(Duration::from_millis(1));
        assert!(!cooling(&gw, &clock));
    }
}
