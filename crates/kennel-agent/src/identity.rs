//! Who the agent is: its node id in the pipeline (`<data_dir>/machine-id`, made once), its
//! key (`<data_dir>/agent.key`) and the mesh secret it presents to other agents
//! (`<data_dir>/mesh.key`), both readable by their owner only and got once from the
//! coordinator for a one-time join token.

use std::path::Path;

use kennel_proto::api::{ErrorBody, ExchangeJoinToken, JoinedAgent};

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

/// The agent's credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Its key, for the rendezvous.
    pub key: String,
    /// What it and its mesh peers present to one another; none from a rendezvous without one.
    pub mesh_secret: Option<String>,
}

/// A secret kept in a file of `dir`, if there is one.
fn read_secret(path: &Path) -> Result<Option<String>, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(k) if !k.trim().is_empty() => Ok(Some(k.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_error(path, e)),
    }
}

/// The agent's credentials: those kept in `dir`, or new ones for `token` (which works once),
/// then kept.
pub async fn credentials(
    dir: &Path,
    http: &str,
    token: Option<&str>,
) -> Result<Credentials, IdentityError> {
    let (key_path, mesh_path) = (dir.join("agent.key"), dir.join("mesh.key"));
    if let Some(key) = read_secret(&key_path)? {
        let mesh_secret = read_secret(&mesh_path)?;
        return Ok(Credentials { key, mesh_secret });
    }
    let token = token.ok_or(IdentityError::NoToken)?;
    let joined = exchange(http, token).await?;
    if let Some(secret) = &joined.mesh_secret {
        kennel_auth::write_private(&mesh_path, secret).map_err(|e| file_error(&mesh_path, e))?;
    }
    let key = joined.created.key;
    kennel_auth::write_private(&key_path, &key).map_err(|e| file_error(&key_path, e))?;
    Ok(Credentials {
        key,
        mesh_secret: joined.mesh_secret,
    })
}

/// `POST /api/v1/agent-tokens/exchange`.
async fn exchange(http: &str, token: &str) -> Result<JoinedAgent, IdentityError> {
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
        return serde_json::from_str(&body)
            .map_err(|e| unreachable(format!("unexpected answer ({e})")));
    }
    let reason = serde_json::from_str::<ErrorBody>(&body)
        .map(|b| b.error.message)
        .unwrap_or_else(|_| format!("HTTP {status}"));
    Err(IdentityError::Refused {
        url: http.to_string(),
        reason,
    })
}
