//! A fixed list of accepted keys that is not in the store: the relay's `relay.daemon_keys` and
//! `relay.admin_keys`. The keys are kept only as keyed hashes, and a presented key is hashed the
//! way [`crate::KeyRing`] hashes keys, then compared with every entry in constant time, so
//! neither a key, its length nor its position in the list leaks through timing.

use subtle::Choice;

use crate::hash::{same_hash, KeyHasher};
use crate::key::random_hex;

/// Accepted keys, as hashes under a hash key of this list's own.
pub struct KeyList {
    hasher: KeyHasher,
    hashes: Vec<Vec<u8>>,
}

impl KeyList {
    /// Hashes `keys` under a hash key drawn from the OS: the hashes never leave this process,
    /// so no one else needs to know it.
    pub fn new(keys: &[String]) -> Self {
        Self::with_hash_key(random_hex(32).into_bytes(), keys)
    }

    /// Hashes `keys` under `hash_key`.
    pub fn with_hash_key(hash_key: Vec<u8>, keys: &[String]) -> Self {
        let hasher = KeyHasher::new(hash_key);
        let hashes = keys.iter().map(|k| hasher.hash(k)).collect();
        KeyList { hasher, hashes }
    }

    /// True when `given` is one of the keys. Every entry is compared, whether or not an earlier
    /// one matched; an empty key never matches.
    pub fn contains(&self, given: &str) -> bool {
        let presented = self.hasher.hash(given);
        let mut found = Choice::from(0);
        for h in &self.hashes {
            found |= same_hash(h, &presented);
        }
        bool::from(found) && !given.is_empty()
    }
}

impl std::fmt::Debug for KeyList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyList({} keys)", self.hashes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let keys = KeyList::new(&["dk_one".to_string(), "dk_two".to_string()]);
        assert!(keys.contains("dk_two"));
        assert!(keys.contains("dk_one"));
        assert!(!keys.contains("dk_tw"));
        assert!(!keys.contains("dk_two "));
        assert!(!keys.contains(""));
        assert!(!KeyList::new(&[]).contains("dk_one"));
    }

    #[test]
    fn an_empty_key_never_matches_even_if_listed() {
        let keys = KeyList::new(&[String::new()]);
        assert!(!keys.contains(""));
    }

    #[test]
    fn keeps_hashes_not_keys() {
        let keys = KeyList::with_hash_key(b"k".repeat(32), &["dk_secret".to_string()]);
        assert!(!keys
            .hashes
            .iter()
            .any(|h| h.windows(9).any(|w| w == b"dk_secret")));
        assert_eq!(format!("{keys:?}"), "KeyList(1 keys)");
    }
}
