//! `mfx pull` and `mfx run ORG/NAME`: read a repo's manifest, pick the pack
//! that fits, download it into the Hugging Face cache and check it.
//!
//! The manifest is fetched at the requested revision (a branch, usually
//! `main`); the pack is then fetched at the *commit* that manifest came
//! from, so a push landing between the two downloads cannot pair a manifest
//! with a pack it does not describe.

use super::digest::digest_file;
use super::hf::{FailureKind, Hf, HfFailure};
use super::manifest::{HubManifest, PackRecord, MANIFEST_FILE};
use super::memory::total_ram_bytes;
use super::repo::{check_revision, RepoId};
use super::select::{choose, listing, Budget};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct PullOptions {
    pub repo: RepoId,
    pub revision: String,
    /// `--ram` in bytes; `None` = detect this machine's memory.
    pub ram: Option<u64>,
}

/// The pack on disk, checked against the manifest.
#[derive(Debug)]
pub struct Pulled {
    /// Inside the hub cache (`.../snapshots/<commit>/<file>`).
    pub path: PathBuf,
    pub record: PackRecord,
    /// The commit both files came from, when known.
    pub commit: Option<String>,
}

pub fn pull(o: &PullOptions) -> Result<Pulled> {
    check_revision(&o.revision)?;
    let hf = Hf::default();
    let repo = o.repo.to_string();
    let man = hf.download(&o.repo, MANIFEST_FILE, &o.revision).map_err(|f| match f.kind {
        FailureKind::FileNotFound => anyhow::Error::new(f).context(format!(
            "{repo} has no mfx manifest ({MANIFEST_FILE}) at revision {}: it is not a repo published with `mfx push` \
             (an mfx repo holds .mfx packs and a manifest.json listing them)",
            o.revision
        )),
        _ => anyhow::Error::new(f).context(format!("reading the mfx manifest of {repo}")),
    })?;
    let bytes =
        std::fs::read(&man.path).with_context(|| format!("reading {}", man.path.display()))?;
    let manifest = HubManifest::parse(&bytes, &format!("{repo} {MANIFEST_FILE}"))?;

    let budget = match o.ram {
        Some(b) => Budget::Given(b),
        None => Budget::Detected(
            total_ram_bytes().context("detecting this machine's memory (pass --ram to skip)")?,
        ),
    };
    let record = choose(&manifest.packs, budget, &repo)?.clone();
    eprintln!("{repo}: packs published:\n{}", listing(&manifest.packs));
    eprintln!(
        "{repo}: using {} (prepared for {} RAM)",
        record.file, record.ram_label
    );

    let at = man.commit.clone().unwrap_or_else(|| o.revision.clone());
    let got = hf
        .download(&o.repo, &record.file, &at)
        .map_err(|f: HfFailure| {
            anyhow::Error::new(f).context(format!("downloading {} from {repo}", record.file))
        })?;
    verify_download(&got.path, &record)?;
    Ok(Pulled {
        path: got.path,
        record,
        commit: man.commit,
    })
}

/// Size, sha256 and xxh3 of the downloaded file against the manifest. On a
/// mismatch nothing is deleted (the file is in the user's cache; `hf` owns
/// it): the error says which file, what was expected and what was found.
pub fn verify_download(path: &Path, r: &PackRecord) -> Result<()> {
    eprintln!("verifying sha256 of {} ...", r.file);
    let d = digest_file(path)?;
    if d.sha256 != r.sha256 || d.size != r.size_bytes || d.xxh3 != r.xxh3 {
        bail!(
            "checksum mismatch for {} ({}): expected sha256 {} ({} bytes), found sha256 {} ({} bytes). \
             The download is corrupt or the repo changed under its manifest; refusing to use it. \
             Re-download with `hf download <repo> {} --force-download`, or delete that file from the cache.",
            r.file,
            path.display(),
            r.sha256,
            r.size_bytes,
            d.sha256,
            d.size,
            r.file
        );
    }
    Ok(())
}

/// What `mfx run/serve/chat MODEL` should open: `arg` itself when it exists
/// on disk (a pack or a checkpoint folder), else, when it is a hub repo id
/// `ORG/NAME` (optionally `ORG/NAME@REVISION`), the pack pulled from there
/// for `ram` bytes (`None` = this machine's memory), chosen exactly as
/// `mfx pull --ram` chooses. Anything else is an error that says both
/// readings failed.
pub fn resolve_model_arg(arg: &str, ram: Option<u64>) -> Result<PathBuf> {
    let local = Path::new(arg);
    if local.exists() {
        return Ok(local.to_path_buf());
    }
    let (id, revision) = match arg.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, rev),
        _ => (arg, "main"),
    };
    let repo = RepoId::parse(id).map_err(|e| {
        anyhow::anyhow!("{arg}: no such file or directory, and not a hub repo id either ({e})")
    })?;
    let pulled = pull(&PullOptions {
        repo,
        revision: revision.to_owned(),
        ram,
    })?;
    Ok(pulled.path)
}
