//! API keys, apart from any HTTP framework: the key format (`kn_<id>_<secret>`), minting, the
//! keyed hash that is stored instead of a key, constant-time comparison, verification against
//! the store with a short cache, scope checks, and the recovery of an admin key. The
//! coordinator and the gateway verify kennel keys with [`KeyRing`]; the relay keeps its own key
//! lists but hashes and compares them the same way ([`KeyList`]).
//!
//! This crate must not know about HTTP: each service reads the key from its requests and turns
//! these answers into its own responses. Keys are never logged: a [`Principal`] carries the id
//! only.

mod config;
mod hash;
mod key;
mod list;
mod private_file;
mod recover;
mod ring;

pub use config::AuthConfig;
pub use key::{hex, join_token_id, key_id, new_join_token, random_hex};
pub use list::KeyList;
pub use private_file::write_private;
pub use recover::{recover_admin, RecoverError, Recovered};
pub use ring::{KeyRing, MissingScope, Principal};
