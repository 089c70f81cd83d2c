//! `mfx plan PACK --ram 32G`: what each memory budget would buy, before
//! running anything big. From the pack's routing profile (expert activation
//! counts per layer, written by `mfx prep`) it predicts each budget's hit
//! rate as that of a cache holding the most-used experts (pinned + the
//! per-layer capacity the budget gives): the steady state LFU approaches, so
//! an upper bound for LRU. Misses per token times the mean stored expert
//! size, over the disk bandwidth measured here with direct reads of the
//! pack's own expert blobs, gives I/O time per token; the bytes every token
//! touches over a measured memory bandwidth gives compute time.

use anyhow::{bail, Context, Result};
use mfx_formats::pack::Pack;
use mfx_formats::profile::Profile;
use mfx_runtime::cache::buf::BufPool;
use mfx_runtime::cache::io::BlobReader;
use mfx_runtime::cache::{minimum_budget, pack_needs, plan_budget, too_small};
use mfx_runtime::models::family::FamilyConfig;
use mfx_runtime::models::{working, KvBits, LoadOptions};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The `.mfx` pack (its manifest carries the routing profile).
    pub pack: PathBuf,
    /// The machine's memory budget (as `mfx run --ram`); budgets above it
    /// are not recommended.
    #[arg(long, value_name = "SIZE", value_parser = super::args::size)]
    pub ram: Option<u64>,
    /// Bytes of expert blobs to read when measuring disk bandwidth.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = super::args::size)]
    pub probe: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn num(v: &serde_json::Value, k: &str) -> Option<usize> {
    v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize)
}

pub fn run(a: Args) -> Result<()> {
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
    // The working reserve `mfx run` would keep at its default context (4096
    // positions, 512-token prompt chunks, f16 KV), out of each budget.
    let (working, top_k) = FamilyConfig::from_json_str(&m.config.to_string(), &a.pack)
        .map(|cfg| {
            let shape = working::family(&cfg, KvBits::F16);
            let w = working::bytes(
                &shape,
                cfg.max_position_embeddings(),
                &LoadOptions::default(),
            );
            (w, shape.top_k as usize)
        })
        .with_context(|| format!("{}: the manifest's config", a.pack.display()))?;
    let io_threads = mfx_runtime::cache::CacheOptions::default().io_threads;
    let threads = rayon::current_num_threads();
    // The least budget `mfx run` accepts for this pack (same arithmetic).
    let needs = pack_needs(&pack, n_layers, top_k, true, working, io_threads, threads);
    let minimum = minimum_budget(&needs);

    // Disk: direct positioned reads of the pack's expert blobs, strided over
    // the file as cache misses would be.
    let probe = a.probe;
    let reader = BlobReader::open(&a.pack, true)?;
    let pool = BufPool::new(4);
    let stride = (m.experts.len() / 64).max(1);
    let (mut read, t0) = (0u64, Instant::now());
    'outer: for start in 0..stride {
        for e in m.experts.iter().skip(start).step_by(stride) {
            reader.read(&pool, e.offset, e.length as usize)?;
            read += e.length;
            if read >= probe {
                break 'outer;
            }
        }
    }
    let disk_bw = read as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    // Memory: one pass over a buffer larger than any cache.
    let buf = vec![1u8; 256 << 20];
    let t1 = Instant::now();
    let sum: u64 = buf.chunks_exact(8).map(|c| c[0] as u64).sum();
    let mem_bw = buf.len() as f64 / t1.elapsed().as_secs_f64().max(1e-9);
    std::hint::black_box(sum);

    let dense: u64 = m.tensors.iter().map(|t| t.length).sum();
    let all_experts: u64 = m.experts.iter().map(|e| e.raw_length).sum();
    let full = dense + all_experts;
    let mut mean_stored = vec![0f64; n_layers];
    let mut mean_raw = vec![0f64; n_layers];
    let mut count = vec![0usize; n_layers];
    for e in &m.experts {
        if let Some(c) = count.get_mut(e.layer as usize) {
            *c += 1;
            mean_stored[e.layer as usize] += e.length as f64;
            mean_raw[e.layer as usize] += e.raw_length as f64;
        }
    }
    for l in 0..n_layers {
        if count[l] > 0 {
            mean_stored[l] /= count[l] as f64;
            mean_raw[l] /= count[l] as f64;
        }
    }
    let touched = dense as f64
        + (0..n_layers)
            .filter(|&l| count[l] > 0)
            .map(|l| top_k as f64 * mean_raw[l])
            .sum::<f64>();
    let t_compute = touched / mem_bw;

    // From the least budget `mfx run` accepts up to one that also holds
    // every expert; the machine's --ram last (refused if below the least).
    // Refused as `mfx run` refuses it (the same error).
    if let Some(l) = limit.filter(|&l| l < minimum) {
        return Err(too_small(a.pack.display().to_string(), l, &needs).into());
    }
    let mut budgets: Vec<u64> = [0u64, 25, 50, 75, 100]
        .iter()
        .map(|p| minimum + all_experts * p / 100)
        .collect();
    budgets.extend(limit);
    budgets.sort_unstable();
    budgets.dedup();
    let mut rows = Vec::new();
    for &b in &budgets {
        // Only budgets `mfx run` accepts (with the pack's pins, its default).
        if b < minimum {
            continue;
        }
        let Ok(plan) = plan_budget(
            &pack,
            n_layers,
            top_k,
            b,
            false,
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
            // The pack's own pins are ignored: at every budget the
            // most-used experts are the ones a frequency cache keeps.
            let keep = plan.capacity[l];
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
        let t_io = miss_bytes / disk_bw;
        rows.push(serde_json::json!({
            "budget_bytes": b,
            "capacity_per_layer": plan.capacity.iter().copied().max().unwrap_or(0),
            "hit_rate": hit_rate,
            "read_bytes_per_token": miss_bytes,
            "tok_s": 1.0 / (t_compute + t_io),
            "tok_s_io_bound": if t_io > 0.0 { 1.0 / t_io } else { f64::INFINITY },
        }));
    }
    if rows.is_empty() {
        bail!(
            "no budget fits: the least `mfx run` accepts is {minimum} bytes ({} MiB)",
            minimum.div_ceil(1 << 20)
        );
    }
    let best = rows
        .iter()
        .filter(|r| limit.is_none_or(|l| r["budget_bytes"].as_u64().unwrap_or(0) <= l))
        .map(|r| r["tok_s"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    let rec = rows
        .iter()
        .filter(|r| limit.is_none_or(|l| r["budget_bytes"].as_u64().unwrap_or(0) <= l))
        .find(|r| r["tok_s"].as_f64().unwrap_or(0.0) >= 0.9 * best)
        .cloned();
    let out = serde_json::json!({
        "pack": a.pack.display().to_string(),
        "disk_bytes_per_s": disk_bw,
        "direct_io": reader.is_direct(),
        "memory_bytes_per_s": mem_bw,
        "dense_bytes": dense,
        "expert_bytes": all_experts,
        "full_bytes": full,
        "minimum_budget_bytes": minimum,
        "budgets": rows,
        "recommended": rec,
    });
    if a.json {
        println!("{out}");
        return Ok(());
    }
    let mib = |b: f64| b / (1u64 << 20) as f64;
    println!(
        "disk {:.0} MiB/s ({}), memory {:.1} GiB/s, dense {:.0} MiB, experts {:.0} MiB",
        mib(disk_bw),
        if reader.is_direct() {
            "direct"
        } else {
            "page cache"
        },
        mem_bw / (1u64 << 30) as f64,
        mib(dense as f64),
        mib(all_experts as f64)
    );
    println!(
        "{:>12} {:>9} {:>9} {:>14} {:>9}",
        "budget MiB", "capacity", "hit rate", "read KiB/tok", "tok/s"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "{:>12.0} {:>9} {:>8.1}% {:>14.1} {:>9.2}",
            mib(f("budget_bytes")),
            r["capacity_per_layer"],
            f("hit_rate") * 100.0,
            f("read_bytes_per_token") / 1024.0,
            f("tok_s")
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
