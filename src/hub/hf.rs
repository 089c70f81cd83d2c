//! The only place mfx runs the Hugging Face `hf` command (from
//! huggingface_hub 0.34 or later). Argument lists are built by pure
//! functions so tests can pin the exact invocations; the flags are the real
//! CLI's (`hf upload REPO_ID LOCAL_PATH PATH_IN_REPO --repo-type --revision
//! --private --commit-message`, `hf download REPO_ID FILE --repo-type
//! --revision`, `hf auth whoami`). Options always come first, then `--`,
//! then the positionals, so no repo id, file name or revision can become an
//! option.
//!
//! Tokens: mfx never reads, passes or prints one. `hf` finds the login
//! itself (`hf auth login` or `HF_TOKEN`). Everything `hf` writes to stderr
//! is forwarded with anything that looks like a token masked, so a verbose or
//! future `hf` cannot leak one through our logs or error messages.

use super::repo::RepoId;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What to tell a user without a working `hf`.
pub const INSTALL_HELP: &str = "install the Hugging Face CLI (huggingface_hub >= 0.34, which provides `hf`): \
     `pip install -U \"huggingface_hub>=0.34\"` (or `uv tool install huggingface_hub`, or `brew install huggingface-cli`), \
     make sure `hf` is on PATH, then log in with `hf auth login` (or set HF_TOKEN)";

/// Why an `hf` call failed, as far as its output tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No `hf` executable on PATH.
    NotInstalled,
    NotLoggedIn,
    /// Gated repo without granted access.
    AccessDenied,
    /// Repo does not exist, or is private and we are not allowed to see it.
    RepoNotFound,
    RevisionNotFound,
    /// The repo exists but has no such file.
    FileNotFound,
    Other,
}

/// A failed `hf` call: what it was, why, and the tail of its stderr (redacted).
#[derive(Debug)]
pub struct HfFailure {
    pub kind: FailureKind,
    pub command: String,
    pub detail: String,
}

impl std::fmt::Display for HfFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match self.kind {
            FailureKind::NotInstalled => format!("`hf` was not found on PATH: {INSTALL_HELP}"),
            FailureKind::NotLoggedIn => {
                "not logged in to the Hugging Face hub: run `hf auth login` (or set HF_TOKEN to a token with write access for pushing)"
                    .to_owned()
            }
            FailureKind::AccessDenied => {
                "access denied: the repo is gated; request access on its hub page, then `hf auth login`".to_owned()
            }
            FailureKind::RepoNotFound => {
                "repository not found (if it is private, log in with `hf auth login` using an account that can see it)"
                    .to_owned()
            }
            FailureKind::RevisionNotFound => "revision not found in the repository".to_owned(),
            FailureKind::FileNotFound => "file not found in the repository".to_owned(),
            FailureKind::Other => "it failed".to_owned(),
        };
        write!(f, "`{}`: {why}", self.command)?;
        if !self.detail.trim().is_empty() {
            write!(
                f,
                "\n  hf said: {}",
                self.detail.trim().replace('\n', "\n    ")
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for HfFailure {}

/// Argument list of `hf upload` for a whole staged folder, one commit.
///
/// Options come first, each with its value joined by `=` (so a value that
/// starts with `-`, such as a commit message, cannot be read as a flag),
/// then `--`, then the positional arguments: nothing taken from a user or a
/// manifest can ever be parsed as an option by `hf` (argparse and click
/// both end option parsing at `--`).
pub fn upload_args(
    repo: &RepoId,
    dir: &Path,
    revision: &str,
    private: bool,
    message: &str,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "upload".into(),
        "--repo-type=model".into(),
        format!("--revision={revision}").into(),
    ];
    if private {
        a.push("--private".into());
    }
    a.push(format!("--commit-message={message}").into());
    a.push("--".into());
    a.extend([repo.to_string().into(), dir.into(), ".".into()]);
    a
}

/// Argument list of `hf download` for one file into the hub cache; options,
/// then `--`, then the positionals, as in [`upload_args`].
pub fn download_args(repo: &RepoId, file: &str, revision: &str) -> Vec<OsString> {
    [
        "download",
        "--repo-type=model",
        &format!("--revision={revision}"),
        "--",
        &repo.to_string(),
        file,
    ]
    .map(OsString::from)
    .to_vec()
}

/// A shell-like rendering of an invocation, for messages and `--dry-run`.
pub fn command_line(args: &[OsString]) -> String {
    let mut s = String::from("hf");
    for a in args {
        let a = a.to_string_lossy();
        let plain = !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,".contains(c));
        s.push(' ');
        if plain {
            s.push_str(&a);
        } else {
            s.push('\'');
            s.push_str(&a.replace('\'', "'\\''"));
            s.push('\'');
        }
    }
    s
}

/// Runs the `hf` found on PATH.
pub struct Hf {
    program: OsString,
}

impl Default for Hf {
    fn default() -> Self {
        Hf {
            program: "hf".into(),
        }
    }
}

impl Hf {
    /// `hf auth whoami`: succeeds (returning the user name) only when logged in.
    pub fn whoami(&self) -> Result<String, HfFailure> {
        let args: Vec<OsString> = ["auth", "whoami"].map(OsString::from).to_vec();
        let out = self.run(&args, false).map_err(|mut f| {
            if f.kind == FailureKind::Other {
                f.kind = FailureKind::NotLoggedIn;
            }
            f
        })?;
        // 0.34 prints the name; 2.x may print `user: NAME` or `user=NAME`.
        let first = out
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("");
        let name = first
            .trim_start_matches("user:")
            .trim_start_matches("user=")
            .trim();
        Ok(redact(name))
    }

    pub fn upload_folder(
        &self,
        repo: &RepoId,
        dir: &Path,
        revision: &str,
        private: bool,
        message: &str,
    ) -> Result<(), HfFailure> {
        self.run(&upload_args(repo, dir, revision, private, message), true)
            .map(|_| ())
    }

    /// Downloads `file` into the hub cache and returns its path there.
    pub fn download(
        &self,
        repo: &RepoId,
        file: &str,
        revision: &str,
    ) -> Result<CachedFile, HfFailure> {
        let args = download_args(repo, file, revision);
        let stdout = self.run(&args, true)?;
        locate_download(repo, file, revision, &stdout).map_err(|detail| HfFailure {
            kind: FailureKind::Other,
            command: command_line(&args),
            detail,
        })
    }

    /// Runs `hf ARGS`, forwarding its stderr (redacted) when `echo`, and
    /// returns its stdout.
    fn run(&self, args: &[OsString], echo: bool) -> Result<String, HfFailure> {
        let command = command_line(args);
        let fail = |kind, detail: String| HfFailure {
            kind,
            command: command.clone(),
            detail,
        };
        let mut child = match Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(FailureKind::NotInstalled, String::new()))
            }
            Err(e) => {
                return Err(fail(
                    FailureKind::Other,
                    format!("could not start `hf`: {e}"),
                ))
            }
        };
        let mut err_pipe = child.stderr.take();
        let err_thread = std::thread::spawn(move || {
            let mut tail = String::new();
            if let Some(pipe) = err_pipe.as_mut() {
                forward_redacted(pipe, echo, &mut tail);
            }
            tail
        });
        let mut stdout = Vec::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_end(&mut stdout);
        }
        let status = child
            .wait()
            .map_err(|e| fail(FailureKind::Other, format!("waiting for `hf`: {e}")))?;
        let tail = err_thread.join().unwrap_or_default();
        let stdout = redact(&String::from_utf8_lossy(&stdout));
        if !status.success() {
            let detail = if tail.trim().is_empty() {
                stdout.clone()
            } else {
                tail
            };
            return Err(fail(classify(&detail), last_lines(&detail, 6)));
        }
        Ok(stdout)
    }
}

/// Copies `r` to our stderr segment by segment (a segment ends at `\n` or
/// `\r`, so progress bars still move), masking tokens, keeping the last 8 KiB.
fn forward_redacted(r: &mut impl Read, echo: bool, tail: &mut String) {
    let mut buf = [0u8; 8192];
    let mut pending: Vec<u8> = Vec::new();
    let emit = |seg: &[u8], tail: &mut String| {
        let s = redact(&String::from_utf8_lossy(seg));
        if echo {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(s.as_bytes());
            let _ = e.flush();
        }
        tail.push_str(&s);
        if tail.len() > 16384 {
            let cut = tail.len() - 8192;
            let cut = (cut..tail.len())
                .find(|&i| tail.is_char_boundary(i))
                .unwrap_or(tail.len());
            tail.drain(..cut);
        }
    };
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|&b| b == b'\n' || b == b'\r') {
            let seg: Vec<u8> = pending.drain(..=i).collect();
            emit(&seg, tail);
        }
        // A line longer than 64 KiB is not a progress bar; do not hold it forever.
        if pending.len() > 65536 {
            let seg = std::mem::take(&mut pending);
            emit(&seg, tail);
        }
    }
    if !pending.is_empty() {
        emit(&pending, tail);
    }
}

/// Masks hub tokens (`hf_` + at least 20 letters/digits) and the value of
/// `HF_TOKEN`/`HUGGING_FACE_HUB_TOKEN` wherever they appear.
pub fn redact(s: &str) -> String {
    let mut out = s.to_owned();
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Ok(v) = std::env::var(var) {
            if v.len() >= 8 {
                out = out.replace(&v, "***");
            }
        }
    }
    let b = out.as_bytes();
    let mut res = String::with_capacity(out.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"hf_") && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) {
            let n = b[i + 3..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric())
                .count();
            if n >= 20 {
                res.push_str("hf_***");
                i += 3 + n;
                continue;
            }
        }
        // Copy one UTF-8 character.
        let ch_len = out[i..].chars().next().map_or(1, char::len_utf8);
        res.push_str(&out[i..i + ch_len]);
        i += ch_len;
    }
    res
}

/// Reads the failure kind from `hf`'s messages (0.34 prints exception
/// names, 2.x friendly sentences; both are matched).
fn classify(text: &str) -> FailureKind {
    let t = text.to_ascii_lowercase();
    let has = |pats: &[&str]| pats.iter().any(|p| t.contains(p));
    if has(&[
        "gatedrepoerror",
        "access denied",
        "awaiting a review",
        "is restricted",
    ]) {
        FailureKind::AccessDenied
    } else if has(&[
        "not logged in",
        "localtokennotfounderror",
        "token is required",
        "invalid user token",
    ]) {
        FailureKind::NotLoggedIn
    } else if has(&[
        "revisionnotfounderror",
        "revision not found",
        "invalid rev id",
    ]) {
        FailureKind::RevisionNotFound
    } else if has(&["entrynotfounderror", "entry not found", "file not found in"]) {
        FailureKind::FileNotFound
    } else if has(&[
        "repositorynotfounderror",
        "repository not found",
        "repo not found",
    ]) || (t.contains("repo") && t.contains("not found"))
    {
        FailureKind::RepoNotFound
    } else if has(&["401", "unauthorized"]) {
        FailureKind::NotLoggedIn
    } else {
        FailureKind::Other
    }
}

/// The last `n` non-empty lines, without colour codes (`hf` colours its
/// errors even into a pipe) and without the overwritten progress-bar states.
fn last_lines(s: &str, n: usize) -> String {
    let s = strip_ansi(s);
    let lines: Vec<&str> = s
        .lines()
        .map(|l| l.rsplit('\r').next().unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            it.next();
            // CSI: parameters and intermediates up to a final byte in '@'..='~'.
            for d in it.by_ref() {
                if ('@'..='~').contains(&d) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The hub cache `hf` uses: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`
/// (huggingface_hub's `constants.py`).
pub fn hub_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|x| x.join("huggingface").join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// A file `hf download` put in the cache, and the commit it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedFile {
    pub path: PathBuf,
    /// 40 hex digits, when the cache layout tells it.
    pub commit: Option<String>,
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where the downloaded file is: by the cache layout
/// (`models--ORG--NAME/snapshots/<commit>/FILE`, `<commit>` read from
/// `refs/<revision>` unless the revision is a commit hash), else by the path
/// `hf` printed (0.34 prints the bare path; 2.x `path=...`, `path: ...` or JSON).
fn locate_download(
    repo: &RepoId,
    file: &str,
    revision: &str,
    stdout: &str,
) -> Result<CachedFile, String> {
    if let Some(cache) = hub_cache_dir() {
        let root = cache.join(repo.cache_folder());
        let commit = if is_commit_hash(revision) {
            Some(revision.to_ascii_lowercase())
        } else {
            std::fs::read_to_string(root.join("refs").join(revision))
                .ok()
                .map(|s| s.trim().to_owned())
        };
        if let Some(c) = commit.filter(|c| is_commit_hash(c)) {
            let p = root.join("snapshots").join(&c).join(file);
            if p.is_file() {
                return Ok(CachedFile {
                    path: p,
                    commit: Some(c),
                });
            }
        }
    }
    for line in stdout
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        let cand = if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            v.get("path").and_then(|p| p.as_str()).map(str::to_owned)
        } else {
            Some(
                line.trim_start_matches("path=")
                    .trim_start_matches("path:")
                    .trim()
                    .to_owned(),
            )
        };
        if let Some(c) = cand {
            let p = PathBuf::from(&c);
            let p = if p.is_dir() { p.join(file) } else { p };
            if p.is_file() && p.file_name() == Path::new(file).file_name() {
                let commit = p
                    .parent()
                    .and_then(|d| d.file_name())
                    .and_then(OsStr::to_str)
                    .filter(|c| is_commit_hash(c))
                    .map(str::to_owned);
                return Ok(CachedFile { path: p, commit });
            }
        }
    }
    Err(format!(
        "`hf download` succeeded but {file} was found neither in the hub cache ({}) nor at a path it printed",
        hub_cache_dir().map_or("unknown".to_owned(), |p| p.display().to_string())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_real_cli_invocations() {
        let r = RepoId::parse("org/name").unwrap();
        let up = upload_args(
            &r,
            Path::new("/tmp/stage"),
            "main",
            true,
            "mfx push: 2 packs",
        );
        assert_eq!(
            command_line(&up),
            "hf upload --repo-type=model --revision=main --private '--commit-message=mfx push: 2 packs' -- org/name /tmp/stage ."
        );
        let down = download_args(&r, "manifest.json", "main");
        assert_eq!(
            command_line(&down),
            "hf download --repo-type=model --revision=main -- org/name manifest.json"
        );
        // Hostile values stay values: after `--`, or joined to their option.
        let evil = download_args(&r, "--local-dir=injected", "--help");
        assert_eq!(
            evil.iter().map(|a| a.to_str().unwrap()).collect::<Vec<_>>(),
            [
                "download",
                "--repo-type=model",
                "--revision=--help",
                "--",
                "org/name",
                "--local-dir=injected"
            ]
        );
        let up = upload_args(&r, Path::new("/tmp/s"), "main", false, "-m --delete=*");
        assert_eq!(up[3], "--commit-message=-m --delete=*");
        assert_eq!(up[4], "--");
    }

    #[test]
    fn masks_tokens() {
        let tok = "hf_abcdefghijklmnopqrstuvwxyz0123";
        let s = format!("Authorization: Bearer {tok}\nnot a token: hf_short, shelf_abcdefghijklmnopqrstuvwxyz ü");
        let r = redact(&s);
        assert!(!r.contains(tok), "{r}");
        assert!(r.contains("Bearer hf_***"), "{r}");
        assert!(
            r.contains("hf_short") && r.contains("shelf_abcdefghijklmnopqrstuvwxyz ü"),
            "{r}"
        );
    }

    #[test]
    fn classifies_both_cli_generations() {
        assert_eq!(
            classify("huggingface_hub.errors.EntryNotFoundError: 404 Client Error."),
            FailureKind::FileNotFound
        );
        assert_eq!(
            classify("Error: File not found in repository 'a/b'."),
            FailureKind::FileNotFound
        );
        assert_eq!(
            classify("Error: Repository 'a/b' not found.\nIf the repo is private"),
            FailureKind::RepoNotFound
        );
        assert_eq!(
            classify("RepositoryNotFoundError: 401 Client Error."),
            FailureKind::RepoNotFound
        );
        assert_eq!(
            classify("Not logged in. Run 'hf auth login' first."),
            FailureKind::NotLoggedIn
        );
        assert_eq!(
            classify("Error: Revision not found in repository 'a/b'."),
            FailureKind::RevisionNotFound
        );
        assert_eq!(
            classify("Access denied. Repository 'a/b' requires approval."),
            FailureKind::AccessDenied
        );
        assert_eq!(classify("ConnectionError: boom"), FailureKind::Other);
        let colored = "\u{1b}[1m\u{1b}[31mError: Not logged in.\u{1b}[0m\n\n";
        assert_eq!(last_lines(colored, 3), "Error: Not logged in.");
    }
}
