//! `mfx chat`: an interactive conversation in the terminal.
//!
//! Plain line reading (no line editor), so it works the same on a terminal
//! and on a pipe (`printf 'hi\n/stats\n' | mfx chat MODEL`). The assistant's
//! words go to stdout; prompts, stats and notices go to stderr, so stdout of
//! a piped session is exactly the conversation's replies.
//!
//! Each turn re-renders the whole history with the model's chat template;
//! the generator notices that the KV state already holds the previous turns
//! and only prefills the new part.

use super::run::{self, GenArgs, LoadArgs};
use anyhow::{bail, Result};
use mfx_runtime::chat::{message, RenderOptions};
use mfx_runtime::generate::Completion;
use mfx_runtime::memory;
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (Hugging Face or MLX layout), `.mfx` pack, or hub repo `ORG/NAME[@REV]`.
    pub model: PathBuf,
    /// System message for the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub gen: GenArgs,
    #[command(flatten)]
    pub load: LoadArgs,
}

const HELP: &str =
    "commands: /reset (forget the conversation), /stats (speed and memory), /exit (or Ctrl-D)";

pub fn run(args: Args) -> Result<()> {
    let mut gen = run::load(&args.model, &args.load)?;
    // One conversation, each turn extending the last: reuse all of it (the
    // reply's state as decoded), rather than only whole prefill chunks,
    // which would re-prefill the history of a short chat every turn.
    gen.set_exact_prefix_reuse(false);
    gen.set_speculation(args.gen.draft.options());
    if gen.chat_template().is_none() {
        bail!(
            "{} has no chat template (a base model?); use `mfx run` for plain completion",
            args.model.display()
        );
    }
    let params = args.gen.sampling(gen.default_sampling());
    let opts = args.gen.options();
    let render = RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let fresh_history = || {
        args.system
            .as_deref()
            .map(|s| vec![message("system", s)])
            .unwrap_or_default()
    };
    let mut history = fresh_history();
    let mut last: Option<Completion> = None;
    let mut turns = 0usize;

    eprintln!("mfx chat: {} ({HELP})", args.model.display());
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let Some(line) = lines.next() else {
            eprintln!();
            break;
        };
        let line = line?;
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            "/reset" => {
                history = fresh_history();
                gen.reset();
                last = None;
                eprintln!("(conversation cleared)");
                continue;
            }
            "/stats" => {
                eprintln!("{}", stats(&gen, last.as_ref(), turns));
                continue;
            }
            cmd if cmd.starts_with('/') => {
                eprintln!("unknown command {cmd}; {HELP}");
                continue;
            }
            _ => {}
        }
        history.push(message("user", &line));
        let ids = gen.encode_chat(&history, &render)?;
        let mut out = stdout.lock();
        let before = gen.cache_stats();
        let c = run::stream(&mut gen, &ids, &params, &opts, &mut out)?;
        writeln!(out)?;
        out.flush()?;
        if args.load.stats {
            if let (Some(after), Some(before)) = (gen.cache_stats(), before) {
                let tokens = c.prompt_tokens - c.reused_prompt_tokens.min(c.prompt_tokens)
                    + c.completion_tokens;
                eprintln!("{}", run::cache_summary(&after.since(&before), tokens));
            }
        }
        history.push(message("assistant", &c.text));
        turns += 1;
        last = Some(c);
    }
    Ok(())
}

fn stats(
    gen: &mfx_runtime::generate::Generator,
    last: Option<&Completion>,
    turns: usize,
) -> String {
    let info = gen.model_info();
    let mut s = String::new();
    match last {
        Some(c) => s.push_str(&format!("last turn: {}\n", run::summary(c))),
        None => s.push_str("last turn: none yet\n"),
    }
    s.push_str(&format!(
        "turns: {turns} | context: {} / {} tokens | RSS {} now, {} peak",
        gen.cached_tokens(),
        info.max_context,
        memory::format_mib(memory::current_rss_bytes()),
        memory::format_mib(memory::peak_rss_bytes()),
    ));
    if let Some(cs) = gen.cache_stats() {
        s.push_str(&format!(
            "\n{} (since load)",
            run::cache_summary(&cs, gen.cached_tokens())
        ));
    }
    s
}
