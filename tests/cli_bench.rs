//! `mfx bench` and `mfx plan` end to end on a pack prepped from the shared
//! tiny model: the JSON fields users script against, a capacity far below
//! the expert count, and the budget-below-dense error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shared() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")).to_path_buf()
}

fn mfx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mfx"))
        .args(args)
        .output()
        .expect("run mfx")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "mfx failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

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
    assert!(e.contains("at least") && e.contains("dense weights"), "{e}");

    let out = ok(&mfx(&[
        "plan", p, "--ram", "64M", "--probe", "8M", "--json",
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
