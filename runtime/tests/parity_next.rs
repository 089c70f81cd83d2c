//! Parity with transformers for the families with their own model types
//! (glm4_moe, deepseek_v3, qwen3_next, qwen3_5_moe in its text and hub
//! layouts, minimax_m2): logits within 1e-3 relative L2 error of the
//! float32 reference in `../shared/fixtures/<fixture>` and identical greedy
//! tokens. References were made by transformers 5.17 / 5.25, not by mfx.

use mfx_runtime::kernels;
use mfx_runtime::models::{LoadOptions, Model};
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

/// Logits of the prompt fed at once vs its first half then one token at a
/// time: the cached/recurrent state must give the same numbers.
fn split_matches_whole(m: &mut dyn Model, prompt: &[u32], tol: f64) {
    m.reset();
    let whole = m.forward(prompt, true).unwrap();
    m.reset();
    let half = prompt.len() / 2;
    let mut got = m.forward(&prompt[..half], true).unwrap();
    for &t in &prompt[half..] {
        got.extend(m.forward(&[t], true).unwrap());
    }
    let e = rel_err(&got, &whole);
    eprintln!("split vs whole: rel err {e:.3e}");
    assert!(e < tol, "split prompt differs from whole prompt: {e:.3e}");
}

fn fixture(name: &str) -> Box<dyn Model> {
    fixture_of(name, name)
}

/// [`fixture`] for a fixture folder `name` of family `arch`.
fn fixture_of(name: &str, arch: &str) -> Box<dyn Model> {
    let dir = shared().join("fixtures").join(name);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let prompt = ids(&r["input_ids"]);
    let (shape, want) = read_npy(&dir.join("reference_logits.npy"));
    let mut m = mfx_runtime::load::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(m.info().arch, arch);
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
    m
}

#[test]
fn parity_next_glm4_moe() {
    let mut m = fixture("glm4_moe");
    // Cached keys/values are stored as f16, so a split prompt reads rounded
    // keys where the whole prompt used f32 ones: close, not bit-equal.
    let dir = shared().join("fixtures/glm4_moe");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    split_matches_whole(m.as_mut(), &ids(&r["input_ids"]), 1e-3);
}

#[test]
fn parity_next_deepseek_v3() {
    let mut m = fixture("deepseek_v3");
    let dir = shared().join("fixtures/deepseek_v3");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    split_matches_whole(m.as_mut(), &ids(&r["input_ids"]), 1e-3);
}

#[test]
fn parity_next_qwen3_next() {
    let mut m = fixture("qwen3_next");
    let dir = shared().join("fixtures/qwen3_next");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    // Recurrent, conv and f32 attention state: a split prompt matches one pass.
    split_matches_whole(m.as_mut(), &ids(&r["input_ids"]), 1e-4);
    assert!(!m.truncate(3), "recurrent state cannot be truncated");
}

/// The fixture's prompt ids.
fn prompt(name: &str) -> Vec<u32> {
    let dir = shared().join("fixtures").join(name);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    ids(&r["input_ids"])
}

/// Qwen3.5 MoE as transformers re-saves its text model (per-expert keys).
#[test]
fn parity_next_qwen3_5_moe() {
    let mut m = fixture_of("qwen3_5_moe", "qwen3_5_moe");
    // Recurrent, conv and f32 attention state: a split prompt matches one pass.
    split_matches_whole(m.as_mut(), &prompt("qwen3_5_moe"), 1e-4);
    assert!(!m.truncate(3), "recurrent state cannot be truncated");
}

/// Qwen3.5 MoE in the hub's layout: multimodal config with `text_config`,
/// tensors under `model.language_model.`, fused experts, F32 tensors, a
/// vision tower and an MTP head that are not loaded.
#[test]
fn parity_next_qwen3_5_moe_hub() {
    let mut m = fixture_of("qwen3_5_moe_hub", "qwen3_5_moe");
    split_matches_whole(m.as_mut(), &prompt("qwen3_5_moe_hub"), 1e-4);
}

#[test]
fn parity_next_minimax_m2() {
    let mut m = fixture("minimax_m2");
    // f16 KV cache: a split prompt reads rounded keys (see glm4_moe).
    split_matches_whole(m.as_mut(), &prompt("minimax_m2"), 1e-3);
}
