//! The CLI's HTTP client for the coordinator's REST API: resolves where the server is and
//! which key to use, and turns failures into messages that say what to do.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use kennel_proto::api::ErrorBody;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::Config;
use crate::endpoint::{self, ENDPOINT_FILE};

/// `--data-dir` on client commands: which local `kennel up` / `kennel server` to talk to.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Target {
    /// Data directory of the local `kennel up` or `kennel server` to use: where it listens and
    /// its admin key are read from there (default: `server.data_dir` of the configuration).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// A coordinator endpoint and the key to call it with.
pub struct Client {
    http: reqwest::Client,
    pub base: String,
    key: String,
    /// What to check when the server does not answer, given where `base` came from.
    unreachable_hint: String,
}

impl Client {
    /// Where the server is, first match wins: `--url`/`KENNEL_URL`; the server recorded in the
    /// `--data-dir` given; `client.url`; the server recorded in `server.data_dir`;
    /// `http://<server.listen>`. The key: `--api-key`/`KENNEL_API_KEY`; the given
    /// `--data-dir`'s `admin.key`; `client.api_key`; `<server.data_dir>/admin.key`.
    pub fn resolve(
        cfg: &Config,
        url: Option<&str>,
        key: Option<&str>,
        target: &Target,
    ) -> anyhow::Result<Self> {
        let explicit_dir = target.data_dir.as_deref();
        let dir = explicit_dir.unwrap_or(&cfg.server.data_dir);
        let recorded = endpoint::find(dir);
        let from_dir = || {
            recorded.as_ref().map(|e| {
                (
                    e.url.clone(),
                    format!(
                        "It was recorded in {} by pid {}; is that process still serving?",
                        dir.join(ENDPOINT_FILE).display(),
                        e.pid
                    ),
                )
            })
        };
        let given = || "Check --url / KENNEL_URL.".to_string();
        let configured = || "Check `client.url` in the configuration.".to_string();
        let (base, unreachable_hint) = url
            .map(|u| (u.to_string(), given()))
            .or_else(|| explicit_dir.and_then(|_| from_dir()))
            .or_else(|| cfg.client.url.clone().map(|u| (u, configured())))
            .or_else(from_dir)
            .unwrap_or_else(|| {
                (
                    format!("http://{}", cfg.server.listen),
                    format!(
                        "No running kennel server is recorded in {}. Start one with `kennel up`; \
                         if it runs with its own --data-dir, pass the same --data-dir here, or \
                         point --url / KENNEL_URL at it.",
                        dir.display()
                    ),
                )
            });
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("server URL `{base}` must start with http:// or https://");
        }
        let key_file = dir.join("admin.key");
        let key = match key.map(str::to_string) {
            Some(k) => k,
            None => match explicit_dir.and_then(|_| read_key_file(&key_file)) {
                Some(k) => k,
                None => match cfg
                    .client
                    .api_key
                    .clone()
                    .or_else(|| read_key_file(&key_file))
                {
                    Some(k) => k,
                    None => bail!(
                        "no API key: pass --api-key or set KENNEL_API_KEY (a local server \
                         writes its first admin key to {}; for a server with its own \
                         --data-dir, pass that --data-dir)",
                        key_file.display()
                    ),
                },
            },
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("kennel-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("failed to set up the HTTP client")?;
        Ok(Client {
            http,
            base,
            key,
            unreachable_hint,
        })
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
            "cannot reach the kennel server at {}: {e}\n{}",
            self.base,
            self.unreachable_hint
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

    /// DELETE answered with no body (204).
    pub async fn delete_no_content(&self, path: &str) -> anyhow::Result<()> {
        let resp = self
            .request(Method::DELETE, path)
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

/// The key in `path`, if it is readable and not empty.
fn read_key_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let key = text.trim();
    (!key.is_empty()).then(|| key.to_string())
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
