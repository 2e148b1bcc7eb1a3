//! The build agents' stories on the REST API: the rendezvous's copy of the pipeline
//! ([`crate::rendezvous`]) listed, and edited by people (`kennel story`): add, move, block,
//! delete. Agents change stories through the document itself, over `WS /crdt-sync`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use kennel_proto::api::{
    BlockStory, CreateStory, ErrorBody, MoveStory, Scope, StoryStage, StoryView,
};
use kennel_proto::link::RepoSpec;
use kennel_proto::validate_id;
use kennel_sync::pipeline::NewStory;
use kennel_sync::{PipelineError, Stage, Story};
use utoipa::openapi::schema::{ArrayItems, Object, Schema};
use utoipa::openapi::RefOr;
use utoipa::OpenApi;

use crate::api::{
    path_id, property, string_schema, text, IdParam, JsonBody, ID_PATTERN, NOT_BLANK,
};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::rendezvous::{announce, Rendezvous, RendezvousError};
use crate::AppState;

type AppResult<T> = Result<T, ApiError>;
type S = State<Arc<AppState>>;
type PathId = Result<Path<String>, axum::extract::rejection::PathRejection>;

const READ: &[Scope] = &[Scope::Client, Scope::Agent];
const WRITE: &[Scope] = &[Scope::Client];

/// Longest title and block reason, and body, in bytes.
const MAX_TITLE: usize = 200;
const MAX_REASON: usize = 1_000;
const MAX_BODY: usize = 256 * 1024;
/// Most stories one depends on, and most retries.
const MAX_DEPENDS: usize = 64;
const MAX_RETRIES: u32 = 100;

#[derive(OpenApi)]
#[openapi(
    paths(list_stories, get_story, add_story, move_story, block_story, delete_story),
    modifiers(&StoryConstraints)
)]
pub struct StoriesDoc;

struct StoryConstraints;

impl utoipa::Modify for StoryConstraints {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        let schemas = &mut components.schemas;
        let mut field =
            |name: &str, set: &dyn Fn(&mut Object)| match property(schemas, "CreateStory", name) {
                Some(o) => set(o),
                None => tracing::error!(name, "OpenAPI: no such property of CreateStory"),
            };
        field("id", &|o| {
            text(o, 1, kennel_proto::validate::MAX_ID_LEN, Some(ID_PATTERN))
        });
        field("title", &|o| text(o, 1, MAX_TITLE, Some(NOT_BLANK)));
        field("body", &|o| {
            text(o, 0, MAX_BODY, None);
            crate::api::in_bytes(o, MAX_BODY);
        });
        field("profile", &|o| {
            text(o, 1, kennel_proto::validate::MAX_ID_LEN, Some(ID_PATTERN))
        });
        field("maxRetries", &|o| {
            o.minimum = Some(0.into());
            o.maximum = Some(MAX_RETRIES.into());
        });
        if let Some(RefOr::T(Schema::Object(parent))) = schemas.get_mut("CreateStory") {
            if let Some(RefOr::T(Schema::Array(a))) = parent.properties.get_mut("dependsOn") {
                a.max_items = Some(MAX_DEPENDS);
                let id = string_schema(1, kennel_proto::validate::MAX_ID_LEN, Some(ID_PATTERN));
                a.items = ArrayItems::RefOrSchema(Box::new(RefOr::T(Schema::Object(id))));
            }
        }
        if let Some(o) = property(schemas, "BlockStory", "reason") {
            text(o, 1, MAX_REASON, Some(NOT_BLANK));
        }
    }
}

fn rendezvous(app: &AppState) -> AppResult<Arc<Rendezvous>> {
    app.rendezvous
        .clone()
        .ok_or_else(|| ApiError::unavailable("the pipeline is not open on this coordinator"))
}

fn failed(e: RendezvousError) -> ApiError {
    match e {
        RendezvousError::Pipeline(PipelineError::NoStory(id)) => {
            ApiError::not_found(format!("no story `{id}`"))
        }
        RendezvousError::Pipeline(PipelineError::Exists(id)) => {
            ApiError::conflict(format!("story `{id}` exists already; pick another id"))
        }
        other => {
            tracing::error!(
                error = &other as &dyn std::error::Error,
                "pipeline change failed"
            );
            ApiError::unavailable(format!(
                "the pipeline could not be changed ({other}); retry"
            ))
        }
    }
}

fn stage_of(s: Stage) -> StoryStage {
    match s {
        Stage::Backlog => StoryStage::Backlog,
        Stage::Current => StoryStage::Current,
        Stage::Qa => StoryStage::Qa,
        Stage::Merge => StoryStage::Merge,
        Stage::Done => StoryStage::Done,
        Stage::Archived => StoryStage::Archived,
    }
}

fn stage_from(s: StoryStage) -> Stage {
    match s {
        StoryStage::Backlog => Stage::Backlog,
        StoryStage::Current => Stage::Current,
        StoryStage::Qa => Stage::Qa,
        StoryStage::Merge => Stage::Merge,
        StoryStage::Done => Stage::Done,
        StoryStage::Archived => Stage::Archived,
    }
}

fn view(s: Story) -> StoryView {
    StoryView {
        repo: (!s.repo.is_empty()).then(|| RepoSpec {
            url: s.repo.clone(),
            base_branch: s.base_branch.clone(),
        }),
        id: s.id,
        title: s.title,
        body: s.body,
        stage: stage_of(s.stage),
        profile: s.profile,
        depends_on: s.depends_on,
        max_retries: s.max_retries,
        blocked: s.blocked,
        owner: s.owner,
        claimants: s.claimants,
        branch: s.branch,
        commit: s.commit,
        failures: s.failures,
        last_error: s.last_error,
        attempt_log: s.log,
    }
}

/// A story as the API takes it.
fn new_story(req: CreateStory) -> NewStory {
    NewStory {
        id: req
            .id
            .unwrap_or_else(|| format!("s-{}", crate::ids::time_ordered())),
        title: req.title,
        body: req.body.unwrap_or_default(),
        profile: req.profile.unwrap_or_else(|| "claude".into()),
        repo: req.repo.as_ref().map(|r| r.url.clone()).unwrap_or_default(),
        base_branch: req.repo.map(|r| r.base_branch).unwrap_or_default(),
        depends_on: req.depends_on,
        max_retries: req.max_retries.unwrap_or(2),
    }
}

/// Every story of the pipeline, by id.
#[utoipa::path(get, path = "/api/v1/stories", tag = "stories",
    responses((status = 200, description = "every story", body = Vec<StoryView>)))]
pub async fn list_stories(p: Principal, State(app): S) -> AppResult<Json<Vec<StoryView>>> {
    p.require(READ)?;
    let rv = rendezvous(&app)?;
    Ok(Json(rv.stories().into_iter().map(view).collect()))
}

/// One story.
#[utoipa::path(get, path = "/api/v1/stories/{id}", params(IdParam), tag = "stories",
    responses(
        (status = 200, description = "the story", body = StoryView),
        (status = 400, description = "the id is invalid", body = ErrorBody),
        (status = 404, description = "no such story", body = ErrorBody),
    ))]
pub async fn get_story(p: Principal, State(app): S, id: PathId) -> AppResult<Json<StoryView>> {
    p.require(READ)?;
    let id = path_id("story id", id)?;
    let story = rendezvous(&app)?
        .story(&id)
        .ok_or_else(|| ApiError::not_found(format!("no story `{id}`")))?;
    Ok(Json(view(story)))
}

/// Add a story to the backlog.
#[utoipa::path(post, path = "/api/v1/stories", request_body = CreateStory, tag = "stories",
    responses(
        (status = 201, description = "the story, in the backlog", body = StoryView),
        (status = 400, description = "the body is invalid; the message names the field", body = ErrorBody),
        (status = 409, description = "a story with this id exists", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn add_story(
    p: Principal,
    State(app): S,
    body: Result<JsonBody<CreateStory>, ApiError>,
) -> AppResult<(StatusCode, Json<StoryView>)> {
    p.require(WRITE)?;
    let JsonBody(req) = body?;
    let bad = |m: String| Err(ApiError::invalid(m));
    if let Some(id) = &req.id {
        validate_id("story id", id).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    if req.title.trim().is_empty() || req.title.chars().count() > MAX_TITLE {
        return bad(format!("`title` must be 1 to {MAX_TITLE} characters"));
    }
    if req.body.as_ref().is_some_and(|b| b.len() > MAX_BODY) {
        return bad(format!("`body` must be at most {MAX_BODY} bytes"));
    }
    if let Some(profile) = &req.profile {
        validate_id("agent profile", profile).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    if let Some(repo) = &req.repo {
        repo.check()
            .map_err(|(field, reason)| ApiError::invalid(format!("`{field}` {reason}")))?;
    }
    if req.depends_on.len() > MAX_DEPENDS {
        return bad(format!("at most {MAX_DEPENDS} stories in `dependsOn`"));
    }
    for d in &req.depends_on {
        validate_id("story id", d).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    if req.max_retries.is_some_and(|n| n > MAX_RETRIES) {
        return bad(format!("`maxRetries` must be at most {MAX_RETRIES}"));
    }
    let new = new_story(req);
    let id = new.id.clone();
    let rv = rendezvous(&app)?;
    let now = app.clock.now_ms();
    let ((), moved) = rv.edit(|p| p.add_story(&new, now)).map_err(failed)?;
    announce(&app, moved).await;
    let story = rv
        .story(&id)
        .ok_or_else(|| ApiError::internal("a story just added is missing"))?;
    Ok((StatusCode::CREATED, Json(view(story))))
}

/// Move a story to a stage (`2_current` hands it to the agents).
#[utoipa::path(post, path = "/api/v1/stories/{id}/move", params(IdParam),
    request_body = MoveStory, tag = "stories",
    responses(
        (status = 200, description = "the story", body = StoryView),
        (status = 400, description = "the id or the body is invalid", body = ErrorBody),
        (status = 404, description = "no such story", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn move_story(
    p: Principal,
    State(app): S,
    id: PathId,
    body: Result<JsonBody<MoveStory>, ApiError>,
) -> AppResult<Json<StoryView>> {
    p.require(WRITE)?;
    let id = path_id("story id", id)?;
    let JsonBody(req) = body?;
    let rv = rendezvous(&app)?;
    let ((), moved) = rv
        .edit(|p| p.move_story(&id, stage_from(req.stage)))
        .map_err(failed)?;
    announce(&app, moved).await;
    let story = rv
        .story(&id)
        .ok_or_else(|| ApiError::not_found(format!("no story `{id}`")))?;
    Ok(Json(view(story)))
}

/// Block a story with a reason, or unblock it.
#[utoipa::path(post, path = "/api/v1/stories/{id}/block", params(IdParam),
    request_body = BlockStory, tag = "stories",
    responses(
        (status = 200, description = "the story", body = StoryView),
        (status = 400, description = "the id or the body is invalid", body = ErrorBody),
        (status = 404, description = "no such story", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn block_story(
    p: Principal,
    State(app): S,
    id: PathId,
    body: Result<JsonBody<BlockStory>, ApiError>,
) -> AppResult<Json<StoryView>> {
    p.require(WRITE)?;
    let id = path_id("story id", id)?;
    let JsonBody(req) = body?;
    if req
        .reason
        .as_ref()
        .is_some_and(|r| r.trim().is_empty() || r.chars().count() > MAX_REASON)
    {
        return Err(ApiError::invalid(format!(
            "`reason` must be 1 to {MAX_REASON} characters; leave it out to unblock"
        )));
    }
    let rv = rendezvous(&app)?;
    rv.edit(|p| p.block(&id, req.reason.as_deref()))
        .map_err(failed)?;
    let story = rv
        .story(&id)
        .ok_or_else(|| ApiError::not_found(format!("no story `{id}`")))?;
    Ok(Json(view(story)))
}

/// Delete a story (for good: no agent's copy brings it back).
#[utoipa::path(delete, path = "/api/v1/stories/{id}", params(IdParam), tag = "stories",
    responses(
        (status = 204, description = "deleted"),
        (status = 400, description = "the id is invalid", body = ErrorBody),
        (status = 404, description = "no such story", body = ErrorBody),
    ))]
pub async fn delete_story(p: Principal, State(app): S, id: PathId) -> AppResult<StatusCode> {
    p.require(WRITE)?;
    let id = path_id("story id", id)?;
    rendezvous(&app)?
        .edit(|p| p.delete_story(&id))
        .map_err(failed)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The routes of this module, under `/api/v1`.
pub fn routes() -> axum::Router<Arc<AppState>> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/stories", get(list_stories).post(add_story))
        .route("/stories/{id}", get(get_story).delete(delete_story))
        .route("/stories/{id}/move", post(move_story))
        .route("/stories/{id}/block", post(block_story))
}
