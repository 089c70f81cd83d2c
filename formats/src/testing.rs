//! Builders of small valid packs for tests across the workspace (runtime,
//! cache, CLI). Not part of the stable API.

use std::path::Path;

use half::bf16;

use crate::codec::Codec;
use crate::error::FormatError;
use crate::pack::{PackMeta, PackSummary, PackWriter, PartData};
use crate::quant::{quantize, Scheme};

/// Deterministic pseudo-random floats in [-1, 1) (splitmix64), so tests need no RNG crate.
pub fn floats(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Affine-quantized bytes of a `[rows, cols]` matrix: (packed, scales, biases).
/// The weights are heavy-tailed (uniform cubed) like trained weights, so the
/// codes cluster mid-range and the entropy coders have something to win.
pub fn affine_bytes(
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    seed: u64,
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let w: Vec<f32> = floats(rows * cols, seed)
        .into_iter()
        .map(|u| u * u * u)
        .collect();
    let q = quantize(&w, rows, cols, bits, group).expect("valid test shape");
    (
        q.packed,
        bytemuck::cast_slice(&q.scales).to_vec(),
        bytemuck::cast_slice(&q.biases).to_vec(),
    )
}

pub fn bf16_bytes(n: usize, seed: u64) -> Vec<u8> {
    let v: Vec<bf16> = floats(n, seed).into_iter().map(bf16::from_f32).collect();
    bytemuck::cast_slice(&v).to_vec()
}

pub fn tiny_meta() -> PackMeta {
    PackMeta {
        config: serde_json::json!({"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2, "num_experts": 4, "moe_intermediate_size": 32}),
        tokenizer_json: r#"{"version":"1.0","model":{"type":"BPE","vocab":{}}}"#.into(),
        chat_template: Some("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        generation: serde_json::json!({"temperature": 0.7, "top_p": 0.8}),
        pin_profile: Some(serde_json::json!({"pinned": [[0, 1], [1, 2]]})),
        routing_summary: Some(serde_json::json!({"tokens": 1000})),
        provenance: serde_json::json!({"source": "testing::write_tiny_pack"}),
    }
}

/// Writes a small valid pack: 2 layers x 4 experts (hidden 64, expert width
/// 32) with every codec, a 2-bit down_proj, one merged expert, and dense
/// tensors in bf16, f32, f16 and q4g32/q8g64. Alignment 4096 keeps it ~100 KiB.
pub fn write_tiny_pack(path: &Path) -> Result<PackSummary, FormatError> {
    let mut w = PackWriter::create(path, tiny_meta(), 4096)?;
    // Tensors go in ascending name order (the writer enforces it).
    let (p, s, b) = affine_bytes(128, 64, 8, 64, 9);
    w.add_tensor(
        "lm_head.weight",
        Scheme::affine(8, 64).expect("valid"),
        &[128, 64],
        &[&p, &s, &b],
    )?;
    let emb = bf16_bytes(128 * 64, 1);
    w.add_tensor(
        "model.embed_tokens.weight",
        Scheme::Bf16,
        &[128, 64],
        &[&emb],
    )?;
    let router: Vec<u8> = floats(4 * 64, 7)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    w.add_tensor(
        "model.layers.0.mlp.gate.weight",
        Scheme::F32,
        &[4, 64],
        &[&router],
    )?;
    for l in 0..2u64 {
        let (p, s, b) = affine_bytes(64, 64, 4, 32, 10 + l);
        w.add_tensor(
            &format!("model.layers.{l}.self_attn.q_proj.weight"),
            Scheme::affine(4, 32).expect("valid"),
            &[64, 64],
            &[&p, &s, &b],
        )?;
    }
    let norm: Vec<u8> = floats(64, 8)
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    w.add_tensor("model.norm.weight", Scheme::F16, &[64], &[&norm])?;

    let codecs = [Codec::None, Codec::Zstd, Codec::Huffman, Codec::None];
    for l in 0..2u32 {
        for e in 0..4u32 {
            if l == 1 && e == 3 {
                w.add_merged_expert(l, e, 0)?;
                continue;
            }
            let seed = 100 + (l * 4 + e) as u64 * 3;
            let g = affine_bytes(32, 64, 4, 64, seed);
            let u = affine_bytes(32, 64, 4, 64, seed + 1);
            let d = affine_bytes(64, 32, 2, 32, seed + 2);
            let q4 = Scheme::affine(4, 64).expect("valid");
            let parts = [
                PartData {
                    name: "gate_proj".into(),
                    scheme: q4,
                    shape: vec![32, 64],
                    bytes: vec![&g.0, &g.1, &g.2],
                },
                PartData {
                    name: "up_proj".into(),
                    scheme: q4,
                    shape: vec![32, 64],
                    bytes: vec![&u.0, &u.1, &u.2],
                },
                PartData {
                    name: "down_proj".into(),
                    scheme: Scheme::affine(2, 32).expect("valid"),
                    shape: vec![64, 32],
                    bytes: vec![&d.0, &d.1, &d.2],
                },
            ];
            w.add_expert(l, e, codecs[e as usize], &parts)?;
        }
    }
    w.finish()
}

/// Recomputes the header and manifest checksums of a (possibly mutated) pack
/// image so a fuzzer can get past them and exercise manifest validation.
pub fn fix_checksums(bytes: &mut [u8]) {
    use crate::pack::HEADER_LEN;
    if bytes.len() < HEADER_LEN {
        return;
    }
    let rd = |b: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let (mo, ml) = (rd(bytes, 48), rd(bytes, 56));
    if let Some(end) = mo.checked_add(ml) {
        if end <= bytes.len() as u64 {
            let c = xxhash_rust::xxh3::xxh3_64(&bytes[mo as usize..end as usize]);
            bytes[64..72].copy_from_slice(&c.to_le_bytes());
        }
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&bytes[..HEADER_LEN]);
    let c = crate::pack::header::header_checksum(&h);
    bytes[120..128].copy_from_slice(&c.to_le_bytes());
}

/// The smallest pack that still has every feature (each codec, a merged
/// expert, an affine and a raw tensor): ~25 KiB, a good fuzzing seed.
pub fn write_micro_pack(path: &Path) -> Result<PackSummary, FormatError> {
    let meta = PackMeta {
        tokenizer_json: "{}".into(),
        ..PackMeta::default()
    };
    let mut w = PackWriter::create(path, meta, 4096)?;
    let (p, s, b) = affine_bytes(2, 32, 3, 32, 1);
    w.add_tensor(
        "a",
        Scheme::affine(3, 32).expect("valid"),
        &[2, 32],
        &[&p, &s, &b],
    )?;
    let n = bf16_bytes(8, 2);
    w.add_tensor("b", Scheme::Bf16, &[8], &[&n])?;
    for (e, codec) in [Codec::Huffman, Codec::Zstd, Codec::None]
        .into_iter()
        .enumerate()
    {
        let g = affine_bytes(4, 64, 6, 64, 3 + e as u64);
        let parts = [
            PartData {
                name: "gate_proj".into(),
                scheme: Scheme::affine(6, 64).expect("valid"),
                shape: vec![4, 64],
                bytes: vec![&g.0, &g.1, &g.2],
            },
            PartData {
                name: "down_proj".into(),
                scheme: Scheme::Bf16,
                shape: vec![8],
                bytes: vec![&n],
            },
        ];
        w.add_expert(0, e as u32, codec, &parts)?;
    }
    w.add_merged_expert(0, 3, 1)?;
    w.finish()
}
