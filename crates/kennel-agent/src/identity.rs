//! Who the agent is: its node id in the pipeline (`<data_dir>/machine-id`, made once) and its
//! key (`<data_dir>/agent.key`, readable by its owner only), got once from the coordinator for
//! a one-time join token.

use std::path::Path;

use kennel_proto::api::{CreatedKey, ErrorBody, ExchangeJoinToken};

/// Why the agent has no identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("failed to read or write {path}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "this agent has no key yet: pass --join-token with a token from `kennel agent-tokens \
         create --name NAME` (an admin runs it on the coordinator)"
    )]
    NoToken,
    #[error("the coordinator at {url} refused the join token: {reason}")]
    Refused { url: String, reason: String },
    #[error("could not reach the coordinator at {url} to exchange the join token: {reason}")]
    Unreachable { url: String, reason: String },
}

fn file_error(path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::File {
        path: path.display().to_string(),
        source,
    }
}

/// The node id kept in `dir`.
pub fn node_id(dir: &Path) -> Result<String, IdentityError> {
    kennel_daemon::daemon::read_or_create_machine_id(dir)
        .map_err(|e| file_error(&dir.join("machine-id"), e))
}

/// The agent's key: the one kept in `dir`, or a new one for `token` (which works once), then
/// kept.
pub async fn key(dir: &Path, http: &str, token: Option<&str>) -> Result<String, IdentityError> {
    let path = dir.join("agent.key");
    match std::fs::read_to_string(&path) {
        Ok(k) if !k.trim().is_empty() => return Ok(k.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_error(&path, e)),
    }
    let token = token.ok_or(IdentityError::NoToken)?;
    let key = exchange(http, token).await?;
    kennel_auth::write_private(&path, &key).map_err(|e| file_error(&path, e))?;
    Ok(key)
}

/// `POST /api/v1/agent-tokens/exchange`.
async fn exchange(http: &str, token: &str) -> Result<String, IdentityError> {
    let url = format!("{http}/api/v1/agent-tokens/exchange");
    let unreachable = |reason: String| IdentityError::Unreachable {
        url: http.to_string(),
        reason,
    };
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&ExchangeJoinToken {
            token: token.to_string(),
        })
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| unreachable(e.to_string()))?;
    if status.is_success() {
        let created: CreatedKey = serde_json::from_str(&body)
            .map_err(|e| unreachable(format!("unexpected answer ({e})")))?;
        return Ok(created.key);
    }
    let reason = serde_json::from_str::<ErrorBody>(&body)
        .map(|b| b.error.message)
        .unwrap_or_else(|_| format!("HTTP {status}"));
    Err(IdentityError::Refused {
        url: http.to_string(),
        reason,
    })
}
