//! GPU kernels against the scalar reference (formats' dequantizer), on
//! whatever Vulkan/Metal adapter is present: lavapipe (CPU Vulkan) on CI-like
//! machines, the real GPU elsewhere. No adapter is a failure, not a skip: a
//! parity suite that silently runs nothing would pass off an untested path.

use mfx_formats::quant::{quantize, AffineMatrix};
use mfx_gpu::{
    dp4a_reference_rows, f16_reference_rows, quantize_x_host, random_q4, reference_rows, Checks,
    Gpu, GpuError, Int8X, Matvec,
};
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

/// The cooperative GEMM against the f64 reference: x and the weights enter
/// the tensor cores as f16 (unit roundoff 2^-11 = 4.9e-4 each), so a dot
/// product's relative error is about 1e-3 at most for these inputs (random
/// signs; measured on no device yet); 2e-2 leaves room for activations
/// whose dot products cancel more, and is the int8 kernels' bound. The
/// emulation bound (x and w rounded to f16 on the host, so only the f32
/// accumulation differs) is the tight one: it catches a fragment or
/// staging layout error that 2e-2 could hide.
const F16_TOL: f64 = 2e-2;
const F16_EMULATION_TOL: f64 = 1e-4;

#[test]
fn coop_gemm_matches_reference_and_emulation() {
    for checks in [Checks::Checked, Checks::Unchecked] {
        let g = Gpu::new(checks).unwrap();
        if !g.has_coop() {
            eprintln!(
                "coop gemm test skipped on {}: {}",
                g.info.name,
                g.coop_missing.as_deref().unwrap_or("?")
            );
            return;
        }
        // Edge tiles (tokens off 64, rows off 128, rows under 16), whole
        // tiles (straight coopStore to Y), several tiles, a long K, a whole
        // tile whose rows are not 16-byte aligned (staged, not stored).
        for (i, &(n, rows, cols)) in [
            (64, 130, 128),
            (1, 64, 64),
            (5, 200, 192),
            (70, 128, 768),
            (64, 128, 256),
            (128, 256, 512),
            (3, 8, 64),
            (130, 384, 2048),
        ]
        .iter()
        .enumerate()
        {
            let (packed, scales, biases) = random_q4(rows, cols, 300 + i as u64);
            let m = AffineMatrix::new(rows, cols, 4, 64, &packed, &scales, &biases).unwrap();
            let x = xs(n * cols, 40 + i as u64);
            let y = g.gemm_coop(&g.upload(&m).unwrap(), &x, n).unwrap().unwrap();
            let all: Vec<usize> = (0..rows).collect();
            let mut reference = Vec::with_capacity(n * rows);
            let mut emulated = Vec::with_capacity(n * rows);
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                reference.extend(reference_rows(&m, xt, &all));
                emulated.extend(f16_reference_rows(&m, xt, &all));
            }
            let e = rel_err(&y, &reference);
            let ee = rel_err(&y, &emulated);
            eprintln!("coop gemm {checks:?} n={n} {rows}x{cols}: rel err {e:.1e}, against f16 emulation {ee:.1e}");
            assert!(
                e < F16_TOL,
                "{checks:?} n={n} {rows}x{cols}: relative error {e}"
            );
            assert!(
                ee < F16_EMULATION_TOL,
                "{checks:?} n={n} {rows}x{cols}: against the f16 emulation {ee}"
            );
        }
    }
}

#[test]
fn coop_gemm_refuses_bad_input() {
    let g = gpu();
    let (packed, scales, biases) = random_q4(64, 64, 1);
    let m = AffineMatrix::new(64, 64, 4, 64, &packed, &scales, &biases).unwrap();
    let dm = g.upload(&m).unwrap();
    assert!(matches!(
        g.gemm_coop(&dm, &[0.0; 63], 1),
        Err(GpuError::Input { .. })
    ));
    if !g.has_coop() {
        assert!(g.gemm_coop(&dm, &[0.0; 64], 1).unwrap().is_none());
        assert!(g.coop_missing.is_some());
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
    let y = g.matvec(Matvec::Dp4a, &dm, &x[..cols]).unwrap();
    let q = quantized_like_host(&g, &x[..cols]);
    let e = rel_err(&y, &dp4a_reference_rows(&m, &q, &all));
    assert!(
        e < EMULATION_TOL,
        "Dp4a against its emulation: relative error {e}"
    );
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
    let err = g.matvec(Matvec::Dp4a, &dm, &[0.5; 64]).unwrap_err();
    assert!(err.to_string().contains("128"), "{err}");
    // int8 activations need whole blocks of 32, and a matching matrix.
    for cols in [0, 48] {
        match g.quantize_x(&vec![1.0; cols]) {
            Err(GpuError::Blocks { cols: c }) if c == cols => {}
            other => panic!("{cols} columns: {:?}", other.map(|_| ())),
        }
        assert!(quantize_x_host(&vec![1.0; cols]).is_err());
    }
    let q = g.quantized_x(64).unwrap();
    let y = g.f32_buffer(&[0.0; 8]);
    assert!(matches!(
        g.dp4a_job(&dm, &q, &y),
        Err(GpuError::Input {
            expected: 128,
            got: 64
        })
    ));
}

/// Relative L2 error allowed against the f64 reference for int8
/// activations. Rounding x to d * code leaves each element off by at most
/// d/2 = max|x|/254, spread evenly: RMS max|x|/(254 sqrt 3), i.e. 2.3e-3 of
/// max|x| and 3.9e-3 of the RMS of x uniform in [-1, 1]. y = W x carries
/// that relative error over (W mixes the errors as it mixes x; the bias
/// term uses the exact block sums, so it adds none): expected ~3e-3, as the
/// CUDA kernel measured (2.7e-3 .. 3.7e-3) and as measured here on many
/// rows (2e-3 .. 3e-3). A single row is noisier (7.4e-3 for the 1x64
/// case: one dot of 64 terms), hence 2e-2, the CUDA benchmark's bound.
/// Layout bugs are the emulation's job (errors of order 1 against 5e-6).
const INT8_TOL: f64 = 2e-2;

/// Against the host emulation of the same int8 arithmetic only f32
/// rounding differs (the shader's f32 lane sums and tree against f64 block
/// sums): the f32 kernels measure 1e-7 .. 1e-6 against f64.
const EMULATION_TOL: f64 = 5e-6;

/// A host value `t = x / d` whose rounding a device may decide either way:
/// WGSL (like Vulkan) allows 2.5 ulp in f32 division, so `1 / d` can differ
/// from the host's in the last bits and move `t` across a half by a few ulp
/// of 127. Exact halves (where round-half-even is what is tested) are not
/// near ties: they stay exact when d is a power of two.
fn near_tie(t: f32) -> bool {
    let f = t.abs().fract();
    f != 0.5 && (f - 0.5).abs() < 1e-4
}

/// The device's quantization of x, after checking it against
/// `quantize_x_host`: codes equal (a difference of one allowed only at a
/// near tie), d and the block sums equal to an ulp (bit-equal where the
/// device's division is correctly rounded, as on lavapipe). Returns the
/// device's, so that the mat-vec emulation runs on exactly its input.
fn quantized_like_host(g: &Gpu, x: &[f32]) -> Int8X {
    let dev = g.quantize_x(x).unwrap();
    let host = quantize_x_host(x).unwrap();
    if dev != host {
        eprintln!("quantize_x: device and host differ (within an ulp of d or at near ties)");
    }
    let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
    for (b, (&dd, &hd)) in dev.d.iter().zip(&host.d).enumerate() {
        assert!(
            ulps(dd, hd) <= 1,
            "block {b}: d {dd} on the device, {hd} on the host"
        );
        let scale: f32 = x[b * 32..(b + 1) * 32].iter().map(|v| v.abs()).sum();
        let (ds, hs) = (dev.sums[b], host.sums[b]);
        assert!(
            (ds - hs).abs() <= scale * 1e-6,
            "block {b}: sum {ds} on the device, {hs} on the host"
        );
    }
    for (i, (&dc, &hc)) in dev.codes.iter().zip(&host.codes).enumerate() {
        let d = host.d[i / 32];
        let t = if d > 0.0 { x[i] * (1.0 / d) } else { 0.0 };
        assert!(
            dc == hc || ((dc as i32 - hc as i32).abs() == 1 && near_tie(t)),
            "element {i} (x {}, x/d {t}): code {dc} on the device, {hc} on the host",
            x[i]
        );
    }
    dev
}

#[test]
fn quantize_x_matches_host() {
    let g = gpu();
    // Block counts below, at and off the 8 blocks of a workgroup.
    for (i, &cols) in [32, 256, 416, 4096].iter().enumerate() {
        let x = xs(cols, 50 + i as u64);
        let q = quantized_like_host(g, &x);
        assert!(
            q.codes.iter().any(|&c| c == 127 || c == -127),
            "the max maps to 127"
        );
    }
    // Hand-made blocks: exact ties (max 127, so d = 1 and x/d = x: 2.5 -> 2,
    // -3.5 -> -4, 0.5 -> 0), an all-zero block (d = 0: codes 0, sum 0),
    // a block of one sign and tiny values (d ~ 1e-30 / 127, subnormal-free).
    let mut x: Vec<f32> = (0..32).map(|i| i as f32 - 15.5).collect();
    x[31] = 127.0;
    x.extend([0.0f32; 32]);
    x.extend((0..32).map(|i| 1e-30 * (i + 1) as f32));
    let q = quantized_like_host(g, &x);
    assert_eq!(q.d[0], 1.0);
    assert_eq!(&q.codes[..4], &[-16, -14, -14, -12], "round half to even");
    assert_eq!(&q.codes[14..18], &[-2, 0, 0, 2], "round half to even");
    assert_eq!((q.d[1], q.sums[1]), (0.0, 0.0));
    assert!(q.codes[32..64].iter().all(|&c| c == 0));
    assert_eq!(q.codes[95], 127);
}

#[test]
fn dp4a_matvec_matches_reference_and_emulation() {
    let g = gpu();
    // As for the f32 mat-vecs: rows off the 8-row workgroup, one group per
    // row, chunk counts below, at and above the 32 lanes of a row.
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
        let (packed, scales, biases) = random_q4(rows, cols, 300 + i as u64);
        let m = AffineMatrix::new(rows, cols, 4, 64, &packed, &scales, &biases).unwrap();
        let x = xs(cols, 60 + i as u64);
        let y = g.matvec(Matvec::Dp4a, &g.upload(&m).unwrap(), &x).unwrap();
        let all: Vec<usize> = (0..rows).collect();
        let e_ref = rel_err(&y, &reference_rows(&m, &x, &all));
        let q = quantized_like_host(g, &x);
        let e_emu = rel_err(&y, &dp4a_reference_rows(&m, &q, &all));
        eprintln!("dp4a {rows}x{cols}: rel err {e_ref:.1e} vs f64, {e_emu:.1e} vs int8 emulation");
        assert!(
            e_ref < INT8_TOL,
            "{rows}x{cols}: relative error {e_ref} against f64"
        );
        assert!(
            e_emu < EMULATION_TOL,
            "{rows}x{cols}: relative error {e_emu} against the emulation"
        );
    }
}

#[test]
fn dp4a_on_quantized_weights_and_separate_jobs() {
    // mfx's own quantizer's codes, with the two passes as separate jobs (the
    // benchmark's way): one quantized x serving two products.
    let g = gpu();
    let (rows, cols) = (96, 512);
    let w: Vec<f32> = xs(rows * cols, 5).iter().map(|v| v * 0.05).collect();
    let qw = quantize(&w, rows, cols, 4, 64).unwrap();
    let m = qw.view();
    let dm = g.upload(&m).unwrap();
    let x = xs(cols, 6);
    let xb = g.f32_buffer(&x);
    let qx = g.quantized_x(cols as u32).unwrap();
    let ya = g.f32_buffer(&vec![f32::NAN; rows]);
    let yb = g.f32_buffer(&vec![f32::NAN; rows]);
    g.run(&[&g.quantize_job(&xb, &qx)]).unwrap();
    let ja = g.dp4a_job(&dm, &qx, &ya).unwrap();
    let jb = g.dp4a_job(&dm, &qx, &yb).unwrap();
    g.run(&[&ja, &jb]).unwrap();
    let all: Vec<usize> = (0..rows).collect();
    let emu = dp4a_reference_rows(&m, &quantized_like_host(g, &x), &all);
    for yy in [&ya, &yb] {
        let y = g.read_f32(yy, rows).unwrap();
        assert!(rel_err(&y, &reference_rows(&m, &x, &all)) < INT8_TOL);
        let e = rel_err(&y, &emu);
        assert!(
            e < EMULATION_TOL,
            "relative error {e} against the emulation"
        );
    }
}

#[test]
fn two_dimensional_grid() {
    // More workgroups than one grid dimension takes (65535 on lavapipe and
    // most Vulkan drivers): rows spill into the grid's y, as lm_head's do.
    let g = gpu();
    // Capped so that a device with a larger limit gets a test of sane size
    // (it then checks the row tail but not the spill).
    let limit = (g.limits.max_compute_workgroups_per_dimension as usize).min(65535);
    let (rows, cols) = (limit * 8 + 13, 64);
    let (packed, scales, biases) = random_q4(rows, cols, 11);
    let m = AffineMatrix::new(rows, cols, 4, 64, &packed, &scales, &biases).unwrap();
    let dm = g.upload(&m).unwrap();
    let x = xs(cols, 12);
    let all: Vec<usize> = (0..rows).collect();
    let y = g.matvec(Matvec::R1, &dm, &x).unwrap();
    let e = rel_err(&y, &reference_rows(&m, &x, &all));
    assert!(e < 1e-5, "R1 relative error {e}");
    let y = g.matvec(Matvec::Dp4a, &dm, &x).unwrap();
    let e = rel_err(
        &y,
        &dp4a_reference_rows(&m, &quantized_like_host(g, &x), &all),
    );
    assert!(
        e < EMULATION_TOL,
        "Dp4a relative error {e} against the emulation"
    );
}
