//! `mfx push PACK... --repo ORG/NAME`: publish packs for others to pull.
//! The work is in `crate::hub::push`; this is the command line.

use crate::hub::{push, PushOptions, RepoId};
use anyhow::Result;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// `.mfx` packs written by `mfx prep` (e.g. model-16G.mfx model-32G.mfx).
    #[arg(required = true)]
    pub packs: Vec<PathBuf>,
    /// Hub model repo to publish to, created if missing.
    #[arg(long, value_name = "ORG/NAME")]
    pub repo: String,
    /// Branch to commit to.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Create the repo as private (ignored if it exists).
    #[arg(long)]
    pub private: bool,
    /// Model card to upload as README.md [default: README.md beside the first pack].
    #[arg(long)]
    pub card: Option<PathBuf>,
    /// Commit message [default: "mfx push: N pack(s) for ... RAM"].
    #[arg(long)]
    pub commit_message: Option<String>,
    /// Hash the packs and print manifest.json to stdout; upload nothing (no `hf` needed).
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(a: Args) -> Result<()> {
    let opts = PushOptions {
        packs: a.packs,
        repo: RepoId::parse(&a.repo)?,
        revision: a.revision,
        private: a.private,
        card: a.card,
        commit_message: a.commit_message,
        dry_run: a.dry_run,
    };
    let pushed = push(&opts)?;
    if opts.dry_run {
        eprintln!("dry run, not run: {}", pushed.command);
        let mut so = std::io::stdout().lock();
        so.write_all(pushed.manifest.to_json()?.as_bytes())?;
    }
    Ok(())
}
