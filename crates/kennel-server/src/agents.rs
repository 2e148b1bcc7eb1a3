//! The REST API of long-lived agents under `/api/v1`: spawn policies, the agent registry,
//! messages and commands. Handlers check scopes, validate input and call the store's
//! [`AgentStore`]; the events a change records are published like the coordinator's own.
//!
//! Who may do what:
//! - `client` keys (and `admin`): apply, read and delete policies; read agents and commands;
//!   send messages and read any inbox (an operator looking in; it marks what it lists
//!   delivered, as the agent's own read would).
//! - `agent` keys: register agents, send as them, heartbeat, read their inbox, claim, release
//!   and read messages for them. An agent id belongs to the key that registered it; another
//!   key (`admin` included) cannot register it again or act as it.
//! - Calls that carry a session guard (`instanceId` and `epoch`) are refused with 409 when it
//!   is not the agent's current instance: an old process cannot act after a restart.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use kennel_proto::agents::{
    ActAs, Address, Agent, ClaimMessage, Command, InboxPage, Message, PolicyVersion, PolicyView,
    RegisterAgent, SendMessage, SessionGuard,
};
use kennel_proto::api::{ErrorBody, Scope};
use kennel_proto::policy::{SpawnPolicy, MAX_BACKOFF_STEPS, MAX_NAMES, MAX_POLICY_SECS};
use kennel_proto::validate_id;
use kennel_store::{Claim, GuardCheck, NewMessage, PolicyChange, Sent};
use serde::Deserialize;
use utoipa::openapi::schema::{AdditionalProperties, ArrayItems, Object, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::OpenApi;

use crate::api::{
    page_limit, path_id, property, query_error, string_schema, text, IdParam, JsonBody,
    ENV_NAME_PATTERN, ID_PATTERN, NOT_BLANK,
};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::AppState;

type AppResult<T> = Result<T, ApiError>;
type S = State<Arc<AppState>>;
type PathId = Result<Path<String>, axum::extract::rejection::PathRejection>;

const CLIENT: &[Scope] = &[Scope::Client];
const AGENT: &[Scope] = &[Scope::Agent];
const CLIENT_OR_AGENT: &[Scope] = &[Scope::Client, Scope::Agent];

/// A message address: an agent id, or `policy:`, `label:`, `tag:`, `cap:` or `channel:` and a
/// name (what [`Address::parse`] accepts).
pub const ADDRESS_PATTERN: &str =
    r"^(?:(?:policy|label|tag|cap|channel):)?(?![-.])(?!.*\.\.)[A-Za-z0-9._-]{1,128}$";

/// Longest message body, in bytes.
pub const MAX_MESSAGE_BODY: usize = 256 * 1024;
/// Longest subject, in bytes.
const MAX_SUBJECT: usize = 1_000;
/// Longest message time to live and claim, in seconds.
const MAX_TTL_SECS: u64 = 30 * 24 * 3600;
const MAX_CLAIM_SECS: u64 = 24 * 3600;
/// How long a claim holds unless the claimer says otherwise.
const DEFAULT_CLAIM_SECS: u64 = 300;
/// Most labels, tags, capabilities and channels on a policy or an agent.
/// Default and largest inbox page.
const DEFAULT_INBOX_PAGE: u32 = 100;

#[derive(OpenApi)]
#[openapi(
    paths(
        apply_policy, list_policies, get_policy, policy_history, delete_policy, restart_policy,
        register_agent, agent_heartbeat, list_agents, get_agent, inbox, inbox_stream,
        send_message, get_message, claim_message, release_claim, read_message, delete_message,
        list_commands, get_command
    ),
    modifiers(&AgentConstraints)
)]
pub struct AgentsDoc;

/// The limits the handlers check, written into the schemas of the bodies (see
/// `api::BodyConstraints` for why they are stated here).
struct AgentConstraints;

impl utoipa::Modify for AgentConstraints {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        let schemas = &mut components.schemas;
        let id = || string_schema(1, kennel_proto::validate::MAX_ID_LEN, Some(ID_PATTERN));
        let mut field = |schema: &str, name: &str, set: &dyn Fn(&mut Object)| match property(
            schemas, schema, name,
        ) {
            Some(o) => set(o),
            None => tracing::error!(schema, name, "OpenAPI: no such property to constrain"),
        };
        let id_field =
            |o: &mut Object| text(o, 1, kennel_proto::validate::MAX_ID_LEN, Some(ID_PATTERN));
        let secs = |min: u64, max: u64| {
            move |o: &mut Object| {
                o.minimum = Some(min.into());
                o.maximum = Some(max.into());
            }
        };
        for (schema, name) in [
            ("SpawnPolicy", "name"),
            ("SpawnPolicy", "provider"),
            ("SpawnPolicy", "label"),
            ("SpawnPolicy", "permissionMode"),
            ("RegisterAgent", "id"),
            ("RegisterAgent", "machine"),
            ("RegisterAgent", "instanceId"),
            ("RegisterAgent", "label"),
            ("SessionGuard", "instanceId"),
            ("SendMessage", "from"),
            ("SendMessage", "kind"),
            ("SendMessage", "replyTo"),
            ("ActAs", "agentId"),
            ("ActAs", "instanceId"),
            ("ClaimMessage", "agentId"),
            ("ClaimMessage", "instanceId"),
        ] {
            field(schema, name, &id_field);
        }
        field("RegisterAgent", "name", &|o| {
            text(o, 1, 200, Some(NOT_BLANK))
        });
        field("SendMessage", "to", &|o| {
            text(o, 1, 136, Some(ADDRESS_PATTERN));
        });
        field("SendMessage", "body", &|o| {
            text(o, 1, MAX_MESSAGE_BODY, None);
            crate::api::in_bytes(o, MAX_MESSAGE_BODY);
        });
        field("SendMessage", "subject", &|o| {
            text(o, 0, MAX_SUBJECT, None);
            crate::api::in_bytes(o, MAX_SUBJECT);
        });
        field("SendMessage", "idempotencyKey", &id_field);
        field("SendMessage", "ttlSecs", &secs(1, MAX_TTL_SECS));
        field("ClaimMessage", "ttlSecs", &secs(1, MAX_CLAIM_SECS));
        field("OnDemand", "keepaliveSeconds", &secs(1, MAX_POLICY_SECS));
        field("Backoff", "resetAfterSeconds", &secs(1, MAX_POLICY_SECS));
        field("SpawnPolicy", "spawnTimeoutSecs", &secs(1, MAX_POLICY_SECS));
        field("SpawnPolicy", "stopTimeoutSecs", &secs(1, MAX_POLICY_SECS));
        field(
            "SpawnPolicy",
            "restartOnUpdateIdleSecs",
            &secs(1, MAX_POLICY_SECS),
        );
        // Lists of names, and maps keyed by names.
        let names = |o: &mut utoipa::openapi::schema::Array| {
            o.max_items = Some(MAX_NAMES);
            o.items = ArrayItems::RefOrSchema(Box::new(RefOr::T(Schema::Object(id()))));
        };
        for (schema, name) in [
            ("SpawnPolicy", "tags"),
            ("SpawnPolicy", "capabilities"),
            ("RegisterAgent", "tags"),
            ("RegisterAgent", "capabilities"),
            ("RegisterAgent", "channels"),
        ] {
            match array(schemas, schema, name) {
                Some(a) => names(a),
                None => tracing::error!(schema, name, "OpenAPI: no such list to constrain"),
            }
        }
        match array(schemas, "SpawnPolicy", "providerArgs") {
            Some(a) => a.max_items = Some(256),
            None => tracing::error!("OpenAPI: no providerArgs to constrain"),
        }
        match array(schemas, "Backoff", "schedule") {
            Some(a) => {
                a.min_items = Some(1);
                a.max_items = Some(MAX_BACKOFF_STEPS);
                let mut step = Object::with_type(Type::Integer);
                step.minimum = Some(1.into());
                step.maximum = Some(MAX_POLICY_SECS.into());
                a.items = ArrayItems::RefOrSchema(Box::new(RefOr::T(Schema::Object(step))));
            }
            None => tracing::error!("OpenAPI: no backoff schedule to constrain"),
        }
        let mut field = |schema: &str, name: &str, set: &dyn Fn(&mut Object)| match property(
            schemas, schema, name,
        ) {
            Some(o) => set(o),
            None => tracing::error!(schema, name, "OpenAPI: no such property to constrain"),
        };
        field("Target", "labels", &|o| {
            o.max_properties = Some(MAX_NAMES);
            o.property_names = Some(Box::new(Schema::Object(id())));
            o.additional_properties = Some(Box::new(AdditionalProperties::RefOr(RefOr::T(
                Schema::Object(string_schema(1, 256, None)),
            ))));
        });
        field("SpawnPolicy", "env", &|o| {
            o.max_properties = Some(256);
            o.property_names = Some(Box::new(Schema::Object(string_schema(
                1,
                usize::MAX,
                Some(ENV_NAME_PATTERN),
            ))));
        });
    }
}

/// The array schema of property `name` of component `schema`.
fn array<'a>(
    schemas: &'a mut std::collections::BTreeMap<String, RefOr<Schema>>,
    schema: &str,
    name: &str,
) -> Option<&'a mut utoipa::openapi::schema::Array> {
    let RefOr::T(Schema::Object(parent)) = schemas.get_mut(schema)? else {
        return None;
    };
    match parent.properties.get_mut(name)? {
        RefOr::T(Schema::Array(a)) => Some(a),
        _ => None,
    }
}

fn invalid(e: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(e.to_string())
}

fn too_many(what: &str, n: usize) -> AppResult<()> {
    if n > MAX_NAMES {
        return Err(ApiError::invalid(format!(
            "at most {MAX_NAMES} {what} are allowed, not {n}"
        )));
    }
    Ok(())
}

/// The `{name}` of a policy route, checked.
fn policy_name(name: PathId) -> AppResult<String> {
    path_id("policy name", name)
}

/// Checks that `p` may act as agent `id`: its key registered the agent (or the agent is not
/// in the registry and `p` is a person's `client` key), and `guard`, when given, is the
/// agent's current instance. Returns the agent, if registered.
async fn act_as(
    p: &Principal,
    app: &AppState,
    id: &str,
    guard: Option<SessionGuard>,
) -> AppResult<Option<Agent>> {
    validate_id("agent id", id).map_err(invalid)?;
    let agent = app.agents.get_agent(id).await?;
    match &agent {
        Some(a) if a.key_id.as_deref() == Some(p.key_id.as_str()) => {}
        Some(_) => {
            return Err(ApiError::forbidden(format!(
                "agent `{id}` was registered with another key; only that key may act as it"
            )))
        }
        None if is_operator(p) => {}
        None => {
            return Err(ApiError::not_found(format!(
                "no agent `{id}` is registered; register it with POST /api/v1/agents first"
            )))
        }
    }
    if let Some(g) = guard {
        check_guard(app, id, &g).await?;
    }
    Ok(agent)
}

/// A person's key (`admin` or `client`), as opposed to an agent's.
fn is_operator(p: &Principal) -> bool {
    p.scopes
        .iter()
        .any(|s| matches!(s, Scope::Admin | Scope::Client))
}

/// Checks that `p` may read agent `id`'s inbox: a person's key any inbox (an operator looking
/// in), an agent key only its agents'. A session guard, when given, must be current.
async fn may_read_inbox(
    p: &Principal,
    app: &AppState,
    id: &str,
    guard: Option<SessionGuard>,
) -> AppResult<()> {
    if !is_operator(p) {
        act_as(p, app, id, guard).await?;
    } else if let Some(g) = guard {
        check_guard(app, id, &g).await?;
    }
    Ok(())
}

async fn check_guard(app: &AppState, id: &str, guard: &SessionGuard) -> AppResult<()> {
    validate_id("instance id", &guard.instance_id).map_err(invalid)?;
    match app
        .agents
        .agent_heartbeat(id, guard, app.clock.now_ms())
        .await?
    {
        GuardCheck::Current => Ok(()),
        GuardCheck::Stale { epoch } => Err(ApiError::conflict(format!(
            "stale agent instance: instance `{}` at epoch {} is not agent `{id}`'s current \
             one (epoch {epoch}); this process must stop, or register again",
            guard.instance_id, guard.epoch
        ))),
        GuardCheck::Unknown => Err(ApiError::not_found(format!(
            "no agent `{id}` is registered"
        ))),
    }
}

/// The guard of a body or query that may carry one: both parts, or neither. Half a guard
/// cannot match the current instance, so it is refused as a stale one would be (409).
fn guard_of(instance_id: Option<String>, epoch: Option<i64>) -> AppResult<Option<SessionGuard>> {
    match (instance_id, epoch) {
        (Some(instance_id), Some(epoch)) => Ok(Some(SessionGuard { instance_id, epoch })),
        (None, None) => Ok(None),
        _ => Err(ApiError::conflict(
            "incomplete session guard: send both `instanceId` and `epoch` (or neither)",
        )),
    }
}

/// [`act_as`] for what only a registered agent does (claim, release, read): 404 for a name
/// that is not in the registry.
async fn act_as_agent(
    p: &Principal,
    app: &AppState,
    id: &str,
    guard: Option<SessionGuard>,
) -> AppResult<Agent> {
    act_as(p, app, id, guard).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no agent `{id}` is registered; register it with POST /api/v1/agents first"
        ))
    })
}

fn view(
    record: kennel_proto::agents::PolicyRecord,
    state: Option<serde_json::Value>,
) -> PolicyView {
    let status = state
        .as_ref()
        .and_then(|s| s.get("status"))
        .and_then(|s| s.as_str())
        .map(str::to_string);
    PolicyView {
        policy: record.policy,
        version: record.version,
        updated_at: record.updated_at,
        status,
        state,
    }
}

async fn state_of(app: &AppState, name: &str) -> AppResult<Option<serde_json::Value>> {
    let states = app.agents.policy_states().await?;
    Ok(states.into_iter().find(|(n, _)| n == name).map(|(_, s)| s))
}

/// Apply a spawn policy: create it, or store a new version when it changed.
#[utoipa::path(post, path = "/api/v1/policies", request_body = SpawnPolicy, tag = "policies",
    responses(
        (status = 200, description = "the policy was there: updated to a new version, or unchanged", body = PolicyView),
        (status = 201, description = "the policy, created", body = PolicyView),
        (status = 400, description = "the policy is invalid; the message names the field", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn apply_policy(
    p: Principal,
    State(app): S,
    body: Result<JsonBody<SpawnPolicy>, ApiError>,
) -> AppResult<(StatusCode, Json<PolicyView>)> {
    p.require(CLIENT)?;
    let JsonBody(policy) = body?;
    policy.validate().map_err(invalid)?;
    too_many("tags", policy.tags.len())?;
    too_many("capabilities", policy.capabilities.len())?;
    too_many("target labels", policy.target.labels.len())?;
    let changed = app.agents.put_policy(&policy, app.clock.now_ms()).await?;
    app.coord.publish_events(changed.events);
    let (record, change) = changed.value;
    let status = match change {
        PolicyChange::Created => StatusCode::CREATED,
        PolicyChange::Updated | PolicyChange::Unchanged => StatusCode::OK,
    };
    let state = state_of(&app, &record.policy.name).await?;
    Ok((status, Json(view(record, state))))
}

/// Every spawn policy, by name.
#[utoipa::path(get, path = "/api/v1/policies", tag = "policies",
    responses((status = 200, description = "every policy with its state", body = Vec<PolicyView>)))]
pub async fn list_policies(p: Principal, State(app): S) -> AppResult<Json<Vec<PolicyView>>> {
    p.require(CLIENT_OR_AGENT)?;
    let records = app.agents.list_policies().await?;
    let mut states: std::collections::BTreeMap<String, serde_json::Value> =
        app.agents.policy_states().await?.into_iter().collect();
    Ok(Json(
        records
            .into_iter()
            .map(|r| {
                let state = states.remove(&r.policy.name);
                view(r, state)
            })
            .collect(),
    ))
}

/// One spawn policy, with where its agent is.
#[utoipa::path(get, path = "/api/v1/policies/{id}", params(IdParam), tag = "policies",
    responses(
        (status = 200, description = "the policy with its state", body = PolicyView),
        (status = 400, description = "the name is invalid", body = ErrorBody),
        (status = 404, description = "no such policy", body = ErrorBody),
    ))]
pub async fn get_policy(p: Principal, State(app): S, name: PathId) -> AppResult<Json<PolicyView>> {
    p.require(CLIENT_OR_AGENT)?;
    let name = policy_name(name)?;
    let record = app
        .agents
        .get_policy(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no policy `{name}`")))?;
    let state = state_of(&app, &name).await?;
    Ok(Json(view(record, state)))
}

/// Every version a policy had, oldest first; a deletion is a version without a policy.
#[utoipa::path(get, path = "/api/v1/policies/{id}/history", params(IdParam), tag = "policies",
    responses(
        (status = 200, description = "the versions", body = Vec<PolicyVersion>),
        (status = 400, description = "the name is invalid", body = ErrorBody),
        (status = 404, description = "no policy ever had this name", body = ErrorBody),
    ))]
pub async fn policy_history(
    p: Principal,
    State(app): S,
    name: PathId,
) -> AppResult<Json<Vec<PolicyVersion>>> {
    p.require(CLIENT_OR_AGENT)?;
    let name = policy_name(name)?;
    let history = app.agents.policy_history(&name).await?;
    if history.is_empty() {
        return Err(ApiError::not_found(format!(
            "no policy `{name}` ever existed"
        )));
    }
    Ok(Json(history))
}

/// Delete a policy; its agent is stopped.
#[utoipa::path(delete, path = "/api/v1/policies/{id}", params(IdParam), tag = "policies",
    responses(
        (status = 204, description = "deleted"),
        (status = 400, description = "the name is invalid", body = ErrorBody),
        (status = 404, description = "no such policy", body = ErrorBody),
    ))]
pub async fn delete_policy(p: Principal, State(app): S, name: PathId) -> AppResult<StatusCode> {
    p.require(CLIENT)?;
    let name = policy_name(name)?;
    let gone = app.agents.delete_policy(&name, app.clock.now_ms()).await?;
    app.coord.publish_events(gone.events);
    if !gone.value {
        return Err(ApiError::not_found(format!("no policy `{name}`")));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Restart a policy's running agent: an `agent.restart` command the lifecycle manager carries
/// out (stop gracefully, start a new agent). Follow it with `GET /api/v1/commands/{id}`.
#[utoipa::path(post, path = "/api/v1/policies/{id}/restart", params(IdParam), tag = "policies",
    responses(
        (status = 202, description = "the restart command, requested", body = Command),
        (status = 400, description = "the name is invalid", body = ErrorBody),
        (status = 404, description = "no such policy", body = ErrorBody),
        (status = 409, description = "the policy's agent is not running", body = ErrorBody),
    ))]
pub async fn restart_policy(
    p: Principal,
    State(app): S,
    name: PathId,
) -> AppResult<(StatusCode, Json<Command>)> {
    p.require(CLIENT)?;
    let name = policy_name(name)?;
    let record = app
        .agents
        .get_policy(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no policy `{name}`")))?;
    let state = state_of(&app, &name).await?;
    let status = state
        .as_ref()
        .and_then(|s| s["status"].as_str())
        .unwrap_or("stopped")
        .to_string();
    let agent = state
        .as_ref()
        .and_then(|s| s["spawnRequestId"].as_str())
        .map(str::to_string);
    let (true, Some(agent)) = (status == "running", agent) else {
        return Err(ApiError::conflict(format!(
            "policy `{name}`'s agent is not running (it is {status}); nothing to restart"
        )));
    };
    let now = app.clock.now_ms();
    let policy = &record.policy;
    let deadline = (policy.stop_timeout_secs + policy.spawn_timeout_secs + 60) as i64 * 1000;
    let command = kennel_store::NewCommand {
        id: format!("c-{}", crate::ids::time_ordered()),
        kind: "agent.restart".into(),
        policy: Some(name.clone()),
        target: agent,
        args: serde_json::json!({}),
        deadline_at: now + deadline,
    };
    let done = app.agents.create_command(&command, now).await?;
    app.coord.publish_events(done.events);
    Ok((StatusCode::ACCEPTED, Json(done.value)))
}

/// Register an agent (again): it gets the next epoch. Calls carrying an older epoch are
/// refused from then on.
#[utoipa::path(post, path = "/api/v1/agents", request_body = RegisterAgent, tag = "agents",
    responses(
        (status = 201, description = "the agent, with its epoch", body = Agent),
        (status = 400, description = "the body is invalid; the message names the field", body = ErrorBody),
        (status = 403, description = "the id is registered with another key", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn register_agent(
    p: Principal,
    State(app): S,
    body: Result<JsonBody<RegisterAgent>, ApiError>,
) -> AppResult<(StatusCode, Json<Agent>)> {
    p.require(AGENT)?;
    let JsonBody(reg) = body?;
    reg.validate().map_err(invalid)?;
    for (what, n) in [
        ("tags", reg.tags.len()),
        ("capabilities", reg.capabilities.len()),
        ("channels", reg.channels.len()),
    ] {
        too_many(what, n)?;
    }
    let done = app
        .agents
        .register_agent(&reg, None, Some(&p.key_id), app.clock.now_ms())
        .await?;
    app.coord.publish_events(done.events);
    let agent = done.value.ok_or_else(|| {
        ApiError::forbidden(format!(
            "agent `{}` was registered with another key; only that key may register it again",
            reg.id
        ))
    })?;
    Ok((StatusCode::CREATED, Json(agent)))
}

/// An agent's heartbeat, with its session guard.
#[utoipa::path(post, path = "/api/v1/agents/{id}/heartbeat", params(IdParam),
    request_body = SessionGuard, tag = "agents",
    responses(
        (status = 204, description = "seen"),
        (status = 400, description = "the id or the body is invalid", body = ErrorBody),
        (status = 404, description = "no such agent", body = ErrorBody),
        (status = 409, description = "a stale instance: the agent registered again since", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn agent_heartbeat(
    p: Principal,
    State(app): S,
    id: PathId,
    body: Result<JsonBody<SessionGuard>, ApiError>,
) -> AppResult<StatusCode> {
    p.require(AGENT)?;
    let id = path_id("agent id", id)?;
    let JsonBody(guard) = body?;
    if act_as(&p, &app, &id, None).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "no agent `{id}` is registered"
        )));
    }
    check_guard(&app, &id, &guard).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every agent in the registry.
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents",
    responses((status = 200, description = "every agent", body = Vec<Agent>)))]
pub async fn list_agents(p: Principal, State(app): S) -> AppResult<Json<Vec<Agent>>> {
    p.require(CLIENT_OR_AGENT)?;
    Ok(Json(app.agents.list_agents().await?))
}

/// One agent.
#[utoipa::path(get, path = "/api/v1/agents/{id}", params(IdParam), tag = "agents",
    responses(
        (status = 200, description = "the agent", body = Agent),
        (status = 400, description = "the id is invalid", body = ErrorBody),
        (status = 404, description = "no such agent", body = ErrorBody),
    ))]
pub async fn get_agent(p: Principal, State(app): S, id: PathId) -> AppResult<Json<Agent>> {
    p.require(CLIENT_OR_AGENT)?;
    let id = path_id("agent id", id)?;
    let agent = app
        .agents
        .get_agent(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no agent `{id}` is registered")))?;
    Ok(Json(agent))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InboxQuery {
    /// Messages after this `seq` (the previous page's `nextCursor`); default 0.
    #[param(value_type = i64, required = false, minimum = 0)]
    after: Option<i64>,
    /// Page size, 1 to 1000; default 100.
    #[param(value_type = u32, required = false, minimum = 1, maximum = 1000, default = 100)]
    limit: Option<u32>,
    /// With `epoch`: the reading agent's session guard.
    #[param(
        value_type = String,
        required = false,
        pattern = r"^(?![-.])(?!.*\.\.)[A-Za-z0-9._-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    instance_id: Option<String>,
    #[param(value_type = i64, required = false)]
    epoch: Option<i64>,
}

/// An agent's inbox: messages to it and to every address it answers to, oldest first. Those
/// listed are delivered to it; claimable ones are listed while unclaimed or claimed by it.
#[utoipa::path(get, path = "/api/v1/agents/{id}/inbox", params(IdParam, InboxQuery), tag = "messages",
    responses(
        (status = 200, description = "a page of the inbox", body = InboxPage),
        (status = 400, description = "the id or a parameter is invalid", body = ErrorBody),
        (status = 404, description = "an agent key asked for an agent that is not registered", body = ErrorBody),
        (status = 409, description = "a stale instance: the agent registered again since", body = ErrorBody),
    ))]
pub async fn inbox(
    p: Principal,
    State(app): S,
    id: PathId,
    q: Result<Query<InboxQuery>, axum::extract::rejection::QueryRejection>,
) -> AppResult<Json<InboxPage>> {
    p.require(CLIENT_OR_AGENT)?;
    let id = path_id("agent id", id)?;
    let Query(q) = q.map_err(query_error)?;
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::invalid("`after` must be 0 or more"));
    }
    let limit = page_limit(q.limit, DEFAULT_INBOX_PAGE, 1000)?;
    let guard = guard_of(q.instance_id, q.epoch)?;
    may_read_inbox(&p, &app, &id, guard).await?;
    let page = app
        .agents
        .inbox(&id, after, limit, app.clock.now_ms())
        .await?;
    app.coord.publish_events(page.events);
    let next_cursor = page.value.last().map_or(after, |m| m.seq);
    if !page.value.is_empty() {
        app.agents.agent_active(&id, app.clock.now_ms()).await?;
    }
    Ok(Json(InboxPage {
        messages: page.value,
        next_cursor,
    }))
}

/// One server-sent event of `GET /api/v1/agents/{id}/inbox/stream`, as an SSE client reads
/// it (the OpenAPI document's schema of each event; never built).
#[derive(utoipa::ToSchema)]
pub struct InboxStreamEvent {
    /// `message`, or `error` when the stream ends early (data: why).
    #[schema(min_length = 1)]
    pub event: String,
    /// The message's `seq`, usable as `Last-Event-ID` and `after`.
    #[schema(pattern = "^[0-9]+$")]
    pub id: Option<String>,
    /// The `Message` as JSON (the reason, for `error`).
    pub data: String,
}

/// An agent's inbox as server-sent events: the messages after `after` (or `Last-Event-ID`),
/// then each new one as it arrives; each is delivered to the agent as it is sent, as a poll
/// of the inbox would.
#[utoipa::path(get, path = "/api/v1/agents/{id}/inbox/stream",
    params(
        IdParam,
        InboxQuery,
        ("Last-Event-ID" = Option<String>, Header, pattern = "^[0-9]{0,18}$",
            description = "seq of the last message received: resume after it"),
    ),
    tag = "messages",
    responses(
        (status = 200, description = "the inbox, then new messages as they come", content_type = "text/event-stream", body = InboxStreamEvent),
        (status = 400, description = "the id, a parameter or Last-Event-ID is invalid", body = ErrorBody),
        (status = 404, description = "an agent key asked for an agent that is not registered", body = ErrorBody),
        (status = 409, description = "a stale instance: the agent registered again since", body = ErrorBody),
    ))]
pub async fn inbox_stream(
    p: Principal,
    State(app): S,
    id: PathId,
    headers: axum::http::HeaderMap,
    q: Result<Query<InboxQuery>, axum::extract::rejection::QueryRejection>,
) -> AppResult<axum::response::Response> {
    use axum::response::sse::Event as SseEvent;
    use tokio::sync::broadcast::error::RecvError;
    p.require(CLIENT_OR_AGENT)?;
    let id = path_id("agent id", id)?;
    let Query(q) = q.map_err(query_error)?;
    let mut after = crate::stream::resume_after(&headers, q.after, "a message seq")?;
    let limit = page_limit(q.limit, DEFAULT_INBOX_PAGE, 1000)?;
    let guard = guard_of(q.instance_id, q.epoch)?;
    may_read_inbox(&p, &app, &id, guard).await?;
    let mut live = app.coord.subscribe_events();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let revoked = app.coord.revocation_of(&p.key_id);
    tokio::spawn(async move {
        let follow = async {
            loop {
                // Everything after the cursor, page by page; then wait for news.
                loop {
                    let page = app
                        .agents
                        .inbox(&id, after, limit, app.clock.now_ms())
                        .await?;
                    app.coord.publish_events(page.events);
                    let n = page.value.len();
                    for m in page.value {
                        after = m.seq;
                        let ev = SseEvent::default()
                            .id(m.seq.to_string())
                            .event("message")
                            .json_data(&m)
                            .map_err(|e| ApiError::internal(e.to_string()))?;
                        if tx.send(Ok(ev)).await.is_err() {
                            return Ok(());
                        }
                    }
                    if n < limit as usize {
                        break;
                    }
                }
                loop {
                    tokio::select! {
                        ev = live.recv() => match ev {
                            Ok(e) if e.kind.starts_with("message.") => break,
                            Ok(_) => {}
                            Err(RecvError::Lagged(_)) => break,
                            Err(RecvError::Closed) => return Ok(()),
                        },
                        () = tx.closed() => return Ok(()),
                    }
                }
            }
        };
        let r: Result<(), ApiError> = tokio::select! {
            r = follow => r,
            () = revoked => Err(ApiError::unauthorized(crate::stream::KEY_REVOKED)),
        };
        if let Err(e) = r {
            let _ = tx
                .send(Ok(SseEvent::default().event("error").data(e.to_string())))
                .await;
        }
    });
    Ok(crate::stream::sse_response(rx))
}

/// Send a message. With an `idempotencyKey` already used by the sender, the first message is
/// returned (200) and nothing is sent again.
#[utoipa::path(post, path = "/api/v1/messages", request_body = SendMessage, tag = "messages",
    responses(
        (status = 200, description = "a message with this idempotency key was sent before: that one", body = Message),
        (status = 201, description = "the message, queued", body = Message),
        (status = 400, description = "the body is invalid; the message names the field", body = ErrorBody),
        (status = 403, description = "`from` is an agent registered with another key", body = ErrorBody),
        (status = 409, description = "the sender used this idempotency key for another message", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn send_message(
    p: Principal,
    State(app): S,
    body: Result<JsonBody<SendMessage>, ApiError>,
) -> AppResult<(StatusCode, Json<Message>)> {
    p.require(CLIENT_OR_AGENT)?;
    let JsonBody(req) = body?;
    let to = Address::parse(&req.to).map_err(invalid)?;
    let from = req.from.unwrap_or_else(|| "user".to_string());
    // An agent key sends as one of its agents; a person's key as any name not registered.
    let registered = act_as(&p, &app, &from, None).await?;
    let kind = req.kind.unwrap_or_else(|| "chat".to_string());
    validate_id("message kind", &kind).map_err(invalid)?;
    if req.body.is_empty() || req.body.len() > MAX_MESSAGE_BODY {
        return Err(ApiError::invalid(format!(
            "`body` must be 1 to {MAX_MESSAGE_BODY} bytes"
        )));
    }
    if req.subject.as_ref().is_some_and(|s| s.len() > MAX_SUBJECT) {
        return Err(ApiError::invalid(format!(
            "`subject` must be at most {MAX_SUBJECT} bytes"
        )));
    }
    for (what, v) in [
        ("idempotency key", &req.idempotency_key),
        ("replyTo", &req.reply_to),
    ] {
        if let Some(v) = v {
            validate_id(what, v).map_err(invalid)?;
        }
    }
    let now = app.clock.now_ms();
    let expires_at = match req.ttl_secs {
        Some(t) if (1..=MAX_TTL_SECS).contains(&t) => Some(now + (t as i64) * 1000),
        Some(t) => {
            return Err(ApiError::invalid(format!(
                "`ttlSecs` {t} is out of range: 1 to {MAX_TTL_SECS}"
            )))
        }
        None => None,
    };
    let message = NewMessage {
        id: format!("m-{}", crate::ids::time_ordered()),
        from: from.clone(),
        to,
        kind,
        subject: req.subject,
        body: req.body,
        payload: req.payload,
        idempotency_key: req.idempotency_key,
        claimable: req.claimable,
        expires_at,
        reply_to: req.reply_to,
    };
    let sent = app.agents.send_message(&message, now).await?;
    app.coord.publish_events(sent.events);
    let (stored, how) = sent.value;
    let status = match how {
        Sent::New => StatusCode::CREATED,
        Sent::Duplicate => StatusCode::OK,
        Sent::KeyReused => {
            return Err(ApiError::conflict(format!(
                "idempotency key already used by `{from}` for another message ({}); use a new \
                 key for a new message",
                stored.id
            )))
        }
    };
    if registered.is_some() {
        app.agents.agent_active(&from, now).await?;
    }
    Ok((status, Json(stored)))
}

/// Checks a call on message `{id}` made as agent `agent_id` (claim, release, read): the
/// ids, the agent's key and its session guard. Returns the message id.
async fn on_message(
    p: &Principal,
    app: &AppState,
    id: PathId,
    agent_id: &str,
    instance_id: Option<String>,
    epoch: Option<i64>,
) -> AppResult<String> {
    let id = path_id("message id", id)?;
    let guard = guard_of(instance_id, epoch)?;
    act_as_agent(p, app, agent_id, guard).await?;
    Ok(id)
}

/// One message.
#[utoipa::path(get, path = "/api/v1/messages/{id}", params(IdParam), tag = "messages",
    responses(
        (status = 200, description = "the message", body = Message),
        (status = 400, description = "the id is invalid", body = ErrorBody),
        (status = 404, description = "no such message", body = ErrorBody),
    ))]
pub async fn get_message(p: Principal, State(app): S, id: PathId) -> AppResult<Json<Message>> {
    p.require(CLIENT_OR_AGENT)?;
    let id = path_id("message id", id)?;
    let m = app
        .agents
        .get_message(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no message `{id}`")))?;
    Ok(Json(m))
}

/// Claim a claimable message for an agent: the first claim wins; the others get 409 with the
/// holder. A claim runs out after `ttlSecs` unless the message is read first.
#[utoipa::path(post, path = "/api/v1/messages/{id}/claim", params(IdParam),
    request_body = ClaimMessage, tag = "messages",
    responses(
        (status = 200, description = "claimed: the message, held by the agent", body = Message),
        (status = 400, description = "the id or the body is invalid", body = ErrorBody),
        (status = 403, description = "the agent is registered with another key", body = ErrorBody),
        (status = 404, description = "no such message or agent", body = ErrorBody),
        (status = 409, description = "another agent holds the claim, the message is closed or not claimable by this agent, or the instance is stale", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn claim_message(
    p: Principal,
    State(app): S,
    id: PathId,
    body: Result<JsonBody<ClaimMessage>, ApiError>,
) -> AppResult<Json<Message>> {
    p.require(CLIENT_OR_AGENT)?;
    let JsonBody(req) = body?;
    let id = on_message(&p, &app, id, &req.agent_id, req.instance_id, req.epoch).await?;
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_CLAIM_SECS);
    if !(1..=MAX_CLAIM_SECS).contains(&ttl) {
        return Err(ApiError::invalid(format!(
            "`ttlSecs` {ttl} is out of range: 1 to {MAX_CLAIM_SECS}"
        )));
    }
    let now = app.clock.now_ms();
    let claim = app
        .agents
        .claim_message(&id, &req.agent_id, (ttl * 1000) as i64, now)
        .await?;
    app.coord.publish_events(claim.events);
    match claim.value {
        Claim::Won(m) => Ok(Json(*m)),
        Claim::Held { by, until } => Err(ApiError::conflict(format!(
            "message `{id}` is claimed by `{by}` until {}",
            kennel_store::rfc3339(until)
        ))),
        Claim::NotClaimable => Err(ApiError::conflict(format!(
            "message `{id}` is not claimable by `{}`: it is not claimable, or not addressed to it",
            req.agent_id
        ))),
        Claim::Closed(state) => Err(ApiError::conflict(format!(
            "message `{id}` is {}: nothing left to claim",
            state.as_str()
        ))),
        Claim::Missing => Err(ApiError::not_found(format!("no message `{id}`"))),
    }
}

/// Give up an agent's claim, so another agent can claim the message.
#[utoipa::path(post, path = "/api/v1/messages/{id}/release", params(IdParam),
    request_body = ActAs, tag = "messages",
    responses(
        (status = 204, description = "released"),
        (status = 400, description = "the id or the body is invalid", body = ErrorBody),
        (status = 403, description = "the agent is registered with another key", body = ErrorBody),
        (status = 404, description = "no such agent", body = ErrorBody),
        (status = 409, description = "the agent holds no claim on the message, or the instance is stale", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn release_claim(
    p: Principal,
    State(app): S,
    id: PathId,
    body: Result<JsonBody<ActAs>, ApiError>,
) -> AppResult<StatusCode> {
    p.require(CLIENT_OR_AGENT)?;
    let JsonBody(who) = body?;
    let id = on_message(&p, &app, id, &who.agent_id, who.instance_id, who.epoch).await?;
    let done = app
        .agents
        .release_claim(&id, &who.agent_id, app.clock.now_ms())
        .await?;
    app.coord.publish_events(done.events);
    if !done.value {
        return Err(ApiError::conflict(format!(
            "`{}` holds no claim on message `{id}`",
            who.agent_id
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Mark a message read by one of its recipients (the holder, for a claimed message).
#[utoipa::path(post, path = "/api/v1/messages/{id}/read", params(IdParam),
    request_body = ActAs, tag = "messages",
    responses(
        (status = 200, description = "the message, read", body = Message),
        (status = 400, description = "the id or the body is invalid", body = ErrorBody),
        (status = 403, description = "the agent is registered with another key", body = ErrorBody),
        (status = 404, description = "no such message for this agent", body = ErrorBody),
        (status = 409, description = "a stale instance: the agent registered again since", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn read_message(
    p: Principal,
    State(app): S,
    id: PathId,
    body: Result<JsonBody<ActAs>, ApiError>,
) -> AppResult<Json<Message>> {
    p.require(CLIENT_OR_AGENT)?;
    let JsonBody(who) = body?;
    let id = on_message(&p, &app, id, &who.agent_id, who.instance_id, who.epoch).await?;
    let now = app.clock.now_ms();
    let done = app.agents.mark_read(&id, &who.agent_id, now).await?;
    app.coord.publish_events(done.events);
    let m = done.value.ok_or_else(|| {
        ApiError::not_found(format!(
            "no message `{id}` for `{}` (or it expired)",
            who.agent_id
        ))
    })?;
    app.agents.agent_active(&who.agent_id, now).await?;
    Ok(Json(m))
}

/// Delete a message.
#[utoipa::path(delete, path = "/api/v1/messages/{id}", params(IdParam), tag = "messages",
    responses(
        (status = 204, description = "deleted"),
        (status = 400, description = "the id is invalid", body = ErrorBody),
        (status = 404, description = "no such message", body = ErrorBody),
    ))]
pub async fn delete_message(p: Principal, State(app): S, id: PathId) -> AppResult<StatusCode> {
    p.require(CLIENT)?;
    let id = path_id("message id", id)?;
    let done = app.agents.delete_message(&id, app.clock.now_ms()).await?;
    app.coord.publish_events(done.events);
    if !done.value {
        return Err(ApiError::not_found(format!("no message `{id}`")));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CommandsQuery {
    /// Only the unfinished ones (requested, delivered, running).
    #[param(value_type = bool, required = false)]
    open: Option<bool>,
    /// Page size, 1 to 1000; default 100.
    #[param(value_type = u32, required = false, minimum = 1, maximum = 1000, default = 100)]
    limit: Option<u32>,
}

/// Commands to agents, newest first.
#[utoipa::path(get, path = "/api/v1/commands", params(CommandsQuery), tag = "agents",
    responses(
        (status = 200, description = "commands", body = Vec<Command>),
        (status = 400, description = "a parameter is invalid", body = ErrorBody),
    ))]
pub async fn list_commands(
    p: Principal,
    State(app): S,
    q: Result<Query<CommandsQuery>, axum::extract::rejection::QueryRejection>,
) -> AppResult<Json<Vec<Command>>> {
    p.require(CLIENT_OR_AGENT)?;
    let Query(q) = q.map_err(query_error)?;
    let limit = page_limit(q.limit, 100, 1000)?;
    Ok(Json(
        app.agents
            .list_commands(q.open.unwrap_or(false), limit)
            .await?,
    ))
}

/// One command.
#[utoipa::path(get, path = "/api/v1/commands/{id}", params(IdParam), tag = "agents",
    responses(
        (status = 200, description = "the command", body = Command),
        (status = 400, description = "the id is invalid", body = ErrorBody),
        (status = 404, description = "no such command", body = ErrorBody),
    ))]
pub async fn get_command(p: Principal, State(app): S, id: PathId) -> AppResult<Json<Command>> {
    p.require(CLIENT_OR_AGENT)?;
    let id = path_id("command id", id)?;
    let c = app
        .agents
        .get_command(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no command `{id}`")))?;
    Ok(Json(c))
}

/// The routes of this module, under `/api/v1`.
pub fn routes() -> axum::Router<Arc<AppState>> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/policies", post(apply_policy).get(list_policies))
        .route("/policies/{id}", get(get_policy).delete(delete_policy))
        .route("/policies/{id}/history", get(policy_history))
        .route("/policies/{id}/restart", post(restart_policy))
        .route("/agents", post(register_agent).get(list_agents))
        .route("/agents/{id}", get(get_agent))
        .route("/agents/{id}/heartbeat", post(agent_heartbeat))
        .route("/agents/{id}/inbox", get(inbox))
        .route("/agents/{id}/inbox/stream", get(inbox_stream))
        .route("/messages", post(send_message))
        .route("/messages/{id}", get(get_message).delete(delete_message))
        .route("/messages/{id}/claim", post(claim_message))
        .route("/messages/{id}/release", post(release_claim))
        .route("/messages/{id}/read", post(read_message))
        .route("/commands", get(list_commands))
        .route("/commands/{id}", get(get_command))
}
