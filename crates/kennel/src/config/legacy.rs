//! Durations used to be whole numbers with their unit in the key (`heartbeat_interval_secs =
//! 10`, `header_read_timeout_ms = 10000`, `worktree_retention_hours = 24`); now every duration
//! is a string with a unit under the plain name (`heartbeat_interval = "10s"`, see
//! `kennel_proto::Span`). [`Durations`] wraps each source of configuration (the file, the
//! environment, flags) and rewrites the old keys into the new ones before anything is merged,
//! noting one warning per key, so configurations written for older versions keep working and
//! say what to change.

use std::sync::{Arc, Mutex};

use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

/// The old unit suffixes and what each becomes.
const SUFFIXES: [(&str, &str); 4] = [
    ("_ms", "ms"),
    ("_secs", "s"),
    ("_hours", "h"),
    ("_days", "d"),
];

/// The name of the flags' provider, for error messages.
pub const FLAG_SOURCE: &str = "a command-line flag";

/// Where a value came from, for the warning.
#[derive(Debug, Clone)]
pub enum Origin {
    File(String),
    Env,
    Flag,
}

/// The warnings noted while loading, shared by the wrapped providers.
#[derive(Debug, Clone, Default)]
pub struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    fn push(&self, w: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(w);
    }

    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A provider whose old duration keys are rewritten (see the module documentation).
pub struct Durations<P> {
    inner: P,
    origin: Origin,
    warnings: Warnings,
}

impl<P> Durations<P> {
    pub fn new(inner: P, origin: Origin, warnings: &Warnings) -> Self {
        Durations {
            inner,
            origin,
            warnings: warnings.clone(),
        }
    }
}

impl<P: Provider> Provider for Durations<P> {
    fn metadata(&self) -> Metadata {
        match self.origin {
            // Flags arrive as serialized values, whose own metadata names this source file.
            Origin::Flag => Metadata::named(FLAG_SOURCE),
            Origin::File(_) | Origin::Env => self.inner.metadata(),
        }
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut data = self.inner.data()?;
        for dict in data.values_mut() {
            self.rewrite(dict, &mut Vec::new())
                .map_err(figment::Error::from)?;
        }
        Ok(data)
    }
}

impl<P> Durations<P> {
    fn rewrite(&self, dict: &mut Dict, path: &mut Vec<String>) -> Result<(), String> {
        let keys: Vec<String> = dict.keys().cloned().collect();
        for key in keys {
            path.push(key.clone());
            let data_map = is_data_map(path);
            match dict.get_mut(&key) {
                Some(Value::Dict(_, child)) if !data_map => self.rewrite(child, path)?,
                Some(Value::Array(_, items)) => {
                    for (i, item) in items.iter_mut().enumerate() {
                        if let Value::Dict(_, child) = item {
                            path.push(format!("[{i}]"));
                            self.rewrite(child, path)?;
                            path.pop();
                        }
                    }
                }
                _ => {}
            }
            path.pop();
            // Only a value can be an old duration: a table under a name that ends like one
            // (an agent profile called `fast_ms`) is left to the rest of the loader.
            let scalar = !matches!(dict.get(&key), Some(Value::Dict(..) | Value::Array(..)));
            if let Some((stem, unit)) = old_key(&key).filter(|_| scalar) {
                self.convert(dict, path, &key, stem, unit)?;
            }
        }
        Ok(())
    }

    fn convert(
        &self,
        dict: &mut Dict,
        path: &[String],
        key: &str,
        stem: &str,
        unit: &str,
    ) -> Result<(), String> {
        // `gateway.upstreams[0].total_timeout_ms`, as validation names keys.
        let dotted = |k: &str| {
            let mut out = String::new();
            for segment in path.iter().map(String::as_str).chain([k]) {
                if !out.is_empty() && !segment.starts_with('[') {
                    out.push('.');
                }
                out.push_str(segment);
            }
            out
        };
        let Some(value) = dict.get(key) else {
            return Ok(());
        };
        let number = match value {
            Value::Num(_, n) => n
                .to_u128()
                .or_else(|| n.to_i128().and_then(|v| u128::try_from(v).ok()))
                .and_then(|n| u64::try_from(n).ok()),
            Value::String(_, s) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        let Some(n) = number else {
            return Err(format!(
                "{} must be a whole number (it is deprecated: write {stem} = \"<n>{unit}\" instead)",
                dotted(key)
            ));
        };
        if dict.contains_key(stem) {
            return Err(format!(
                "{} and {} are both set; keep only {stem} (the old {key} is deprecated)",
                dotted(key),
                dotted(stem)
            ));
        }
        dict.remove(key);
        // Written the shortest way (`auth_ms = 120000` becomes "2m").
        let new = kennel_proto::Span::parse(&format!("{n}{unit}"))
            .map(|s| s.to_string())
            .map_err(|e| format!("{}: {e}", dotted(key)))?;
        dict.insert(stem.to_string(), Value::from(new.clone()));
        let place = match &self.origin {
            Origin::File(f) => format!("{} in {f}", dotted(key)),
            Origin::Env => format!(
                "{} (KENNEL_{})",
                dotted(key),
                path.iter()
                    .map(|s| s.to_ascii_uppercase())
                    .chain([key.to_ascii_uppercase()])
                    .collect::<Vec<_>>()
                    .join("__")
            ),
            Origin::Flag => format!("{} (a flag)", dotted(key)),
        };
        self.warnings
            .push(format!("{place} is deprecated; write {stem} = \"{new}\""));
        Ok(())
    }
}

/// `heartbeat_interval_secs` → (`heartbeat_interval`, `s`).
fn old_key(key: &str) -> Option<(&str, &'static str)> {
    SUFFIXES.iter().find_map(|(suffix, unit)| {
        key.strip_suffix(suffix)
            .filter(|stem| !stem.is_empty())
            .map(|stem| (stem, *unit))
    })
}

/// Maps whose keys are data (labels, environment variables, model renames), where a key that
/// ends like an old duration is not one.
fn is_data_map(path: &[String]) -> bool {
    let last = path.last().map(String::as_str);
    matches!(last, Some("labels" | "env" | "renames"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use figment::providers::{Format, Toml};
    use figment::Figment;

    fn rewritten(toml: &str) -> Result<(Value, Vec<String>), String> {
        let warnings = Warnings::default();
        let provider = Durations::new(Toml::string(toml), Origin::File("k.toml".into()), &warnings);
        let value: Value = Figment::from(provider)
            .extract()
            .map_err(|e| e.to_string())?;
        Ok((value, warnings.take()))
    }

    #[test]
    fn old_keys_become_strings_with_a_unit_under_the_plain_name_with_a_warning_each() {
        let (v, w) = rewritten(
            "[server.protocol]\nheartbeat_interval_secs = 15\n\
             [server.http]\nheader_read_timeout_ms = 2500\n\
             [daemon]\nworktree_retention_hours = 24\n\
             [relay]\nhistory_retention_days = 7\n\
             [[gateway.upstreams]]\nname = \"a\"\ntotal_timeout_ms = 1000\n",
        )
        .unwrap();
        let get = |p: &str| v.find_ref(p).and_then(|v| v.as_str().map(str::to_string));
        assert_eq!(
            get("server.protocol.heartbeat_interval").as_deref(),
            Some("15s")
        );
        assert_eq!(
            get("server.http.header_read_timeout").as_deref(),
            Some("2s500ms")
        );
        assert_eq!(get("daemon.worktree_retention").as_deref(), Some("1d"));
        assert_eq!(get("relay.history_retention").as_deref(), Some("7d"));
        assert!(v
            .find_ref("server.protocol.heartbeat_interval_secs")
            .is_none());
        assert_eq!(w.len(), 5, "{w:?}");
        assert!(
            w.contains(
                &"server.protocol.heartbeat_interval_secs in k.toml is deprecated; write \
                  heartbeat_interval = \"15s\""
                    .to_string()
            ),
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|w| w.starts_with("gateway.upstreams[0].total_timeout_ms in k.toml")),
            "{w:?}"
        );
    }

    #[test]
    fn old_and_new_spelling_together_is_an_error_and_data_maps_are_left_alone() {
        let e = rewritten("[server.scheduler]\naccept_timeout_secs = 5\naccept_timeout = \"5s\"\n")
            .unwrap_err();
        assert!(e.contains("are both set; keep only accept_timeout"), "{e}");
        let (v, w) = rewritten("[daemon.agents.claude.env]\nAPI_TIMEOUT_MS = 3000\n").unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert!(v
            .find_ref("daemon.agents.claude.env.API_TIMEOUT_MS")
            .is_some());
        let e = rewritten("[daemon]\nshutdown_grace_secs = \"soon\"\n").unwrap_err();
        assert!(e.contains("must be a whole number"), "{e}");
    }
}
