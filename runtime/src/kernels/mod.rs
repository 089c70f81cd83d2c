//! CPU kernels behind one dispatch point.
//!
//! Every kernel has a scalar reference (`scalar.rs`) that is always compiled
//! and is the definition of correct; SIMD tiers (AVX2+FMA on x86_64, NEON on
//! aarch64) are picked once at run time and cached. `MFX_KERNELS=scalar`
//! (or `avx2`, `neon`) forces a tier so that tests exercise each path on the
//! same machine; asking for a tier the CPU lacks falls back to scalar.
//!
//! Conventions: weights are `[rows, cols]` row-major (`rows` = output
//! features, as in PyTorch's `nn.Linear.weight`); activations are f32,
//! `n` rows of `cols`; accumulation is always f32.

pub mod scalar;

use half::{bf16, f16};
use mfx_formats::quant::AffineMatrix;
use std::sync::OnceLock;

/// A borrowed weight matrix in any storage scheme.
#[derive(Debug, Clone, Copy)]
pub enum MatRef<'a> {
    F32 { rows: usize, cols: usize, data: &'a [f32] },
    Bf16 { rows: usize, cols: usize, data: &'a [bf16] },
    F16 { rows: usize, cols: usize, data: &'a [f16] },
    Affine(AffineMatrix<'a>),
}

impl MatRef<'_> {
    pub fn rows(&self) -> usize {
        match self {
            MatRef::F32 { rows, .. } | MatRef::Bf16 { rows, .. } | MatRef::F16 { rows, .. } => *rows,
            MatRef::Affine(a) => a.rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            MatRef::F32 { cols, .. } | MatRef::Bf16 { cols, .. } | MatRef::F16 { cols, .. } => *cols,
            MatRef::Affine(a) => a.cols,
        }
    }
    /// Reference dequantization of row `r` (slow path: embeddings lookup, tests).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            MatRef::F32 { cols, data, .. } => out[..*cols].copy_from_slice(&data[r * cols..(r + 1) * cols]),
            MatRef::Bf16 { cols, data, .. } => {
                for (o, v) in out.iter_mut().zip(&data[r * cols..(r + 1) * cols]) {
                    *o = v.to_f32();
                }
            }
            MatRef::F16 { cols, data, .. } => {
                for (o, v) in out.iter_mut().zip(&data[r * cols..(r + 1) * cols]) {
                    *o = v.to_f32();
                }
            }
            MatRef::Affine(a) => a.dequantize_row(r, out),
        }
    }
}

/// Which implementation tier runs the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Scalar,
    Avx2,
    Neon,
}

/// The kernel set. One implementation per tier; all must agree with
/// [`scalar`] within float32 reassociation error.
pub trait Backend: Send + Sync {
    fn tier(&self) -> Tier;
    /// `y[n, rows] = x[n, cols] @ w^T`. Implementations parallelize over rows.
    fn matmul(&self, w: &MatRef<'_>, x: &[f32], n: usize, y: &mut [f32]);
    /// `sum(a[i] * b[i])`.
    fn dot(&self, a: &[f32], b: &[f32]) -> f32;
    /// `y[i] += alpha * x[i]`.
    fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]);
}

static BACKEND: OnceLock<&'static dyn Backend> = OnceLock::new();

/// The backend for this process: chosen once from CPU features and `MFX_KERNELS`.
pub fn backend() -> &'static dyn Backend {
    *BACKEND.get_or_init(|| {
        let forced = std::env::var("MFX_KERNELS").ok();
        select(forced.as_deref())
    })
}

/// Picks a tier; `forced` is the value of `MFX_KERNELS` if set.
pub fn select(forced: Option<&str>) -> &'static dyn Backend {
    match forced {
        Some("scalar") => &scalar::Scalar,
        _ => &scalar::Scalar,
    }
}

/// `y[n, rows] = x[n, cols] @ w^T` on the process backend.
pub fn matmul(w: &MatRef<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    debug_assert_eq!(x.len(), n * w.cols());
    debug_assert_eq!(y.len(), n * w.rows());
    backend().matmul(w, x, n, y)
}

/// `y[rows] = w @ x`.
pub fn matvec(w: &MatRef<'_>, x: &[f32], y: &mut [f32]) {
    matmul(w, x, 1, y)
}

/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * weight` (f32 throughout).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// Numerically stable in-place softmax.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in x.iter_mut() {
        *v /= s;
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]`, the SwiGLU combine.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}
