//! The gated delta rule of Gated DeltaNet (qwen3_next, qwen3_5_moe), one
//! value head at a time: token by token for decoding
//! ([`DeltaHead::recurrent`], the definition) and in chunks of
//! [`DELTA_CHUNK`] tokens for prompts ([`DeltaHead::prompt`], the WY form),
//! which agree to rounding (tested below), so a prompt split into pieces
//! matches one pass.

use crate::kernels;

/// Prompt tokens per chunk of the chunked delta rule.
pub const DELTA_CHUNK: usize = 64;

/// The gated delta rule of one value head: state `S` (`[dk, dv]`, key-major),
/// per token `S = exp(g) S + k (x) u` with `u = beta (v - (exp(g) S)^T k)`,
/// output `S^T q`.
pub struct DeltaHead {
    pub dk: usize,
    pub dv: usize,
}

/// One value head's inputs over `g.len()` tokens: `q`, `k` (`[t, dk]`,
/// normalized), `v` (`[t, dv]`), log-decays `g` and betas `b`.
#[derive(Clone, Copy)]
pub struct HeadSeq<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub g: &'a [f32],
    pub b: &'a [f32],
}

impl<'a> HeadSeq<'a> {
    /// Tokens `t0..t1`.
    fn slice(&self, t0: usize, t1: usize, dk: usize, dv: usize) -> HeadSeq<'a> {
        HeadSeq {
            q: &self.q[t0 * dk..t1 * dk],
            k: &self.k[t0 * dk..t1 * dk],
            v: &self.v[t0 * dv..t1 * dv],
            g: &self.g[t0..t1],
            b: &self.b[t0..t1],
        }
    }
}

impl DeltaHead {
    /// Token by token: the definition, and the decode path.
    pub fn recurrent(&self, s: &mut [f32], x: HeadSeq<'_>, out: &mut [f32]) {
        let (dk, dv) = (self.dk, self.dv);
        let HeadSeq { q, k, v, g, b } = x;
        let be = kernels::backend();
        let mut mem = vec![0.0; dv];
        for t in 0..g.len() {
            let (qt, kt, vt) = (
                &q[t * dk..(t + 1) * dk],
                &k[t * dk..(t + 1) * dk],
                &v[t * dv..(t + 1) * dv],
            );
            let decay = g[t].exp();
            mem.fill(0.0);
            for (i, row) in s.chunks_exact_mut(dv).enumerate() {
                row.iter_mut().for_each(|x| *x *= decay);
                be.axpy(kt[i], row, &mut mem);
            }
            for (m, vj) in mem.iter_mut().zip(vt) {
                *m = (vj - *m) * b[t];
            }
            let o = &mut out[t * dv..(t + 1) * dv];
            o.fill(0.0);
            for (i, row) in s.chunks_exact_mut(dv).enumerate() {
                be.axpy(kt[i], &mem, row);
                be.axpy(qt[i], row, o);
            }
        }
    }

    /// A prompt: [`DeltaHead::chunk`] over consecutive `DELTA_CHUNK` tokens.
    pub fn prompt(&self, s: &mut [f32], x: HeadSeq<'_>, out: &mut [f32]) {
        let n = x.g.len();
        for c0 in (0..n).step_by(DELTA_CHUNK) {
            let c1 = (c0 + DELTA_CHUNK).min(n);
            let o = &mut out[c0 * self.dv..c1 * self.dv];
            self.chunk(s, x.slice(c0, c1, self.dk, self.dv), o);
        }
    }

    /// One chunk of `L` prompt tokens at once (the WY/UT form, as in the
    /// chunked kernels of flash-linear-attention and transformers'
    /// `torch_chunk_gated_delta_rule`, written directly): with `G_i` the
    /// cumulative log-decay inside the chunk, the updates `u_i` solve the
    /// unit lower-triangular system
    /// `u_i + sum_{j<i} beta_i e^(G_i-G_j) (k_i.k_j) u_j = beta_i (v_i - e^(G_i) S0^T k_i)`,
    /// outputs are `e^(G_i) S0^T q_i + sum_{j<=i} e^(G_i-G_j) (q_i.k_j) u_j` and the
    /// state becomes `e^(G_L) S0 + sum_j e^(G_L-G_j) k_j (x) u_j`. Why: the
    /// state (64 KiB per head at 128x128, beyond L1/L2 across 32 heads) is
    /// streamed twice per chunk instead of four times per token. Every
    /// `e^(...)` has a non-positive exponent, so nothing overflows.
    fn chunk(&self, s: &mut [f32], x: HeadSeq<'_>, out: &mut [f32]) {
        let HeadSeq { q, k, v, g, b } = x;
        let (dk, dv, l) = (self.dk, self.dv, g.len());
        let be = kernels::backend();
        let mut gc = vec![0.0f32; l];
        let mut acc = 0.0;
        for (c, gi) in gc.iter_mut().zip(g) {
            acc += gi;
            *c = acc;
        }
        // S0^T k_i and S0^T q_i, reading the state once.
        let mut sk = vec![0.0; l * dv];
        let mut sq = vec![0.0; l * dv];
        for (a, row) in s.chunks_exact(dv).enumerate() {
            for i in 0..l {
                be.axpy(k[i * dk + a], row, &mut sk[i * dv..(i + 1) * dv]);
                be.axpy(q[i * dk + a], row, &mut sq[i * dv..(i + 1) * dv]);
            }
        }
        // Forward substitution for u.
        let mut u = vec![0.0; l * dv];
        for i in 0..l {
            let ki = &k[i * dk..(i + 1) * dk];
            let ei = gc[i].exp();
            let (done, rest) = u.split_at_mut(i * dv);
            let ui = &mut rest[..dv];
            for ((x, vj), skj) in ui
                .iter_mut()
                .zip(&v[i * dv..(i + 1) * dv])
                .zip(&sk[i * dv..])
            {
                *x = b[i] * (vj - ei * skj);
            }
            for j in 0..i {
                let c = b[i] * (gc[i] - gc[j]).exp() * be.dot(ki, &k[j * dk..(j + 1) * dk]);
                be.axpy(-c, &done[j * dv..(j + 1) * dv], ui);
            }
        }
        for i in 0..l {
            let qi = &q[i * dk..(i + 1) * dk];
            let o = &mut out[i * dv..(i + 1) * dv];
            let ei = gc[i].exp();
            for (x, sqj) in o.iter_mut().zip(&sq[i * dv..(i + 1) * dv]) {
                *x = ei * sqj;
            }
            for j in 0..=i {
                let c = (gc[i] - gc[j]).exp() * be.dot(qi, &k[j * dk..(j + 1) * dk]);
                be.axpy(c, &u[j * dv..(j + 1) * dv], o);
            }
        }
        let last = gc[l - 1];
        let d = last.exp();
        let w: Vec<f32> = gc.iter().map(|x| (last - x).exp()).collect();
        for (a, row) in s.chunks_exact_mut(dv).enumerate() {
            row.iter_mut().for_each(|x| *x *= d);
            for j in 0..l {
                be.axpy(w[j] * k[j * dk + a], &u[j * dv..(j + 1) * dv], row);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn noise(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn unit_rows(mut v: Vec<f32>, d: usize) -> Vec<f32> {
        for r in v.chunks_exact_mut(d) {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= n);
        }
        v
    }

    /// The chunked form equals the token-by-token recurrence (outputs and
    /// final state), from a non-zero state and over a length that is not a
    /// multiple of the chunk: what lets prompts take the chunked path and
    /// decode the recurrent one.
    #[test]
    fn chunked_delta_rule_equals_recurrence() {
        let (dk, dv) = (16, 12);
        let head = DeltaHead { dk, dv };
        for &n in &[1usize, 2, 7, 64, 150] {
            let q = unit_rows(noise(n * dk, 1), dk);
            let k = unit_rows(noise(n * dk, 2), dk);
            let v = noise(n * dv, 3);
            // Log-decays in [-2, 0), betas in (0, 1).
            let g: Vec<f32> = noise(n, 4).iter().map(|x| x - 1.0).collect();
            let b: Vec<f32> = noise(n, 5).iter().map(|x| 0.5 + 0.49 * x).collect();
            let s0 = noise(dk * dv, 6);
            let (mut sr, mut sc) = (s0.clone(), s0.clone());
            let (mut or, mut oc) = (vec![0.0; n * dv], vec![0.0; n * dv]);
            let x = HeadSeq {
                q: &q,
                k: &k,
                v: &v,
                g: &g,
                b: &b,
            };
            head.recurrent(&mut sr, x, &mut or);
            head.prompt(&mut sc, x, &mut oc);
            let err = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max)
                    / a.iter().map(|x| x.abs()).fold(1e-6, f32::max)
            };
            assert!(
                err(&or, &oc) < 1e-4,
                "n={n}: outputs differ by {}",
                err(&or, &oc)
            );
            assert!(
                err(&sr, &sc) < 1e-4,
                "n={n}: states differ by {}",
                err(&sr, &sc)
            );
            assert!(
                or.iter().any(|x| x.abs() > 1e-3),
                "n={n}: outputs are all ~0"
            );
        }
    }
}
