//! [`ScriptedAnthropic`]: a scripted upstream that speaks the Anthropic Messages API on
//! `127.0.0.1:0`, so the real Claude Code CLI (or anything else that talks to
//! `ANTHROPIC_BASE_URL`) can run end to end without a network or a model.
//!
//! `POST /v1/messages` answers with what a [`Script`] decides for each request, in the real
//! wire format: server-sent events (`message_start`, `ping`, `content_block_start`,
//! `content_block_delta` with `text_delta` / `input_json_delta`, `content_block_stop`,
//! `message_delta` with the stop reason and usage, `message_stop`) when the request asks for
//! `stream: true`, one JSON message otherwise. `POST /v1/messages/count_tokens` gives a rough
//! estimate; any other path is a JSON `not_found_error`, as the real API answers. Every request
//! is recorded for assertions. This module knows nothing about kennel; it must not grow logic
//! that a real upstream would not have (no peeking at files, no side channels).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// Largest request body accepted, in bytes; Claude Code's first request alone is ~80 kB and
/// each turn resends the whole conversation.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Characters per token in the rough estimate reported as usage.
const CHARS_PER_TOKEN: usize = 4;
/// How many pieces a streamed text or tool input is cut into, so clients see several deltas.
const DELTA_PIECES: usize = 3;
/// What Claude Code's system prompt says just before the directory it runs in.
const WORKING_DIRECTORY_MARKER: &str = "Primary working directory: ";
/// Request headers worth keeping in the log (the API key is test-only and fine to keep).
const LOGGED_HEADERS: [&str; 5] = [
    "x-api-key",
    "authorization",
    "anthropic-version",
    "anthropic-beta",
    "user-agent",
];

/// One content block of a scripted reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// Assistant text.
    Text(String),
    /// A tool call; the id is assigned by the server (`toolu_…`).
    ToolUse { name: String, input: Value },
}

/// What the model "says" for one request: its content blocks and why it stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub content: Vec<Block>,
    /// `end_turn`, `tool_use`, `max_tokens`, …
    pub stop_reason: String,
}

impl Reply {
    /// A text answer that ends the turn.
    pub fn text(text: impl Into<String>) -> Reply {
        Reply {
            content: vec![Block::Text(text.into())],
            stop_reason: "end_turn".to_owned(),
        }
    }

    /// One tool call; the client is expected to run it and send a `tool_result`.
    pub fn tool_use(name: impl Into<String>, input: Value) -> Reply {
        Reply {
            content: vec![Block::ToolUse {
                name: name.into(),
                input,
            }],
            stop_reason: "tool_use".to_owned(),
        }
    }
}

/// Decides the reply to one `POST /v1/messages` request body.
pub type Script = Arc<dyn Fn(&Value) -> Reply + Send + Sync>;

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub method: String,
    /// Path and query, e.g. `/v1/messages?beta=true`.
    pub uri: String,
    /// The headers in [`LOGGED_HEADERS`] that were present, lowercase names.
    pub headers: BTreeMap<String, String>,
    /// The body as JSON, `Null` when empty, a JSON string when it was not JSON.
    pub body: Value,
}

impl Recorded {
    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }
}

struct Shared {
    script: Script,
    log: Mutex<Vec<Recorded>>,
    /// Numbers message and tool-use ids so each is unique within the server.
    next_id: Mutex<u64>,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Vec<Recorded>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u64 {
        let mut n = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        *n
    }
}

/// A running scripted upstream; stops when dropped.
pub struct ScriptedAnthropic {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl ScriptedAnthropic {
    /// Starts the server with [`ScriptedAnthropic::write_file_script`]`(path, content)`.
    pub async fn write_file(path: &str, content: &str) -> anyhow::Result<Self> {
        Self::start(Self::write_file_script(path, content)).await
    }

    /// Starts the server on a free port of 127.0.0.1 with `script` deciding every reply.
    pub async fn start(script: Script) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("failed to bind the scripted Anthropic upstream to 127.0.0.1:0")?;
        let addr = listener
            .local_addr()
            .context("failed to read the scripted upstream's address")?;
        let shared = Arc::new(Shared {
            script,
            log: Mutex::new(Vec::new()),
            next_id: Mutex::new(0),
        });
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("scripted Anthropic upstream stopped: {e}");
            }
        });
        Ok(ScriptedAnthropic {
            addr,
            shared,
            server,
        })
    }

    /// The script Claude Code needs to create one file: the first turn calls the `Write` tool
    /// with `content` at `path` (relative paths are joined to the working directory named in
    /// Claude Code's system prompt, since `Write` wants an absolute path); once the
    /// conversation holds a `tool_result`, it answers "Wrote the file." and ends the turn.
    /// Requests that offer no `Write` tool (side requests a client may make) get plain text.
    pub fn write_file_script(path: &str, content: &str) -> Script {
        let (path, content) = (path.to_owned(), content.to_owned());
        Arc::new(move |request: &Value| {
            if has_tool_result(request) || !offers_tool(request, "Write") {
                return Reply::text("Wrote the file.");
            }
            let file_path = match working_directory(request) {
                Some(dir) if !path.starts_with('/') => dir.join(&path).display().to_string(),
                _ => path.clone(),
            };
            Reply::tool_use(
                "Write",
                json!({ "file_path": file_path, "content": content }),
            )
        })
    }

    /// `http://127.0.0.1:PORT`, the value for `ANTHROPIC_BASE_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bodies of the `POST /v1/messages` requests so far, in arrival order.
    pub fn requests(&self) -> Vec<Value> {
        self.shared
            .log()
            .iter()
            .filter(|r| r.method == "POST" && r.path() == "/v1/messages")
            .map(|r| r.body.clone())
            .collect()
    }

    /// Every request so far, whatever its path, in arrival order.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.shared.log().clone()
    }
}

impl Drop for ScriptedAnthropic {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Whether the last message of the conversation carries a `tool_result` block.
pub fn has_tool_result(request: &Value) -> bool {
    request
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|messages| messages.last())
        .and_then(|last| last.get("content"))
        .and_then(Value::as_array)
        .is_some_and(|blocks| {
            blocks
                .iter()
                .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
        })
}

/// Whether the request offers a tool called `name`.
pub fn offers_tool(request: &Value, name: &str) -> bool {
    request
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|tools| {
            tools
                .iter()
                .any(|t| t.get("name").and_then(Value::as_str) == Some(name))
        })
}

/// The directory Claude Code runs in, as its system prompt states it
/// (`Primary working directory: /path`).
pub fn working_directory(request: &Value) -> Option<PathBuf> {
    let system = request.get("system")?;
    let texts: Vec<&str> = match system {
        Value::String(s) => vec![s.as_str()],
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect(),
        _ => Vec::new(),
    };
    texts.into_iter().find_map(|text| {
        let start = text.find(WORKING_DIRECTORY_MARKER)? + WORKING_DIRECTORY_MARKER.len();
        let line = text[start..].lines().next()?.trim();
        (!line.is_empty()).then(|| PathBuf::from(line))
    })
}

fn record(shared: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Value {
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
    };
    let headers = LOGGED_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?;
            Some(((*name).to_owned(), value.to_owned()))
        })
        .collect();
    shared.log().push(Recorded {
        method: method.to_string(),
        uri: uri.to_string(),
        headers,
        body: body.clone(),
    });
    body
}

fn api_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({ "type": "error", "error": { "type": kind, "message": message } });
    (status, axum::Json(body)).into_response()
}

/// A rough token count for usage figures: clients display it, nothing depends on it.
fn estimate_tokens(value: &Value) -> u64 {
    (value.to_string().len() / CHARS_PER_TOKEN).max(1) as u64
}

async fn not_found(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&shared, &method, &uri, &headers, &body);
    api_error(
        StatusCode::NOT_FOUND,
        "not_found_error",
        &format!("{method} {} is not scripted", uri.path()),
    )
}

async fn count_tokens(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = record(&shared, &method, &uri, &headers, &body);
    axum::Json(json!({ "input_tokens": estimate_tokens(&request) })).into_response()
}

async fn messages(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = record(&shared, &method, &uri, &headers, &body);
    if !request.is_object() {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the body must be a JSON object",
        );
    }
    let reply = (shared.script)(&request);
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-scripted")
        .to_owned();
    let input_tokens = estimate_tokens(&request);
    let message_id = format!("msg_scripted_{:04}", shared.next_id());
    let content: Vec<Value> = reply
        .content
        .iter()
        .map(|block| match block {
            Block::Text(text) => json!({ "type": "text", "text": text }),
            Block::ToolUse { name, input } => json!({
                "type": "tool_use",
                "id": format!("toolu_scripted_{:04}", shared.next_id()),
                "name": name,
                "input": input,
            }),
        })
        .collect();
    let output_tokens = content.iter().map(estimate_tokens).sum::<u64>();
    let message = Message {
        id: message_id,
        model,
        content,
        stop_reason: reply.stop_reason,
        input_tokens,
        output_tokens,
    };
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        stream_response(&message)
    } else {
        axum::Json(message.complete()).into_response()
    }
}

/// A scripted assistant message, before it is put on the wire.
struct Message {
    id: String,
    model: String,
    content: Vec<Value>,
    stop_reason: String,
    input_tokens: u64,
    output_tokens: u64,
}

impl Message {
    fn envelope(&self, content: Vec<Value>, stop_reason: Value, output_tokens: u64) -> Value {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": null,
            "usage": {
                "input_tokens": self.input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": output_tokens,
            },
        })
    }

    /// The non-streaming answer.
    fn complete(&self) -> Value {
        self.envelope(
            self.content.clone(),
            json!(self.stop_reason),
            self.output_tokens,
        )
    }

    /// The streaming answer, as `(event name, data)` pairs in wire order.
    fn events(&self) -> Vec<(&'static str, Value)> {
        let mut events = vec![
            (
                "message_start",
                json!({ "type": "message_start", "message": self.envelope(Vec::new(), Value::Null, 1) }),
            ),
            ("ping", json!({ "type": "ping" })),
        ];
        for (index, block) in self.content.iter().enumerate() {
            let (start, deltas) = match block.get("type").and_then(Value::as_str) {
                Some("tool_use") => {
                    let input = block.get("input").cloned().unwrap_or(json!({}));
                    let start = json!({
                        "type": "tool_use",
                        "id": block.get("id"),
                        "name": block.get("name"),
                        "input": {},
                    });
                    let deltas = pieces(&input.to_string())
                        .into_iter()
                        .map(|p| json!({ "type": "input_json_delta", "partial_json": p }))
                        .collect::<Vec<_>>();
                    (start, deltas)
                }
                _ => {
                    let text = block
                        .get("text")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let deltas = pieces(text)
                        .into_iter()
                        .map(|p| json!({ "type": "text_delta", "text": p }))
                        .collect::<Vec<_>>();
                    (json!({ "type": "text", "text": "" }), deltas)
                }
            };
            events.push((
                "content_block_start",
                json!({ "type": "content_block_start", "index": index, "content_block": start }),
            ));
            for delta in deltas {
                events.push((
                    "content_block_delta",
                    json!({ "type": "content_block_delta", "index": index, "delta": delta }),
                ));
            }
            events.push((
                "content_block_stop",
                json!({ "type": "content_block_stop", "index": index }),
            ));
        }
        events.push((
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": { "stop_reason": self.stop_reason, "stop_sequence": null },
                "usage": { "output_tokens": self.output_tokens },
            }),
        ));
        events.push(("message_stop", json!({ "type": "message_stop" })));
        events
    }
}

/// `text` cut into up to [`DELTA_PIECES`] pieces on character boundaries.
fn pieces(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(DELTA_PIECES).max(1);
    chars
        .chunks(size)
        .map(|c| c.iter().collect())
        .collect::<Vec<String>>()
}

fn stream_response(message: &Message) -> Response {
    // One body frame per event, so the client parses a real stream rather than one blob.
    let frames: Vec<Result<String, Infallible>> = message
        .events()
        .into_iter()
        .map(|(name, data)| Ok(format!("event: {name}\ndata: {data}\n\n")))
        .collect();
    let body = Body::from_stream(futures_util::stream::iter(frames));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn conversation(last: Value) -> Value {
        json!({
            "model": "claude-test",
            "system": [
                { "type": "text", "text": "You are a test." },
                { "type": "text", "text": "env:\n - Primary working directory: /w/t 1\n - Is a git repository: true\n" },
            ],
            "tools": [{ "name": "Bash" }, { "name": "Write" }],
            "messages": [last],
        })
    }

    #[test]
    fn the_write_script_calls_write_then_finishes() {
        let script = ScriptedAnthropic::write_file_script("hello.txt", "hi\n");
        let first = conversation(json!({ "role": "user", "content": "make it" }));
        assert_eq!(working_directory(&first), Some(PathBuf::from("/w/t 1")));
        assert_eq!(
            script(&first),
            Reply::tool_use(
                "Write",
                json!({ "file_path": "/w/t 1/hello.txt", "content": "hi\n" })
            )
        );
        let second = conversation(json!({
            "role": "user",
            "content": [{ "type": "tool_result", "tool_use_id": "toolu_1", "content": "ok" }],
        }));
        assert_eq!(script(&second), Reply::text("Wrote the file."));
        assert_eq!(
            script(&json!({ "messages": [] })),
            Reply::text("Wrote the file.")
        );
    }

    #[test]
    fn streamed_events_rebuild_the_message() {
        let message = Message {
            id: "msg_1".into(),
            model: "m".into(),
            content: vec![
                json!({ "type": "text", "text": "héllo wörld" }),
                json!({ "type": "tool_use", "id": "toolu_1", "name": "Write", "input": { "a": [1, 2] } }),
            ],
            stop_reason: "tool_use".into(),
            input_tokens: 7,
            output_tokens: 3,
        };
        let events = message.events();
        let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.first(), Some(&"message_start"));
        assert_eq!(names.last(), Some(&"message_stop"));
        for (name, data) in &events {
            assert_eq!(data["type"], *name, "event name matches its data type");
        }
        let text: String = events
            .iter()
            .filter_map(|(_, d)| d.pointer("/delta/text").and_then(Value::as_str))
            .collect();
        assert_eq!(text, "héllo wörld");
        let json_text: String = events
            .iter()
            .filter_map(|(_, d)| d.pointer("/delta/partial_json").and_then(Value::as_str))
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&json_text).unwrap(),
            json!({ "a": [1, 2] })
        );
        let delta = events.iter().find(|(n, _)| *n == "message_delta").unwrap();
        assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
    }

    #[tokio::test]
    async fn it_answers_over_http_and_records_requests() {
        let server = ScriptedAnthropic::write_file("x.txt", "x").await.unwrap();
        let client = reqwest::Client::new();
        let body = conversation(json!({ "role": "user", "content": "go" }));
        let reply: Value = client
            .post(format!("{}/v1/messages?beta=true", server.url()))
            .header("x-api-key", "sk-test")
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(reply["stop_reason"], "tool_use");
        assert_eq!(reply["content"][0]["input"]["file_path"], "/w/t 1/x.txt");

        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        let response = client
            .post(format!("{}/v1/messages", server.url()))
            .json(&streaming)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream; charset=utf-8"
        );
        let text = response.text().await.unwrap();
        assert!(text.starts_with("event: message_start\ndata: {"), "{text}");
        assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));

        let missing = client
            .get(format!("{}/v1/models", server.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        let err: Value = missing.json().await.unwrap();
        assert_eq!(err["error"]["type"], "not_found_error");

        assert_eq!(server.requests().len(), 2);
        let log = server.recorded();
        assert_eq!(log.len(), 3);
        assert_eq!(log[0].uri, "/v1/messages?beta=true");
        assert_eq!(log[0].headers["x-api-key"], "sk-test");
        assert_eq!(log[2].path(), "/v1/models");
    }
}
