//! CPU kernels behind one dispatch point.
//!
//! Every kernel has a scalar reference (`scalar.rs`) that is always compiled
//! and is the definition of correct; SIMD tiers (AVX2+FMA+F16C on x86_64, NEON
//! on aarch64) are picked once at run time and cached. `MFX_KERNELS=scalar`
//! (or `avx2`, `neon`) forces a tier so that tests exercise each path on the
//! same machine; asking for a tier the CPU lacks falls back to scalar. The
//! binary is never built with `target-cpu=native`: SIMD code lives in
//! `#[target_feature]` functions that are only reached after detection.
//!
//! Conventions: weights are `[rows, cols]` row-major (`rows` = output
//! features, as in PyTorch's `nn.Linear.weight`); activations are f32,
//! `n` rows of `cols`; accumulation is always f32.
//!
//! Parallelism (all tiers): output rows are cut into chunks of at least 16 KiB
//! of weights and spread over rayon; products with less than 256 KiB of work
//! stay on the calling thread so the tiny test models pay no pool overhead.
//! For `n > 1` each weight row is decoded once and dotted with up to 8 inputs
//! at a time, so prompt processing reads the weights once per call.

pub mod scalar;

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
pub mod neon;
mod parallel;
pub use parallel::on_workers;

use half::{bf16, f16};
use mfx_formats::mxfp4::Mxfp4Matrix;
use mfx_formats::quant::AffineMatrix;
use std::sync::OnceLock;

/// A borrowed weight matrix in any storage scheme.
#[derive(Debug, Clone, Copy)]
pub enum MatRef<'a> {
    F32 {
        rows: usize,
        cols: usize,
        data: &'a [f32],
    },
    Bf16 {
        rows: usize,
        cols: usize,
        data: &'a [bf16],
    },
    F16 {
        rows: usize,
        cols: usize,
        data: &'a [f16],
    },
    Affine(AffineMatrix<'a>),
    /// OCP MXFP4 (gpt-oss's experts as the hub ships them), see
    /// `mfx_formats::mxfp4`: usable wherever an affine matrix is.
    Mxfp4(Mxfp4Matrix<'a>),
}

impl MatRef<'_> {
    pub fn rows(&self) -> usize {
        match self {
            MatRef::F32 { rows, .. } | MatRef::Bf16 { rows, .. } | MatRef::F16 { rows, .. } => {
                *rows
            }
            MatRef::Affine(a) => a.rows,
            MatRef::Mxfp4(m) => m.rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            MatRef::F32 { cols, .. } | MatRef::Bf16 { cols, .. } | MatRef::F16 { cols, .. } => {
                *cols
            }
            MatRef::Affine(a) => a.cols,
            MatRef::Mxfp4(m) => m.cols,
        }
    }
    /// Bytes of weights (codes + scales + biases) one output row reads; what
    /// chunking and the benchmark's GB/s are measured in.
    pub fn row_bytes(&self) -> usize {
        match self {
            MatRef::F32 { cols, .. } => cols * 4,
            MatRef::Bf16 { cols, .. } | MatRef::F16 { cols, .. } => cols * 2,
            MatRef::Affine(a) => a.row_bytes() + a.groups_per_row() * 4,
            MatRef::Mxfp4(m) => m.row_bytes(),
        }
    }
    /// Whether the buffers hold exactly `rows * cols` elements; kernels check
    /// this once so the hot loops can index without bounds checks.
    fn is_consistent(&self) -> bool {
        match self {
            MatRef::F32 { rows, cols, data } => rows.checked_mul(*cols) == Some(data.len()),
            MatRef::Bf16 { rows, cols, data } => rows.checked_mul(*cols) == Some(data.len()),
            MatRef::F16 { rows, cols, data } => rows.checked_mul(*cols) == Some(data.len()),
            MatRef::Affine(a) => {
                let n = a.rows.checked_mul(a.cols);
                a.group_size.is_power_of_two()
                    && a.cols % a.group_size == 0
                    && a.group_size % 32 == 0
                    && mfx_formats::quant::AFFINE_BITS.contains(&a.bits)
                    && n.map(|n| n / 8 * a.bits as usize) == Some(a.packed.len())
                    && n.map(|n| n / a.group_size) == Some(a.scales.len())
                    && a.biases.len() == a.scales.len()
            }
            MatRef::Mxfp4(m) => {
                mfx_formats::mxfp4::mxfp4_sizes(m.rows, m.cols)
                    == Ok((m.blocks.len(), m.scales.len()))
            }
        }
    }
    /// Reference dequantization of row `r` (slow path: embeddings lookup, tests).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            MatRef::F32 { cols, data, .. } => {
                out[..*cols].copy_from_slice(&data[r * cols..(r + 1) * cols])
            }
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
            MatRef::Mxfp4(m) => m.dequantize_row(r, out),
        }
    }
}

/// Which implementation tier runs the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Scalar,
    Avx2,
    /// AVX2 with the int8 products on AVX-512 VNNI (`kernels/avx512.rs`).
    Avx512,
    Neon,
}

impl Tier {
    /// The name `MFX_KERNELS` accepts for this tier.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Scalar => "scalar",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
            Tier::Neon => "neon",
        }
    }
}

/// The kernel set. One implementation per tier; all must agree with
/// [`scalar`] within float32 reassociation error.
pub trait Backend: Send + Sync {
    fn tier(&self) -> Tier;
    /// The `MFX_KERNELS` name of this backend; a tier may offer variants
    /// (`avx2-f32x`: AVX2 with f32 activations in every product).
    fn name(&self) -> &'static str {
        self.tier().name()
    }
    /// Whether products with 2/4/8-bit weights (and MXFP4) quantize x to
    /// int8 per 32-block: their results carry x's rounding (see
    /// `avx2.rs`), so they are held to a looser budget than f32 tiers and
    /// can flip near-tied greedy choices.
    fn int8_activations(&self) -> bool {
        false
    }
    /// `y[n, rows] = x[n, cols] @ w^T`. Implementations parallelize over rows.
    ///
    /// Panics if the buffer lengths disagree with the shape (a caller bug,
    /// not an input error: loaders validate tensors before building `MatRef`).
    fn matmul(&self, w: &MatRef<'_>, x: &[f32], n: usize, y: &mut [f32]);
    /// `ys[i] = x @ ws[i]^T`: products that share their input (an expert's
    /// gate and up, attention's q, k and v). A backend that quantizes x does
    /// it once, and runs every row in one parallel pass instead of one
    /// fork/join per matrix.
    fn matmul_many(&self, ws: &[MatRef<'_>], x: &[f32], n: usize, ys: &mut [&mut [f32]]) {
        assert_eq!(ws.len(), ys.len(), "matmul_many: one output per matrix");
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            self.matmul(w, x, n, y);
        }
    }
    /// `sum(a[i] * b[i])`.
    fn dot(&self, a: &[f32], b: &[f32]) -> f32;
    /// `y[i] += alpha * x[i]`.
    fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]);
    /// `sum(a[i] * b[i])` with `b` widened from f16: attention scores against
    /// the f16 KV cache without materializing it in f32.
    fn dot_f16(&self, a: &[f32], b: &[f16]) -> f32 {
        scalar::dot_f16(a, b)
    }
    /// `y[i] += alpha * x[i]` with `x` widened from f16 (values of the f16 KV cache).
    fn axpy_f16(&self, alpha: f32, x: &[f16], y: &mut [f32]) {
        scalar::axpy_f16(alpha, x, y)
    }
    /// `scores[h * ld + j] = q_h . rows[j]` for every query row `q_h` of `q`
    /// (`[g, rows.width]`) and every cached row `j`: grouped-query attention
    /// scores of one KV head. Why grouped: the `g` query heads sharing a KV
    /// head then widen and read each key once instead of `g` times, which
    /// at a few thousand positions was half of decode time.
    fn dot_f16_rows(&self, rows: F16Rows<'_>, q: &[f32], scores: &mut [f32], ld: usize) {
        rows.check_group(q.len(), scores.len(), ld, "dot_f16_rows");
        for (h, qh) in q.chunks_exact(rows.width).enumerate() {
            for j in 0..rows.len {
                scores[h * ld + j] = self.dot_f16(qh, rows.row(j));
            }
        }
    }
    /// `out_h += sum_j p[h * ld + j] * rows[j]` for every output row `out_h`
    /// of `out` (`[g, rows.width]`): the value side of [`Backend::dot_f16_rows`].
    fn axpy_f16_rows(&self, rows: F16Rows<'_>, p: &[f32], ld: usize, out: &mut [f32]) {
        rows.check_group(out.len(), p.len(), ld, "axpy_f16_rows");
        for (h, oh) in out.chunks_exact_mut(rows.width).enumerate() {
            for j in 0..rows.len {
                self.axpy_f16(p[h * ld + j], rows.row(j), oh);
            }
        }
    }
    /// In-place `softmax(scale * x)` ([`softmax_scaled`] is the reference).
    /// A backend method because attention runs it over every cached position
    /// of every head: with libm's `expf` it was 3% of decode at 2k positions.
    fn softmax_scaled(&self, x: &mut [f32], scale: f32) {
        softmax_scaled(x, scale)
    }
    /// `dst[i] = src[i]` widened; the f16 KV cache is read through this.
    fn convert_f16_to_f32(&self, src: &[f16], dst: &mut [f32]) {
        scalar::convert_f16_to_f32(src, dst)
    }
    /// Round-to-nearest-even narrowing; the f16 KV cache is written through this.
    fn convert_f32_to_f16(&self, src: &[f32], dst: &mut [f16]) {
        scalar::convert_f32_to_f16(src, dst)
    }
    fn convert_bf16_to_f32(&self, src: &[bf16], dst: &mut [f32]) {
        scalar::convert_bf16_to_f32(src, dst)
    }
    /// Round-to-nearest-even narrowing (NaN stays NaN).
    fn convert_f32_to_bf16(&self, src: &[f32], dst: &mut [bf16]) {
        scalar::convert_f32_to_bf16(src, dst)
    }
}

/// `len` rows of `width` f16 elements, `stride` elements apart: one KV
/// head's keys or values. The head-major KV cache has `stride == width`;
/// the stride lets the same kernels read heads interleaved in one
/// `[positions, kv_heads * head_dim]` buffer.
#[derive(Debug, Clone, Copy)]
pub struct F16Rows<'a> {
    pub data: &'a [f16],
    pub stride: usize,
    pub len: usize,
    pub width: usize,
}

impl<'a> F16Rows<'a> {
    #[inline]
    pub fn row(&self, j: usize) -> &'a [f16] {
        &self.data[j * self.stride..j * self.stride + self.width]
    }

    /// Panics on shapes that disagree (caller bugs: the KV cache builds these).
    pub(crate) fn check_group(&self, group_len: usize, coef_len: usize, ld: usize, what: &str) {
        assert!(
            self.width > 0 && group_len.is_multiple_of(self.width),
            "{what}: ragged group"
        );
        let g = group_len / self.width;
        assert!(
            self.len == 0 || self.data.len() >= (self.len - 1) * self.stride + self.width,
            "{what}: rows out of range"
        );
        assert!(ld >= self.len, "{what}: leading dimension below row count");
        assert!(
            g == 0 || coef_len >= (g - 1) * ld + self.len,
            "{what}: coefficients too short"
        );
    }
}

/// `2^(s - 128)` for every e8m0 byte (`mfx_formats::mxfp4::e8m0_to_f32_half`):
/// the SIMD tiers multiply the doubled e2m1 integers by it.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) static E8M0_HALF: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut s = 0;
    while s < 256 {
        t[s] = mfx_formats::mxfp4::e8m0_to_f32_half(s as u8);
        s += 1;
    }
    t
};

static BACKEND: OnceLock<&'static dyn Backend> = OnceLock::new();

/// The backend for this process: chosen once from CPU features and `MFX_KERNELS`.
pub fn backend() -> &'static dyn Backend {
    *BACKEND.get_or_init(|| {
        let forced = std::env::var("MFX_KERNELS").ok();
        let b = select(forced.as_deref());
        tracing::debug!(kernels = b.name(), "kernel tier selected");
        b
    })
}

/// Every tier this CPU can run, scalar first and the fastest last.
pub fn available() -> Vec<&'static dyn Backend> {
    #[allow(unused_mut)]
    let mut v: Vec<&'static dyn Backend> = vec![&scalar::Scalar];
    #[cfg(target_arch = "x86_64")]
    if let (Some(exact), Some(fast)) = (avx2::Avx2::detect_f32x(), avx2::Avx2::detect()) {
        v.push(exact);
        v.push(fast);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(b) = avx2::Avx2::detect_avx512() {
        v.push(b);
    }
    #[cfg(target_arch = "aarch64")]
    if let Some(b) = neon::Neon::detect() {
        v.push(b);
    }
    v
}

/// The tiers `auto` picks from, in order of preference. The default
/// quantizes activations to int8 per 32-block for 2/4-bit weights (`avx2`,
/// llama.cpp's approach), about 2x faster on those matrices than f32
/// activations. Its cost, measured on the shared MLX 4-bit model over the
/// five validation texts (32 704 predictions each): +0.0001 to +0.0021 nats
/// of NLL, under 5% of what 4-bit weights themselves cost there (c: bf16
/// 1.5067, 4-bit 1.5473, 4-bit + int8 x 1.5475). It can flip near-tied
/// greedy choices, so `MFX_KERNELS=avx2-f32x` keeps f32 activations for
/// output that matches mlx-lm (computing in f32) token for token.
///
/// `avx512` (avx2 with the int8 block sums on VNNI) is bit-identical to
/// `avx2` (tests/kernels.rs), so preferring it changes no output; on a
/// 2-vCPU AMD EPYC (Zen 4) it measured 1.25x prefill and 1.08x decode on
/// the Qwen3-30B-A3B-shaped 4-layer pack, 3 interleaved rounds (docs/PERF.md).
const AUTO_PREFERENCE: [&str; 4] = ["avx512", "avx2", "neon", "scalar"];

/// Picks a tier; `forced` is the value of `MFX_KERNELS` if set. Unset, empty
/// or `auto` picks by [`AUTO_PREFERENCE`]; a named tier the CPU lacks (or an
/// unknown name) falls back to scalar with a warning, never to a faster tier.
pub fn select(forced: Option<&str>) -> &'static dyn Backend {
    let avail = available();
    let best = AUTO_PREFERENCE
        .iter()
        .find_map(|n| avail.iter().find(|b| b.name() == *n).copied())
        .unwrap_or(&scalar::Scalar);
    let name = match forced.map(|s| s.trim().to_ascii_lowercase()) {
        None => return best,
        Some(s) if s.is_empty() || s == "auto" => return best,
        Some(s) => s,
    };
    match avail.iter().find(|b| b.name() == name) {
        Some(b) => *b,
        None => {
            tracing::warn!(requested = %name, "MFX_KERNELS names a tier this CPU cannot run; using scalar");
            &scalar::Scalar
        }
    }
}

/// [`Backend::matmul_many`] on the process backend.
pub fn matmul_many(ws: &[MatRef<'_>], x: &[f32], n: usize, ys: &mut [&mut [f32]]) {
    backend().matmul_many(ws, x, n, ys)
}

/// `y[n, rows] = x[n, cols] @ w^T` on the process backend.
pub fn matmul(w: &MatRef<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    backend().matmul(w, x, n, y)
}

/// `y[rows] = w @ x`.
pub fn matvec(w: &MatRef<'_>, x: &[f32], y: &mut [f32]) {
    matmul(w, x, 1, y)
}

/// `sum(a[i] * b[i])` on the process backend.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    backend().dot(a, b)
}

/// `y[i] += alpha * x[i]` on the process backend.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    backend().axpy(alpha, x, y)
}

/// Bulk f16 -> f32 on the process backend (lengths must match).
pub fn convert_f16_to_f32(src: &[f16], dst: &mut [f32]) {
    backend().convert_f16_to_f32(src, dst)
}

/// Bulk f32 -> f16 (round to nearest even) on the process backend.
pub fn convert_f32_to_f16(src: &[f32], dst: &mut [f16]) {
    backend().convert_f32_to_f16(src, dst)
}

/// Bulk bf16 -> f32 on the process backend.
pub fn convert_bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    backend().convert_bf16_to_f32(src, dst)
}

/// Bulk f32 -> bf16 (round to nearest even) on the process backend.
pub fn convert_f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    backend().convert_f32_to_bf16(src, dst)
}

/// Quantizes one row to int8 with a per-row absmax scale (`--kv-bits 8`):
/// `x[i] ~= scale * codes[i]`, codes in `[-127, 127]`. Returns `scale`
/// (0.0 for an all-zero row). Symmetric so that dot products need no bias term.
pub fn quantize_row_i8(x: &[f32], codes: &mut [i8]) -> f32 {
    assert_eq!(x.len(), codes.len(), "quantize_row_i8: length mismatch");
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        // A non-finite row cannot be represented; zero codes with a NaN scale
        // make the damage visible downstream instead of silently clamping.
        codes.iter_mut().for_each(|c| *c = 0);
        return if amax == 0.0 { 0.0 } else { f32::NAN };
    }
    let scale = amax / 127.0;
    let inv = 127.0 / amax;
    for (c, v) in codes.iter_mut().zip(x) {
        *c = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// Inverse of [`quantize_row_i8`]: `out[i] = scale * codes[i]`.
pub fn dequantize_row_i8(codes: &[i8], scale: f32, out: &mut [f32]) {
    assert_eq!(codes.len(), out.len(), "dequantize_row_i8: length mismatch");
    for (o, c) in out.iter_mut().zip(codes) {
        *o = scale * *c as f32;
    }
}

/// `scale * sum(codes[i] * x[i])`: a query against an int8 key row.
pub fn dot_i8(codes: &[i8], scale: f32, x: &[f32]) -> f32 {
    assert_eq!(codes.len(), x.len(), "dot_i8: length mismatch");
    // 8 partial sums let the compiler vectorize without -ffast-math.
    let mut acc = [0.0f32; 8];
    let (cc, ct) = codes.split_at(codes.len() / 8 * 8);
    let (xc, xt) = x.split_at(cc.len());
    for (c8, x8) in cc.chunks_exact(8).zip(xc.chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += c8[k] as f32 * x8[k];
        }
    }
    let tail: f32 = ct.iter().zip(xt).map(|(c, v)| *c as f32 * v).sum();
    scale * (acc.iter().sum::<f32>() + tail)
}

/// `y[i] += alpha * scale * codes[i]`: accumulating an int8 value row.
pub fn axpy_i8(alpha: f32, codes: &[i8], scale: f32, y: &mut [f32]) {
    assert_eq!(codes.len(), y.len(), "axpy_i8: length mismatch");
    let a = alpha * scale;
    for (yi, c) in y.iter_mut().zip(codes) {
        *yi += a * *c as f32;
    }
}

/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * weight` (f32 throughout).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ss = dot(x, x) / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// Numerically stable in-place softmax.
pub fn softmax(x: &mut [f32]) {
    softmax_scaled(x, 1.0)
}

/// In-place `softmax(scale * x)`, the attention form (`scale = 1/sqrt(hd)`)
/// without a separate scaling pass. Max-subtracted, so large logits are safe;
/// an all `-inf` row (fully masked) becomes all zeros rather than NaN.
pub fn softmax_scaled(x: &mut [f32], scale: f32) {
    let ms = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v * scale));
    if ms == f32::NEG_INFINITY {
        x.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v * scale - ms).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
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

/// Shape checks shared by every tier's `matmul`.
fn check_matmul(w: &MatRef<'_>, x: &[f32], n: usize, y: &[f32]) {
    assert!(
        w.is_consistent(),
        "matmul: weight buffers do not match the {}x{} shape",
        w.rows(),
        w.cols()
    );
    assert_eq!(
        x.len(),
        n * w.cols(),
        "matmul: x holds {} values, expected n={n} x cols={}",
        x.len(),
        w.cols()
    );
    assert_eq!(
        y.len(),
        n * w.rows(),
        "matmul: y holds {} values, expected n={n} x rows={}",
        y.len(),
        w.rows()
    );
}
