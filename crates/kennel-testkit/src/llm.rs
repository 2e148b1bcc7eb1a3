//! [`ScriptedLlm`]: a scripted LLM upstream on `127.0.0.1:0` that speaks both the OpenAI
//! chat-completions API (`POST /v1/chat/completions`) and the Anthropic Messages API
//! (`POST /v1/messages`, and `/v1/messages/count_tokens` with a fixed count), streaming and
//! not, in the real wire formats. Each request takes the
//! next [`Behavior`] from a queue (default: a normal answer), so a test can make an upstream
//! fail in a precise way: an error status (with `Retry-After`), hanging before the headers,
//! answering only after a delay (as providers do with a long non-streamed completion), or
//! streaming some bytes and then stalling or breaking the connection. [`refused_addr`] gives
//! an address where connections are refused.
//!
//! It knows nothing about kennel and has no side channels; every request is recorded.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// How long a breaking stream waits after its last bytes before it breaks the connection.
const BREAK_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// What the upstream does with one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Behavior {
    /// A normal answer: text `reply from <name>` in the request's format.
    Answer,
    /// An error status with a JSON error body and optionally a `Retry-After` value.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// Never sends the response headers.
    HangBeforeHeaders,
    /// A normal answer whose headers are sent only after `delay`: how a provider answers a
    /// non-streamed completion that takes that long to generate.
    AnswerAfter { delay: std::time::Duration },
    /// Sends the headers and the first `bytes` bytes of a normal stream, then nothing more.
    StreamThenStall { bytes: usize },
    /// Sends the headers and the first `bytes` bytes of a normal stream, then (after
    /// 200 ms) breaks the connection.
    StreamThenBreak { bytes: usize },
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub body: Value,
    /// `authorization` or `x-api-key`, whichever was sent.
    pub credential: Option<String>,
}

#[derive(Default)]
struct Inner {
    script: VecDeque<Behavior>,
    requests: Vec<Recorded>,
}

struct Shared {
    name: String,
    inner: Mutex<Inner>,
}

/// A running scripted upstream; stops when dropped.
pub struct ScriptedLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for ScriptedLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address on loopback where nothing listens: connections are refused.
pub async fn refused_addr() -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("failed to bind a probe port")?;
    let addr = l.local_addr()?;
    drop(l);
    Ok(addr)
}

impl ScriptedLlm {
    /// Starts an upstream whose answers name it `name`.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("failed to bind the scripted LLM upstream")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            inner: Mutex::new(Inner::default()),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(ScriptedLlm { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL for an OpenAI-kind upstream (`…/v1`).
    pub fn openai_base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Base URL for an Anthropic-kind upstream.
    pub fn anthropic_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues behaviours for the next requests (after those already queued).
    pub fn script(&self, behaviors: impl IntoIterator<Item = Behavior>) {
        self.lock().script.extend(behaviors);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let anthropic = match path.as_str() {
        "/v1/messages/count_tokens" => {
            return axum::Json(json!({"input_tokens": 3})).into_response();
        }
        "/v1/messages" => true,
        "/v1/chat/completions" => false,
        _ => return (StatusCode::NOT_FOUND, "no such path").into_response(),
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let credential = headers
        .get("x-api-key")
        .or_else(|| headers.get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let behavior = {
        let mut inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.requests.push(Recorded {
            path,
            body: body.clone(),
            credential,
        });
        inner.script.pop_front().unwrap_or(Behavior::Answer)
    };
    if let Behavior::AnswerAfter { delay } = behavior {
        tokio::time::sleep(delay).await;
    }
    let model = body["model"].as_str().unwrap_or("unknown").to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let text = format!("reply from {}", shared.name);
    match behavior {
        Behavior::Answer | Behavior::AnswerAfter { .. } if stream => {
            sse(stream_text(anthropic, &model, &text), None, false)
        }
        Behavior::Answer | Behavior::AnswerAfter { .. } => {
            let v = if anthropic {
                json!({"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                       "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                       "stop_sequence": null, "usage": {"input_tokens": 3, "output_tokens": 3}})
            } else {
                json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})
            };
            (StatusCode::OK, axum::Json(v)).into_response()
        }
        Behavior::Status {
            status,
            retry_after,
        } => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let msg = format!("scripted {status} from {}", shared.name);
            let v = if anthropic {
                json!({"type": "error", "error": {"type": "api_error", "message": msg}})
            } else {
                json!({"error": {"message": msg, "type": "api_error", "code": status}})
            };
            let mut r = (code, axum::Json(v)).into_response();
            if let Some(ra) = retry_after.and_then(|v| v.parse().ok()) {
                r.headers_mut().insert(header::RETRY_AFTER, ra);
            }
            r
        }
        Behavior::HangBeforeHeaders => std::future::pending().await,
        Behavior::StreamThenStall { bytes } => {
            let full = stream_text(anthropic, &model, &text);
            let cut = full
                .into_bytes()
                .into_iter()
                .take(bytes)
                .collect::<Vec<u8>>();
            sse(String::from_utf8_lossy(&cut).into_owned(), Some(()), false)
        }
        Behavior::StreamThenBreak { bytes } => {
            let full = stream_text(anthropic, &model, &text);
            let cut = full
                .into_bytes()
                .into_iter()
                .take(bytes)
                .collect::<Vec<u8>>();
            sse(String::from_utf8_lossy(&cut).into_owned(), None, true)
        }
    }
}

/// An event-stream response with `text`, then (if `stall`) silence, or (if `fail`) a broken
/// connection.
fn sse(text: String, stall: Option<()>, fail: bool) -> Response {
    let first =
        futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(Bytes::from(text)) });
    let tail = futures_util::stream::once(async move {
        if stall.is_some() {
            std::future::pending::<()>().await;
        }
        if fail {
            // Let the bytes before the break leave the socket first: hyper aborts the
            // connection on a body error, dropping anything still buffered.
            tokio::time::sleep(BREAK_AFTER).await;
            Err(std::io::Error::other("scripted break"))
        } else {
            Ok(Bytes::new())
        }
    });
    let body = Body::from_stream(futures_util::StreamExt::chain(first, tail));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// A complete stream in the given format whose text deltas spell `text`.
pub fn stream_text(anthropic: bool, model: &str, text: &str) -> String {
    let pieces: Vec<String> = text.split_inclusive(' ').map(str::to_string).collect();
    let mut out = String::new();
    if anthropic {
        let ev = |out: &mut String, name: &str, v: Value| {
            out.push_str(&format!("event: {name}\ndata: {v}\n\n"));
        };
        ev(
            &mut out,
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        );
        ev(
            &mut out,
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        );
        for p in &pieces {
            ev(
                &mut out,
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}),
            );
        }
        ev(
            &mut out,
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        );
        ev(
            &mut out,
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 3}}),
        );
        ev(&mut out, "message_stop", json!({"type": "message_stop"}));
    } else {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        out.push_str(&format!(
            "data: {}\n\n",
            chunk(json!({"role": "assistant", "content": ""}), Value::Null)
        ));
        for p in &pieces {
            out.push_str(&format!(
                "data: {}\n\n",
                chunk(json!({"content": p}), Value::Null)
            ));
        }
        out.push_str(&format!("data: {}\n\n", chunk(json!({}), json!("stop"))));
        out.push_str("data: [DONE]\n\n");
    }
    out
}
