//! `kennel keys recover`: a new admin key minted straight into the store of a data directory,
//! for when every admin key is lost or revoked.

use std::path::{Path, PathBuf};

use kennel_proto::api::{ApiKey, Scope};
use kennel_store::Store;

use crate::config::AuthConfig;
use crate::key::key_id;
use crate::private_file::write_private;
use crate::ring::KeyRing;

/// A new admin key minted by [`recover_admin`].
#[derive(Debug)]
pub struct Recovered {
    /// The full key: shown once.
    pub key: String,
    pub info: ApiKey,
    /// Where it was written (`<data_dir>/admin.key`, mode 0600).
    pub path: PathBuf,
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

/// Mints a new admin key straight into the store of `data_dir`, for when every admin key is
/// lost or revoked: whoever can read the data directory (and so the hash key) holds the server
/// anyway. Hashed with the same key the server uses (`auth.hash_key`, else
/// `<data_dir>/hash.key`), so the server accepts it at once if it is running (SQLite in WAL
/// mode lets both processes write) or after it starts. Writes it to `<data_dir>/admin.key`
/// (0600), where the CLI looks for a key by default.
pub async fn recover_admin(
    data_dir: &Path,
    auth: &AuthConfig,
    now_ms: i64,
) -> Result<Recovered, RecoverError> {
    let db = data_dir.join("kennel.db");
    if !db.is_file() {
        return Err(RecoverError::NoDatabase(db.display().to_string()));
    }
    let hash_file = data_dir.join("hash.key");
    if auth.hash_key.is_none() && !hash_file.is_file() {
        return Err(RecoverError::NoHashKey(hash_file.display().to_string()));
    }
    let data_err = |source| RecoverError::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    let keys =
        KeyRing::new(KeyRing::load_hash_key(auth.hash_key.as_deref(), data_dir).map_err(data_err)?);
    let store = kennel_store::SqliteStore::open(&db).await?;
    let now = kennel_store::rfc3339(now_ms);
    let name = format!("recovered admin {}", &now[..now.len().min(10)]);
    let (key, record) = keys.mint(&name, vec![Scope::Admin], now);
    store.insert_key(&record).await?;
    let path = data_dir.join("admin.key");
    write_private(&path, &key).map_err(data_err)?;
    let mut configured_revoked = None;
    if let Some(k) = &auth.admin_key {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_a_directory_without_a_database_or_hash_key() {
        let dir = tempfile::tempdir().unwrap();
        let auth = AuthConfig::default();
        let err = recover_admin(dir.path(), &auth, 0).await.unwrap_err();
        assert!(matches!(err, RecoverError::NoDatabase(_)), "{err}");
        kennel_store::SqliteStore::open(&dir.path().join("kennel.db"))
            .await
            .unwrap();
        let err = recover_admin(dir.path(), &auth, 0).await.unwrap_err();
        assert!(matches!(err, RecoverError::NoHashKey(_)), "{err}");
        assert!(
            !dir.path().join("hash.key").exists(),
            "no hash key is invented"
        );
    }

    #[tokio::test]
    async fn the_recovered_key_verifies_with_the_directory_hash_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("kennel.db");
        let store = kennel_store::SqliteStore::open(&db).await.unwrap();
        let ring = KeyRing::new(KeyRing::load_hash_key(None, dir.path()).unwrap());
        let configured = "a-configured-admin-key-of-24+".to_string();
        let rec = ring
            .record_for(
                &configured,
                "configured admin",
                vec![Scope::Admin],
                "t".into(),
            )
            .unwrap();
        store.insert_key(&rec).await.unwrap();
        store.revoke_key(&rec.info.id, 1).await.unwrap();

        let auth = AuthConfig {
            admin_key: Some(configured),
            hash_key: None,
        };
        let r = recover_admin(dir.path(), &auth, 1_700_000_000_000)
            .await
            .unwrap();
        assert_eq!(r.configured_revoked.as_deref(), Some(rec.info.id.as_str()));
        assert_eq!(
            std::fs::read_to_string(&r.path).unwrap(),
            format!("{}\n", r.key)
        );
        let p = ring.verify(&store, &r.key, 2).await.unwrap().unwrap();
        assert_eq!(p.scopes, vec![Scope::Admin]);
        assert!(
            r.info.name.starts_with("recovered admin 2023-"),
            "{}",
            r.info.name
        );
    }
}
