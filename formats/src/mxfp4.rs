//! MXFP4 (OCP Microscaling FP4) as the Hugging Face hub ships gpt-oss's
//! experts, and its scalar reference.
//!
//! A weight matrix `[rows, cols]` (rows = output features, as everywhere in
//! mfx) is cut into blocks of [`BLOCK`] = 32 consecutive elements along
//! `cols`. Each block stores 32 e2m1 codes in 16 bytes and one e8m0 scale
//! byte, 4.25 bits per weight:
//!
//! * **codes**: byte `j` of a block holds element `2j` in its low nibble and
//!   element `2j + 1` in its high nibble (the hub's `*_blocks` layout, and
//!   the same nibble order as mfx's 4-bit affine codes). A code is
//!   `sign << 3 | magnitude`, its value [`E2M1`]`[code]`: 0, 0.5, 1, 1.5, 2,
//!   3, 4, 6 and their negatives.
//! * **scale**: `s` means `2^(s - 127)`; `s = 255` is NaN in the OCP MX
//!   spec, and loaders refuse it ([`Mxfp4Matrix::check_scales`]).
//!
//! Element value: `E2M1[code] * 2^(s - 127)`, which is exact in f32 (a 2-bit
//! significand times a power of two; the smallest, `0.5 * 2^-127`, is a
//! subnormal), so the reference dequantization equals transformers'
//! `convert_moe_packed_tensors` (`ldexp(lut[code], s - 127)`) bit for bit.
//!
//! Rows are whole blocks (`cols` a multiple of 32), row-major: the codes of
//! row `r` are bytes `[r * cols / 2, (r + 1) * cols / 2)` of `blocks`, its
//! scales bytes `[r * cols / 32, (r + 1) * cols / 32)` of `scales`. A hub
//! tensor `*_blocks [E, rows, cols / 32, 16]` with `*_scales [E, rows,
//! cols / 32]` is therefore, per expert, exactly these two byte arrays:
//! experts are sliced out and stored with no requantization.

use crate::quant::QuantError;

/// Elements per block (one scale each).
pub const BLOCK: usize = 32;
/// Code bytes per block.
pub const BLOCK_BYTES: usize = BLOCK / 2;

/// The value of each e2m1 code (bit 3 the sign, bits 0..3 the magnitude).
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// [`E2M1`] doubled, as exact small integers: SIMD kernels look codes up
/// in this table (one byte shuffle) and fold the factor 1/2 into the scale,
/// [`e8m0_to_f32_half`] (llama.cpp's `kvalues_mxfp4` does the same).
pub const E2M1_X2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `2^(s - 128)`, half of [`e8m0_to_f32`], exact (`s = 0` and `1` are
/// subnormals); NaN for [`E8M0_NAN`]. `E2M1_X2[c] * e8m0_to_f32_half(s)
/// == E2M1[c] * e8m0_to_f32(s)` exactly for every code and scale.
pub const fn e8m0_to_f32_half(s: u8) -> f32 {
    f32::from_bits(match s {
        E8M0_NAN => 0x7FC0_0000,
        0 => 0x0020_0000,
        1 => 0x0040_0000,
        s => ((s - 1) as u32) << 23,
    })
}

/// The e8m0 value the OCP MX spec reserves for NaN.
pub const E8M0_NAN: u8 = 0xFF;

/// `2^(s - 127)` for an e8m0 scale byte, exact (`s = 0` is the subnormal
/// `2^-127`); NaN for [`E8M0_NAN`].
pub const fn e8m0_to_f32(s: u8) -> f32 {
    f32::from_bits(match s {
        E8M0_NAN => 0x7FC0_0000,
        0 => 0x0040_0000,
        s => (s as u32) << 23,
    })
}

/// A borrowed MXFP4 matrix `[rows, cols]` (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Mxfp4Matrix<'a> {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols / 2` bytes of codes.
    pub blocks: &'a [u8],
    /// `rows * cols / 32` e8m0 scales.
    pub scales: &'a [u8],
}

/// `cols` must be whole blocks; returns `(code bytes, scale bytes)` of the matrix.
pub fn mxfp4_sizes(rows: usize, cols: usize) -> Result<(usize, usize), QuantError> {
    if !cols.is_multiple_of(BLOCK) {
        return Err(QuantError::ColsNotMultipleOfGroup {
            cols,
            group_size: BLOCK as u32,
        });
    }
    let n = rows.checked_mul(cols).ok_or(QuantError::Overflow)?;
    Ok((n / 2, n / BLOCK))
}

impl<'a> Mxfp4Matrix<'a> {
    /// Checks that both buffers have exactly the length the shape implies.
    pub fn new(
        rows: usize,
        cols: usize,
        blocks: &'a [u8],
        scales: &'a [u8],
    ) -> Result<Self, QuantError> {
        let (nb, ns) = mxfp4_sizes(rows, cols)?;
        if blocks.len() != nb {
            return Err(QuantError::Length {
                what: "mxfp4 blocks",
                expected: nb,
                got: blocks.len(),
            });
        }
        if scales.len() != ns {
            return Err(QuantError::Length {
                what: "mxfp4 scales",
                expected: ns,
                got: scales.len(),
            });
        }
        Ok(Self {
            rows,
            cols,
            blocks,
            scales,
        })
    }

    pub fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// Code bytes of one row.
    pub fn row_code_bytes(&self) -> usize {
        self.cols / 2
    }

    /// Stored bytes one row reads (codes + scales).
    pub fn row_bytes(&self) -> usize {
        self.cols / 2 + self.cols / BLOCK
    }

    /// Refuses a NaN scale (`0xFF`), naming the row and block: a hub file
    /// with one would otherwise turn every output it touches into NaN.
    pub fn check_scales(&self) -> Result<(), QuantError> {
        match self.scales.iter().position(|&s| s == E8M0_NAN) {
            None => Ok(()),
            Some(i) => {
                let bpr = self.blocks_per_row().max(1);
                Err(QuantError::NanScale {
                    row: i / bpr,
                    block: i % bpr,
                })
            }
        }
    }

    /// Reference dequantization of row `r` into `out[..cols]`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bpr = self.blocks_per_row();
        let codes = &self.blocks[r * self.cols / 2..(r + 1) * self.cols / 2];
        let scales = &self.scales[r * bpr..(r + 1) * bpr];
        for ((o, c), &s) in out[..self.cols]
            .chunks_exact_mut(BLOCK)
            .zip(codes.chunks_exact(BLOCK_BYTES))
            .zip(scales)
        {
            let d = e8m0_to_f32(s);
            for (pair, &byte) in o.chunks_exact_mut(2).zip(c) {
                pair[0] = E2M1[(byte & 0x0F) as usize] * d;
                pair[1] = E2M1[(byte >> 4) as usize] * d;
            }
        }
    }

    /// Reference dequantization of the whole matrix, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, o);
        }
        out
    }

    /// A copy of the given rows, in that order, with no requantization:
    /// gpt-oss interleaves gate (even rows) and up (odd rows) in one
    /// `gate_up_proj`, and a row is self-contained (its codes and scales).
    ///
    /// # Panics
    /// If a row index is out of range (a caller bug).
    pub fn gather_rows(&self, rows: &[usize]) -> Mxfp4Owned {
        let (cb, bpr) = (self.row_code_bytes(), self.blocks_per_row());
        let mut blocks = Vec::with_capacity(rows.len() * cb);
        let mut scales = Vec::with_capacity(rows.len() * bpr);
        for &r in rows {
            assert!(r < self.rows, "gather_rows: row {r} of {}", self.rows);
            blocks.extend_from_slice(&self.blocks[r * cb..(r + 1) * cb]);
            scales.extend_from_slice(&self.scales[r * bpr..(r + 1) * bpr]);
        }
        Mxfp4Owned {
            rows: rows.len(),
            cols: self.cols,
            blocks,
            scales,
        }
    }

    /// An owned copy of the bytes.
    pub fn owned(&self) -> Mxfp4Owned {
        Mxfp4Owned {
            rows: self.rows,
            cols: self.cols,
            blocks: self.blocks.to_vec(),
            scales: self.scales.to_vec(),
        }
    }
}

/// An owned MXFP4 matrix, as produced by [`quantize_mxfp4`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mxfp4Owned {
    pub rows: usize,
    pub cols: usize,
    pub blocks: Vec<u8>,
    pub scales: Vec<u8>,
}

impl Mxfp4Owned {
    pub fn view(&self) -> Mxfp4Matrix<'_> {
        Mxfp4Matrix {
            rows: self.rows,
            cols: self.cols,
            blocks: &self.blocks,
            scales: &self.scales,
        }
    }
}

/// `floor(log2(a))` for a finite `a > 0`, exact from the bits (subnormals
/// included); `log2f` can round up to the next integer just below a power
/// of two.
fn floor_log2(a: f32) -> i32 {
    let bits = a.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32;
    if exp != 0 {
        exp - 127
    } else {
        let m = bits & 0x7F_FFFF;
        (31 - m.leading_zeros() as i32) - 149
    }
}

/// The block scale of the OCP MX spec (and llama.cpp's reference
/// quantizer): `2^(floor(log2(amax)) - 2)`, 2 being the exponent of the
/// largest e2m1 value (6 = 1.5 * 2^2), so `amax / scale` lies in `[4, 8)`
/// and the largest elements saturate to +-6 at worst. An all-zero block
/// gets `s = 0`; the exponent is clamped to the e8m0 range `[0, 254]`.
pub fn block_scale(amax: f32) -> u8 {
    if amax.is_nan() || amax <= 0.0 {
        return 0;
    }
    if amax.is_infinite() {
        return 254;
    }
    (floor_log2(amax) - 2 + 127).clamp(0, 254) as u8
}

/// The e2m1 code nearest to `t` (a value already divided by the block
/// scale), ties to the even code as IEEE rounding does (0.25 -> 0, 0.75 ->
/// 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), saturating at +-6.
/// (llama.cpp's reference sends ties to the smaller magnitude instead.)
/// NaN gives code 0; zero magnitudes are always +0.
pub fn e2m1_nearest(t: f32) -> u8 {
    let a = t.abs();
    let m: u8 = if a.is_nan() || a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    if m != 0 && t < 0.0 {
        m | 8
    } else {
        m
    }
}

/// Reference quantizer: per block [`block_scale`] and [`e2m1_nearest`].
pub fn quantize_mxfp4(w: &[f32], rows: usize, cols: usize) -> Result<Mxfp4Owned, QuantError> {
    let (nb, ns) = mxfp4_sizes(rows, cols)?;
    if w.len() != rows * cols {
        return Err(QuantError::Length {
            what: "weights",
            expected: rows * cols * 4,
            got: w.len() * 4,
        });
    }
    let mut blocks = vec![0u8; nb];
    let mut scales = vec![0u8; ns];
    for ((wb, cb), s) in w
        .chunks_exact(BLOCK)
        .zip(blocks.chunks_exact_mut(BLOCK_BYTES))
        .zip(scales.iter_mut())
    {
        let amax = wb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        *s = block_scale(amax);
        // A power of two: dividing by it is exact.
        let inv = 1.0 / e8m0_to_f32(*s);
        for (byte, pair) in cb.iter_mut().zip(wb.chunks_exact(2)) {
            // inv may be 2^127 while the scaled value stays below 8: exact.
            *byte = e2m1_nearest(pair[0] * inv) | (e2m1_nearest(pair[1] * inv) << 4);
        }
    }
    Ok(Mxfp4Owned {
        rows,
        cols,
        blocks,
        scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_is_an_exact_power_of_two() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(128), 2.0);
        assert_eq!(e8m0_to_f32(120), 2f32.powi(-7));
        assert_eq!(e8m0_to_f32(1), 2f32.powi(-126));
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-126) / 2.0);
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
        assert!(e8m0_to_f32(255).is_nan());
    }

    #[test]
    fn doubled_table_times_half_scale_is_exact() {
        for s in 0..=254u8 {
            assert_eq!(e8m0_to_f32_half(s) * 2.0, e8m0_to_f32(s), "s={s}");
            for c in 0..16 {
                assert_eq!(
                    E2M1_X2[c] as f32 * e8m0_to_f32_half(s),
                    E2M1[c] * e8m0_to_f32(s),
                    "s={s} c={c}"
                );
            }
        }
        assert!(e8m0_to_f32_half(255).is_nan());
    }

    #[test]
    fn nibble_order_is_low_even() {
        // One row, one block: byte 0 = 0x71 -> element 0 code 1 (0.5),
        // element 1 code 7 (6.0); byte 1 = 0x9A -> -1.0, -0.5.
        let mut blocks = [0u8; 16];
        blocks[0] = 0x71;
        blocks[1] = 0x9A;
        let m = Mxfp4Matrix::new(1, 32, &blocks, &[128]).unwrap();
        let d = m.dequantize();
        assert_eq!(&d[..4], &[1.0, 12.0, -2.0, -1.0]);
        assert!(d[4..].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn rounding_ties_to_even_codes_and_saturates() {
        let cases = [
            (0.25, 0.0),
            (0.26, 0.5),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.01, 6.0),
            (7.9, 6.0),
            (-0.75, -1.0),
            (-5.5, -6.0),
            (-0.1, 0.0),
        ];
        for (t, want) in cases {
            assert_eq!(E2M1[e2m1_nearest(t) as usize], want, "t={t}");
        }
        assert_eq!(e2m1_nearest(-0.1), 0, "zero is always +0");
        assert_eq!(e2m1_nearest(f32::NAN), 0);
    }

    #[test]
    fn block_scale_follows_the_spec() {
        assert_eq!(block_scale(1.0), 125); // 2^-2: 1.0 -> 4
        assert_eq!(block_scale(7.99), 127); // 7.99 -> 7.99 (saturates to 6)
        assert_eq!(block_scale(8.0), 128);
        // Just below a power of two, where log2f rounds up.
        assert_eq!(block_scale(f32::from_bits(4.0f32.to_bits() - 1)), 126);
        assert_eq!(block_scale(0.0), 0);
        assert_eq!(block_scale(f32::from_bits(1)), 0); // 2^-149 clamps
        assert_eq!(block_scale(f32::MAX), 252);
        assert_eq!(block_scale(f32::INFINITY), 254);
    }

    #[test]
    fn representable_values_roundtrip_exactly() {
        // Every code at a spread of scales, placed so each block's amax is 6 * 2^k.
        let mut w = Vec::new();
        for k in [-126i32, -40, -3, 0, 5, 60] {
            let s = 2f32.powi(k);
            for j in 0..32 {
                w.push(E2M1[(j % 16) as usize] * s);
            }
            let last = w.len() - 1;
            w[last] = 6.0 * s;
        }
        let q = quantize_mxfp4(&w, 2, 96).unwrap();
        assert_eq!(q.view().dequantize(), w);
    }

    #[test]
    fn quantize_error_is_within_half_a_step() {
        let (rows, cols) = (3, 96);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3)
            .collect();
        let q = quantize_mxfp4(&w, rows, cols).unwrap();
        let d = q.view().dequantize();
        for (bw, bd) in w.chunks(32).zip(d.chunks(32)) {
            let amax = bw.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = 2f32.powi(amax.log2().floor() as i32 - 2);
            for (a, b) in bw.iter().zip(bd) {
                // Up to 6 * scale: half the largest gap (4 -> 6); above it
                // the value saturates to 6 * scale.
                let bound = scale.max(a.abs() - 6.0 * scale);
                assert!((a - b).abs() <= bound * (1.0 + 1e-6), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn shapes_and_nan_scales_are_checked() {
        assert!(Mxfp4Matrix::new(1, 48, &[0; 24], &[0; 1]).is_err());
        assert!(Mxfp4Matrix::new(2, 32, &[0; 16], &[0; 2]).is_err());
        let blocks = [0u8; 64];
        let m = Mxfp4Matrix::new(2, 64, &blocks, &[1, 2, 3, 255]).unwrap();
        assert_eq!(
            m.check_scales(),
            Err(QuantError::NanScale { row: 1, block: 1 })
        );
    }

    #[test]
    fn gather_rows_copies_whole_rows() {
        let w: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = quantize_mxfp4(&w, 4, 64).unwrap();
        let d = q.view().dequantize();
        let odd = q.view().gather_rows(&[1, 3]);
        let dd = odd.view().dequantize();
        assert_eq!(&dd[..64], &d[64..128]);
        assert_eq!(&dd[64..], &d[192..256]);
    }
}
