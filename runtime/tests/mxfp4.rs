//! The hub's MXFP4 experts read through `weights::mxfp4`, checked against an
//! outside reference: `tests/data/gpt_oss_mxfp4_dequant.json` holds, for
//! every `*_blocks`/`*_scales` pair of `../shared/fixtures/gpt_oss_mxfp4`,
//! the sha256 of transformers' dequantization (`convert_moe_packed_tensors`,
//! re-implemented in numpy by `scripts/mxfp4_reference.py`, float32
//! `[experts, in, out]`). mfx's reader + scalar reference must reproduce
//! every bit of it.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use mfx_runtime::kernels::{self, MatRef};
use mfx_runtime::weights::safetensors::SafetensorsSource;
use mfx_runtime::weights::{mxfp4, Matrix};
use mfx_runtime::RuntimeError;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/gpt_oss_mxfp4"
    ))
    .to_path_buf()
}

fn expected() -> serde_json::Value {
    let p = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/gpt_oss_mxfp4_dequant.json"
    ));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn fixture_dequantization_equals_transformers_bit_for_bit() {
    let src = SafetensorsSource::open(&fixture()).unwrap();
    let want = expected();
    let tensors = want["tensors"].as_object().unwrap();
    // 4 layers x (gate_up_proj, down_proj).
    assert_eq!(tensors.len(), 8);
    for (prefix, t) in tensors {
        assert!(mxfp4::has_pair(&src, prefix), "{prefix}");
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        // transformers' layout is [experts, in, out]; mfx's matrices are [out, in].
        let (experts, cols, rows) = (shape[0], shape[1], shape[2]);
        let mut flat = vec![0f32; experts * cols * rows];
        for e in 0..experts {
            let m = mxfp4::expert(&src, prefix, e, experts, rows, cols).unwrap();
            assert!(
                matches!(m, Matrix::Mxfp4 { .. }),
                "{prefix}: zero-copy mxfp4"
            );
            let d = m.dequantize();
            assert_eq!(
                d,
                mxfp4::expert_f32(&src, prefix, e, experts, rows, cols).unwrap()
            );
            for r in 0..rows {
                for c in 0..cols {
                    flat[(e * cols + c) * rows + r] = d[r * cols + c];
                }
            }
        }
        let bytes: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
        let got = format!("{:x}", Sha256::digest(&bytes));
        let abs_sum: f64 = flat.iter().map(|v| v.abs() as f64).sum();
        assert_eq!(
            got,
            t["sha256"].as_str().unwrap(),
            "{prefix}: abs sum {abs_sum} vs reference {}",
            t["abs_sum"]
        );
    }
}

/// Every kernel tier on a real hub expert, against a float64 product of
/// its reference dequantization.
#[test]
fn fixture_experts_through_every_tier() {
    let src = SafetensorsSource::open(&fixture()).unwrap();
    let prefix = "model.layers.1.mlp.experts.gate_up_proj";
    let (rows, cols) = (64, 64);
    let x: Vec<f32> = (0..3 * cols)
        .map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0)
        .collect();
    for e in [0usize, 15] {
        let m = mxfp4::expert(&src, prefix, e, 16, rows, cols).unwrap();
        let w = m.dequantize();
        for tier in kernels::available() {
            let mut y = vec![f32::NAN; 3 * rows];
            tier.matmul(&m.mat(), &x, 3, &mut y);
            for i in 0..3 {
                for r in 0..rows {
                    let (mut s, mut mag) = (0f64, 0f64);
                    for c in 0..cols {
                        let t = w[r * cols + c] as f64 * x[i * cols + c] as f64;
                        s += t;
                        mag += t.abs();
                    }
                    let err = (y[i * rows + r] as f64 - s).abs() / mag.max(1e-30);
                    // int8 activations (avx2) cost up to ~3e-3 of sum |w x|.
                    let budget = if tier.int8_activations() { 5e-3 } else { 1e-6 };
                    assert!(err <= budget, "{} e{e} n{i} r{r}: {err:e}", tier.name());
                }
            }
        }
        // gate = even rows, up = odd rows: copies of whole rows.
        let gate = m.gather_rows(&(0..rows).step_by(2).collect::<Vec<_>>());
        let g = gate.dequantize();
        for (k, r) in (0..rows).step_by(2).enumerate() {
            assert_eq!(&g[k * cols..(k + 1) * cols], &w[r * cols..(r + 1) * cols]);
        }
        assert!(matches!(gate.mat(), MatRef::Mxfp4(_)));
    }
}

#[test]
fn bad_requests_name_the_tensor() {
    let src = SafetensorsSource::open(&fixture()).unwrap();
    let p = "model.layers.0.mlp.experts.down_proj";
    // down_proj is [hidden 64, intermediate 32]: asking for [32, 64] is a shape error.
    let e = mxfp4::expert(&src, p, 0, 16, 32, 64).unwrap_err();
    assert!(
        matches!(&e, RuntimeError::Shape { name, .. } if name == &format!("{p}_blocks")),
        "{e}"
    );
    let e = mxfp4::expert(&src, p, 16, 16, 64, 32).unwrap_err();
    assert!(e.to_string().contains("expert 16 of 16"), "{e}");
    let e = mxfp4::expert(&src, p, 0, 8, 64, 32).unwrap_err();
    assert!(e.to_string().contains(&format!("{p}_blocks")), "{e}");
    let e = mxfp4::expert(&src, "model.layers.0.mlp.experts.nope", 0, 16, 64, 32).unwrap_err();
    assert!(matches!(e, RuntimeError::MissingTensor { .. }), "{e}");
    assert!(!mxfp4::has_pair(&src, "model.layers.0.mlp.router"));
}

/// A NaN scale (0xFF) or a non-U8 tensor is refused with the tensor's name.
#[test]
fn nan_scales_and_wrong_dtypes_are_refused() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let blocks = vec![0x21u8; 2 * 2 * 16];
    let scales = vec![127u8, 127, 127, 255];
    let f32s = vec![0u8; 2 * 2 * 4];
    let views = vec![
        (
            "a_blocks",
            TensorView::new(Dtype::U8, vec![2, 2, 1, 16], &blocks).unwrap(),
        ),
        (
            "a_scales",
            TensorView::new(Dtype::U8, vec![2, 2, 1], &scales).unwrap(),
        ),
        (
            "b_blocks",
            TensorView::new(Dtype::U8, vec![2, 2, 1, 16], &blocks).unwrap(),
        ),
        (
            "b_scales",
            TensorView::new(Dtype::F32, vec![2, 2, 1], &f32s).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let src = SafetensorsSource::open(dir.path()).unwrap();
    // Expert 0 is fine: 0x21 = codes 1 (0.5) and 2 (1.0) at scale 1.
    let m = mxfp4::expert(&src, "a", 0, 2, 2, 32).unwrap();
    assert_eq!(&m.dequantize()[..4], &[0.5, 1.0, 0.5, 1.0]);
    let e = mxfp4::expert(&src, "a", 1, 2, 2, 32).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("a_scales[1]") && msg.contains("NaN"), "{msg}");
    let e = mxfp4::expert(&src, "b", 0, 2, 2, 32).unwrap_err();
    assert!(
        matches!(&e, RuntimeError::Dtype { name, .. } if name == "b_scales"),
        "{e}"
    );
}
