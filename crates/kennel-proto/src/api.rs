//! Request and response bodies of the REST API under `/api/v1`, shared by the server (which
//! derives the OpenAPI document from them) and the CLI (which decodes them).
//!
//! Timestamps are RFC 3339 strings in UTC; field names are camelCase.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::link::{OutputStream, RepoSpec};
use crate::status::{AttemptStatus, TaskStatus};

/// Body of `POST /api/v1/tasks`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTask {
    /// Short human name, shown in lists.
    pub name: String,
    /// What the agent is asked to do.
    pub prompt: String,
    /// Repository and base branch to work in; absent for tasks that need no repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<RepoSpec>,
    /// Agent profile the daemon must offer (`claude`, `codex`, `aider`, `command`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Labels a daemon must carry (all of them, with equal values) to be given this task.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Higher runs first; FIFO within one priority. Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Extra environment for the agent process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit for one attempt, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// How many attempts (dispatches) before the task fails. Default from server config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// A task as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub id: String,
    pub name: String,
    pub prompt: String,
    pub repo: Option<RepoSpec>,
    pub agent: String,
    pub labels: BTreeMap<String, String>,
    pub priority: i32,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: Option<u64>,
    pub max_attempts: u32,
    pub status: TaskStatus,
    /// Number of the current (or last) attempt; 0 before the first dispatch.
    pub attempt: u32,
    /// Daemon holding the current attempt, if any.
    pub daemon_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub branch: Option<String>,
    pub commit: Option<String>,
    /// Why a queued task is not being dispatched, when no connected daemon can run it (no
    /// daemon offers its agent or labels, none is connected, all are draining). Absent while
    /// it just waits for a free slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Present for a long-lived agent's session, started by a spawn policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<crate::link::SessionSpec>,
}

/// One attempt of a task: one dispatch to one daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub attempt: u32,
    pub daemon_id: String,
    pub status: AttemptStatus,
    pub dispatched_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
}

/// `GET /api/v1/tasks/{id}`: the task with its attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TaskDetail {
    #[serde(flatten)]
    pub task: Task,
    pub attempts: Vec<Attempt>,
}

/// A page of a list; pass `nextCursor` back as `cursor` for the next page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// One stored chunk of task output (or a progress summary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct OutputChunk {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub stream: OutputStream,
    pub output: String,
    pub is_partial: bool,
    pub at: String,
}

/// `GET /api/v1/tasks/{id}/output`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct OutputPage {
    pub attempt: u32,
    pub items: Vec<OutputChunk>,
    /// Pass as `after_seq` to continue; equals the request's `after_seq` when nothing is new.
    pub next_after_seq: u64,
}

/// Body of `POST /api/v1/tasks/{id}/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendMessageRequest {
    pub message: String,
}

/// A daemon as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Daemon {
    pub id: String,
    pub machine_id: String,
    pub hostname: String,
    pub connected: bool,
    /// Finishing its running work and taking no new tasks.
    pub draining: bool,
    pub max_concurrent_tasks: u32,
    pub active_tasks: u32,
    pub labels: BTreeMap<String, String>,
    pub agents: Vec<String>,
    pub version: String,
    pub protocol_version: u32,
    pub connected_at: Option<String>,
    pub last_seen_at: Option<String>,
    /// The id of the API key its machine id is bound to (the first daemon- or relay-scoped
    /// key it authenticated with); no other key may connect as this machine until that key
    /// is revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub enum Scope {
    /// Everything, including keys and draining daemons.
    Admin,
    /// Submit and manage tasks, read daemons and events.
    Client,
    /// Connect to `/ws/daemon` as a worker.
    Daemon,
    /// Connect to `/ws/daemon` as a relay.
    Relay,
    /// Build agents syncing the pipeline.
    Agent,
    /// Call the LLM gateway.
    Gateway,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::Admin,
        Scope::Client,
        Scope::Daemon,
        Scope::Relay,
        Scope::Agent,
        Scope::Gateway,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Client => "client",
            Scope::Daemon => "daemon",
            Scope::Relay => "relay",
            Scope::Agent => "agent",
            Scope::Gateway => "gateway",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|sc| sc.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown scope `{s}` (expected admin, client, daemon, relay, agent or gateway)"
                )
            })
    }
}

/// Body of `POST /api/v1/keys`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
    pub scopes: Vec<Scope>,
}

/// An API key's metadata; the secret itself is shown only once, at creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    /// The public prefix of the key; also its id.
    pub id: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// Response of `POST /api/v1/keys`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CreatedKey {
    /// The full key. Store it now: the server keeps only a hash.
    pub key: String,
    #[serde(flatten)]
    pub info: ApiKey,
}

/// One entry of the event log (`GET /api/v1/events`, as SSE `data`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Monotonic id; also the SSE `id`, usable as `Last-Event-ID`.
    pub id: i64,
    /// `task.created`, `task.status`, `daemon.connected`, ...
    pub kind: String,
    pub task_id: Option<String>,
    pub daemon_id: Option<String>,
    pub data: serde_json::Value,
    pub at: String,
}

/// `GET /api/v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ServerStatus {
    pub version: String,
    pub protocol_version: u32,
    pub uptime_secs: u64,
    pub store: String,
    pub daemons_connected: u32,
    pub capacity_total: u32,
    pub capacity_used: u32,
    pub tasks: BTreeMap<String, u64>,
    /// Queued tasks no connected daemon can run, grouped by why.
    #[serde(default)]
    pub waiting: Vec<WaitingTasks>,
}

/// Queued tasks that wait for the same reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WaitingTasks {
    pub reason: String,
    pub tasks: u64,
    /// The oldest of them.
    pub example_task_id: String,
}

/// Every error the API returns has this body, with a matching HTTP status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// Stable machine-readable code (`unauthorized`, `notFound`, `invalidRequest`, ...).
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_task_rejects_unknown_fields() {
        let err = serde_json::from_str::<CreateTask>(r#"{"name":"a","prompt":"b","prio":1}"#)
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `prio`"), "{err}");
    }

    #[test]
    fn scopes_parse() {
        assert_eq!("daemon".parse::<Scope>(), Ok(Scope::Daemon));
        assert!("root"
            .parse::<Scope>()
            .unwrap_err()
            .contains("unknown scope"));
    }
}

/// Where a build agents' story is (`kennel-sync`'s stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StoryStage {
    #[serde(rename = "1_backlog")]
    Backlog,
    #[serde(rename = "2_current")]
    Current,
    #[serde(rename = "3_qa")]
    Qa,
    #[serde(rename = "4_merge")]
    Merge,
    #[serde(rename = "5_done")]
    Done,
    #[serde(rename = "6_archived")]
    Archived,
}

/// Body of `POST /api/v1/stories`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateStory {
    /// Its id; one is made when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub title: String,
    /// What to build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The agent profile that builds it (default `claude`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<RepoSpec>,
    /// Stories that must be done first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Failed attempts before it is blocked (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// A story as the rendezvous's copy of the pipeline shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StoryView {
    pub id: String,
    pub title: String,
    pub body: String,
    pub stage: StoryStage,
    pub profile: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<RepoSpec>,
    pub depends_on: Vec<String>,
    pub max_retries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
    /// The node whose claim won.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub claimants: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The owner's attempts, one line each, oldest first.
    #[serde(default)]
    pub attempt_log: Vec<String>,
}

/// Body of `POST /api/v1/stories/{id}/move`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoveStory {
    pub stage: StoryStage,
}

/// Body of `POST /api/v1/stories/{id}/block`: a reason blocks, none unblocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlockStory {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Body of `POST /api/v1/agent-tokens`: a one-time join token for a build agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateJoinToken {
    /// Who it is for; the key it becomes is named after it.
    pub name: String,
    /// Seconds until it expires unused (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// A join token, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CreatedJoinToken {
    /// The token: give it to the agent (`kennel agent --join-token`). The server keeps only a
    /// hash.
    pub token: String,
    pub id: String,
    pub name: String,
    pub expires_at: String,
}

/// What `POST /api/v1/agent-tokens/exchange` answers: the agent's key, shown once, and the
/// secret build agents present to one another's `/crdt-sync` on their mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct JoinedAgent {
    #[serde(flatten)]
    pub created: CreatedKey,
    /// The same for every agent of this rendezvous (`Authorization: Bearer` between agents);
    /// absent when the rendezvous is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_secret: Option<String>,
}

/// Body of `POST /api/v1/agent-tokens/exchange`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExchangeJoinToken {
    pub token: String,
}
