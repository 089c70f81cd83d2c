//! Per-layer key/value cache.
//!
//! Stored compactly (f16 by default, or int8 with one f32 scale per position
//! and KV head) because at long contexts the cache, not the weights, is what
//! grows; attention itself always runs in f32 (see `attention.rs`).

use crate::kernels;
use half::f16;

/// Storage precision of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvBits {
    /// IEEE half precision: relative error ~5e-4 per element.
    #[default]
    F16,
    /// Symmetric int8 per (position, KV head) vector, absmax scaling.
    Q8,
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
    F16(Vec<f16>),
    Q8 { q: Vec<i8>, scales: Vec<f32> },
}

impl Store {
    fn new(bits: KvBits) -> Self {
        match bits {
            KvBits::F16 => Store::F16(Vec::new()),
            KvBits::Q8 => Store::Q8 {
                q: Vec::new(),
                scales: Vec::new(),
            },
        }
    }

    fn push(&mut self, x: &[f32], head_dim: usize) {
        match self {
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
            Store::F16(v) => kernels::backend().axpy_f16(alpha, &v[off..off + y.len()], y),
            Store::Q8 { q: codes, scales } => {
                kernels::axpy_i8(alpha, &codes[off..off + y.len()], scales[off / y.len()], y)
            }
        }
    }

    fn truncate(&mut self, n: usize, head_dim: usize) {
        match self {
            Store::F16(v) => v.truncate(n),
            Store::Q8 { q, scales } => {
                q.truncate(n);
                scales.truncate(n / head_dim);
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Store::F16(v) => v.len() * 2,
            Store::Q8 { q, scales } => q.len() + scales.len() * 4,
        }
    }
}

/// Keys and values of one attention layer, `[positions, kv_heads * head_dim]`
/// each (keys already rotated).
#[derive(Debug, Clone)]
pub struct LayerKv {
    kv_dim: usize,
    head_dim: usize,
    len: usize,
    k: Store,
    v: Store,
}

impl LayerKv {
    pub fn new(bits: KvBits, kv_heads: usize, head_dim: usize) -> Self {
        LayerKv {
            kv_dim: kv_heads * head_dim,
            head_dim,
            len: 0,
            k: Store::new(bits),
            v: Store::new(bits),
        }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` (`n` positions each).
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        debug_assert_eq!(k.len() % self.kv_dim, 0);
        self.k.push(k, self.head_dim);
        self.v.push(v, self.head_dim);
        self.len += k.len() / self.kv_dim;
    }

    /// Dequantizes all cached keys and values into `k_out`, `v_out`
    /// (each at least `len * kv_dim` long).
    pub fn read(&self, k_out: &mut [f32], v_out: &mut [f32]) {
        let n = self.len * self.kv_dim;
        self.k.read(n, self.head_dim, k_out);
        self.v.read(n, self.head_dim, v_out);
    }

    /// `q . key[pos, kv_head]` read straight from storage. Why not
    /// [`LayerKv::read`]: dequantizing the whole cache into fresh buffers on
    /// every token costs an allocation, page faults and a pass over
    /// `len * kv_dim` elements per layer, which dominated decode at long
    /// contexts.
    #[inline]
    pub fn key_dot(&self, pos: usize, kv_head: usize, q: &[f32]) -> f32 {
        debug_assert!(pos < self.len && q.len() == self.head_dim);
        self.k.dot(pos * self.kv_dim + kv_head * self.head_dim, q)
    }

    /// `out += p * value[pos, kv_head]`, read straight from storage.
    #[inline]
    pub fn value_axpy(&self, pos: usize, kv_head: usize, p: f32, out: &mut [f32]) {
        debug_assert!(pos < self.len && out.len() == self.head_dim);
        self.v
            .axpy(pos * self.kv_dim + kv_head * self.head_dim, p, out)
    }

    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.k.truncate(len * self.kv_dim, self.head_dim);
            self.v.truncate(len * self.kv_dim, self.head_dim);
            self.len = len;
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.k.bytes() + self.v.bytes()
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
        for (bits, tol) in [(KvBits::F16, 1e-3), (KvBits::Q8, 8.0 * 0.37 / 127.0)] {
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
