//! API keys: generation, keyed hashing, verification and the request extractor.
//!
//! A key looks like `kn_<id>_<secret>`. Only the id (a public prefix) and
//! HMAC-SHA256(hash key, whole key) are stored; comparison is constant-time. Keys are never
//! logged: [`Principal`] carries the id only.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use hmac::{Hmac, Mac};
use kennel_proto::api::{ApiKey, Scope};
use kennel_store::{KeyRecord, Store};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

type HmacSha256 = Hmac<Sha256>;

/// How long a verified key stays cached before the store is asked again (so a revoke on
/// another coordinator takes effect within this time).
const CACHE_TTL: Duration = Duration::from_secs(5);
/// `last_used_at` is written at most this often per key.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Who is calling, after a key was verified.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// Admin passes every check; otherwise one of `allowed` must be held.
    pub fn require(&self, allowed: &[Scope]) -> Result<(), ApiError> {
        if self.scopes.contains(&Scope::Admin) || self.scopes.iter().any(|s| allowed.contains(s)) {
            return Ok(());
        }
        // An admin-only call passes an empty list: "one of: admin, " would read as a list
        // with something missing, so name the one scope that works.
        let needs = if allowed.is_empty() {
            "the admin scope".to_string()
        } else {
            let names: Vec<_> = allowed.iter().map(|s| s.as_str()).collect();
            format!("one of: admin, {}", names.join(", "))
        };
        Err(ApiError::forbidden(format!(
            "this key (id {}) lacks the scope for this call; it needs {needs} (ask an admin \
             for a key that has it)",
            self.key_id
        )))
    }
}

struct Cached {
    hash: Vec<u8>,
    scopes: Vec<Scope>,
    revoked: bool,
    fetched: Instant,
    touched: Option<Instant>,
}

/// Verifies keys against the store, with a short-lived cache.
pub struct KeyRing {
    hash_key: Vec<u8>,
    cache: Mutex<HashMap<String, Cached>>,
}

/// Random bytes from the OS as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS random source failing is unrecoverable for a server that must mint secrets.
    getrandom::fill(&mut buf).unwrap_or_else(|e| panic!("the OS random source failed: {e}"));
    hex(&buf)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The id under which a presented key is stored: the `<id>` of `kn_<id>_<secret>`, or a
/// digest prefix for keys supplied in config in another shape.
pub fn key_id(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("kn_") {
        if let Some((id, secret)) = rest.split_once('_') {
            if id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty() {
                return id.to_string();
            }
        }
    }
    let digest = Sha256::digest(key.as_bytes());
    format!("cfg{}", &hex(&digest)[..9])
}

impl KeyRing {
    pub fn new(hash_key: Vec<u8>) -> Self {
        KeyRing {
            hash_key,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the hash key from config, else from `<data_dir>/hash.key`, creating it (0600).
    pub fn load_hash_key(configured: Option<&str>, data_dir: &Path) -> std::io::Result<Vec<u8>> {
        if let Some(k) = configured {
            return Ok(k.as_bytes().to_vec());
        }
        let path = data_dir.join("hash.key");
        match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().len() >= 32 => Ok(s.trim().as_bytes().to_vec()),
            Ok(_) => Err(std::io::Error::other(format!(
                "{} is shorter than 32 characters; delete it only if no API key was created yet",
                path.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = random_hex(32);
                write_private(&path, &k)?;
                Ok(k.into_bytes())
            }
            Err(e) => Err(e),
        }
    }

    pub fn hash(&self, key: &str) -> Vec<u8> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.hash_key)
            .unwrap_or_else(|_| unreachable!("hmac takes any key length"));
        mac.update(key.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// Creates a new key with `scopes`; returns the plaintext (shown once) and its record.
    pub fn mint(&self, name: &str, scopes: Vec<Scope>, created_at: String) -> (String, KeyRecord) {
        let id = random_hex(6);
        let key = format!("kn_{id}_{}", random_hex(24));
        self.record_for(&key, name, scopes, created_at)
            .map(|r| (key.clone(), r))
            .unwrap_or_else(|| unreachable!("minted keys always have an id"))
    }

    /// The record storing `key` (for keys given in config).
    pub fn record_for(
        &self,
        key: &str,
        name: &str,
        scopes: Vec<Scope>,
        created_at: String,
    ) -> Option<KeyRecord> {
        Some(KeyRecord {
            info: ApiKey {
                id: key_id(key),
                name: name.to_string(),
                scopes,
                created_at,
                last_used_at: None,
                revoked_at: None,
            },
            hash: self.hash(key),
        })
    }

    /// Checks a presented key; `None` when unknown, wrong or revoked.
    pub async fn verify(
        &self,
        store: &dyn Store,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<Principal>, kennel_store::StoreError> {
        let id = key_id(key);
        let presented = self.hash(key);
        let fresh = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .get(&id)
                .filter(|c| c.fetched.elapsed() < CACHE_TTL)
                .map(|c| (c.hash.clone(), c.scopes.clone(), c.revoked))
        };
        let (hash, scopes, revoked) = match fresh {
            Some(v) => v,
            None => {
                let Some(rec) = store.find_key(&id).await? else {
                    return Ok(None);
                };
                let revoked = rec.info.revoked_at.is_some();
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                let touched = cache.get(&id).and_then(|c| c.touched);
                cache.insert(
                    id.clone(),
                    Cached {
                        hash: rec.hash.clone(),
                        scopes: rec.info.scopes.clone(),
                        revoked,
                        fetched: Instant::now(),
                        touched,
                    },
                );
                (rec.hash, rec.info.scopes, revoked)
            }
        };
        if revoked || !bool::from(hash.ct_eq(&presented)) {
            return Ok(None);
        }
        let touch = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get_mut(&id) {
                Some(c) if c.touched.is_none_or(|t| t.elapsed() > TOUCH_EVERY) => {
                    c.touched = Some(Instant::now());
                    true
                }
                _ => false,
            }
        };
        if touch {
            store.touch_key(&id, now_ms).await?;
        }
        Ok(Some(Principal { key_id: id, scopes }))
    }

    /// Forgets a cached key (after a revoke on this coordinator).
    pub fn forget(&self, id: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// A new admin key minted by [`recover_admin`].
#[derive(Debug)]
pub struct Recovered {
    /// The full key: shown once.
    pub key: String,
    pub info: ApiKey,
    /// Where it was written (`<data_dir>/admin.key`, mode 0600).
    pub path: std::path::PathBuf,
    /// The id of the configured admin key (`server.auth.admin_key`) when that key is revoked:
    /// the server will refuse to start until the configuration drops it.
    pub configured_revoked: Option<String>,
}

/// Why [`recover_admin`] could not mint a key.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(
        "no kennel database at {0}: pass the data directory the server uses (`--data-dir`, or \
         `server.data_dir` in its configuration)"
    )]
    NoDatabase(String),
    #[error(
        "no hash key: server.auth.hash_key is not configured and {0} does not exist, so a key \
         minted here could not be checked by the server; run with the server's configuration"
    )]
    NoHashKey(String),
    #[error("failed to read or write the data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to use the store")]
    Store(#[from] kennel_store::StoreError),
}

/// Mints a new admin key straight into the store of `cfg.data_dir`, for when every admin key
/// is lost or revoked: whoever can read the data directory (and so the hash key) holds the
/// server anyway. Hashed with the same key the server uses, so the server accepts it at once
/// if it is running (SQLite in WAL mode lets both processes write) or after it starts. Writes
/// it to `<data_dir>/admin.key` (0600), where the CLI looks for a key by default.
pub async fn recover_admin(
    cfg: &crate::config::ServerConfig,
    now_ms: i64,
) -> Result<Recovered, RecoverError> {
    let dir = &cfg.data_dir;
    let db = dir.join("kennel.db");
    if !db.is_file() {
        return Err(RecoverError::NoDatabase(db.display().to_string()));
    }
    let hash_file = dir.join("hash.key");
    if cfg.auth.hash_key.is_none() && !hash_file.is_file() {
        return Err(RecoverError::NoHashKey(hash_file.display().to_string()));
    }
    let data_err = |source| RecoverError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    let keys =
        KeyRing::new(KeyRing::load_hash_key(cfg.auth.hash_key.as_deref(), dir).map_err(data_err)?);
    let store = kennel_store::SqliteStore::open(&db).await?;
    let now = kennel_store::rfc3339(now_ms);
    let name = format!("recovered admin {}", &now[..now.len().min(10)]);
    let (key, record) = keys.mint(&name, vec![Scope::Admin], now);
    store.insert_key(&record).await?;
    let path = dir.join("admin.key");
    write_private(&path, &key).map_err(data_err)?;
    let mut configured_revoked = None;
    if let Some(k) = &cfg.auth.admin_key {
        let id = key_id(k);
        if let Some(rec) = store.find_key(&id).await? {
            if rec.info.revoked_at.is_some() {
                configured_revoked = Some(id);
            }
        }
    }
    Ok(Recovered {
        key,
        info: record.info,
        path,
        configured_revoked,
    })
}

/// Writes a secret file readable by the owner only.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // `mode` applies only when the file is created; an older file may be wider open.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")
}

/// The key presented with a request: `Authorization: Bearer <key>` or `X-Api-Key: <key>`.
pub fn presented_key(parts: &Parts) -> Option<&str> {
    if let Some(v) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        return v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim);
    }
    parts
        .headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

impl FromRequestParts<Arc<AppState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(key) = presented_key(parts) else {
            return Err(ApiError::unauthorized(
                "missing API key: send `Authorization: Bearer <key>` (kennel keys create makes one)",
            ));
        };
        match state
            .keys
            .verify(state.store.as_ref(), key, state.clock.now_ms())
            .await?
        {
            Some(p) => Ok(p),
            None => Err(ApiError::unauthorized(
                "invalid or revoked API key: check the key, or ask an admin for a new one",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids() {
        assert_eq!(key_id("kn_0123456789ab_deadbeef"), "0123456789ab");
        let cfg = key_id("some-long-configured-admin-key");
        assert!(cfg.starts_with("cfg") && cfg.len() == 12, "{cfg}");
        assert_ne!(key_id("kn_short_x"), "short");
    }

    #[test]
    fn hashes_are_keyed() {
        let a = KeyRing::new(b"a".repeat(32));
        let b = KeyRing::new(b"b".repeat(32));
        assert_ne!(a.hash("kn_x"), b.hash("kn_x"));
        assert_eq!(a.hash("kn_x"), a.hash("kn_x"));
        let (key, rec) = a.mint("ci", vec![Scope::Client], "2026-01-01T00:00:00Z".into());
        assert!(key.starts_with(&format!("kn_{}_", rec.info.id)));
        assert_eq!(rec.hash, a.hash(&key));
        assert!(!format!("{rec:?}").contains(&key));
    }

    #[test]
    fn admin_passes_every_scope_check() {
        let admin = Principal {
            key_id: "x".into(),
            scopes: vec![Scope::Admin],
        };
        assert!(admin.require(&[Scope::Daemon]).is_ok());
        let client = Principal {
            key_id: "y".into(),
            scopes: vec![Scope::Client],
        };
        assert!(client.require(&[Scope::Client]).is_ok());
        let err = client.require(&[Scope::Daemon]).unwrap_err();
        assert!(err.to_string().contains("needs one of: admin, daemon"));
    }
}
