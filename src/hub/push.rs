//! `mfx push`: publish packs, their model card and `manifest.json` to a hub
//! repo in one commit.
//!
//! The files are staged as symlinks in a temporary folder and uploaded with
//! one `hf upload REPO DIR .`, so packs and the manifest that describes them
//! land in the same commit (a reader never sees a manifest pointing at packs
//! of another push). Nothing is copied: packs can be tens of GB.

use super::digest::digest_file;
use super::hf::{command_line, upload_args, Hf};
use super::manifest::{describe_pack, HubManifest, PackRecord, MANIFEST_FILE};
use super::repo::{check_revision, RepoId};
use anyhow::{bail, Context, Result};
use mfx_formats::pack::Pack;
use std::path::{Path, PathBuf};

pub struct PushOptions {
    pub packs: Vec<PathBuf>,
    pub repo: RepoId,
    pub revision: String,
    pub private: bool,
    /// The model card; default: README.md beside the first pack (prep writes it).
    pub card: Option<PathBuf>,
    pub commit_message: Option<String>,
    /// Build and print the manifest and the `hf` command, upload nothing.
    pub dry_run: bool,
}

/// What a push published (or would publish, with `dry_run`).
pub struct Pushed {
    pub manifest: HubManifest,
    /// The `hf upload` command line (run, or that would have run).
    pub command: String,
}

/// Marker of the section push appends to the card; see [`hub_card`].
const PACKS_MARKER: &str = "<!-- mfx-push-packs -->";

pub fn push(o: &PushOptions) -> Result<Pushed> {
    if o.packs.is_empty() {
        bail!("no packs given: mfx push PACK... --repo ORG/NAME");
    }
    for p in &o.packs {
        if !p.is_file() {
            bail!("{}: no such pack file", p.display());
        }
    }
    check_revision(&o.revision)?;
    let card = card_path(o)?;
    let hf = Hf::default();
    if !o.dry_run {
        // Fail before hashing gigabytes if `hf` is missing or not logged in.
        let user = hf.whoami()?;
        eprintln!("hf: logged in as {user}");
    }

    let mut records: Vec<PackRecord> = Vec::new();
    for p in &o.packs {
        verify_pack(p)?;
        eprintln!("hashing {} ...", p.display());
        let d = digest_file(p)?;
        let r = describe_pack(p, &d)?;
        if let Some(prev) = records.iter().find(|x| x.file == r.file) {
            bail!(
                "two packs are named {} (file names must be unique in the repo): {}",
                prev.file,
                p.display()
            );
        }
        eprintln!(
            "  {}: {} budget, {} bytes, {:.3} bits/weight, sha256 {}",
            r.file, r.ram_label, r.size_bytes, r.bits_per_weight, r.sha256
        );
        records.push(r);
    }
    let manifest = HubManifest::new(records)?;
    let manifest_json = manifest.to_json()?;
    let card_text = std::fs::read_to_string(&card)
        .with_context(|| format!("reading the model card {}", card.display()))?;
    let card_text = hub_card(&card_text, &o.repo, &manifest);

    let stage = tempfile::Builder::new()
        .prefix("mfx-push-")
        .tempdir()
        .context("creating a staging folder")?;
    for p in &o.packs {
        let abs = std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))?;
        let name = abs.file_name().context("pack path has no file name")?;
        link(&abs, &stage.path().join(name))?;
    }
    std::fs::write(stage.path().join("README.md"), &card_text).context("staging README.md")?;
    std::fs::write(stage.path().join(MANIFEST_FILE), &manifest_json)
        .context("staging manifest.json")?;

    let message = o.commit_message.clone().unwrap_or_else(|| {
        let labels: Vec<&str> = manifest
            .packs
            .iter()
            .map(|p| p.ram_label.as_str())
            .collect();
        format!(
            "mfx push: {} pack(s) for {} RAM",
            manifest.packs.len(),
            labels.join(", ")
        )
    });
    let args = upload_args(&o.repo, stage.path(), &o.revision, o.private, &message);
    let command = command_line(&args);
    if o.dry_run {
        eprintln!(
            "dry run: staged README.md, {MANIFEST_FILE} and {} pack(s); uploading nothing",
            manifest.packs.len()
        );
        return Ok(Pushed { manifest, command });
    }
    eprintln!("uploading: {command}");
    hf.upload_folder(&o.repo, stage.path(), &o.revision, o.private, &message)?;
    eprintln!(
        "published {} pack(s) to https://huggingface.co/{} (revision {})",
        manifest.packs.len(),
        o.repo,
        o.revision
    );
    Ok(Pushed { manifest, command })
}

/// What `mfx verify` checks (header, manifest and every blob's checksum),
/// before anything is hashed or uploaded: the hub's sha256 only proves a
/// download equals what was pushed, so a pack that is damaged before the
/// push must never get that far.
fn verify_pack(p: &Path) -> Result<()> {
    eprintln!("verifying {} ...", p.display());
    let pack = Pack::open(p).with_context(|| format!("{}: not a valid .mfx pack", p.display()))?;
    pack.verify().with_context(|| {
        format!(
            "{} fails `mfx verify`; refusing to publish it (re-run `mfx prep` to rebuild it)",
            p.display()
        )
    })?;
    Ok(())
}

/// `--card`, else README.md beside the first pack. Prep writes one card per
/// pack into the same folder (the last one wins), so with packs from several
/// folders the first pack's is used; push appends the table of all packs.
fn card_path(o: &PushOptions) -> Result<PathBuf> {
    if let Some(c) = &o.card {
        if !c.is_file() {
            bail!("--card {}: no such file", c.display());
        }
        return Ok(c.clone());
    }
    let first = &o.packs[0];
    let dir = first
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let readme = dir.join("README.md");
    if readme.is_file() {
        return Ok(readme);
    }
    bail!(
        "no model card: {} does not exist (`mfx prep` writes it beside the pack); pass --card FILE",
        readme.display()
    )
}

/// The card as uploaded: the prep card with a section listing every pack in
/// the repo and how to get the right one. An earlier section of ours (a card
/// downloaded from the hub and pushed again) is replaced, not repeated.
pub fn hub_card(card: &str, repo: &RepoId, m: &HubManifest) -> String {
    let base = match card.find(PACKS_MARKER) {
        Some(i) => card[..i].trim_end(),
        None => card.trim_end(),
    };
    let mut s = format!("{base}\n\n{PACKS_MARKER}\n## Packs in this repo\n\n");
    s.push_str("`mfx pull` (and `mfx run` given the repo id) downloads the pack prepared for the largest budget that fits your machine's memory, and checks its sha256:\n\n");
    s.push_str(&format!("```\nmfx pull {repo}            # pick by this machine's RAM\nmfx pull {repo} --ram 32G  # or say how much to use\nmfx run {repo} -p \"def fib(n):\"\n```\n\n"));
    s.push_str(
        "| RAM budget | file | size | bits/weight | quality |\n| --- | --- | --- | --- | --- |\n",
    );
    for p in &m.packs {
        s.push_str(&format!(
            "| {} | `{}` | {:.2} GiB | {:.2} | {} |\n",
            p.ram_label,
            p.file,
            p.size_bytes as f64 / (1u64 << 30) as f64,
            p.bits_per_weight,
            quality_cell(p.quality.as_ref())
        ));
    }
    s.push_str(&format!(
        "\nChecksums and budgets are in [`{MANIFEST_FILE}`]({MANIFEST_FILE}).\n"
    ));
    s
}

/// `python 1.234 (+0.012)` per domain from a quality object (docs/PUBLISHING.md).
fn quality_cell(q: Option<&serde_json::Value>) -> String {
    let Some(domains) = q.and_then(|q| q.get("domains")).and_then(|d| d.as_object()) else {
        return "not measured".to_owned();
    };
    let cells: Vec<String> = domains
        .iter()
        .filter_map(|(name, v)| {
            let nll = v.get("nll")?.as_f64()?;
            Some(match v.get("delta_nll").and_then(|d| d.as_f64()) {
                Some(d) => format!("{name} NLL {nll:.3} ({d:+.3})"),
                None => format!("{name} NLL {nll:.3}"),
            })
        })
        .collect();
    if cells.is_empty() {
        "not measured".to_owned()
    } else {
        cells.join(", ")
    }
}

#[cfg(unix)]
fn link(src: &Path, dst: &Path) -> Result<()> {
    std::os::unix::fs::symlink(src, dst).with_context(|| format!("staging {}", src.display()))
}

#[cfg(not(unix))]
fn link(src: &Path, dst: &Path) -> Result<()> {
    std::fs::hard_link(src, dst)
        .or_else(|_| std::fs::copy(src, dst).map(|_| ()))
        .with_context(|| format!("staging {}", src.display()))
}
