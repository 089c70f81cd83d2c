//! One test body per kernel path: every tier this CPU can run (scalar always,
//! AVX2 or NEON when detected) goes through the same checks, in the style of
//! candle's `quantized_tests.rs`.
//!
//! Three references, each with its own budget:
//! * the scalar tier (`TIER_VS_SCALAR`): SIMD may only reassociate f32 sums;
//! * a float64 product of the weights dequantized by `mfx_formats::quant`
//!   (`VS_DEQUANT`): catches a kernel that agrees with scalar because both are
//!   wrong in the same way;
//! * a float64 product of the *unquantized* weights (`QUANT_BUDGET[bits]`):
//!   the numeric error budget per bit width, which bounds what quantization
//!   plus kernel may cost.
//!
//! Errors are measured as `max_i |y_i - ref_i| / sum_j |w_ij x_j|`, i.e.
//! relative to the magnitude of the terms summed, which is what float
//! rounding scales with (a plain relative error explodes when terms cancel).

use half::{bf16, f16};
use mfx_formats::mxfp4::{quantize_mxfp4, Mxfp4Owned};
use mfx_formats::quant::{quantize, AffineOwned};
use mfx_runtime::kernels::{self, scalar::Scalar, Backend, MatRef, Tier};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// SIMD vs scalar reference, and any tier vs a float64 product of the same
/// (dequantized) weights: reassociation of <= 640-term f32 sums; measured
/// worst 2.6e-7 (scalar bf16), 9e-8 (AVX2).
const F32_BUDGET: f64 = 1e-6;
/// The same for products that quantize x to int8 per 32-block (the AVX2
/// default for 2/4/8-bit weights): each x is off by at most half a step,
/// `absmax / 254`, a random walk over the row; measured worst over these
/// tests 2.6e-3 (q4), 2.3e-3 (q2), 5.1e-4 (q8) and 3.0e-3 (mxfp4).
const INT8X_BUDGET: f64 = 5e-3;

/// The error budget for one backend on one scheme.
fn tier_budget(b: &dyn Backend, w: &MatRef<'_>) -> f64 {
    match w {
        MatRef::Affine(a) if b.int8_activations() && matches!(a.bits, 2 | 4 | 8) => INT8X_BUDGET,
        MatRef::Mxfp4(_) if b.int8_activations() => INT8X_BUDGET,
        _ => F32_BUDGET,
    }
}

/// Relative RMS error of a quantized product against the unquantized f32
/// weights, uniform [-1, 1) weights and activations (rounding costs about
/// `step / sqrt(12)` rms per weight, `step = range / (2^bits - 1)`). Measured
/// on AVX2, worst of group sizes 32/64/128: q2 0.339, q3 0.146, q4 0.064,
/// q6 0.015, q8 0.0036; the budgets sit 1.3-1.7x above.
fn quant_budget(bits: u8) -> f64 {
    match bits {
        2 => 0.45,
        3 => 0.20,
        4 => 0.09,
        6 => 0.022,
        8 => 0.006,
        _ => unreachable!(),
    }
}

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// A weight matrix in every scheme, plus the f32 values each scheme stores.
enum Weights {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    Affine(AffineOwned),
    Mxfp4(Mxfp4Owned),
}

impl Weights {
    fn view(&self, rows: usize, cols: usize) -> MatRef<'_> {
        match self {
            Weights::F32(d) => MatRef::F32 {
                rows,
                cols,
                data: d,
            },
            Weights::Bf16(d) => MatRef::Bf16 {
                rows,
                cols,
                data: d,
            },
            Weights::F16(d) => MatRef::F16 {
                rows,
                cols,
                data: d,
            },
            Weights::Affine(a) => MatRef::Affine(a.view()),
            Weights::Mxfp4(m) => MatRef::Mxfp4(m.view()),
        }
    }
    /// The stored values, dequantized by the formats crate (not the kernels).
    fn dequantized(&self) -> Vec<f32> {
        match self {
            Weights::F32(d) => d.clone(),
            Weights::Bf16(d) => d.iter().map(|v| v.to_f32()).collect(),
            Weights::F16(d) => d.iter().map(|v| v.to_f32()).collect(),
            Weights::Affine(a) => a.view().dequantize(),
            Weights::Mxfp4(m) => m.view().dequantize(),
        }
    }
    fn name(&self) -> String {
        match self {
            Weights::F32(_) => "f32".into(),
            Weights::Bf16(_) => "bf16".into(),
            Weights::F16(_) => "f16".into(),
            Weights::Affine(a) => format!("q{}g{}", a.bits, a.group_size),
            Weights::Mxfp4(_) => "mxfp4".into(),
        }
    }
}

/// `y[n, rows]` in float64, plus the per-output magnitude `sum |w x|`.
fn dense_ref(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; n * rows];
    let mut mag = vec![0.0; n * rows];
    for i in 0..n {
        for r in 0..rows {
            let (mut s, mut m) = (0.0f64, 0.0f64);
            for c in 0..cols {
                let t = w[r * cols + c] as f64 * x[i * cols + c] as f64;
                s += t;
                m += t.abs();
            }
            y[i * rows + r] = s;
            mag[i * rows + r] = m.max(1e-30);
        }
    }
    (y, mag)
}

fn max_scaled_err(y: &[f32], reference: &[f64], mag: &[f64]) -> f64 {
    y.iter()
        .zip(reference)
        .zip(mag)
        .map(|((a, b), m)| (*a as f64 - b).abs() / m)
        .fold(0.0, f64::max)
}

fn run(b: &dyn Backend, w: &MatRef<'_>, x: &[f32], n: usize) -> Vec<f32> {
    // NaN-filled so a kernel that skips an output cannot pass.
    let mut y = vec![f32::NAN; n * w.rows()];
    b.matmul(w, x, n, &mut y);
    y
}

/// The shared body: every tier vs scalar and vs the dequantized float64 product.
fn check_all_tiers(weights: &Weights, rows: usize, cols: usize, rng: &mut ChaCha8Rng) {
    let w = weights.view(rows, cols);
    let deq = weights.dequantized();
    let verbose = std::env::var_os("MFX_KERNELS_TEST_VERBOSE").is_some();
    for n in [1usize, 3, 8, 17] {
        let x = rand_vec(rng, n * cols);
        let (yref, mag) = dense_ref(&deq, rows, cols, &x, n);
        let ys = run(&Scalar, &w, &x, n);
        let e = max_scaled_err(&ys, &yref, &mag);
        assert!(
            e <= F32_BUDGET,
            "scalar {} {rows}x{cols} n={n}: error vs dequantized {e:e}",
            weights.name()
        );
        let ys64: Vec<f64> = ys.iter().map(|v| *v as f64).collect();
        let mut by_tier = Vec::new();
        for tier in kernels::available() {
            let budget = tier_budget(tier, &w);
            let y = run(tier, &w, &x, n);
            by_tier.push((tier.name(), y.clone()));
            let e = max_scaled_err(&y, &yref, &mag);
            if verbose {
                eprintln!(
                    "err {} {} {rows}x{cols} n={n}: {e:e}",
                    tier.name(),
                    weights.name()
                );
            }
            assert!(
                e <= budget,
                "{} {} {rows}x{cols} n={n}: error vs dequantized {e:e} > {budget:e}",
                tier.name(),
                weights.name()
            );
            let e = max_scaled_err(&y, &ys64, &mag);
            assert!(
                e <= budget,
                "{} {} {rows}x{cols} n={n}: error vs scalar {e:e} > {budget:e}",
                tier.name(),
                weights.name()
            );
        }
        // avx512 quantizes x as avx2 does, forms the same i32 block sums
        // (vpdpbusd instead of vpmaddubsw + vpmaddwd) and runs the same f32
        // code on them: its products must be bit-identical to avx2's, for
        // every scheme (those it does not take over are avx2's own code).
        let get = |name: &str| by_tier.iter().find(|(t, _)| *t == name).map(|(_, y)| y);
        if let (Some(a2), Some(a512)) = (get("avx2"), get("avx512")) {
            let same = a2.iter().zip(a512).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "avx512 differs from avx2 on {} {rows}x{cols} n={n}",
                weights.name()
            );
        }
    }
}

#[test]
fn float_schemes_all_tiers() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Odd row counts, column counts that exercise the 32-, 8- and 1-wide tails.
    for (rows, cols) in [(1, 1), (5, 7), (7, 37), (33, 100), (64, 256), (3, 517)] {
        let w = rand_vec(&mut rng, rows * cols);
        check_all_tiers(&Weights::F32(w.clone()), rows, cols, &mut rng);
        check_all_tiers(
            &Weights::Bf16(w.iter().map(|v| bf16::from_f32(*v)).collect()),
            rows,
            cols,
            &mut rng,
        );
        check_all_tiers(
            &Weights::F16(w.iter().map(|v| f16::from_f32(*v)).collect()),
            rows,
            cols,
            &mut rng,
        );
    }
}

#[test]
fn affine_schemes_all_tiers() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for bits in [2u8, 3, 4, 6, 8] {
        for gs in [32usize, 64, 128] {
            // 32 and 160 columns have an odd number of 32-blocks (a trailing
            // block outside the pairs of the int8 path); only gs=32 fits them.
            for (rows, cols) in [(1, 128), (7, 256), (33, 384), (2, 32), (3, 160)] {
                if cols % gs != 0 {
                    continue;
                }
                let w = rand_vec(&mut rng, rows * cols);
                let q = quantize(&w, rows, cols, bits, gs).expect("valid shape");
                check_all_tiers(&Weights::Affine(q), rows, cols, &mut rng);
            }
        }
    }
}

/// MXFP4: quantized from random weights, and raw random bytes (every code,
/// -0 included, and a spread of scales); column counts with an odd number
/// of blocks (32, 96, 288: not multiples of 256) and gpt-oss's 2880.
#[test]
fn mxfp4_all_tiers() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (rows, cols) in [(1, 32), (3, 96), (7, 256), (33, 288), (4, 2880), (2, 64)] {
        let w = rand_vec(&mut rng, rows * cols);
        let q = quantize_mxfp4(&w, rows, cols).expect("valid shape");
        check_all_tiers(&Weights::Mxfp4(q), rows, cols, &mut rng);
        let raw = Mxfp4Owned {
            rows,
            cols,
            blocks: (0..rows * cols / 2).map(|_| rng.gen()).collect(),
            scales: (0..rows * cols / 32)
                .map(|_| rng.gen_range(100u8..150))
                .collect(),
        };
        check_all_tiers(&Weights::Mxfp4(raw), rows, cols, &mut rng);
    }
    // The smallest scales (2^-127, a subnormal, and 2^-126) and large ones
    // (the largest, 2^127, overflows f32 already at 4 * 2^127).
    let raw = Mxfp4Owned {
        rows: 2,
        cols: 64,
        blocks: (0..64).map(|_| rng.gen()).collect(),
        scales: vec![0, 1, 200, 210],
    };
    check_all_tiers(&Weights::Mxfp4(raw), 2, 64, &mut rng);
}

/// gate and up of one MXFP4 expert through `matmul_many` (AVX2 quantizes x
/// once for both) equal two separate products.
#[test]
fn mxfp4_matmul_many_equals_separate_products() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (rows, cols) = (40, 2880);
    let g = quantize_mxfp4(&rand_vec(&mut rng, rows * cols), rows, cols).expect("shape");
    let u = quantize_mxfp4(&rand_vec(&mut rng, rows * cols), rows, cols).expect("shape");
    for n in [1usize, 5] {
        let x = rand_vec(&mut rng, n * cols);
        for tier in kernels::available() {
            let (mut yg, mut yu) = (vec![f32::NAN; n * rows], vec![f32::NAN; n * rows]);
            tier.matmul_many(
                &[MatRef::Mxfp4(g.view()), MatRef::Mxfp4(u.view())],
                &x,
                n,
                &mut [&mut yg, &mut yu],
            );
            assert_eq!(
                yg,
                run(tier, &MatRef::Mxfp4(g.view()), &x, n),
                "{}",
                tier.name()
            );
            assert_eq!(
                yu,
                run(tier, &MatRef::Mxfp4(u.view()), &x, n),
                "{}",
                tier.name()
            );
        }
    }
}

/// Big enough to cross the parallel threshold and cut into several chunks,
/// with a row count that does not divide evenly; also the last row of the
/// buffer, where decoders must not read past the end.
#[test]
fn parallel_chunks_cover_every_row() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (rows, cols) = (1031, 512);
    let w = rand_vec(&mut rng, rows * cols);
    check_all_tiers(
        &Weights::Bf16(w.iter().map(|v| bf16::from_f32(*v)).collect()),
        rows,
        cols,
        &mut rng,
    );
    for bits in [3u8, 4, 6] {
        let q = quantize(&w, rows, cols, bits, 64).expect("valid shape");
        check_all_tiers(&Weights::Affine(q), rows, cols, &mut rng);
    }
    let q = quantize_mxfp4(&w, rows, cols).expect("valid shape");
    check_all_tiers(&Weights::Mxfp4(q), rows, cols, &mut rng);
}

/// The error budget per bit width: quantized product vs unquantized weights.
#[test]
fn quantization_error_budget_per_bit_width() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (rows, cols, n) = (96, 512, 3);
    let w = rand_vec(&mut rng, rows * cols);
    let x = rand_vec(&mut rng, n * cols);
    let (yf, _) = dense_ref(&w, rows, cols, &x, n);
    let norm = yf.iter().map(|v| v * v).sum::<f64>().sqrt();
    for bits in [2u8, 3, 4, 6, 8] {
        for gs in [32usize, 64, 128] {
            let q = quantize(&w, rows, cols, bits, gs).expect("valid shape");
            for tier in kernels::available() {
                let y = run(tier, &MatRef::Affine(q.view()), &x, n);
                let err = y
                    .iter()
                    .zip(&yf)
                    .map(|(a, b)| (*a as f64 - b).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    / norm;
                assert!(
                    err <= quant_budget(bits),
                    "{:?} q{bits}g{gs}: relative rms error {err:.4} > budget {}",
                    tier.name(),
                    quant_budget(bits)
                );
                // Quantization must cost something: a kernel that ignored the
                // codes and returned the float product would pass the budget.
                if bits <= 4 {
                    assert!(
                        err > quant_budget(bits) / 20.0,
                        "q{bits}g{gs}: suspiciously exact ({err:e})"
                    );
                }
            }
        }
    }
    // MXFP4 (e2m1 values, power-of-two scale per 32): MXFP4_BUDGET.
    let q = quantize_mxfp4(&w, rows, cols).expect("valid shape");
    for tier in kernels::available() {
        let y = run(tier, &MatRef::Mxfp4(q.view()), &x, n);
        let err = y
            .iter()
            .zip(&yf)
            .map(|(a, b)| (*a as f64 - b).powi(2))
            .sum::<f64>()
            .sqrt()
            / norm;
        if std::env::var_os("MFX_KERNELS_TEST_VERBOSE").is_some() {
            eprintln!("mxfp4 {}: relative rms error {err:.4}", tier.name());
        }
        assert!(
            err <= MXFP4_BUDGET && err > MXFP4_BUDGET / 20.0,
            "{} mxfp4: relative rms error {err:.4} outside (budget/20, {MXFP4_BUDGET}]",
            tier.name()
        );
    }
}

/// Relative RMS error of an MXFP4 product against the unquantized weights
/// (uniform [-1, 1) weights and activations); measured 0.130 on every tier
/// (AVX2, 2026-12-06): twice q4g32's, as expected of a power-of-two scale
/// and e2m1's coarse top (4 -> 6) on uniform weights. The budget sits 1.4x above.
const MXFP4_BUDGET: f64 = 0.18;

#[test]
fn select_honours_forced_tiers() {
    assert_eq!(kernels::select(Some("scalar")).tier(), Tier::Scalar);
    assert_eq!(kernels::select(Some(" SCALAR ")).tier(), Tier::Scalar);
    assert_eq!(kernels::select(Some("no-such-tier")).tier(), Tier::Scalar);
    let avail = kernels::available();
    assert_eq!(avail[0].tier(), Tier::Scalar);
    let best = kernels::select(None).tier();
    assert_eq!(kernels::select(Some("auto")).tier(), best);
    for b in &avail {
        assert_eq!(kernels::select(Some(b.name())).name(), b.name());
        assert_eq!(kernels::select(Some(b.tier().name())).tier(), b.tier());
    }
    // `avx512` is available exactly where AVX-512 F/BW/VL/VNNI are, and
    // then auto picks it (bit-identical to avx2, faster: docs/PERF.md).
    #[cfg(target_arch = "x86_64")]
    {
        let vnni = std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni");
        let has = avail.iter().any(|b| b.name() == "avx512");
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        assert_eq!(has, vnni && avx2);
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // auto quantizes activations for 2/4-bit weights; f32 ones are
        // opt-in. With VNNI the same sums run on vpdpbusd (bit-identical).
        let vnni = avail.iter().any(|b| b.name() == "avx512");
        let (name, tier) = if vnni {
            ("avx512", Tier::Avx512)
        } else {
            ("avx2", Tier::Avx2)
        };
        assert_eq!(best, tier);
        assert_eq!(kernels::select(None).name(), name);
        assert_eq!(kernels::select(Some("avx2-f32x")).name(), "avx2-f32x");
    } else {
        assert_eq!(kernels::select(Some("avx2")).tier(), Tier::Scalar);
    }
    // NEON is part of the aarch64 baseline: an aarch64 run that fell back
    // to scalar would silently leave the NEON kernels untested.
    #[cfg(target_arch = "aarch64")]
    assert_eq!(best, Tier::Neon);
    // A tier of another architecture is never "available".
    #[cfg(target_arch = "x86_64")]
    assert_eq!(kernels::select(Some("neon")).tier(), Tier::Scalar);
    #[cfg(target_arch = "aarch64")]
    assert_eq!(kernels::select(Some("avx2")).tier(), Tier::Scalar);
}

/// A command that re-executes this test binary. Under qemu-user (the
/// aarch64 leg of scripts/test.sh) the emulated process cannot exec an
/// aarch64 file itself (no binfmt_misc), so the script names the emulator
/// in `MFX_TEST_REEXEC_RUNNER` and the child runs under it too.
fn reexec_self() -> std::process::Command {
    let exe = std::env::current_exe().expect("test binary path");
    let runner = std::env::var("MFX_TEST_REEXEC_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut c = std::process::Command::new(program);
            c.args(words).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    }
}

/// Runs in a child process (the backend is cached once per process): prints
/// the tier `backend()` chose.
#[test]
fn child_reports_tier() {
    if std::env::var_os("MFX_KERNELS_TEST_CHILD").is_some() {
        println!("selected-tier={}", kernels::backend().tier().name());
    }
}

#[test]
fn env_var_forces_scalar_for_the_process() {
    for (forced, expect) in [("scalar", "scalar"), ("bogus", "scalar")] {
        let out = reexec_self()
            .args([
                "--exact",
                "child_reports_tier",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MFX_KERNELS", forced)
            .env("MFX_KERNELS_TEST_CHILD", "1")
            .output()
            .expect("spawn test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("selected-tier={expect}")),
            "MFX_KERNELS={forced}: child printed {stdout:?}"
        );
    }
}

#[test]
fn dot_and_axpy_all_tiers() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for len in [0usize, 1, 7, 8, 31, 32, 33, 100, 1000] {
        let a = rand_vec(&mut rng, len);
        let b = rand_vec(&mut rng, len);
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let mag: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (*x as f64 * *y as f64).abs())
            .sum::<f64>()
            .max(1e-30);
        for tier in kernels::available() {
            let d = tier.dot(&a, &b) as f64;
            assert!(
                (d - exact).abs() / mag <= 1e-6,
                "{:?} dot len={len}: {d} vs {exact}",
                tier.name()
            );
            let mut y = b.clone();
            tier.axpy(0.75, &a, &mut y);
            for (k, ((yk, ak), bk)) in y.iter().zip(&a).zip(&b).enumerate() {
                // One FMA or a mul+add: within one rounding of each other.
                let e = 0.75f64 * *ak as f64 + *bk as f64;
                assert!(
                    (*yk as f64 - e).abs() <= 2.0 * f32::EPSILON as f64 * (e.abs() + 1.0),
                    "{:?} axpy[{k}]",
                    tier.name()
                );
            }
        }
    }
}

/// Grouped attention kernels (query heads sharing a KV head) against a
/// float64 product over the same f16 rows, for group sizes that exercise
/// every block width, widths with and without a tail, and strided rows.
#[test]
fn grouped_f16_rows_all_tiers() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (g, width, len, stride_extra) in [
        (1, 64, 5, 0),
        (2, 128, 33, 64),
        (3, 72, 17, 8),
        (4, 128, 100, 384),
        (5, 20, 9, 3),
        (8, 128, 257, 384),
        (12, 64, 40, 0),
        (6, 128, 0, 0),
    ] {
        let stride = width + stride_extra;
        let data: Vec<f16> = (0..len * stride)
            .map(|_| f16::from_f32(rng.gen_range(-1.0f32..1.0)))
            .collect();
        let rows = kernels::F16Rows {
            data: &data,
            stride,
            len,
            width,
        };
        let q = rand_vec(&mut rng, g * width);
        let ld = len + 3;
        let p = rand_vec(&mut rng, g * ld);
        let base = rand_vec(&mut rng, g * width);
        for tier in kernels::available() {
            let mut scores = vec![f32::NAN; g * ld];
            tier.dot_f16_rows(rows, &q, &mut scores, ld);
            let mut out = base.clone();
            tier.axpy_f16_rows(rows, &p, ld, &mut out);
            for h in 0..g {
                for j in 0..len {
                    let terms =
                        (0..width).map(|c| q[h * width + c] as f64 * data[j * stride + c].to_f64());
                    let (exact, mag) = terms.fold((0.0, 1e-30), |(s, m), t| (s + t, m + t.abs()));
                    let got = scores[h * ld + j] as f64;
                    assert!(
                        (got - exact).abs() / mag <= F32_BUDGET,
                        "{} dot g={g} width={width} h={h} j={j}: {got} vs {exact}",
                        tier.name()
                    );
                }
                for j in len..ld {
                    assert!(
                        scores[h * ld + j].is_nan(),
                        "{} wrote past len",
                        tier.name()
                    );
                }
                for c in 0..width {
                    let terms =
                        (0..len).map(|j| p[h * ld + j] as f64 * data[j * stride + c].to_f64());
                    let (sum, mag) = terms.fold((0.0, 1e-30), |(s, m), t| (s + t, m + t.abs()));
                    let exact = base[h * width + c] as f64 + sum;
                    let got = out[h * width + c] as f64;
                    assert!(
                        (got - exact).abs() / (mag + base[h * width + c].abs() as f64)
                            <= F32_BUDGET,
                        "{} axpy g={g} width={width} h={h} c={c}: {got} vs {exact}",
                        tier.name()
                    );
                }
            }
        }
    }
}

/// Bulk conversions must agree bit for bit with `half` (the reference), on
/// ordinary values and on the edges: signed zeros, subnormals, overflow to
/// infinity, NaN, and ties for round-to-nearest-even.
#[test]
fn conversions_match_half_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut src: Vec<f32> = (0..1000)
        .map(|_| rng.gen_range(-70000.0f32..70000.0))
        .collect();
    src.extend(rand_vec(&mut rng, 100));
    src.extend([
        0.0,
        -0.0,
        1e-8,
        -6e-8,
        1e-40,
        f32::MIN_POSITIVE,
        65504.0,
        65520.0,
        1e30,
        -1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        1.0 + f32::EPSILON * 0.5,
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::MAX,
    ]);
    for tier in kernels::available() {
        let mut h = vec![f16::ZERO; src.len()];
        tier.convert_f32_to_f16(&src, &mut h);
        for (s, v) in src.iter().zip(&h) {
            assert_eq!(
                v.to_bits(),
                f16::from_f32(*s).to_bits(),
                "{:?} f32->f16 of {s:e}",
                tier.name()
            );
        }
        let mut b = vec![bf16::ZERO; src.len()];
        tier.convert_f32_to_bf16(&src, &mut b);
        for (s, v) in src.iter().zip(&b) {
            assert_eq!(
                v.to_bits(),
                bf16::from_f32(*s).to_bits(),
                "{:?} f32->bf16 of {s:e} ({:#x})",
                tier.name(),
                s.to_bits()
            );
        }
        let mut back = vec![0.0f32; src.len()];
        tier.convert_f16_to_f32(&h, &mut back);
        for (v, r) in h.iter().zip(&back) {
            assert_eq!(
                r.to_bits(),
                v.to_f32().to_bits(),
                "{:?} f16->f32 of {:#x}",
                tier.name(),
                v.to_bits()
            );
        }
        tier.convert_bf16_to_f32(&b, &mut back);
        for (v, r) in b.iter().zip(&back) {
            assert_eq!(
                r.to_bits(),
                v.to_f32().to_bits(),
                "{:?} bf16->f32 of {:#x}",
                tier.name(),
                v.to_bits()
            );
        }
    }
}

#[test]
fn int8_kv_roundtrip_and_dots() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x: Vec<f32> = rand_vec(&mut rng, 128).iter().map(|v| v * 3.0).collect();
    let mut codes = vec![0i8; x.len()];
    let scale = kernels::quantize_row_i8(&x, &mut codes);
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!((scale - amax / 127.0).abs() <= 1e-7);
    assert!(
        codes.iter().any(|c| c.unsigned_abs() == 127),
        "the absmax element maps to +-127"
    );
    let mut back = vec![0.0f32; x.len()];
    kernels::dequantize_row_i8(&codes, scale, &mut back);
    for (a, b) in x.iter().zip(&back) {
        assert!(
            (a - b).abs() <= scale * 0.5 + 1e-6,
            "int8 roundtrip {a} -> {b}"
        );
    }
    let q = rand_vec(&mut rng, x.len());
    let want: f32 = back.iter().zip(&q).map(|(a, b)| a * b).sum();
    let got = kernels::dot_i8(&codes, scale, &q);
    assert!(
        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
        "dot_i8 {got} vs {want}"
    );
    let mut y = vec![1.0f32; x.len()];
    kernels::axpy_i8(0.5, &codes, scale, &mut y);
    for (yi, b) in y.iter().zip(&back) {
        assert!((yi - (1.0 + 0.5 * b)).abs() <= 1e-5);
    }
    // Degenerate rows: zeros quantize to scale 0; non-finite rows are flagged.
    let mut c = [5i8; 4];
    assert_eq!(kernels::quantize_row_i8(&[0.0; 4], &mut c), 0.0);
    assert_eq!(c, [0; 4]);
    assert!(kernels::quantize_row_i8(&[1.0, f32::INFINITY, 0.0, 2.0], &mut c).is_nan());
}

/// `softmax(scale * x)` in float64 over the f32 products (what every tier
/// computes before rounding its exps).
fn softmax_ref(x: &[f32], scale: f32) -> Vec<f64> {
    let m = x
        .iter()
        .map(|v| (*v * scale) as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| ((*v * scale) as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[test]
fn softmax_scaled_matches_f64_and_handles_masks() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let x: Vec<f32> = rand_vec(&mut rng, 300).iter().map(|v| v * 50.0).collect();
    let scale = 0.125f32;
    let mut y = x.clone();
    kernels::softmax_scaled(&mut y, scale);
    for (a, b) in y.iter().zip(softmax_ref(&x, scale)) {
        assert!((*a as f64 - b).abs() <= 1e-6, "{a} vs {b}");
    }
    // Every tier's own softmax (attention's), relative to each probability,
    // over lengths with and without a SIMD tail, logits up to 30 below the
    // max, and -inf masks. Relative 5e-6: the f32 argument itself is off by
    // up to 30 * 2^-24 before any exp runs.
    for len in [0usize, 1, 7, 8, 9, 31, 300, 2049] {
        let x: Vec<f32> = rand_vec(&mut rng, len).iter().map(|v| v * 120.0).collect();
        let want_all = softmax_ref(&x, scale);
        for tier in kernels::available() {
            let mut y = x.clone();
            tier.softmax_scaled(&mut y, scale);
            for (k, (a, &want)) in y.iter().zip(&want_all).enumerate() {
                assert!(
                    (*a as f64 - want).abs() <= 5e-6 * want + 1e-30,
                    "{} len={len} [{k}]: {a} vs {want}",
                    tier.name()
                );
            }
        }
        for tier in kernels::available() {
            let mut y = vec![
                1.0,
                f32::NEG_INFINITY,
                1.0,
                0.0,
                0.0,
                0.0,
                0.0,
                0.0,
                f32::NEG_INFINITY,
            ];
            tier.softmax_scaled(&mut y, 0.5);
            assert_eq!(y[1], 0.0, "{}", tier.name());
            assert_eq!(y[8], 0.0, "{}", tier.name());
            let mut y = vec![f32::NEG_INFINITY; 11];
            tier.softmax_scaled(&mut y, 0.5);
            assert_eq!(y, vec![0.0; 11], "{}", tier.name());
        }
    }
    // Masked positions (-inf) get zero weight; a fully masked row gives zeros, not NaN.
    let mut y = vec![1.0, f32::NEG_INFINITY, 1.0];
    kernels::softmax_scaled(&mut y, 0.5);
    assert_eq!(y, vec![0.5, 0.0, 0.5]);
    let mut y = vec![f32::NEG_INFINITY; 3];
    kernels::softmax(&mut y);
    assert_eq!(y, vec![0.0; 3]);
}

/// A product's row for one input must not depend on the other inputs of
/// the call (batch invariance): a token's logits then do not depend on how
/// the sequence was cut into forward calls, which speculative decoding's
/// verify pass, prefix reuse and batched sequences rely on. Bit equality,
/// every tier and scheme, batch sizes across the tiers' pass widths.
#[test]
fn rows_do_not_depend_on_the_batch() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (rows, cols) = (48, 576);
    let w = rand_vec(&mut rng, rows * cols);
    let mut schemes = vec![
        Weights::F32(w.clone()),
        Weights::Bf16(w.iter().map(|&v| bf16::from_f32(v)).collect()),
        Weights::F16(w.iter().map(|&v| f16::from_f32(v)).collect()),
    ];
    for bits in [2u8, 3, 4, 6, 8] {
        for gs in [32usize, 64] {
            schemes.push(Weights::Affine(
                quantize(&w, rows, cols, bits, gs).expect("shape"),
            ));
        }
    }
    schemes.push(Weights::Mxfp4(
        quantize_mxfp4(&w, rows, cols).expect("shape"),
    ));
    let mut bad = Vec::new();
    for n in [2usize, 5, 11] {
        let x = rand_vec(&mut rng, n * cols);
        for s in &schemes {
            let m = s.view(rows, cols);
            for tier in kernels::available() {
                let all = run(tier, &m, &x, n);
                for i in 0..n {
                    let one = run(tier, &m, &x[i * cols..(i + 1) * cols], 1);
                    let row = &all[i * rows..(i + 1) * rows];
                    if one.iter().zip(row).any(|(a, b)| a.to_bits() != b.to_bits()) {
                        bad.push(format!("{} {} n={n} input {i}", tier.name(), s.name()));
                        break;
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "rows depend on the batch: {bad:#?}");
}
