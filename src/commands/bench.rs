//! `mfx bench PACK`: prompt-processing and decode speed through the
//! streaming expert cache, measured like llama-bench (pp / tg): a fixed
//! synthetic prompt of `--prompt-tokens` ids processed in chunks of
//! `--prefill-chunk` (as `mfx run` and `mfx serve` do), then
//! `--gen-tokens` greedy decode steps, with the cache's hit rate, bytes read
//! and I/O stall per token. With `--text FILE` the prompt and the decode
//! steps are that text's tokens instead (teacher-forced: each step feeds the
//! text's next token), so hit rates reflect real routing.

use super::args::CacheArgs;
use anyhow::{bail, Context, Result};
use mfx_runtime::cache::{detect_budget, BudgetError, CacheOptions, ExpertCache, RoutedPass};
use mfx_runtime::generate::DEFAULT_PREFILL_CHUNK;
use mfx_runtime::memory;
use mfx_runtime::models::{LoadOptions, Model};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The `.mfx` pack.
    pub pack: PathBuf,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Prompt positions per forward pass (llama-bench's ubatch): each
    /// streamed expert is read at most once per chunk and layer.
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Positions the working reserve covers (default: the prompt and decode
    /// tokens). 4096 reserves what `mfx run` does, as `mfx plan`'s budgets assume.
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Take the prompt and the decode tokens from this text (teacher-forced)
    /// instead of synthetic ids.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Read experts through the page cache (default: O_DIRECT / F_NOCACHE).
    #[arg(long)]
    pub buffered_io: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the experts routed in every forward pass to FILE (JSON lines
    /// `{"phase": "prompt"|"decode", "layer": L, "experts": [..], "tokens": [..]}`,
    /// tokens = how many of the pass's tokens each expert served), for
    /// replaying eviction policies offline (scripts/sim_cache.py).
    #[arg(long, value_name = "FILE")]
    pub trace_routing: Option<PathBuf>,
}

/// A loaded pack's model, its expert cache and the budget it was given.
pub type Loaded = (Box<dyn Model>, Arc<ExpertCache>, Option<u64>);

/// The model over `pack` with its experts behind a budgeted cache (the
/// same loading `mfx run` does), the cache, and the budget in bytes when
/// `--capacity` did not override it. `context` and `chunk`: the positions
/// and prompt chunk the run will use, which the working reserve covers.
pub fn load_cached(
    pack: &Path,
    cache: CacheOptions,
    (context, chunk): (usize, usize),
) -> Result<Loaded> {
    // Resolved here rather than by the cache, so the report can state it.
    let budget = match cache.capacity {
        Some(_) => None,
        None => Some(match cache.ram {
            Some(b) => b,
            None => detect_budget().ok_or(BudgetError::Undetected)?,
        }),
    };
    let opts = LoadOptions {
        cache: CacheOptions {
            ram: budget,
            ..cache
        },
        // The working reserve inside --ram covers exactly this run.
        max_context: Some(context),
        prefill_chunk: Some(chunk),
        ..LoadOptions::default()
    };
    let model = mfx_runtime::load::load(pack, &opts)
        .with_context(|| format!("loading {}", pack.display()))?;
    let cache = model.expert_cache().with_context(|| {
        format!(
            "{}: not a .mfx pack (mfx bench measures the expert cache)",
            pack.display()
        )
    })?;
    Ok((model, cache, budget))
}

/// Token ids of `text` with the pack's own tokenizer.
fn text_tokens(pack: &Path, text: &Path, count: usize) -> Result<Vec<u32>> {
    let s = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    pack_tokens(pack, &s, count).with_context(|| format!("{}", text.display()))
}

/// The first `count` tokens of `text` by the pack's embedded tokenizer.
pub fn pack_tokens(pack: &Path, text: &str, count: usize) -> Result<Vec<u32>> {
    let p = mfx_formats::pack::Pack::open(pack)
        .with_context(|| format!("{}: not a valid .mfx pack", pack.display()))?;
    let tok = p
        .manifest()
        .tokenizer_json
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| anyhow::anyhow!("{}: embedded tokenizer.json: {e}", pack.display()))?;
    let enc = tok
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    let ids = enc.get_ids();
    if ids.len() < count {
        bail!(
            "{} tokens, {count} needed (--prompt-tokens + --gen-tokens, or the plan's probes)",
            ids.len()
        );
    }
    Ok(ids[..count].to_vec())
}

fn write_routing(path: &Path, prompt: &[RoutedPass], decode: &[RoutedPass]) -> Result<()> {
    use std::io::Write;
    let mut out = String::new();
    for (phase, passes) in [("prompt", prompt), ("decode", decode)] {
        for (layer, experts, tokens) in passes {
            let line = serde_json::json!({"phase": phase, "layer": layer, "experts": experts, "tokens": tokens});
            out.push_str(&line.to_string());
            out.push('\n');
        }
    }
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("--trace-routing {}: cannot create", path.display()))?;
    f.write_all(out.as_bytes())
        .with_context(|| format!("--trace-routing {}: write failed", path.display()))?;
    Ok(())
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

pub fn run(a: Args) -> Result<()> {
    if a.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    let cc = CacheOptions {
        direct_io: !a.buffered_io,
        ..a.cache.options()
    };
    let t_load = Instant::now();
    let (mut model, cache, budget) = load_cached(
        &a.pack,
        cc,
        (
            a.max_context
                .unwrap_or(0)
                .max(a.prompt_tokens + a.gen_tokens),
            a.prefill_chunk.max(1),
        ),
    )?;
    // Load time includes checking the dense tensors' (and pinned experts') checksums.
    let load_s = t_load.elapsed().as_secs_f64();
    let vocab = model.info().vocab_size as u64;
    let text = match &a.text {
        Some(t) => Some(text_tokens(&a.pack, t, a.prompt_tokens + a.gen_tokens)?),
        None => None,
    };
    // Deterministic ids away from the low special-token range (as llama-bench
    // uses random tokens: the content does not matter for speed, routing does a little).
    let prompt: Vec<u32> = match &text {
        Some(t) => t[..a.prompt_tokens].to_vec(),
        None => (0..a.prompt_tokens as u64)
            .map(|i| (16 + (i * 7919 + 13) % vocab.saturating_sub(16).max(1)) as u32)
            .collect(),
    };
    if a.trace_routing.is_some() {
        cache.record_routing();
    }
    let t0 = Instant::now();
    let mut logits = Vec::new();
    for chunk in prompt.chunks(a.prefill_chunk.max(1)) {
        logits = model.forward(chunk, false)?;
    }
    let pp_s = t0.elapsed().as_secs_f64();
    let after_pp = cache.stats();
    let prompt_routing = cache.take_routing();
    let mut tok = argmax(&logits);
    let t1 = Instant::now();
    for i in 0..a.gen_tokens {
        if let Some(t) = &text {
            tok = t[a.prompt_tokens + i];
        }
        let l = model.forward(&[tok], false)?;
        tok = argmax(&l);
    }
    let tg_s = t1.elapsed().as_secs_f64();
    let s = cache.stats();
    if let Some(path) = &a.trace_routing {
        write_routing(path, &prompt_routing, &cache.take_routing())?;
    }
    let dec = s.since(&after_pp);
    let gen = a.gen_tokens.max(1) as f64;
    let decode_hits = (s.hits - after_pp.hits) as f64;
    let decode_total = decode_hits + (s.misses - after_pp.misses) as f64;
    let out = serde_json::json!({
        "pack": a.pack.display().to_string(),
        "budget_bytes": budget,
        "capacity": a.cache.capacity,
        "policy": a.cache.policy.name(),
        "direct_io": cache.direct_io(),
        "verify_checksums": !a.cache.no_verify_checksums,
        "load_s": load_s,
        "threads": rayon::current_num_threads(),
        "io_threads": a.cache.io_threads,
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "prompt_tok_s": a.prompt_tokens as f64 / pp_s,
        "decode_tok_s": if a.gen_tokens == 0 { 0.0 } else { a.gen_tokens as f64 / tg_s },
        "ttft_ms": pp_s * 1e3,
        "peak_rss_bytes": memory::peak_rss_bytes(),
        "hit_rate": s.hit_rate,
        "decode_hit_rate": if decode_total > 0.0 { decode_hits / decode_total } else { 1.0 },
        "bytes_read": s.bytes_read,
        "decode_bytes_read_per_token": (s.bytes_read - after_pp.bytes_read) as f64 / gen,
        "stall_ms_per_token": (s.stall_ms - after_pp.stall_ms) / gen,
        "prefetch_precision": s.prefetch_precision,
        "prefetch_recall": s.prefetch_recall,
        "decode_prefetch_precision": dec.prefetch_precision,
        "decode_prefetch_recall": dec.prefetch_recall,
        "skipped": s.skipped,
        "text": a.text.as_ref().map(|t| t.display().to_string()),
        "capacities": cache.capacities(),
        "resident_expert_bytes": cache.resident_bytes(),
        "cache": s,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "pp{:<5} {:>9.1} tok/s   ttft {:.0} ms",
            a.prompt_tokens,
            a.prompt_tokens as f64 / pp_s,
            pp_s * 1e3
        );
        println!(
            "tg{:<5} {:>9.1} tok/s   hit rate {:.1}% (decode {:.1}%)   read {:.1} MiB   stall {:.2} ms/token   peak RSS {}",
            a.gen_tokens,
            out["decode_tok_s"].as_f64().unwrap_or(0.0),
            s.hit_rate * 100.0,
            out["decode_hit_rate"].as_f64().unwrap_or(0.0) * 100.0,
            s.bytes_read as f64 / (1 << 20) as f64,
            out["stall_ms_per_token"].as_f64().unwrap_or(0.0),
            memory::format_mib(memory::peak_rss_bytes()),
        );
        if s.predicted > 0 {
            println!(
                "prefetch precision {:.1}% recall {:.1}% (decode {:.1}% / {:.1}%)",
                s.prefetch_precision * 100.0,
                s.prefetch_recall * 100.0,
                dec.prefetch_precision * 100.0,
                dec.prefetch_recall * 100.0
            );
        }
    }
    Ok(())
}
