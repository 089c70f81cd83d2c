//! One module per subcommand. Each exposes an `Args` struct (clap derive) and
//! `run(args) -> anyhow::Result<()>`. Add a variant to [`Command`] and an arm
//! to [`dispatch`] for a new subcommand; keep the logic in the libraries.

pub mod args;
pub mod bench;
pub mod chat;
pub mod eval;
pub mod inspect;
pub mod plan;
pub mod prep;
pub mod pull;
pub mod push;
pub mod run;
pub mod serve;
pub mod verify;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "mfx",
    version,
    about = "Run Mixture-of-Experts models larger than RAM"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Compute threads (default: all cores). Like llama.cpp's `-t`, the
    /// thread that drives generation is one of them.
    #[arg(long, short = 't', global = true)]
    pub threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Compare against references: logits (.npy), greedy tokens, perplexity.
    Eval(eval::Args),
    /// Generate text from a prompt, streamed to stdout (summary on stderr).
    Run(run::Args),
    /// Serve the model over OpenAI- and Anthropic-compatible HTTP APIs.
    Serve(serve::Args),
    /// Interactive chat with the model's chat template (/reset, /stats, /exit).
    Chat(chat::Args),
    /// Publish packs, their model card and manifest.json to a Hugging Face hub repo.
    Push(push::Args),
    /// Download the published pack that fits this machine's memory and verify it.
    Pull(pull::Args),
    /// Turn a checkpoint into a pack tuned for a memory budget (profile, pin, quantize, write).
    Prep(prep::Args),
    /// Describe a pack: header, sizes, tensor and expert tables, precision mix, pinning.
    Inspect(inspect::Args),
    /// Check every checksum of a pack; exits 1 naming the first bad tensor or expert.
    Verify(verify::Args),
    /// Measure prompt and decode speed through the streaming expert cache (llama-bench style).
    Bench(bench::Args),
    /// Predict hit rate and tok/s for several RAM budgets from the pack's routing profile.
    Plan(plan::Args),
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(t) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build_global()
            .context("setting the thread count")?;
    }
    // Commands run on a compute worker (see `kernels::on_workers`), except
    // the server: its generation thread moves onto the pool per request, and
    // its HTTP side must not hold a compute worker for its whole life.
    if matches!(cli.command, Command::Serve(_)) {
        run_command(cli.command)
    } else {
        mfx_runtime::kernels::on_workers(|| run_command(cli.command))
    }
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Eval(a) => eval::run(a),
        Command::Run(a) => run::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Push(a) => push::run(a),
        Command::Pull(a) => pull::run(a),
        Command::Prep(a) => prep::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Plan(a) => plan::run(a),
    }
}
