//! One module per subcommand. Each exposes an `Args` struct (clap derive) and
//! `run(args) -> anyhow::Result<()>`. Add a variant to [`Command`] and an arm
//! to [`dispatch`] for a new subcommand; keep the logic in the libraries.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "mfx", version, about = "Run Mixture-of-Experts models larger than RAM")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {}
}
