//! q4 matrix-vector GB/s and q4 GEMM TFLOP/s of the WGSL kernels on the first
//! adapter, for issue 24's decision. Prints one line per case and a table.
//!
//! Timing: each dispatch gets its own compute pass bracketed by GPU
//! timestamps; the median over the timed passes is reported. Matrices are
//! replicated until the set exceeds the GPU's L2 (rotating copies), so a
//! timed pass reads its weights from device memory, not the cache. Results
//! are checked against formats' dequantizer on sampled rows before timing.
//!
//! The int8-activation mat-vec (Dp4a) is timed as cuda/q4_matvec.cu times
//! it: x is quantized once, the mat-vec passes alone are timed, and the
//! quantize pass gets its own line (`quantize_x`, per token in a decode).
//!
//! The GEMM shapes run twice where the adapter has 16x16x16 f16 -> f32
//! cooperative matrices (wgpu's experimental feature): the f32 tiles and
//! q4_gemm_coop.wgsl on tensor cores ("coop gemm"); elsewhere one line says
//! why the coop GEMM is not available.
//!
//! Usage: q4bench [--quick] [--unchecked]

use mfx_formats::quant::AffineMatrix;
use mfx_gpu::{random_q4, reference_rows, Checks, Gpu, Matvec, Q4Matrix};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// Bytes the rotating copies of one shape should exceed (H100 L2 is 50 MB).
const ROTATE_BYTES: u64 = 512 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let checks = if args.iter().any(|a| a == "--unchecked") {
        Checks::Unchecked
    } else {
        Checks::Checked
    };
    let g = match Gpu::new(checks) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("q4bench: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "adapter: {} | {:?} | driver {} {} | checks {:?} | timestamps {}",
        g.info.name, g.info.backend, g.info.driver, g.info.driver_info, checks, g.timestamps
    );
    println!("capabilities: {}", g.capabilities);
    let mut table = Vec::new();
    let mv_shapes: &[(&str, usize, usize)] = if quick {
        &[("4096x4096", 4096, 4096), ("768x2048 expert up", 768, 2048)]
    } else {
        &[
            ("4096x4096", 4096, 4096),
            ("2048x768 expert down", 2048, 768),
            ("768x2048 expert up", 768, 2048),
            ("151936x4096 lm_head", 151936, 4096),
        ]
    };
    for &(name, rows, cols) in mv_shapes {
        for kind in [Matvec::R1, Matvec::R4, Matvec::Dp4a] {
            for per_pass in [1, 64] {
                match bench_matvec(&g, kind, rows, cols, if quick { 64 } else { 640 }, per_pass) {
                    Ok((s, gbs, err)) => {
                        let how = if per_pass == 1 {
                            "own pass"
                        } else {
                            "64 per pass"
                        };
                        println!("matvec {kind:?} {name} ({how}): median {:.2} us, {gbs:.1} GB/s, rel err {err:.1e}", s * 1e6);
                        table.push(format!("| matvec {kind:?}, {how} | {name} | 1 | {:.2} us | {gbs:.1} GB/s | {err:.1e} |", s * 1e6));
                    }
                    Err(e) => println!("matvec {kind:?} {name}: FAILED {e}"),
                }
            }
        }
        match bench_quantize(&g, cols, if quick { 64 } else { 640 }) {
            Ok(s) => {
                println!("quantize_x {cols} cols: median {:.2} us", s * 1e6);
                table.push(format!(
                    "| quantize_x (own pass) | {cols} cols | 1 | {:.2} us | | |",
                    s * 1e6
                ));
            }
            Err(e) => println!("quantize_x {cols} cols: FAILED {e}"),
        }
    }
    let gemm_shapes: &[(&str, usize, usize, usize)] = if quick {
        &[("4096x4096", 4096, 4096, 128)]
    } else {
        &[
            ("4096x4096", 4096, 4096, 2048),
            ("768x2048 expert up", 768, 2048, 2048),
            ("2048x768 expert down", 2048, 768, 2048),
        ]
    };
    if let Some(why) = &g.coop_missing {
        println!("coop gemm not available: {why}");
    }
    let gemms: &[Gemm] = if g.has_coop() {
        &[Gemm::F32, Gemm::Coop]
    } else {
        &[Gemm::F32]
    };
    for &(name, rows, cols, n) in gemm_shapes {
        for &kind in gemms {
            let label = match kind {
                Gemm::F32 => "gemm",
                Gemm::Coop => "coop gemm (f16 tensor cores)",
            };
            match bench_gemm(&g, kind, rows, cols, n, if quick { 3 } else { 20 }) {
                Ok((s, tflops, err)) => {
                    println!(
                        "{label} {name} n={n}: median {:.1} us, {tflops:.2} TFLOP/s, rel err {err:.1e}",
                        s * 1e6
                    );
                    table.push(format!(
                        "| {label} | {name} | {n} | {:.1} us | {tflops:.2} TFLOP/s | {err:.1e} |",
                        s * 1e6
                    ));
                }
                Err(e) => println!("{label} {name}: FAILED {e}"),
            }
        }
    }
    println!("\n| kernel | shape (rows x cols) | tokens | median | rate | rel err |\n|---|---|---|---|---|---|");
    for l in table {
        println!("{l}");
    }
}

fn xs(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn rel_err(out: &[f32], reference: &[f64]) -> f64 {
    let num: f64 = out
        .iter()
        .zip(reference)
        .map(|(&o, &r)| (o as f64 - r).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|r| r * r).sum();
    (num / den).sqrt()
}

fn sample_rows(rows: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..64).map(|i| i * rows / 64).collect();
    v.push(rows - 1);
    v.dedup();
    v
}

fn time(
    g: &Gpu,
    jobs: &[&mfx_gpu::Job],
    iters: usize,
    per_pass: usize,
) -> Result<f64, mfx_gpu::GpuError> {
    // Warm-up: pipeline creation and first-touch out of the numbers.
    g.run(&jobs[..jobs.len().min(4)])?;
    let order: Vec<&mfx_gpu::Job> = (0..iters).map(|i| jobs[i % jobs.len()]).collect();
    let mut t = if g.timestamps {
        g.time_batches(&order, per_pass)?
    } else {
        // Host clock over single-job submits (includes submit latency).
        let mut v = Vec::new();
        for j in &order {
            let t0 = Instant::now();
            g.run(&[j])?;
            v.push(t0.elapsed().as_secs_f64());
        }
        v
    };
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

fn bench_matvec(
    g: &Gpu,
    kind: Matvec,
    rows: usize,
    cols: usize,
    iters: usize,
    per_pass: usize,
) -> Result<(f64, f64, f64), Box<dyn std::error::Error>> {
    let (packed, scales, biases) = random_q4(rows, cols, rows as u64 ^ cols as u64);
    let m = AffineMatrix::new(rows, cols, 4, 64, &packed, &scales, &biases)?;
    let first = g.upload(&m)?;
    let copies = (ROTATE_BYTES / first.weight_bytes()).clamp(1, 256) as usize;
    let mut mats: Vec<Q4Matrix> = vec![first];
    for _ in 1..copies {
        mats.push(g.upload(&m)?);
    }
    let x = xs(cols, 1);
    let xb = g.f32_buffer(&x);
    let ys: Vec<wgpu::Buffer> = (0..copies)
        .map(|_| g.f32_buffer(&vec![f32::NAN; rows]))
        .collect();
    let jobs: Vec<mfx_gpu::Job> = if kind == Matvec::Dp4a {
        // One token's x, quantized once before the timed passes.
        let qx = g.quantized_x(cols as u32)?;
        g.run(&[&g.quantize_job(&xb, &qx)])?;
        mats.iter()
            .zip(&ys)
            .map(|(m, y)| g.dp4a_job(m, &qx, y))
            .collect::<Result<_, _>>()?
    } else {
        mats.iter()
            .zip(&ys)
            .map(|(m, y)| g.matvec_job(kind, m, &xb, y))
            .collect()
    };
    let refs: Vec<&mfx_gpu::Job> = jobs.iter().collect();
    let t = time(g, &refs, iters.max(copies), per_pass)?;
    // Check the last copy's output (written by the timed passes).
    let y = g.read_f32(ys.last().expect("one copy"), rows)?;
    let rs = sample_rows(rows);
    let got: Vec<f32> = rs.iter().map(|&r| y[r]).collect();
    let err = rel_err(&got, &reference_rows(&m, &x, &rs));
    if err.is_nan() || err >= tolerance(kind) {
        return Err(format!("wrong result: relative error {err}").into());
    }
    Ok((t, mats[0].weight_bytes() as f64 / t / 1e9, err))
}

/// Relative error a correct kernel stays under against the f64 reference:
/// f32 rounding, or int8 activations (~3e-3, see tests/parity.rs's INT8_TOL;
/// 2e-2 as the CUDA benchmark).
fn tolerance(kind: Matvec) -> f64 {
    match kind {
        Matvec::R1 | Matvec::R4 => 1e-4,
        Matvec::Dp4a => 2e-2,
    }
}

/// Median GPU time of the int8 quantization of one x of `cols` (each in its
/// own pass; x is 4 cols bytes, cache-resident as in a decode step).
fn bench_quantize(g: &Gpu, cols: usize, iters: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let x = xs(cols, 1);
    let xb = g.f32_buffer(&x);
    let qx = g.quantized_x(cols as u32)?;
    let job = g.quantize_job(&xb, &qx);
    let t = time(g, &[&job], iters, 1)?;
    // The device's codes must be the host's (a near-tie may round apart).
    let dev = g.quantize_x(&x)?;
    let host = mfx_gpu::quantize_x_host(&x)?;
    let off = dev
        .codes
        .iter()
        .zip(&host.codes)
        .filter(|(a, b)| (**a as i32 - **b as i32).abs() > 1)
        .count();
    if off > 0 {
        return Err(format!("{off} codes differ from the host's by more than 1").into());
    }
    Ok(t)
}

/// The GEMM shaders: f32 FMA tiles, or f16 cooperative matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gemm {
    F32,
    Coop,
}

fn bench_gemm(
    g: &Gpu,
    kind: Gemm,
    rows: usize,
    cols: usize,
    n: usize,
    iters: usize,
) -> Result<(f64, f64, f64), Box<dyn std::error::Error>> {
    let (packed, scales, biases) = random_q4(rows, cols, 5 + rows as u64);
    let m = AffineMatrix::new(rows, cols, 4, 64, &packed, &scales, &biases)?;
    let dm = g.upload(&m)?;
    let x = xs(n * cols, 2);
    let xb = g.f32_buffer(&x);
    let yb = g.f32_buffer(&vec![f32::NAN; n * rows]);
    let job = match kind {
        Gemm::F32 => g.gemm_job(&dm, n as u32, &xb, &yb),
        Gemm::Coop => g
            .gemm_coop_job(&dm, n as u32, &xb, &yb)
            .ok_or("coop gemm not available")?,
    };
    let t = time(g, &[&job], iters, 1)?;
    let y = g.read_f32(&yb, n * rows)?;
    let rs = sample_rows(rows);
    let mut got = Vec::new();
    let mut reference = Vec::new();
    for tok in [0, n / 2, n - 1] {
        got.extend(rs.iter().map(|&r| y[tok * rows + r]));
        reference.extend(reference_rows(&m, &x[tok * cols..(tok + 1) * cols], &rs));
    }
    let err = rel_err(&got, &reference);
    // f32 FMA: rounding only. Coop: x and w enter as f16 (unit roundoff
    // 2^-11 each, about 1e-3 relative on these random inputs); 2e-2 as the
    // int8 kernels, still far under the O(1) of a layout error.
    let tol = match kind {
        Gemm::F32 => 1e-4,
        Gemm::Coop => 2e-2,
    };
    if err.is_nan() || err >= tol {
        return Err(format!("wrong result: relative error {err}").into());
    }
    Ok((
        t,
        2.0 * n as f64 * rows as f64 * cols as f64 / t / 1e12,
        err,
    ))
}
