//! `mfx bench` and `mfx plan` end to end on a pack prepped from the shared
//! tiny model: the JSON fields users script against, a capacity far below
//! the expert count, and the budget-below-dense error.

use crate::common::{mfx, ok, shared};

use std::path::{Path, PathBuf};

fn prep(dir: &Path) -> PathBuf {
    let out = dir.join("tiny.mfx");
    let tiny = shared().join("models/tiny-qwen3-moe-coder");
    let calib = shared().join("data/c.val.txt");
    ok(&mfx(&[
        "prep",
        tiny.to_str().unwrap(),
        "--ram",
        "1G",
        "--no-card",
        "--calib",
        calib.to_str().unwrap(),
        "--calib-rows",
        "2",
        "--calib-seq",
        "128",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ]));
    out
}

#[test]
fn bench_json_plan_and_budget_errors() {
    let d = tempfile::tempdir().unwrap();
    let pack = prep(d.path());
    let p = pack.to_str().unwrap();
    let out = ok(&mfx(&[
        "bench",
        p,
        "--no-pin",
        "--capacity",
        "2",
        "--prompt-tokens",
        "32",
        "--gen-tokens",
        "8",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    for k in [
        "prompt_tok_s",
        "decode_tok_s",
        "ttft_ms",
        "peak_rss_bytes",
        "hit_rate",
        "bytes_read",
    ] {
        assert!(v.get(k).is_some_and(|x| x.is_number()), "missing {k}: {v}");
    }
    assert!(v["prompt_tok_s"].as_f64().unwrap() > 0.0);
    assert!(
        v["bytes_read"].as_u64().unwrap() > 0,
        "capacity 2 of 64 must read experts"
    );
    assert!(v["hit_rate"].as_f64().unwrap() < 1.0);

    let o = mfx(&[
        "bench",
        p,
        "--ram",
        "1K",
        "--gen-tokens",
        "1",
        "--prompt-tokens",
        "1",
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("the minimum is") && e.contains("dense weights"),
        "{e}"
    );

    let out = ok(&mfx(&[
        "plan",
        p,
        "--ram",
        "200M",
        "--probe-tokens",
        "4",
        "--repeats",
        "1",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let rows = v["budgets"].as_array().unwrap();
    assert!(rows.len() >= 2, "{v}");
    let hits: Vec<f64> = rows
        .iter()
        .map(|r| r["hit_rate"].as_f64().unwrap())
        .collect();
    assert!(
        hits.windows(2).all(|w| w[0] <= w[1] + 1e-12),
        "hit rate grows with budget: {hits:?}"
    );
    assert!(v["recommended"].is_object(), "{v}");
}

/// Decode bytes read per token with `--policy P` (exact: no read-ahead, so
/// a hit is a hit, not a read that happened to finish first).
fn decode_bytes(pack: &str, text: &str, policy: Option<&str>, trace: Option<&str>) -> f64 {
    let mut args = vec![
        "bench",
        pack,
        "--no-pin",
        "--capacity",
        "8",
        "--no-prefetch",
        "--io-threads",
        "0",
        "--text",
        text,
        "--prompt-tokens",
        "64",
        "--gen-tokens",
        "512",
        "--json",
    ];
    if let Some(p) = policy {
        args.extend_from_slice(&["--policy", p]);
    }
    if let Some(t) = trace {
        args.extend_from_slice(&["--trace-routing", t]);
    }
    let out = ok(&mfx(&args));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    v["decode_bytes_read_per_token"]
        .as_f64()
        .expect("decode_bytes_read_per_token")
}

/// The default eviction policy was chosen by bytes read on real routing
/// (docs/PERF.md); this keeps that claim true on the trained tiny model:
/// with 8 of 64 slots per layer over python text the default must read
/// clearly less than LRU (measured: 26% less over 768 tokens). The routing
/// trace it writes must describe the run: every MoE layer once per pass,
/// each pass's experts serving exactly top-k slots per token.
#[test]
fn default_policy_reads_less_than_lru_and_traces_routing() {
    let d = tempfile::tempdir().unwrap();
    let pack = prep(d.path());
    let p = pack.to_str().unwrap();
    let text = shared().join("data/python.val.txt");
    let text = text.to_str().unwrap();
    let trace = d.path().join("trace.jsonl");
    let default = decode_bytes(p, text, None, Some(trace.to_str().unwrap()));
    let lru = decode_bytes(p, text, Some("lru"), None);
    assert!(
        default < 0.9 * lru,
        "default policy reads {default:.0} bytes/token, LRU {lru:.0}"
    );

    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("models/tiny-qwen3-moe-coder/config.json")).unwrap(),
    )
    .unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    let top_k = cfg["num_experts_per_tok"].as_u64().unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let prompt = lines.iter().filter(|v| v["phase"] == "prompt").count();
    let decode = lines.iter().filter(|v| v["phase"] == "decode").count();
    assert_eq!(prompt, layers, "one 64-token chunk");
    assert_eq!(decode, 512 * layers);
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["layer"].as_u64().unwrap() as usize, i % layers, "{v}");
        let tokens: u64 = v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .sum();
        let n = if v["phase"] == "prompt" { 64 } else { 1 };
        assert_eq!(tokens, n * top_k, "{v}");
        assert_eq!(
            v["experts"].as_array().unwrap().len(),
            v["tokens"].as_array().unwrap().len()
        );
    }
}
