//! `mfx eval`: numbers to hold mfx against outside references.
//!
//! * `logits` writes the float32 `[len, vocab]` logits of one forward pass
//!   as `.npy` (compare with transformers' output).
//! * `greedy` prints N greedy token ids (compare with transformers/mlx-lm).
//! * `ppl` scores a text file with the protocol of `shared/README.md`:
//!   split on `\n<|endoftext|>\n`, drop empty pieces, encode each piece
//!   (special tokens parsed, nothing added), append token 0 after each,
//!   concatenate, take `rows * ctx` tokens as `rows` independent rows and
//!   average the next-token NLL over all `rows * (ctx - 1)` predictions.
//! * `kld` scores the same rows through MODEL and a reference `--base`
//!   (a checkpoint or a pack) and reports the KL divergence of MODEL's
//!   next-token distributions from the reference's (mean, median, p99, max),
//!   top-1 agreement and both NLLs, as llama.cpp's `perplexity
//!   --kl-divergence` does; MODEL's cache flags (`--skip-missing`, `--ram`)
//!   apply to MODEL only, so a lossy run mode is measured against the plain
//!   reference.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use mfx_runtime::models::{KvBits, LoadOptions, Model, MoeModel, RouterObserver};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Subcommand, Debug)]
pub enum What {
    /// Write the logits of one forward pass over --ids as float32 [len, vocab] .npy.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids.
        #[arg(long, value_parser = parse_ids)]
        ids: Ids,
        /// Output .npy file.
        #[arg(short = 'o', long)]
        out: PathBuf,
    },
    /// Print N greedy continuation token ids, space-separated.
    Greedy {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated prompt token ids.
        #[arg(long, value_parser = parse_ids)]
        ids: Ids,
        /// Number of tokens to generate (end-of-sequence tokens do not stop it).
        #[arg(short = 'n', long, default_value_t = 16)]
        n: usize,
    },
    /// Mean next-token NLL and perplexity of a text file.
    Ppl {
        #[command(flatten)]
        model: ModelArgs,
        /// Text file; documents separated by `\n<|endoftext|>\n`.
        #[arg(long)]
        data: PathBuf,
        /// Number of rows scored.
        #[arg(long, default_value_t = 64)]
        rows: usize,
        /// Tokens per row.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Print JSON instead of `nll=... ppl=...`.
        #[arg(long)]
        json: bool,
        /// Also report `loss` = nll + router_aux_loss_coef * load-balancing
        /// loss (transformers' MoE training loss, all rows as one batch).
        /// shared/README's `val_nll` was computed this way.
        #[arg(long)]
        router_aux_loss: bool,
        /// Feed each row in pieces of this many tokens through the KV cache
        /// (1: as decoding does, which is how --skip-missing and the expert
        /// cache behave during generation). Default: the whole row at once.
        #[arg(long)]
        chunk: Option<usize>,
        /// Print the expert cache's statistics on stderr (packs only).
        #[arg(long)]
        stats: bool,
    },
    /// KL divergence of MODEL's next-token distributions from --base's
    /// over the rows of a text file (the `ppl` protocol), with top-1
    /// agreement and both NLLs.
    Kld {
        #[command(flatten)]
        model: ModelArgs,
        /// Reference: checkpoint directory or .mfx pack, loaded as it is
        /// (a pack with a budget of available memory, no --skip-missing).
        #[arg(long)]
        base: PathBuf,
        /// Text file; documents separated by `\n<|endoftext|>\n`.
        #[arg(long)]
        data: PathBuf,
        /// Number of rows scored.
        #[arg(long, default_value_t = 64)]
        rows: usize,
        /// Tokens per row.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Feed MODEL each row in pieces of this many tokens (1: as decoding
        /// does, which is how --skip-missing behaves during generation).
        /// The reference always takes whole rows.
        #[arg(long)]
        chunk: Option<usize>,
        /// Print JSON instead of one line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Checkpoint directory (Hugging Face or MLX) or .mfx pack.
    pub model: PathBuf,
    /// KV cache precision: 16 (f16) or 8 (int8).
    #[arg(long, default_value = "16")]
    pub kv_bits: KvBits,
    #[command(flatten)]
    pub cache: super::args::CacheArgs,
}

/// Token ids from the command line (a newtype so clap treats the list as one value).
#[derive(Debug, Clone)]
pub struct Ids(pub Vec<u32>);

fn parse_ids(s: &str) -> Result<Ids, String> {
    let ids = s
        .split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| format!("bad token id {t:?} (expected e.g. 1,2,3)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err("no token ids".into());
    }
    Ok(Ids(ids))
}

fn load(m: &ModelArgs, max_context: Option<usize>) -> Result<Box<dyn Model>> {
    let opts = LoadOptions {
        kv_bits: m.kv_bits,
        max_context,
        // logits/greedy run their ids in one forward pass.
        prefill_chunk: max_context,
        cache: m.cache.options(),
    };
    mfx_runtime::load::load(&m.model, &opts)
        .with_context(|| format!("loading {}", m.model.display()))
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Kld {
            model,
            base,
            data,
            rows,
            ctx,
            chunk,
            json,
        } => kld(&model, &base, &data, rows, ctx, chunk, json),
        What::Logits { model, ids, out } => {
            let mut m = load(&model, None)?;
            let logits = m.forward(&ids.0, true)?;
            let vocab = m.info().vocab_size;
            write_npy_f32(&out, &[ids.0.len(), vocab], &logits)
        }
        What::Greedy { model, ids, n } => {
            let mut m = load(&model, None)?;
            let toks = greedy(m.as_mut(), &ids.0, n)?;
            let line: Vec<String> = toks.iter().map(|t| t.to_string()).collect();
            let mut so = std::io::stdout().lock();
            writeln!(so, "{}", line.join(" "))?;
            Ok(())
        }
        What::Ppl {
            model,
            data,
            rows,
            ctx,
            json,
            router_aux_loss,
            chunk,
            stats,
        } => {
            if chunk == Some(0) {
                bail!("--chunk must be at least 1");
            }
            if ctx < 2 || rows == 0 {
                bail!("--ctx must be at least 2 and --rows at least 1");
            }
            let tokens = protocol_tokens(&model.model, &data, rows * ctx)?;
            let opts = LoadOptions {
                kv_bits: model.kv_bits,
                max_context: Some(ctx),
                // Rows are scored in --chunk positions (whole rows by default).
                prefill_chunk: Some(chunk.unwrap_or(ctx)),
                cache: model.cache.options(),
            };
            // The router observer (for --router-aux-loss) is the shared
            // decoder's; every family scores plain NLL through `Model`.
            let mut dec: Option<MoeModel> = None;
            let mut other: Option<Box<dyn Model>> = None;
            if router_aux_loss {
                dec = Some(MoeModel::load(&model.model, &opts).with_context(|| {
                    format!(
                        "loading {} (--router-aux-loss needs a shared-decoder family: qwen3_moe, qwen2_moe, mixtral or olmoe)",
                        model.model.display()
                    )
                })?);
            } else {
                other = Some(
                    mfx_runtime::load::load(&model.model, &opts)
                        .with_context(|| format!("loading {}", model.model.display()))?,
                );
            }
            let coef = dec
                .as_ref()
                .map_or(0.0, |d| d.transformer().cfg.router_aux_loss_coef as f64);
            let t0 = std::time::Instant::now();
            let mut aux = AuxLoss::default();
            let (nll, cache_stats) = {
                let mut scorer = match (dec.as_mut(), other.as_mut()) {
                    (Some(d), _) => Scorer::Observed(d, &mut aux),
                    (None, Some(o)) => Scorer::Plain(o.as_mut()),
                    (None, None) => unreachable!("one of the two was loaded above"),
                };
                let before = scorer.model().expert_cache().map(|c| c.stats());
                let nll = mean_nll(&mut scorer, &tokens, rows, ctx, chunk.unwrap_or(ctx))?;
                let cache_stats = scorer
                    .model()
                    .expert_cache()
                    .zip(before)
                    .map(|(c, b)| c.stats().since(&b));
                (nll, cache_stats)
            };
            let secs = t0.elapsed().as_secs_f64();
            eprintln!(
                "scored {} tokens in {secs:.1}s ({:.0} tok/s)",
                rows * ctx,
                (rows * ctx) as f64 / secs
            );
            if stats {
                match &cache_stats {
                    Some(s) => eprintln!("{}", super::run::cache_summary(s, rows * ctx)),
                    None => eprintln!("cache: none (--stats reports on .mfx packs)"),
                }
            }
            let mut so = std::io::stdout().lock();
            let aux_v = router_aux_loss.then(|| aux.value());
            if json {
                let mut v = serde_json::json!({
                    "nll": nll, "ppl": nll.exp(), "rows": rows, "ctx": ctx,
                    "predictions": rows * (ctx - 1), "data": data.display().to_string(),
                });
                if let Some(s) = &cache_stats {
                    v["cache"] = serde_json::to_value(s)?;
                }
                if let Some(a) = aux_v {
                    v["router_aux_loss"] = a.into();
                    v["router_aux_loss_coef"] = coef.into();
                    v["loss"] = (nll + coef * a).into();
                }
                writeln!(so, "{v}")?;
            } else {
                write!(so, "nll={nll:.6} ppl={:.4}", nll.exp())?;
                if let Some(a) = aux_v {
                    write!(so, " router_aux_loss={a:.6} loss={:.6}", nll + coef * a)?;
                }
                writeln!(so)?;
            }
            Ok(())
        }
    }
}

/// `mfx eval kld`: both models over the same rows, one row at a time.
fn kld(
    model: &ModelArgs,
    base: &Path,
    data: &Path,
    rows: usize,
    ctx: usize,
    chunk: Option<usize>,
    json: bool,
) -> Result<()> {
    if chunk == Some(0) {
        bail!("--chunk must be at least 1");
    }
    if ctx < 2 || rows == 0 {
        bail!("--ctx must be at least 2 and --rows at least 1");
    }
    let tokens = protocol_tokens(&model.model, data, rows * ctx)?;
    let load_with = |path: &Path, cache: mfx_runtime::cache::CacheOptions, chunk: usize| {
        let opts = LoadOptions {
            kv_bits: model.kv_bits,
            max_context: Some(ctx),
            prefill_chunk: Some(chunk),
            cache,
        };
        mfx_runtime::load::load(path, &opts).with_context(|| format!("loading {}", path.display()))
    };
    let mut m = load_with(&model.model, model.cache.options(), chunk.unwrap_or(ctx))?;
    let mut b = load_with(base, Default::default(), ctx)?;
    let (vm, vb) = (m.info().vocab_size, b.info().vocab_size);
    if vm != vb {
        bail!(
            "{} has a vocabulary of {vm} tokens and --base {} one of {vb}: they cannot be compared",
            model.model.display(),
            base.display()
        );
    }
    let t0 = std::time::Instant::now();
    let mut stats = mfx_prep::kld::KldStats::default();
    for row in tokens.chunks_exact(ctx).take(rows) {
        b.reset();
        let lb = b.forward(row, true)?;
        m.reset();
        let mut lm = Vec::with_capacity(row.len() * vm);
        for piece in row.chunks(chunk.unwrap_or(ctx)) {
            lm.extend(m.forward(piece, true)?);
        }
        stats.add_row(&lb, &lm, vm, row);
    }
    eprintln!(
        "compared {} positions in {:.1}s",
        stats.positions(),
        t0.elapsed().as_secs_f64()
    );
    let s = stats.summary();
    let mut so = std::io::stdout().lock();
    if json {
        let mut v = serde_json::to_value(&s)?;
        v["rows"] = rows.into();
        v["ctx"] = ctx.into();
        v["data"] = data.display().to_string().into();
        v["base"] = base.display().to_string().into();
        writeln!(so, "{v}")?;
    } else {
        writeln!(
            so,
            "kld_mean={:.6} (+-{:.6}) kld_median={:.6} kld_p99={:.6} kld_max={:.6} top1={:.4} nll_base={:.6} nll_model={:.6} ({:+.2}%)",
            s.mean,
            s.stderr,
            s.median,
            s.p99,
            s.max,
            s.top1_agreement,
            s.nll_base,
            s.nll_model,
            (s.nll_model - s.nll_base) / s.nll_base * 100.0
        )?;
    }
    Ok(())
}

/// transformers' `load_balancing_loss_func` without attention mask, over
/// every (layer, token) routing decision seen: `E * sum_{k,e} f[k][e] * P[e]`
/// where `f[k][e]` is the fraction of decisions whose k-th choice is `e` and
/// `P[e]` the mean router probability of `e`.
#[derive(Default)]
struct AuxLoss {
    /// `[k][e]` counts of k-th choices.
    choice: Vec<Vec<f64>>,
    /// `[e]` summed probabilities.
    prob: Vec<f64>,
    decisions: f64,
}

impl RouterObserver for AuxLoss {
    fn observe(
        &mut self,
        _layer: usize,
        _token: usize,
        _logits: &[f32],
        probs: &[f32],
        selected: &[usize],
        _w: &[f32],
    ) {
        if self.prob.is_empty() {
            self.prob = vec![0.0; probs.len()];
            self.choice = vec![vec![0.0; probs.len()]; selected.len()];
        }
        for (k, &e) in selected.iter().enumerate() {
            self.choice[k][e] += 1.0;
        }
        for (a, &p) in self.prob.iter_mut().zip(probs) {
            *a += p as f64;
        }
        self.decisions += 1.0;
    }
}

impl AuxLoss {
    fn value(&self) -> f64 {
        let n = self.decisions.max(1.0);
        let s: f64 = self
            .choice
            .iter()
            .map(|row| {
                row.iter()
                    .zip(&self.prob)
                    .map(|(f, p)| (f / n) * (p / n))
                    .sum::<f64>()
            })
            .sum();
        s * self.prob.len() as f64
    }
}

/// Prompt, then `n` argmax steps (ties to the lower id) through the KV cache.
fn greedy(m: &mut dyn Model, ids: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return Ok(out);
    }
    let mut logits = m.forward(ids, false)?;
    loop {
        let t = argmax(&logits);
        out.push(t);
        if out.len() == n {
            return Ok(out);
        }
        logits = m.forward(&[t], false)?;
    }
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

/// The tokenizer file next to a checkpoint.
fn tokenizer_path(model: &Path) -> Result<PathBuf> {
    let dir = if model.is_dir() {
        model.to_path_buf()
    } else {
        model.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let p = dir.join("tokenizer.json");
    if !p.is_file() {
        bail!(
            "{}: no tokenizer.json next to the model (needed to tokenize --data)",
            dir.display()
        );
    }
    Ok(p)
}

/// The first `count` tokens of `data` under the shared/README.md protocol.
fn protocol_tokens(model: &Path, data: &Path, count: usize) -> Result<Vec<u32>> {
    let tok = if model.is_file() && mfx_runtime::load::is_pack(model) {
        // A pack embeds its tokenizer.json.
        let pack = mfx_formats::pack::Pack::open(model)
            .with_context(|| format!("opening {}", model.display()))?;
        let json = &pack.manifest().tokenizer_json;
        json.parse::<tokenizers::Tokenizer>()
            .map_err(|e| anyhow::anyhow!("{}: embedded tokenizer.json: {e}", model.display()))?
    } else {
        let tp = tokenizer_path(model)?;
        tokenizers::Tokenizer::from_file(&tp)
            .map_err(|e| anyhow::anyhow!("{}: {e}", tp.display()))?
    };
    let text =
        std::fs::read_to_string(data).with_context(|| format!("reading {}", data.display()))?;
    let mut ids = Vec::with_capacity(count + 1024);
    for piece in text.split("\n<|endoftext|>\n").filter(|p| !p.is_empty()) {
        let enc = tok
            .encode(piece, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", data.display()))?;
        ids.extend_from_slice(enc.get_ids());
        ids.push(0);
        if ids.len() >= count {
            break;
        }
    }
    if ids.len() < count {
        bail!(
            "{}: only {} tokens, need {count} (rows * ctx)",
            data.display(),
            ids.len()
        );
    }
    ids.truncate(count);
    Ok(ids)
}

/// What `mean_nll` runs: any model, or the shared decoder with a router
/// observer accumulating the auxiliary loss.
enum Scorer<'a> {
    Plain(&'a mut dyn Model),
    Observed(&'a mut MoeModel, &'a mut AuxLoss),
}

impl Scorer<'_> {
    fn model(&mut self) -> &mut dyn Model {
        match self {
            Scorer::Plain(m) => &mut **m,
            Scorer::Observed(m, _) => &mut **m,
        }
    }

    fn forward_all(&mut self, piece: &[u32]) -> Result<Vec<f32>> {
        Ok(match self {
            Scorer::Plain(m) => m.forward(piece, true)?,
            Scorer::Observed(m, aux) => {
                m.forward_observed(piece, true, Some(&mut **aux as &mut dyn RouterObserver))?
            }
        })
    }
}

/// Mean NLL (nats) over `rows` rows of `ctx` tokens, each from an empty
/// cache and fed `chunk` tokens per forward pass.
fn mean_nll(
    m: &mut Scorer<'_>,
    tokens: &[u32],
    rows: usize,
    ctx: usize,
    chunk: usize,
) -> Result<f64> {
    let vocab = m.model().info().vocab_size;
    let mut total = 0.0f64;
    for row in tokens.chunks_exact(ctx).take(rows) {
        m.model().reset();
        let mut logits = Vec::with_capacity(row.len() * vocab);
        for piece in row.chunks(chunk.max(1)) {
            logits.extend(m.forward_all(piece)?);
        }
        for (i, &next) in row.iter().enumerate().skip(1) {
            let l = &logits[(i - 1) * vocab..i * vocab];
            let mx = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = l.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln() + mx;
            total += lse - l[next as usize] as f64;
        }
    }
    Ok(total / (rows * (ctx - 1)) as f64)
}

/// Writes a little-endian float32 C-order `.npy` (format 1.0), atomically.
fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut buf = Vec::with_capacity(10 + header.len() + data.len() * 4);
    buf.extend_from_slice(b"\x93NUMPY\x01\x00");
    buf.extend_from_slice(&(header.len() as u16).to_le_bytes());
    buf.extend_from_slice(header.as_bytes());
    for v in data {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out.npy".into());
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, &buf).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
