//! Forwarding one client request: pick candidates, try them in order until one answers, and
//! pass the answer through. Streams are relayed chunk by chunk as they arrive, never
//! buffered. Failover happens only while nothing has reached the client; once the first byte
//! is sent, a stall or break ends the stream with an error event in the client's format.
//! Every failed attempt is named in `x-kennel-failover`; when the last one was a provider
//! refusing kennel's credentials, the client is told so (`x-kennel-refused-by: provider`)
//! rather than handed a bare 401 it would take for its own key.
//!
//! This module must not hold routing policy (see `health`) or log secrets: neither the
//! client's kennel key nor the upstream's key is ever written anywhere.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde_json::Value;

use crate::config::UpstreamKind;
use crate::error::{ApiFormat, GatewayError};
use crate::health::{candidates, parse_retry_after, Failure, FailureClass};
use crate::{Shared, Upstream};

/// Client request headers passed on to upstreams (never the client's credentials).
const FORWARDED: [&str; 5] = [
    "accept",
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "user-agent",
];
/// Upstream response headers not passed back (hop-by-hop, or recomputed).
const DROPPED: [&str; 4] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
];
/// Anthropic requires a version header; sent when the client gave none.
const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";
/// Names every failed attempt of a request, in order: `NAME=CLASS`, with the upstream's
/// HTTP status in parentheses when it answered with one (`a=auth(401), b=timeout`).
const FAILOVER_HEADER: &str = "x-kennel-failover";
/// Set to `provider` on an answer that relays a provider refusing kennel's own credentials
/// for its upstreams, so neither a person nor a program takes it for a bad kennel key.
const REFUSED_BY_HEADER: &str = "x-kennel-refused-by";
/// Longest part of a provider's error message quoted back to the client, in characters.
const MAX_QUOTED: usize = 300;

/// How one attempt ended, when it did not produce the client's response.
struct Failed {
    class: FailureClass,
    retry_after: Option<Duration>,
    /// The upstream's own error response, returned unchanged if no other upstream succeeds.
    response: Option<(StatusCode, HeaderMap, Bytes)>,
    message: String,
}

/// Where on an upstream a request goes: a path under its base URL and the client's query,
/// and the model the client asked for (health is kept per model for 404s).
#[derive(Clone, Copy)]
struct Target<'a> {
    path: &'static str,
    query: Option<&'a str>,
    model: &'a str,
}

enum Attempt {
    Answered(Response),
    Failed(Failed),
}

/// `POST /v1/chat/completions`, `POST /v1/messages` and `POST /v1/messages/count_tokens`;
/// `path` is what is appended to an upstream's base URL, followed by the client's query
/// string (Claude Code sends `?beta=true`).
pub async fn forward(
    shared: Arc<Shared>,
    format: ApiFormat,
    path: &'static str,
    query: Option<&str>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let started = Instant::now();
    shared.authorize(&headers, format, false).await?;
    shared.metrics.request(format.as_str());
    {
        let mut s = shared.state.lock();
        s.totals.requests += 1;
        shared.state.mark_totals(&mut s);
    }
    let limit = shared.cfg.max_body_bytes;
    let too_large = || {
        GatewayError::new(
            format,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!(
                "the request body is larger than the gateway's limit of {limit} bytes; send a \
                 smaller request or raise gateway.max_body_bytes"
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
    let object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let peek: Peek = serde_json::from_slice(&bytes).map_err(|e| {
        GatewayError::bad_request(
            format,
            if e.classify() == serde_json::error::Category::Data {
                format!("the request body must be a JSON object ({e}); send a JSON object")
            } else {
                format!("the request body is not valid JSON ({e}); send a JSON object")
            },
        )
    })?;
    if !object {
        return Err(GatewayError::bad_request(
            format,
            "the request body must be a JSON object with a \"model\" string",
        ));
    }
    let model = peek
        .model
        .as_ref()
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| {
            GatewayError::bad_request(
                format,
                "the request body has no \"model\" string; name the model to use",
            )
        })?;
    let stream = peek
        .stream
        .as_ref()
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let kind = match format {
        ApiFormat::Openai => UpstreamKind::Openai,
        ApiFormat::Anthropic => UpstreamKind::Anthropic,
    };
    let eligible: Vec<&Upstream> = shared
        .upstreams
        .iter()
        .filter(|u| u.cfg.kind == kind && u.cfg.serves(&model))
        .collect();
    if eligible.is_empty() {
        return Err(GatewayError::new(
            format,
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!(
                "no {} upstream serves model {model:?}; add it to an upstream's models or \
                 renames under [[gateway.upstreams]]",
                kind.as_str()
            ),
        ));
    }
    let order: Vec<String> = {
        let cfgs: Vec<_> = eligible.iter().map(|u| &u.cfg).collect();
        let s = shared.state.lock();
        candidates(&cfgs, &s.health, &model, shared.clock.now_ms())
            .into_iter()
            .map(|u| u.name.clone())
            .collect()
    };
    let mut last: Option<(String, Failed)> = None;
    // Every failed attempt as `x-kennel-failover` names it, and those that were refusals of
    // kennel's credentials (for the message if every upstream refuses).
    let mut causes: Vec<String> = Vec::new();
    let mut refusals: Vec<(String, StatusCode)> = Vec::new();
    let mut upstream_time = Duration::ZERO;
    let mut attempts = 0u32;
    for name in order.iter().take(shared.cfg.max_attempts as usize) {
        let Some(up) = eligible.iter().find(|u| &u.cfg.name == name) else {
            continue;
        };
        attempts += 1;
        if attempts > 1 {
            shared.metrics.failover();
            let mut s = shared.state.lock();
            s.totals.failovers += 1;
            shared.state.mark_totals(&mut s);
        }
        let upstream_model = up.cfg.upstream_model(&model);
        let body = if upstream_model != model {
            renamed(&bytes, upstream_model, format)?
        } else {
            bytes.clone()
        };
        let t0 = Instant::now();
        let target = Target {
            path,
            query,
            model: &model,
        };
        let outcome = attempt(&shared, up, format, target, &headers, body, stream).await;
        upstream_time += t0.elapsed();
        match outcome {
            Attempt::Answered(mut resp) => {
                tag(&mut resp, name, attempts, &causes);
                shared
                    .metrics
                    .added_latency(started.elapsed().saturating_sub(upstream_time));
                return Ok(resp);
            }
            Attempt::Failed(f) => {
                tracing::warn!(
                    upstream = %name,
                    class = f.class.as_str(),
                    error = %f.message,
                    "upstream attempt failed"
                );
                shared.record_failure(
                    name,
                    Failure {
                        class: f.class,
                        model: &model,
                        retry_after: f.retry_after,
                        error: &f.message,
                    },
                );
                let status = f.response.as_ref().map(|(st, _, _)| *st);
                causes.push(match status {
                    Some(st) => format!("{name}={}({})", f.class.as_str(), st.as_u16()),
                    None => format!("{name}={}", f.class.as_str()),
                });
                if let (FailureClass::Auth, Some(st)) = (f.class, status) {
                    refusals.push((name.clone(), st));
                }
                last = Some((name.clone(), f));
            }
        }
    }
    let Some((name, f)) = last else {
        return Err(GatewayError::new(
            format,
            StatusCode::BAD_GATEWAY,
            "api_error",
            "no upstream could be tried; check [[gateway.upstreams]]",
        ));
    };
    if let Some((status, hdrs, body)) = f.response {
        let mut resp = if f.class == FailureClass::Auth {
            refused(format, &refusals, status, &body)
        } else {
            let mut r = (status, body).into_response();
            copy_headers(&hdrs, r.headers_mut());
            r
        };
        tag(&mut resp, &name, attempts, &causes);
        return Ok(resp);
    }
    let status = match f.class {
        FailureClass::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    let mut resp = GatewayError::new(
        format,
        status,
        "api_error",
        format!(
            "all {attempts} upstream attempt(s) failed; the last, {name}, failed with: {}. \
             Retry later, or see GET /health for cooldowns",
            f.message
        ),
    )
    .into_response();
    tag(&mut resp, &name, attempts, &causes);
    Ok(resp)
}

/// The answer when the last upstream tried refused kennel's credentials for it (401/403):
/// the provider's status is kept, so SDKs do not retry what waiting cannot fix, but the
/// body says in the client's format that the refusal was the provider's and that the
/// client's kennel key was fine, and `x-kennel-refused-by: provider` says it to programs.
fn refused(
    format: ApiFormat,
    refusals: &[(String, StatusCode)],
    status: StatusCode,
    provider_body: &Bytes,
) -> Response {
    let mut message = match refusals {
        [(name, st)] => format!(
            "upstream {name} refused kennel's provider credentials ({}): check api_key_env \
             for that upstream in [[gateway.upstreams]]; your kennel key was accepted",
            st.as_u16()
        ),
        _ => format!(
            "upstreams {} refused kennel's provider credentials: check api_key_env for \
             those upstreams in [[gateway.upstreams]]; your kennel key was accepted",
            refusals
                .iter()
                .map(|(n, st)| format!("{n} ({})", st.as_u16()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if let Some(said) = provider_message(provider_body) {
        message.push_str(&format!(". The provider said: {said}"));
    }
    let mut resp =
        GatewayError::new(format, status, "provider_auth_error", message).into_response();
    resp.headers_mut().insert(
        HeaderName::from_static(REFUSED_BY_HEADER),
        HeaderValue::from_static("provider"),
    );
    resp
}

/// The message of a provider's JSON error body (`{"error": {"message": ...}}` in both
/// formats), shortened to [`MAX_QUOTED`] characters. The client saw the whole body before
/// kennel marked refusals, so quoting it reveals nothing new.
fn provider_message(body: &Bytes) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let m = v["error"]["message"]
        .as_str()
        .or_else(|| v["message"].as_str())?;
    let mut out: String = m.chars().take(MAX_QUOTED).collect();
    if out.len() < m.len() {
        out.push('…');
    }
    Some(out)
}

/// The two fields of a request body routing needs. Only they are built as values; the rest
/// of the body (the conversation, often hundreds of kilobytes for a coding agent) is scanned
/// and skipped, and forwarded as the bytes the client sent.
#[derive(serde::Deserialize)]
struct Peek {
    model: Option<Value>,
    stream: Option<Value>,
}

/// The body with `model` replaced, for an upstream that knows the model by another name.
fn renamed(bytes: &Bytes, model: &str, format: ApiFormat) -> Result<Bytes, GatewayError> {
    let mut json: Value = serde_json::from_slice(bytes).map_err(|e| {
        GatewayError::bad_request(
            format,
            format!("the request body is not valid JSON ({e}); send a JSON object"),
        )
    })?;
    if let Some(m) = json.get_mut("model") {
        *m = Value::String(model.to_string());
    }
    Ok(Bytes::from(json.to_string()))
}

/// Sends the request to one upstream and decides what its answer means.
async fn attempt(
    shared: &Arc<Shared>,
    up: &Upstream,
    format: ApiFormat,
    target: Target<'_>,
    client_headers: &HeaderMap,
    body: Bytes,
    stream: bool,
) -> Attempt {
    let name = up.cfg.name.clone();
    {
        let mut s = shared.state.lock();
        let h = s.health.entry(name.clone()).or_default();
        h.requests += 1;
    }
    let mut url = format!("{}{}", up.cfg.base_url.trim_end_matches('/'), target.path);
    if let Some(q) = target.query.filter(|q| !q.is_empty()) {
        url.push('?');
        url.push_str(q);
    }
    let mut rb = up
        .client
        .post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body);
    for h in FORWARDED {
        if let Some(v) = client_headers.get(h) {
            rb = rb.header(h, v);
        }
    }
    match up.cfg.kind {
        UpstreamKind::Openai => {
            if let Some(k) = &up.key {
                rb = rb.bearer_auth(k);
            }
        }
        UpstreamKind::Anthropic => {
            if let Some(k) = &up.key {
                rb = rb.header("x-api-key", k);
            }
            if !client_headers.contains_key("anthropic-version") {
                rb = rb.header("anthropic-version", DEFAULT_ANTHROPIC_VERSION);
            }
        }
    }
    let t0 = Instant::now();
    let first_byte = up.cfg.first_byte_timeout();
    let total = up.cfg.total_timeout();
    // Providers send the headers of a non-streamed completion only once it is finished, so
    // only a stream has an early first byte to wait for; a non-streaming request gets its
    // whole deadline for the headers too, or every long answer would be cut and re-sent.
    let headers_within = if stream { first_byte } else { total };
    let resp = match tokio::time::timeout(headers_within, rb.send()).await {
        Err(_) if stream => {
            return timeout_failure(format!("no response headers within {first_byte:?}"))
        }
        Err(_) => {
            return timeout_failure(format!("the response did not complete within {total:?}"))
        }
        Ok(Err(e)) => return send_failure(e),
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    if let Some(class) = FailureClass::of_status(status.as_u16()) {
        let retry_after = headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, shared.clock.now_ms()));
        let body = tokio::time::timeout(first_byte, resp.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        return Attempt::Failed(Failed {
            class,
            retry_after,
            response: Some((status, headers, body)),
            message: format!("HTTP {status}"),
        });
    }
    if !status.is_success() {
        // The client's own mistake (4xx): returned unchanged, no cooldown, no failover.
        let body = match tokio::time::timeout(up.cfg.total_timeout(), resp.bytes()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return send_failure(e),
            Err(_) => return timeout_failure("the error body did not arrive in time".into()),
        };
        shared.record_neutral(&name);
        let mut r = (status, body).into_response();
        copy_headers(&headers, r.headers_mut());
        return Attempt::Answered(r);
    }
    if !stream {
        let remaining = total.saturating_sub(t0.elapsed());
        let body = match tokio::time::timeout(remaining, resp.bytes()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return send_failure(e),
            Err(_) => {
                return timeout_failure(format!("the response did not complete within {total:?}"))
            }
        };
        shared.record_success(&name, target.model, t0.elapsed());
        let mut r = (status, body).into_response();
        copy_headers(&headers, r.headers_mut());
        return Attempt::Answered(r);
    }
    // Streaming: wait for the first chunk before committing, so a stall right after the
    // headers can still fail over.
    let mut chunks: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>> =
        Box::pin(resp.bytes_stream());
    let remaining = first_byte.saturating_sub(t0.elapsed());
    let first = match tokio::time::timeout(remaining, chunks.next()).await {
        Err(_) => {
            return timeout_failure(format!("no first byte of the stream within {first_byte:?}"))
        }
        Ok(Some(Err(e))) => return send_failure(e),
        Ok(Some(Ok(b))) => Some(b),
        Ok(None) => None,
    };
    shared.record_success(&name, target.model, t0.elapsed());
    let relay = Relay {
        first,
        chunks,
        idle: first_byte,
        format,
        shared: shared.clone(),
        upstream: name,
        model: target.model.to_string(),
        tail: [0, 0],
        ended: false,
    };
    let body = Body::from_stream(futures_util::stream::unfold(relay, Relay::step));
    let mut r = Response::new(body);
    *r.status_mut() = status;
    copy_headers(&headers, r.headers_mut());
    Attempt::Answered(r)
}

/// Relays an upstream stream to the client, ending it with an error event if it stalls or
/// breaks.
struct Relay {
    first: Option<Bytes>,
    chunks: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    /// Longest silence allowed between chunks.
    idle: Duration,
    format: ApiFormat,
    shared: Arc<Shared>,
    upstream: String,
    /// The client's model, for the upstream's health.
    model: String,
    /// The last two bytes sent, to close a half-sent event before the error event.
    tail: [u8; 2],
    ended: bool,
}

impl Relay {
    async fn step(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if self.ended {
            return None;
        }
        if let Some(b) = self.first.take() {
            self.note(&b);
            return Some((Ok(b), self));
        }
        let problem = match tokio::time::timeout(self.idle, self.chunks.next()).await {
            Ok(Some(Ok(b))) => {
                self.note(&b);
                return Some((Ok(b), self));
            }
            Ok(None) => return None,
            Ok(Some(Err(e))) => format!("the upstream stream broke: {}", chain(&e.without_url())),
            Err(_) => format!(
                "the upstream stream stalled: no data for {} ms",
                self.idle.as_millis()
            ),
        };
        tracing::warn!(upstream = %self.upstream, error = %problem, "stream ended early");
        self.shared.record_failure(
            &self.upstream,
            Failure {
                class: FailureClass::StreamBroken,
                model: &self.model,
                retry_after: None,
                error: &problem,
            },
        );
        self.ended = true;
        let close = match self.tail {
            [b'\n', b'\n'] => "",
            [_, b'\n'] => "\n",
            _ => "\n\n",
        };
        let msg = format!(
            "{problem} (upstream {}); the response is incomplete, retry the request",
            self.upstream
        );
        let event = format!("{close}{}", self.format.stream_error_event(&msg));
        Some((Ok(Bytes::from(event)), self))
    }

    fn note(&mut self, b: &Bytes) {
        match b.len() {
            0 => {}
            1 => self.tail = [self.tail[1], b[0]],
            n => self.tail = [b[n - 2], b[n - 1]],
        }
    }
}

fn timeout_failure(message: String) -> Attempt {
    Attempt::Failed(Failed {
        class: FailureClass::Timeout,
        retry_after: None,
        response: None,
        message,
    })
}

/// A transport failure. Its message leaves out the URL: it is shown in `/health`, which is
/// open, and the upstream's name already says where.
fn send_failure(e: reqwest::Error) -> Attempt {
    let class = if e.is_timeout() {
        FailureClass::Timeout
    } else {
        FailureClass::Network
    };
    Attempt::Failed(Failed {
        class,
        retry_after: None,
        response: None,
        message: chain(&e.without_url()),
    })
}

/// An error with its causes (connection refused etc.); reqwest errors carry no secrets.
fn chain(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        message.push_str(": ");
        message.push_str(&s.to_string());
        src = s.source();
    }
    message
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !DROPPED.contains(&k.as_str()) {
            to.insert(k.clone(), v.clone());
        }
    }
}

/// Names the upstream that produced the answer, the attempts made, and (when any failed)
/// why each failed attempt failed.
fn tag(resp: &mut Response, upstream: &str, attempts: u32, causes: &[String]) {
    let h = resp.headers_mut();
    if !causes.is_empty() {
        // Upstream names are validated to letters, digits, '-', '_' and '.', so this is
        // always a valid header value; a failure to build one only drops the header.
        if let Ok(v) = HeaderValue::from_str(&causes.join(", ")) {
            h.insert(HeaderName::from_static(FAILOVER_HEADER), v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(upstream) {
        h.insert(HeaderName::from_static("x-kennel-upstream"), v);
    }
    h.insert(
        HeaderName::from_static("x-kennel-attempts"),
        HeaderValue::from(attempts),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn message(resp: Response) -> Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn a_refusal_names_the_upstreams_and_clears_the_kennel_key() {
        let said = Bytes::from(r#"{"error":{"message":"invalid x-api-key"}}"#);
        let one = [("a".to_string(), StatusCode::UNAUTHORIZED)];
        let r = refused(ApiFormat::Anthropic, &one, StatusCode::UNAUTHORIZED, &said);
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()[REFUSED_BY_HEADER], "provider");
        let v = message(r).await;
        assert_eq!(v["type"], "error");
        assert_eq!(
            v["error"]["message"],
            "upstream a refused kennel's provider credentials (401): check api_key_env for \
             that upstream in [[gateway.upstreams]]; your kennel key was accepted. The \
             provider said: invalid x-api-key"
        );
        let two = [
            ("a".to_string(), StatusCode::UNAUTHORIZED),
            ("b".to_string(), StatusCode::FORBIDDEN),
        ];
        let html = Bytes::from("<html>nope</html>");
        let v = message(refused(
            ApiFormat::Openai,
            &two,
            StatusCode::FORBIDDEN,
            &html,
        ))
        .await;
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.starts_with("upstreams a (401), b (403) refused"), "{m}");
        assert!(!m.contains("provider said"), "{m}");
    }

    #[test]
    fn a_long_provider_message_is_shortened() {
        let long = "é".repeat(MAX_QUOTED + 5);
        let body = Bytes::from(serde_json::json!({"error": {"message": long}}).to_string());
        let m = provider_message(&body).unwrap();
        assert_eq!(m.chars().count(), MAX_QUOTED + 1);
        assert!(m.ends_with('…'));
    }
}
