//! `mfx run`: one prompt in, streamed text out.
//!
//! Text goes to stdout as it is generated (flushed per delta, so pipes and
//! terminals see it live); the timing summary goes to stderr so that
//! `mfx run ... > out.txt` captures only the model's words.

use super::args::CacheArgs;
use anyhow::{Context, Result};
use mfx_runtime::cache::StatsSnapshot;
use mfx_runtime::chat::{message, RenderOptions};
use mfx_runtime::generate::{Completion, Event, GenerateOptions, Generator};
use mfx_runtime::memory;
use mfx_runtime::models::{KvBits, LoadOptions};
use mfx_runtime::sampling::SamplingParams;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (Hugging Face or MLX layout), `.mfx` pack, or hub repo `ORG/NAME[@REV]`.
    pub model: PathBuf,
    /// The prompt text.
    #[arg(short, long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message to put before the prompt (implies --chat).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub gen: GenArgs,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// How to load the model (shared with `mfx chat`).
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// KV cache precision in bits: 16 (f16) or 8 (int8 per vector).
    #[arg(long, default_value = "16")]
    pub kv_bits: KvBits,
    /// Cap on the context length (default: the model's).
    #[arg(long)]
    pub max_context: Option<usize>,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Print the expert cache's statistics (hit rate, bytes read, I/O stall
    /// per token, prefetch precision/recall) on stderr after generating.
    #[arg(long)]
    pub stats: bool,
}

/// `cache: hit rate 91.2% (1200 hits, 116 misses), read 12.5 MiB in 116 loads, ...`
pub fn cache_summary(s: &StatsSnapshot, tokens: usize) -> String {
    let per = |x: f64| x / tokens.max(1) as f64;
    let mut out = format!(
        "cache: hit rate {:.1}% ({} hits, {} misses) | read {:.1} MiB in {} loads ({:.1} KiB/token) | I/O stall {:.1} ms ({:.3} ms/token) | evictions {}",
        s.hit_rate * 100.0,
        s.hits,
        s.misses,
        s.bytes_read as f64 / (1u64 << 20) as f64,
        s.loads,
        per(s.bytes_read as f64) / 1024.0,
        s.stall_ms,
        per(s.stall_ms),
        s.evictions,
    );
    if s.predicted > 0 {
        out.push_str(&format!(
            " | prefetch precision {:.1}% recall {:.1}% ({} predicted, {} reads started)",
            s.prefetch_precision * 100.0,
            s.prefetch_recall * 100.0,
            s.predicted,
            s.hint_loads
        ));
    }
    if s.skipped > 0 {
        out.push_str(&format!(" | skipped {} expert uses", s.skipped));
    }
    out
}

/// Sampling and stopping (shared with `mfx chat`). Unset sampling flags take
/// the model's generation_config.json defaults.
#[derive(clap::Args, Debug, Clone)]
pub struct GenArgs {
    /// Most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Temperature; 0 is greedy.
    #[arg(long)]
    pub temp: Option<f32>,
    /// Nucleus sampling threshold (1 disables).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep the K most likely tokens (0 disables).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Drop tokens below this fraction of the top token's probability.
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Repetition penalty (1 disables).
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// RNG seed, for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub draft: super::args::DraftArgs,
}

impl LoadArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            kv_bits: self.kv_bits,
            max_context: self.max_context,
            prefill_chunk: None,
            cache: self.cache.options(),
        }
    }
}

impl GenArgs {
    /// Flags over the model's defaults.
    pub fn sampling(&self, defaults: SamplingParams) -> SamplingParams {
        let mut p = defaults;
        if let Some(t) = self.temp {
            p.temperature = t;
        }
        if let Some(v) = self.top_p {
            p.top_p = v;
        }
        if let Some(v) = self.top_k {
            p.top_k = v;
        }
        if let Some(v) = self.min_p {
            p.min_p = v;
        }
        if let Some(v) = self.repeat_penalty {
            p.repetition_penalty = v;
        }
        p.seed = self.seed;
        p
    }

    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            skip_special_tokens: false,
            logprobs: None,
        }
    }
}

/// Loads the model with a readable error. `model` is a local checkpoint
/// directory or pack, or a hub repo id `ORG/NAME[@REV]` whose pack for this
/// machine's memory is pulled first (see `mfx pull`).
/// The pack is chosen for `--ram` when given, exactly as `mfx pull --ram`
/// chooses, so `mfx run ORG/NAME --ram X` runs what `mfx pull ORG/NAME --ram X`
/// downloads.
pub fn load(model: &std::path::Path, args: &LoadArgs) -> Result<Generator> {
    let path = crate::hub::resolve_model_arg(&model.to_string_lossy(), args.cache.ram_bytes())?;
    Generator::load(&path, &args.options()).with_context(|| format!("loading {}", path.display()))
}

/// Generates and streams to `out`; a write error (closed pipe) cancels
/// generation and is returned.
pub fn stream(
    gen: &mut Generator,
    prompt_ids: &[u32],
    params: &SamplingParams,
    opts: &GenerateOptions,
    out: &mut dyn Write,
) -> Result<Completion> {
    let mut io_err: Option<std::io::Error> = None;
    let completion = gen.generate(prompt_ids, params, opts, &mut |e| {
        let text = match &e {
            Event::Token { text, .. } | Event::Text { text } => text,
            Event::PromptProcessed { .. } => return ControlFlow::Continue(()),
        };
        if text.is_empty() {
            return ControlFlow::Continue(());
        }
        match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(err) => {
                io_err = Some(err);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = io_err {
        return Err(e.into());
    }
    Ok(completion)
}

/// `prompt: 23 tok, 812.3 tok/s | decode: 64 tok, 45.1 tok/s | peak RSS 210.4 MiB`
pub fn summary(c: &Completion) -> String {
    let reused = if c.reused_prompt_tokens > 0 {
        format!(" ({} reused)", c.reused_prompt_tokens)
    } else {
        String::new()
    };
    let d = &c.timings.draft;
    let draft = if d.passes > 0 {
        format!(
            " | draft: {}/{} accepted ({:.0}%) in {} passes{}",
            d.accepted,
            d.drafted,
            100.0 * d.acceptance(),
            d.passes,
            if d.skipped > 0 {
                format!(", {} drafts skipped (not expected to pay)", d.skipped)
            } else {
                String::new()
            }
        )
    } else {
        String::new()
    };
    format!(
        "prompt: {} tok{reused}, {:.1} tok/s | decode: {} tok, {:.1} tok/s{draft} | peak RSS {}",
        c.prompt_tokens,
        c.prompt_tokens_per_s(),
        c.completion_tokens,
        c.decode_tokens_per_s(),
        memory::format_mib(memory::peak_rss_bytes()),
    )
}

pub fn run(args: Args) -> Result<()> {
    let mut gen = load(&args.model, &args.load)?;
    gen.set_speculation(args.gen.draft.options());
    let before = gen.cache_stats();
    let ids = if args.chat || args.system.is_some() {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(message("system", s));
        }
        msgs.push(message("user", &args.prompt));
        gen.encode_chat(
            &msgs,
            &RenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )?
    } else {
        gen.encode_prompt(&args.prompt)?
    };
    let params = args.gen.sampling(gen.default_sampling());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let c = stream(&mut gen, &ids, &params, &args.gen.options(), &mut out)?;
    if !c.text.ends_with('\n') {
        writeln!(out)?;
    }
    out.flush()?;
    eprintln!("{}", summary(&c));
    if args.load.stats {
        // Which kernel tier ran: MFX_KERNELS naming a tier this CPU lacks
        // falls back to scalar, so CI checks this line, not the variable.
        eprintln!("kernels: {}", mfx_runtime::kernels::backend().name());
        match (gen.cache_stats(), before) {
            (Some(after), Some(before)) => eprintln!(
                "{}",
                cache_summary(&after.since(&before), c.prompt_tokens + c.completion_tokens)
            ),
            _ => eprintln!("cache: none (a checkpoint directory keeps its experts mapped; --stats reports on .mfx packs)"),
        }
    }
    Ok(())
}
