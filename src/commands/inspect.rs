//! `mfx inspect PACK [--json]`: what is in a pack, without reading its blobs.
//!
//! Opening validates header and manifest (so a damaged or foreign file is
//! an error here too); the blob checksums are `mfx verify`'s job.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use mfx_formats::pack::{Pack, TensorLayout};
use mfx_formats::profile::Profile;
use mfx_formats::quant::Scheme;
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .mfx pack to describe.
    pub pack: PathBuf,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// Also list every tensor and expert entry (human output only; --json
    /// leaves the tables to `jq` on the manifest).
    #[arg(long)]
    pub list: bool,
}

/// Weight count and stored bytes per scheme.
#[derive(Default, Clone, Copy)]
struct Tally {
    count: u64,
    weights: u64,
    bytes: u64,
}

fn numel(shape: &[u64]) -> u64 {
    shape.iter().product()
}

fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Everything `inspect` reports, built once and printed as JSON or text.
fn summarize(pack: &Pack) -> Value {
    let h = pack.header();
    let m = pack.manifest();
    let file_len = h.file_length;

    let mut tensor_by_scheme: BTreeMap<String, Tally> = BTreeMap::new();
    for t in &m.tensors {
        let e = tensor_by_scheme.entry(t.scheme.to_string()).or_default();
        e.count += 1;
        e.weights += numel(&t.shape);
        e.bytes += t.length;
    }
    let mut expert_by_scheme: BTreeMap<String, Tally> = BTreeMap::new();
    let mut codecs: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    let mut layers: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    let (mut stored, mut raw, mut merged) = (0u64, 0u64, 0u64);
    for e in &m.experts {
        let l = layers.entry(e.layer).or_default();
        l.0 += 1;
        if e.merged_into.is_some() {
            merged += 1;
            l.1 += 1;
            continue;
        }
        stored += e.length;
        raw += e.raw_length;
        let c = codecs.entry(e.codec.name()).or_default();
        c.0 += 1;
        c.1 += e.length;
        c.2 += e.raw_length;
        for p in &e.parts {
            let t = expert_by_scheme
                .entry(format!("{} {}", p.name, p.scheme))
                .or_default();
            t.count += 1;
            t.weights += numel(&p.shape);
            t.bytes += TensorLayout::of(p.scheme, &p.shape)
                .map(|l| l.length)
                .unwrap_or(0);
        }
    }

    // Precision mix over every stored weight (dense + distinct expert blobs).
    let mut by_scheme: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    let mut add = |s: Scheme, n: u64| {
        let e = by_scheme
            .entry(s.to_string())
            .or_insert((0, s.bits_per_weight()));
        e.0 += n;
    };
    for t in &m.tensors {
        add(t.scheme, numel(&t.shape));
    }
    for e in m.experts.iter().filter(|e| e.merged_into.is_none()) {
        for p in &e.parts {
            add(p.scheme, numel(&p.shape));
        }
    }
    let total_weights: u64 = by_scheme.values().map(|v| v.0).sum();
    let avg_bits = if total_weights > 0 {
        by_scheme.values().map(|(n, b)| *n as f64 * b).sum::<f64>() / total_weights as f64
    } else {
        0.0
    };
    let precision: Vec<Value> = by_scheme
        .iter()
        .map(|(s, (n, b))| {
            json!({"scheme": s, "weights": n, "share": if total_weights > 0 { *n as f64 / total_weights as f64 } else { 0.0 }, "bits_per_weight": b})
        })
        .collect();

    let tally = |m: &BTreeMap<String, Tally>| -> Value {
        Value::Object(
            m.iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        json!({"count": t.count, "weights": t.weights, "bytes": t.bytes}),
                    )
                })
                .collect(),
        )
    };

    let pin = m.pin_profile.as_ref().map(|v| match serde_json::from_value::<Profile>(v.clone()) {
        Ok(p) => {
            let pinned: u64 = p.layers.iter().map(|l| l.pinned.len() as u64).sum();
            let pinned_bytes: u64 = p
                .layers
                .iter()
                .flat_map(|l| l.pinned.iter().map(move |&e| (l.layer, e)))
                .filter_map(|(l, e)| pack.expert(l, e))
                .filter(|e| e.merged_into.is_none())
                .map(|e| e.length)
                .sum();
            json!({
                "schema": p.schema,
                "pinned_experts": pinned,
                "pinned_stored_bytes": pinned_bytes,
                "per_layer": p.layers.iter().map(|l| json!([l.layer, l.pinned.len()])).collect::<Vec<_>>(),
                "mass_threshold": p.pin_rule.mass_threshold,
                "max_per_layer": p.pin_rule.max_per_layer,
                "calibration_tokens": p.calibration.tokens,
            })
        }
        // Not the current profile schema: report what is there, raw.
        Err(_) => json!({"raw": v}),
    });

    // A multimodal config's text model is under `text_config`.
    let cfg = m
        .config
        .get("text_config")
        .filter(|t| t.is_object())
        .unwrap_or(&m.config);
    json!({
        "path": pack.path().display().to_string(),
        "format_version": h.format_version,
        "writer": m.writer,
        "file_bytes": file_len,
        "alignment": h.alignment,
        "flags": h.flags,
        "sections": {
            "header": {"offset": 0, "length": mfx_formats::pack::HEADER_LEN},
            "data": {"offset": h.data_offset, "length": h.data_length},
            "manifest": {"offset": h.manifest_offset, "length": h.manifest_length},
        },
        "model": {
            "model_type": m.config.get("model_type"),
            "num_hidden_layers": cfg.get("num_hidden_layers"),
            "num_experts": cfg.get("num_experts").or_else(|| cfg.get("num_local_experts")).or_else(|| cfg.get("n_routed_experts")),
            "num_experts_per_tok": cfg.get("num_experts_per_tok"),
            "hidden_size": cfg.get("hidden_size"),
        },
        "tokenizer_json_bytes": m.tokenizer_json.len(),
        "chat_template": m.chat_template.is_some(),
        "generation": m.generation,
        "tensors": {
            "count": m.tensors.len(),
            "bytes": m.tensors.iter().map(|t| t.length).sum::<u64>(),
            "by_scheme": tally(&tensor_by_scheme),
        },
        "experts": {
            "entries": m.experts.len(),
            "layers": layers.len(),
            "blobs": m.experts.len() as u64 - merged,
            "merged": merged,
            "stored_bytes": stored,
            "raw_bytes": raw,
            "by_codec": Value::Object(codecs.iter().map(|(k, (n, s, r))| (k.to_string(), json!({"count": n, "stored_bytes": s, "raw_bytes": r}))).collect()),
            "by_part": tally(&expert_by_scheme),
        },
        "precision": {"weights": total_weights, "avg_bits_per_weight": avg_bits, "by_scheme": precision},
        "pin_profile": pin,
        "routing_summary": m.routing_summary.is_some(),
        "provenance": m.provenance,
    })
}

fn print_human(pack: &Pack, s: &Value) {
    let m = pack.manifest();
    let g = |v: &Value| v.as_u64().unwrap_or(0);
    println!(
        "pack       {} ({}, format v{}, alignment {})",
        pack.path().display(),
        human(g(&s["file_bytes"])),
        s["format_version"],
        human(g(&s["alignment"]))
    );
    println!("writer     {} {}", m.writer.name, m.writer.version);
    let md = &s["model"];
    // Config keys differ across families; show what is missing as "?".
    let opt = |v: &Value| {
        if v.is_null() {
            "?".to_string()
        } else {
            v.to_string().trim_matches('"').to_string()
        }
    };
    println!(
        "model      {} — {} layers, {} experts (top-{}), hidden {}",
        opt(&md["model_type"]),
        opt(&md["num_hidden_layers"]),
        opt(&md["num_experts"]),
        opt(&md["num_experts_per_tok"]),
        opt(&md["hidden_size"])
    );
    let sec = &s["sections"];
    println!(
        "sections   header 128 B | data {} @ {} | manifest {} @ {}",
        human(g(&sec["data"]["length"])),
        sec["data"]["offset"],
        human(g(&sec["manifest"]["length"])),
        sec["manifest"]["offset"]
    );
    println!(
        "tokenizer  {} embedded, chat template: {}",
        human(g(&s["tokenizer_json_bytes"])),
        if m.chat_template.is_some() {
            "yes"
        } else {
            "no"
        }
    );
    let t = &s["tensors"];
    println!("tensors    {} ({})", t["count"], human(g(&t["bytes"])));
    if let Some(o) = t["by_scheme"].as_object() {
        for (k, v) in o {
            println!(
                "             {k:<10} {:>7} tensors {:>14} weights {:>11}",
                g(&v["count"]),
                g(&v["weights"]),
                human(g(&v["bytes"]))
            );
        }
    }
    let e = &s["experts"];
    let ratio = if g(&e["raw_bytes"]) > 0 {
        g(&e["stored_bytes"]) as f64 / g(&e["raw_bytes"]) as f64
    } else {
        1.0
    };
    println!(
        "experts    {} entries in {} layers: {} blobs, {} merged; stored {} of {} raw ({:.3})",
        e["entries"],
        e["layers"],
        e["blobs"],
        e["merged"],
        human(g(&e["stored_bytes"])),
        human(g(&e["raw_bytes"])),
        ratio
    );
    if let Some(o) = e["by_codec"].as_object() {
        for (k, v) in o {
            println!(
                "             codec {k:<8} {:>6} blobs  stored {:>10}  raw {:>10}",
                g(&v["count"]),
                human(g(&v["stored_bytes"])),
                human(g(&v["raw_bytes"]))
            );
        }
    }
    if let Some(o) = e["by_part"].as_object() {
        for (k, v) in o {
            println!(
                "             {k:<20} {:>7} parts {:>14} weights",
                g(&v["count"]),
                g(&v["weights"])
            );
        }
    }
    let p = &s["precision"];
    println!(
        "precision  {:.3} bits/weight over {} weights",
        p["avg_bits_per_weight"].as_f64().unwrap_or(0.0),
        p["weights"]
    );
    if let Some(a) = p["by_scheme"].as_array() {
        for v in a {
            println!(
                "             {:<8} {:>6.2}%",
                v["scheme"].as_str().unwrap_or("?"),
                v["share"].as_f64().unwrap_or(0.0) * 100.0
            );
        }
    }
    match &s["pin_profile"] {
        Value::Null => println!("pinning    no pin profile"),
        v if v.get("raw").is_some() => println!("pinning    pin profile present, unrecognized schema"),
        v => println!(
            "pinning    {} experts pinned ({} stored), mass threshold {}, max {}/layer, calibrated on {} tokens",
            v["pinned_experts"],
            human(g(&v["pinned_stored_bytes"])),
            v["mass_threshold"],
            v["max_per_layer"],
            v["calibration_tokens"]
        ),
    }
    println!(
        "routing    summary {}",
        if s["routing_summary"].as_bool() == Some(true) {
            "present"
        } else {
            "absent"
        }
    );
}

fn print_list(pack: &Pack) {
    let m = pack.manifest();
    println!();
    println!(
        "{:<60} {:<8} {:<20} {:>12} {:>10}",
        "tensor", "scheme", "shape", "offset", "bytes"
    );
    for t in &m.tensors {
        println!(
            "{:<60} {:<8} {:<20} {:>12} {:>10}",
            t.name,
            t.scheme.to_string(),
            format!("{:?}", t.shape),
            t.offset,
            t.length
        );
    }
    println!();
    println!(
        "{:<14} {:<8} {:>12} {:>10} {:>10}  parts",
        "expert", "codec", "offset", "stored", "raw"
    );
    for e in &m.experts {
        let parts: Vec<String> = e
            .parts
            .iter()
            .map(|p| format!("{} {}", p.name, p.scheme))
            .collect();
        let merged = e
            .merged_into
            .map(|r| format!(" (merged into E{r})"))
            .unwrap_or_default();
        println!(
            "{:<14} {:<8} {:>12} {:>10} {:>10}  {}{merged}",
            format!("L{} E{}", e.layer, e.expert),
            e.codec.name(),
            e.offset,
            e.length,
            e.raw_length,
            parts.join(", ")
        );
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let pack = Pack::open(&args.pack)
        .with_context(|| format!("cannot open pack {}", args.pack.display()))?;
    let s = summarize(&pack);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_human(&pack, &s);
        if args.list {
            print_list(&pack);
        }
    }
    Ok(())
}
