//! AVX2 + FMA + F16C kernels (x86_64).
//!
//! Every function that uses intrinsics carries
//! `#[target_feature(enable = "avx2,fma,f16c")]` and is only reachable
//! through [`Avx2`], whose sole instance is handed out by [`Avx2::detect`]
//! after `is_x86_feature_detected!` confirmed all three features; that is the
//! safety argument for every `unsafe` call into this module.
//!
//! Matmul structure: a weight row is read in blocks of 32 elements, each
//! decoded into four `__m256` vectors (bf16/f16 widened, affine codes
//! unpacked and dequantized with one FMA `q * scale + bias`), then multiplied
//! into up to 8 inputs at once, so weights are decoded once per 8 inputs.
//!
//! The 4- and 2-bit decoders skip the nibble/crumb interleave: they produce
//! lanes in "split" order (4-bit: all low nibbles of 8 bytes, then all high
//! nibbles), and the activation is permuted once per call to the same order
//! (a dot product does not care about order). x is shared by every row, so
//! the permutation costs `n * cols` moves against `rows * cols` weights.
//! 3- and 6-bit codes straddle bytes; they are gathered with one `pshufb`
//! (two bytes per 32-bit lane) and a per-lane variable shift (`vpsrlvd`).
//!
//! Activations: for 2-, 4- and 8-bit weights the default backend (`avx2`)
//! quantizes x to int8 per 32-block and uses integer dot products (see the
//! "int8 activations" section): measured on a Xeon VM, q4g64 4096x2048 matvec
//! went from 3.5 to 6-7.7 GB/s on one thread (DRAM-cold). It costs at most
//! ~2.6e-3 of `sum |w x|` per output. `avx2-f32x` (`MFX_KERNELS=avx2-f32x`)
//! keeps x in f32 everywhere, within reassociation error of the reference.
//! 3- and 6-bit weights always use f32 activations.

use super::parallel::{for_row_chunks, Out};
use super::{check_matmul, Backend, F16Rows, MatRef, Tier};
use half::{bf16, f16};
use mfx_formats::mxfp4::Mxfp4Matrix;
use mfx_formats::quant::AffineMatrix;
use std::arch::x86_64::*;
use std::ops::Range;

/// Inputs (rows of x) processed per pass over a weight row: 4 inputs x
/// [`CHAINS`] accumulators + the decoded weight vectors + x loads fit the
/// 16 ymm registers. The same per-input arithmetic whatever the batch
/// (batch invariance, see [`CHAINS`]) costs a second weight decode per 8
/// prompt tokens.
const NB: usize = 4;

/// Marker that AVX2, FMA and F16C were detected; see the module docs.
pub struct Avx2 {
    /// Quantize x to int8 per 32-block for the 2- and 4-bit products (the
    /// default; see the module docs). `false` keeps x in f32 everywhere.
    int8_x: bool,
    /// The `avx512` tier: the int8 products run on AVX-512 VNNI
    /// (`vpdpbusd`, [`super::avx512`]); everything else is this module's.
    vnni: bool,
}

static AVX2: Avx2 = Avx2 {
    int8_x: true,
    vnni: false,
};
static AVX2_F32X: Avx2 = Avx2 {
    int8_x: false,
    vnni: false,
};
static AVX512: Avx2 = Avx2 {
    int8_x: true,
    vnni: true,
};

impl Avx2 {
    fn supported() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// The AVX2 backend if this CPU supports AVX2, FMA and F16C.
    pub fn detect() -> Option<&'static Avx2> {
        Self::supported().then_some(&AVX2)
    }

    /// The same tier with f32 activations in every product (`MFX_KERNELS=avx2-f32x`):
    /// slower for 2/4-bit weights, but within f32 reassociation error of the
    /// scalar reference, for ruling out activation quantization when
    /// chasing a numerical difference.
    pub fn detect_f32x() -> Option<&'static Avx2> {
        Self::supported().then_some(&AVX2_F32X)
    }

    /// The `avx512` tier if this CPU also has AVX-512 F/BW/VL and VNNI:
    /// the int8 products (2/4/8-bit weights) on 512-bit `vpdpbusd`, the rest
    /// as `avx2`. See [`super::avx512`] for why only those.
    pub fn detect_avx512() -> Option<&'static Avx2> {
        (Self::supported() && super::avx512::supported()).then_some(&AVX512)
    }
}

impl Backend for Avx2 {
    fn tier(&self) -> Tier {
        if self.vnni {
            Tier::Avx512
        } else {
            Tier::Avx2
        }
    }

    fn name(&self) -> &'static str {
        match (self.vnni, self.int8_x) {
            (true, _) => "avx512",
            (false, true) => "avx2",
            (false, false) => "avx2-f32x",
        }
    }

    fn int8_activations(&self) -> bool {
        self.int8_x
    }

    fn matmul(&self, w: &MatRef<'_>, x: &[f32], n: usize, y: &mut [f32]) {
        check_matmul(w, x, n, y);
        let out = Out::new(y, n, w.rows());
        match w {
            MatRef::F32 { rows, cols, data } => float_matmul(data, *rows, *cols, x, n, out),
            MatRef::Bf16 { rows, cols, data } => float_matmul(data, *rows, *cols, x, n, out),
            MatRef::F16 { rows, cols, data } => float_matmul(data, *rows, *cols, x, n, out),
            MatRef::Affine(a) => match a.bits {
                2 | 4 | 8 if self.int8_x => self.int8x_many(&[a], x, n, &[out]),
                2 => affine_matmul::<Q2>(a, x, n, out),
                3 => affine_matmul::<Q3>(a, x, n, out),
                4 => affine_matmul::<Q4>(a, x, n, out),
                6 => affine_matmul::<Q6>(a, x, n, out),
                8 => affine_matmul::<Q8>(a, x, n, out),
                // check_matmul accepted only AFFINE_BITS.
                b => unreachable!("affine bit width {b} passed check_matmul"),
            },
            MatRef::Mxfp4(m) if self.int8_x => mxfp4_i8_many(&[m], x, n, &[out]),
            MatRef::Mxfp4(m) => mxfp4_matmul_f32(m, x, n, out),
        }
    }

    fn matmul_many(&self, ws: &[MatRef<'_>], x: &[f32], n: usize, ys: &mut [&mut [f32]]) {
        assert_eq!(ws.len(), ys.len(), "matmul_many: one output per matrix");
        // gpt-oss's gate and up: MXFP4 of one width share the quantized x.
        let mx: Vec<&Mxfp4Matrix<'_>> = ws
            .iter()
            .filter_map(|w| match w {
                MatRef::Mxfp4(m) => Some(m),
                _ => None,
            })
            .collect();
        if self.int8_x
            && ws.len() > 1
            && mx.len() == ws.len()
            && mx.windows(2).all(|p| p[0].cols == p[1].cols)
        {
            let outs: Vec<Out> = ws
                .iter()
                .zip(ys.iter_mut())
                .map(|(w, y)| {
                    check_matmul(w, x, n, y);
                    Out::new(y, n, w.rows())
                })
                .collect();
            mxfp4_i8_many(&mx, x, n, &outs);
            return;
        }
        // One quantized x and one pass only where every matrix takes the
        // same int8 path with the same layout.
        let affs: Vec<&AffineMatrix<'_>> = ws
            .iter()
            .filter_map(|w| match w {
                MatRef::Affine(a) => Some(a),
                _ => None,
            })
            .collect();
        let same = affs.len() == ws.len()
            && affs.windows(2).all(|p| {
                (p[0].bits, p[0].cols, p[0].group_size) == (p[1].bits, p[1].cols, p[1].group_size)
            });
        let bits = affs.first().map(|a| a.bits);
        if !(self.int8_x && same && ws.len() > 1 && matches!(bits, Some(2 | 4 | 8))) {
            for (w, y) in ws.iter().zip(ys.iter_mut()) {
                self.matmul(w, x, n, y);
            }
            return;
        }
        let outs: Vec<Out> = ws
            .iter()
            .zip(ys.iter_mut())
            .map(|(w, y)| {
                check_matmul(w, x, n, y);
                Out::new(y, n, w.rows())
            })
            .collect();
        self.int8x_many(&affs, x, n, &outs);
    }

    fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot: length mismatch");
        // SAFETY: features detected (module docs); lengths checked.
        unsafe { dot_f32(a, b) }
    }

    fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), y.len(), "axpy: length mismatch");
        // SAFETY: as above.
        unsafe { axpy_f32(alpha, x, y) }
    }

    fn dot_f16(&self, a: &[f32], b: &[f16]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot_f16: length mismatch");
        // SAFETY: features detected (module docs); lengths checked.
        unsafe { dot_f32_f16(a, b) }
    }

    fn axpy_f16(&self, alpha: f32, x: &[f16], y: &mut [f32]) {
        assert_eq!(x.len(), y.len(), "axpy_f16: length mismatch");
        // SAFETY: as above.
        unsafe { axpy_f32_f16(alpha, x, y) }
    }

    fn dot_f16_rows(&self, rows: F16Rows<'_>, q: &[f32], scores: &mut [f32], ld: usize) {
        rows.check_group(q.len(), scores.len(), ld, "dot_f16_rows");
        // SAFETY: features detected; check_group verified every row and
        // coefficient index the blocks touch.
        unsafe { f16_dots(rows, q, scores, ld) }
    }

    fn axpy_f16_rows(&self, rows: F16Rows<'_>, p: &[f32], ld: usize, out: &mut [f32]) {
        rows.check_group(out.len(), p.len(), ld, "axpy_f16_rows");
        // SAFETY: as above.
        unsafe { f16_axpys(rows, p, ld, out) }
    }

    fn softmax_scaled(&self, x: &mut [f32], scale: f32) {
        // SAFETY: features detected (module docs).
        unsafe { softmax_scaled_avx2(x, scale) }
    }

    fn convert_f16_to_f32(&self, src: &[f16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "convert_f16_to_f32: length mismatch");
        // SAFETY: as above.
        unsafe { widen(src, dst) }
    }

    fn convert_bf16_to_f32(&self, src: &[bf16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "convert_bf16_to_f32: length mismatch");
        // SAFETY: as above.
        unsafe { widen(src, dst) }
    }

    fn convert_f32_to_f16(&self, src: &[f32], dst: &mut [f16]) {
        assert_eq!(src.len(), dst.len(), "convert_f32_to_f16: length mismatch");
        // SAFETY: as above.
        unsafe { narrow_f16(src, dst) }
    }

    fn convert_f32_to_bf16(&self, src: &[f32], dst: &mut [bf16]) {
        assert_eq!(src.len(), dst.len(), "convert_f32_to_bf16: length mismatch");
        // SAFETY: as above.
        unsafe { narrow_bf16(src, dst) }
    }
}

// ---------------------------------------------------------------- helpers

/// bf16 -> f32 by moving the bits up. `half`'s `to_f32` also quiets NaNs,
/// a compare and a select that cost measurably in per-block scale loads.
#[inline(always)]
fn bf16_bits_to_f32(b: bf16) -> f32 {
    f32::from_bits((b.to_bits() as u32) << 16)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
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

/// Independent accumulator chains per input, the same for every batch
/// size: a row's result for one input must not depend on how many other
/// inputs share the call (a token's logits then do not depend on how the
/// sequence was cut into forward calls: speculative decoding's verify pass,
/// prefix reuse and batched sequences rely on it; tests/kernels.rs
/// `rows_do_not_depend_on_the_batch`). Two chains per input hide most of
/// the FMA latency at one input and still fit [`NB`] inputs in registers.
const CHAINS: usize = 2;

// ---------------------------------------------------------------- float weights

/// An element type that loads as 8 f32 lanes.
trait FloatLoad: Copy + Sync {
    /// # Safety
    /// `p..p+8` must be readable; AVX2/FMA/F16C must be available.
    unsafe fn load8(p: *const Self) -> __m256;
    fn to_f32(self) -> f32;
}

impl FloatLoad for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl FloatLoad for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // bf16 is the top half of an f32: widen to 32 bits and shift up.
        let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl FloatLoad for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
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
            // SAFETY: features detected; check_matmul verified data.len() ==
            // rows*cols and x.len() == n*cols; rows in range belong to this task.
            unsafe { with_nb!(nb, float_rows::<T>(data, cols, x, i0, range.clone(), out)) };
            i0 += nb;
        }
    });
}

#[target_feature(enable = "avx2,fma,f16c")]
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

/// Dots one weight row (`cols` elements at `w`) with `N` consecutive rows of x.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_dot<T: FloatLoad, const N: usize>(
    w: *const T,
    cols: usize,
    x: *const f32,
) -> [f32; N] {
    let ka = CHAINS;
    let mut acc = [[_mm256_setzero_ps(); 4]; N];
    let mut c = 0;
    unsafe {
        while c + 32 <= cols {
            for k in 0..4 {
                let wv = T::load8(w.add(c + 8 * k));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(i * cols + c + 8 * k));
                    a[k % ka] = _mm256_fmadd_ps(wv, xv, a[k % ka]);
                }
            }
            c += 32;
        }
        while c + 8 <= cols {
            let wv = T::load8(w.add(c));
            for (i, a) in acc.iter_mut().enumerate() {
                a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(i * cols + c)), a[0]);
            }
            c += 8;
        }
    }
    let mut res = [0.0f32; N];
    for (i, a) in acc.iter().enumerate() {
        let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        let mut v = unsafe { hsum(s) };
        for cc in c..cols {
            unsafe { v += (*w.add(cc)).to_f32() * *x.add(i * cols + cc) };
        }
        res[i] = v;
    }
    res
}

// ---------------------------------------------------------------- affine weights

/// Unpacks 32 consecutive codes of one affine bit width.
trait Decode {
    const BITS: usize;
    /// Lane order of [`Decode::decode32`]: lane `L` (vector `L / 8`, lane
    /// `L % 8`) holds element `PERM[L]` of the block; `None` = natural order.
    const PERM: Option<[u8; 32]>;
    /// # Safety
    /// `p..p + 16` must be readable (up to 4 bytes past the block for 3/6
    /// bits; callers pad the last row); AVX2/FMA/F16C must be available.
    unsafe fn decode32(p: *const u8) -> [__m256; 4];
}

/// Bytes a decoder may read past the end of a row.
const OVERREAD: usize = 16;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn u8x8_to_f32(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
}

struct Q8;
impl Decode for Q8 {
    const BITS: usize = 8;
    const PERM: Option<[u8; 32]> = None;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode32(p: *const u8) -> [__m256; 4] {
        let lo = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let hi = unsafe { _mm_loadu_si128(p.add(16) as *const __m128i) };
        unsafe {
            [
                u8x8_to_f32(lo),
                u8x8_to_f32(_mm_srli_si128(lo, 8)),
                u8x8_to_f32(hi),
                u8x8_to_f32(_mm_srli_si128(hi, 8)),
            ]
        }
    }
}

struct Q4;
impl Decode for Q4 {
    const BITS: usize = 4;
    // Byte b holds elements 2b (low nibble) and 2b+1 (high nibble).
    const PERM: Option<[u8; 32]> = Some(split_perm(4));
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode32(p: *const u8) -> [__m256; 4] {
        let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(v, m);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        unsafe {
            [
                u8x8_to_f32(lo),
                u8x8_to_f32(_mm_srli_si128(lo, 8)),
                u8x8_to_f32(hi),
                u8x8_to_f32(_mm_srli_si128(hi, 8)),
            ]
        }
    }
}

struct Q2;
impl Decode for Q2 {
    const BITS: usize = 2;
    // Byte b holds elements 4b..4b+4 at shifts 0, 2, 4, 6.
    const PERM: Option<[u8; 32]> = Some(split_perm(2));
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode32(p: *const u8) -> [__m256; 4] {
        let v = unsafe { _mm_loadl_epi64(p as *const __m128i) };
        let m = _mm_set1_epi8(0x03);
        unsafe {
            [
                u8x8_to_f32(_mm_and_si128(v, m)),
                u8x8_to_f32(_mm_and_si128(_mm_srli_epi16(v, 2), m)),
                u8x8_to_f32(_mm_and_si128(_mm_srli_epi16(v, 4), m)),
                u8x8_to_f32(_mm_and_si128(_mm_srli_epi16(v, 6), m)),
            ]
        }
    }
}

/// Lane order of the split decoders above: vector `k` collects, from the
/// bytes it covers, the field at shift `bits * (k / vectors_per_shift)`.
const fn split_perm(bits: usize) -> [u8; 32] {
    let per_byte = 8 / bits; // elements per byte
    let vecs_per_field = 4 / per_byte; // vectors that share one shift
    let mut perm = [0u8; 32];
    let mut l = 0;
    while l < 32 {
        let k = l / 8;
        let j = l % 8;
        let field = k / vecs_per_field;
        let byte = (k % vecs_per_field) * 8 + j;
        perm[l] = (byte * per_byte + field) as u8;
        l += 1;
    }
    perm
}

/// `pshufb` control for vector `k` of a 32-element block: 32-bit lane `j`
/// receives the two bytes holding element `8k + j`, counted from the load
/// at byte `base` (the same 16 bytes are broadcast to both 128-bit halves).
const fn gather_mask(bits: usize, k: usize, base: usize) -> [i8; 32] {
    let mut m = [-128i8; 32];
    let mut j = 0;
    while j < 8 {
        let o = ((8 * k + j) * bits) / 8 - base;
        let at = (j / 4) * 16 + (j % 4) * 4;
        m[at] = o as i8;
        m[at + 1] = (o + 1) as i8;
        j += 1;
    }
    m
}

/// Right shifts that bring element `8k + j` to bit 0 of its lane.
const fn gather_shift(bits: usize, k: usize) -> [i32; 8] {
    let mut s = [0i32; 8];
    let mut j = 0;
    while j < 8 {
        s[j] = (((8 * k + j) * bits) % 8) as i32;
        j += 1;
    }
    s
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gather8(src: __m256i, mask: &[i8; 32], shift: &[i32; 8], bits: usize) -> __m256 {
    let ctl = unsafe { _mm256_loadu_si256(mask.as_ptr() as *const __m256i) };
    let sh = unsafe { _mm256_loadu_si256(shift.as_ptr() as *const __m256i) };
    let v = _mm256_srlv_epi32(_mm256_shuffle_epi8(src, ctl), sh);
    _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32((1 << bits) - 1)))
}

struct Q3;
static Q3_MASK: [[i8; 32]; 4] = [
    gather_mask(3, 0, 0),
    gather_mask(3, 1, 0),
    gather_mask(3, 2, 0),
    gather_mask(3, 3, 0),
];
static Q3_SHIFT: [[i32; 8]; 4] = [
    gather_shift(3, 0),
    gather_shift(3, 1),
    gather_shift(3, 2),
    gather_shift(3, 3),
];
impl Decode for Q3 {
    const BITS: usize = 3;
    const PERM: Option<[u8; 32]> = None;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode32(p: *const u8) -> [__m256; 4] {
        // 12 bytes of codes; one 16-byte load covers them.
        let src = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p as *const __m128i) });
        unsafe {
            [
                gather8(src, &Q3_MASK[0], &Q3_SHIFT[0], 3),
                gather8(src, &Q3_MASK[1], &Q3_SHIFT[1], 3),
                gather8(src, &Q3_MASK[2], &Q3_SHIFT[2], 3),
                gather8(src, &Q3_MASK[3], &Q3_SHIFT[3], 3),
            ]
        }
    }
}

struct Q6;
static Q6_MASK: [[i8; 32]; 4] = [
    gather_mask(6, 0, 0),
    gather_mask(6, 1, 0),
    gather_mask(6, 2, 12),
    gather_mask(6, 3, 12),
];
static Q6_SHIFT: [[i32; 8]; 4] = [
    gather_shift(6, 0),
    gather_shift(6, 1),
    gather_shift(6, 2),
    gather_shift(6, 3),
];
impl Decode for Q6 {
    const BITS: usize = 6;
    const PERM: Option<[u8; 32]> = None;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode32(p: *const u8) -> [__m256; 4] {
        // 24 bytes of codes: elements 0..16 from bytes 0..12, 16..32 from 12..24.
        let a = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p as *const __m128i) });
        let b =
            _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.add(12) as *const __m128i) });
        unsafe {
            [
                gather8(a, &Q6_MASK[0], &Q6_SHIFT[0], 6),
                gather8(a, &Q6_MASK[1], &Q6_SHIFT[1], 6),
                gather8(b, &Q6_MASK[2], &Q6_SHIFT[2], 6),
                gather8(b, &Q6_MASK[3], &Q6_SHIFT[3], 6),
            ]
        }
    }
}

/// Reorders every 32-element block of every x row into the decoder's lane order.
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
    // cols is a multiple of the group size, itself a multiple of 32, so
    // every x row is whole 32-blocks and the permutation never straddles rows.
    let permuted;
    let x = match D::PERM {
        Some(p) => {
            permuted = permute_x(x, &p);
            &permuted[..]
        }
        None => x,
    };
    let row_bytes = a.row_bytes() + a.groups_per_row() * 4;
    // Every input takes the factored one-input form (see `affine_dot1`),
    // also in a batch: a row's result must not depend on the other inputs
    // (batch invariance, see `CHAINS`). A prompt decodes these (3/6-bit,
    // or `avx2-f32x`) rows once per token; the int8 path serves the common
    // 2/4/8-bit ones.
    let xsum: Vec<f32> = x
        .chunks_exact(a.group_size)
        .map(|g| g.iter().sum())
        .collect();
    for_row_chunks(a.rows, row_bytes, n, |range| {
        let mut pad = Vec::new();
        for i in 0..n {
            // SAFETY: features detected; check_matmul verified every buffer
            // length against the shape; rows in range belong to this task.
            unsafe { affine_rows1::<D>(a, x, &xsum, i, range.clone(), out, &mut pad) };
        }
    });
}

/// Codes of row `r` (`rb` bytes), readable for `OVERREAD` bytes more:
/// decoders may read past the row, so only the last rows of the buffer need
/// a padded copy (in `pad`).
#[inline]
fn row_ptr(a: &AffineMatrix<'_>, r: usize, rb: usize, pad: &mut Vec<u8>) -> *const u8 {
    let start = r * rb;
    if start + rb + OVERREAD <= a.packed.len() {
        a.packed[start..].as_ptr()
    } else {
        pad.clear();
        pad.extend_from_slice(&a.packed[start..start + rb]);
        pad.resize(rb + OVERREAD, 0);
        pad.as_ptr()
    }
}

/// Rows `rows` for input `i` (x and its group sums `xsum` hold every input).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn affine_rows1<D: Decode>(
    a: &AffineMatrix<'_>,
    x: &[f32],
    xsum: &[f32],
    i: usize,
    rows: Range<usize>,
    out: Out,
    pad: &mut Vec<u8>,
) {
    let rb = a.row_bytes();
    let gpr = a.groups_per_row();
    let (x, xsum) = (&x[i * a.cols..], &xsum[i * gpr..]);
    for r in rows {
        let p = row_ptr(a, r, rb, pad);
        let v = unsafe {
            affine_dot1::<D>(
                p,
                a.scales.as_ptr().add(r * gpr),
                a.biases.as_ptr().add(r * gpr),
                a.cols,
                a.group_size,
                x.as_ptr(),
                xsum.as_ptr(),
            )
        };
        unsafe { out.write(i, r, v) };
    }
}

/// One affine row with one input, factored: per group
/// `sum((s q + b) x) = s * sum(q x) + b * sum(x)`, so the codes are dotted
/// with x directly and the scale is applied once per group (one FMA per 8
/// weights instead of two), the bias through x's precomputed group sums.
/// Still f32 activations: within reassociation error of the reference.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn affine_dot1<D: Decode>(
    row: *const u8,
    scales: *const bf16,
    biases: *const bf16,
    cols: usize,
    group_size: usize,
    x: *const f32,
    xsum: *const f32,
) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut bsum = 0.0f32;
    let blocks_per_group = group_size / 32;
    let mut c = 0;
    for g in 0..cols / group_size {
        let mut ga = [_mm256_setzero_ps(); 4];
        for _ in 0..blocks_per_group {
            let q = unsafe { D::decode32(row.add(c * D::BITS / 8)) };
            for (k, qk) in q.into_iter().enumerate() {
                let xv = unsafe { _mm256_loadu_ps(x.add(c + 8 * k)) };
                ga[k] = _mm256_fmadd_ps(qk, xv, ga[k]);
            }
            c += 32;
        }
        let (s, b) = unsafe {
            (
                bf16_bits_to_f32(*scales.add(g)),
                bf16_bits_to_f32(*biases.add(g)),
            )
        };
        let sv = _mm256_set1_ps(s);
        for (a, gk) in acc.iter_mut().zip(ga) {
            *a = _mm256_fmadd_ps(sv, gk, *a);
        }
        bsum += b * unsafe { *xsum.add(g) };
    }
    let dot = unsafe {
        hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    };
    dot + bsum
}

// ---------------------------------------------------------------- vector helpers

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    unsafe {
        while i + 32 <= n {
            for (k, s) in acc.iter_mut().enumerate() {
                *s = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8 * k)),
                    _mm256_loadu_ps(pb.add(i + 8 * k)),
                    *s,
                );
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
    }
    let mut s = unsafe {
        hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    };
    for j in i..n {
        s += a[j] * b[j];
    }
    s
}

/// [`Backend::dot_f16_rows`] in blocks of up to 8 query heads.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_dots(rows: F16Rows<'_>, q: &[f32], scores: &mut [f32], ld: usize) {
    let g = q.len() / rows.width;
    let mut h0 = 0;
    while h0 < g {
        let nb = (g - h0).min(8);
        unsafe { with_nb!(nb, f16_dots_block(rows, q, h0, scores, ld)) };
        h0 += nb;
    }
}

/// Rows per tile of [`f16_axpys`]: 64 rows of a 128-wide head are 16 KiB,
/// so a tile stays in L1 while every column block passes over it.
const AXPY_TILE_BYTES: usize = 16 << 10;

/// [`Backend::axpy_f16_rows`] in blocks of up to 8 heads, over tiles of
/// rows: the column-block loop of [`f16_axpys_block`] passes over its rows
/// once per 8 columns, which without tiling re-read a 2k-position head from
/// L3 sixteen times.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_axpys(rows: F16Rows<'_>, p: &[f32], ld: usize, out: &mut [f32]) {
    let g = out.len() / rows.width;
    let tile = (AXPY_TILE_BYTES / (rows.stride.max(1) * 2)).max(8);
    let mut j0 = 0;
    while j0 < rows.len {
        let t = F16Rows {
            data: &rows.data[j0 * rows.stride..],
            len: tile.min(rows.len - j0),
            ..rows
        };
        // The column blocks walk the tile's rows 256 bytes apart, which the
        // hardware prefetcher followed poorly (the widening loads stalled on
        // L3); fetch the next tile's lines while this one computes.
        let next = j0 + tile;
        if next < rows.len {
            let line_bytes = rows.width * 2;
            for r in next..(next + tile).min(rows.len) {
                let rp = unsafe { rows.data.as_ptr().add(r * rows.stride) as *const i8 };
                for off in (0..line_bytes).step_by(64) {
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(rp.add(off)) };
                }
            }
        }
        let pt = &p[j0..];
        let mut h0 = 0;
        while h0 < g {
            let nb = (g - h0).min(8);
            unsafe { with_nb!(nb, f16_axpys_block(t, pt, ld, h0, out)) };
            h0 += nb;
        }
        j0 += tile;
    }
}

/// Scores of query heads `h0..h0 + N` against every row: each key is
/// widened once and dotted with all `N` heads while it is in registers.
/// Few heads take several rows at a time, so that there are always enough
/// independent FMA chains.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_dots_block<const N: usize>(
    rows: F16Rows<'_>,
    q: &[f32],
    h0: usize,
    scores: &mut [f32],
    ld: usize,
) {
    let mut j = 0;
    unsafe {
        match N {
            1 | 2 => {
                while j + 4 <= rows.len {
                    f16_dots_rows::<N, 4>(rows, q, h0, scores, ld, j);
                    j += 4;
                }
            }
            3 | 4 => {
                while j + 2 <= rows.len {
                    f16_dots_rows::<N, 2>(rows, q, h0, scores, ld, j);
                    j += 2;
                }
            }
            _ => {}
        }
        while j < rows.len {
            f16_dots_rows::<N, 1>(rows, q, h0, scores, ld, j);
            j += 1;
        }
    }
}

/// Rows `j..j + R` of [`f16_dots_block`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_dots_rows<const N: usize, const R: usize>(
    rows: F16Rows<'_>,
    q: &[f32],
    h0: usize,
    scores: &mut [f32],
    ld: usize,
    j: usize,
) {
    let w = rows.width;
    let wide = w / 8 * 8;
    let qp = unsafe { q.as_ptr().add(h0 * w) };
    let rp = unsafe { rows.data.as_ptr().add(j * rows.stride) };
    let mut acc = [[_mm256_setzero_ps(); R]; N];
    let mut c = 0;
    unsafe {
        while c < wide {
            let mut ks = [_mm256_setzero_ps(); R];
            for (r, k) in ks.iter_mut().enumerate() {
                *k = _mm256_cvtph_ps(_mm_loadu_si128(
                    rp.add(r * rows.stride + c) as *const __m128i
                ));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let qv = _mm256_loadu_ps(qp.add(i * w + c));
                for (r, v) in a.iter_mut().enumerate() {
                    *v = _mm256_fmadd_ps(qv, ks[r], *v);
                }
            }
            c += 8;
        }
    }
    for (i, a) in acc.iter().enumerate() {
        for (r, v) in a.iter().enumerate() {
            let mut s = unsafe { hsum(*v) };
            for cc in wide..w {
                s += q[(h0 + i) * w + cc] * rows.data[(j + r) * rows.stride + cc].to_f32();
            }
            scores[(h0 + i) * ld + j + r] = s;
        }
    }
}

/// `out_h += sum_j p_h[j] * rows[j]` for heads `h0..h0 + N`, 8 columns at a
/// time with the accumulators in registers across all rows. Few heads get
/// several column blocks each, so there are always enough independent FMA
/// chains to hide the latency.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_axpys_block<const N: usize>(
    rows: F16Rows<'_>,
    p: &[f32],
    ld: usize,
    h0: usize,
    out: &mut [f32],
) {
    let w = rows.width;
    let wide = match N {
        1 | 2 => 4,
        3 | 4 => 2,
        _ => 1,
    };
    let mut c = 0;
    unsafe {
        while c + 8 * wide <= w {
            match wide {
                4 => f16_axpys_cols::<N, 4>(rows, p, ld, h0, out, c),
                2 => f16_axpys_cols::<N, 2>(rows, p, ld, h0, out, c),
                _ => f16_axpys_cols::<N, 1>(rows, p, ld, h0, out, c),
            }
            c += 8 * wide;
        }
        while c + 8 <= w {
            f16_axpys_cols::<N, 1>(rows, p, ld, h0, out, c);
            c += 8;
        }
    }
    for cc in c..w {
        for i in 0..N {
            let mut s = out[(h0 + i) * w + cc];
            for j in 0..rows.len {
                s += p[(h0 + i) * ld + j] * rows.data[j * rows.stride + cc].to_f32();
            }
            out[(h0 + i) * w + cc] = s;
        }
    }
}

/// Columns `c..c + 8 * C` of [`f16_axpys_block`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_axpys_cols<const N: usize, const C: usize>(
    rows: F16Rows<'_>,
    p: &[f32],
    ld: usize,
    h0: usize,
    out: &mut [f32],
    c: usize,
) {
    let w = rows.width;
    let (base, pp, op) = (rows.data.as_ptr(), p.as_ptr(), out.as_mut_ptr());
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; N];
        for (i, a) in acc.iter_mut().enumerate() {
            for (k, v) in a.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(op.add((h0 + i) * w + c + 8 * k));
            }
        }
        for j in 0..rows.len {
            let rp = base.add(j * rows.stride + c);
            let mut vs = [_mm256_setzero_ps(); C];
            for (k, v) in vs.iter_mut().enumerate() {
                *v = _mm256_cvtph_ps(_mm_loadu_si128(rp.add(8 * k) as *const __m128i));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let pj = _mm256_set1_ps(*pp.add((h0 + i) * ld + j));
                for (k, v) in a.iter_mut().enumerate() {
                    *v = _mm256_fmadd_ps(pj, vs[k], *v);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (k, v) in a.iter().enumerate() {
                _mm256_storeu_ps(op.add((h0 + i) * w + c + 8 * k), *v);
            }
        }
    }
}

/// `exp(x)` per lane: Cephes' `expf` (range reduction by `ln 2` in two
/// parts, degree-6 polynomial), within 2 ulp of libm on `[-87, 88]`; lanes
/// below -87 (including `-inf`, masked attention) give exactly 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp8(x: __m256) -> __m256 {
    let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.0));
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2)))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_scaled_avx2(x: &mut [f32], scale: f32) {
    let n = x.len();
    let wide = n / 8 * 8;
    let p = x.as_mut_ptr();
    let vs = _mm256_set1_ps(scale);
    let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
    unsafe {
        for i in (0..wide).step_by(8) {
            mv = _mm256_max_ps(mv, _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vs));
        }
    }
    let mut lanes = [0.0f32; 8];
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), mv) };
    let ms = lanes
        .iter()
        .copied()
        .chain(x[wide..].iter().map(|v| v * scale))
        .fold(f32::NEG_INFINITY, f32::max);
    if ms == f32::NEG_INFINITY {
        x.fill(0.0);
        return;
    }
    let vm = _mm256_set1_ps(ms);
    let mut sv = _mm256_setzero_ps();
    unsafe {
        for i in (0..wide).step_by(8) {
            let e = exp8(_mm256_sub_ps(
                _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vs),
                vm,
            ));
            _mm256_storeu_ps(p.add(i), e);
            sv = _mm256_add_ps(sv, e);
        }
    }
    let mut s = unsafe { hsum(sv) };
    for v in x[wide..].iter_mut() {
        *v = (*v * scale - ms).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    let vinv = _mm256_set1_ps(inv);
    unsafe {
        for i in (0..wide).step_by(8) {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vinv));
        }
    }
    for v in x[wide..].iter_mut() {
        *v *= inv;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32_f16(a: &[f32], b: &[f16]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr() as *const __m128i);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    unsafe {
        while i + 32 <= n {
            for (k, s) in acc.iter_mut().enumerate() {
                let w = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i / 8 + k)));
                *s = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * k)), w, *s);
            }
            i += 32;
        }
        while i + 8 <= n {
            let w = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i / 8)));
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), w, acc[0]);
            i += 8;
        }
    }
    let mut s = unsafe {
        hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    };
    for j in i..n {
        s += a[j] * b[j].to_f32();
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f32_f16(alpha: f32, x: &[f16], y: &mut [f32]) {
    let n = x.len();
    let av = _mm256_set1_ps(alpha);
    let px = x.as_ptr() as *const __m128i;
    let mut i = 0;
    unsafe {
        while i + 8 <= n {
            let yp = y.as_mut_ptr().add(i);
            let xv = _mm256_cvtph_ps(_mm_loadu_si128(px.add(i / 8)));
            _mm256_storeu_ps(yp, _mm256_fmadd_ps(av, xv, _mm256_loadu_ps(yp)));
            i += 8;
        }
    }
    for j in i..n {
        y[j] += alpha * x[j].to_f32();
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let av = _mm256_set1_ps(alpha);
    let mut i = 0;
    unsafe {
        while i + 8 <= n {
            let yp = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                yp,
                _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp)),
            );
            i += 8;
        }
    }
    for j in i..n {
        y[j] += alpha * x[j];
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen<T: FloatLoad>(src: &[T], dst: &mut [f32]) {
    let n = src.len();
    let mut i = 0;
    unsafe {
        while i + 8 <= n {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), T::load8(src.as_ptr().add(i)));
            i += 8;
        }
    }
    for j in i..n {
        dst[j] = src[j].to_f32();
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn narrow_f16(src: &[f32], dst: &mut [f16]) {
    let n = src.len();
    let mut i = 0;
    unsafe {
        while i + 8 <= n {
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr().add(i)));
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            i += 8;
        }
    }
    for j in i..n {
        dst[j] = f16::from_f32(src[j]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn narrow_bf16(src: &[f32], dst: &mut [bf16]) {
    let n = src.len();
    let mut i = 0;
    unsafe {
        while i + 8 <= n {
            let v = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
            // Round to nearest even: add 0x7FFF + the lowest kept bit.
            let lsb = _mm256_and_si256(_mm256_srli_epi32(v, 16), _mm256_set1_epi32(1));
            let rounded = _mm256_srli_epi32(
                _mm256_add_epi32(v, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
                16,
            );
            // NaN: keep the payload's top bits and force a quiet NaN, as half does.
            let abs = _mm256_and_si256(v, _mm256_set1_epi32(0x7FFF_FFFF));
            let is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
            let nan = _mm256_or_si256(_mm256_srli_epi32(v, 16), _mm256_set1_epi32(0x40));
            let r = _mm256_blendv_epi8(rounded, nan, is_nan);
            // Values fit 16 bits, so unsigned-saturating pack is exact; packus
            // works per 128-bit half, the permute restores order.
            let packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0b11_01_10_00);
            _mm_storeu_si128(
                dst.as_mut_ptr().add(i) as *mut __m128i,
                _mm256_castsi256_si128(packed),
            );
            i += 8;
        }
    }
    for j in i..n {
        dst[j] = bf16::from_f32(src[j]);
    }
}

// ---------------------------------------------------------------- int8 activations (2/4-bit)
//
// For 2- and 4-bit weights the f32 path is compute bound (decode + convert +
// two FMAs per 8 weights). As llama.cpp does, x is instead quantized once per
// call to int8 with one f32 scale per 32-block, and the dot of a *pair* of
// blocks is two `vpmaddubsw` (unsigned codes x signed x, pairwise i16), one
// i16 add, one `vpmaddwd` (to i32), one convert and one FMA with
// `scale_w * scale_x` laid out per i32 lane. The bias term uses the identity
// `sum((s q + b) x) = s sum(q x) + b sum(x)` with the exact f32 `sum(x)` per
// group, one vector dot per row. Codes are at most 15, so two
// `15 * 127 * 2` sums cannot overflow i16. The extra error is x's rounding,
// at most half an int8 step of the block's absmax per element: measured
// ~2.6e-3 of `sum |w x|` worst case, an order of magnitude under 4-bit weight
// rounding (budgets in `tests/kernels.rs`). 8-bit codes would saturate
// `vpmaddubsw`; they are stored offset by 128 and use the sign trick
// (`Q8i8`). 3/6-bit are rarer and stay on the f32 path.
//
// The decoders return two vectors per block pair in whatever lane order is
// cheapest; `quantize_x` lays x out in that same order (`PAIR_PERM`), and
// `LANE_BLOCK` says which block each i32 lane of the `vpmaddwd` result
// belongs to, so scales can be applied per lane.

/// A decoder for the integer path.
pub(super) trait DecodeI8 {
    const BITS: usize;
    /// Lane `L` of the two decoded vectors (0..32 first, 32..64 second) holds
    /// element `PAIR_PERM[L]` of the pair (0..32 first block, 32..64 second).
    const PAIR_PERM: [u8; 64];
    /// The block (0 or 1) each i32 lane of `madd(maddubs(..))` sums.
    const LANE_BLOCK: [u8; 8];
    /// Lane order of [`DecodeI8::decode_one`] (a trailing odd block).
    const ONE_PERM: [u8; 32];
    /// Two blocks at `p` (reads exactly `8 * BITS` bytes).
    /// # Safety: bytes readable; AVX2 available.
    unsafe fn decode_pair(p: *const u8) -> (__m256i, __m256i);
    /// One block (reads exactly `4 * BITS` bytes). # Safety: as above.
    unsafe fn decode_one(p: *const u8) -> __m256i;
    /// Lanes in natural order with one block per vector: x needs neither the
    /// permuted copy nor the per-lane scale pattern.
    const NATURAL: bool = false;
}

pub(super) struct Q4i8;
impl DecodeI8 for Q4i8 {
    const BITS: usize = 4;
    // 32 bytes: low nibbles of both blocks, then high nibbles of both.
    const PAIR_PERM: [u8; 64] = q4i8_pair_perm();
    const LANE_BLOCK: [u8; 8] = [0, 0, 0, 0, 1, 1, 1, 1];
    // Low nibbles (even elements) in lanes 0..16, high nibbles (odd) in 16..32.
    const ONE_PERM: [u8; 32] = split_perm(4);
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_pair(p: *const u8) -> (__m256i, __m256i) {
        let v = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        let m = _mm256_set1_epi8(0x0F);
        (
            _mm256_and_si256(v, m),
            _mm256_and_si256(_mm256_srli_epi16(v, 4), m),
        )
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_one(p: *const u8) -> __m256i {
        let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let m = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m))
    }
}

const fn q4i8_pair_perm() -> [u8; 64] {
    let mut p = [0u8; 64];
    let mut l = 0;
    while l < 64 {
        let (nibble, lane) = (l / 32, l % 32);
        p[l] = (32 * (lane / 16) + 2 * (lane % 16) + nibble) as u8;
        l += 1;
    }
    p
}

/// 8-bit codes, stored offset by 128 (`q - 128` in `[-128, 127]`): codes
/// up to 255 would overflow `vpmaddubsw`'s i16 pair sums, the offset ones
/// with the sign trick (`|q'|` unsigned times `x` carrying `q'`'s sign) stay
/// under `128 * 127 * 2`. `w = s q + b = s q' + (b + 128 s)`, so the bias
/// term gains `128 * sum_g s_g sum(x)_g` (added in [`int8x_rows`]). Lanes are
/// in natural order; each block of a pair keeps its own vector.
pub(super) struct Q8i8;
impl DecodeI8 for Q8i8 {
    const BITS: usize = 8;
    const PAIR_PERM: [u8; 64] = identity_perm();
    const LANE_BLOCK: [u8; 8] = [0; 8];
    const ONE_PERM: [u8; 32] = identity_perm();
    const NATURAL: bool = true;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_pair(p: *const u8) -> (__m256i, __m256i) {
        let off = _mm256_set1_epi8(-128);
        unsafe {
            (
                _mm256_xor_si256(_mm256_loadu_si256(p as *const __m256i), off),
                _mm256_xor_si256(_mm256_loadu_si256(p.add(32) as *const __m256i), off),
            )
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_one(p: *const u8) -> __m256i {
        let off = _mm256_set1_epi8(-128);
        unsafe { _mm256_xor_si256(_mm256_loadu_si256(p as *const __m256i), off) }
    }
}

const fn identity_perm<const N: usize>() -> [u8; N] {
    let mut p = [0u8; N];
    let mut l = 0;
    while l < N {
        p[l] = l as u8;
        l += 1;
    }
    p
}

/// `sum(q' x)` per i32 lane for signed codes `q'` (see [`Q8i8`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn signed_dot(q: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q)),
        _mm256_set1_epi16(1),
    )
}

pub(super) struct Q2i8;
impl DecodeI8 for Q2i8 {
    const BITS: usize = 2;
    // 16 bytes; first vector: field 0 of all bytes, then field 1; second:
    // fields 2 and 3. Bytes 0..8 are the first block, 8..16 the second.
    const PAIR_PERM: [u8; 64] = q2i8_pair_perm();
    const LANE_BLOCK: [u8; 8] = [0, 0, 1, 1, 0, 0, 1, 1];
    // Per block: field 0 (elements 4j), field 2 (4j+2), field 1 (4j+1), field 3 (4j+3).
    const ONE_PERM: [u8; 32] = q2i8_perm();
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_pair(p: *const u8) -> (__m256i, __m256i) {
        unsafe { q2_fields(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_one(p: *const u8) -> __m256i {
        let (a, b) = unsafe { q2_fields(_mm_loadl_epi64(p as *const __m128i)) };
        _mm256_unpacklo_epi64(a, b)
    }
}

const fn q2i8_pair_perm() -> [u8; 64] {
    let mut p = [0u8; 64];
    let mut l = 0;
    while l < 64 {
        let (vec, lane) = (l / 32, l % 32);
        let field = 2 * vec + lane / 16;
        let byte = lane % 16;
        p[l] = (32 * (byte / 8) + 4 * (byte % 8) + field) as u8;
        l += 1;
    }
    p
}

/// For 16 bytes broadcast to both halves: `a` holds field 0 (low half) and
/// field 1 (high half) of every byte, `b` fields 2 and 3. Shifting 32-bit
/// words is fine: bits pulled in from the next byte land above bit 1 and
/// are masked off.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2_fields(v: __m128i) -> (__m256i, __m256i) {
    let bc = _mm256_broadcastsi128_si256(v);
    let m = _mm256_set1_epi8(3);
    let a = _mm256_and_si256(
        _mm256_srlv_epi32(bc, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)),
        m,
    );
    let b = _mm256_and_si256(
        _mm256_srlv_epi32(bc, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)),
        m,
    );
    (a, b)
}

const fn q2i8_perm() -> [u8; 32] {
    const FIELD_OF_QUARTER: [usize; 4] = [0, 2, 1, 3];
    let mut p = [0u8; 32];
    let mut l = 0;
    while l < 32 {
        p[l] = (4 * (l % 8) + FIELD_OF_QUARTER[l / 8]) as u8;
        l += 1;
    }
    p
}

/// x quantized for the integer path, laid out for one decoder.
pub(super) struct XInt8 {
    /// `n * cols` codes: per row, block pairs in `PAIR_PERM` order, then a
    /// trailing odd block in `ONE_PERM` order.
    q: Vec<i8>,
    /// `n * nblk` block scales (`x ~= d * q`).
    d: Vec<f32>,
    /// `n * npairs * 8`: the block scale of each i32 lane (`LANE_BLOCK`);
    /// empty for `NATURAL` decoders, which read `d`.
    dpat: Vec<f32>,
    /// `n * groups` exact f32 sums of x per weight group.
    sum: Vec<f32>,
    /// For 8-bit codes on [`Vnni`] (`n * cols / 4`): `-128 *` the sum of
    /// each four codes of x, the start value of `vpdpbusd` on raw codes,
    /// which leaves `sum((q - 128) x)`, the offset codes' sum; empty otherwise.
    q8corr: Vec<i32>,
}

fn quantize_x<D: DecodeI8>(x: &[f32], n: usize, cols: usize, group_size: usize) -> XInt8 {
    quantize_x_for::<D, Maddubs>(x, n, cols, group_size)
}

fn quantize_x_for<D: DecodeI8, K: I8Dot>(
    x: &[f32],
    n: usize,
    cols: usize,
    group_size: usize,
) -> XInt8 {
    let nblk = cols / 32;
    let npairs = nblk / 2;
    let bpg = group_size / 32;
    let mut d = vec![0.0f32; n * nblk];
    let mut bsum = vec![0.0f32; n * nblk];
    // Natural-order codes first (vectorized), then one table-driven copy
    // into the decoder's lane order.
    let mut nat = vec![0i8; x.len()];
    for (((xb, qb), db), sb) in x
        .chunks_exact(32)
        .zip(nat.chunks_exact_mut(32))
        .zip(d.iter_mut())
        .zip(bsum.iter_mut())
    {
        // SAFETY: features detected (only `Avx2` reaches this); 32 elements each.
        (*db, *sb) = unsafe { quantize_block32(xb.as_ptr(), qb.as_mut_ptr()) };
    }
    let sum = bsum.chunks_exact(bpg).map(|g| g.iter().sum()).collect();
    if D::NATURAL {
        let q8corr = if K::Q8_CORR {
            nat.chunks_exact(4)
                .map(|c| -128 * c.iter().map(|&v| v as i32).sum::<i32>())
                .collect()
        } else {
            Vec::new()
        };
        return XInt8 {
            q: nat,
            d,
            dpat: Vec::new(),
            sum,
            q8corr,
        };
    }
    let mut q = vec![0i8; x.len()];
    let mut dpat = Vec::with_capacity(n * npairs * 8);
    for i in 0..n {
        let (nr, qr, dr) = (
            &nat[i * cols..(i + 1) * cols],
            &mut q[i * cols..(i + 1) * cols],
            &d[i * nblk..(i + 1) * nblk],
        );
        for p in 0..npairs {
            let (src, dst) = (&nr[64 * p..64 * p + 64], &mut qr[64 * p..64 * p + 64]);
            for (o, &e) in dst.iter_mut().zip(D::PAIR_PERM.iter()) {
                *o = src[e as usize];
            }
            dpat.extend(D::LANE_BLOCK.iter().map(|&b| dr[2 * p + b as usize]));
        }
        if nblk % 2 == 1 {
            let o = 64 * npairs;
            for (l, &e) in D::ONE_PERM.iter().enumerate() {
                qr[o + l] = nr[o + e as usize];
            }
        }
    }
    XInt8 {
        q,
        d,
        dpat,
        sum,
        q8corr: Vec::new(),
    }
}

/// Quantizes 32 floats to int8 with one absmax scale; returns the scale and
/// the exact f32 sum of the block. Rounds to nearest even (the ties the
/// scalar `round` would send away from zero are within the same half step).
/// # Safety: 32 readable floats at `x`, 32 writable bytes at `q`; AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block32(x: *const f32, q: *mut i8) -> (f32, f32) {
    unsafe {
        let v = [
            _mm256_loadu_ps(x),
            _mm256_loadu_ps(x.add(8)),
            _mm256_loadu_ps(x.add(16)),
            _mm256_loadu_ps(x.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let a = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let sum = hsum(_mm256_add_ps(
            _mm256_add_ps(v[0], v[1]),
            _mm256_add_ps(v[2], v[3]),
        ));
        let m128 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m64 = _mm_max_ps(m128, _mm_movehl_ps(m128, m128));
        let amax = _mm_cvtss_f32(_mm_max_ss(m64, _mm_shuffle_ps(m64, m64, 1)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let c = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
        // packs work per 128-bit lane: [c0 c1] -> lanes (0-3 4-7 | ...), fix
        // the order with one cross-lane permute at the end.
        let w01 = _mm256_packs_epi32(c[0], c[1]);
        let w23 = _mm256_packs_epi32(c[2], c[3]);
        let b = _mm256_packs_epi16(w01, w23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q as *mut __m256i, b);
        (d, sum)
    }
}

impl Avx2 {
    /// The int8-activation product of 2/4/8-bit matrices of one layout, on
    /// this tier's dot-product instructions.
    fn int8x_many(&self, ms: &[&AffineMatrix<'_>], x: &[f32], n: usize, outs: &[Out]) {
        match (ms[0].bits, self.vnni) {
            (2, false) => int8x_many::<Q2i8, Maddubs>(ms, x, n, outs),
            (8, false) => int8x_many::<Q8i8, Maddubs>(ms, x, n, outs),
            (_, false) => int8x_many::<Q4i8, Maddubs>(ms, x, n, outs),
            (2, true) => int8x_many::<Q2i8, Vnni>(ms, x, n, outs),
            (8, true) => int8x_many::<Q8i8, Vnni>(ms, x, n, outs),
            (_, true) => int8x_many::<Q4i8, Vnni>(ms, x, n, outs),
        }
    }
}

/// Which instructions form the integer block sums of a weight row and
/// quantized x: AVX2's `vpmaddubsw` + `vpmaddwd` ([`Maddubs`]) or AVX-512
/// VNNI's `vpdpbusd` on 256-bit vectors ([`Vnni`], `kernels/avx512.rs`).
/// Both produce the same i32 lanes from the same quantized x, and
/// [`int8x_dot_body`] does the same f32 work on them, so the two tiers'
/// products are bit-identical.
pub(super) trait I8Dot {
    /// Whether [`XInt8::q8corr`] must be filled (see [`Vnni`]).
    const Q8_CORR: bool;
    /// `sum(ca * xa + cb * xb)` per i32 lane (four bytes of each), for
    /// unsigned codes `c <= 15`.
    /// # Safety: the implementor's features available.
    unsafe fn pair(ca: __m256i, cb: __m256i, xa: __m256i, xb: __m256i) -> __m256i;
    /// `sum(c * x)` per i32 lane, unsigned codes `c <= 15`. # Safety: as above.
    unsafe fn one(c: __m256i, x: __m256i) -> __m256i;
    /// 32 8-bit codes at `p`, as this implementation's [`I8Dot::signed8`] takes them.
    /// # Safety: 32 readable bytes; features available.
    unsafe fn q8_codes(p: *const u8) -> __m256i;
    /// `sum((q - 128) * x)` per i32 lane for 8-bit codes from
    /// [`I8Dot::q8_codes`]; `corr` is the block's `q8corr` (8 lanes) when
    /// `Q8_CORR`. # Safety: as above; `corr` readable when `Q8_CORR`.
    unsafe fn signed8(c: __m256i, x: __m256i, corr: *const i32) -> __m256i;
    /// The row dot, [`int8x_dot_body`] compiled with this implementation's features.
    /// # Safety: as [`int8x_dot_body`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn dot<D: DecodeI8, const N: usize>(
        row: *const u8,
        scales: *const f32,
        cols: usize,
        group_size: usize,
        xq: &XInt8,
        i0: usize,
    ) -> [f32; N];
}

/// AVX2's integer dot ([`I8Dot`]).
pub(super) struct Maddubs;
impl I8Dot for Maddubs {
    const Q8_CORR: bool = false;
    #[inline(always)]
    unsafe fn pair(ca: __m256i, cb: __m256i, xa: __m256i, xb: __m256i) -> __m256i {
        // Codes <= 15: the i16 pair sums cannot saturate (see the section docs).
        unsafe {
            let s16 = _mm256_add_epi16(_mm256_maddubs_epi16(ca, xa), _mm256_maddubs_epi16(cb, xb));
            _mm256_madd_epi16(s16, _mm256_set1_epi16(1))
        }
    }
    #[inline(always)]
    unsafe fn one(c: __m256i, x: __m256i) -> __m256i {
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1)) }
    }
    #[inline(always)]
    unsafe fn q8_codes(p: *const u8) -> __m256i {
        unsafe { Q8i8::decode_one(p) }
    }
    #[inline(always)]
    unsafe fn signed8(c: __m256i, x: __m256i, _corr: *const i32) -> __m256i {
        unsafe { signed_dot(c, x) }
    }
    #[inline]
    unsafe fn dot<D: DecodeI8, const N: usize>(
        row: *const u8,
        scales: *const f32,
        cols: usize,
        group_size: usize,
        xq: &XInt8,
        i0: usize,
    ) -> [f32; N] {
        unsafe { int8x_dot::<D, N>(row, scales, cols, group_size, xq, i0) }
    }
}

pub(super) use super::avx512::Vnni;

/// Matrices of one layout (bits, cols, group size) sharing x: x is quantized
/// once and their rows, concatenated, are cut into one set of parallel chunks.
fn int8x_many<D: DecodeI8, K: I8Dot>(ms: &[&AffineMatrix<'_>], x: &[f32], n: usize, outs: &[Out]) {
    let a0 = ms[0];
    let xq = quantize_x_for::<D, K>(x, n, a0.cols, a0.group_size);
    let row_bytes = a0.row_bytes() + a0.groups_per_row() * 4;
    let mut starts = Vec::with_capacity(ms.len() + 1);
    starts.push(0);
    for m in ms {
        starts.push(starts.last().copied().unwrap_or(0) + m.rows);
    }
    let total = starts[ms.len()];
    for_row_chunks(total, row_bytes, n, |range| {
        let mut sbuf = vec![0.0f32; a0.groups_per_row()];
        for (j, (m, out)) in ms.iter().zip(outs).enumerate() {
            let (lo, hi) = (range.start.max(starts[j]), range.end.min(starts[j + 1]));
            if lo >= hi {
                continue;
            }
            let local = lo - starts[j]..hi - starts[j];
            let mut i0 = 0;
            while i0 < n {
                let nb = (n - i0).min(NB);
                // SAFETY: features detected; check_matmul verified every
                // buffer length; xq was built from x (n * cols); the rows
                // belong to this task.
                unsafe {
                    with_nb!(
                        nb,
                        int8x_rows::<D, K>(m, &xq, i0, local.clone(), *out, &mut sbuf)
                    )
                };
                i0 += nb;
            }
        }
    });
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int8x_rows<D: DecodeI8, K: I8Dot, const N: usize>(
    a: &AffineMatrix<'_>,
    xq: &XInt8,
    i0: usize,
    rows: Range<usize>,
    out: Out,
    sbuf: &mut [f32],
) {
    let rb = a.row_bytes();
    let gpr = a.groups_per_row();
    for r in rows {
        // SAFETY: check_matmul verified scales/biases hold rows * gpr values.
        let (sc, bi) = unsafe {
            (
                a.scales.as_ptr().add(r * gpr),
                a.biases.as_ptr().add(r * gpr),
            )
        };
        unsafe { widen(std::slice::from_raw_parts(sc, gpr), sbuf) };
        let mut bias = [0.0f32; N];
        for (i, b) in bias.iter_mut().enumerate() {
            let xs = unsafe { xq.sum.as_ptr().add((i0 + i) * gpr) };
            *b = unsafe { bf16_dot(bi, xs, gpr) };
            if D::BITS == 8 {
                // The codes' offset of 128 (see `Q8i8`).
                let xs = unsafe { std::slice::from_raw_parts(xs, gpr) };
                *b += 128.0 * unsafe { dot_f32(&sbuf[..gpr], xs) };
            }
        }
        let res = unsafe {
            K::dot::<D, N>(
                a.packed.as_ptr().add(r * rb),
                sbuf.as_ptr(),
                a.cols,
                a.group_size,
                xq,
                i0,
            )
        };
        for (i, (v, b)) in res.into_iter().zip(bias).enumerate() {
            unsafe { out.write(i0 + i, r, v + b) };
        }
    }
}

/// `sum(bf16[k] * f32[k])` for `len` elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_dot(b: *const bf16, x: *const f32, len: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut k = 0;
    unsafe {
        while k + 8 <= len {
            acc = _mm256_fmadd_ps(bf16::load8(b.add(k)), _mm256_loadu_ps(x.add(k)), acc);
            k += 8;
        }
        let mut s = hsum(acc);
        while k < len {
            s += bf16_bits_to_f32(*b.add(k)) * *x.add(k);
            k += 1;
        }
        s
    }
}

/// Dots one 2/4/8-bit row (scales already widened to f32) with `N` rows
/// of quantized x from row `i0`; the bias term is added by the caller.
/// # Safety: AVX2/FMA/F16C available; the row's bytes and scales exist;
/// `xq` was quantized for this layout with at least `i0 + N` rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn int8x_dot<D: DecodeI8, const N: usize>(
    row: *const u8,
    scales: *const f32,
    cols: usize,
    group_size: usize,
    xq: &XInt8,
    i0: usize,
) -> [f32; N] {
    unsafe { int8x_dot_body::<D, Maddubs, N>(row, scales, cols, group_size, xq, i0) }
}

/// The row dot for any [`I8Dot`]; always inlined into a wrapper that
/// enables that implementation's features ([`int8x_dot`], `avx512::vnni_dot`),
/// so each tier gets its own compiled copy.
/// # Safety: as [`int8x_dot`], with `K`'s features available.
#[inline(always)]
pub(super) unsafe fn int8x_dot_body<D: DecodeI8, K: I8Dot, const N: usize>(
    row: *const u8,
    scales: *const f32,
    cols: usize,
    group_size: usize,
    x: &XInt8,
    i0: usize,
) -> [f32; N] {
    let nblk = cols / 32;
    let npairs = nblk / 2;
    // SAFETY (pointer setup): the caller guarantees rows i0..i0+N exist.
    let (xq, xd, xdpat, xcorr) = unsafe {
        (
            x.q.as_ptr().add(i0 * cols),
            x.d.as_ptr().add(i0 * nblk),
            // Empty (never read) for natural-order decoders.
            x.dpat.as_ptr().wrapping_add(i0 * npairs * 8),
            // Empty (never read) unless K::Q8_CORR.
            x.q8corr.as_ptr().wrapping_add(i0 * cols / 4),
        )
    };
    // Group sizes are powers of two (checked in `check_matmul`): a shift,
    // not a division, in the block loop.
    let bpg_log2 = (group_size / 32).trailing_zeros();
    let lane_mask = {
        let m = D::LANE_BLOCK.map(|b| if b == 1 { -1i32 } else { 0 });
        unsafe { _mm256_castsi256_ps(_mm256_loadu_si256(m.as_ptr() as *const __m256i)) }
    };
    // Two FMA chains per input (even and odd pairs), whatever N (batch
    // invariance: see `CHAINS`).
    let k1 = 1;
    let mut acc = [[unsafe { _mm256_setzero_ps() }; 2]; N];
    // A macro, not a closure: a closure does not get the target features of
    // the wrapper this body is inlined into, so its intrinsics stayed calls
    // (perf: `_mm256_dpbusd_epi32`, `_mm256_fmadd_ps` as functions, over a
    // third of decode time); expanded here, they compile in the wrapper's tier.
    macro_rules! pair {
        ($p:expr, $slot:expr) => {{
            let (p, slot): (usize, usize) = ($p, $slot);
            // SAFETY: p < npairs, so the pair's bytes, codes and scales exist.
            unsafe {
                let s0 = _mm256_set1_ps(*scales.add((2 * p) >> bpg_log2));
                let s1 = _mm256_set1_ps(*scales.add((2 * p + 1) >> bpg_log2));
                if D::BITS == 8 {
                    let ca = K::q8_codes(row.add(p * 64));
                    let cb = K::q8_codes(row.add(p * 64 + 32));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xi = xq.add(i * cols + 64 * p);
                        let xa = _mm256_loadu_si256(xi as *const __m256i);
                        let xb = _mm256_loadu_si256(xi.add(32) as *const __m256i);
                        let ci = xcorr.wrapping_add((i * cols + 64 * p) / 4);
                        let d = xd.add(i * nblk + 2 * p);
                        let fa = _mm256_cvtepi32_ps(K::signed8(ca, xa, ci));
                        let fb = _mm256_cvtepi32_ps(K::signed8(cb, xb, ci.wrapping_add(8)));
                        a[slot] =
                            _mm256_fmadd_ps(fa, _mm256_mul_ps(s0, _mm256_set1_ps(*d)), a[slot]);
                        a[slot] = _mm256_fmadd_ps(
                            fb,
                            _mm256_mul_ps(s1, _mm256_set1_ps(*d.add(1))),
                            a[slot],
                        );
                    }
                } else {
                    let (ca, cb) = D::decode_pair(row.add(p * 8 * D::BITS));
                    let sv = _mm256_blendv_ps(s0, s1, lane_mask);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xi = xq.add(i * cols + 64 * p);
                        let xa = _mm256_loadu_si256(xi as *const __m256i);
                        let xb = _mm256_loadu_si256(xi.add(32) as *const __m256i);
                        let f = _mm256_cvtepi32_ps(K::pair(ca, cb, xa, xb));
                        let scale =
                            _mm256_mul_ps(sv, _mm256_loadu_ps(xdpat.add((i * npairs + p) * 8)));
                        a[slot] = _mm256_fmadd_ps(f, scale, a[slot]);
                    }
                }
            }
        }};
    }
    let mut p = 0;
    while p + 2 <= npairs {
        pair!(p, 0);
        pair!(p + 1, k1);
        p += 2;
    }
    if p < npairs {
        pair!(p, 0);
    }
    if nblk % 2 == 1 {
        let blk = nblk - 1;
        // SAFETY: the trailing block's bytes, codes and scales exist.
        unsafe {
            let s = *scales.add(blk >> bpg_log2);
            let c = if D::BITS == 8 {
                K::q8_codes(row.add(blk * 32))
            } else {
                D::decode_one(row.add(blk * 4 * D::BITS))
            };
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_si256(xq.add(i * cols + blk * 32) as *const __m256i);
                let f = if D::BITS == 8 {
                    let ci = xcorr.wrapping_add((i * cols + blk * 32) / 4);
                    _mm256_cvtepi32_ps(K::signed8(c, xv, ci))
                } else {
                    _mm256_cvtepi32_ps(K::one(c, xv))
                };
                a[0] = _mm256_fmadd_ps(f, _mm256_set1_ps(s * *xd.add(i * nblk + blk)), a[0]);
            }
        }
    }
    let mut res = [0.0f32; N];
    for (r, a) in res.iter_mut().zip(&acc) {
        *r = unsafe { hsum(_mm256_add_ps(a[0], a[1])) };
    }
    res
}

// ---------------------------------------------------------------- mxfp4 weights
//
// Codes are looked up as the doubled e2m1 integers (`E2M1_X2`, |v| <= 12)
// with one `pshufb`, and the factor 1/2 rides in the block scale
// (`E8M0_HALF`), so both paths multiply exact small integers.
//
// * int8 activations (`avx2`, the default, as for 4-bit affine): x is
//   quantized per 32-block exactly as for q4 (`quantize_x::<Q4i8>`: the
//   nibble order of MXFP4 bytes is the q4 one, low nibble = even element),
//   and a block pair costs two `vpmaddubsw` with the sign trick (|w|
//   unsigned times x carrying w's sign; pair sums <= 2 * 12 * 127, their sum
//   fits i16), one `vpmaddwd`, one convert, one FMA with
//   `scale_w * scale_x` per i32 lane. Error: x's rounding only, as for q4.
// * f32 activations (`avx2-f32x`): each block decoded to four f32 vectors
//   in the q4 split order and multiplied by its scale; within f32
//   reassociation error of the scalar reference (and so of transformers'
//   dequantized weights).

/// `E2M1_X2` in both 128-bit halves (`pshufb` looks up per half).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mxfp4_lut() -> __m256i {
    let t = mfx_formats::mxfp4::E2M1_X2;
    _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(t.as_ptr() as *const __m128i) })
}

/// The e8m0 scales of one row as f32 half-scales.
#[inline]
fn mxfp4_scales(scales: &[u8], out: &mut [f32]) {
    for (o, &s) in out.iter_mut().zip(scales) {
        *o = super::E8M0_HALF[s as usize];
    }
}

fn mxfp4_matmul_f32(m: &Mxfp4Matrix<'_>, x: &[f32], n: usize, out: Out) {
    // cols is whole 32-blocks, so the permutation never straddles rows.
    let xp = permute_x(x, &split_perm(4));
    for_row_chunks(m.rows, m.row_bytes(), n, |range| {
        let mut sbuf = vec![0.0f32; m.blocks_per_row()];
        let mut i0 = 0;
        while i0 < n {
            let nb = (n - i0).min(NB);
            // SAFETY: features detected; check_matmul verified the buffer
            // lengths; the rows in range belong to this task.
            unsafe {
                with_nb!(
                    nb,
                    mxfp4_rows_f32(m, &xp, i0, range.clone(), out, &mut sbuf)
                )
            };
            i0 += nb;
        }
    });
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mxfp4_rows_f32<const N: usize>(
    m: &Mxfp4Matrix<'_>,
    x: &[f32],
    i0: usize,
    rows: Range<usize>,
    out: Out,
    sbuf: &mut [f32],
) {
    let (cb, bpr) = (m.row_code_bytes(), m.blocks_per_row());
    let lut = unsafe { mxfp4_lut() };
    let xp = unsafe { x.as_ptr().add(i0 * m.cols) };
    for r in rows {
        mxfp4_scales(&m.scales[r * bpr..(r + 1) * bpr], sbuf);
        let res = unsafe {
            mxfp4_dot_f32::<N>(
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

/// One block's 32 codes as f32 doubled values, in `split_perm(4)` order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mxfp4_decode32(p: *const u8, lut: __m256i) -> [__m256; 4] {
    let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let m = _mm_set1_epi8(0x0F);
    let l = _mm256_castsi256_si128(lut);
    let lo = _mm_shuffle_epi8(l, _mm_and_si128(v, m));
    let hi = _mm_shuffle_epi8(l, _mm_and_si128(_mm_srli_epi16(v, 4), m));
    unsafe {
        [
            i8x8_to_f32(lo),
            i8x8_to_f32(_mm_srli_si128(lo, 8)),
            i8x8_to_f32(hi),
            i8x8_to_f32(_mm_srli_si128(hi, 8)),
        ]
    }
}

/// The low 8 signed bytes of `v` as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn i8x8_to_f32(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

/// Dots one mxfp4 row (half-scales widened) with `N` rows of permuted x.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mxfp4_dot_f32<const N: usize>(
    row: *const u8,
    scales: *const f32,
    cols: usize,
    x: *const f32,
    lut: __m256i,
) -> [f32; N] {
    let ka = CHAINS;
    let mut acc = [[_mm256_setzero_ps(); 4]; N];
    for b in 0..cols / 32 {
        let c = 32 * b;
        let s = _mm256_set1_ps(unsafe { *scales.add(b) });
        let q = unsafe { mxfp4_decode32(row.add(16 * b), lut) };
        for (k, qk) in q.into_iter().enumerate() {
            let wv = _mm256_mul_ps(qk, s);
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = unsafe { _mm256_loadu_ps(x.add(i * cols + c + 8 * k)) };
                a[k % ka] = _mm256_fmadd_ps(wv, xv, a[k % ka]);
            }
        }
    }
    let mut res = [0.0f32; N];
    for (r, a) in res.iter_mut().zip(&acc) {
        *r = unsafe {
            hsum(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ))
        };
    }
    res
}

/// MXFP4 matrices of one width sharing x: x quantized once (q4 layout),
/// their rows concatenated into one set of parallel chunks.
fn mxfp4_i8_many(ms: &[&Mxfp4Matrix<'_>], x: &[f32], n: usize, outs: &[Out]) {
    let m0 = ms[0];
    let xq = quantize_x::<Q4i8>(x, n, m0.cols, 32);
    let mut starts = Vec::with_capacity(ms.len() + 1);
    starts.push(0);
    for m in ms {
        starts.push(starts.last().copied().unwrap_or(0) + m.rows);
    }
    let total = starts[ms.len()];
    for_row_chunks(total, m0.row_bytes(), n, |range| {
        let mut sbuf = vec![0.0f32; m0.blocks_per_row()];
        for (j, (m, out)) in ms.iter().zip(outs).enumerate() {
            let (lo, hi) = (range.start.max(starts[j]), range.end.min(starts[j + 1]));
            if lo >= hi {
                continue;
            }
            let local = lo - starts[j]..hi - starts[j];
            let mut i0 = 0;
            while i0 < n {
                let nb = (n - i0).min(NB);
                // SAFETY: features detected; check_matmul verified every
                // buffer length; xq was built from x (n * cols); the rows
                // belong to this task.
                unsafe {
                    with_nb!(
                        nb,
                        mxfp4_rows_i8(m, &xq, i0, local.clone(), *out, &mut sbuf)
                    )
                };
                i0 += nb;
            }
        }
    });
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mxfp4_rows_i8<const N: usize>(
    m: &Mxfp4Matrix<'_>,
    xq: &XInt8,
    i0: usize,
    rows: Range<usize>,
    out: Out,
    sbuf: &mut [f32],
) {
    let (cb, bpr) = (m.row_code_bytes(), m.blocks_per_row());
    let npairs = bpr / 2;
    let lut = unsafe { mxfp4_lut() };
    for r in rows {
        mxfp4_scales(&m.scales[r * bpr..(r + 1) * bpr], sbuf);
        let res = unsafe {
            mxfp4_dot_i8::<N>(
                m.blocks.as_ptr().add(r * cb),
                sbuf.as_ptr(),
                m.cols,
                xq.q.as_ptr().add(i0 * m.cols),
                xq.d.as_ptr().add(i0 * bpr),
                xq.dpat.as_ptr().add(i0 * npairs * 8),
                lut,
            )
        };
        for (i, v) in res.into_iter().enumerate() {
            unsafe { out.write(i0 + i, r, v) };
        }
    }
}

/// Dots one mxfp4 row with `N` rows of int8 x (laid out by `quantize_x::<Q4i8>`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mxfp4_dot_i8<const N: usize>(
    row: *const u8,
    scales: *const f32,
    cols: usize,
    xq: *const i8,
    xd: *const f32,
    xdpat: *const f32,
    lut: __m256i,
) -> [f32; N] {
    let nblk = cols / 32;
    let npairs = nblk / 2;
    let ones = _mm256_set1_epi16(1);
    let nib = _mm256_set1_epi8(0x0F);
    let lane_mask = {
        let m = Q4i8::LANE_BLOCK.map(|b| if b == 1 { -1i32 } else { 0 });
        unsafe { _mm256_castsi256_ps(_mm256_loadu_si256(m.as_ptr() as *const __m256i)) }
    };
    // Two chains per input whatever N (batch invariance: see `CHAINS`).
    let k1 = 1;
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    let pair = |p: usize, acc: &mut [[__m256; 2]; N], slot: usize| {
        // SAFETY: p < npairs: the pair's 32 code bytes, 64 x codes and
        // scales exist.
        unsafe {
            let v = _mm256_loadu_si256(row.add(32 * p) as *const __m256i);
            let ca = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, nib));
            let cb = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib));
            let (aa, ab) = (_mm256_abs_epi8(ca), _mm256_abs_epi8(cb));
            let sv = _mm256_blendv_ps(
                _mm256_set1_ps(*scales.add(2 * p)),
                _mm256_set1_ps(*scales.add(2 * p + 1)),
                lane_mask,
            );
            for (i, a) in acc.iter_mut().enumerate() {
                let xi = xq.add(i * cols + 64 * p);
                let xa = _mm256_loadu_si256(xi as *const __m256i);
                let xb = _mm256_loadu_si256(xi.add(32) as *const __m256i);
                let s16 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(aa, _mm256_sign_epi8(xa, ca)),
                    _mm256_maddubs_epi16(ab, _mm256_sign_epi8(xb, cb)),
                );
                let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
                let scale = _mm256_mul_ps(sv, _mm256_loadu_ps(xdpat.add((i * npairs + p) * 8)));
                a[slot] = _mm256_fmadd_ps(f, scale, a[slot]);
            }
        }
    };
    let mut p = 0;
    while p + 2 <= npairs {
        pair(p, &mut acc, 0);
        pair(p + 1, &mut acc, k1);
        p += 2;
    }
    if p < npairs {
        pair(p, &mut acc, 0);
    }
    if nblk % 2 == 1 {
        let blk = nblk - 1;
        // SAFETY: the trailing block's 16 code bytes, 32 x codes and scale exist.
        unsafe {
            let v = _mm_loadu_si128(row.add(16 * blk) as *const __m128i);
            let m = _mm_set1_epi8(0x0F);
            let idx = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
            let c = _mm256_shuffle_epi8(lut, idx);
            let ac = _mm256_abs_epi8(c);
            let s = *scales.add(blk);
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_si256(xq.add(i * cols + blk * 32) as *const __m256i);
                let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(
                    _mm256_maddubs_epi16(ac, _mm256_sign_epi8(xv, c)),
                    ones,
                ));
                a[0] = _mm256_fmadd_ps(f, _mm256_set1_ps(s * *xd.add(i * nblk + blk)), a[0]);
            }
        }
    }
    let mut res = [0.0f32; N];
    for (r, a) in res.iter_mut().zip(&acc) {
        *r = unsafe { hsum(_mm256_add_ps(a[0], a[1])) };
    }
    res
}
