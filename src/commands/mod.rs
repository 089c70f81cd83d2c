//! One module per subcommand. Each exposes an `Args` struct (clap derive) and
//! `run(args) -> anyhow::Result<()>`. Add a variant to [`Command`] and an arm
//! to [`dispatch`] for a new subcommand; keep the logic in the libraries.

pub mod eval;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "mfx", version, about = "Run Mixture-of-Experts models larger than RAM")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Compare against references: logits (.npy), greedy tokens, perplexity.
    Eval(eval::Args),
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Eval(a) => eval::run(a),
    }
}
