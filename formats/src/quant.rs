//! Quantization layouts and their scalar reference.
//!
//! Group-wise affine quantization, bit-compatible with MLX's `mx.quantize`
//! (mode "affine"): a weight matrix `[rows, cols]` is cut into groups of
//! `group_size` consecutive elements along `cols` (the input dimension). Each
//! group stores a bf16 `scale` and bf16 `bias`; element `w ~= scale * q + bias`
//! with `q` an unsigned `bits`-bit integer.
//!
//! Packing: each row is a little-endian bit stream, element `i` of the row in
//! bits `[i*bits, (i+1)*bits)`. For 2/4/8 bits this is exactly MLX's uint32
//! words filled low bits first; for 3 and 6 bits it is MLX's 8-in-3-bytes and
//! 4-in-3-bytes packing. A row occupies `cols * bits / 8` bytes, and MLX stores
//! the whole matrix as uint32 `[rows, cols * bits / 32]`, so `cols * bits` must
//! be a multiple of 32.
//!
//! Everything here is the *reference*: simple, obviously right, and what the
//! SIMD kernels in `mfx-runtime` are tested against.

use half::bf16;
use serde::{Deserialize, Serialize};

/// Bit widths the affine layout supports.
pub const AFFINE_BITS: [u8; 5] = [2, 3, 4, 6, 8];

/// How one tensor's elements are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Scheme {
    F32,
    F16,
    Bf16,
    /// Group-wise affine, see the module docs. Serialized as e.g. `q4g64`.
    Affine {
        bits: u8,
        group_size: u32,
    },
    /// OCP MXFP4 (e2m1 codes, one e8m0 scale per 32), the layout of the
    /// hub's gpt-oss experts: see [`crate::mxfp4`]. Serialized as `mxfp4`.
    Mxfp4,
}

impl Scheme {
    pub fn affine(bits: u8, group_size: u32) -> Result<Self, QuantError> {
        let s = Scheme::Affine { bits, group_size };
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), QuantError> {
        if let Scheme::Affine { bits, group_size } = *self {
            if !AFFINE_BITS.contains(&bits) {
                return Err(QuantError::UnsupportedBits(bits));
            }
            if !(group_size == 32 || group_size == 64 || group_size == 128) {
                return Err(QuantError::UnsupportedGroupSize(group_size));
            }
        }
        Ok(())
    }

    /// Bits per weight including the per-group scale and bias.
    pub fn bits_per_weight(&self) -> f64 {
        match *self {
            Scheme::F32 => 32.0,
            Scheme::F16 | Scheme::Bf16 => 16.0,
            Scheme::Affine { bits, group_size } => bits as f64 + 32.0 / group_size as f64,
            Scheme::Mxfp4 => 4.25,
        }
    }

    /// Bytes of a `[rows, cols]` matrix in this scheme (packed + scales + biases).
    pub fn matrix_bytes(&self, rows: usize, cols: usize) -> Result<usize, QuantError> {
        let n = rows.checked_mul(cols).ok_or(QuantError::Overflow)?;
        Ok(match *self {
            Scheme::F32 => n * 4,
            Scheme::F16 | Scheme::Bf16 => n * 2,
            Scheme::Affine { bits, group_size } => {
                check_affine_shape(cols, bits, group_size)?;
                let packed = n / 8 * bits as usize;
                let groups = n / group_size as usize;
                packed + groups * 4
            }
            Scheme::Mxfp4 => {
                let (codes, scales) = crate::mxfp4::mxfp4_sizes(rows, cols)?;
                codes + scales
            }
        })
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scheme::F32 => f.write_str("f32"),
            Scheme::F16 => f.write_str("f16"),
            Scheme::Bf16 => f.write_str("bf16"),
            Scheme::Affine { bits, group_size } => write!(f, "q{bits}g{group_size}"),
            Scheme::Mxfp4 => f.write_str("mxfp4"),
        }
    }
}

impl std::str::FromStr for Scheme {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Scheme::F32),
            "f16" => Ok(Scheme::F16),
            "bf16" => Ok(Scheme::Bf16),
            "mxfp4" => Ok(Scheme::Mxfp4),
            _ => {
                let bad = || QuantError::BadSchemeName(s.to_string());
                let rest = s.strip_prefix('q').ok_or_else(bad)?;
                let (b, g) = rest.split_once('g').ok_or_else(bad)?;
                let bits: u8 = b.parse().map_err(|_| bad())?;
                let gs: u32 = g.parse().map_err(|_| bad())?;
                Scheme::affine(bits, gs)
            }
        }
    }
}

impl TryFrom<String> for Scheme {
    type Error = QuantError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Scheme> for String {
    fn from(s: Scheme) -> String {
        s.to_string()
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum QuantError {
    #[error("unsupported affine bit width {0} (expected one of 2, 3, 4, 6, 8)")]
    UnsupportedBits(u8),
    #[error("unsupported group size {0} (expected 32, 64 or 128)")]
    UnsupportedGroupSize(u32),
    #[error(
        "bad quantization scheme name {0:?} (expected f32, f16, bf16, mxfp4 or qBITSgGROUP such as q4g64)"
    )]
    BadSchemeName(String),
    #[error("{cols} input columns is not a multiple of the group size {group_size}")]
    ColsNotMultipleOfGroup { cols: usize, group_size: u32 },
    #[error("size arithmetic overflowed")]
    Overflow,
    #[error(
        "mxfp4 scale of row {row}, block {block} is 0xFF, which the OCP MX spec defines as NaN"
    )]
    NanScale { row: usize, block: usize },
    #[error("buffer length mismatch for {what}: expected {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}

fn check_affine_shape(cols: usize, bits: u8, group_size: u32) -> Result<(), QuantError> {
    Scheme::Affine { bits, group_size }.validate()?;
    if !cols.is_multiple_of(group_size as usize) {
        return Err(QuantError::ColsNotMultipleOfGroup { cols, group_size });
    }
    Ok(())
}

/// A borrowed affine-quantized matrix `[rows, cols]`.
///
/// `packed` holds `rows * cols * bits / 8` bytes (row-major bit streams);
/// `scales` and `biases` hold `rows * cols / group_size` values each.
#[derive(Debug, Clone, Copy)]
pub struct AffineMatrix<'a> {
    pub rows: usize,
    pub cols: usize,
    pub bits: u8,
    pub group_size: usize,
    pub packed: &'a [u8],
    pub scales: &'a [bf16],
    pub biases: &'a [bf16],
}

impl<'a> AffineMatrix<'a> {
    /// Checks that every buffer has exactly the length the shape implies.
    pub fn new(
        rows: usize,
        cols: usize,
        bits: u8,
        group_size: usize,
        packed: &'a [u8],
        scales: &'a [bf16],
        biases: &'a [bf16],
    ) -> Result<Self, QuantError> {
        check_affine_shape(cols, bits, group_size as u32)?;
        let n = rows.checked_mul(cols).ok_or(QuantError::Overflow)?;
        let pb = n / 8 * bits as usize;
        if packed.len() != pb {
            return Err(QuantError::Length {
                what: "packed weights",
                expected: pb,
                got: packed.len(),
            });
        }
        let g = n / group_size;
        if scales.len() != g {
            return Err(QuantError::Length {
                what: "scales",
                expected: g * 2,
                got: scales.len() * 2,
            });
        }
        if biases.len() != g {
            return Err(QuantError::Length {
                what: "biases",
                expected: g * 2,
                got: biases.len() * 2,
            });
        }
        Ok(Self {
            rows,
            cols,
            bits,
            group_size,
            packed,
            scales,
            biases,
        })
    }

    pub fn row_bytes(&self) -> usize {
        self.cols * self.bits as usize / 8
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group_size
    }

    /// Reference dequantization of row `r` into `out[..cols]`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let row = &self.packed[r * rb..(r + 1) * rb];
        let gpr = self.groups_per_row();
        for (c, o) in out[..self.cols].iter_mut().enumerate() {
            let q = get_bits(row, c, self.bits);
            let g = r * gpr + c / self.group_size;
            *o = self.scales[g].to_f32() * q as f32 + self.biases[g].to_f32();
        }
    }

    /// Reference dequantization of the whole matrix, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            self.dequantize_row(r, &mut out[r * self.cols..(r + 1) * self.cols]);
        }
        out
    }
}

/// Reads element `i` (a `bits`-bit unsigned integer) from a little-endian bit stream.
#[inline]
pub fn get_bits(stream: &[u8], i: usize, bits: u8) -> u32 {
    let bit = i * bits as usize;
    let byte = bit / 8;
    let shift = bit % 8;
    // An element spans at most 2 bytes for bits <= 8 (shift + bits <= 15).
    let lo = stream[byte] as u32;
    let hi = if shift + bits as usize > 8 {
        stream[byte + 1] as u32
    } else {
        0
    };
    ((lo | (hi << 8)) >> shift) & ((1u32 << bits) - 1)
}

/// Writes element `i` into a little-endian bit stream (the bits must be zero beforehand).
#[inline]
pub fn put_bits(stream: &mut [u8], i: usize, bits: u8, q: u32) {
    let bit = i * bits as usize;
    let byte = bit / 8;
    let shift = bit % 8;
    let v = (q & ((1u32 << bits) - 1)) << shift;
    stream[byte] |= v as u8;
    if shift + bits as usize > 8 {
        stream[byte + 1] |= (v >> 8) as u8;
    }
}

/// An owned affine-quantized matrix, as produced by [`quantize`].
#[derive(Debug, Clone, PartialEq)]
pub struct AffineOwned {
    pub rows: usize,
    pub cols: usize,
    pub bits: u8,
    pub group_size: usize,
    pub packed: Vec<u8>,
    pub scales: Vec<bf16>,
    pub biases: Vec<bf16>,
}

impl AffineOwned {
    pub fn view(&self) -> AffineMatrix<'_> {
        AffineMatrix {
            rows: self.rows,
            cols: self.cols,
            bits: self.bits,
            group_size: self.group_size,
            packed: &self.packed,
            scales: &self.scales,
            biases: &self.biases,
        }
    }
}

/// Reference quantizer, following MLX's affine rule: per group the end of the
/// range with the larger magnitude (`edge`) becomes the bias (code 0), the
/// scale spans `[min, max]` and carries the sign that points from `edge` into
/// the range, and the scale is snapped so that 0.0 is exactly representable
/// (`edge / scale` an integer). Scales and biases are rounded to bf16 *before*
/// the codes are chosen, so the codes are optimal for the stored parameters.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    group_size: usize,
) -> Result<AffineOwned, QuantError> {
    check_affine_shape(cols, bits, group_size as u32)?;
    let n = rows.checked_mul(cols).ok_or(QuantError::Overflow)?;
    if w.len() != n {
        return Err(QuantError::Length {
            what: "weights",
            expected: n * 4,
            got: w.len() * 4,
        });
    }
    let n_bins = ((1u32 << bits) - 1) as f32;
    let groups = n / group_size;
    let mut packed = vec![0u8; n / 8 * bits as usize];
    let mut scales = Vec::with_capacity(groups);
    let mut biases = Vec::with_capacity(groups);
    let rb = cols * bits as usize / 8;
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let prow = &mut packed[r * rb..(r + 1) * rb];
        for (gi, g) in row.chunks_exact(group_size).enumerate() {
            let (s_bf, b_bf) = group_params(g, n_bins);
            let sf = s_bf.to_f32();
            let bfv = b_bf.to_f32();
            for (j, &v) in g.iter().enumerate() {
                put_bits(
                    prow,
                    gi * group_size + j,
                    bits,
                    code(v, sf, bfv, n_bins) as u32,
                );
            }
            scales.push(s_bf);
            biases.push(b_bf);
        }
    }
    Ok(AffineOwned {
        rows,
        cols,
        bits,
        group_size,
        packed,
        scales,
        biases,
    })
}

/// The code of `v` for stored parameters `scale` and `bias` (as f32):
/// nearest level, ties to even, clamped to `[0, n_bins]`, NaN to 0. The one
/// rounding rule of every affine quantizer (this one, prep's GPTQ).
#[inline]
pub fn code(v: f32, scale: f32, bias: f32, n_bins: f32) -> f32 {
    let q = ((v - bias) / scale).round_ties_even();
    if q.is_nan() {
        0.0
    } else {
        q.clamp(0.0, n_bins)
    }
}

/// MLX's per-group parameters (see [`quantize`]): `(scale, bias)` for the
/// values `g` and `n_bins = 2^bits - 1`. Public for prep's GPTQ, which
/// chooses each group's parameters from its error-corrected weights and
/// must store them exactly as this quantizer would.
pub fn group_params(g: &[f32], n_bins: f32) -> (bf16, bf16) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in g {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let mask = lo.abs() > hi.abs();
    let mut scale = ((hi - lo) / n_bins).max(1e-7);
    if !mask {
        scale = -scale;
    }
    let edge = if mask { lo } else { hi };
    let q0 = (edge / scale).round_ties_even();
    if q0 != 0.0 {
        scale = edge / q0;
    }
    (bf16::from_f32(scale), bf16::from_f32(edge))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_roundtrip_all_widths() {
        for &bits in &AFFINE_BITS {
            let n = 64;
            let mut s = vec![0u8; n * bits as usize / 8];
            for i in 0..n {
                put_bits(&mut s, i, bits, (i as u32 * 7 + 3) & ((1 << bits) - 1));
            }
            for i in 0..n {
                assert_eq!(
                    get_bits(&s, i, bits),
                    (i as u32 * 7 + 3) & ((1 << bits) - 1),
                    "bits={bits} i={i}"
                );
            }
        }
    }

    #[test]
    fn four_bit_matches_mlx_word_layout() {
        // MLX packs 8 nibbles per uint32, element 0 in the lowest bits.
        let mut s = vec![0u8; 4];
        for i in 0..8 {
            put_bits(&mut s, i, 4, i as u32);
        }
        assert_eq!(u32::from_le_bytes([s[0], s[1], s[2], s[3]]), 0x7654_3210);
    }

    #[test]
    fn quantize_error_is_bounded() {
        let rows = 4;
        let cols = 128;
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.1)
            .collect();
        for &bits in &AFFINE_BITS {
            let q = quantize(&w, rows, cols, bits, 64).unwrap();
            let d = q.view().dequantize();
            let step = 0.2 / ((1u32 << bits) - 1) as f32;
            for (a, b) in w.iter().zip(&d) {
                assert!(
                    (a - b).abs() <= step * 1.01 + 2e-3,
                    "bits={bits} {a} vs {b}"
                );
            }
        }
    }
}
