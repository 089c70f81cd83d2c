//! `mfx prep --merge` on a checkpoint that really has near-duplicate
//! experts.
//!
//! The trained tiny model has no pair of experts closer than cosine ~0.28,
//! so on it `--merge` correctly merges nothing and the merged-expert path
//! (clustering, frequency-weighted mean, `merged_into` in the pack, the
//! runtime mapping router ids onto the representative) would never run. This
//! test plants duplicates: in a copy of the shared tiny model, expert `2k+1`
//! of every layer becomes a copy of expert `2k` for k < 4 (24 planted pairs).
//! A correct merge finds exactly those, saves their parameters, and, because
//! each merged expert equals both of its members, changes the pack's NLL by
//! no more than the bf16/quantization rounding of a weighted mean of equal
//! vectors. A wrong router-id mapping would route tokens to an unrelated
//! expert and move the NLL far more than that.

use crate::common::{mfx, ok, shared};

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::Path;

const PLANTED_PER_LAYER: usize = 4;
const LAYERS: usize = 6;
const HIDDEN: usize = 256;
const EXPERT_WIDTH: usize = 64;

/// Whether `name` is a projection of a planted duplicate (expert 2k+1, k < 4),
/// and if so the name of the tensor it copies.
fn planted_source(name: &str) -> Option<String> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    let (expert, proj) = rest.split_once('.')?;
    let e: usize = expert.parse().ok()?;
    (e % 2 == 1 && e < 2 * PLANTED_PER_LAYER)
        .then(|| format!("model.layers.{layer}.mlp.experts.{}.{proj}", e - 1))
}

/// Copies the shared tiny model into `dst` with the planted duplicates.
fn doctored_checkpoint(dst: &Path) {
    let src = shared().join("models/tiny-qwen3-moe-coder");
    let mut shards = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            continue; // reference/
        }
        if name.ends_with(".safetensors") {
            shards.push((name, std::fs::read(&p).unwrap()));
        } else {
            std::fs::copy(&p, dst.join(&name)).unwrap();
        }
    }
    // Every tensor's bytes by name, across shards (a pair may straddle two).
    let parsed: Vec<(String, SafeTensors)> = shards
        .iter()
        .map(|(n, b)| (n.clone(), SafeTensors::deserialize(b).unwrap()))
        .collect();
    let mut all: HashMap<String, Vec<u8>> = HashMap::new();
    for (_, st) in &parsed {
        for (name, t) in st.tensors() {
            all.insert(name, t.data().to_vec());
        }
    }
    let mut replaced = 0;
    for ((file, bytes), (_, st)) in shards.iter().zip(&parsed) {
        let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
        let mut out: Vec<(String, TensorView)> = Vec::new();
        for (name, t) in st.tensors() {
            let data: &[u8] = match planted_source(&name) {
                Some(from) => {
                    replaced += 1;
                    &all[&from]
                }
                None => t.data(),
            };
            out.push((
                name,
                TensorView::new(t.dtype(), t.shape().to_vec(), data).unwrap(),
            ));
        }
        let buf = safetensors::serialize(out, meta.metadata().clone()).unwrap();
        std::fs::write(dst.join(file), buf).unwrap();
    }
    assert_eq!(replaced, LAYERS * PLANTED_PER_LAYER * 3, "planted tensors");
}

fn nll(pack: &Path) -> f64 {
    let data = shared().join("data/python.val.txt");
    let out = ok(&mfx(&[
        "eval",
        "ppl",
        pack.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--rows",
        "4",
        "--ctx",
        "256",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nll"].as_f64().unwrap()
}

#[test]
fn merge_finds_planted_duplicates_and_the_pack_routes_onto_them() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    doctored_checkpoint(&ck);
    let calib = shared().join("data/python.val.txt");
    let common = |out: &Path| -> Vec<String> {
        [
            ck.to_str().unwrap(),
            "--ram",
            "1G",
            "--hot-fraction",
            "1",
            "--calib",
            calib.to_str().unwrap(),
            "--calib-rows",
            "2",
            "--calib-seq",
            "128",
            "-q",
            "--no-card",
            "-o",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let plain = d.path().join("plain.mfx");
    let merged = d.path().join("merged.mfx");
    let report = d.path().join("merged.json");
    let mut args = vec!["prep".to_string()];
    args.extend(common(&plain));
    ok(&mfx(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    let mut args = vec!["prep".to_string()];
    args.extend(common(&merged));
    args.extend([
        "--merge".into(),
        "--report".into(),
        report.display().to_string(),
    ]);
    ok(&mfx(&args.iter().map(String::as_str).collect::<Vec<_>>()));

    // The report: exactly the planted pairs merged, their parameters saved.
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let m = &r["merge"];
    let planted = LAYERS * PLANTED_PER_LAYER;
    assert_eq!(m["applied"], true, "merge report: {m}");
    assert_eq!(m["experts_before"], 64 * LAYERS as u64, "{m}");
    assert_eq!(
        m["experts_after"].as_u64().unwrap() as usize,
        64 * LAYERS - planted,
        "{m}"
    );
    assert_eq!(
        m["params_saved"].as_u64().unwrap() as usize,
        planted * 3 * HIDDEN * EXPERT_WIDTH,
        "{m}"
    );
    assert!(m["nll_change"].as_f64().unwrap().abs() < 1e-3, "{m}");

    // The pack: merged entries share their representative's blob, checksums hold.
    let inspect = ok(&mfx(&["inspect", "--json", merged.to_str().unwrap()]));
    let i: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(i["experts"]["merged"].as_u64().unwrap() as usize, planted);
    assert_eq!(
        i["experts"]["blobs"].as_u64().unwrap() as usize,
        64 * LAYERS - planted
    );
    ok(&mfx(&["verify", merged.to_str().unwrap()]));
    let (pl, ml) = (
        std::fs::metadata(&plain).unwrap().len(),
        std::fs::metadata(&merged).unwrap().len(),
    );
    assert!(ml < pl, "merged pack {ml} bytes is not smaller than {pl}");

    // The runtime maps router ids onto the merged experts: same NLL as the
    // unmerged pack up to rounding (a wrong mapping moves it by far more).
    let (np, nm) = (nll(&plain), nll(&merged));
    eprintln!("merge report: {m}\npack bytes: plain {pl}, merged {ml}\nNLL (python, 4x256): plain {np}, merged {nm}");
    assert!(
        ((nm - np) / np).abs() < 2e-3,
        "NLL plain {np} vs merged {nm}"
    );
}
