//! KL divergence of a model's next-token distributions from a reference's,
//! position by position, as llama.cpp's `perplexity --kl-divergence`
//! reports it: `KL(P_ref || P_model) = sum_v p_ref(v) (log p_ref(v) - log
//! p_model(v))` per position, its mean, median, 99th percentile and maximum,
//! how often both put the same token first, and the NLL of the observed next
//! token under each. Used by `mfx eval kld` and by prep's report, so both
//! give the same number for the same logits.
//!
//! All sums are in f64 over the full vocabulary: a position where the two
//! logit rows are equal contributes exactly 0.

use serde::Serialize;

/// Accumulates per-position KL divergences and agreement.
#[derive(Debug, Default, Clone)]
pub struct KldStats {
    /// Per-position KL divergence (nats).
    kld: Vec<f64>,
    same_top1: u64,
    nll_base: f64,
    nll_model: f64,
}

/// What [`KldStats::summary`] reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KldSummary {
    /// Positions compared.
    pub positions: u64,
    /// Mean KL divergence (nats).
    pub mean: f64,
    /// Standard error of the mean (sample standard deviation / sqrt(n)).
    pub stderr: f64,
    pub median: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    pub max: f64,
    /// Share of positions where both argmaxes (ties to the lower id) agree.
    pub top1_agreement: f64,
    /// Mean NLL of the next token under the reference and under the model.
    pub nll_base: f64,
    pub nll_model: f64,
}

/// `log sum exp` of a row, in f64.
fn log_sum_exp(x: &[f32]) -> f64 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m
}

/// Index of the largest value, ties to the lower index.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

impl KldStats {
    /// Adds one position: the reference's and the model's logits over the
    /// same vocabulary, and the token that actually came next.
    pub fn add(&mut self, base: &[f32], model: &[f32], next: u32) {
        debug_assert_eq!(base.len(), model.len());
        let (lb, lm) = (log_sum_exp(base), log_sum_exp(model));
        let mut kl = 0f64;
        for (&b, &m) in base.iter().zip(model) {
            let lpb = b as f64 - lb;
            let lpm = m as f64 - lm;
            kl += lpb.exp() * (lpb - lpm);
        }
        // Mathematically >= 0; rounding can leave a -1e-17.
        self.kld.push(kl.max(0.0));
        if argmax(base) == argmax(model) {
            self.same_top1 += 1;
        }
        let t = next as usize;
        self.nll_base += lb - base[t] as f64;
        self.nll_model += lm - model[t] as f64;
    }

    /// Adds the next-token predictions of one row: `base` and `model` are
    /// `[row.len(), vocab]` logits of the same tokens `row`; positions
    /// `0..row.len() - 1` are scored against `row[1..]`.
    pub fn add_row(&mut self, base: &[f32], model: &[f32], vocab: usize, row: &[u32]) {
        for (i, &next) in row.iter().enumerate().skip(1) {
            let s = (i - 1) * vocab..i * vocab;
            self.add(&base[s.clone()], &model[s], next);
        }
    }

    /// Merges another accumulator (rows scored apart).
    pub fn merge(&mut self, o: KldStats) {
        self.kld.extend(o.kld);
        self.same_top1 += o.same_top1;
        self.nll_base += o.nll_base;
        self.nll_model += o.nll_model;
    }

    pub fn positions(&self) -> usize {
        self.kld.len()
    }

    pub fn summary(&self) -> KldSummary {
        let n = self.kld.len();
        if n == 0 {
            return KldSummary {
                positions: 0,
                mean: f64::NAN,
                stderr: f64::NAN,
                median: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
                top1_agreement: f64::NAN,
                nll_base: f64::NAN,
                nll_model: f64::NAN,
            };
        }
        let nf = n as f64;
        let mean = self.kld.iter().sum::<f64>() / nf;
        let var = if n > 1 {
            self.kld
                .iter()
                .map(|k| (k - mean) * (k - mean))
                .sum::<f64>()
                / (nf - 1.0)
        } else {
            0.0
        };
        let mut s = self.kld.clone();
        s.sort_by(f64::total_cmp);
        // Nearest rank: the smallest value with at least q of the positions at or below it.
        let rank = |q: f64| s[((q * nf).ceil() as usize).clamp(1, n) - 1];
        KldSummary {
            positions: n as u64,
            mean,
            stderr: (var / nf).sqrt(),
            median: rank(0.5),
            p99: rank(0.99),
            max: s[n - 1],
            top1_agreement: self.same_top1 as f64 / nf,
            nll_base: self.nll_base / nf,
            nll_model: self.nll_model / nf,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_give_zero_and_full_agreement() {
        let mut s = KldStats::default();
        let row = [3.0f32, -1.0, 0.5, 2.0];
        s.add(&row, &row, 2);
        s.add(&row, &row, 0);
        let r = s.summary();
        assert_eq!(r.mean, 0.0);
        assert_eq!(r.max, 0.0);
        assert_eq!(r.top1_agreement, 1.0);
        assert_eq!(r.nll_base, r.nll_model);
    }

    /// Against the closed form for two-token distributions, and invariance
    /// to a constant shift of either row's logits.
    #[test]
    fn matches_closed_form_and_ignores_logit_shift() {
        let (p, q) = (0.8f64, 0.3f64);
        let want = p * (p / q).ln() + (1.0 - p) * ((1.0 - p) / (1.0 - q)).ln();
        let base = [(p / (1.0 - p)).ln() as f32, 0.0];
        let model = [(q / (1.0 - q)).ln() as f32 + 7.0, 7.0];
        let mut s = KldStats::default();
        s.add(&base, &model, 1);
        let r = s.summary();
        assert!((r.mean - want).abs() < 1e-6, "{} vs {want}", r.mean);
        assert_eq!(r.top1_agreement, 0.0);
        assert!((r.nll_base - -(1.0 - p).ln()).abs() < 1e-6);
        assert!((r.nll_model - -(1.0 - q).ln()).abs() < 1e-6);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = KldStats {
            kld: (1..=200).map(|i| i as f64).collect(),
            ..Default::default()
        };
        let r = s.summary();
        assert_eq!((r.median, r.p99, r.max), (100.0, 198.0, 200.0));
        assert!((r.mean - 100.5).abs() < 1e-12);
    }

    #[test]
    fn rows_score_positions_against_the_next_token() {
        let vocab = 3;
        let base = [0.0f32, 1.0, 2.0, 2.0, 1.0, 0.0, 5.0, 5.0, 5.0];
        let mut a = KldStats::default();
        a.add_row(&base, &base, vocab, &[9, 2, 0]);
        let r = a.summary();
        assert_eq!(r.positions, 2);
        let lse = |x: &[f32]| log_sum_exp(x);
        let want = ((lse(&base[0..3]) - 2.0) + (lse(&base[3..6]) - 2.0)) / 2.0;
        assert!((r.nll_base - want).abs() < 1e-12);
    }
}
