//! AVX-512 VNNI for the int8-activation products (the `avx512` tier).
//!
//! The tier is the AVX2 backend ([`super::avx2::Avx2`]) with one part
//! swapped: the integer block sums of a 2/4/8-bit weight row and int8 x.
//! AVX2 forms them with `vpmaddubsw` (u8 x i8 -> i16 pairs), an i16 add and
//! `vpmaddwd` (-> i32); 8-bit codes, which would saturate `vpmaddubsw`, are
//! offset to signed and need `vpabsb` + `vpsignb` on top. VNNI's `vpdpbusd`
//! multiplies u8 by i8 and adds each four products into an i32 lane in one
//! instruction. It is used on 256-bit vectors (AVX512-VL): the same lanes
//! as AVX2's, so the tier shares AVX2's quantized x, lane order and f32
//! code ([`int8x_dot_body`]) and its products are bit-identical to `avx2`'s
//! (tests/kernels.rs checks that); and 256-bit integer work issues on three
//! ports of current Intel cores where 512-bit work gets two (a first version
//! with 512-bit `vpdpbusd` and 16-lane scales measured no faster than AVX2).
//!
//! Everything else (f32/bf16/f16 weights, 3/6-bit codes, MXFP4, attention,
//! conversions) runs the AVX2 code unchanged.
//!
//! Safety: every function here carries the AVX-512 target features and is
//! reached only through `Avx2::detect_avx512`, after [`supported`] (and
//! AVX2/FMA/F16C) were detected.

use super::avx2::{int8x_dot_body, DecodeI8, I8Dot, XInt8};
use std::arch::x86_64::*;

/// AVX-512 F, BW, VL and VNNI (Cascade Lake, Ice Lake, Zen 4 and later).
pub(super) fn supported() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// `vpdpbusd` on 256-bit vectors ([`I8Dot`]).
pub(crate) struct Vnni;

impl I8Dot for Vnni {
    // 8-bit codes go in raw (unsigned); each lane starts from -128 * the
    // sum of its four x codes, which leaves the offset codes' sum, the
    // integers AVX2 forms.
    const Q8_CORR: bool = true;
    #[inline(always)]
    unsafe fn pair(ca: __m256i, cb: __m256i, xa: __m256i, xb: __m256i) -> __m256i {
        unsafe { _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ca, xa), cb, xb) }
    }
    #[inline(always)]
    unsafe fn one(c: __m256i, x: __m256i) -> __m256i {
        unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, x) }
    }
    #[inline(always)]
    unsafe fn q8_codes(p: *const u8) -> __m256i {
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }
    #[inline(always)]
    unsafe fn signed8(c: __m256i, x: __m256i, corr: *const i32) -> __m256i {
        unsafe { _mm256_dpbusd_epi32(_mm256_loadu_si256(corr as *const __m256i), c, x) }
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
        unsafe { vnni_dot::<D, N>(row, scales, cols, group_size, xq, i0) }
    }
}

/// [`int8x_dot_body`] compiled with AVX-512 VNNI.
/// # Safety: as `avx2::int8x_dot`; AVX-512 F/BW/VL/VNNI available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni_dot<D: DecodeI8, const N: usize>(
    row: *const u8,
    scales: *const f32,
    cols: usize,
    group_size: usize,
    xq: &XInt8,
    i0: usize,
) -> [f32; N] {
    unsafe { int8x_dot_body::<D, Vnni, N>(row, scales, cols, group_size, xq, i0) }
}
