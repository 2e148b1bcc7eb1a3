//! The kennel coordinator as a library: the daemon hub (`/ws/daemon`), the scheduler, the
//! REST API with its events, authentication, metrics and health.
//!
//! [`Server::start`] binds the listener first (a busy port leaves the data directory
//! untouched), then opens the store, restores the live state and runs until the shutdown
//! future resolves. The binary only loads configuration and calls it.

pub mod agents;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod hub;
pub mod ids;
pub mod join;
pub mod lifecycle;
pub mod rendezvous;
pub mod stories;
pub mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use kennel_proto::api::Scope;
use kennel_store::{rfc3339, AgentStore, Backend, GatewayStore, SqliteStore, Store};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_http::cors::CorsLayer;

use crate::auth::KeyRing;
use crate::config::ServerConfig;
use crate::coordinator::Coordinator;

pub use kennel_clock::{Clock, SystemClock};
/// The HTTP listener, shared with the gateway and the relay.
pub use kennel_http as listener;
/// The daemon link's WebSocket accept and outbound queue, shared with the relay's downstream.
pub use kennel_link::{outbound, ws};

/// What every handler can reach.
pub struct AppState {
    pub coord: Arc<Coordinator>,
    pub store: Arc<dyn Store>,
    /// The same database: the lifecycle manager's policies, agents, messages and commands.
    pub agents: Arc<dyn AgentStore>,
    /// The build agents' pipeline, synced over `WS /crdt-sync`.
    pub rendezvous: Option<Arc<rendezvous::Rendezvous>>,
    /// The same database, for a gateway embedded beside this coordinator (`kennel up`).
    pub gateway_store: Arc<dyn GatewayStore>,
    pub keys: KeyRing,
    pub clock: Arc<dyn Clock>,
    pub metrics: Option<PrometheusHandle>,
    /// Daemon links that have not authenticated yet (`server.protocol.max_unauthenticated`).
    pub pre_auth: ws::PreAuthSlots,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("failed to open the store")]
    Store(#[from] kennel_store::StoreError),
    #[error("failed to listen to the other coordinators on PostgreSQL")]
    Peers(#[source] sqlx::Error),
    /// The cause is left to the `#[source]` chain, which the binary prints once.
    #[error("failed to bind {addr} (is another kennel server running? pick another address with --listen)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to prepare the data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the coordinator's listener failed")]
    Serve(#[source] std::io::Error),
    /// A revoked key is never re-activated, not even one named in the configuration.
    #[error(
        "the configured admin key (server.auth.admin_key, key id {id}) was revoked, and a revoked \
         key is never re-activated: remove it from the configuration (or \
         KENNEL_SERVER__AUTH__ADMIN_KEY) and use another admin key, or mint a new one with \
         `kennel keys recover --data-dir {data_dir}` (it works while the server is stopped)"
    )]
    AdminKeyRevoked { id: String, data_dir: String },
}

/// A bound, ready coordinator.
pub struct Server {
    pub addr: SocketAddr,
    listener: tokio::net::TcpListener,
    /// Timeouts and connection limit of the listener (`[server.http]`).
    http: config::HttpConfig,
    router: Router,
    pub state: Arc<AppState>,
    /// Set when this start created the first admin key: shown once.
    pub new_admin_key: Option<String>,
}

/// Installs the Prometheus recorder once per process.
fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
                5.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("latency_seconds".into()),
                    &buckets,
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

impl Server {
    /// Binds `cfg.listen`, then opens the store in `cfg.data_dir` and restores state.
    pub async fn start(cfg: ServerConfig) -> Result<Server, StartError> {
        let listener = Self::bind(&cfg).await?;
        Self::start_on(cfg, listener).await
    }

    /// Validates `cfg` and binds its listen address without touching the data directory, so
    /// a start that fails on a busy port leaves nothing behind. A caller that must prepare
    /// the directory itself (the CLI takes its lock) binds first, then calls [`Server::start_on`].
    pub async fn bind(cfg: &ServerConfig) -> Result<tokio::net::TcpListener, StartError> {
        cfg.validate()?;
        tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: cfg.listen,
                source,
            })
    }

    /// Opens the store in `cfg.data_dir` (creating the directory), restores state and serves
    /// on `listener`, which [`Server::bind`] returned.
    pub async fn start_on(
        cfg: ServerConfig,
        listener: tokio::net::TcpListener,
    ) -> Result<Server, StartError> {
        cfg.validate()?;
        let data_err = |source| StartError::DataDir {
            path: cfg.data_dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&cfg.data_dir).map_err(data_err)?;
        let Some(url) = cfg.database_url.clone() else {
            let store: Arc<dyn Backend> =
                Arc::new(SqliteStore::open(&cfg.data_dir.join("kennel.db")).await?);
            return Self::prepare(cfg, store, Arc::new(SystemClock), None, listener).await;
        };
        // Several coordinators on one PostgreSQL: the store, and the channel to the others.
        let store = kennel_store::open(&url).await?;
        let id = format!("c-{}", ids::time_ordered());
        let (peers, heard) = cluster::PgPeers::start(&url, id)
            .await
            .map_err(StartError::Peers)?;
        let peers: Arc<dyn cluster::Peers> = peers;
        Self::prepare(
            cfg,
            store,
            Arc::new(SystemClock),
            Some((peers, heard)),
            listener,
        )
        .await
    }

    /// Starts on a given store and clock (tests, other backends).
    pub async fn start_with(
        cfg: ServerConfig,
        store: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
    ) -> Result<Server, StartError> {
        let listener = Self::bind(&cfg).await?;
        Self::prepare(cfg, store, clock, None, listener).await
    }

    /// Everything after the listener is bound and the store is open: keys, the first admin
    /// key, restored state, the scheduler and the routes.
    async fn prepare(
        cfg: ServerConfig,
        backend: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
        peers: Option<(
            Arc<dyn cluster::Peers>,
            tokio::sync::mpsc::UnboundedReceiver<cluster::Heard>,
        )>,
        listener: tokio::net::TcpListener,
    ) -> Result<Server, StartError> {
        let store: Arc<dyn Store> = backend.clone();
        let agents: Arc<dyn AgentStore> = backend.clone();
        let gateway_store: Arc<dyn GatewayStore> = backend;
        let data_err = |source| StartError::DataDir {
            path: cfg.data_dir.display().to_string(),
            source,
        };
        let hash_key = KeyRing::load_hash_key(cfg.auth.hash_key.as_deref(), &cfg.data_dir)
            .map_err(data_err)?;
        let keys = KeyRing::new(hash_key);
        let new_admin_key = bootstrap_admin(&cfg, store.as_ref(), &keys, clock.as_ref())
            .await
            .map_err(|e| match e {
                Bootstrap::Store(e) => StartError::Store(e),
                Bootstrap::Io(e) => data_err(e),
                Bootstrap::AdminKeyRevoked(id) => StartError::AdminKeyRevoked {
                    id,
                    data_dir: cfg.data_dir.display().to_string(),
                },
            })?;

        let (coord, heard) = match peers {
            Some((peers, heard)) => (
                Coordinator::with_peers(store.clone(), clock.clone(), cfg.clone(), peers),
                Some(heard),
            ),
            None => (
                Coordinator::new(store.clone(), clock.clone(), cfg.clone()),
                None,
            ),
        };
        coord.restore().await?;
        tokio::spawn(coord.clone().run_scheduler());
        tokio::spawn(coord.clone().run_timers());
        tokio::spawn(coord.clone().run_waiting_watch());
        tokio::spawn(coord.clone().run_retention());
        if let Some(heard) = heard {
            tokio::spawn(coord.clone().run_peers(heard));
            tokio::spawn(coord.clone().run_event_tail());
            tokio::spawn(coord.clone().run_cluster());
        }

        tokio::spawn(lifecycle::run_sweeper(
            agents.clone(),
            coord.clone(),
            clock.clone(),
            cfg.agents.stale_after.as_millis() as i64,
        ));
        let manager = lifecycle::Lifecycle::new(
            agents.clone(),
            store.clone(),
            coord.clone(),
            clock.clone(),
            cfg.agents
                .release
                .clone()
                .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
        );
        tokio::spawn(manager.run());
        let rendezvous = match rendezvous::Rendezvous::open(&cfg.data_dir) {
            Ok(rv) => Some(rv),
            Err(e) => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "the build agents' pipeline could not be opened; /crdt-sync and the story API are off"
                );
                None
            }
        };
        let state = Arc::new(AppState {
            coord,
            store,
            agents,
            rendezvous,
            gateway_store,
            keys,
            pre_auth: ws::PreAuthSlots::new(cfg.protocol.max_unauthenticated),
            clock,
            metrics: metrics_handle(),
        });
        tokio::spawn(forget_revoked_keys(
            state.coord.subscribe_revoked(),
            Arc::downgrade(&state),
        ));
        let router = router(state.clone(), cfg.api.max_body_bytes);
        let addr = listener.local_addr().map_err(StartError::Serve)?;
        Ok(Server {
            addr,
            listener,
            http: cfg.http.clone(),
            router,
            state,
            new_admin_key,
        })
    }

    /// Serves until `shutdown` resolves, then stops accepting and finishes open requests.
    /// Slow, idle and surplus connections are closed per `[server.http]` ([`listener`]).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        listener::serve(self.listener, self.router, &self.http, 1, shutdown)
            .await
            .map_err(StartError::Serve)
    }
}

enum Bootstrap {
    Store(kennel_store::StoreError),
    Io(std::io::Error),
    AdminKeyRevoked(String),
}

/// Drops each revoked key from the key cache as the coordinator hears of it, so a key revoked
/// on another coordinator stops working here at once rather than when its cache entry expires.
async fn forget_revoked_keys(
    mut revoked: tokio::sync::broadcast::Receiver<Arc<str>>,
    state: std::sync::Weak<AppState>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let got = revoked.recv().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        match got {
            Ok(key_id) => state.keys.forget(&key_id),
            Err(RecvError::Lagged(_)) => state.keys.forget_all(),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Makes sure an admin key exists: the configured one, or a new one on the very first start
/// (returned so the caller can print it once, and written to `<data_dir>/admin.key`).
async fn bootstrap_admin(
    cfg: &ServerConfig,
    store: &dyn Store,
    keys: &KeyRing,
    clock: &dyn Clock,
) -> Result<Option<String>, Bootstrap> {
    let now = rfc3339(clock.now_ms());
    if let Some(k) = &cfg.auth.admin_key {
        let id = auth::key_id(k);
        match store.find_key(&id).await.map_err(Bootstrap::Store)? {
            Some(rec) if rec.info.revoked_at.is_some() => {
                return Err(Bootstrap::AdminKeyRevoked(id));
            }
            Some(_) => {}
            None => {
                if let Some(rec) = keys.record_for(k, "configured admin", vec![Scope::Admin], now) {
                    if let Err(e) = store.insert_key(&rec).await {
                        // Another coordinator on the same database, starting at the same time
                        // with the same key, may have stored it first.
                        if store
                            .find_key(&id)
                            .await
                            .map_err(Bootstrap::Store)?
                            .is_none()
                        {
                            return Err(Bootstrap::Store(e));
                        }
                    }
                }
            }
        }
        return Ok(None);
    }
    if store.count_keys().await.map_err(Bootstrap::Store)? > 0 {
        return Ok(None);
    }
    let (key, rec) = keys.mint("admin", vec![Scope::Admin], now);
    store.insert_key(&rec).await.map_err(Bootstrap::Store)?;
    auth::write_private(&cfg.data_dir.join("admin.key"), &key).map_err(Bootstrap::Io)?;
    Ok(Some(key))
}

/// Every route of the coordinator.
pub fn router(state: Arc<AppState>, max_body: usize) -> Router {
    let v1 = Router::new()
        .route("/tasks", post(api::create_task).get(api::list_tasks))
        .route("/tasks/{id}", get(api::get_task))
        .route("/tasks/{id}/cancel", post(api::cancel_task))
        .route("/tasks/{id}/pause", post(api::pause_task))
        .route("/tasks/{id}/resume", post(api::resume_task))
        .route("/tasks/{id}/messages", post(api::send_message))
        .route("/tasks/{id}/output", get(stream::task_output))
        .route("/tasks/{id}/output/stream", get(stream::task_output_stream))
        .route("/events", get(stream::events))
        .route("/daemons", get(api::list_daemons))
        .route("/daemons/{id}", get(api::get_daemon))
        .route("/daemons/{id}/drain", post(api::drain_daemon))
        .route("/daemons/{id}/undrain", post(api::undrain_daemon))
        .route("/keys", post(api::create_key).get(api::list_keys))
        .route("/keys/{id}", axum::routing::delete(api::revoke_key))
        .route("/status", get(api::status))
        .merge(agents::routes())
        .merge(stories::routes())
        .merge(join::routes());
    Router::new()
        .nest("/api/v1", v1)
        .route("/api/openapi.json", get(api::openapi_json))
        .route("/api/docs", get(api::docs_page))
        .route("/ws/daemon", get(hub::ws_daemon))
        .route("/crdt-sync", get(rendezvous::crdt_sync))
        .route("/health", get(api::health))
        .route("/ready", get(api::ready))
        .route("/metrics", get(api::metrics_text))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(
            CorsLayer::new()
                .allow_origin(tower_http::cors::Any)
                .allow_headers([
                    axum::http::header::AUTHORIZATION,
                    axum::http::header::CONTENT_TYPE,
                ]),
        )
        .with_state(state)
}
