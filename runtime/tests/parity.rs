//! Parity with transformers: logits within 1e-3 relative L2 error of the
//! float32 reference and identical greedy tokens, for every family fixture
//! and the trained tiny model. The references in `../shared` were made by
//! transformers 5.17, not by mfx.
//!
//! CI runs this binary twice (scripts/test.sh): with the best kernel tier
//! for the CPU, and again with `MFX_KERNELS=scalar` (the filter `parity`
//! matches every test here), so both paths are held to the same numbers.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns: a panic is the failure report

use mfx_runtime::kernels;
use mfx_runtime::models::{KvBits, LoadOptions, Model, MoeModel, RouterObserver};
use std::path::{Path, PathBuf};

fn shared() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")).to_path_buf()
}

/// A float32 C-order `.npy`: (shape, data).
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..6], b"\x93NUMPY", "{}", path.display());
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        _ => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
    };
    let header = std::str::from_utf8(&b[start..start + hlen]).unwrap();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape_s = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_s
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data: Vec<f32> = b[start + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    (shape, data)
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
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

fn greedy(m: &mut dyn Model, prompt: &[u32], n: usize) -> Vec<u32> {
    m.reset();
    let mut logits = m.forward(prompt, false).unwrap();
    let mut out = vec![];
    while out.len() < n {
        let t = argmax(&logits);
        out.push(t);
        if out.len() < n {
            logits = m.forward(&[t], false).unwrap();
        }
    }
    out
}

fn fixture(name: &str) {
    let dir = shared().join("fixtures").join(name);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let prompt = ids(&r["input_ids"]);
    let (shape, want) = read_npy(&dir.join("reference_logits.npy"));
    let mut m = mfx_runtime::load::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(m.info().arch, name);
    let got = m.forward(&prompt, true).unwrap();
    assert_eq!(got.len(), shape[0] * shape[1]);
    let e = rel_err(&got, &want);
    eprintln!(
        "{name} [{:?}]: logits rel err {e:.3e}",
        kernels::backend().tier()
    );
    assert!(e < 1e-3, "{name}: logits relative error {e:.3e} >= 1e-3");
    let g = greedy(m.as_mut(), &prompt, 16);
    assert_eq!(g, ids(&r["greedy_16"]), "{name}: greedy tokens differ");
}

#[test]
fn parity_fixture_qwen3_moe() {
    fixture("qwen3_moe");
}

#[test]
fn parity_fixture_qwen2_moe() {
    fixture("qwen2_moe");
}

#[test]
fn parity_fixture_mixtral() {
    fixture("mixtral");
}

#[test]
fn parity_fixture_olmoe() {
    fixture("olmoe");
}

/// Records router logits `[layer][token][expert]`.
struct RouterLog {
    layers: Vec<Vec<Vec<f32>>>,
}

impl RouterObserver for RouterLog {
    fn observe(
        &mut self,
        layer: usize,
        token: usize,
        logits: &[f32],
        probs: &[f32],
        selected: &[usize],
        weights: &[f32],
    ) {
        assert_eq!(self.layers[layer].len(), token);
        self.layers[layer].push(logits.to_vec());
        // Selected experts are the top-k of probs, in descending order.
        for w in selected.windows(2) {
            assert!(probs[w[0]] >= probs[w[1]]);
        }
        assert!(
            (weights.iter().sum::<f32>() - 1.0).abs() < 1e-5,
            "norm_topk_prob is set in this model"
        );
    }
}

fn tiny_model_dir() -> PathBuf {
    shared().join("models/tiny-qwen3-moe-coder")
}

#[test]
fn parity_tiny_qwen3_moe_coder_prompts() {
    let dir = tiny_model_dir();
    let refdir = dir.join("reference");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refdir.join("reference.json")).unwrap())
            .unwrap();
    let mut m = MoeModel::load(&dir, &LoadOptions::default()).unwrap();
    let n_layers = m.info().n_layers;
    for (name, p) in r["prompts"].as_object().unwrap() {
        let prompt = ids(&p["ids"]);
        let (shape, want) = read_npy(&refdir.join(format!("{name}.logits.npy")));
        assert_eq!(shape, [prompt.len(), 8192]);
        m.reset();
        let mut log = RouterLog {
            layers: vec![vec![]; n_layers],
        };
        let got = m.forward_observed(&prompt, true, Some(&mut log)).unwrap();
        let e = rel_err(&got, &want);
        let (rshape, rwant) = read_npy(&refdir.join(format!("{name}.router_logits.npy")));
        assert_eq!(rshape, [n_layers, prompt.len(), 64]);
        let rgot: Vec<f32> = log.layers.concat().concat();
        let re = rel_err(&rgot, &rwant);
        eprintln!(
            "tiny/{name} [{:?}]: logits rel err {e:.3e}, router logits rel err {re:.3e}",
            kernels::backend().tier()
        );
        assert!(e < 1e-3, "{name}: logits relative error {e:.3e}");
        assert!(re < 1e-3, "{name}: router logits relative error {re:.3e}");
        let g = greedy(&mut m, &prompt, 48);
        assert_eq!(g, ids(&p["greedy_48"]), "{name}: greedy tokens differ");
    }
}

/// The int8 KV cache is lossy but must stay close: logits of a continuation
/// computed through the q8 cache against one full f32 forward pass.
#[test]
fn parity_kv_q8_close_to_f32() {
    let dir = tiny_model_dir();
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference/reference.json")).unwrap(),
    )
    .unwrap();
    let p = &r["prompts"]["c"];
    let (prompt, cont) = (ids(&p["ids"]), ids(&p["greedy_48"]));
    let mut full = mfx_runtime::load::load(&dir, &LoadOptions::default()).unwrap();
    let all: Vec<u32> = prompt.iter().chain(&cont[..16]).copied().collect();
    let want = full.forward(&all, true).unwrap();
    let want_tail = &want[(all.len() - 16) * 8192..];
    for (bits, tol) in [(KvBits::F16, 2e-3), (KvBits::Q8, 3e-2)] {
        let mut m = mfx_runtime::load::load(
            &dir,
            &LoadOptions {
                kv_bits: bits,
                ..Default::default()
            },
        )
        .unwrap();
        m.forward(&prompt, false).unwrap();
        let mut got = vec![];
        for &t in &cont[..16] {
            got.extend(m.forward(&[t], false).unwrap());
        }
        let e = rel_err(&got, want_tail);
        eprintln!("kv {bits:?}: decode logits rel err vs f32 one-pass {e:.3e}");
        assert!(e < tol, "{bits:?}: {e:.3e}");
        // Truncate and replay gives the same logits as the first time.
        assert!(m.truncate(prompt.len() + 8));
        let again = m.forward(&cont[8..16], true).unwrap();
        let e2 = rel_err(&again[7 * 8192..], &got[15 * 8192..]);
        assert!(e2 < tol, "{bits:?} after truncate: {e2:.3e}");
    }
}
