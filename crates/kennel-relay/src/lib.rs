//! kennel's edge relay (`kennel relay`): one upstream daemon link, to a coordinator or another
//! relay, fanned out to many downstream daemons. Upstream it poses as one daemon whose
//! capacity is the sum of its daemons'; downstream it speaks the coordinator's protocol,
//! dispatches each task to the least-loaded daemon that can take it, queues what none can take,
//! and keeps its own history in SQLite. It owns no task state beyond that: the coordinator
//! remains the source of truth.

pub mod config;
pub mod downstream;
pub mod history;
pub mod http;
pub mod pending;
pub mod relay;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

pub use config::RelayConfig;
pub use relay::Relay;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    History(#[from] history::HistoryError),
    #[error("failed to listen on {addr} (pick another relay.listen or free the port)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A relay bound to its port, not yet serving.
pub struct RelayServer {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    relay: Arc<Relay>,
    listener: tokio::net::TcpListener,
}

impl RelayServer {
    /// Validates the config, opens the history and binds the listener.
    pub async fn start(cfg: RelayConfig) -> Result<Self, StartError> {
        cfg.check_runnable()?;
        if cfg.admin_keys.is_empty() {
            tracing::warn!("relay.admin_keys is empty: only /health and /ws/daemon will answer; add a key to use /status, /tasks, /logs, /reconnect and /metrics");
        }
        let listen = cfg.listen;
        let relay = Relay::open(cfg)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?;
        Ok(RelayServer {
            addr,
            relay,
            listener,
        })
    }

    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    /// Serves downstream daemons and the admin endpoints, and keeps the upstream link, until
    /// `shutdown` resolves. Slow, idle and surplus connections are closed per `[relay.http]`
    /// (`kennel_http::serve`).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        self.relay.start_restored_graces();
        let link = tokio::spawn(upstream::run(self.relay.clone(), stop_rx));
        let relay = self.relay.clone();
        let prune = tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
            loop {
                every.tick().await;
                let r = relay.clone();
                let _ = tokio::task::spawn_blocking(move || r.prune_history()).await;
            }
        });
        let app = http::router(self.relay.clone());
        let limits = self.relay.cfg.http.clone();
        let res = kennel_http::serve(self.listener, app, &limits, 1, async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
        let _ = link.await;
        prune.abort();
        res
    }
}
