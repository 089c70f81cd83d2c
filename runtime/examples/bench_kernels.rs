//! Matmul throughput per scheme, tier, thread count and batch size, on the
//! shapes decode actually runs. Not a test: run it through
//! `scripts/bench_kernels.sh` and compare the cold GB/s with
//! `scripts/membw.sh` (decode reads every weight byte once per token, so the
//! memory read bandwidth is the bound).
//!
//! Usage: `bench_kernels [--quick] [--schemes f32,bf16,q4g64,mxfp4] [--tiers scalar,avx2]
//!         [--n 1,8] [--threads 1,2] [--shapes 2048x768,...]`
//!
//! "cold": the matrix is one of enough copies to span 512 MiB, rotated per
//! call, so every call reads from DRAM (an MoE expert's situation). "hot":
//! the same matrix every call, cache-resident when it fits (dense layers in a
//! small model). GB/s counts weight bytes (codes + scales + biases); GFLOP/s
//! counts 2 * rows * cols * n.

use half::{bf16, f16};
use mfx_formats::mxfp4::{quantize_mxfp4, Mxfp4Owned};
use mfx_formats::quant::{quantize, AffineOwned, Scheme};
use mfx_runtime::kernels::{self, Backend, MatRef};
use rand::{Rng, SeedableRng};
use std::time::Instant;

enum Owned {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    Affine(AffineOwned),
    Mxfp4(Mxfp4Owned),
}

impl Owned {
    fn view(&self, rows: usize, cols: usize) -> MatRef<'_> {
        match self {
            Owned::F32(d) => MatRef::F32 {
                rows,
                cols,
                data: d,
            },
            Owned::Bf16(d) => MatRef::Bf16 {
                rows,
                cols,
                data: d,
            },
            Owned::F16(d) => MatRef::F16 {
                rows,
                cols,
                data: d,
            },
            Owned::Affine(a) => MatRef::Affine(a.view()),
            Owned::Mxfp4(m) => MatRef::Mxfp4(m.view()),
        }
    }
    fn clone_deep(&self) -> Owned {
        match self {
            Owned::F32(d) => Owned::F32(d.clone()),
            Owned::Bf16(d) => Owned::Bf16(d.clone()),
            Owned::F16(d) => Owned::F16(d.clone()),
            Owned::Affine(a) => Owned::Affine(a.clone()),
            Owned::Mxfp4(m) => Owned::Mxfp4(m.clone()),
        }
    }
}

fn make(
    scheme: Scheme,
    rows: usize,
    cols: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<Owned, String> {
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| rng.gen_range(-0.05f32..0.05))
        .collect();
    Ok(match scheme {
        Scheme::F32 => Owned::F32(w),
        Scheme::Bf16 => Owned::Bf16(w.iter().map(|v| bf16::from_f32(*v)).collect()),
        Scheme::F16 => Owned::F16(w.iter().map(|v| f16::from_f32(*v)).collect()),
        Scheme::Affine { bits, group_size } => Owned::Affine(
            quantize(&w, rows, cols, bits, group_size as usize).map_err(|e| e.to_string())?,
        ),
        Scheme::Mxfp4 => Owned::Mxfp4(quantize_mxfp4(&w, rows, cols).map_err(|e| e.to_string())?),
    })
}

/// Best seconds per call over repeated timing windows of ~`budget_s` total.
fn time_calls(mut call: impl FnMut(usize), budget_s: f64) -> f64 {
    call(0); // warm-up (page faults, pool start)
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut i = 1;
    while start.elapsed().as_secs_f64() < budget_s || i < 4 {
        let t = Instant::now();
        call(i);
        best = best.min(t.elapsed().as_secs_f64());
        i += 1;
    }
    best
}

fn list(args: &[String], flag: &str, default: &str) -> Vec<String> {
    let v = args
        .iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or(default);
    v.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let schemes: Vec<Scheme> = list(
        &args,
        "--schemes",
        "f32,bf16,f16,q2g64,q3g64,q4g64,q6g64,q8g64",
    )
    .iter()
    .map(|s| s.parse().map_err(|e| format!("--schemes {s}: {e}")))
    .collect::<Result<_, _>>()?;
    let shapes: Vec<(usize, usize)> =
        list(&args, "--shapes", "2048x768,768x2048,4096x2048,151936x2048")
            .iter()
            .map(|s| {
                let (r, c) = s
                    .split_once('x')
                    .ok_or(format!("--shapes {s}: expected ROWSxCOLS"))?;
                Ok((
                    r.parse().map_err(|_| format!("bad rows in {s}"))?,
                    c.parse().map_err(|_| format!("bad cols in {s}"))?,
                ))
            })
            .collect::<Result<_, String>>()?;
    let ns: Vec<usize> = list(&args, "--n", "1,8")
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let threads: Vec<usize> = list(&args, "--threads", "1,2")
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let tiers: Vec<&'static dyn Backend> = {
        let want = list(&args, "--tiers", "");
        kernels::available()
            .into_iter()
            .filter(|b| want.is_empty() || want.iter().any(|w| w == b.name()))
            .collect()
    };
    let budget_s = if quick { 0.15 } else { 0.4 };
    let cold_span: usize = 512 << 20;

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    println!(
        "{:<14} {:<7} {:<9} {:>3} {:>2} {:>10} {:>9} {:>9} {:>11}",
        "shape", "scheme", "tier", "thr", "n", "MB", "hot GB/s", "cold GB/s", "hot GFLOP/s"
    );
    for &(rows, cols) in &shapes {
        for &scheme in &schemes {
            // The vocabulary projection is stored unquantized or at 8 bits in
            // practice; skip the rest there to keep the run short.
            if rows * cols > 100_000_000
                && !matches!(scheme, Scheme::Bf16 | Scheme::Affine { bits: 4 | 8, .. })
            {
                continue;
            }
            let base = make(scheme, rows, cols, &mut rng)?;
            let bytes = base.view(rows, cols).row_bytes() * rows;
            let copies = (cold_span / bytes).clamp(1, 64);
            let mut mats = vec![base];
            for _ in 1..copies {
                mats.push(mats[0].clone_deep());
            }
            for &n in &ns {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                let mut y = vec![0.0f32; n * rows];
                for &tier in &tiers {
                    for &t in &threads {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(t)
                            .build()
                            .map_err(|e| e.to_string())?;
                        // Scalar on the big shapes takes seconds per call; one window is enough.
                        let b = if tier.tier() == kernels::Tier::Scalar {
                            budget_s / 3.0
                        } else {
                            budget_s
                        };
                        let hot = pool.install(|| {
                            time_calls(|_| tier.matmul(&mats[0].view(rows, cols), &x, n, &mut y), b)
                        });
                        let cold = if copies > 1 {
                            pool.install(|| {
                                time_calls(
                                    |i| {
                                        tier.matmul(
                                            &mats[i % copies].view(rows, cols),
                                            &x,
                                            n,
                                            &mut y,
                                        )
                                    },
                                    b,
                                )
                            })
                        } else {
                            hot // one copy already exceeds the span: every call is cold
                        };
                        std::hint::black_box(&y);
                        let flops = 2.0 * (rows * cols * n) as f64;
                        println!(
                            "{:<14} {:<7} {:<9} {:>3} {:>2} {:>10.2} {:>9.2} {:>9.2} {:>11.2}",
                            format!("{rows}x{cols}"),
                            scheme.to_string(),
                            tier.name(),
                            t,
                            n,
                            bytes as f64 / 1e6,
                            bytes as f64 / hot / 1e9,
                            bytes as f64 / cold / 1e9,
                            flops / hot / 1e9,
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
