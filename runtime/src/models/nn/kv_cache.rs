//! Per-layer key/value cache.
//!
//! Stored compactly (f16 by default, or int8 with one f32 scale per position
//! and KV head) because at long contexts the cache, not the weights, is what
//! grows; attention itself always runs in f32 (see `attention.rs`).

use crate::kernels;
use crate::models::state::{
    expect_eq, put_f16s, put_f32s, put_i8s, put_u64, StateError, StateReader,
};
use half::f16;

/// Storage precision of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvBits {
    /// IEEE half precision: relative error ~5e-4 per element.
    #[default]
    F16,
    /// Symmetric int8 per (position, KV head) vector, absmax scaling.
    Q8,
    /// Full precision: qwen3_next's few full-attention layers, so that a
    /// prompt split into pieces gives what one pass gives.
    F32,
}

impl std::str::FromStr for KvBits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "16" | "f16" => Ok(KvBits::F16),
            "8" | "q8" => Ok(KvBits::Q8),
            _ => Err(format!(
                "unsupported KV cache precision {s:?} (expected 16 or 8)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8 { q: Vec<i8>, scales: Vec<f32> },
}

impl Store {
    fn new(bits: KvBits) -> Self {
        match bits {
            KvBits::F32 => Store::F32(Vec::new()),
            KvBits::F16 => Store::F16(Vec::new()),
            KvBits::Q8 => Store::Q8 {
                q: Vec::new(),
                scales: Vec::new(),
            },
        }
    }

    fn push(&mut self, x: &[f32], head_dim: usize) {
        match self {
            Store::F32(v) => v.extend_from_slice(x),
            Store::F16(v) => v.extend(x.iter().map(|&a| f16::from_f32(a))),
            Store::Q8 { q, scales } => {
                for h in x.chunks_exact(head_dim) {
                    let amax = h.iter().fold(0.0f32, |m, a| m.max(a.abs()));
                    let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                    scales.push(s);
                    q.extend(
                        h.iter()
                            .map(|&a| (a / s).round().clamp(-127.0, 127.0) as i8),
                    );
                }
            }
        }
    }

    /// Dequantizes the first `n` elements into `out`.
    fn read(&self, n: usize, head_dim: usize, out: &mut [f32]) {
        match self {
            Store::F32(v) => out[..n].copy_from_slice(&v[..n]),
            Store::F16(v) => {
                for (o, a) in out[..n].iter_mut().zip(&v[..n]) {
                    *o = a.to_f32();
                }
            }
            Store::Q8 { q, scales } => {
                for ((oc, qc), s) in out[..n]
                    .chunks_exact_mut(head_dim)
                    .zip(q[..n].chunks_exact(head_dim))
                    .zip(scales)
                {
                    for (o, &a) in oc.iter_mut().zip(qc) {
                        *o = a as f32 * s;
                    }
                }
            }
        }
    }

    /// `q . row`, where `row` is the `q.len()` elements from `off` (one
    /// position of one KV head, so one Q8 scale).
    #[inline]
    fn dot(&self, off: usize, q: &[f32]) -> f32 {
        match self {
            Store::F32(v) => kernels::backend().dot(q, &v[off..off + q.len()]),
            Store::F16(v) => kernels::backend().dot_f16(q, &v[off..off + q.len()]),
            Store::Q8 { q: codes, scales } => {
                kernels::dot_i8(&codes[off..off + q.len()], scales[off / q.len()], q)
            }
        }
    }

    /// `y += alpha * row`, the row as in [`Store::dot`].
    #[inline]
    fn axpy(&self, off: usize, alpha: f32, y: &mut [f32]) {
        match self {
            Store::F32(v) => kernels::backend().axpy(alpha, &v[off..off + y.len()], y),
            Store::F16(v) => kernels::backend().axpy_f16(alpha, &v[off..off + y.len()], y),
            Store::Q8 { q: codes, scales } => {
                kernels::axpy_i8(alpha, &codes[off..off + y.len()], scales[off / y.len()], y)
            }
        }
    }

    fn truncate(&mut self, n: usize, head_dim: usize) {
        match self {
            Store::F32(v) => v.truncate(n),
            Store::F16(v) => v.truncate(n),
            Store::Q8 { q, scales } => {
                q.truncate(n);
                scales.truncate(n / head_dim);
            }
        }
    }

    fn kind(&self) -> usize {
        match self {
            Store::F32(_) => 0,
            Store::F16(_) => 1,
            Store::Q8 { .. } => 2,
        }
    }

    fn save(&self, out: &mut Vec<u8>) {
        match self {
            Store::F32(v) => put_f32s(out, v),
            Store::F16(v) => put_f16s(out, v),
            Store::Q8 { q, scales } => {
                put_i8s(out, q);
                put_f32s(out, scales);
            }
        }
    }

    /// Reads a store of this store's kind holding `n` elements.
    fn load(
        &mut self,
        r: &mut StateReader<'_>,
        n: usize,
        head_dim: usize,
    ) -> Result<(), StateError> {
        let check = |got: usize, want: usize| expect_eq("a KV store's element count", got, want);
        match self {
            Store::F32(v) => {
                *v = r.f32s()?;
                check(v.len(), n)
            }
            Store::F16(v) => {
                *v = r.f16s()?;
                check(v.len(), n)
            }
            Store::Q8 { q, scales } => {
                *q = r.i8s()?;
                *scales = r.f32s()?;
                check(q.len(), n)?;
                check(scales.len(), n / head_dim)
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Store::F32(v) => v.len() * 4,
            Store::F16(v) => v.len() * 2,
            Store::Q8 { q, scales } => q.len() + scales.len() * 4,
        }
    }
}

/// Keys and values of one attention layer (keys already rotated), stored
/// head-major: one `[positions, head_dim]` store per KV head. Why not the
/// `[positions, kv_heads * head_dim]` order the projections produce: a
/// decode step reads one head's keys for every position, and with the heads
/// interleaved that is a 256-byte read every kilobyte, which the hardware
/// prefetcher did not keep up with (attention at 2k positions ran at 2.6
/// GB/s, latency-bound); contiguous rows stream.
#[derive(Debug, Clone)]
pub struct LayerKv {
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    k: Vec<Store>,
    v: Vec<Store>,
    /// Attention stores new positions before reading them (see
    /// [`super::attention::attend`]): set while a model computes
    /// several positions that must equal one-token steps.
    exact_steps: bool,
}

impl LayerKv {
    pub fn new(bits: KvBits, kv_heads: usize, head_dim: usize) -> Self {
        LayerKv {
            kv_heads,
            head_dim,
            len: 0,
            k: (0..kv_heads).map(|_| Store::new(bits)).collect(),
            v: (0..kv_heads).map(|_| Store::new(bits)).collect(),
            exact_steps: false,
        }
    }

    /// Whether attention over this cache must give each new position
    /// exactly what a one-token forward at that position gives.
    pub fn exact_steps(&self) -> bool {
        self.exact_steps
    }

    pub fn set_exact_steps(&mut self, on: bool) {
        self.exact_steps = on;
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` (`n` positions each, `[n, kv_heads * head_dim]`).
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        let (hd, kv_dim) = (self.head_dim, self.kv_heads * self.head_dim);
        debug_assert_eq!(k.len() % kv_dim, 0);
        debug_assert_eq!(k.len(), v.len());
        for (kp, vp) in k.chunks_exact(kv_dim).zip(v.chunks_exact(kv_dim)) {
            for h in 0..self.kv_heads {
                self.k[h].push(&kp[h * hd..(h + 1) * hd], hd);
                self.v[h].push(&vp[h * hd..(h + 1) * hd], hd);
            }
        }
        self.len += k.len() / kv_dim;
    }

    /// Dequantizes all cached keys and values into `k_out`, `v_out` in the
    /// projections' `[positions, kv_heads * head_dim]` order (each at least
    /// `len * kv_heads * head_dim` long).
    pub fn read(&self, k_out: &mut [f32], v_out: &mut [f32]) {
        let (hd, kv_dim) = (self.head_dim, self.kv_heads * self.head_dim);
        let mut tmp = vec![0.0; self.len * hd];
        for (stores, out) in [(&self.k, k_out), (&self.v, v_out)] {
            for (h, st) in stores.iter().enumerate() {
                st.read(self.len * hd, hd, &mut tmp);
                for (pos, row) in tmp.chunks_exact(hd).enumerate() {
                    out[pos * kv_dim + h * hd..pos * kv_dim + (h + 1) * hd].copy_from_slice(row);
                }
            }
        }
    }

    /// `q . key[pos, kv_head]` read straight from storage. Why not
    /// [`LayerKv::read`]: dequantizing the whole cache into fresh buffers on
    /// every token costs an allocation, page faults and a pass over
    /// `len * kv_dim` elements per layer, which dominated decode at long
    /// contexts.
    #[inline]
    pub fn key_dot(&self, pos: usize, kv_head: usize, q: &[f32]) -> f32 {
        debug_assert!(pos < self.len && q.len() == self.head_dim);
        self.k[kv_head].dot(pos * self.head_dim, q)
    }

    /// `out += p * value[pos, kv_head]`, read straight from storage.
    #[inline]
    pub fn value_axpy(&self, pos: usize, kv_head: usize, p: f32, out: &mut [f32]) {
        debug_assert!(pos < self.len && out.len() == self.head_dim);
        self.v[kv_head].axpy(pos * self.head_dim, p, out)
    }

    /// `scores[h * ld + pos] = q_h . key[pos, kv_head]` for the query heads
    /// of `q` (`[g, head_dim]`) that share `kv_head`, over every cached
    /// position. The f16 cache goes through the backend's grouped kernel,
    /// which reads each key once for all `g` heads.
    pub fn key_dots(&self, kv_head: usize, q: &[f32], scores: &mut [f32], ld: usize) {
        self.key_dots_in(kv_head, q, scores, ld, 0..self.len)
    }

    /// [`Self::key_dots`] over the cached positions `range` only (a sliding
    /// window), written from `scores[h * ld]` on:
    /// `scores[h * ld + (pos - range.start)]`.
    pub fn key_dots_in(
        &self,
        kv_head: usize,
        q: &[f32],
        scores: &mut [f32],
        ld: usize,
        range: std::ops::Range<usize>,
    ) {
        debug_assert!(range.end <= self.len);
        if range.is_empty() {
            return;
        }
        match &self.k[kv_head] {
            Store::F16(v) => kernels::backend().dot_f16_rows(self.rows_in(v, range), q, scores, ld),
            Store::Q8 { .. } | Store::F32(_) => {
                for (h, qh) in q.chunks_exact(self.head_dim).enumerate() {
                    for (i, pos) in range.clone().enumerate() {
                        scores[h * ld + i] = self.key_dot(pos, kv_head, qh);
                    }
                }
            }
        }
    }

    /// `out_h += sum_pos p[h * ld + pos] * value[pos, kv_head]` for the heads
    /// of `out` (`[g, head_dim]`): the value side of [`LayerKv::key_dots`].
    pub fn value_axpys(&self, kv_head: usize, p: &[f32], ld: usize, out: &mut [f32]) {
        self.value_axpys_in(kv_head, p, ld, out, 0..self.len)
    }

    /// [`Self::value_axpys`] over the cached positions `range` only, the
    /// weights read as [`Self::key_dots_in`] wrote the scores.
    pub fn value_axpys_in(
        &self,
        kv_head: usize,
        p: &[f32],
        ld: usize,
        out: &mut [f32],
        range: std::ops::Range<usize>,
    ) {
        debug_assert!(range.end <= self.len);
        if range.is_empty() {
            return;
        }
        match &self.v[kv_head] {
            Store::F16(v) => kernels::backend().axpy_f16_rows(self.rows_in(v, range), p, ld, out),
            Store::Q8 { .. } | Store::F32(_) => {
                for (h, oh) in out.chunks_exact_mut(self.head_dim).enumerate() {
                    for (i, pos) in range.clone().enumerate() {
                        self.value_axpy(pos, kv_head, p[h * ld + i], oh);
                    }
                }
            }
        }
    }

    /// Positions `range` of one KV head's f16 store as kernel rows.
    fn rows_in<'a>(&self, v: &'a [f16], range: std::ops::Range<usize>) -> kernels::F16Rows<'a> {
        kernels::F16Rows {
            data: &v[range.start * self.head_dim..range.end * self.head_dim],
            stride: self.head_dim,
            len: range.len(),
            width: self.head_dim,
        }
    }

    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for st in self.k.iter_mut().chain(self.v.iter_mut()) {
                st.truncate(len * self.head_dim, self.head_dim);
            }
            self.len = len;
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(Store::bytes).sum()
    }

    /// Appends the cache's shape and contents (`models::state`).
    pub fn save(&self, out: &mut Vec<u8>) {
        put_u64(out, self.kv_heads as u64);
        put_u64(out, self.head_dim as u64);
        put_u64(out, self.k.first().map_or(0, Store::kind) as u64);
        put_u64(out, self.len as u64);
        for st in self.k.iter().chain(&self.v) {
            st.save(out);
        }
    }

    /// Replaces the contents with what [`LayerKv::save`] wrote for a cache
    /// of this shape and storage precision.
    pub fn load(&mut self, r: &mut StateReader<'_>) -> Result<(), StateError> {
        expect_eq("KV heads", r.usize()?, self.kv_heads)?;
        expect_eq("the KV head width", r.usize()?, self.head_dim)?;
        let kind = self.k.first().map_or(0, Store::kind);
        expect_eq(
            "the KV storage kind (0 f32, 1 f16, 2 int8)",
            r.usize()?,
            kind,
        )?;
        let len = r.usize()?;
        let n = len
            .checked_mul(self.head_dim)
            .ok_or_else(|| StateError::Mismatch(format!("{len} KV positions")))?;
        for st in self.k.iter_mut().chain(self.v.iter_mut()) {
            st.load(r, n, self.head_dim)?;
        }
        self.len = len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_and_f16_roundtrip_within_budget() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.37)
            .collect();
        for (bits, tol) in [
            (KvBits::F32, 0.0),
            (KvBits::F16, 1e-3),
            (KvBits::Q8, 8.0 * 0.37 / 127.0),
        ] {
            let mut kv = LayerKv::new(bits, 2, 16);
            kv.append(&x, &x);
            kv.append(&x, &x);
            assert_eq!(kv.len(), 4);
            kv.truncate(3);
            let mut k = vec![0.0; 96];
            let mut v = vec![0.0; 96];
            kv.read(&mut k, &mut v);
            for (i, (a, b)) in k.iter().zip(x.iter().chain(x.iter())).enumerate() {
                assert!(
                    (a - b).abs() <= tol * b.abs().max(1.0),
                    "{bits:?} {i}: {a} vs {b}"
                );
            }
        }
    }
}
