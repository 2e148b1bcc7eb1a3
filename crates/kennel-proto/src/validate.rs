//! Validation of identifiers before they reach a path, a SQL row or a `git` argument.
//!
//! Every id that crosses a trust boundary (task ids, daemon ids, machine ids, branch names)
//! is checked here, so the rules live in one place and the daemon and server agree on them.

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: {reason}")]
pub struct InvalidId {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Longest id accepted for tasks, daemons and machines.
pub const MAX_ID_LEN: usize = 128;

/// Checks an id made of ASCII letters, digits, `-`, `_` and `.`, 1..=128 long, not starting
/// with `-` or `.` (so it can never be read as a flag or a relative path component).
pub fn validate_id(what: &'static str, value: &str) -> Result<(), InvalidId> {
    let fail = |reason| {
        Err(InvalidId {
            what,
            value: value.chars().take(80).collect(),
            reason,
        })
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.len() > MAX_ID_LEN {
        return fail("is longer than 128 characters");
    }
    if value.starts_with('-') || value.starts_with('.') {
        return fail("must not start with `-` or `.`");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return fail("may only contain ASCII letters, digits, `-`, `_` and `.`");
    }
    if value.contains("..") {
        return fail("must not contain `..`");
    }
    Ok(())
}

/// Checks a task's base branch: empty (the remote's default branch) or a valid branch name.
pub fn validate_base_branch(value: &str) -> Result<(), InvalidId> {
    if value.is_empty() {
        return Ok(());
    }
    validate_branch_name(value)
}

/// Checks a branch name against the rules of `git check-ref-format --branch`, a little
/// stricter: no whitespace, no leading `-`, at most 200 bytes.
pub fn validate_branch_name(value: &str) -> Result<(), InvalidId> {
    let fail = |reason| {
        Err(InvalidId {
            what: "branch name",
            value: value.chars().take(80).collect(),
            reason,
        })
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.len() > 200 {
        return fail("is longer than 200 bytes");
    }
    if value == "@" {
        return fail("must not be `@`");
    }
    if value.starts_with('-') || value.starts_with('/') || value.starts_with('.') {
        return fail("must not start with `-`, `/` or `.`");
    }
    if value.ends_with('/') || value.ends_with('.') || value.ends_with(".lock") {
        return fail("must not end with `/`, `.` or `.lock`");
    }
    if value.contains("..") || value.contains("//") || value.contains("@{") || value.contains("/.")
    {
        return fail("must not contain `..`, `//`, `/.` or `@{`");
    }
    if value
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
    {
        return fail("must not contain whitespace, control characters or any of ~ ^ : ? * [ \\");
    }
    Ok(())
}

/// A configuration value kennel cannot work with, the one shape every section's check returns:
/// the full dotted key (`server.scheduler.accept_timeout`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["t-0192", "abc", "A_b.c-1", "0"] {
            assert!(validate_id("task id", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-rf",
            ".hidden",
            "a/b",
            "a b",
            "a..b",
            "ü",
            "x\0",
            &"a".repeat(129),
        ] {
            assert!(validate_id("task id", bad).is_err(), "{bad:?}");
        }
        let err = validate_id("task id", "../etc").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid task id `../etc`: must not start with `-` or `.`"
        );
    }

    #[test]
    fn branches() {
        for ok in ["kennel/t-1", "feature/x_y", "main", "a.b/c"] {
            assert!(validate_branch_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "-x", "/x", "x/", "x.lock", "a..b", "a//b", "a@{1}", "a b", "a:b", "a~1", "a^",
            "a?", "a*", "a[", "a\\b", "@", "x/.y",
        ] {
            assert!(validate_branch_name(bad).is_err(), "{bad:?}");
        }
    }
}
