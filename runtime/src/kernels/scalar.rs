//! The scalar reference kernels: straightforward loops, f32 accumulation.
//! Every SIMD tier is tested against these. `matmul` shares the row-chunk
//! parallelism of the other tiers (it is also the fallback on CPUs without
//! SIMD), but the per-row arithmetic is the plain definition.

use super::parallel::{for_row_chunks, Out};
use super::{check_matmul, Backend, MatRef, Tier};
use half::{bf16, f16};
use mfx_formats::mxfp4::{e8m0_to_f32, BLOCK, BLOCK_BYTES, E2M1};
use mfx_formats::quant::get_bits;

pub struct Scalar;

impl Backend for Scalar {
    fn tier(&self) -> Tier {
        Tier::Scalar
    }

    fn matmul(&self, w: &MatRef<'_>, x: &[f32], n: usize, y: &mut [f32]) {
        check_matmul(w, x, n, y);
        let (rows, cols) = (w.rows(), w.cols());
        let out = Out::new(y, n, rows);
        for_row_chunks(rows, w.row_bytes(), n, |range| {
            for r in range {
                for i in 0..n {
                    let v = row_dot(w, r, &x[i * cols..(i + 1) * cols]);
                    // SAFETY: r is in this task's range; y is borrowed for the call.
                    unsafe { out.write(i, r, v) };
                }
            }
        });
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
        MatRef::F32 { cols, data, .. } => data[r * cols..(r + 1) * cols]
            .iter()
            .zip(x)
            .map(|(a, b)| a * b)
            .sum(),
        MatRef::Bf16 { cols, data, .. } => data[r * cols..(r + 1) * cols]
            .iter()
            .zip(x)
            .map(|(a, b)| a.to_f32() * b)
            .sum(),
        MatRef::F16 { cols, data, .. } => data[r * cols..(r + 1) * cols]
            .iter()
            .zip(x)
            .map(|(a, b)| a.to_f32() * b)
            .sum(),
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
        MatRef::Mxfp4(m) => {
            let bpr = m.blocks_per_row();
            let codes = &m.blocks[r * bpr * BLOCK_BYTES..(r + 1) * bpr * BLOCK_BYTES];
            let scales = &m.scales[r * bpr..(r + 1) * bpr];
            let mut acc = 0.0f32;
            for ((c, xb), &s) in codes
                .chunks_exact(BLOCK_BYTES)
                .zip(x.chunks_exact(BLOCK))
                .zip(scales)
            {
                // sum(v * d * x) = d * sum(v * x): the power-of-two scale once per block.
                let mut bx = 0.0f32;
                for (&byte, xp) in c.iter().zip(xb.chunks_exact(2)) {
                    bx += E2M1[(byte & 0x0F) as usize] * xp[0];
                    bx += E2M1[(byte >> 4) as usize] * xp[1];
                }
                acc += e8m0_to_f32(s) * bx;
            }
            acc
        }
    }
}

/// Reference for [`Backend::dot_f16`]: each element widened exactly, summed in order.
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f16: length mismatch");
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

/// Reference for [`Backend::axpy_f16`].
pub fn axpy_f16(alpha: f32, x: &[f16], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy_f16: length mismatch");
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi.to_f32();
    }
}

pub fn convert_f16_to_f32(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "convert_f16_to_f32: length mismatch");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

pub fn convert_f32_to_f16(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "convert_f32_to_f16: length mismatch");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(*s);
    }
}

pub fn convert_bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "convert_bf16_to_f32: length mismatch");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

pub fn convert_f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "convert_f32_to_bf16: length mismatch");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(*s);
    }
}
