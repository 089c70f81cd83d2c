//! NEON kernels (aarch64).
//!
//! The same structure as `avx2.rs` with 4-lane vectors: a weight row is read
//! in 32-element blocks decoded into eight `float32x4_t` (affine codes
//! dequantized with one FMA), each multiplied into up to 8 inputs. 4- and
//! 2-bit codes are decoded in split order (all low nibbles, then all high
//! nibbles) and x is permuted once per call to match; 3- and 6-bit codes are
//! unpacked from 24-bit words with scalar shifts (NEON has no cheap
//! cross-byte gather) and then go through the same SIMD dot. No decoder reads
//! past its block, so unlike AVX2 no row padding is needed.
//!
//! NEON is part of the aarch64 baseline; [`Neon::detect`] still asks the OS
//! so the dispatch logic is uniform. This file is type-checked for
//! `aarch64-unknown-linux-gnu` but has not been run on aarch64 hardware; the
//! shared tests in `runtime/tests/kernels.rs` run it against the scalar
//! reference on any aarch64 CI machine.

use super::parallel::{for_row_chunks, Out};
use super::{check_matmul, Backend, MatRef, Tier};
use half::{bf16, f16};
use mfx_formats::mxfp4::Mxfp4Matrix;
use mfx_formats::quant::AffineMatrix;
use std::arch::aarch64::*;
use std::ops::Range;

/// Inputs processed per pass over a weight row (32 NEON registers leave room
/// for 8 accumulators, the decoded block and x loads).
const NB: usize = 8;

/// Marker that NEON was detected; see the module docs.
pub struct Neon {
    _private: (),
}

static NEON: Neon = Neon { _private: () };

impl Neon {
    pub fn detect() -> Option<&'static Neon> {
        if std::arch::is_aarch64_feature_detected!("neon") {
            Some(&NEON)
        } else {
            None
        }
    }
}

impl Backend for Neon {
    fn tier(&self) -> Tier {
        Tier::Neon
    }

    fn matmul(&self, w: &MatRef<'_>, x: &[f32], n: usize, y: &mut [f32]) {
        check_matmul(w, x, n, y);
        let out = Out::new(y, n, w.rows());
        match w {
            MatRef::F32 { rows, cols, data } => float_matmul(data, *rows, *cols, x, n, out),
            MatRef::Bf16 { rows, cols, data } => float_matmul(data, *rows, *cols, x, n, out),
            MatRef::F16 { rows, cols, data } => float_matmul(data, *rows, *cols, x, n, out),
            MatRef::Affine(a) => match a.bits {
                2 => affine_matmul::<Q2>(a, x, n, out),
                3 => affine_matmul::<Q3>(a, x, n, out),
                4 => affine_matmul::<Q4>(a, x, n, out),
                6 => affine_matmul::<Q6>(a, x, n, out),
                8 => affine_matmul::<Q8>(a, x, n, out),
                b => unreachable!("affine bit width {b} passed check_matmul"),
            },
            MatRef::Mxfp4(m) => mxfp4_matmul(m, x, n, out),
        }
    }

    fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot: length mismatch");
        // SAFETY: NEON detected; lengths checked.
        unsafe { dot_f32(a, b) }
    }

    fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), y.len(), "axpy: length mismatch");
        // SAFETY: as above.
        unsafe { axpy_f32(alpha, x, y) }
    }

    fn convert_bf16_to_f32(&self, src: &[bf16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "convert_bf16_to_f32: length mismatch");
        let mut i = 0;
        while i + 4 <= src.len() {
            // SAFETY: NEON detected; i + 4 <= len for both slices.
            unsafe { vst1q_f32(dst.as_mut_ptr().add(i), bf16x4(src.as_ptr().add(i))) };
            i += 4;
        }
        for j in i..src.len() {
            dst[j] = src[j].to_f32();
        }
    }
    // f16 conversions: the defaults call `half`, which uses the FP16
    // conversion instructions on aarch64 when the CPU has them.
}

/// Runs `$f::<..., NB>` for a runtime block size `nb` in `1..=8`.
macro_rules! with_nb {
    ($nb:expr, $f:ident($($arg:expr),* $(,)?)) => {
        with_nb!($nb, $f::<>($($arg),*))
    };
    ($nb:expr, $f:ident::<$($t:ty),*>($($arg:expr),* $(,)?)) => {
        match $nb {
            1 => $f::<$($t,)* 1>($($arg),*),
            2 => $f::<$($t,)* 2>($($arg),*),
            3 => $f::<$($t,)* 3>($($arg),*),
            4 => $f::<$($t,)* 4>($($arg),*),
            5 => $f::<$($t,)* 5>($($arg),*),
            6 => $f::<$($t,)* 6>($($arg),*),
            7 => $f::<$($t,)* 7>($($arg),*),
            _ => $f::<$($t,)* 8>($($arg),*),
        }
    };
}

/// Independent accumulator chains per input (FMA latency hiding), the
/// same for every batch size, so a row's result for one input does not
/// depend on the other inputs of the call (batch invariance, as in
/// `avx2.rs`); 8 inputs x 2 chains fit the 32 NEON registers.
const CHAINS: usize = 2;

#[inline]
#[target_feature(enable = "neon")]
unsafe fn bf16x4(p: *const bf16) -> float32x4_t {
    unsafe {
        let h = vld1_u16(p as *const u16);
        vreinterpretq_f32_u32(vshlq_n_u32::<16>(vmovl_u16(h)))
    }
}

// ---------------------------------------------------------------- float weights

trait FloatLoad: Copy + Sync {
    /// Loads 4 elements as f32. # Safety: `p..p+4` readable, NEON available.
    unsafe fn load4(p: *const Self) -> float32x4_t;
    fn to_f32(self) -> f32;
}

impl FloatLoad for f32 {
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load4(p: *const f32) -> float32x4_t {
        unsafe { vld1q_f32(p) }
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl FloatLoad for bf16 {
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load4(p: *const bf16) -> float32x4_t {
        unsafe { bf16x4(p) }
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl FloatLoad for f16 {
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load4(p: *const f16) -> float32x4_t {
        // Stable Rust has no float16x4_t intrinsics; `half` converts with the
        // FP16 instructions when present. f16 weights are rare (the KV cache
        // goes through the bulk conversion instead).
        let v = unsafe {
            [
                (*p).to_f32(),
                (*p.add(1)).to_f32(),
                (*p.add(2)).to_f32(),
                (*p.add(3)).to_f32(),
            ]
        };
        unsafe { vld1q_f32(v.as_ptr()) }
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

fn float_matmul<T: FloatLoad>(data: &[T], rows: usize, cols: usize, x: &[f32], n: usize, out: Out) {
    for_row_chunks(rows, cols * std::mem::size_of::<T>(), n, |range| {
        let mut i0 = 0;
        while i0 < n {
            let nb = (n - i0).min(NB);
            // SAFETY: NEON detected; check_matmul verified the lengths; rows
            // in range belong to this task.
            unsafe { with_nb!(nb, float_rows::<T>(data, cols, x, i0, range.clone(), out)) };
            i0 += nb;
        }
    });
}

#[target_feature(enable = "neon")]
unsafe fn float_rows<T: FloatLoad, const N: usize>(
    data: &[T],
    cols: usize,
    x: &[f32],
    i0: usize,
    rows: Range<usize>,
    out: Out,
) {
    let xp = unsafe { x.as_ptr().add(i0 * cols) };
    for r in rows {
        let res = unsafe { float_dot::<T, N>(data.as_ptr().add(r * cols), cols, xp) };
        for (i, v) in res.into_iter().enumerate() {
            unsafe { out.write(i0 + i, r, v) };
        }
    }
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn float_dot<T: FloatLoad, const N: usize>(
    w: *const T,
    cols: usize,
    x: *const f32,
) -> [f32; N] {
    let ka = CHAINS;
    let mut acc = [[vdupq_n_f32(0.0); 4]; N];
    let mut c = 0;
    unsafe {
        while c + 16 <= cols {
            for k in 0..4 {
                let wv = T::load4(w.add(c + 4 * k));
                for (i, a) in acc.iter_mut().enumerate() {
                    a[k % ka] = vfmaq_f32(a[k % ka], wv, vld1q_f32(x.add(i * cols + c + 4 * k)));
                }
            }
            c += 16;
        }
        while c + 4 <= cols {
            let wv = T::load4(w.add(c));
            for (i, a) in acc.iter_mut().enumerate() {
                a[0] = vfmaq_f32(a[0], wv, vld1q_f32(x.add(i * cols + c)));
            }
            c += 4;
        }
    }
    let mut res = [0.0f32; N];
    for (i, a) in acc.iter().enumerate() {
        let mut v = vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
        for cc in c..cols {
            unsafe { v += (*w.add(cc)).to_f32() * *x.add(i * cols + cc) };
        }
        res[i] = v;
    }
    res
}

// ---------------------------------------------------------------- affine weights

trait Decode {
    const BITS: usize;
    /// Lane `L` of the decoded block (vector `L / 4`, lane `L % 4`) holds
    /// element `PERM[L]`; `None` = natural order.
    const PERM: Option<[u8; 32]>;
    /// Decodes the 32 codes at `p` (exactly `4 * BITS` bytes are read).
    /// # Safety: those bytes readable, NEON available.
    unsafe fn decode32(p: *const u8) -> [float32x4_t; 8];
}

/// 16 bytes (as codes) to four f32 vectors, in byte order.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn u8x16_to_f32(v: uint8x16_t) -> [float32x4_t; 4] {
    let l = vmovl_u8(vget_low_u8(v));
    let h = vmovl_u8(vget_high_u8(v));
    [
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(l))),
        vcvtq_f32_u32(vmovl_u16(vget_high_u16(l))),
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(h))),
        vcvtq_f32_u32(vmovl_u16(vget_high_u16(h))),
    ]
}

fn concat(a: [float32x4_t; 4], b: [float32x4_t; 4]) -> [float32x4_t; 8] {
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

struct Q8;
impl Decode for Q8 {
    const BITS: usize = 8;
    const PERM: Option<[u8; 32]> = None;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn decode32(p: *const u8) -> [float32x4_t; 8] {
        unsafe { concat(u8x16_to_f32(vld1q_u8(p)), u8x16_to_f32(vld1q_u8(p.add(16)))) }
    }
}

struct Q4;
impl Decode for Q4 {
    const BITS: usize = 4;
    // Low nibbles of bytes 0..16 are elements 0, 2, .., 30; high nibbles 1, 3, .., 31.
    const PERM: Option<[u8; 32]> = Some(q4_perm());
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn decode32(p: *const u8) -> [float32x4_t; 8] {
        unsafe {
            let v = vld1q_u8(p);
            let lo = vandq_u8(v, vdupq_n_u8(0x0F));
            let hi = vshrq_n_u8::<4>(v);
            concat(u8x16_to_f32(lo), u8x16_to_f32(hi))
        }
    }
}

const fn q4_perm() -> [u8; 32] {
    let mut p = [0u8; 32];
    let mut l = 0;
    while l < 32 {
        p[l] = if l < 16 {
            2 * l as u8
        } else {
            2 * (l as u8 - 16) + 1
        };
        l += 1;
    }
    p
}

struct Q2;
impl Decode for Q2 {
    const BITS: usize = 2;
    // Field s of byte j is element 4j + s; vector pair (2s, 2s+1) holds field s.
    const PERM: Option<[u8; 32]> = Some(q2_perm());
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn decode32(p: *const u8) -> [float32x4_t; 8] {
        unsafe {
            let v = vld1_u8(p);
            let m = vdup_n_u8(3);
            let f = [
                vand_u8(v, m),
                vand_u8(vshr_n_u8::<2>(v), m),
                vand_u8(vshr_n_u8::<4>(v), m),
                vshr_n_u8::<6>(v),
            ];
            let mut out = [vdupq_n_f32(0.0); 8];
            for (s, fs) in f.into_iter().enumerate() {
                let w = vmovl_u8(fs);
                out[2 * s] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(w)));
                out[2 * s + 1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(w)));
            }
            out
        }
    }
}

const fn q2_perm() -> [u8; 32] {
    let mut p = [0u8; 32];
    let mut l = 0;
    while l < 32 {
        p[l] = (4 * (l % 8) + l / 8) as u8;
        l += 1;
    }
    p
}

/// Unpacks `32` codes of `bits` (3 or 6) from 24-bit little-endian words:
/// both widths tile 3 bytes exactly (8 x 3 bits, 4 x 6 bits).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn decode_24bit_words(p: *const u8, bits: usize) -> [float32x4_t; 8] {
    let per_word = 24 / bits;
    let mask = (1u32 << bits) - 1;
    let mut buf = [0.0f32; 32];
    for wi in 0..32 / per_word {
        let w = unsafe {
            *p.add(3 * wi) as u32
                | (*p.add(3 * wi + 1) as u32) << 8
                | (*p.add(3 * wi + 2) as u32) << 16
        };
        for j in 0..per_word {
            buf[wi * per_word + j] = ((w >> (bits * j)) & mask) as f32;
        }
    }
    let b = buf.as_ptr();
    unsafe {
        [
            vld1q_f32(b),
            vld1q_f32(b.add(4)),
            vld1q_f32(b.add(8)),
            vld1q_f32(b.add(12)),
            vld1q_f32(b.add(16)),
            vld1q_f32(b.add(20)),
            vld1q_f32(b.add(24)),
            vld1q_f32(b.add(28)),
        ]
    }
}

struct Q3;
impl Decode for Q3 {
    const BITS: usize = 3;
    const PERM: Option<[u8; 32]> = None;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn decode32(p: *const u8) -> [float32x4_t; 8] {
        unsafe { decode_24bit_words(p, 3) }
    }
}

struct Q6;
impl Decode for Q6 {
    const BITS: usize = 6;
    const PERM: Option<[u8; 32]> = None;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn decode32(p: *const u8) -> [float32x4_t; 8] {
        unsafe { decode_24bit_words(p, 6) }
    }
}

fn permute_x(x: &[f32], perm: &[u8; 32]) -> Vec<f32> {
    let mut xp = vec![0.0f32; x.len()];
    for (dst, src) in xp.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
        for (d, &p) in dst.iter_mut().zip(perm) {
            *d = src[p as usize];
        }
    }
    xp
}

fn affine_matmul<D: Decode>(a: &AffineMatrix<'_>, x: &[f32], n: usize, out: Out) {
    let permuted;
    let x = match D::PERM {
        Some(p) => {
            permuted = permute_x(x, &p);
            &permuted[..]
        }
        None => x,
    };
    let row_bytes = a.row_bytes() + a.groups_per_row() * 4;
    for_row_chunks(a.rows, row_bytes, n, |range| {
        let mut i0 = 0;
        while i0 < n {
            let nb = (n - i0).min(NB);
            // SAFETY: NEON detected; check_matmul verified every buffer length.
            unsafe { with_nb!(nb, affine_rows::<D>(a, x, i0, range.clone(), out)) };
            i0 += nb;
        }
    });
}

#[target_feature(enable = "neon")]
unsafe fn affine_rows<D: Decode, const N: usize>(
    a: &AffineMatrix<'_>,
    x: &[f32],
    i0: usize,
    rows: Range<usize>,
    out: Out,
) {
    let rb = a.row_bytes();
    let gpr = a.groups_per_row();
    let xp = unsafe { x.as_ptr().add(i0 * a.cols) };
    for r in rows {
        let res = unsafe {
            affine_dot::<D, N>(
                a.packed.as_ptr().add(r * rb),
                a.scales.as_ptr().add(r * gpr),
                a.biases.as_ptr().add(r * gpr),
                a.cols,
                a.group_size,
                xp,
            )
        };
        for (i, v) in res.into_iter().enumerate() {
            unsafe { out.write(i0 + i, r, v) };
        }
    }
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn affine_dot<D: Decode, const N: usize>(
    row: *const u8,
    scales: *const bf16,
    biases: *const bf16,
    cols: usize,
    group_size: usize,
    x: *const f32,
) -> [f32; N] {
    let ka = CHAINS;
    let mut acc = [[vdupq_n_f32(0.0); 4]; N];
    let blocks_per_group = group_size / 32;
    let mut c = 0;
    for g in 0..cols / group_size {
        let (s, b) = unsafe { ((*scales.add(g)).to_f32(), (*biases.add(g)).to_f32()) };
        let (s, b) = (vdupq_n_f32(s), vdupq_n_f32(b));
        for _ in 0..blocks_per_group {
            let q = unsafe { D::decode32(row.add(c * D::BITS / 8)) };
            for (k, qk) in q.into_iter().enumerate() {
                let wv = vfmaq_f32(b, qk, s);
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = unsafe { vld1q_f32(x.add(i * cols + c + 4 * k)) };
                    a[k % ka] = vfmaq_f32(a[k % ka], wv, xv);
                }
            }
            c += 32;
        }
    }
    let mut res = [0.0f32; N];
    for (r, a) in res.iter_mut().zip(&acc) {
        *r = vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
    }
    res
}

// ---------------------------------------------------------------- mxfp4 weights
//
// A block's 16 bytes split into low nibbles (even elements) and high nibbles
// (odd), each looked up as the doubled e2m1 integers (`E2M1_X2`) with one
// `tbl`, widened to f32 and multiplied by the block's half-scale
// (`E8M0_HALF`): exact weights, f32 activations, x permuted once to the
// q4 split order.

fn mxfp4_matmul(m: &Mxfp4Matrix<'_>, x: &[f32], n: usize, out: Out) {
    let xp = permute_x(x, &q4_perm());
    for_row_chunks(m.rows, m.row_bytes(), n, |range| {
        let mut sbuf = vec![0.0f32; m.blocks_per_row()];
        let mut i0 = 0;
        while i0 < n {
            let nb = (n - i0).min(NB);
            // SAFETY: NEON detected; check_matmul verified every buffer length.
            unsafe { with_nb!(nb, mxfp4_rows(m, &xp, i0, range.clone(), out, &mut sbuf)) };
            i0 += nb;
        }
    });
}

#[target_feature(enable = "neon")]
unsafe fn mxfp4_rows<const N: usize>(
    m: &Mxfp4Matrix<'_>,
    x: &[f32],
    i0: usize,
    rows: Range<usize>,
    out: Out,
    sbuf: &mut [f32],
) {
    let (cb, bpr) = (m.row_code_bytes(), m.blocks_per_row());
    let lut = unsafe { vld1q_s8(mfx_formats::mxfp4::E2M1_X2.as_ptr()) };
    let xp = unsafe { x.as_ptr().add(i0 * m.cols) };
    for r in rows {
        for (o, &s) in sbuf.iter_mut().zip(&m.scales[r * bpr..(r + 1) * bpr]) {
            *o = super::E8M0_HALF[s as usize];
        }
        let res = unsafe {
            mxfp4_dot::<N>(
                m.blocks.as_ptr().add(r * cb),
                sbuf.as_ptr(),
                m.cols,
                xp,
                lut,
            )
        };
        for (i, v) in res.into_iter().enumerate() {
            unsafe { out.write(i0 + i, r, v) };
        }
    }
}

/// 16 doubled e2m1 values (int8) to four f32 vectors, in byte order.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn i8x16_to_f32(v: int8x16_t) -> [float32x4_t; 4] {
    let l = vmovl_s8(vget_low_s8(v));
    let h = vmovl_s8(vget_high_s8(v));
    [
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(l))),
        vcvtq_f32_s32(vmovl_s16(vget_high_s16(l))),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))),
        vcvtq_f32_s32(vmovl_s16(vget_high_s16(h))),
    ]
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn mxfp4_dot<const N: usize>(
    row: *const u8,
    scales: *const f32,
    cols: usize,
    x: *const f32,
    lut: int8x16_t,
) -> [f32; N] {
    let ka = CHAINS;
    let mut acc = [[vdupq_n_f32(0.0); 4]; N];
    for b in 0..cols / 32 {
        let c = 32 * b;
        let q = unsafe {
            let v = vld1q_u8(row.add(16 * b));
            let lo = vqtbl1q_s8(lut, vandq_u8(v, vdupq_n_u8(0x0F)));
            let hi = vqtbl1q_s8(lut, vshrq_n_u8::<4>(v));
            concat(i8x16_to_f32(lo), i8x16_to_f32(hi))
        };
        let s = vdupq_n_f32(unsafe { *scales.add(b) });
        for (k, qk) in q.into_iter().enumerate() {
            let wv = vmulq_f32(qk, s);
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = unsafe { vld1q_f32(x.add(i * cols + c + 4 * k)) };
                a[k % ka] = vfmaq_f32(a[k % ka], wv, xv);
            }
        }
    }
    let mut res = [0.0f32; N];
    for (r, a) in res.iter_mut().zip(&acc) {
        *r = vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
    }
    res
}

// ---------------------------------------------------------------- vector helpers

#[target_feature(enable = "neon")]
unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    unsafe {
        while i + 16 <= n {
            for (k, s) in acc.iter_mut().enumerate() {
                *s = vfmaq_f32(
                    *s,
                    vld1q_f32(a.as_ptr().add(i + 4 * k)),
                    vld1q_f32(b.as_ptr().add(i + 4 * k)),
                );
            }
            i += 16;
        }
        while i + 4 <= n {
            acc[0] = vfmaq_f32(
                acc[0],
                vld1q_f32(a.as_ptr().add(i)),
                vld1q_f32(b.as_ptr().add(i)),
            );
            i += 4;
        }
    }
    let mut s = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    for j in i..n {
        s += a[j] * b[j];
    }
    s
}

#[target_feature(enable = "neon")]
unsafe fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let av = vdupq_n_f32(alpha);
    let mut i = 0;
    unsafe {
        while i + 4 <= n {
            let yp = y.as_mut_ptr().add(i);
            vst1q_f32(
                yp,
                vfmaq_f32(vld1q_f32(yp), av, vld1q_f32(x.as_ptr().add(i))),
            );
            i += 4;
        }
    }
    for j in i..n {
        y[j] += alpha * x[j];
    }
}
