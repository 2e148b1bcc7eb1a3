//! Verification of kennel API keys against the store: [`KeyRing`] hashes a presented key,
//! looks its id up (with a short cache), compares the hashes in constant time and answers with
//! the caller's [`Principal`]; [`Principal::require`] checks scopes. Also mints keys and makes
//! the records that store them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kennel_proto::api::{ApiKey, Scope};
use kennel_store::{KeyRecord, Store, StoreError};

use crate::hash::{same_hash, KeyHasher};
use crate::key::{key_id, new_key, random_hex};
use crate::private_file::write_private;

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

/// A key that lacks the scope a call needs; each service answers with its own status.
#[derive(Debug, thiserror::Error)]
#[error(
    "this key (id {key_id}) lacks the scope for this call; it needs {needs} (ask an admin for a \
     key that has it)"
)]
pub struct MissingScope {
    /// The id of the key that was presented.
    pub key_id: String,
    /// The scopes that would do, as words (`one of: admin, daemon`).
    pub needs: String,
}

impl Principal {
    /// Admin passes every check; otherwise one of `allowed` must be held.
    pub fn require(&self, allowed: &[Scope]) -> Result<(), MissingScope> {
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
        Err(MissingScope {
            key_id: self.key_id.clone(),
            needs,
        })
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
    hasher: KeyHasher,
    cache: Mutex<HashMap<String, Cached>>,
}

impl KeyRing {
    pub fn new(hash_key: Vec<u8>) -> Self {
        KeyRing {
            hasher: KeyHasher::new(hash_key),
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

    /// The keyed hash the store keeps for `key`.
    pub fn hash(&self, key: &str) -> Vec<u8> {
        self.hasher.hash(key)
    }

    /// Whether `presented` hashes to `stored`, compared in constant time.
    pub fn matches(&self, presented: &str, stored: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.hash(presented).ct_eq(stored).into()
    }

    /// Creates a new key with `scopes`; returns the plaintext (shown once) and its record.
    pub fn mint(&self, name: &str, scopes: Vec<Scope>, created_at: String) -> (String, KeyRecord) {
        let key = new_key();
        let record = self.record(&key, name, scopes, created_at);
        (key, record)
    }

    /// The record storing `key` (for keys given in config). Always `Some`; the `Option` is
    /// kept for the callers written against it.
    pub fn record_for(
        &self,
        key: &str,
        name: &str,
        scopes: Vec<Scope>,
        created_at: String,
    ) -> Option<KeyRecord> {
        Some(self.record(key, name, scopes, created_at))
    }

    fn record(&self, key: &str, name: &str, scopes: Vec<Scope>, created_at: String) -> KeyRecord {
        KeyRecord {
            info: ApiKey {
                id: key_id(key),
                name: name.to_string(),
                scopes,
                created_at,
                last_used_at: None,
                revoked_at: None,
            },
            hash: self.hash(key),
        }
    }

    /// Checks a presented key; `None` when unknown, wrong or revoked.
    pub async fn verify(
        &self,
        store: &dyn Store,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<Principal>, StoreError> {
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
        if revoked || !bool::from(same_hash(&hash, &presented)) {
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

    /// Forgets a cached key (after a revoke on this coordinator or another).
    pub fn forget(&self, id: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Forgets every cached key: revocations were missed, so none is trusted from the cache.
    pub fn forget_all(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kennel_store::SqliteStore;

    #[test]
    fn minted_keys_are_stored_as_keyed_hashes() {
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
        assert!(admin.require(&[]).is_ok());
        let client = Principal {
            key_id: "y".into(),
            scopes: vec![Scope::Client],
        };
        assert!(client.require(&[Scope::Client]).is_ok());
        let err = client.require(&[Scope::Daemon]).unwrap_err();
        assert!(err.to_string().contains("needs one of: admin, daemon"));
        assert!(err.to_string().contains("(id y)"), "{err}");
        let err = client.require(&[]).unwrap_err();
        assert!(err.to_string().contains("needs the admin scope"), "{err}");
    }

    #[tokio::test]
    async fn verify_accepts_the_stored_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("kennel.db"))
            .await
            .unwrap();
        let ring = KeyRing::new(b"h".repeat(32));
        let (key, rec) = ring.mint("ci", vec![Scope::Client], "2026-01-01T00:00:00Z".into());
        store.insert_key(&rec).await.unwrap();

        let p = ring.verify(&store, &key, 1_000).await.unwrap().unwrap();
        assert_eq!(p.key_id, rec.info.id);
        assert_eq!(p.scopes, vec![Scope::Client]);
        let found = store.find_key(&rec.info.id).await.unwrap().unwrap();
        assert!(
            found.info.last_used_at.is_some(),
            "a verified key is marked used"
        );

        // Same id, another secret: the hashes differ.
        let forged = format!("kn_{}_{}", rec.info.id, "0".repeat(48));
        assert!(ring.verify(&store, &forged, 1_000).await.unwrap().is_none());
        assert!(ring
            .verify(&store, "kn_ffffffffffff_unknown", 1_000)
            .await
            .unwrap()
            .is_none());
        // A ring with another hash key does not accept it either.
        let other = KeyRing::new(b"o".repeat(32));
        assert!(other.verify(&store, &key, 1_000).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_revoked_key_fails_once_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("kennel.db"))
            .await
            .unwrap();
        let ring = KeyRing::new(b"h".repeat(32));
        let (key, rec) = ring.mint("ci", vec![Scope::Daemon], "2026-01-01T00:00:00Z".into());
        store.insert_key(&rec).await.unwrap();
        assert!(ring.verify(&store, &key, 1).await.unwrap().is_some());
        store.revoke_key(&rec.info.id, 2).await.unwrap();
        ring.forget(&rec.info.id);
        assert!(ring.verify(&store, &key, 3).await.unwrap().is_none());
    }

    #[test]
    fn the_hash_key_file_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = KeyRing::load_hash_key(None, dir.path()).unwrap();
        assert_eq!(first.len(), 64);
        let path = dir.path().join("hash.key");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(KeyRing::load_hash_key(None, dir.path()).unwrap(), first);
        assert_eq!(
            KeyRing::load_hash_key(Some("configured"), dir.path()).unwrap(),
            b"configured".to_vec()
        );
        std::fs::write(&path, "short\n").unwrap();
        let err = KeyRing::load_hash_key(None, dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("shorter than 32 characters"),
            "{err}"
        );
    }
}
