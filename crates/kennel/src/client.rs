//! The CLI's HTTP client for the coordinator's REST API: resolves where the server is and
//! which key to use, and turns failures into messages that say what to do.

use std::path::Path;

use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use kennel_proto::api::ErrorBody;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::Config;

/// A coordinator endpoint and the key to call it with.
pub struct Client {
    http: reqwest::Client,
    pub base: String,
    key: String,
}

impl Client {
    /// `--url`/`KENNEL_URL`, else `client.url`, else `http://<server.listen>`; `--api-key`/
    /// `KENNEL_API_KEY`, else `client.api_key`, else `<server.data_dir>/admin.key`.
    pub fn resolve(cfg: &Config, url: Option<&str>, key: Option<&str>) -> anyhow::Result<Self> {
        let base = url
            .map(str::to_string)
            .or_else(|| cfg.client.url.clone())
            .unwrap_or_else(|| format!("http://{}", cfg.server.listen))
            .trim_end_matches('/')
            .to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("server URL `{base}` must start with http:// or https://");
        }
        let key = match key
            .map(str::to_string)
            .or_else(|| cfg.client.api_key.clone())
        {
            Some(k) => k,
            None => read_key_file(&cfg.server.data_dir.join("admin.key"))?,
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("kennel-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("failed to set up the HTTP client")?;
        Ok(Client { http, base, key })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the server at {} answered with unexpected JSON (is it a kennel server of the same version?)",
                self.base
            )
        })
    }

    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach the kennel server at {}: {e}\nIs it running? Start one with `kennel server`, or point --url / KENNEL_URL at it.",
            self.base
        )
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.request(Method::POST, path)).await
    }

    /// POST whose answer has no body worth decoding (202).
    pub async fn post_no_content<B: Serialize>(&self, path: &str, body: &B) -> anyhow::Result<()> {
        let resp = self
            .request(Method::POST, path)
            .json(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.unwrap_or_default();
            return Err(api_error(status, &bytes));
        }
        Ok(())
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.request(Method::DELETE, path)).await
    }

    /// Opens a server-sent event stream.
    pub async fn sse(
        &self,
        path: &str,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<
        impl futures_util::Stream<
            Item = Result<
                eventsource_stream::Event,
                eventsource_stream::EventStreamError<reqwest::Error>,
            >,
        >,
    > {
        use eventsource_stream::Eventsource;
        let mut req = self
            .request(Method::GET, path)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.unwrap_or_default();
            return Err(api_error(status, &bytes));
        }
        Ok(resp.bytes_stream().eventsource().boxed())
    }
}

fn read_key_file(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => bail!(
            "no API key: pass --api-key or set KENNEL_API_KEY (a local server writes its first admin key to {})",
            path.display()
        ),
    }
}

/// The server's error message, or a plain description of the status.
fn api_error(status: StatusCode, body: &[u8]) -> anyhow::Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => anyhow!("{} (HTTP {})", b.error.message, status.as_u16()),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            anyhow!(
                "the server answered HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            )
        }
    }
}
