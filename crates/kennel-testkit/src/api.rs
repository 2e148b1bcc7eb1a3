//! [`Api`]: a small REST client for `/api/v1`, bound to a server URL and a key.
//!
//! Typed calls turn any non-2xx answer into an error that carries the status and the body, so
//! a test that expects success fails with the server's own explanation. Tests of error paths
//! use [`Api::raw`], which returns status and body without judging them.

use anyhow::{anyhow, Context};
use kennel_proto::api::{CreateKey, CreateTask, CreatedKey, OutputPage, Scope, Task, TaskDetail};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A REST client for one kennel server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Api {
    /// `base` is the server root (`http://127.0.0.1:PORT`); paths given to the methods are
    /// appended to it, e.g. `/api/v1/tasks`.
    pub fn new(base: impl Into<String>, key: Option<String>) -> Self {
        let base = base.into().trim_end_matches('/').to_string();
        Api {
            http: reqwest::Client::new(),
            base,
            key,
        }
    }

    /// The same server with another key (or none).
    pub fn with_key(&self, key: Option<String>) -> Self {
        Api {
            http: self.http.clone(),
            base: self.base.clone(),
            key,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    fn request(&self, method: Method, path: &str, key: Option<&str>) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    async fn typed<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<T> {
        let what = format!("{method} {path}");
        let (status, text) = self
            .raw(method, path, self.key.as_deref(), body)
            .await
            .with_context(|| format!("failed to call {what}"))?;
        if !status.is_success() {
            return Err(anyhow!("{what} answered {status}: {text}"));
        }
        serde_json::from_str(&text)
            .with_context(|| format!("failed to decode the answer of {what}: {text}"))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.typed(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let body = serde_json::to_string(body).context("failed to encode the request body")?;
        self.typed(Method::POST, path, Some(body)).await
    }

    /// POST without a body, for actions such as `/cancel` and `/drain`.
    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.typed(Method::POST, path, None).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.typed(Method::DELETE, path, None).await
    }

    /// Sends a request with any key (or none) and body, and returns status and body as they
    /// are. A body is sent as `application/json`. Errors only when no answer arrives.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<String>,
    ) -> anyhow::Result<(StatusCode, String)> {
        let mut rb = self.request(method.clone(), path, key);
        if let Some(b) = body {
            rb = rb
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("{method} {path} got no answer"))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .with_context(|| format!("failed to read the body of {method} {path}"))?;
        Ok((status, text))
    }

    /// `POST /api/v1/tasks`.
    pub async fn submit(&self, task: &CreateTask) -> anyhow::Result<Task> {
        self.post("/api/v1/tasks", task).await
    }

    /// `GET /api/v1/tasks/{id}`.
    pub async fn task(&self, id: &str) -> anyhow::Result<TaskDetail> {
        self.get(&format!("/api/v1/tasks/{id}")).await
    }

    /// `GET /api/v1/tasks/{id}/output`; `attempt: None` reads the current (or last) attempt.
    pub async fn output(
        &self,
        id: &str,
        attempt: Option<u32>,
        after_seq: u64,
    ) -> anyhow::Result<OutputPage> {
        let mut path = format!("/api/v1/tasks/{id}/output?after_seq={after_seq}");
        if let Some(a) = attempt {
            path.push_str(&format!("&attempt={a}"));
        }
        self.get(&path).await
    }

    /// `POST /api/v1/keys`; the returned `key` is the full secret.
    pub async fn create_key(&self, name: &str, scopes: &[Scope]) -> anyhow::Result<CreatedKey> {
        let body = CreateKey {
            name: name.to_string(),
            scopes: scopes.to_vec(),
        };
        self.post("/api/v1/keys", &body).await
    }
}
