//! The scalar reference kernels: straightforward loops, f32 accumulation.
//! Every SIMD tier is tested against these.

use super::{Backend, MatRef, Tier};
use mfx_formats::quant::get_bits;

pub struct Scalar;

impl Backend for Scalar {
    fn tier(&self) -> Tier {
        Tier::Scalar
    }

    fn matmul(&self, w: &MatRef<'_>, x: &[f32], n: usize, y: &mut [f32]) {
        let (rows, cols) = (w.rows(), w.cols());
        for i in 0..n {
            let xi = &x[i * cols..(i + 1) * cols];
            for r in 0..rows {
                y[i * rows + r] = row_dot(w, r, xi);
            }
        }
    }

    fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += alpha * xi;
        }
    }
}

/// Dot product of weight row `r` with `x`.
pub fn row_dot(w: &MatRef<'_>, r: usize, x: &[f32]) -> f32 {
    match w {
        MatRef::F32 { cols, data, .. } => data[r * cols..(r + 1) * cols].iter().zip(x).map(|(a, b)| a * b).sum(),
        MatRef::Bf16 { cols, data, .. } => {
            data[r * cols..(r + 1) * cols].iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
        }
        MatRef::F16 { cols, data, .. } => {
            data[r * cols..(r + 1) * cols].iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
        }
        MatRef::Affine(a) => {
            let rb = a.row_bytes();
            let row = &a.packed[r * rb..(r + 1) * rb];
            let gpr = a.groups_per_row();
            let mut acc = 0.0f32;
            for g in 0..gpr {
                let s = a.scales[r * gpr + g].to_f32();
                let b = a.biases[r * gpr + g].to_f32();
                // sum(s*q*x + b*x) = s*sum(q*x) + b*sum(x)
                let mut qx = 0.0f32;
                let mut sx = 0.0f32;
                for j in 0..a.group_size {
                    let c = g * a.group_size + j;
                    let q = get_bits(row, c, a.bits) as f32;
                    qx += q * x[c];
                    sx += x[c];
                }
                acc += s * qx + b * sx;
            }
            acc
        }
    }
}
