//! `mfx plan PACK --ram 32G`: what each memory budget would buy, before
//! running anything big.
//!
//! Two measured probes and one model. The probes run the pack through the
//! runtime itself, teacher-forced on built-in calibration text, at the
//! least budget `mfx run` accepts and at the largest one considered (as
//! much of the pack as the machine's budget holds): each gives milliseconds
//! per decode token and bytes read per token, the median of `--repeats`
//! segments of `--probe-tokens`. The model: the pack's routing profile
//! (expert activation counts per layer, written by `mfx prep`) predicts each
//! budget's bytes read per token as those of a cache holding the most-used
//! experts (pinned + the per-layer capacity the runtime's own budget split
//! gives), scaled so it matches the small probe's measured reads; time per
//! token is the large probe's plus the probes' measured cost per byte read.
//! So compute (kernels, attention, cache bookkeeping) and I/O (latency,
//! bandwidth, decompression) are both measured on this machine, not
//! estimated from bandwidths.

use super::bench::{load_cached, pack_tokens};
use anyhow::{bail, Context, Result};
use mfx_formats::pack::Pack;
use mfx_formats::profile::Profile;
use mfx_runtime::cache::RESERVED_CONTEXT_DEFAULT;
use mfx_runtime::cache::{
    detect_budget, minimum_budget, pack_needs, plan_budget, too_small, CacheOptions,
};
use mfx_runtime::generate::DEFAULT_PREFILL_CHUNK;
use mfx_runtime::models::family::FamilyConfig;
use mfx_runtime::models::{working, KvBits, LoadOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The `.mfx` pack (its manifest carries the routing profile).
    pub pack: PathBuf,
    /// The machine's memory budget (as `mfx run --ram`); budgets above it
    /// are not recommended, and the large probe runs at most at it.
    #[arg(long, value_name = "SIZE", value_parser = super::args::size)]
    pub ram: Option<u64>,
    /// Decode tokens per timed probe segment.
    #[arg(long, default_value_t = 32)]
    pub probe_tokens: usize,
    /// Timed segments per probe (the median is used).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Probe on this text (your workload: the hit rate near a full cache
    /// depends on it) instead of the built-in calibration text, which the
    /// pack's pins were chosen on.
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn num(v: &serde_json::Value, k: &str) -> Option<usize> {
    v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize)
}

/// What one probe measured at one budget.
#[derive(Debug, Clone, serde::Serialize)]
struct Probe {
    budget_bytes: u64,
    ms_per_token: f64,
    read_bytes_per_token: f64,
    /// Time spent waiting for expert reads, per token.
    stall_ms_per_token: f64,
    hit_rate: f64,
    /// Every segment's ms per token, in run order.
    segments_ms: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Prompt tokens before the timed segments, and untimed decode steps that
/// let the cache reach its working set.
const PROBE_PROMPT: usize = 16;
const PROBE_WARMUP: usize = 64;

/// Loads `pack` at `budget` as `mfx run` would (`context` positions
/// reserved) and times `repeats` segments of `n` decode
/// steps, teacher-forced on `ids`.
fn probe(
    pack: &Path,
    budget: u64,
    ids: &[u32],
    context: usize,
    n: usize,
    repeats: usize,
) -> Result<Probe> {
    let (mut model, cache, _) = load_cached(
        pack,
        CacheOptions {
            ram: Some(budget),
            ..CacheOptions::default()
        },
        (context, DEFAULT_PREFILL_CHUNK),
    )?;
    model.forward(&ids[..PROBE_PROMPT], false)?;
    let mut at = PROBE_PROMPT;
    for _ in 0..PROBE_WARMUP {
        model.forward(&ids[at..at + 1], false)?;
        at += 1;
    }
    let (mut ms, mut read, mut hit, mut stall) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        let s0 = cache.stats();
        let t = Instant::now();
        for _ in 0..n {
            model.forward(&ids[at..at + 1], false)?;
            at += 1;
        }
        let dt = t.elapsed().as_secs_f64();
        let s1 = cache.stats();
        ms.push(dt * 1e3 / n as f64);
        read.push((s1.bytes_read - s0.bytes_read) as f64 / n as f64);
        stall.push((s1.stall_ms - s0.stall_ms) / n as f64);
        let (h, m) = (s1.hits - s0.hits, s1.misses - s0.misses);
        hit.push(if h + m == 0 {
            1.0
        } else {
            h as f64 / (h + m) as f64
        });
    }
    Ok(Probe {
        budget_bytes: budget,
        ms_per_token: median(&ms),
        read_bytes_per_token: median(&read),
        stall_ms_per_token: median(&stall),
        hit_rate: median(&hit),
        segments_ms: ms,
    })
}

/// `--text`, else the built-in calibration text (code and chat): the
/// probes' tokens.
fn probe_ids(pack: &Path, text: Option<&Path>, count: usize) -> Result<Vec<u32>> {
    let text: String = match text {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("--text {}", p.display()))?,
        None => mfx_prep::calib::BUILTIN
            .iter()
            .map(|(_, t)| *t)
            .collect::<Vec<_>>()
            .join("\n"),
    };
    pack_tokens(pack, &text, count)
}

pub fn run(a: Args) -> Result<()> {
    if a.probe_tokens == 0 || a.repeats == 0 {
        bail!("--probe-tokens and --repeats must be at least 1");
    }
    let pack = Pack::open(&a.pack).with_context(|| format!("opening {}", a.pack.display()))?;
    let m = pack.manifest();
    let Some(profile) = m
        .pin_profile
        .as_ref()
        .and_then(|v| serde_json::from_value::<Profile>(v.clone()).ok())
    else {
        bail!(
            "{}: no routing profile in the manifest (pin_profile); make the pack with `mfx prep`",
            a.pack.display()
        );
    };
    let n_layers = num(&m.config, "num_hidden_layers").context("config: num_hidden_layers")?;
    let limit = a.ram;
    let probe_tokens = PROBE_PROMPT + PROBE_WARMUP + a.probe_tokens * a.repeats;
    // The working reserve `mfx run` keeps at its defaults (context, prompt
    // chunk, f16 KV), out of each budget: rows and probes are `mfx run`'s.
    let (working, top_k, context) = FamilyConfig::from_json_str(&m.config.to_string(), &a.pack)
        .map(|cfg| {
            let shape = working::family(&cfg, KvBits::F16);
            let w = working::bytes(
                &shape,
                cfg.max_position_embeddings(),
                &LoadOptions::default(),
            );
            let context = RESERVED_CONTEXT_DEFAULT.min(cfg.max_position_embeddings().max(1));
            (w, shape.top_k as usize, context)
        })
        .with_context(|| format!("{}: the manifest's config", a.pack.display()))?;
    if probe_tokens > context {
        bail!("--probe-tokens x --repeats: {probe_tokens} positions, more than the {context} `mfx run` reserves");
    }
    let io_threads = CacheOptions::default().io_threads;
    let threads = rayon::current_num_threads();
    // The least budget `mfx run` accepts for this pack (same arithmetic).
    let needs = pack_needs(&pack, n_layers, top_k, true, working, io_threads, threads);
    let minimum = minimum_budget(&needs);
    if let Some(l) = limit.filter(|&l| l < minimum) {
        return Err(too_small(a.pack.display().to_string(), l, &needs).into());
    }

    let dense: u64 = m.tensors.iter().map(|t| t.length).sum();
    let all_experts: u64 = m.experts.iter().map(|e| e.raw_length).sum();
    let full = dense + all_experts;
    let mut mean_stored = vec![0f64; n_layers];
    let mut count = vec![0usize; n_layers];
    for e in &m.experts {
        if let Some(c) = count.get_mut(e.layer as usize) {
            *c += 1;
            mean_stored[e.layer as usize] += e.length as f64;
        }
    }
    for l in 0..n_layers {
        if count[l] > 0 {
            mean_stored[l] /= count[l] as f64;
        }
    }

    // From the least budget `mfx run` accepts up to one that also holds
    // every expert; the machine's --ram last.
    let mut budgets: Vec<u64> = [0u64, 25, 50, 75, 100]
        .iter()
        .map(|p| minimum + all_experts * p / 100)
        .collect();
    budgets.extend(limit);
    budgets.sort_unstable();
    budgets.dedup();
    // Per budget: capacity and the profile's predicted hit rate and bytes read.
    let mut rows = Vec::new();
    for &b in &budgets {
        let Ok(plan) = plan_budget(
            &pack,
            n_layers,
            top_k,
            b,
            true,
            Some(working),
            0,
            io_threads,
            threads,
        ) else {
            continue;
        };
        let (mut miss_bytes, mut hit_sum, mut moe) = (0f64, 0f64, 0usize);
        for lp in &profile.layers {
            let l = lp.layer as usize;
            if l >= n_layers || count[l] == 0 {
                continue;
            }
            let mut c = lp.counts.clone();
            c.sort_unstable_by(|a, b| b.cmp(a));
            let total: u64 = c.iter().sum();
            // Pinned experts are the most-used ones, and a frequency cache
            // keeps the next most-used: the steady state LFU approaches.
            let keep = plan.capacity[l] + lp.pinned.len().min(c.len());
            let hit = if total == 0 {
                1.0
            } else {
                c.iter().take(keep).sum::<u64>() as f64 / total as f64
            };
            hit_sum += hit;
            moe += 1;
            miss_bytes += top_k as f64 * (1.0 - hit) * mean_stored[l];
        }
        let hit_rate = if moe == 0 { 1.0 } else { hit_sum / moe as f64 };
        rows.push((
            b,
            plan.capacity.iter().copied().max().unwrap_or(0),
            hit_rate,
            miss_bytes,
        ));
    }
    if rows.is_empty() {
        bail!(
            "no budget fits: the least `mfx run` accepts is {minimum} bytes ({} MiB)",
            minimum.div_ceil(1 << 20)
        );
    }

    // The probes: every budget this machine can give (its --ram, else what
    // is available now) is measured; budgets above it are modelled from the
    // two largest measured ones.
    let ids = probe_ids(&a.pack, a.text.as_deref(), probe_tokens)?;
    let machine = limit.or_else(detect_budget).unwrap_or(minimum);
    let mut probes: Vec<Probe> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if i == 0 || r.0 <= machine {
            probes.push(probe(
                &a.pack,
                r.0,
                &ids,
                context,
                a.probe_tokens,
                a.repeats,
            )?);
        }
    }
    let predicted = |b: u64| rows.iter().find(|r| r.0 == b).map_or(0.0, |r| r.3);
    let hi = probes[probes.len() - 1].clone();
    // The profile's reads scaled to what the largest probe that read
    // anything really read (its routing is this text's, the profile's the
    // calibration set's).
    let scale = probes
        .iter()
        .rev()
        .find(|p| p.read_bytes_per_token > 0.0 && predicted(p.budget_bytes) > 0.0)
        .map_or(1.0, |p| p.read_bytes_per_token / predicted(p.budget_bytes));
    // Budgets above the largest probe read less: each byte not read saves
    // what that probe waited per byte read (its own stall over its own
    // reads, one run, no difference of two noisy runs). A lower bound on
    // the gain: a miss also costs decoding and bookkeeping outside the stall.
    let ms_per_byte = if hi.read_bytes_per_token > 0.0 {
        hi.stall_ms_per_token / hi.read_bytes_per_token
    } else {
        0.0
    };
    let out_rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|&(b, cap, hit, miss)| {
            let (ms, read, measured) = match probes.iter().find(|p| p.budget_bytes == b) {
                Some(p) => (p.ms_per_token, p.read_bytes_per_token, true),
                None => {
                    let read = scale * miss;
                    let ms = (hi.ms_per_token + ms_per_byte * (read - hi.read_bytes_per_token))
                        .max(hi.ms_per_token - hi.stall_ms_per_token);
                    (ms, read, false)
                }
            };
            serde_json::json!({
                "budget_bytes": b,
                "capacity_per_layer": cap,
                "hit_rate": hit,
                "predicted_read_bytes_per_token": scale * miss,
                "read_bytes_per_token": read,
                "ms_per_token": ms,
                "tok_s": 1e3 / ms,
                "measured": measured,
            })
        })
        .collect();
    let best = out_rows
        .iter()
        .filter(|r| limit.is_none_or(|l| r["budget_bytes"].as_u64().unwrap_or(0) <= l))
        .map(|r| r["tok_s"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    let rec = out_rows
        .iter()
        .filter(|r| limit.is_none_or(|l| r["budget_bytes"].as_u64().unwrap_or(0) <= l))
        .find(|r| r["tok_s"].as_f64().unwrap_or(0.0) >= 0.9 * best)
        .cloned();
    let out = serde_json::json!({
        "pack": a.pack.display().to_string(),
        "dense_bytes": dense,
        "expert_bytes": all_experts,
        "full_bytes": full,
        "minimum_budget_bytes": minimum,
        "context": context,
        "probes": probes,
        "read_scale": scale,
        "ms_per_mib_read": ms_per_byte * (1u64 << 20) as f64,
        "budgets": out_rows,
        "recommended": rec,
    });
    if a.json {
        println!("{out}");
        return Ok(());
    }
    let mib = |b: f64| b / (1u64 << 20) as f64;
    println!(
        "dense {:.0} MiB, experts {:.0} MiB; each budget this machine gives is probed ({} x {} decode tokens, median); above it, {:.2} ms of stall per MiB read",
        mib(dense as f64),
        mib(all_experts as f64),
        a.repeats,
        a.probe_tokens,
        ms_per_byte * (1u64 << 20) as f64,
    );
    println!(
        "{:>12} {:>9} {:>9} {:>14} {:>9}  how",
        "budget MiB", "capacity", "hit rate", "read KiB/tok", "tok/s"
    );
    for r in &out["budgets"].as_array().cloned().unwrap_or_default() {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "{:>12.0} {:>9} {:>8.1}% {:>14.1} {:>9.2}  {}",
            mib(f("budget_bytes")),
            r["capacity_per_layer"],
            f("hit_rate") * 100.0,
            f("read_bytes_per_token") / 1024.0,
            f("tok_s"),
            if r["measured"] == true {
                "measured"
            } else {
                "modelled"
            }
        );
    }
    if let Some(r) = out["recommended"].as_object() {
        println!(
            "recommended: --ram {:.0}M (within 10% of the best predicted speed{})",
            mib(r["budget_bytes"].as_f64().unwrap_or(0.0)).ceil(),
            if limit.is_some() { " under --ram" } else { "" }
        );
    }
    Ok(())
}
