//! `kennel config show`: the effective configuration after file, environment and flags, with
//! every secret redacted and the built-in agent profiles listed beside the configured ones.
//!
//! Redaction is one walk over the serialized configuration with a rule set, not a list of
//! fields, so a new field is covered as soon as its name says it holds a secret:
//! - a string under a key whose name looks secret ([`secret_name`]: `api_key`, `hash_key`,
//!   `daemon_keys`, `ANTHROPIC_API_KEY`, `GH_TOKEN`, `auth.*`, …) is replaced whole, in any
//!   section and in any map (an agent's `env` included);
//! - a string that contains a kennel API key or a provider key ([`contains_key`]) is replaced
//!   whole, whatever its key is called;
//! - in any URL, the password of the user info and secret-named query parameters are replaced
//!   ([`redact_urls`]), in values and in map keys (`daemon.repos` is keyed by URL).
//!
//! The gateway's upstreams hold no keys, only the names of the variables that do
//! (`api_key_env`), so those names stay visible. This module never changes the configuration
//! that commands run with; it only prints.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Subcommand;
use kennel_daemon::agent;
use serde::Serialize;
use serde_json::Value;

use crate::config::{self, Config};
use crate::Global;

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration as TOML (secrets redacted, built-in agent profiles
    /// included and marked).
    Show,
}

/// What replaces a secret.
const REDACTED: &str = "<redacted>";

/// Parts of a key name that mark its value as secret, matched anywhere in the name and in any
/// case (`PGPASSWORD`, `hash_key`). `AUTH` is matched by word instead, see [`secret_name`].
const SECRET_PARTS: [&str; 5] = ["KEY", "TOKEN", "SECRET", "PASSWD", "CREDENTIAL"];

/// Key names that look secret but hold the name of an environment variable, not its value.
const VARIABLE_NAMES: [&str; 1] = ["api_key_env"];

/// Prefixes of credentials recognised by their shape, with the least number of characters
/// that follow: kennel API keys (`kn_<id>_<secret>`, see [`kennel_key_at`]) are handled apart.
const KEY_PREFIXES: [(&str, usize); 5] = [
    ("sk-", 20),
    ("ghp_", 20),
    ("gho_", 20),
    ("ghs_", 20),
    ("github_pat_", 20),
];

pub fn run(g: &Global, cmd: ConfigCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCmd::Show => {
            let (cfg, file) = config::load(g.config.as_deref(), &[])?;
            let origins = profile_origins(&cfg);
            let shown = redacted(&with_all_profiles(cfg))?;
            if g.json {
                crate::commands::print_json(&Shown {
                    config: &shown,
                    agent_origins: origins
                        .iter()
                        .map(|(name, origin)| (name.as_str(), origin.token()))
                        .collect(),
                })?;
            } else {
                match &file {
                    Some(f) => println!("# loaded from {}", f.display()),
                    None => {
                        println!("# no config file found; defaults, KENNEL_* environment and flags")
                    }
                }
                print!(
                    "{}",
                    mark_profiles(&toml::to_string_pretty(&shown)?, &origins)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--json` output: the configuration, plus where each agent profile comes from (the one key
/// that is not a configuration key).
#[derive(Serialize)]
struct Shown<'a> {
    #[serde(flatten)]
    config: &'a Config,
    agent_origins: BTreeMap<&'a str, &'static str>,
}

/// Where an effective agent profile comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Built in and not configured.
    BuiltIn,
    /// Built in, with settings from the configuration over it (or replacing it).
    ChangedBuiltIn,
    /// Only in the configuration.
    Configured,
}

impl Origin {
    /// For `--json`.
    fn token(self) -> &'static str {
        match self {
            Origin::BuiltIn => "builtin",
            Origin::ChangedBuiltIn => "builtin_changed",
            Origin::Configured => "configured",
        }
    }

    /// For the comment above the profile's table.
    fn comment(self) -> &'static str {
        match self {
            Origin::BuiltIn => "# built-in",
            Origin::ChangedBuiltIn => "# built-in, changed by configuration",
            Origin::Configured => "# configured",
        }
    }
}

fn profile_origins(cfg: &Config) -> BTreeMap<String, Origin> {
    cfg.daemon
        .profiles()
        .into_keys()
        .map(|name| {
            let origin = match (
                agent::builtin_kind(&name).is_some(),
                cfg.daemon.agents.contains_key(&name),
            ) {
                (true, false) => Origin::BuiltIn,
                (true, true) => Origin::ChangedBuiltIn,
                (false, _) => Origin::Configured,
            };
            (name, origin)
        })
        .collect()
}

/// `cfg` with `daemon.agents` holding every profile in effect, built-ins included.
fn with_all_profiles(mut cfg: Config) -> Config {
    cfg.daemon.agents = cfg.daemon.profiles();
    cfg
}

/// `cfg` with every secret replaced by [`REDACTED`] (see the module docs for the rules). It
/// goes through JSON and back so the walk sees every field, and the printed order stays the
/// order of the structs.
fn redacted(cfg: &Config) -> anyhow::Result<Config> {
    let mut tree = serde_json::to_value(cfg)?;
    redact(&mut tree, false);
    serde_json::from_value(tree).map_err(|e| {
        anyhow::anyhow!(
            "failed to redact the configuration for printing: {e} (a redacted value no longer \
             fits its key; please report this)"
        )
    })
}

/// Redacts `value` in place; `secret` says whether a key above it looks secret.
fn redact(value: &mut Value, secret: bool) {
    match value {
        Value::String(s) if s.is_empty() => {}
        // A duration under a key like `auth_timeout` is no secret.
        Value::String(s)
            if (secret && kennel_proto::Span::parse(s).is_err()) || contains_key(s) =>
        {
            *s = REDACTED.to_owned()
        }
        Value::String(s) => *s = redact_urls(s),
        Value::Array(items) => items.iter_mut().for_each(|v| redact(v, secret)),
        Value::Object(map) => {
            *map = std::mem::take(map)
                .into_iter()
                .map(|(key, mut v)| {
                    redact(&mut v, secret || secret_name(&key));
                    (redact_urls(&key), v)
                })
                .collect();
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Whether a key called `name` holds a secret: its name contains one of [`SECRET_PARTS`] or
/// `PASSWORD`, or a word of it (split at anything but letters and digits) contains `AUTH`
/// other than `AUTHOR` (`NPM_AUTH_TOKEN`, `AUTHORIZATION`, `server.auth`, but not
/// `GIT_AUTHOR_NAME`).
fn secret_name(name: &str) -> bool {
    if VARIABLE_NAMES.contains(&name) {
        return false;
    }
    let upper = name.to_ascii_uppercase();
    SECRET_PARTS.iter().any(|part| upper.contains(part))
        || upper.contains("PASSWORD")
        || upper
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| word.contains("AUTH") && !matches!(word, "AUTHOR" | "AUTHORS"))
}

/// Whether `text` contains something shaped like a credential: a kennel API key or a key with
/// one of [`KEY_PREFIXES`], starting at the beginning or after a character that is not a
/// letter or digit.
fn contains_key(text: &str) -> bool {
    text.char_indices().any(|(i, _)| {
        let at_word_start = text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_ascii_alphanumeric());
        at_word_start && (kennel_key_at(&text[i..]) || provider_key_at(&text[i..]))
    })
}

/// Whether `text` starts with a kennel API key: `kn_<id>_<secret>` (minted ones have a
/// 12-digit hex id and a 48-digit hex secret; this accepts any letters and digits from 4 and
/// 16 characters on, so test and hand-made keys of that shape count too).
fn kennel_key_at(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("kn_") else {
        return false;
    };
    let id = alnum_len(rest);
    id >= 4 && rest[id..].starts_with('_') && alnum_len(&rest[id + 1..]) >= 16
}

/// Whether `text` starts with a provider key: one of [`KEY_PREFIXES`] and enough of
/// letters, digits, `-` and `_` after it.
fn provider_key_at(text: &str) -> bool {
    KEY_PREFIXES.iter().any(|(prefix, min)| {
        text.strip_prefix(prefix).is_some_and(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                .count()
                >= *min
        })
    })
}

/// The length of the run of ASCII letters and digits `text` starts with.
fn alnum_len(text: &str) -> usize {
    text.bytes().take_while(u8::is_ascii_alphanumeric).count()
}

/// `text` with every URL in it (`scheme://…`, up to white space or a quote) stripped of its
/// user-info password and of the values of secret-named query parameters:
/// `https://me:pw@host/x?token=t&a=b` → `https://me:<redacted>@host/x?token=<redacted>&a=b`.
fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>'))
            .unwrap_or(tail.len());
        let (url, after) = tail.split_at(end);
        out.push_str(&redact_url_body(url));
        rest = after;
    }
    out.push_str(rest);
    out
}

/// What follows a URL's `://` (`user:pass@host/path?query#fragment`), redacted as
/// [`redact_urls`] says.
fn redact_url_body(body: &str) -> String {
    let (authority, rest) = body.split_at(body.find(['/', '?', '#']).unwrap_or(body.len()));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{REDACTED}@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let (before_fragment, fragment) = rest.split_at(rest.find('#').unwrap_or(rest.len()));
    let path_and_query = match before_fragment.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, value)) if !value.is_empty() && secret_name(name) => {
                        format!("{name}={REDACTED}")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => before_fragment.to_owned(),
    };
    format!("{authority}{path_and_query}{fragment}")
}

/// `toml` (the printed configuration) with a comment line above each agent profile's table
/// saying where the profile comes from.
fn mark_profiles(toml: &str, origins: &BTreeMap<String, Origin>) -> String {
    let headers: BTreeMap<String, Origin> = origins
        .iter()
        .map(|(name, origin)| (format!("[daemon.agents.{}]", toml_key(name)), *origin))
        .collect();
    let mut out = String::with_capacity(toml.len() + 64 * origins.len());
    for line in toml.lines() {
        if let Some(origin) = headers.get(line.trim()) {
            out.push_str(origin.comment());
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `name` as TOML writes it in a table header: bare when it can be, else a quoted string.
fn toml_key(name: &str) -> String {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        name.to_owned()
    } else {
        toml::Value::String(name.to_owned()).to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kennel_daemon::agent::{AgentKind, AgentProfile};

    /// A configuration with a secret in every place one can be, each containing `secret`.
    fn full_of_secrets() -> Config {
        let mut cfg = Config::default();
        cfg.server.auth.admin_key = Some("secret-admin-key-0123456789".into());
        cfg.server.auth.hash_key = Some("secret-hash-key-0123456789abcdef0123".into());
        cfg.client.api_key = Some("secret-client".into());
        cfg.client.url = Some("https://me:secret-pw@coord.example:7070".into());
        cfg.daemon.api_key = Some("secret-daemon".into());
        cfg.daemon.server = "wss://daemon:secret-pw@coord.example/ws/daemon".into();
        cfg.daemon.hostname = Some("kn_0123456789ab_secretsecretsecretsecret".into());
        cfg.relay.api_key = Some("secret-relay".into());
        cfg.relay.daemon_keys = vec!["secret-dk1".into(), "secret-dk2".into()];
        cfg.relay.admin_keys = vec!["secret-ak".into()];
        cfg.daemon.agents.insert(
            "claude".into(),
            AgentProfile {
                env: BTreeMap::from([
                    ("ANTHROPIC_API_KEY".into(), "secret-anthropic".into()),
                    ("GH_TOKEN".into(), "secret-gh".into()),
                    ("NPM_AUTH".into(), "secret-npm".into()),
                    ("DB_PASSWORD".into(), "secret-db".into()),
                    ("ANTHROPIC_BASE_URL".into(), "http://127.0.0.1:7071".into()),
                    ("GIT_AUTHOR_NAME".into(), "Ann Author".into()),
                    ("PROXY".into(), "http://u:secret-proxy@proxy:3128".into()),
                    ("OPENAI_KEY_ALIAS".into(), "secret-alias".into()),
                ]),
                command: vec![
                    "claude".into(),
                    "--api=sk-ant-secretsecretsecretsecret".into(),
                ],
                ..AgentProfile::default_for(AgentKind::Claude)
            },
        );
        cfg.daemon.repos.insert(
            "https://x-access-token:secret-repo@github.com/me/app.git".into(),
            Default::default(),
        );
        cfg.gateway.upstreams = vec![kennel_gateway::config::UpstreamConfig {
            name: "anthropic".into(),
            kind: kennel_gateway::config::UpstreamKind::Anthropic,
            base_url: "https://api.example/v1?api_key=secret-query&beta=1".into(),
            api_key_env: Some("ANTHROPIC_UPSTREAM_KEY".into()),
            priority: 0,
            weight: 1,
            models: Vec::new(),
            renames: BTreeMap::new(),
            connect_timeout: kennel_proto::Span::from_millis(1),
            first_byte_timeout: kennel_proto::Span::from_millis(1),
            total_timeout: kennel_proto::Span::from_millis(1),
        }];
        cfg
    }

    #[test]
    fn every_secret_is_redacted_in_toml_and_json() {
        let cfg = full_of_secrets();
        let origins = profile_origins(&cfg);
        let shown = redacted(&with_all_profiles(cfg)).unwrap();
        let toml = mark_profiles(&toml::to_string_pretty(&shown).unwrap(), &origins);
        let json = serde_json::to_string(&Shown {
            config: &shown,
            agent_origins: BTreeMap::new(),
        })
        .unwrap();
        for text in [&toml, &json] {
            assert!(!text.contains("secret"), "{text}");
        }
        let claude = &shown.daemon.agents["claude"];
        for key in ["ANTHROPIC_API_KEY", "GH_TOKEN", "NPM_AUTH", "DB_PASSWORD"] {
            assert_eq!(claude.env[key], REDACTED, "{key}");
        }
        assert!(
            toml.contains("ANTHROPIC_API_KEY = \"<redacted>\""),
            "{toml}"
        );
        // What is not a secret stays readable.
        assert_eq!(claude.env["ANTHROPIC_BASE_URL"], "http://127.0.0.1:7071");
        assert_eq!(claude.env["GIT_AUTHOR_NAME"], "Ann Author");
        assert_eq!(claude.env["PROXY"], "http://u:<redacted>@proxy:3128");
        assert_eq!(claude.command, ["claude", REDACTED]);
        assert_eq!(shown.daemon.git.author_name, "kennel");
        assert_eq!(
            shown.daemon.server,
            "wss://daemon:<redacted>@coord.example/ws/daemon"
        );
        assert_eq!(
            shown.client.url.as_deref(),
            Some("https://me:<redacted>@coord.example:7070")
        );
        assert_eq!(shown.daemon.hostname.as_deref(), Some(REDACTED));
        assert_eq!(shown.relay.daemon_keys, [REDACTED, REDACTED]);
        assert!(shown
            .daemon
            .repos
            .contains_key("https://x-access-token:<redacted>@github.com/me/app.git"));
        let upstream = &shown.gateway.upstreams[0];
        assert_eq!(
            upstream.base_url,
            "https://api.example/v1?api_key=<redacted>&beta=1"
        );
        assert_eq!(
            upstream.api_key_env.as_deref(),
            Some("ANTHROPIC_UPSTREAM_KEY"),
            "the name of a variable is not a secret"
        );
        assert_eq!(shown.server.listen, Config::default().server.listen);
    }

    #[test]
    fn secret_names_and_shapes() {
        for name in [
            "api_key",
            "hash_key",
            "daemon_keys",
            "ANTHROPIC_API_KEY",
            "GH_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "PGPASSWORD",
            "SMTP_PASSWD",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "auth",
            "AUTHORIZATION",
            "npm_auth_token",
        ] {
            assert!(secret_name(name), "{name}");
        }
        for name in [
            "api_key_env",
            "GIT_AUTHOR_NAME",
            "author_email",
            "ANTHROPIC_BASE_URL",
            "keep_worktrees",
            "labels",
        ] {
            assert!(!secret_name(name), "{name}");
        }
        assert!(contains_key("kn_0123456789ab_0123456789abcdef0123"));
        assert!(contains_key("--key=kn_0123456789ab_0123456789abcdef0123"));
        assert!(contains_key("sk-ant-api03-abcdefghijklmnopqrstuvwxyz"));
        assert!(!contains_key("/data/kn_backup_folder"));
        assert!(!contains_key("task-sk-12"));
        assert!(!contains_key("risk-assessment-of-the-whole-thing-here"));
        assert_eq!(redact_urls("no url here"), "no url here");
        assert_eq!(
            redact_urls("a https://h/p?x=1&token=t#f and ws://u:p@h"),
            "a https://h/p?x=1&token=<redacted>#f and ws://u:<redacted>@h"
        );
        assert_eq!(redact_urls("ssh://git@h/r"), "ssh://git@h/r");
    }

    #[test]
    fn built_in_profiles_are_listed_and_marked() {
        let mut cfg = Config::default();
        cfg.daemon.agents.insert(
            "claude".into(),
            AgentProfile {
                env: BTreeMap::from([("A".into(), "b".into())]),
                ..AgentProfile::default_for(AgentKind::Claude)
            },
        );
        cfg.daemon.agents.insert(
            "my.tests".into(),
            AgentProfile {
                command: vec!["make".into()],
                ..AgentProfile::default_for(AgentKind::Command)
            },
        );
        let origins = profile_origins(&cfg);
        assert_eq!(
            origins.values().copied().collect::<Vec<_>>(),
            [
                Origin::BuiltIn,
                Origin::ChangedBuiltIn,
                Origin::BuiltIn,
                Origin::Configured
            ],
            "{origins:?}"
        );
        let shown = redacted(&with_all_profiles(cfg)).unwrap();
        let toml = mark_profiles(&toml::to_string_pretty(&shown).unwrap(), &origins);
        for expected in [
            "# built-in\n[daemon.agents.aider]\nkind = \"aider\"",
            "# built-in, changed by configuration\n[daemon.agents.claude]\nkind = \"claude\"",
            "# built-in\n[daemon.agents.codex]\nkind = \"codex\"",
            "# configured\n[daemon.agents.\"my.tests\"]\nkind = \"command\"",
        ] {
            assert!(toml.contains(expected), "{expected:?} in\n{toml}");
        }
        // The printed TOML is a configuration that loads to the same profiles.
        let back: Config = toml::from_str(&toml).unwrap();
        assert_eq!(back.daemon.agents, shown.daemon.agents);
    }
}
