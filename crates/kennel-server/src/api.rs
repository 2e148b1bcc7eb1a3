//! The REST API under `/api/v1`, the OpenAPI document describing it, and the health, readiness
//! and metrics endpoints. Handlers check scopes, validate input and delegate to the
//! [`Coordinator`](crate::coordinator::Coordinator); they hold no state of their own.
//!
//! The document must tell the truth: every status an operation can answer, every parameter
//! where it is, and the limits the handlers (and `Coordinator::submit`) check, so a client
//! generated from it sends nothing the server refuses. A value outside a documented range is
//! refused with 400, never clamped or ignored. `scripts/api-check` holds the two together.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use kennel_proto::agents::MessageState;
use kennel_proto::api::{
    ApiKey, CreateKey, CreateTask, CreatedKey, Daemon, ErrorBody, Page, Scope, SendMessageRequest,
    ServerStatus, Task, TaskDetail,
};
use kennel_proto::{validate_id, TaskStatus};
use kennel_store::{rfc3339, Revoke, TaskFilter};
use serde::Deserialize;
use utoipa::openapi::schema::{AdditionalProperties, Object, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::OpenApi;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::AppState;

type AppResult<T> = Result<T, ApiError>;
type S = State<Arc<AppState>>;

const READ: &[Scope] = &[Scope::Client];

/// What [`validate_id`] accepts (task, daemon, key and agent ids, label names), for the
/// OpenAPI document: letters, digits, `-`, `_` and `.`, 1 to 128 long, not starting with `-`
/// or `.`, no `..`. Attributes must repeat it as a literal; a unit test holds them equal.
pub const ID_PATTERN: &str = r"^(?![-.])(?!.*\.\.)[A-Za-z0-9._-]{1,128}$";

/// A string holding at least one character that is not whitespace as Rust's
/// `char::is_whitespace` sees it (what `str::trim` removes): the server refuses blank names.
pub const NOT_BLANK: &str =
    r"[^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";

/// An environment variable name: letters, digits and `_`, not starting with a digit.
pub const ENV_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

/// What [`kennel_proto::validate_branch_name`] accepts (without its 200-byte limit, which is
/// `maxLength`): not `@`; not starting with `-`, `/` or `.`; not ending with `/`, `.` or
/// `.lock`; no `..`, `//`, `/.` or `@{`; no control characters, whitespace or `~^:?*[\`.
pub const BRANCH_PATTERN: &str = r"^(?!@$)(?![-/.])(?!.*(?:\.\.|//|/\.|@\{))(?!.*(?:[/.]|\.lock)$)[^\x00-\x20\x7f-\x9f\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000~^:?*\[\\]+$";

/// A list cursor: the decimal `nextCursor` of the previous page.
pub const CURSOR_PATTERN: &str = "^[0-9]{1,18}$";

/// Default page size of `GET /api/v1/tasks`.
const DEFAULT_PAGE: u32 = 50;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kennel coordinator API",
        description = "Submit and manage AI coding-agent tasks, watch daemons, manage API keys. \
            Every endpoint but /health and /ready needs `Authorization: Bearer <key>` and \
            answers 401 without a valid key, 403 when the key lacks the scope and 503 when \
            the store fails. Every error has the `ErrorBody` shape."
    ),
    paths(
        create_task, list_tasks, get_task, cancel_task, pause_task, resume_task, send_message,
        crate::stream::task_output, crate::stream::task_output_stream, crate::stream::events,
        list_daemons, get_daemon, drain_daemon, undrain_daemon,
        create_key, list_keys, revoke_key, status, health, ready, metrics_text
    ),
    components(schemas(ErrorBody, Page<Task>, kennel_proto::api::Event)),
    modifiers(&BearerAuth, &AuthResponses, &BodyConstraints, &NoNullParameters)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "apiKey",
            Vec::<String>::new(),
        )]);
    }
}

/// Adds what the key check can answer to every operation that needs a key, so no operation
/// can forget it: 401 (no key, wrong or revoked key), 403 (the key lacks the scope), 503 (the
/// store could not be asked). Operations that need no key say `security(())`.
struct AuthResponses;

impl utoipa::Modify for AuthResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let added = [
            (
                "401",
                "no API key, or an unknown or revoked one: send `Authorization: Bearer <key>`",
            ),
            ("403", "the key lacks the scope this operation needs"),
            ("503", "the coordinator's store failed; retry"),
        ];
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                if op.security.is_some() {
                    continue;
                }
                for (status, description) in added {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| error_response(description));
                }
            }
        }
    }
}

/// A query or header parameter is left out, never `null`: the derived `Option` parameters lose
/// the `null` their Rust type gives them.
struct NoNullParameters;

impl utoipa::Modify for NoNullParameters {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::SchemaType;
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            let params = ops
                .into_iter()
                .flatten()
                .filter_map(|op| op.parameters.as_mut())
                .flatten();
            for schema in params.filter_map(|p| p.schema.as_mut().and_then(object)) {
                if let SchemaType::Array(types) = &schema.schema_type {
                    let kept: Vec<Type> = types
                        .iter()
                        .filter(|t| **t != Type::Null)
                        .cloned()
                        .collect();
                    if let [one] = kept.as_slice() {
                        schema.schema_type = SchemaType::Type(one.clone());
                    }
                }
            }
        }
    }
}

/// An error response with the [`ErrorBody`] schema.
fn error_response(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

/// The limits the server enforces on request bodies, written into their schemas. The body
/// types live in `kennel-proto`, which knows nothing of OpenAPI beyond deriving the shapes;
/// the limits are the server's, so they are stated here, next to the handlers that check them
/// (and `Coordinator::submit`, which checks tasks).
struct BodyConstraints;

impl utoipa::Modify for BodyConstraints {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        let schemas = &mut components.schemas;
        let mut field = |schema: &str, name: &str, set: &dyn Fn(&mut Object)| match property(
            schemas, schema, name,
        ) {
            Some(o) => set(o),
            None => tracing::error!(schema, name, "OpenAPI: no such property to constrain"),
        };
        field("CreateTask", "name", &|o| {
            text(o, 1, MAX_TASK_NAME, Some(NOT_BLANK));
        });
        field("CreateTask", "prompt", &|o| {
            text(o, 1, MAX_PROMPT, None);
            in_bytes(o, MAX_PROMPT);
        });
        field("CreateTask", "agent", &|o| {
            text(o, 1, kennel_proto::validate::MAX_ID_LEN, Some(ID_PATTERN));
        });
        field("CreateTask", "labels", &|o| {
            o.max_properties = Some(MAX_LABELS);
            o.property_names = Some(Box::new(Schema::Object(string_schema(
                1,
                kennel_proto::validate::MAX_ID_LEN,
                Some(ID_PATTERN),
            ))));
            let value = string_schema(0, MAX_LABEL_VALUE, None);
            o.additional_properties = Some(Box::new(AdditionalProperties::RefOr(RefOr::T(
                Schema::Object(value),
            ))));
        });
        field("CreateTask", "env", &|o| {
            o.max_properties = Some(MAX_ENV_VARS);
            o.property_names = Some(Box::new(Schema::Object(string_schema(
                1,
                usize::MAX,
                Some(ENV_NAME_PATTERN),
            ))));
        });
        field("CreateTask", "maxAttempts", &|o| {
            o.minimum = Some(1.into());
            o.maximum = Some(MAX_ATTEMPTS.into());
        });
        field("CreateTask", "timeoutSecs", &|o| {
            o.minimum = Some(1.into());
            o.maximum = Some(MAX_TIMEOUT_SECS.into());
        });
        field("RepoSpec", "url", &|o| {
            text(o, 1, MAX_REPO_URL, Some(REPO_URL_PATTERN));
        });
        field("RepoSpec", "baseBranch", &|o| {
            // Empty: the remote's default branch.
            text(o, 0, MAX_BRANCH, Some(&format!("^$|{BRANCH_PATTERN}")));
            in_bytes(o, MAX_BRANCH);
        });
        field("CreateKey", "name", &|o| {
            text(o, 1, MAX_KEY_NAME, Some(NOT_BLANK));
        });
        field("SendMessageRequest", "message", &|o| {
            o.min_length = Some(1);
        });
        match schemas.get_mut("CreateKey").and_then(|s| object(s)) {
            Some(key) => {
                if let Some(RefOr::T(Schema::Array(scopes))) = key.properties.get_mut("scopes") {
                    scopes.min_items = Some(1);
                }
            }
            None => tracing::error!("OpenAPI: no CreateKey schema to constrain"),
        }
    }
}

/// Longest task name, in bytes (checked by `Coordinator::submit`).
const MAX_TASK_NAME: usize = 200;
/// Longest prompt, in bytes (checked by `Coordinator::submit`).
const MAX_PROMPT: usize = 512 * 1024;
/// Most labels on a task, and longest label value (checked by `Coordinator::submit`).
const MAX_LABELS: usize = 64;
const MAX_LABEL_VALUE: usize = 256;
/// Most environment variables on a task (checked by `Coordinator::submit`).
const MAX_ENV_VARS: usize = 256;
/// Most attempts a task may ask for (checked by `Coordinator::submit`).
const MAX_ATTEMPTS: i32 = 100;
/// Longest attempt timeout: what the store can hold (checked in [`create_task`]).
const MAX_TIMEOUT_SECS: i64 = i64::MAX;
/// Longest repository URL and base branch (checked by `Coordinator::submit`).
const MAX_REPO_URL: usize = 2048;
const MAX_BRANCH: usize = 200;
/// A repository URL: not starting with `-` (never read as a git flag), not blank.
const REPO_URL_PATTERN: &str =
    r"^(?!-)[\s\S]*[^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";
/// Longest API key name.
const MAX_KEY_NAME: usize = 100;

/// The object schema of property `name` of component `schema`.
pub(crate) fn property<'a>(
    schemas: &'a mut std::collections::BTreeMap<String, RefOr<Schema>>,
    schema: &str,
    name: &str,
) -> Option<&'a mut Object> {
    let parent = object(schemas.get_mut(schema)?)?;
    object(parent.properties.get_mut(name)?)
}

pub(crate) fn object(s: &mut RefOr<Schema>) -> Option<&mut Object> {
    match s {
        RefOr::T(Schema::Object(o)) => Some(o),
        _ => None,
    }
}

/// Sets a string's length bounds (characters) and pattern.
pub(crate) fn text(o: &mut Object, min: usize, max: usize, pattern: Option<&str>) {
    o.min_length = Some(min);
    o.max_length = (max != usize::MAX).then_some(max);
    o.pattern = pattern.map(str::to_string);
}

/// Says that the server counts `max` in bytes of UTF-8, where `maxLength` counts characters:
/// text in multi-byte characters reaches the limit sooner.
pub(crate) fn in_bytes(o: &mut Object, max: usize) {
    let note = format!("At most {max} bytes of UTF-8.");
    o.description = Some(match o.description.take() {
        Some(d) => format!("{d} {note}"),
        None => note,
    });
}

pub(crate) fn string_schema(min: usize, max: usize, pattern: Option<&str>) -> Object {
    let mut o = Object::with_type(Type::String);
    text(&mut o, min, max, pattern);
    o
}

/// The OpenAPI document, with the page limit this server is configured with.
pub async fn openapi_json(_p: Principal, State(app): S) -> Json<utoipa::openapi::OpenApi> {
    let mut doc = document();
    let max_page = app.coord.cfg.api.max_page;
    let limit = doc
        .paths
        .paths
        .get_mut("/api/v1/tasks")
        .and_then(|item| item.get.as_mut())
        .and_then(|op| op.parameters.as_mut())
        .and_then(|params| params.iter_mut().find(|p| p.name == "limit"))
        .and_then(|p| p.schema.as_mut())
        .and_then(object);
    if let Some(limit) = limit {
        limit.maximum = Some(max_page.into());
        limit.default = Some(DEFAULT_PAGE.min(max_page).into());
    }
    Json(doc)
}

/// The whole API's document: the coordinator's operations and the long-lived agents'
/// ([`crate::agents::AgentsDoc`]), with what every operation that needs a key can answer.
pub fn document() -> utoipa::openapi::OpenApi {
    use utoipa::Modify;
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::agents::AgentsDoc::openapi());
    doc.merge(crate::stories::StoriesDoc::openapi());
    doc.merge(crate::join::JoinDoc::openapi());
    AuthResponses.modify(&mut doc);
    NoNullParameters.modify(&mut doc);
    doc
}

/// The API docs page: a static shell that asks for a key and renders `/api/openapi.json`.
pub async fn docs_page() -> Html<&'static str> {
    Html(include_str!("../../../web/api-docs.html"))
}

/// The `{id}` path segment of tasks, daemons and keys. Handlers read it with [`path_id`],
/// which checks it the same way.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct IdParam {
    /// Letters, digits, `-`, `_` and `.`; 1 to 128 long; not starting with `-` or `.`; no `..`.
    #[param(
        pattern = r"^(?![-.])(?!.*\.\.)[A-Za-z0-9._-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    pub id: String,
}

/// The `{id}` of a route, checked with [`validate_id`]; axum's own refusal (a segment that is
/// not UTF-8) is answered in the API's error shape too.
pub fn path_id(
    what: &'static str,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> AppResult<String> {
    let Path(id) =
        id.map_err(|e| ApiError::invalid(format!("invalid {what}: {}", e.body_text())))?;
    validate_id(what, &id).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(id)
}

/// Turns a query string that does not parse into the API's error shape, naming the document.
pub fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::invalid(format!(
        "{}; the parameters are described at /api/openapi.json",
        e.body_text()
    ))
}

/// Checks a page size against its bounds: out of range is refused, never clamped.
pub fn page_limit(limit: Option<u32>, default: u32, max: u32) -> AppResult<u32> {
    match limit {
        None => Ok(default.min(max)),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(format!(
            "`limit` {n} is out of range: pass 1 to {max} (default {})",
            default.min(max)
        ))),
    }
}

/// Submit a task.
#[utoipa::path(post, path = "/api/v1/tasks", request_body = CreateTask, tag = "tasks",
    responses(
        (status = 201, description = "the task, queued", body = Task),
        (status = 400, description = "the body is not a valid task; the message names the field", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn create_task(
    p: Principal,
    State(app): S,
    body: Result<JsonBody<CreateTask>, ApiError>,
) -> AppResult<(StatusCode, Json<Task>)> {
    p.require(READ)?;
    let JsonBody(req) = body?;
    if req
        .timeout_secs
        .is_some_and(|t| t > MAX_TIMEOUT_SECS as u64)
    {
        return Err(ApiError::invalid(format!(
            "`timeoutSecs` must be at most {MAX_TIMEOUT_SECS}"
        )));
    }
    let task = app.coord.submit(req).await?;
    Ok((StatusCode::CREATED, Json(task)))
}

/// A JSON request body of type `T`, refused in the API's error shape with serde's precise
/// message. JSON Schema, and so the OpenAPI document, counts `3.0` as an integer while serde
/// does not: a body that fails only for such numbers is decoded again with them as integers.
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned, St: Send + Sync> axum::extract::FromRequest<St>
    for JsonBody<T>
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &St) -> AppResult<Self> {
        if !is_json(req.headers()) {
            return Err(ApiError::invalid(
                "send the body as JSON with `Content-Type: application/json`",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    too_large()
                } else {
                    ApiError::invalid(format!("failed to read the body: {}", e.body_text()))
                }
            })?;
        let first = match Json::<T>::from_bytes(&bytes) {
            Ok(Json(body)) => return Ok(JsonBody(body)),
            Err(e) => e,
        };
        let mut value = match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(v) => v,
            Err(_) => return Err(json_error(first)),
        };
        if !integral_floats_to_integers(&mut value) {
            return Err(json_error(first));
        }
        let again = serde_json::to_vec(&value).map_err(|_| json_error(first))?;
        Json::<T>::from_bytes(&again)
            .map(|Json(body)| JsonBody(body))
            .map_err(json_error)
    }
}

/// `application/json`, or any `application/*+json`, as axum's `Json` accepts.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or_default().trim();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json")
            || sub.len() > 5 && sub[sub.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// Rewrites every number like `3.0` (a float with no fraction that fits an integer) as `3`;
/// true when it changed something.
fn integral_floats_to_integers(v: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            let whole = f.fract() == 0.0;
            if whole && f >= -(2f64.powi(63)) && f < 2f64.powi(63) {
                *v = Value::from(f as i64);
                true
            } else if whole && f >= 0.0 && f < 2f64.powi(64) {
                *v = Value::from(f as u64);
                true
            } else {
                false
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, i| integral_floats_to_integers(i) | changed),
        Value::Object(map) => map
            .values_mut()
            .fold(false, |changed, i| integral_floats_to_integers(i) | changed),
        _ => false,
    }
}

fn too_large() -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: "payloadTooLarge",
        message: "request body is larger than the server's limit (api.max_body_bytes); send \
                  less, or raise the limit"
            .into(),
    }
}

/// Turns axum's body rejections into our error shape, keeping serde's precise message.
pub fn json_error(e: axum::extract::rejection::JsonRejection) -> ApiError {
    use axum::extract::rejection::JsonRejection as J;
    match e {
        J::MissingJsonContentType(_) => {
            ApiError::invalid("send the body as JSON with `Content-Type: application/json`")
        }
        J::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        other => ApiError::invalid(format!("invalid JSON body: {}", other.body_text())),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only tasks in this state.
    #[param(value_type = TaskStatus, required = false)]
    status: Option<String>,
    /// Only tasks held by this daemon (a daemon id).
    #[param(
        value_type = String,
        required = false,
        pattern = r"^(?![-.])(?!.*\.\.)[A-Za-z0-9._-]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    daemon: Option<String>,
    /// Page size: 1 to the server's `api.max_page` (1000 unless configured); default 50.
    #[param(value_type = u32, required = false, minimum = 1, maximum = 1000, default = 50)]
    limit: Option<u32>,
    /// `nextCursor` of the previous page.
    #[param(value_type = String, required = false, pattern = "^[0-9]{1,18}$")]
    cursor: Option<String>,
}

/// List tasks, newest first.
#[utoipa::path(get, path = "/api/v1/tasks", params(ListQuery), tag = "tasks",
    responses(
        (status = 200, description = "a page of tasks", body = Page<Task>),
        (status = 400, description = "a query parameter is invalid or out of range", body = ErrorBody),
    ))]
pub async fn list_tasks(
    p: Principal,
    State(app): S,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> AppResult<Json<Page<Task>>> {
    p.require(READ)?;
    let Query(q) = q.map_err(query_error)?;
    let status = q
        .status
        .as_deref()
        .map(str::parse::<TaskStatus>)
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(d) = &q.daemon {
        validate_id("daemon id", d).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    let before = q.cursor.as_deref().map(parse_cursor).transpose()?;
    let limit = page_limit(q.limit, DEFAULT_PAGE, app.coord.cfg.api.max_page)?;
    let rows = app
        .store
        .list_tasks(&TaskFilter {
            status,
            daemon_id: q.daemon,
            before,
            limit: limit + 1,
        })
        .await?;
    let more = rows.len() > limit as usize;
    let mut items: Vec<_> = rows.into_iter().take(limit as usize).collect();
    let next_cursor = if more {
        items.last().map(|t| t.order.to_string())
    } else {
        None
    };
    Ok(Json(Page {
        items: items
            .drain(..)
            .map(|q| app.coord.overlay_task(q.task))
            .collect(),
        next_cursor,
    }))
}

/// A cursor is the decimal `nextCursor` of a page ([`CURSOR_PATTERN`]), nothing else.
fn parse_cursor(c: &str) -> AppResult<i64> {
    decimal(c, 18)
        .and_then(|n| i64::try_from(n).ok())
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "invalid cursor `{}`: pass back `nextCursor` as given",
                c.chars().take(40).collect::<String>()
            ))
        })
}

/// A number written in 1 to `max_digits` ASCII digits and nothing else (no sign, no spaces):
/// how cursors and event ids are written.
pub fn decimal(s: &str, max_digits: usize) -> Option<u64> {
    let digits = !s.is_empty() && s.len() <= max_digits && s.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| s.parse().ok()).flatten()
}

/// A task with its attempts.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", params(IdParam), tag = "tasks",
    responses(
        (status = 200, description = "the task with its attempts", body = TaskDetail),
        (status = 400, description = "the task id is invalid", body = ErrorBody),
        (status = 404, description = "no such task", body = ErrorBody),
    ))]
pub async fn get_task(
    p: Principal,
    State(app): S,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> AppResult<Json<TaskDetail>> {
    p.require(READ)?;
    let id = path_id("task id", id)?;
    let task = app.coord.task(&id).await?;
    let attempts = app.store.list_attempts(&id).await?;
    Ok(Json(TaskDetail { task, attempts }))
}

/// Cancel a task: a queued task ends at once; a running one is interrupted on its daemon.
/// Cancelling an ended task returns it unchanged.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/cancel", params(IdParam), tag = "tasks",
    responses(
        (status = 200, description = "the task, cancelled (or as it ended)", body = Task),
        (status = 400, description = "the task id is invalid", body = ErrorBody),
        (status = 404, description = "no such task", body = ErrorBody),
        (status = 409, description = "the task changed state meanwhile; retry", body = ErrorBody),
    ))]
pub async fn cancel_task(
    p: Principal,
    State(app): S,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> AppResult<Json<Task>> {
    p.require(READ)?;
    let id = path_id("task id", id)?;
    Ok(Json(app.coord.cancel(&id).await?))
}

/// Pause a running task (SIGSTOP to its process group on the daemon).
#[utoipa::path(post, path = "/api/v1/tasks/{id}/pause", params(IdParam), tag = "tasks",
    responses(
        (status = 200, description = "the task, paused", body = Task),
        (status = 400, description = "the task id is invalid", body = ErrorBody),
        (status = 404, description = "no such task", body = ErrorBody),
        (status = 409, description = "the task is not running", body = ErrorBody),
    ))]
pub async fn pause_task(
    p: Principal,
    State(app): S,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> AppResult<Json<Task>> {
    p.require(READ)?;
    let id = path_id("task id", id)?;
    Ok(Json(app.coord.set_paused(&id, true).await?))
}

/// Resume a paused task.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/resume", params(IdParam), tag = "tasks",
    responses(
        (status = 200, description = "the task, running again", body = Task),
        (status = 400, description = "the task id is invalid", body = ErrorBody),
        (status = 404, description = "no such task", body = ErrorBody),
        (status = 409, description = "the task is not paused", body = ErrorBody),
    ))]
pub async fn resume_task(
    p: Principal,
    State(app): S,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> AppResult<Json<Task>> {
    p.require(READ)?;
    let id = path_id("task id", id)?;
    Ok(Json(app.coord.set_paused(&id, false).await?))
}

/// Send a message to a running agent (delivered to its stdin).
#[utoipa::path(post, path = "/api/v1/tasks/{id}/messages", params(IdParam),
    request_body = SendMessageRequest, tag = "tasks",
    responses(
        (status = 202, description = "sent to the daemon running the task"),
        (status = 400, description = "the task id or the body is invalid", body = ErrorBody),
        (status = 404, description = "no such task", body = ErrorBody),
        (status = 409, description = "the task is not running or paused", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn send_message(
    p: Principal,
    State(app): S,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Result<JsonBody<SendMessageRequest>, ApiError>,
) -> AppResult<StatusCode> {
    p.require(READ)?;
    let id = path_id("task id", id)?;
    let JsonBody(req) = body?;
    app.coord.send_message(&id, req.message).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Every daemon that ever connected.
#[utoipa::path(get, path = "/api/v1/daemons", tag = "daemons",
    responses((status = 200, description = "every daemon", body = Vec<Daemon>)))]
pub async fn list_daemons(p: Principal, State(app): S) -> AppResult<Json<Vec<Daemon>>> {
    p.require(READ)?;
    let daemons = app.store.list_daemons().await?;
    Ok(Json(
        daemons.into_iter().map(|d| app.coord.overlay(d)).collect(),
    ))
}

/// One daemon.
#[utoipa::path(get, path = "/api/v1/daemons/{id}", params(IdParam), tag = "daemons",
    responses(
        (status = 200, description = "the daemon", body = Daemon),
        (status = 400, description = "the daemon id is invalid", body = ErrorBody),
        (status = 404, description = "no such daemon", body = ErrorBody),
    ))]
pub async fn get_daemon(
    p: Principal,
    State(app): S,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> AppResult<Json<Daemon>> {
    p.require(READ)?;
    let id = path_id("daemon id", id)?;
    let d = app.store.get_daemon(&id).await?.ok_or_else(|| {
        ApiError::not_found(format!("no daemon `{id}`; `kennel daemons` lists them"))
    })?;
    Ok(Json(app.coord.overlay(d)))
}

/// Drain a daemon (admin): it finishes its running tasks and is given no new ones.
#[utoipa::path(post, path = "/api/v1/daemons/{id}/drain", params(IdParam), tag = "daemons",
    responses(
        (status = 200, description = "the daemon, draining", body = Daemon),
        (status = 400, description = "the daemon id is invalid", body = ErrorBody),
        (status = 404, description = "no such daemon", body = ErrorBody),
    ))]
pub async fn drain_daemon(
    p: Principal,
    State(app): S,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> AppResult<Json<Daemon>> {
    p.require(&[])?;
    let id = path_id("daemon id", id)?;
    Ok(Json(app.coord.set_draining(&id, true).await?))
}

/// Undo a drain (admin).
#[utoipa::path(post, path = "/api/v1/daemons/{id}/undrain", params(IdParam), tag = "daemons",
    responses(
        (status = 200, description = "the daemon, taking work again", body = Daemon),
        (status = 400, description = "the daemon id is invalid", body = ErrorBody),
        (status = 404, description = "no such daemon", body = ErrorBody),
    ))]
pub async fn undrain_daemon(
    p: Principal,
    State(app): S,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> AppResult<Json<Daemon>> {
    p.require(&[])?;
    let id = path_id("daemon id", id)?;
    Ok(Json(app.coord.set_draining(&id, false).await?))
}

/// Create an API key (admin). The key is in the response only.
#[utoipa::path(post, path = "/api/v1/keys", request_body = CreateKey, tag = "keys",
    responses(
        (status = 201, description = "the key; store it now, it is never shown again", body = CreatedKey),
        (status = 400, description = "the body is invalid; the message names the field", body = ErrorBody),
        (status = 413, description = "the body is larger than `api.max_body_bytes`", body = ErrorBody),
    ))]
pub async fn create_key(
    p: Principal,
    State(app): S,
    body: Result<JsonBody<CreateKey>, ApiError>,
) -> AppResult<(StatusCode, Json<CreatedKey>)> {
    p.require(&[])?;
    let JsonBody(req) = body?;
    if req.name.trim().is_empty() || req.name.chars().count() > MAX_KEY_NAME {
        return Err(ApiError::invalid(format!(
            "`name` must be 1 to {MAX_KEY_NAME} characters, not all blank"
        )));
    }
    if req.scopes.is_empty() {
        return Err(ApiError::invalid(
            "`scopes` must name at least one of admin, client, daemon, relay, agent, gateway",
        ));
    }
    let mut scopes = req.scopes;
    scopes.sort();
    scopes.dedup();
    let (key, record) = app
        .keys
        .mint(&req.name, scopes, rfc3339(app.clock.now_ms()));
    app.store.insert_key(&record).await?;
    tracing::info!(key_id = %record.info.id, name = %req.name, "api key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key,
            info: record.info,
        }),
    ))
}

/// List API keys (admin). Secrets are never shown again.
#[utoipa::path(get, path = "/api/v1/keys", tag = "keys",
    responses((status = 200, description = "every key, revoked ones too", body = Vec<ApiKey>)))]
pub async fn list_keys(p: Principal, State(app): S) -> AppResult<Json<Vec<ApiKey>>> {
    p.require(&[])?;
    Ok(Json(app.store.list_keys().await?))
}

/// Revoke an API key (admin). Takes effect within 5 seconds on every coordinator. The last
/// live admin key cannot be revoked: create another admin key first.
#[utoipa::path(delete, path = "/api/v1/keys/{id}", params(IdParam), tag = "keys",
    responses(
        (status = 200, description = "the key, revoked (revoking twice is harmless)", body = ApiKey),
        (status = 400, description = "the key id is invalid", body = ErrorBody),
        (status = 404, description = "no such key", body = ErrorBody),
        (status = 409, description = "it is the last live admin key", body = ErrorBody),
    ))]
pub async fn revoke_key(
    p: Principal,
    State(app): S,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> AppResult<Json<ApiKey>> {
    p.require(&[])?;
    let id = path_id("key id", id)?;
    let key = match app
        .store
        .revoke_key_keeping_an_admin(&id, app.clock.now_ms())
        .await?
    {
        Revoke::Revoked(key) => key,
        Revoke::NotFound => {
            return Err(ApiError::not_found(format!(
                "no API key `{id}`; `kennel keys list` shows them"
            )))
        }
        Revoke::LastAdmin(key) => {
            return Err(ApiError::conflict(format!(
                "key `{id}` ({}) is the last live admin key; revoking it would lock every admin \
                 out. Create another admin key first (`kennel keys create --name NAME --scope \
                 admin`), then revoke this one",
                key.name
            )))
        }
    };
    app.keys.forget(&id);
    app.coord.key_revoked(&id);
    tracing::info!(key_id = %id, "api key revoked");
    Ok(Json(key))
}

/// Counts and capacity at a glance.
#[utoipa::path(get, path = "/api/v1/status", tag = "server",
    responses((status = 200, description = "the coordinator's state", body = ServerStatus)))]
pub async fn status(p: Principal, State(app): S) -> AppResult<Json<ServerStatus>> {
    p.require(READ)?;
    let counts = app.store.count_tasks().await?;
    let (daemons, total, used) = app.coord.capacity().await?;
    Ok(Json(ServerStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol_version: kennel_proto::PROTOCOL_VERSION,
        uptime_secs: app.coord.uptime().as_secs(),
        store: app.store.backend().to_string(),
        daemons_connected: daemons,
        capacity_total: total,
        capacity_used: used,
        tasks: TaskStatus::ALL
            .into_iter()
            .map(|s| (s.to_string(), counts.get(&s).copied().unwrap_or(0)))
            .collect(),
        waiting: app.coord.waiting_summary(),
    }))
}

/// Liveness: the process answers. No auth.
#[utoipa::path(get, path = "/health", tag = "server", security(()),
    responses((status = 200, description = "`ok`", body = String)))]
pub async fn health() -> &'static str {
    "ok"
}

/// Readiness: the store answers. No auth.
#[utoipa::path(get, path = "/ready", tag = "server", security(()),
    responses(
        (status = 200, description = "`ready`", body = String),
        (status = 503, description = "the store does not answer", body = ErrorBody),
    ))]
pub async fn ready(State(app): S) -> AppResult<&'static str> {
    app.store.ping().await?;
    Ok("ready")
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "server",
    responses((status = 200, description = "Prometheus text format", body = String)))]
pub async fn metrics_text(p: Principal, State(app): S) -> AppResult<Response> {
    p.require(READ)?;
    let counts = app.store.count_tasks().await?;
    for s in TaskStatus::ALL {
        metrics::gauge!("kennel_tasks", "state" => s.as_str())
            .set(counts.get(&s).copied().unwrap_or(0) as f64);
    }
    let messages = app.agents.message_counts().await?;
    for state in [
        MessageState::Queued,
        MessageState::Delivered,
        MessageState::Read,
        MessageState::Expired,
    ] {
        let n = messages
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("kennel_messages", "state" => state.as_str()).set(n as f64);
    }
    let body = app.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; the API is described at /api/openapi.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation of the document with its path.
    fn operations(
        doc: &utoipa::openapi::OpenApi,
    ) -> Vec<(&str, &utoipa::openapi::path::Operation)> {
        let mut ops = Vec::new();
        for (path, item) in &doc.paths.paths {
            for op in [&item.get, &item.put, &item.post, &item.delete, &item.patch]
                .into_iter()
                .flatten()
            {
                ops.push((path.as_str(), op));
            }
        }
        ops
    }

    fn pattern(schema: Option<&RefOr<Schema>>) -> Option<&str> {
        match schema? {
            RefOr::T(Schema::Object(o)) => o.pattern.as_deref(),
            _ => None,
        }
    }

    #[test]
    fn id_parameters_carry_the_one_id_pattern() {
        let doc = document();
        let mut seen = 0;
        for (path, op) in operations(&doc) {
            for p in op.parameters.iter().flatten() {
                if ["id", "daemon", "task"].contains(&p.name.as_str()) {
                    assert_eq!(
                        pattern(p.schema.as_ref()),
                        Some(ID_PATTERN),
                        "{path} {}",
                        p.name
                    );
                    seen += 1;
                }
                if p.name == "cursor" {
                    assert_eq!(pattern(p.schema.as_ref()), Some(CURSOR_PATTERN), "{path}");
                }
            }
        }
        assert!(seen >= 12, "{seen} id parameters");
        let mut schemas = doc.components.unwrap().schemas;
        for (schema, name) in [("CreateTask", "agent"), ("CreateTask", "labels")] {
            let o = property(&mut schemas, schema, name).unwrap();
            let pattern = match o.property_names.as_deref() {
                Some(Schema::Object(names)) => names.pattern.as_deref(),
                _ => o.pattern.as_deref(),
            };
            assert_eq!(pattern, Some(ID_PATTERN), "{schema}.{name}");
        }
    }

    #[test]
    fn every_keyed_operation_documents_the_key_check() {
        let doc = document();
        for (path, op) in operations(&doc) {
            let keyed = op.security.is_none();
            let open = ["/health", "/ready", "/api/v1/agent-tokens/exchange"];
            assert_eq!(keyed, !open.contains(&path), "{path}");
            if keyed {
                for status in ["401", "403", "503"] {
                    assert!(
                        op.responses.responses.contains_key(status),
                        "{path} {status}"
                    );
                }
            }
        }
    }

    #[test]
    fn integral_floats_become_integers() {
        let mut v =
            serde_json::json!({"a": 2.0, "b": [1.5, 3.0, -4.0], "c": 1e19, "d": 1e20, "e": 7});
        assert!(integral_floats_to_integers(&mut v));
        assert_eq!(
            v,
            serde_json::json!({"a": 2, "b": [1.5, 3, -4], "c": 10_000_000_000_000_000_000u64, "d": 1e20, "e": 7})
        );
        let mut plain = serde_json::json!({"a": 1, "b": "2.0", "c": 0.5});
        assert!(!integral_floats_to_integers(&mut plain));
    }

    #[test]
    fn json_content_types() {
        let with = |ct: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            is_json(&h)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/vnd.kennel+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!with("application/+json"));
        assert!(!is_json(&axum::http::HeaderMap::new()));
    }

    #[test]
    fn cursors_limits_and_decimals() {
        assert_eq!(parse_cursor("42").unwrap(), 42);
        for bad in ["", "-5", "+5", " 5", "1e3", "1234567890123456789"] {
            assert!(parse_cursor(bad).is_err(), "{bad:?}");
        }
        assert_eq!(decimal("007", 3), Some(7));
        assert_eq!(decimal("0007", 3), None);
        assert_eq!(page_limit(None, 50, 1000).unwrap(), 50);
        assert_eq!(page_limit(None, 50, 20).unwrap(), 20);
        assert_eq!(page_limit(Some(1000), 50, 1000).unwrap(), 1000);
        let err = page_limit(Some(0), 50, 1000).unwrap_err();
        assert!(err.message.contains("pass 1 to 1000 (default 50)"), "{err}");
        assert!(page_limit(Some(1001), 50, 1000).is_err());
    }
}
