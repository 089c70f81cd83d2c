//! Layout compatibility with MLX, checked against things MLX made, never
//! against our own quantizer:
//! - tensors of the shared `mlx_lm convert` 4-bit model (and its 8-bit
//!   router) dequantized by our scalar reference must land within half a
//!   quantization step of the bf16 original model's weights;
//! - 3- and 6-bit packing must agree with MLX's `extract_bits` (mlx/backend/
//!   cpu/quantized.cpp), transcribed below mask for mask.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;

use half::bf16;
use mfx_formats::quant::{get_bits, put_bits, quantize, AffineMatrix};
use safetensors::SafeTensors;

const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/models");

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn bf16s(b: &[u8]) -> Vec<bf16> {
    b.chunks_exact(2)
        .map(|c| bf16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// The bf16 original of `name` from the sharded checkpoint, as f32.
fn original(name: &str) -> (Vec<usize>, Vec<f32>) {
    let dir = Path::new(SHARED).join("tiny-qwen3-moe-coder");
    let index: serde_json::Value =
        serde_json::from_slice(&read(&dir.join("model.safetensors.index.json"))).unwrap();
    let shard = index["weight_map"][name].as_str().unwrap();
    let bytes = read(&dir.join(shard));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::BF16);
    (
        t.shape().to_vec(),
        bf16s(t.data()).iter().map(|v| v.to_f32()).collect(),
    )
}

struct Stats {
    max_steps: f32,
    n: usize,
}

/// Dequantizes `prefix`.{weight,scales,biases} of the MLX model with our
/// reference and compares row-block `rows` with `want` (row-major f32).
fn check_against_original(
    st: &SafeTensors,
    prefix: &str,
    bits: u8,
    group: usize,
    row_range: std::ops::Range<usize>,
    want: &[f32],
) -> Stats {
    let w = st.tensor(&format!("{prefix}.weight")).unwrap();
    let s = st.tensor(&format!("{prefix}.scales")).unwrap();
    let b = st.tensor(&format!("{prefix}.biases")).unwrap();
    assert_eq!(w.dtype(), safetensors::Dtype::U32);
    let wshape = w.shape();
    let cols = wshape[wshape.len() - 1] * 32 / bits as usize;
    let rows: usize = wshape[..wshape.len() - 1].iter().product();
    let (scales, biases) = (bf16s(s.data()), bf16s(b.data()));
    // The uint32 words, little-endian, are exactly our bit stream: no repacking.
    let m = AffineMatrix::new(rows, cols, bits, group, w.data(), &scales, &biases).unwrap();
    let mut row = vec![0f32; cols];
    let mut max_steps = 0f32;
    let mut n = 0;
    let mut clipped = 0;
    for (i, r) in row_range.enumerate() {
        m.dequantize_row(r, &mut row);
        for c in 0..cols {
            let g = r * (cols / group) + c / group;
            let step = scales[g].to_f32().abs();
            // MLX snaps the scale so that 0.0 is exactly representable, which
            // can shrink the grid's span below [min, max]; values past its
            // ends are clipped to the end codes. So the claim is: our decode
            // is within half a step of the original clamped to the grid.
            let (e0, e1) = (
                biases[g].to_f32(),
                biases[g].to_f32() + scales[g].to_f32() * ((1u32 << bits) - 1) as f32,
            );
            let (lo, hi) = (e0.min(e1), e0.max(e1));
            let orig = want[i * cols + c];
            if orig < lo || orig > hi {
                clipped += 1;
            }
            let err = (row[c] - orig.clamp(lo, hi)).abs();
            // scale and bias were rounded to bf16 after MLX chose the codes, so
            // allow their rounding (2^-8 relative, times the largest code) on top of half a step.
            let slack = (step * ((1u32 << bits) - 1) as f32 + biases[g].to_f32().abs())
                * 2f32.powi(-8)
                + 1e-7;
            assert!(
                err <= 0.5 * step + slack,
                "{prefix} row {r} col {c}: ours {} vs original {orig} clamped to [{lo}, {hi}] (err {err}, half step {})",
                row[c],
                0.5 * step
            );
            max_steps = max_steps.max(err / step.max(f32::MIN_POSITIVE));
            n += 1;
        }
    }
    eprintln!("{prefix}: {n} elements, max error {max_steps:.4} steps, {clipped} clipped by MLX's zero-snapped grid");
    Stats { max_steps, n }
}

#[test]
fn mlx_4bit_and_8bit_tensors_dequantize_to_the_bf16_original() {
    let bytes = read(&Path::new(SHARED).join("tiny-qwen3-moe-coder-mlx-4bit/model.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();

    // Attention q_proj: 4 bits, group 64.
    let (shape, want) = original("model.layers.0.self_attn.q_proj.weight");
    let s = check_against_original(
        &st,
        "model.layers.0.self_attn.q_proj",
        4,
        64,
        0..shape[0],
        &want,
    );
    assert_eq!(s.n, 256 * 256);
    // Mostly exactly within half a step; the bf16 slack is only ever a hair.
    assert!(s.max_steps < 0.56, "max error {} steps", s.max_steps);

    // Router: MLX keeps it at 8 bits.
    let (shape, want) = original("model.layers.0.mlp.gate.weight");
    let s = check_against_original(&st, "model.layers.0.mlp.gate", 8, 64, 0..shape[0], &want);
    assert_eq!(s.n, 64 * 256);

    // A stacked expert tensor [experts, out, in]: rows = experts * out, so
    // expert 5's gate_proj is rows 5*64..6*64.
    let (shape, want) = original("model.layers.0.mlp.experts.5.gate_proj.weight");
    assert_eq!(shape, vec![64, 256]);
    check_against_original(
        &st,
        "model.layers.0.mlp.switch_mlp.gate_proj",
        4,
        64,
        5 * 64..6 * 64,
        &want,
    );
    let (_, want) = original("model.layers.3.mlp.experts.0.down_proj.weight");
    check_against_original(
        &st,
        "model.layers.3.mlp.switch_mlp.down_proj",
        4,
        64,
        0..256,
        &want,
    );
}

/// MLX's 3-bit unpacking: 8 values from 3 bytes.
fn mlx_extract_3(w: &[u8]) -> [u32; 8] {
    let w: [u32; 3] = [w[0] as u32, w[1] as u32, w[2] as u32];
    [
        w[0] & 0x7,
        (w[0] & 0x38) >> 3,
        ((w[0] & 0xc0) >> 6) + ((w[1] & 0x1) << 2),
        (w[1] & 0xe) >> 1,
        (w[1] & 0x70) >> 4,
        ((w[1] & 0x80) >> 7) + ((w[2] & 0x3) << 1),
        (w[2] & 0x1c) >> 2,
        (w[2] & 0xe0) >> 5,
    ]
}

/// MLX's 6-bit unpacking: 4 values from 3 bytes.
fn mlx_extract_6(w: &[u8]) -> [u32; 4] {
    let w: [u32; 3] = [w[0] as u32, w[1] as u32, w[2] as u32];
    [
        w[0] & 0x3f,
        ((w[0] >> 6) & 0x03) + ((w[1] & 0x0f) << 2),
        ((w[1] >> 4) & 0x0f) + ((w[2] & 0x03) << 4),
        (w[2] >> 2) & 0x3f,
    ]
}

#[test]
fn three_and_six_bit_packing_matches_mlx_extract_bits() {
    let n = 96;
    for bits in [3u8, 6] {
        let codes: Vec<u32> = (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761u32) >> 7) & ((1 << bits) - 1))
            .collect();
        let mut stream = vec![0u8; n * bits as usize / 8];
        for (i, &q) in codes.iter().enumerate() {
            put_bits(&mut stream, i, bits, q);
        }
        let mlx: Vec<u32> = if bits == 3 {
            stream.chunks_exact(3).flat_map(mlx_extract_3).collect()
        } else {
            stream.chunks_exact(3).flat_map(mlx_extract_6).collect()
        };
        assert_eq!(mlx, codes, "{bits}-bit packing differs from MLX");
        for (i, &q) in codes.iter().enumerate() {
            assert_eq!(get_bits(&stream, i, bits), q);
        }
    }
    // And end to end: our quantizer's 3/6-bit output, unpacked the MLX way
    // and dequantized with MLX's formula, equals our reference dequantizer.
    let (rows, cols, group) = (4, 128, 32);
    let w = mfx_formats::testing::floats(rows * cols, 5);
    for bits in [3u8, 6] {
        let q = quantize(&w, rows, cols, bits, group).unwrap();
        let ours = q.view().dequantize();
        let per = if bits == 3 { 8 } else { 4 };
        let codes: Vec<u32> = q
            .packed
            .chunks_exact(3)
            .flat_map(|c| {
                if bits == 3 {
                    mlx_extract_3(c).to_vec()
                } else {
                    mlx_extract_6(c).to_vec()
                }
            })
            .collect();
        assert_eq!(codes.len(), rows * cols);
        assert_eq!(q.packed.len(), rows * cols / per * 3);
        for (i, &c) in codes.iter().enumerate() {
            let g = i / group;
            let mlx = q.scales[g].to_f32() * c as f32 + q.biases[g].to_f32();
            assert_eq!(mlx, ours[i], "{bits} bits element {i}");
        }
    }
}
