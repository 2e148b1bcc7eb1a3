//! `[server.auth]`: the admin key to accept and the secret of the keyed hash. The coordinator
//! reads it as part of its configuration; the gateway is handed the same section, so a key
//! hashes the same way in both. Ranges are checked with the rest of the server's section.

use serde::{Deserialize, Serialize};

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// An admin key to accept (created on start if missing). Otherwise the first start creates
    /// one, prints it once and writes it to `<data_dir>/admin.key`.
    pub admin_key: Option<String>,
    /// Secret for the keyed hash of API keys. Several coordinators sharing a database need the
    /// same one. Default: generated into `<data_dir>/hash.key`.
    pub hash_key: Option<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |o: &Option<String>| o.as_ref().map(|_| "***");
        f.debug_struct("AuthConfig")
            .field("admin_key", &redact(&self.admin_key))
            .field("hash_key", &redact(&self.hash_key))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_secret() {
        let cfg = AuthConfig {
            admin_key: Some("kn_0123456789ab_secret-admin".into()),
            hash_key: Some("a-hash-key-of-at-least-32-characters".into()),
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("secret-admin"), "{shown}");
        assert!(!shown.contains("a-hash-key"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }
}
