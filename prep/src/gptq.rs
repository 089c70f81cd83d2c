//! GPTQ (Frantar et al., 2022) for routed experts: low-bit codes chosen to
//! minimise the error of the expert's *outputs* on calibration inputs
//! rather than of its weights.
//!
//! Round-to-nearest quantizes each weight on its own. GPTQ quantizes a
//! row's columns in order and, after each, spreads the rounding error over
//! the columns not yet quantized in proportion to how the inputs correlate
//! (the inverse of `H = sum x x^T` over the inputs the matrix saw), so later
//! codes cancel earlier errors where the data makes them interchangeable.
//! Rows are independent given `H`, so each row is one task.
//!
//! What is stored is the pack's ordinary MLX affine layout: a group's scale
//! and bias come from [`mfx_formats::quant::group_params`] over the group's
//! error-corrected weights when the row reaches the group, exactly the rule
//! the round-to-nearest quantizer uses, so the runtime needs nothing new.
//! With a diagonal `H` nothing is spread and the codes equal round-to-nearest
//! (tested).

use crate::error::{PrepError, Result};
use mfx_formats::quant::{code, group_params, put_bits, AffineOwned};
use mfx_runtime::experts::Glu;
use mfx_runtime::kernels;
use mfx_runtime::models::{ExpertProvider, RouterObserver};
use rayon::prelude::*;
use std::sync::Arc;

/// GPTQ's default dampening: 1% of the mean diagonal is added to `H`'s
/// diagonal, which keeps it invertible where inputs are nearly collinear
/// and bounds how far one error may be spread.
pub const DAMP: f64 = 0.01;

/// `sum x x^T` over the input rows a matrix saw (`dim x dim`, f64, full).
#[derive(Debug, Clone)]
pub struct Hessian {
    pub dim: usize,
    pub sum: Vec<f64>,
    /// Input rows accumulated.
    pub rows: u64,
}

impl Hessian {
    pub fn new(dim: usize) -> Self {
        Hessian {
            dim,
            sum: vec![0.0; dim * dim],
            rows: 0,
        }
    }

    /// `H`'s diagonal as f32: each input's summed square, the importance
    /// [`fit_group`] weighs a column's rounding error by.
    pub fn diagonal(&self) -> Vec<f32> {
        (0..self.dim)
            .map(|i| self.sum[i * self.dim + i] as f32)
            .collect()
    }

    /// Adds the rows of `x` (`[m, dim]`). The product runs through the
    /// runtime's f32 matmul (`Xt Xt^T` with `Xt = x^T`), then accumulates
    /// in f64, so many calls do not lose the small terms.
    pub fn add(&mut self, x: &[f32]) {
        let d = self.dim;
        let m = x.len() / d.max(1);
        if m == 0 {
            return;
        }
        let mut xt = vec![0f32; d * m];
        for (t, row) in x.chunks_exact(d).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                xt[i * m + t] = v;
            }
        }
        let w = kernels::MatRef::F32 {
            rows: d,
            cols: m,
            data: &xt,
        };
        let mut y = vec![0f32; d * d];
        kernels::matmul(&w, &xt, d, &mut y);
        for (s, v) in self.sum.iter_mut().zip(&y) {
            *s += *v as f64;
        }
        self.rows += m as u64;
    }
}

/// In-place lower Cholesky factor of the symmetric `a` (`n x n`, row-major;
/// only the lower triangle is read, the upper is zeroed). `None` if `a` is
/// not positive definite.
fn cholesky(a: &mut [f64], n: usize) -> Option<()> {
    for j in 0..n {
        let rj = &mut a[j * n..(j + 1) * n];
        let s = rj[j] - rj[..j].iter().map(|v| v * v).sum::<f64>();
        if s <= 0.0 || !s.is_finite() {
            return None;
        }
        rj[j] = s.sqrt();
        for i in j + 1..n {
            let (upper, lower) = a.split_at_mut(i * n);
            let rj = &upper[j * n..j * n + n];
            let ri = &mut lower[..n];
            let dot: f64 = ri[..j].iter().zip(&rj[..j]).map(|(x, y)| x * y).sum();
            ri[j] = (ri[j] - dot) / rj[j];
        }
    }
    for i in 0..n {
        for v in &mut a[i * n + i + 1..(i + 1) * n] {
            *v = 0.0;
        }
    }
    Some(())
}

/// What GPTQ reads for one matrix's inputs: the upper Cholesky factor of
/// the dampened `H^-1` and each column's importance for [`fit_group`].
///
/// Columns are quantized in their natural order. GPTQ's "act order"
/// (descending `H` diagonal) was measured on the shared model at hot4/cold2
/// and was no better (KLD 0.083-0.142 against 0.081-0.138), so it is not
/// kept.
#[derive(Debug, Clone)]
pub struct Factor {
    /// `U` with `H^-1 = U^T U`, row-major, `dim x dim`.
    pub u: Vec<f32>,
    /// `H`'s diagonal.
    pub imp: Vec<f32>,
}

impl Factor {
    /// `None` if `H` stays singular after ten-fold increases of `damp`.
    ///
    /// `H`'s off-diagonal entries are first shrunk toward zero by
    /// `lambda = min(1, dim / rows)`: an expert that saw few calibration
    /// rows has a rank-deficient, noisy `H`, and spreading errors along
    /// its spurious correlations made the shared model worse than rounding
    /// to nearest (2,048 calibration tokens, hot4/cold2: KLD 0.57 against
    /// 0.32). With many rows `lambda` is small and GPTQ is unchanged; with
    /// fewer rows than inputs nothing is spread and only the importance
    /// weighting of [`fit_group`] remains.
    pub fn of(h: &Hessian, damp: f64) -> Option<Factor> {
        let lambda = (h.dim as f64 / h.rows.max(1) as f64).min(1.0);
        Some(Factor {
            u: inverse_factor(h, lambda, damp)?,
            imp: h.diagonal(),
        })
    }
}

/// The upper Cholesky factor `U` of `H^-1` (`H^-1 = U^T U`), row-major f32,
/// with `H`'s off-diagonals scaled by `1 - shrink` and its diagonal
/// dampened: what GPTQ's column loop reads. `None` if `H` stays singular
/// after ten-fold increases of the dampening.
fn inverse_factor(h: &Hessian, shrink: f64, damp: f64) -> Option<Vec<f32>> {
    let n = h.dim;
    let mut base = h.sum.clone();
    if shrink > 0.0 {
        for (k, v) in base.iter_mut().enumerate() {
            if k / n != k % n {
                *v *= 1.0 - shrink;
            }
        }
    }
    // An input that never varied (a zero diagonal) gets weight 1: its
    // column is then rounded on its own and spreads nothing.
    for i in 0..n {
        if base[i * n + i] == 0.0 {
            base[i * n + i] = 1.0;
        }
    }
    let mean_diag = (0..n).map(|i| base[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let mut damp = damp;
    for _ in 0..4 {
        let mut a = base.clone();
        for i in 0..n {
            a[i * n + i] += damp * mean_diag;
        }
        if cholesky(&mut a, n).is_some() {
            // L^-1 row by row: row i = (e_i - sum_{k<i} L[i][k] row_k) / L[i][i].
            let mut linv = vec![0f64; n * n];
            for i in 0..n {
                let (prev, cur) = linv.split_at_mut(i * n);
                let row = &mut cur[..n];
                row[i] = 1.0;
                for k in 0..i {
                    let c = a[i * n + k];
                    if c != 0.0 {
                        for (r, p) in row[..=k].iter_mut().zip(&prev[k * n..k * n + k + 1]) {
                            *r -= c * p;
                        }
                    }
                }
                let d = a[i * n + i];
                for r in &mut row[..=i] {
                    *r /= d;
                }
            }
            // H^-1 = L^-T L^-1: sum over k of row_k's outer product with itself.
            let mut hinv = vec![0f64; n * n];
            for k in 0..n {
                let rk = &linv[k * n..k * n + k + 1];
                for (a_, &ca) in rk.iter().enumerate() {
                    if ca != 0.0 {
                        for (h, &cb) in hinv[a_ * n..a_ * n + k + 1].iter_mut().zip(rk) {
                            *h += ca * cb;
                        }
                    }
                }
            }
            if cholesky(&mut hinv, n).is_some() {
                let mut u = vec![0f32; n * n];
                for i in 0..n {
                    for j in 0..=i {
                        u[j * n + i] = hinv[i * n + j] as f32;
                    }
                }
                return Some(u);
            }
        }
        damp *= 10.0;
    }
    None
}

/// Candidate ranges tried per group by [`fit_group`] on each side of the
/// full `[min, max]` range.
const FIT_STEPS: i32 = 10;

/// A group's `(scale, bias)` chosen to minimise `sum_j imp[j] * (v[j] -
/// (scale * q[j] + bias))^2`, where `imp` is how much each input column
/// matters (the diagonal of `H`: the mean square of that input), rather
/// than MLX's rule of spanning `[min, max]`. At 2 bits the full range puts
/// most values between two of four levels; narrowing it and refitting the
/// two parameters by weighted least squares for the codes it gives is the
/// search llama.cpp's k-quants run with an importance matrix. Returns the
/// stored bf16 parameters; the codes are then chosen for those.
pub fn fit_group(v: &[f32], imp: &[f32], n_bins: f32) -> (half::bf16, half::bf16) {
    let rtn = group_params(v, n_bins);
    let err_of = |s: f32, b: f32| -> f64 {
        v.iter()
            .zip(imp)
            .map(|(&x, &w)| {
                let q = code(x, s, b, n_bins);
                let d = (s * q + b - x) as f64;
                w as f64 * d * d
            })
            .sum()
    };
    let (lo, hi) = v
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let mut best = (rtn, err_of(rtn.0.to_f32(), rtn.1.to_f32()));
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) || !best.1.is_finite() {
        return rtn;
    }
    let range = hi - lo;
    let sw: f64 = imp.iter().map(|&w| w as f64).sum();
    for step in -FIT_STEPS..=FIT_STEPS {
        // Codes for a range scaled by (n_bins + 0.1 * step) / n_bins, as
        // make_qkx2_quants scans, then the least-squares (scale, bias) for them.
        let iscale = (n_bins + 0.1 * step as f32) / range;
        let (mut sl, mut sll, mut sx, mut slx) = (0f64, 0f64, 0f64, 0f64);
        for (&x, &w) in v.iter().zip(imp) {
            let l = ((x - lo) * iscale).round_ties_even().clamp(0.0, n_bins) as f64;
            let (w, x) = (w as f64, x as f64);
            sl += w * l;
            sll += w * l * l;
            sx += w * x;
            slx += w * l * x;
        }
        let det = sw * sll - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let s = ((sw * slx - sl * sx) / det) as f32;
        let b = ((sll * sx - sl * slx) / det) as f32;
        if s.is_nan() || s <= 0.0 || !s.is_finite() || !b.is_finite() {
            continue;
        }
        let (sb, bb) = (half::bf16::from_f32(s), half::bf16::from_f32(b));
        let e = err_of(sb.to_f32(), bb.to_f32());
        if e < best.1 {
            best = ((sb, bb), e);
        }
    }
    best.0
}

/// `w` (`[rows, cols]`) in the MLX affine layout at `bits` / `group`, codes
/// chosen by GPTQ with `f` (from the `H` of the inputs this matrix saw).
/// A group's parameters are fitted ([`fit_group`], weighted by `f.imp`)
/// when the row reaches it, from its error-corrected values.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    f: &Factor,
    what: &str,
) -> Result<AffineOwned> {
    let bad = |msg: String| PrepError::Tensor {
        name: what.to_string(),
        msg,
    };
    if w.len() != rows * cols || f.u.len() != cols * cols || f.imp.len() != cols {
        return Err(bad(format!(
            "GPTQ: {} weights and a {}-column factor for a [{rows}, {cols}] matrix",
            w.len(),
            f.imp.len()
        )));
    }
    if group == 0 || !cols.is_multiple_of(group) || !(cols * bits as usize).is_multiple_of(8) {
        return Err(bad(format!(
            "GPTQ: {cols} columns do not split into groups of {group} at {bits} bits"
        )));
    }
    let n_bins = ((1u32 << bits) - 1) as f32;
    let gpr = cols / group;
    let rb = cols * bits as usize / 8;
    let u = &f.u;
    let per_row: Vec<(Vec<u8>, Vec<half::bf16>, Vec<half::bf16>)> = w
        .par_chunks_exact(cols)
        .map(|src| {
            // The row, corrected as its columns are done.
            let mut row = src.to_vec();
            let mut packed = vec![0u8; rb];
            let mut scales = Vec::with_capacity(gpr);
            let mut biases = Vec::with_capacity(gpr);
            let (mut s, mut b) = (0f32, 0f32);
            for i in 0..cols {
                if i % group == 0 {
                    let (sb, bb) = fit_group(&row[i..i + group], &f.imp[i..i + group], n_bins);
                    scales.push(sb);
                    biases.push(bb);
                    (s, b) = (sb.to_f32(), bb.to_f32());
                }
                let v = row[i];
                let q = code(v, s, b, n_bins);
                put_bits(&mut packed, i, bits, q as u32);
                let err = (v - (s * q + b)) / u[i * cols + i];
                if err != 0.0 && err.is_finite() {
                    let ui = &u[i * cols + i + 1..(i + 1) * cols];
                    for (x, &k) in row[i + 1..].iter_mut().zip(ui) {
                        *x -= err * k;
                    }
                }
            }
            (packed, scales, biases)
        })
        .collect();
    let mut out = AffineOwned {
        rows,
        cols,
        bits,
        group_size: group,
        packed: Vec::with_capacity(rows * rb),
        scales: Vec::with_capacity(rows * gpr),
        biases: Vec::with_capacity(rows * gpr),
    };
    for (p, s, b) in per_row {
        out.packed.extend(p);
        out.scales.extend(s);
        out.biases.extend(b);
    }
    Ok(out)
}

/// Input rows buffered per expert before they are folded into its
/// Hessians: large enough for an efficient `X^T X`, small enough that a
/// 128-expert layer of width 2048 buffers at most ~1 GiB.
const FLUSH_ROWS: usize = 1024;

/// One MoE layer's GPTQ statistics per expert: `input` (the expert's input
/// rows: for gate and up) and `mid` (its intermediate activations,
/// `glu(gate x, up x)` with the source weights: for down). `None` for an
/// expert no calibration token was routed to.
pub struct LayerHessians {
    pub input: Vec<Option<Hessian>>,
    pub mid: Vec<Option<Hessian>>,
}

/// The router observer that gathers [`LayerHessians`] during
/// [`crate::routing::walk_layers`]: the runtime hands it each expert's input
/// rows, and the intermediate activations are recomputed here from the
/// layer's source experts (`experts`), biases and GLU included.
pub struct Collector {
    layer: usize,
    experts: Option<Arc<dyn ExpertProvider>>,
    /// Per expert: buffered input rows and the layer's GLU. Rows are not
    /// weighted by their mixing weights: weighting `H` by the squared
    /// weight was measured on the shared model (hot4/cold2) and was worse
    /// (KLD 0.085-0.146 against 0.081-0.138).
    pending: Vec<(Vec<f32>, Glu)>,
    stats: LayerHessians,
    hidden: usize,
    bad: Option<String>,
}

impl Collector {
    /// For layer `layer` of `n_experts` experts of width `hidden`;
    /// `experts` is `None` for a layer without routed experts.
    pub fn new(
        layer: usize,
        n_experts: usize,
        hidden: usize,
        experts: Option<Arc<dyn ExpertProvider>>,
    ) -> Self {
        let ne = if experts.is_some() { n_experts } else { 0 };
        Collector {
            layer,
            experts,
            pending: (0..ne).map(|_| (Vec::new(), Glu::Silu)).collect(),
            stats: LayerHessians {
                input: (0..ne).map(|_| None).collect(),
                mid: (0..ne).map(|_| None).collect(),
            },
            hidden,
            bad: None,
        }
    }

    fn flush(&mut self, e: usize) -> std::result::Result<(), String> {
        let (rows, glu) = std::mem::take(&mut self.pending[e]);
        let h = self.hidden;
        let m = rows.len() / h.max(1);
        if m == 0 {
            return Ok(());
        }
        let Some(provider) = &self.experts else {
            return Ok(());
        };
        let ex = provider
            .get(self.layer, e)
            .map_err(|err| format!("layer {} expert {e}: {err}", self.layer))?;
        let inter = ex.gate.rows();
        let g = ex.mid(&rows, m, glu);
        self.stats.input[e]
            .get_or_insert_with(|| Hessian::new(h))
            .add(&rows);
        self.stats.mid[e]
            .get_or_insert_with(|| Hessian::new(inter))
            .add(&g);
        Ok(())
    }

    /// The layer's statistics, once every row has gone through it.
    pub fn finish(mut self) -> Result<LayerHessians> {
        for e in 0..self.pending.len() {
            if let Err(msg) = self.flush(e) {
                self.bad.get_or_insert(msg);
            }
        }
        match self.bad {
            Some(msg) => Err(PrepError::Calibration(format!("GPTQ statistics: {msg}"))),
            None => Ok(self.stats),
        }
    }
}

impl RouterObserver for Collector {
    fn observe(&mut self, _: usize, _: usize, _: &[f32], _: &[f32], _: &[usize], _: &[f32]) {}

    fn wants_expert_inputs(&self) -> bool {
        self.experts.is_some()
    }

    fn expert_input(&mut self, layer: usize, e: usize, _: &[(usize, f32)], xs: &[f32], glu: Glu) {
        if layer != self.layer || e >= self.pending.len() {
            self.bad.get_or_insert(format!(
                "expert {e} of layer {layer} reported while collecting layer {}",
                self.layer
            ));
            return;
        }
        self.pending[e].0.extend_from_slice(xs);
        self.pending[e].1 = glu;
        if self.pending[e].0.len() >= FLUSH_ROWS * self.hidden {
            if let Err(msg) = self.flush(e) {
                self.bad.get_or_insert(msg);
            }
        }
    }
}

impl crate::routing::RowObserver for Collector {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream in [-1, 1).
    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// `m` inputs of width `d` whose coordinates are strongly correlated
    /// (a few shared factors plus noise), as hidden states are.
    fn correlated_inputs(m: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut r = lcg(seed);
        let factors = 4;
        let mix: Vec<f32> = (0..factors * d).map(|_| r()).collect();
        let mut x = vec![0f32; m * d];
        for row in x.chunks_exact_mut(d) {
            let f: Vec<f32> = (0..factors).map(|_| r() * 3.0).collect();
            for (j, v) in row.iter_mut().enumerate() {
                *v = (0..factors).map(|k| f[k] * mix[k * d + j]).sum::<f32>() + 0.3 * r();
            }
        }
        x
    }

    fn output_error(x: &[f32], w: &[f32], q: &AffineOwned) -> f64 {
        let (rows, cols) = (q.rows, q.cols);
        let wq = q.view().dequantize();
        let mut e = 0f64;
        for xr in x.chunks_exact(cols) {
            for r in 0..rows {
                let d: f64 = (0..cols)
                    .map(|c| xr[c] as f64 * (w[r * cols + c] - wq[r * cols + c]) as f64)
                    .sum();
                e += d * d;
            }
        }
        e
    }

    #[test]
    fn cholesky_reconstructs_and_factor_inverts() {
        let n = 7;
        let x = correlated_inputs(40, n, 3);
        let mut h = Hessian::new(n);
        h.add(&x);
        let mut l = h.sum.clone();
        cholesky(&mut l, n).expect("positive definite");
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n).map(|k| l[i * n + k] * l[j * n + k]).sum();
                assert!((v - h.sum[i * n + j]).abs() < 1e-9 * h.sum[i * n + i].abs().max(1.0));
            }
        }
        // U^T U must be the inverse of the dampened H.
        let u = inverse_factor(&h, 0.0, 0.0).expect("invertible");
        for i in 0..n {
            for j in 0..n {
                let hinv_ij: f64 = (0..n)
                    .map(|k| u[k * n + i] as f64 * u[k * n + j] as f64)
                    .sum();
                let prod: f64 = (0..n)
                    .map(|k| {
                        h.sum[i * n + k]
                            * (0..n)
                                .map(|m| u[m * n + k] as f64 * u[m * n + j] as f64)
                                .sum::<f64>()
                    })
                    .sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((prod - want).abs() < 1e-3, "H H^-1 [{i},{j}] = {prod}");
                let _ = hinv_ij;
            }
        }
    }

    /// With a diagonal `H` no error is spread: every code is the nearest
    /// level of its group's fitted parameters.
    #[test]
    fn a_diagonal_hessian_spreads_nothing() {
        let (rows, cols, group) = (5, 128, 64);
        let mut r = lcg(11);
        let w: Vec<f32> = (0..rows * cols).map(|_| r() * 0.05).collect();
        let mut h = Hessian::new(cols);
        for i in 0..cols {
            h.sum[i * cols + i] = 1.0 + i as f64;
        }
        let imp: Vec<f32> = (0..cols).map(|i| 1.0 + i as f32).collect();
        let f = Factor::of(&h, DAMP).unwrap();
        assert_eq!(f.imp, imp);
        for bits in [2u8, 3, 4] {
            let n_bins = ((1u32 << bits) - 1) as f32;
            let g = quantize(&w, rows, cols, bits, group, &f, "t").unwrap();
            for r in 0..rows {
                for gi in 0..cols / group {
                    let c0 = r * cols + gi * group;
                    let (s, b) = fit_group(&w[c0..c0 + group], &imp[gi * group..][..group], n_bins);
                    assert_eq!((g.scales[r * 2 + gi], g.biases[r * 2 + gi]), (s, b));
                    for j in 0..group {
                        let want = ((w[c0 + j] - b.to_f32()) / s.to_f32())
                            .round_ties_even()
                            .clamp(0.0, n_bins) as u32;
                        let got = mfx_formats::quant::get_bits(
                            &g.packed[r * cols * bits as usize / 8..],
                            gi * group + j,
                            bits,
                        );
                        assert_eq!(got, want, "bits {bits} row {r} col {}", gi * group + j);
                    }
                }
            }
        }
    }

    /// The fitted parameters never do worse than MLX's min/max rule under
    /// the importance-weighted error, and at 2 bits do clearly better.
    #[test]
    fn fitted_group_parameters_beat_the_min_max_rule() {
        let mut r = lcg(21);
        for bits in [2u8, 3] {
            let n_bins = ((1u32 << bits) - 1) as f32;
            let (mut fit_total, mut rtn_total) = (0f64, 0f64);
            for _ in 0..200 {
                let v: Vec<f32> = (0..64).map(|_| r() * r() * 0.1).collect();
                let imp: Vec<f32> = (0..64).map(|_| 0.1 + r().abs()).collect();
                let err = |(s, b): (half::bf16, half::bf16)| -> f64 {
                    let (s, b) = (s.to_f32(), b.to_f32());
                    v.iter()
                        .zip(&imp)
                        .map(|(&x, &w)| {
                            let q = ((x - b) / s).round_ties_even().clamp(0.0, n_bins);
                            w as f64 * ((s * q + b - x) as f64).powi(2)
                        })
                        .sum()
                };
                let (f, m) = (
                    err(fit_group(&v, &imp, n_bins)),
                    err(group_params(&v, n_bins)),
                );
                assert!(f <= m, "bits {bits}: fitted {f} > min/max {m}");
                fit_total += f;
                rtn_total += m;
            }
            assert!(
                fit_total < 0.85 * rtn_total,
                "bits {bits}: {fit_total} vs {rtn_total}"
            );
        }
    }

    #[test]
    fn output_error_is_below_round_to_nearest_on_correlated_inputs() {
        let (rows, cols, m) = (16, 256, 1024);
        let x = correlated_inputs(m, cols, 5);
        let mut r = lcg(9);
        let w: Vec<f32> = (0..rows * cols).map(|_| r() * 0.05).collect();
        let mut h = Hessian::new(cols);
        h.add(&x[..m / 2 * cols]);
        h.add(&x[m / 2 * cols..]);
        assert_eq!(h.rows, m as u64);
        let f = Factor::of(&h, DAMP).unwrap();
        for bits in [2u8, 3, 4] {
            let g = quantize(&w, rows, cols, bits, 64, &f, "t").unwrap();
            let rtn = mfx_formats::quant::quantize(&w, rows, cols, bits, 64).unwrap();
            let (eg, er) = (output_error(&x, &w, &g), output_error(&x, &w, &rtn));
            assert!(eg < 0.7 * er, "bits {bits}: GPTQ {eg:.4e} vs RTN {er:.4e}");
        }
    }

    #[test]
    fn mismatched_shapes_are_refused_with_the_tensor_name() {
        let mut h = Hessian::new(64);
        for i in 0..64 {
            h.sum[i * 64 + i] = 1.0;
        }
        let f = Factor::of(&h, DAMP).unwrap();
        let e = quantize(&[0.0; 64], 2, 64, 4, 64, &f, "L0 E1 gate_proj").unwrap_err();
        assert!(e.to_string().contains("L0 E1 gate_proj"), "{e}");
    }
}

/// Cost at a real model's shapes (Qwen3-30B-A3B: hidden 2048, expert
/// intermediate 768); `cargo test --release -p mfx-prep -- --ignored
/// --nocapture gptq_cost`.
#[cfg(test)]
mod cost {
    use super::*;

    #[test]
    #[ignore]
    fn gptq_cost_at_qwen3_30b_shapes() {
        let (d, inter, m) = (2048, 768, 4096);
        let mut s = 1u64;
        let mut r = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let x: Vec<f32> = (0..m * d).map(|_| r()).collect();
        let w: Vec<f32> = (0..inter * d).map(|_| r() * 0.05).collect();
        let t = std::time::Instant::now();
        let mut h = Hessian::new(d);
        h.add(&x);
        let t_h = t.elapsed();
        let t = std::time::Instant::now();
        let f = Factor::of(&h, DAMP).unwrap();
        let t_f = t.elapsed();
        let t = std::time::Instant::now();
        quantize(&w, inter, d, 2, 64, &f, "gate").unwrap();
        let t_q = t.elapsed();
        eprintln!(
            "H from {m} rows of {d}: {t_h:.2?}; factor: {t_f:.2?}; GPTQ of [{inter}, {d}]: {t_q:.2?} ({} threads)",
            rayon::current_num_threads()
        );
    }
}
