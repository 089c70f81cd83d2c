//! GPU kernels against the scalar reference (formats' dequantizer), on
//! whatever Vulkan/Metal adapter is present: lavapipe (CPU Vulkan) on CI-like
//! machines, the real GPU elsewhere. No adapter is a failure, not a skip: a
//! parity suite that silently runs nothing would pass off an untested path.

use mfx_formats::quant::{quantize, AffineMatrix};
use mfx_gpu::{random_q4, reference_rows, Checks, Gpu, GpuError, Matvec};
use rand::{Rng, SeedableRng};
use std::sync::OnceLock;

fn gpu() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| {
        let g = Gpu::new(Checks::Checked)
            .unwrap_or_else(|e| panic!("GPU parity suite needs an adapter: {e}"));
        eprintln!(
            "adapter: {} ({:?}, driver {} {})",
            g.info.name, g.info.backend, g.info.driver, g.info.driver_info
        );
        g
    })
}

fn xs(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// ||out - ref|| / ||ref|| over matching entries; NaN (an unwritten poisoned
/// output) makes it NaN, which fails every `<` check.
fn rel_err(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let num: f64 = out
        .iter()
        .zip(reference)
        .map(|(&o, &r)| (o as f64 - r).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|r| r * r).sum();
    (num / den).sqrt()
}

#[test]
fn matvec_matches_reference() {
    let g = gpu();
    // Rows not a multiple of the 8-row workgroup, a single group per row,
    // chunk counts below, at and above the 32 lanes of a row.
    for (i, &(rows, cols)) in [
        (1, 64),
        (13, 128),
        (64, 768),
        (77, 2048),
        (200, 4096),
        (35, 2048),
    ]
    .iter()
    .enumerate()
    {
        let (packed, scales, biases) = random_q4(rows, cols, 100 + i as u64);
        let m = AffineMatrix::new(rows, cols, 4, 64, &packed, &scales, &biases).unwrap();
        let x = xs(cols, 7 + i as u64);
        let dm = g.upload(&m).unwrap();
        let all: Vec<usize> = (0..rows).collect();
        let reference = reference_rows(&m, &x, &all);
        for kind in [Matvec::R1, Matvec::R4] {
            let y = g.matvec(kind, &dm, &x).unwrap();
            let e = rel_err(&y, &reference);
            assert!(e < 1e-5, "{kind:?} {rows}x{cols}: relative error {e}");
        }
    }
}

#[test]
fn matvec_matches_reference_on_quantized_weights() {
    // Codes from mfx's own quantizer rather than random bytes.
    let g = gpu();
    let (rows, cols) = (96, 512);
    let w = xs(rows * cols, 3)
        .iter()
        .map(|v| v * 0.05)
        .collect::<Vec<_>>();
    let q = quantize(&w, rows, cols, 4, 64).unwrap();
    let m = q.view();
    let x = xs(cols, 4);
    let y = g.matvec(Matvec::R4, &g.upload(&m).unwrap(), &x).unwrap();
    let all: Vec<usize> = (0..rows).collect();
    let e = rel_err(&y, &reference_rows(&m, &x, &all));
    assert!(e < 1e-5, "relative error {e}");
}

#[test]
fn gemm_matches_reference() {
    let g = gpu();
    // Token counts and rows off the 64 tile, and one full tile.
    for (i, &(n, rows, cols)) in [(1, 64, 64), (5, 200, 192), (70, 128, 768), (64, 64, 256)]
        .iter()
        .enumerate()
    {
        let (packed, scales, biases) = random_q4(rows, cols, 200 + i as u64);
        let m = AffineMatrix::new(rows, cols, 4, 64, &packed, &scales, &biases).unwrap();
        let x = xs(n * cols, 30 + i as u64);
        let y = g.gemm(&g.upload(&m).unwrap(), &x, n).unwrap();
        let all: Vec<usize> = (0..rows).collect();
        let mut reference = Vec::with_capacity(n * rows);
        for t in 0..n {
            reference.extend(reference_rows(&m, &x[t * cols..(t + 1) * cols], &all));
        }
        let e = rel_err(&y, &reference);
        assert!(e < 1e-5, "n={n} {rows}x{cols}: relative error {e}");
    }
}

#[test]
fn unchecked_shaders_agree_with_checked() {
    // The benchmark's fast variant (no naga bounds clamps) computes the same.
    let g = Gpu::new(Checks::Unchecked).unwrap();
    let (rows, cols) = (40, 1024);
    let (packed, scales, biases) = random_q4(rows, cols, 9);
    let m = AffineMatrix::new(rows, cols, 4, 64, &packed, &scales, &biases).unwrap();
    let x = xs(3 * cols, 10);
    let dm = g.upload(&m).unwrap();
    let all: Vec<usize> = (0..rows).collect();
    for kind in [Matvec::R1, Matvec::R4] {
        let y = g.matvec(kind, &dm, &x[..cols]).unwrap();
        let e = rel_err(&y, &reference_rows(&m, &x[..cols], &all));
        assert!(e < 1e-5, "{kind:?} relative error {e}");
    }
    let y = g.gemm(&dm, &x, 3).unwrap();
    let mut reference = Vec::new();
    for t in 0..3 {
        reference.extend(reference_rows(&m, &x[t * cols..(t + 1) * cols], &all));
    }
    let e = rel_err(&y, &reference);
    assert!(e < 1e-5, "gemm relative error {e}");
}

#[test]
fn other_layouts_and_bad_inputs_are_refused() {
    let g = gpu();
    let q8 = quantize(&xs(64 * 2, 1), 2, 64, 8, 64).unwrap();
    match g.upload(&q8.view()) {
        Err(GpuError::Layout {
            bits: 8,
            group_size: 64,
        }) => {}
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("q8 accepted by the q4 kernel"),
    }
    let (packed, scales, biases) = random_q4(8, 128, 1);
    let m = AffineMatrix::new(8, 128, 4, 64, &packed, &scales, &biases).unwrap();
    let dm = g.upload(&m).unwrap();
    let err = g.matvec(Matvec::R4, &dm, &[0.5; 64]).unwrap_err();
    assert!(err.to_string().contains("128"), "{err}");
}
