//! The key format, `kn_<id>_<secret>`: a 12-hex-digit public id and a 48-hex-digit secret,
//! both drawn from the OS. The id names the key in the store, logs and the API; the secret
//! never leaves the caller and [`crate::KeyRing`].

use sha2::{Digest, Sha256};

/// Random bytes from the OS as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS random source failing is unrecoverable for a server that must mint secrets.
    getrandom::fill(&mut buf).unwrap_or_else(|e| panic!("the OS random source failed: {e}"));
    hex(&buf)
}

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// A new key: `kn_<id>_<secret>`.
pub(crate) fn new_key() -> String {
    format!("kn_{}_{}", random_hex(6), random_hex(24))
}

/// A new one-time join token for a build agent: `kj_<id>_<secret>`, shaped like a key.
pub fn new_join_token() -> String {
    format!("kj_{}_{}", random_hex(6), random_hex(24))
}

/// The `<id>` of a join token `kj_<id>_<secret>`, or `None` for anything else.
pub fn join_token_id(token: &str) -> Option<&str> {
    let (id, secret) = token.strip_prefix("kj_")?.split_once('_')?;
    let hexes = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexes(id, 12) && hexes(secret, 48)).then_some(id)
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
    fn new_keys_have_the_format_and_their_own_id() {
        let k = new_key();
        let rest = k.strip_prefix("kn_").unwrap_or_else(|| panic!("{k}"));
        let (id, secret) = rest.split_once('_').unwrap_or_else(|| panic!("{k}"));
        assert_eq!((id.len(), secret.len()), (12, 48), "{k}");
        assert!(
            k[3..].bytes().all(|b| b == b'_' || b.is_ascii_hexdigit()),
            "{k}"
        );
        assert_eq!(key_id(&k), id);
        assert_ne!(new_key(), k);
    }
}
