//! `kennel agent`: a build agent. It keeps a copy of the pipeline of stories (`kennel-sync`),
//! syncs it with the rendezvous on a coordinator whenever it can reach it, and builds the
//! stories it claims with the daemon's executor (worktree, agent process, commit, push).
//!
//! - [`identity`]: its node id and key, the key got once for a one-time join token.
//! - [`peer`]: a sync connection to the rendezvous or a mesh peer, reconnecting with backoff.
//! - [`mesh`]: with `--listen`, `/crdt-sync` served to other agents, and links to a few of
//!   them, so work goes on while the rendezvous is down.
//! - [`work`]: the loop: heartbeat, [`kennel_sync::plan`], claims, agents started and stopped,
//!   results recorded under the claim they were made for.
//!
//! Everything it knows lives in its data directory: the pipeline document (the only copy of
//! the state), the executor's outbox (what its agents reported, until the loop has recorded
//! it) and their logs. Cut off from every peer it goes on with what it holds and merges when
//! it reconnects.

pub mod identity;
pub mod mesh;
pub mod peer;
pub mod work;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kennel_daemon::config::DaemonConfig;
use kennel_daemon::executor::Executor;
use kennel_daemon::outbox::Outbox;
use kennel_sync::Replica;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// What `kennel agent` runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The rendezvous: `ws://host:port/crdt-sync`, or the coordinator's `http://host:port`.
    pub rendezvous: String,
    /// A one-time join token (`kennel agent-tokens create`); needed only until the agent has
    /// its key.
    pub join_token: Option<String>,
    pub data_dir: PathBuf,
    /// Time between heartbeats and plans.
    pub tick: Duration,
    /// How long a claim's holder may stay silent before others take the story over.
    pub claim_ttl: Duration,
    /// Where to serve `/crdt-sync` to other agents (the mesh); none: no mesh.
    pub listen: Option<std::net::SocketAddr>,
    /// The address other agents reach it on (default: `ws://<listen>/crdt-sync`).
    pub advertise: Option<String>,
    /// Mesh peers it keeps links to.
    pub max_mesh_peers: usize,
    /// Agent profiles, git settings, repositories and capacity (`max_concurrent_tasks`), as
    /// for `kennel daemon`.
    pub daemon: DaemonConfig,
}

impl AgentConfig {
    /// The reference's defaults: a tick of 15 s, claims taken over after 600 s of silence.
    pub fn new(rendezvous: String, data_dir: PathBuf, daemon: DaemonConfig) -> AgentConfig {
        AgentConfig {
            rendezvous,
            join_token: None,
            data_dir,
            tick: Duration::from_secs(15),
            claim_ttl: Duration::from_secs(600),
            listen: None,
            advertise: None,
            max_mesh_peers: 3,
            daemon,
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("failed to prepare the data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Pipeline(#[from] kennel_sync::ReplicaError),
    #[error(transparent)]
    Outbox(#[from] kennel_daemon::outbox::OutboxError),
    #[error("the rendezvous URL {0:?} is not ws://, wss://, http:// or https://")]
    Url(String),
    #[error("failed to listen on {addr} for mesh peers")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A running agent.
pub struct AgentHandle {
    pub node: String,
    /// The agent profiles that passed preflight.
    pub agents: Vec<String>,
    /// Whether the rendezvous connection is up.
    pub synced: watch::Receiver<bool>,
    /// Where other agents reach its `/crdt-sync`, when it takes part in the mesh.
    pub advertise: Option<String>,
    /// What it does (builds started, ended, dropped), one line each; for whoever takes it.
    pub notices: Option<mpsc::UnboundedReceiver<String>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl AgentHandle {
    /// Stops syncing and planning and drops the running agents (their stories stay claimed:
    /// a restart picks them up again, as does another node after the claim TTL).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts the agent: identity, document, executor, the rendezvous connection and the loop.
pub async fn start(cfg: AgentConfig) -> Result<AgentHandle, AgentError> {
    let dir = &cfg.data_dir;
    std::fs::create_dir_all(dir.join("logs")).map_err(|source| AgentError::DataDir {
        path: dir.display().to_string(),
        source,
    })?;
    let urls = peer::Urls::parse(&cfg.rendezvous)?;
    let node = identity::node_id(dir)?;
    let creds = identity::credentials(dir, &urls.http, cfg.join_token.as_deref()).await?;
    let replica = Replica::open(&dir.join("pipeline.automerge"), &node)?;
    let outbox = Arc::new(Outbox::open(&dir.join("outbox.db"))?);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let exec = Executor::new(
        Arc::new(cfg.daemon.clone()),
        dir.clone(),
        outbox.clone(),
        out_tx,
    );
    let agents = exec.preflight_all().await;
    // What the last run's agents reported and it had not recorded yet (it stopped in between):
    // recorded first, so a build that finished is not built again.
    let earlier = outbox.pending()?;
    // Attempts that ran when the last process ended are reported lost, and retried.
    exec.recover();
    let (shutdown, stop) = watch::channel(false);
    let (synced_tx, synced) = watch::channel(false);
    let (notices_tx, notices) = mpsc::unbounded_channel();
    let link = tokio::spawn(peer::run(
        urls.ws.clone(),
        creds.key,
        replica.clone(),
        synced_tx,
        stop.clone(),
    ));
    let mut tasks = vec![link];
    let (mut mesh, mut advertise) = (None, String::new());
    match (cfg.listen, creds.mesh_secret) {
        (Some(addr), Some(secret)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Listen {
                    addr: addr.to_string(),
                    source,
                })?;
            let bound = listener.local_addr().map_err(|source| AgentError::Listen {
                addr: addr.to_string(),
                source,
            })?;
            advertise = cfg
                .advertise
                .clone()
                .unwrap_or_else(|| mesh::advertised(bound));
            tasks.push(tokio::spawn(mesh::serve(
                listener,
                secret.clone(),
                replica.clone(),
                stop.clone(),
            )));
            mesh = Some(mesh::Mesh::new(secret, replica.clone()));
        }
        (Some(_), None) => tracing::warn!(
            "no mesh: the rendezvous gave this agent no mesh secret when it joined; \
             join again with a new token to take part"
        ),
        (None, _) => {}
    }
    let worker = work::Worker::new(work::Setup {
        node: node.clone(),
        replica: replica.clone(),
        exec,
        outbox,
        capacity: cfg.daemon.max_concurrent_tasks as usize,
        tick: cfg.tick,
        claim_ttl: cfg.claim_ttl,
        logs: dir.join("logs"),
        notices: notices_tx,
        synced: synced.clone(),
        mesh,
        advertise: advertise.clone(),
        max_mesh_peers: cfg.max_mesh_peers,
    });
    tasks.push(tokio::spawn(worker.run(earlier, out_rx, stop)));
    Ok(AgentHandle {
        node,
        agents,
        synced,
        notices: Some(notices),
        shutdown,
        advertise: (!advertise.is_empty()).then_some(advertise),
        tasks,
    })
}
