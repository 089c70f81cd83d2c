//! `mfx eval` end to end: the binary against transformers' references in
//! `../shared`, and its errors on broken checkpoints (each must name the
//! file, key or tensor at fault, exit 1, and never panic).

use crate::common::{mfx, read_npy as read_npy_f32, rel_err, shared, stderr};

use std::path::Path;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids_arg(v: &serde_json::Value) -> String {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn ids_line(v: &serde_json::Value) -> String {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn eval_logits_matches_transformers_npy() {
    let dir = shared().join("fixtures/olmoe");
    let r = json(&dir.join("reference.json"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.npy");
    let o = mfx(&[
        "eval",
        "logits",
        dir.to_str().unwrap(),
        "--ids",
        &ids_arg(&r["input_ids"]),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (shape, got) = read_npy_f32(&out);
    let (wshape, want) = read_npy_f32(&dir.join("reference_logits.npy"));
    assert_eq!(shape, wshape);
    let e = rel_err(&got, &want);
    assert!(e < 1e-3, "rel err {e:.3e}");
}

#[test]
fn eval_greedy_prints_reference_tokens() {
    for fam in ["mixtral", "qwen2_moe"] {
        let dir = shared().join("fixtures").join(fam);
        let r = json(&dir.join("reference.json"));
        let o = mfx(&[
            "eval",
            "greedy",
            dir.to_str().unwrap(),
            "--ids",
            &ids_arg(&r["input_ids"]),
            "-n",
            "16",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            ids_line(&r["greedy_16"]),
            "{fam}"
        );
    }
    let dir = shared().join("models/tiny-qwen3-moe-coder");
    let p = &json(&dir.join("reference/reference.json"))["prompts"]["rust"];
    let o = mfx(&[
        "eval",
        "greedy",
        dir.to_str().unwrap(),
        "--ids",
        &ids_arg(&p["ids"]),
        "-n",
        "48",
        "--kv-bits",
        "16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        ids_line(&p["greedy_48"])
    );
}

/// A shortened protocol run (4 rows of 128): the output format, and an NLL
/// in the range the full bf16 reference reports for this domain.
#[test]
fn eval_ppl_small_run() {
    let model = shared().join("models/tiny-qwen3-moe-coder");
    let data = shared().join("data/c.val.txt");
    let o = mfx(&[
        "eval",
        "ppl",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--rows",
        "4",
        "--ctx",
        "128",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let nll = v["nll"].as_f64().unwrap();
    assert!((nll.exp() - v["ppl"].as_f64().unwrap()).abs() < 1e-6 * nll.exp());
    assert_eq!(v["predictions"], 4 * 127);
    assert!(nll > 0.5 && nll < 3.5, "nll {nll}");
    let o = mfx(&[
        "eval",
        "ppl",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--rows",
        "1",
        "--ctx",
        "32",
    ]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.starts_with("nll=") && s.contains(" ppl="), "{s}");
}

/// Copies a fixture into a temp dir so a test can break it.
fn broken_copy(fam: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(shared().join("fixtures").join(fam)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
        let mut perm = std::fs::metadata(tmp.path().join(e.file_name()))
            .unwrap()
            .permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(tmp.path().join(e.file_name()), perm).unwrap();
    }
    tmp
}

/// Runs `mfx eval logits` on `dir` and returns stderr, asserting a clean failure.
fn fails(dir: &Path) -> String {
    let out = dir.join("out.npy");
    let o = mfx(&[
        "eval",
        "logits",
        dir.to_str().unwrap(),
        "--ids",
        "1,2,3",
        "-o",
        out.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(!out.exists());
    e
}

#[test]
fn eval_error_missing_model_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let e = fails(&tmp.path().join("nope"));
    assert!(e.contains("nope") && e.contains("no such file"), "{e}");
    let e = fails(tmp.path());
    assert!(
        e.contains("not a model") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn eval_error_corrupt_config_and_unknown_arch_and_missing_key() {
    let t = broken_copy("qwen3_moe");
    let cfg = t.path().join("config.json");
    std::fs::write(&cfg, "{ \"model_type\": \"qwen3_moe\", ").unwrap();
    let e = fails(t.path());
    assert!(
        e.contains("config.json") && e.contains("invalid JSON"),
        "{e}"
    );

    let good = std::fs::read_to_string(shared().join("fixtures/qwen3_moe/config.json")).unwrap();
    std::fs::write(&cfg, good.replace("\"qwen3_moe\"", "\"llama4_text\"")).unwrap();
    let e = fails(t.path());
    assert!(e.contains("unsupported architecture `llama4_text`"), "{e}");

    std::fs::write(
        &cfg,
        good.replace("\"num_experts_per_tok\"", "\"renamed_key\""),
    )
    .unwrap();
    let e = fails(t.path());
    assert!(
        e.contains("config.json") && e.contains("missing required key `num_experts_per_tok`"),
        "{e}"
    );
}

#[test]
fn eval_error_missing_and_corrupt_shard() {
    let t = broken_copy("mixtral");
    let shard = t.path().join("model-00002-of-00003.safetensors");
    std::fs::remove_file(&shard).unwrap();
    let e = fails(t.path());
    assert!(e.contains("model-00002-of-00003.safetensors"), "{e}");

    let good =
        std::fs::read(shared().join("fixtures/mixtral/model-00002-of-00003.safetensors")).unwrap();
    std::fs::write(&shard, &good[..good.len() / 2]).unwrap();
    let e = fails(t.path());
    assert!(
        e.contains("model-00002-of-00003.safetensors") && e.contains("invalid safetensors"),
        "{e}"
    );

    std::fs::write(&shard, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let e = fails(t.path());
    assert!(
        e.contains("model-00002-of-00003.safetensors") && e.contains("invalid safetensors"),
        "{e}"
    );
}

/// Rewrites a shard's header so that one tensor has its two dimensions
/// swapped: still a valid safetensors file, but the wrong shape for the model.
#[test]
fn eval_error_wrong_tensor_shape() {
    let t = broken_copy("qwen2_moe");
    let idx = json(&t.path().join("model.safetensors.index.json"));
    let name = "model.layers.0.self_attn.o_proj.weight";
    let file = t.path().join(idx["weight_map"][name].as_str().unwrap());
    let b = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let shape = h[name]["shape"].as_array().unwrap().clone();
    // o_proj is [64, 64] in this fixture; make it [32, 128] (same byte size).
    assert_eq!(shape.len(), 2);
    let (r, c) = (shape[0].as_u64().unwrap(), shape[1].as_u64().unwrap());
    h[name]["shape"] = serde_json::json!([r / 2, c * 2]);
    let mut hs = serde_json::to_vec(&h).unwrap();
    while !hs.len().is_multiple_of(8) {
        hs.push(b' ');
    }
    let mut nb = (hs.len() as u64).to_le_bytes().to_vec();
    nb.extend_from_slice(&hs);
    nb.extend_from_slice(&b[8 + n..]);
    std::fs::write(&file, nb).unwrap();
    let e = fails(t.path());
    assert!(
        e.contains(name)
            && e.contains("expected shape")
            && e.contains(&format!("[{}, {}]", r / 2, c * 2)),
        "{e}"
    );
}

#[test]
fn eval_error_bad_ids() {
    let dir = shared().join("fixtures/qwen3_moe");
    let o = mfx(&["eval", "greedy", dir.to_str().unwrap(), "--ids", "1,x,3"]);
    assert_eq!(o.status.code(), Some(2), "usage error");
    assert!(stderr(&o).contains("bad token id \"x\""), "{}", stderr(&o));
    let o = mfx(&["eval", "greedy", dir.to_str().unwrap(), "--ids", "1,99999"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("token id 99999 is out of range (vocab size 512)"),
        "{}",
        stderr(&o)
    );
}
