//! `mfx pull ORG/NAME [--ram SIZE]`: download the published pack that fits
//! this machine into the Hugging Face cache and print its path (stdout), so
//! `mfx run "$(mfx pull ORG/NAME)"` works. The work is in `crate::hub::pull`.

use crate::hub::{pull, PullOptions, RepoId};
use anyhow::Result;
use std::io::Write;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hub model repo published with `mfx push`.
    #[arg(value_name = "ORG/NAME")]
    pub repo: String,
    /// Memory to fit (e.g. 32G) [default: this machine's total memory].
    #[arg(long, value_name = "SIZE", value_parser = super::args::size)]
    pub ram: Option<u64>,
    /// Branch, tag or commit to read.
    #[arg(long, default_value = "main")]
    pub revision: String,
}

pub fn run(a: Args) -> Result<()> {
    let pulled = pull(&PullOptions {
        repo: RepoId::parse(&a.repo)?,
        revision: a.revision,
        ram: a.ram,
    })?;
    match &pulled.commit {
        Some(c) => eprintln!("{}: sha256 ok (commit {c})", pulled.record.file),
        None => eprintln!("{}: sha256 ok", pulled.record.file),
    }
    let mut so = std::io::stdout().lock();
    writeln!(so, "{}", pulled.path.display())?;
    Ok(())
}
