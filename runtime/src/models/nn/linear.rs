//! Linear layers, RMSNorm and the SwiGLU feed-forward as every family uses
//! them, and the hub's tensor naming (`model.layers.{l}.…`).

use crate::error::RuntimeError;
use crate::experts::ExpertMats;
use crate::kernels::{self, rms_norm};
use crate::weights::{Matrix, WeightSource};

/// `model.layers.{l}.{rest}`.
pub fn layer_name(l: usize, rest: &str) -> String {
    format!("model.layers.{l}.{rest}")
}

/// `y[n, w.rows] = x[n, w.cols] w^T`.
pub fn matmul(w: &Matrix, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0.0; n * w.rows()];
    kernels::matmul(&w.mat(), x, n, &mut y);
    y
}

/// [`matmul`] plus a per-output bias.
pub fn project(w: &Matrix, bias: &Option<Vec<f32>>, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = matmul(w, x, n);
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(b.len()) {
            for (a, c) in row.iter_mut().zip(b) {
                *a += c;
            }
        }
    }
    y
}

/// RMSNorm of each `w.len()`-wide row of `x` into a new buffer.
pub fn norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let width = w.len();
    let mut out = vec![0.0; x.len()];
    for (o, r) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
        rms_norm(r, w, eps, o);
    }
    out
}

/// RMSNorm of each `width`-wide row of `x`, in place.
pub fn norm_in_place(x: &mut [f32], width: usize, w: &[f32], eps: f32) {
    let mut tmp = vec![0.0; width];
    for row in x.chunks_exact_mut(width) {
        rms_norm(row, w, eps, &mut tmp);
        row.copy_from_slice(&tmp);
    }
}

/// `x += y` elementwise (a residual connection).
pub fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// The SwiGLU MLP `{prefix}.{gate,up,down}_proj` of width `inter` over
/// `hidden` inputs (dense layers, shared experts).
pub fn load_mlp(
    src: &dyn WeightSource,
    prefix: &str,
    hidden: usize,
    inter: usize,
) -> Result<ExpertMats, RuntimeError> {
    Ok(ExpertMats {
        gate: src.matrix(&format!("{prefix}.gate_proj"), inter, hidden)?,
        up: src.matrix(&format!("{prefix}.up_proj"), inter, hidden)?,
        down: src.matrix(&format!("{prefix}.down_proj"), hidden, inter)?,
        bias: None,
    })
}
