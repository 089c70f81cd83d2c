//! Hub repository ids (`ORG/NAME`), validated the way `huggingface_hub`
//! validates them, so a typo fails here with a clear message instead of as
//! an HTTP error from inside `hf`, and so a local path is never mistaken for
//! a repo (or the other way round) by `mfx run`.

use anyhow::{bail, Result};
use std::fmt;

/// `ORG/NAME` of a model repository on the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    pub org: String,
    pub name: String,
}

impl RepoId {
    /// Parses `ORG/NAME`; the rules are those of `huggingface_hub`'s
    /// `validate_repo_id` (word characters, `-` and `.`, at most 96 per part,
    /// no `--` or `..`, no leading or trailing `-`/`.`).
    pub fn parse(s: &str) -> Result<RepoId> {
        let explain = "expected a hub model id ORG/NAME (letters, digits, '-', '_', '.'), e.g. mfx-community/Qwen3-30B-A3B";
        let Some((org, name)) = s.split_once('/') else {
            bail!("{s:?} is not a hub repo id: {explain}");
        };
        for part in [org, name] {
            let ok_chars = part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            let edges_ok = !part.starts_with(['-', '.']) && !part.ends_with(['-', '.']);
            if part.is_empty()
                || part.len() > 96
                || !ok_chars
                || !edges_ok
                || part.contains("--")
                || part.contains("..")
            {
                bail!("{s:?} is not a hub repo id: {explain}");
            }
        }
        Ok(RepoId {
            org: org.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The folder name `huggingface_hub` gives this repo in its cache.
    pub fn cache_folder(&self) -> String {
        format!("models--{}--{}", self.org, self.name)
    }
}

/// Checks a branch, tag or commit name before it is passed to `hf` and
/// joined under the hub cache (`refs/<revision>`): git ref rules, enough to
/// keep it a single value that stays inside the cache (`refs/pr/1` is fine).
pub fn check_revision(rev: &str) -> Result<()> {
    let why = if rev.is_empty() {
        Some("it is empty")
    } else if rev.len() > 255 {
        Some("it is longer than 255 bytes")
    } else if rev.starts_with(['-', '/', '.']) || rev.ends_with(['/', '.']) {
        Some("it starts with `-`, `/` or `.`, or ends with `/` or `.`")
    } else if rev.chars().any(|c| c.is_control() || c == '\\' || c == ' ') {
        Some("it contains a control character, a space or `\\`")
    } else if rev.contains("..") || rev.contains("//") {
        Some("it contains `..` or `//`")
    } else {
        None
    };
    match why {
        Some(w) => bail!("revision {rev:?} is not a branch, tag or commit name: {w}"),
        None => Ok(()),
    }
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.org, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hub_ids_and_rejects_paths() {
        let r = RepoId::parse("mfx-community/Qwen3-30B-A3B.v2").unwrap();
        assert_eq!(r.to_string(), "mfx-community/Qwen3-30B-A3B.v2");
        assert_eq!(r.cache_folder(), "models--mfx-community--Qwen3-30B-A3B.v2");
        for bad in [
            "model.mfx",
            "./a/b",
            "/abs/path",
            "a/b/c",
            "a//b",
            "org/",
            "/name",
            "a--b/c",
            "a/b..c",
            "a/-b",
            "a/b c",
        ] {
            assert!(RepoId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn revisions_cannot_be_options_or_leave_the_cache() {
        for ok in ["main", "v1.0", "refs/pr/1", &"a".repeat(40)] {
            check_revision(ok).unwrap();
        }
        for bad in [
            "",
            "--local-dir=x",
            "-x",
            "../../etc",
            "a/../b",
            "/abs",
            "a\nb",
            "a\0b",
            "a b",
            "a\\b",
        ] {
            assert!(check_revision(bad).is_err(), "{bad:?}");
        }
    }
}
