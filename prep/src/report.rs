//! Stage 6 outputs besides the pack: the JSON report (`--report`), the
//! pack's provenance and routing summary, and the model card (README.md).

use crate::entropy::Measure;
use crate::error::{PrepError, Result};
use crate::pipeline::{Options, Outcome};
use crate::plan::Plan;
use crate::source::Source;
use mfx_formats::codec::Codec;
use mfx_formats::profile::Profile;
use mfx_runtime::cache::human;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Real compression ratios, by storage class and bit width.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CodecStats {
    /// Dense affine tensors (measured only; dense tensors are never coded).
    pub dense: Measure,
    pub dense_entropy_bits: Vec<(u8, f64, u64)>,
    /// Expert blobs, all of them.
    pub experts: Measure,
    /// Expert blobs by bit width: (bits, measure, mean code entropy, count).
    pub experts_by_bits: Vec<(u8, Measure, f64, u64)>,
    /// Blobs stored per codec.
    pub stored_none: u64,
    pub stored_zstd: u64,
    pub stored_huffman: u64,
}

impl CodecStats {
    pub fn add_dense(&mut self, m: &Measure, entropy: f64, bits: u8) {
        self.dense.add(m);
        match self.dense_entropy_bits.iter_mut().find(|x| x.0 == bits) {
            Some(x) => {
                x.1 += entropy;
                x.2 += 1;
            }
            None => self.dense_entropy_bits.push((bits, entropy, 1)),
        }
    }

    pub fn add_expert(&mut self, m: &Measure, codec: Codec, entropy: f64, bits: u8) {
        self.experts.add(m);
        match codec {
            Codec::None => self.stored_none += 1,
            Codec::Zstd => self.stored_zstd += 1,
            Codec::Huffman => self.stored_huffman += 1,
        }
        match self.experts_by_bits.iter_mut().find(|x| x.0 == bits) {
            Some(x) => {
                x.1.add(m);
                x.2 += entropy;
                x.3 += 1;
            }
            None => self.experts_by_bits.push((bits, *m, entropy, 1)),
        }
    }

    /// Ratios as JSON (entropy sums turned into means).
    pub fn to_json(&self) -> Value {
        let ratio = |m: &Measure| {
            json!({
                "raw_bytes": m.raw,
                "zstd_bytes": m.zstd,
                "huffman_bytes": m.huffman,
                "zstd_saving": if m.raw > 0 { 1.0 - m.zstd as f64 / m.raw as f64 } else { 0.0 },
                "huffman_saving": if m.raw > 0 { 1.0 - m.huffman as f64 / m.raw as f64 } else { 0.0 },
            })
        };
        let mut by_bits: Vec<Value> = self
            .experts_by_bits
            .iter()
            .map(|(b, m, e, n)| {
                let mut v = ratio(m);
                v["bits"] = json!(b);
                v["blobs"] = json!(n);
                v["code_entropy_bits"] = json!(e / (*n).max(1) as f64);
                v
            })
            .collect();
        by_bits.sort_by_key(|v| v["bits"].as_u64());
        let dense_entropy: Vec<Value> = self
            .dense_entropy_bits
            .iter()
            .map(|(b, e, n)| json!({"bits": b, "tensors": n, "code_entropy_bits": e / (*n).max(1) as f64}))
            .collect();
        json!({
            "dense_measured_only": ratio(&self.dense),
            "dense_code_entropy": dense_entropy,
            "experts": ratio(&self.experts),
            "experts_by_bits": by_bits,
            "expert_blobs_stored": {"none": self.stored_none, "zstd": self.stored_zstd, "huffman": self.stored_huffman},
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PackReport {
    pub path: String,
    pub ram_label: String,
    pub ram: u64,
    pub file_bytes: u64,
    pub dense_bytes: u64,
    pub expert_raw_bytes: u64,
    pub expert_stored_bytes: u64,
    /// File bits over all logical weights (dense + every router id's expert).
    pub bits_per_weight: f64,
    /// Mean code width of expert weights (hot/cold mix, before scales).
    pub expert_code_bits: f64,
    pub pinned_experts: usize,
    pub total_experts: usize,
    /// Share of calibration routing that lands on pinned experts.
    pub pinned_token_share: f64,
    pub predicted_hit_rate: f64,
    pub hot_fraction: f64,
    /// Measured NLL of this pack per `--eval-data` text (prep's forward, weights as stored).
    pub eval_nll: Vec<(String, f64)>,
    /// KL divergence of this pack's next-token distributions from the
    /// source's on the same rows, per `--eval-data` text.
    pub eval_kld: Vec<(String, crate::kld::KldSummary)>,
    #[serde(skip)]
    pub plan: Plan,
    #[serde(skip)]
    pub codecs: CodecStats,
}

/// Top-25% routing share per layer: the skew that pinning works on.
pub fn routing_summary(p: &Profile) -> Value {
    let layers: Vec<Value> = p
        .layers
        .iter()
        .map(|l| {
            let tot: u64 = l.counts.iter().sum();
            json!({"layer": l.layer, "tokens": tot / p.model.top_k.max(1) as u64,
                   "top_quarter_share": crate::suitability::layer_top_quarter_share(l).unwrap_or(0.0),
                   "unused_experts": l.counts.iter().filter(|&&x| x == 0).count()})
        })
        .collect();
    json!({"calibration_tokens": p.calibration.tokens, "layers": layers})
}

/// Provenance: no absolute paths and no timestamps, so identical inputs give
/// identical packs wherever they are built.
pub fn provenance(dir: &Path, o: &Options, ram_label: &str, ck: &Source, pl: &Plan) -> Value {
    let cfg_hash = std::fs::read(dir.join("config.json"))
        .map(|b| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&b)))
        .ok();
    let tok_hash = std::fs::read(dir.join("tokenizer.json"))
        .map(|b| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&b)))
        .ok();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let model_name = if Path::new(&o.model).is_dir() {
        name
    } else {
        o.model.clone()
    };
    json!({
        "tool": "mfx prep",
        "mfx_prep_version": env!("CARGO_PKG_VERSION"),
        "source": {"model": model_name, "model_type": ck.model_type(),
                   "config_json_xxh3": cfg_hash, "tokenizer_json_xxh3": tok_hash,
                   "safetensors_bytes": ck.input_bytes()},
        "options": {"ram": ram_label, "ram_bytes": pl.ram, "hot_bits": o.hot_bits, "cold_bits": o.cold_bits,
                    "dense_bits": o.dense_bits, "router_bits": crate::quantize::ROUTER_BITS, "group_size": o.group_size,
                    "hot_fraction": o.hot_fraction, "pin_mass": o.pin_mass, "merge": o.merge, "task": o.task,
                    "merge_max_nll": o.merge_max_nll, "prune": o.prune, "prune_by": o.prune_by, "min_codec_saving": o.min_codec_saving,
                    "expert_rounding": expert_rounding(o), "align": o.align,
                    "requantized_from_mlx": ck.mlx_quantized()},
        "plan": {"reserve": pl.reserve, "dense_bytes": pl.dense_bytes, "pinned_bytes": pl.pinned_bytes,
                 "cache_bytes": pl.cache_bytes, "hot_fraction": pl.hot_fraction,
                 "predicted_hit_rate": pl.predicted_hit_rate, "reason": pl.reason},
    })
}

pub fn full_report(dir: &Path, o: &Options, out: &Outcome, secs: f64, input_bytes: u64) -> String {
    let packs: Vec<Value> = out
        .packs
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
            v["plan"] = serde_json::to_value(&p.plan).unwrap_or(Value::Null);
            v["entropy"] = p.codecs.to_json();
            v
        })
        .collect();
    let r = json!({
        "model": dir.file_name().map(|n| n.to_string_lossy().to_string()),
        "calibration": out.profile.calibration,
        "calibration_nll": out.calib_nll,
        "routing": routing_summary(&out.profile),
        "suitability": out.suitability,
        "merge": out.merge,
        "prune": out.prune,
        "source_eval_nll": out.source_eval,
        "packs": packs,
        "seconds": secs,
        "input_bytes": input_bytes,
        "input_mb_per_s": input_bytes as f64 / 1e6 / secs.max(1e-9),
        "options": {"hot_bits": o.hot_bits, "cold_bits": o.cold_bits, "dense_bits": o.dense_bits, "group_size": o.group_size,
                    "expert_rounding": expert_rounding(o), "align": o.align},
    });
    let mut s = serde_json::to_string_pretty(&r).unwrap_or_default();
    s.push('\n');
    s
}

/// How expert codes below 8 bits were chosen (`--gptq`).
fn expert_rounding(o: &Options) -> &'static str {
    if o.gptq {
        "gptq"
    } else {
        "nearest"
    }
}

/// Marker that says a README.md was written by mfx and may be replaced.
const CARD_MARKER: &str = "<!-- mfx-model-card -->";

/// Writes the model card beside the pack: `README.md`, unless a README.md
/// not written by mfx is already there, then `<pack stem>.README.md`.
pub fn write_model_card(
    pack: &Path,
    dir: &Path,
    c: &Source,
    rep: &PackReport,
    out: &Outcome,
) -> Result<PathBuf> {
    let parent = pack
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let readme = parent.join("README.md");
    let ours = std::fs::read_to_string(&readme)
        .map(|s| s.contains(CARD_MARKER))
        .unwrap_or(true);
    let path = if ours {
        readme
    } else {
        let stem = pack
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "pack".into());
        parent.join(format!("{stem}.README.md"))
    };
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let file = pack
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let nll = match (out.calib_nll, &out.merge) {
        (_, Some(m)) if m.applied => format!(
            "calibration NLL {:.4} -> {:.4} nats/token after merging ({:+.2}%)",
            m.nll_before,
            m.nll_after,
            m.nll_change * 100.0
        ),
        (Some(n), _) => format!("source model NLL on the calibration set: {n:.4} nats/token"),
        _ => "not measured in this run (measure with `mfx eval ppl PACK --data FILE`)".into(),
    };
    let hit = rep.predicted_hit_rate * 100.0;
    let mut quality = String::new();
    if out.packs.len() > 1 {
        quality.push_str("\n## Packs from this run\n\n| file | RAM budget | size | bits/weight | hot | pinned | predicted hit rate |\n| --- | --- | --- | --- | --- | --- | --- |\n");
        for p in &out.packs {
            let f = Path::new(&p.path)
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default();
            quality.push_str(&format!(
                "| `{f}` | {} | {} | {:.2} | {:.0}% | {}/{} | {:.1}% |\n",
                p.ram_label,
                human(p.file_bytes),
                p.bits_per_weight,
                p.hot_fraction * 100.0,
                p.pinned_experts,
                p.total_experts,
                p.predicted_hit_rate * 100.0
            ));
        }
    }
    if let Some(p) = &out.prune {
        quality.push_str(&format!(
            "\n## Pruned experts\n\n{} of {} routed experts per MoE layer were removed with their router rows (`--prune {}`): those with the lowest saliency (router weight times output norm over the calibration tokens routed to them, {}).\n",
            p.experts_before - p.experts_after,
            p.experts_before,
            p.fraction,
            match p.by {
                crate::prune::SaliencyKind::Total => "summed",
                crate::prune::SaliencyKind::Mean => "averaged (REAP)",
            }
        ));
    }
    if !rep.eval_nll.is_empty() {
        quality.push_str(&format!("\n## Measured quality\n\nMean next-token NLL (nats; {} predictions per file), source weights vs this pack, and the KL divergence of the pack's next-token distributions from the source's (nats per position; `mfx eval kld`):\n\n| data | source NLL | pack NLL | change | KLD mean | KLD p99 | top-1 agreement |\n| --- | --- | --- | --- | --- | --- | --- |\n", rep.eval_kld.first().map_or(0, |(_, k)| k.positions)));
        for (i, ((n, v), (_, b))) in rep.eval_nll.iter().zip(&out.source_eval).enumerate() {
            let short = Path::new(n)
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_else(|| n.clone());
            let k = rep.eval_kld.get(i).map(|(_, k)| k);
            quality.push_str(&format!(
                "| {short} | {b:.4} | {v:.4} | {:+.2}% | {} | {} | {} |\n",
                (v - b) / b * 100.0,
                k.map_or("-".into(), |k| format!("{:.5}", k.mean)),
                k.map_or("-".into(), |k| format!("{:.4}", k.p99)),
                k.map_or("-".into(), |k| format!("{:.2}%", k.top1_agreement * 100.0)),
            ));
        }
    }
    let text = format!(
        "---\nbase_model: {base}\nlibrary_name: mfx\ntags:\n- mfx\n- mixture-of-experts\n- quantized\nmfx:\n  ram_budget: \"{ram}\"\n  ram_bytes: {ram_bytes}\n  bits_per_weight: {bpw:.3}\n  predicted_hit_rate: {hitf:.4}\n---\n{CARD_MARKER}\n\
# {base} for mfx, {ram} RAM\n\n\
`{file}` is an [mfx](https://github.com/mfx-rs/mfx) pack of `{base}` ({arch}, {layers} layers, {experts} experts, top-{k}) \
tuned to run in {ram} of RAM: dense weights and the most-used experts stay resident, the rest stream from SSD.\n\n\
| | |\n| --- | --- |\n| file size | {size} |\n| bits per weight | {bpw:.2} |\n| hot experts (4-bit class) | {hotp:.0}% |\n\
| pinned experts | {pinned} of {total} ({share:.0}% of calibration routing) |\n| predicted cache hit rate | {hit:.1}% |\n| quality | {nll} |\n\n\
Run it:\n\n```\nmfx run {file} -p \"def fib(n):\"\n```\n\n\
Made with `mfx prep` (calibration: {toks} tokens from {nsrc} sources). {reason}\n\n\
Suitability: {suit}.\n{quality}",
        ram = rep.ram_label,
        ram_bytes = rep.ram,
        bpw = rep.bits_per_weight,
        hitf = rep.predicted_hit_rate,
        arch = c.model_type(),
        layers = c.layers(),
        experts = c.experts(),
        k = c.top_k(),
        size = human(rep.file_bytes),
        hotp = rep.hot_fraction * 100.0,
        pinned = rep.pinned_experts,
        total = rep.total_experts,
        share = rep.pinned_token_share * 100.0,
        toks = out.profile.calibration.tokens,
        nsrc = out.profile.calibration.sources.len(),
        reason = rep.plan.reason.trim(),
        suit = out.suitability.verdict,
    );
    crate::write_atomic(&path, text.as_bytes()).map_err(|e| match e {
        PrepError::Write { source, .. } => PrepError::Write {
            path: path.clone(),
            source,
        },
        e => e,
    })?;
    Ok(path)
}
