//! Routers: from a layer's router logits to each token's experts and
//! mixing weights. One [`Router`] trait over the two gating functions the
//! families use, the way llama.cpp's `build_moe_ffn` takes the gating
//! function as a parameter; everything after routing is one path
//! (`super::moe`).
//!
//! - [`SoftmaxRouter`] (qwen3_moe, qwen2_moe, mixtral, olmoe, qwen3_next):
//!   softmax over all experts, top-k, optional renormalization.
//! - [`SigmoidRouter`] (deepseek_v3, glm4_moe): sigmoid scores, a
//!   per-expert `e_score_correction_bias` that only steers *selection*,
//!   group-limited top-k (`n_group` groups ranked by the sum of their two
//!   best biased scores, keep `topk_group`), optional renormalization and a
//!   `routed_scaling_factor`; the mixing weights come from the unbiased
//!   sigmoid scores, as in transformers' `DeepseekV3TopkRouter`.

use super::config::JsonCfg;
use crate::error::RuntimeError;
use crate::kernels;
use crate::weights::{Matrix, WeightSource};

/// One token's `(expert, weight)` choices.
pub type Choices = Vec<(usize, f32)>;

/// A layer's router: its weight and gating function.
pub trait Router: Send + Sync {
    /// `[experts, hidden]`.
    fn weight(&self) -> &Matrix;
    /// A bias added to the router's logits (gpt-oss's `mlp.router.bias`);
    /// `None` for routers without one.
    fn bias(&self) -> Option<&[f32]> {
        None
    }
    /// Experts per token.
    fn top_k(&self) -> usize;
    /// One token: fills `probs` with the scores observers see (softmax or
    /// sigmoid of `logits`) and returns the selected experts (best first,
    /// ties to the lower id) and their mixing weights.
    fn route(&self, logits: &[f32], probs: &mut Vec<f32>) -> (Vec<usize>, Vec<f32>);
    /// `--skip-missing`: drops the experts marked in `missing` from one
    /// token's choices and re-weights the rest as this gating function
    /// would had it chosen only those; returns how many were dropped.
    fn skip_missing(&self, sel: &mut Choices, missing: &[bool]) -> usize;
    /// Turns router logits (`[n, experts]`, in place) into the next-layer
    /// predictor's per-token distribution over experts.
    fn distribution(&self, logits: &mut [f32]);
}

/// How a softmax family turns router logits into mixing weights.
#[derive(Debug, Clone, Copy)]
pub struct Routing {
    pub top_k: usize,
    /// Divide the top-k probabilities by their sum (Mixtral always; qwen and
    /// OLMoE when `norm_topk_prob`). Otherwise they are the softmax over all
    /// experts, unnormalized.
    pub renormalize: bool,
}

impl Routing {
    /// Softmax over all experts, top-k (ties to the lower index, as
    /// `torch.topk` on CPU does), optional renormalization. Fills `probs`
    /// and returns `(selected, weights)`.
    pub fn route(&self, logits: &[f32], probs: &mut Vec<f32>) -> (Vec<usize>, Vec<f32>) {
        probs.clear();
        probs.extend_from_slice(logits);
        kernels::softmax(probs);
        let mut idx: Vec<usize> = (0..probs.len()).collect();
        idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        idx.truncate(self.top_k);
        let mut w: Vec<f32> = idx.iter().map(|&e| probs[e]).collect();
        if self.renormalize {
            let s: f32 = w.iter().sum();
            for x in w.iter_mut() {
                *x /= s;
            }
        }
        (idx, w)
    }

    /// Renormalized over the kept experts when the family renormalizes its
    /// top-k, else the softmax weights unchanged (the skipped experts'
    /// share is simply lost, as with any expert outside the top-k).
    pub fn skip_missing(&self, sel: &mut Choices, missing: &[bool]) -> usize {
        let before = sel.len();
        sel.retain(|&(e, _)| !missing[e]);
        let dropped = before - sel.len();
        if dropped > 0 && self.renormalize {
            let s: f32 = sel.iter().map(|x| x.1).sum();
            if s > 0.0 {
                for x in sel.iter_mut() {
                    x.1 /= s;
                }
            }
        }
        dropped
    }
}

/// A softmax top-k router (`{module}.gate`), optionally with a logit bias
/// (gpt-oss's `mlp.router`, see [`SoftmaxRouter::with_bias`]).
#[derive(Debug, Clone)]
pub struct SoftmaxRouter {
    pub weight: Matrix,
    pub rule: Routing,
    pub bias: Option<Vec<f32>>,
}

impl SoftmaxRouter {
    /// `{prefix}.weight` for `experts` experts over `hidden` inputs.
    pub fn load(
        src: &dyn WeightSource,
        prefix: &str,
        experts: usize,
        hidden: usize,
        rule: Routing,
    ) -> Result<Self, RuntimeError> {
        Ok(SoftmaxRouter {
            weight: src.matrix(prefix, experts, hidden)?,
            rule,
            bias: None,
        })
    }

    /// Adds `{prefix}.bias` (`[experts]`) to the logits. gpt-oss selects the
    /// top-k logits and takes the softmax over those k, which is this rule
    /// with renormalization: softmax over all experts, top-k, divided by
    /// their sum (the same numbers up to rounding).
    pub fn with_bias(mut self, src: &dyn WeightSource, prefix: &str) -> Result<Self, RuntimeError> {
        self.bias = Some(src.vector(&format!("{prefix}.bias"), self.weight.rows())?);
        Ok(self)
    }
}

impl Router for SoftmaxRouter {
    fn weight(&self) -> &Matrix {
        &self.weight
    }
    fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
    fn top_k(&self) -> usize {
        self.rule.top_k
    }
    fn route(&self, logits: &[f32], probs: &mut Vec<f32>) -> (Vec<usize>, Vec<f32>) {
        self.rule.route(logits, probs)
    }
    fn skip_missing(&self, sel: &mut Choices, missing: &[bool]) -> usize {
        self.rule.skip_missing(sel, missing)
    }
    fn distribution(&self, logits: &mut [f32]) {
        let ne = self.weight.rows();
        for row in logits.chunks_exact_mut(ne) {
            kernels::softmax(row);
        }
    }
}

/// The sigmoid, bias-corrected, group-limited router.
#[derive(Debug, Clone, Copy)]
pub struct SigmoidRouting {
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

impl SigmoidRouting {
    pub fn from_cfg(c: &JsonCfg, n_experts: usize) -> Result<Self, RuntimeError> {
        let top_k = c.positive("num_experts_per_tok")?;
        let n_group = c.usize_opt("n_group")?.unwrap_or(1).max(1);
        let topk_group = c.usize_opt("topk_group")?.unwrap_or(n_group);
        if !n_experts.is_multiple_of(n_group) {
            return Err(c.bad(
                "n_group",
                format!("{n_group} does not divide {n_experts} experts"),
            ));
        }
        if topk_group == 0 || topk_group > n_group {
            return Err(c.bad(
                "topk_group",
                format!("{topk_group} is not in 1..={n_group}"),
            ));
        }
        if top_k > topk_group * (n_experts / n_group) {
            return Err(c.bad(
                "num_experts_per_tok",
                format!("{top_k} exceeds the experts of {topk_group} groups"),
            ));
        }
        Ok(SigmoidRouting {
            top_k,
            n_group,
            topk_group,
            norm_topk_prob: c.bool_opt("norm_topk_prob")?.unwrap_or(true),
            routed_scaling_factor: c.f64_opt("routed_scaling_factor")?.unwrap_or(1.0) as f32,
        })
    }

    /// Fills `scores` with the sigmoid of `logits`; returns the selected
    /// experts (descending biased score, ties to the lower id) and their weights.
    pub fn route(
        &self,
        logits: &[f32],
        bias: &[f32],
        scores: &mut Vec<f32>,
    ) -> (Vec<usize>, Vec<f32>) {
        scores.clear();
        scores.extend(logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())));
        let ne = scores.len();
        let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
        if self.n_group > 1 {
            let per = ne / self.n_group;
            let gscore: Vec<f32> = choice
                .chunks_exact(per)
                .map(|g| {
                    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for &x in g {
                        if x > a {
                            b = a;
                            a = x;
                        } else if x > b {
                            b = x;
                        }
                    }
                    if per == 1 {
                        a
                    } else {
                        a + b
                    }
                })
                .collect();
            let mut gidx: Vec<usize> = (0..self.n_group).collect();
            gidx.sort_by(|&a, &b| gscore[b].total_cmp(&gscore[a]).then(a.cmp(&b)));
            let keep = &gidx[..self.topk_group];
            for (g, chunk) in choice.chunks_exact_mut(per).enumerate() {
                if !keep.contains(&g) {
                    // transformers masks dropped groups with 0.0, not -inf.
                    chunk.fill(0.0);
                }
            }
        }
        let mut idx: Vec<usize> = (0..ne).collect();
        idx.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
        idx.truncate(self.top_k);
        let mut w: Vec<f32> = idx.iter().map(|&e| scores[e]).collect();
        if self.norm_topk_prob {
            let s: f32 = w.iter().sum::<f32>() + 1e-20;
            for x in w.iter_mut() {
                *x /= s;
            }
        }
        for x in w.iter_mut() {
            *x *= self.routed_scaling_factor;
        }
        (idx, w)
    }

    /// Drops the experts of `missing` from one token's selection (`(expert,
    /// weight)`, weights as [`Self::route`] gave them) and re-weights the rest
    /// as this rule would had it selected only those: with `norm_topk_prob`
    /// the kept sigmoid scores are renormalized to sum to 1 and scaled by
    /// `routed_scaling_factor` again (so the kept weights still sum to the
    /// factor); without it each weight is its own scaled score, unchanged.
    /// Returns how many were dropped.
    pub fn skip_missing(&self, sel: &mut Choices, missing: &[bool]) -> usize {
        let before = sel.len();
        sel.retain(|&(e, _)| !missing[e]);
        let dropped = before - sel.len();
        if dropped > 0 && self.norm_topk_prob {
            // Each weight is score / sum(scores) * factor: the kept ones'
            // own sum, over the factor, undoes the old denominator.
            let s: f32 = sel.iter().map(|x| x.1).sum();
            if s > 0.0 {
                for x in sel.iter_mut() {
                    x.1 *= self.routed_scaling_factor / s;
                }
            }
        }
        dropped
    }
}

/// A sigmoid, bias-corrected, group-limited router (`mlp.gate` and its
/// `e_score_correction_bias`).
#[derive(Debug, Clone)]
pub struct SigmoidRouter {
    pub weight: Matrix,
    pub bias: Vec<f32>,
    pub rule: SigmoidRouting,
}

impl SigmoidRouter {
    /// `{prefix}.weight` and `{prefix}.e_score_correction_bias`.
    pub fn load(
        src: &dyn WeightSource,
        prefix: &str,
        experts: usize,
        hidden: usize,
        rule: SigmoidRouting,
    ) -> Result<Self, RuntimeError> {
        Ok(SigmoidRouter {
            weight: src.matrix(prefix, experts, hidden)?,
            bias: src.vector(&format!("{prefix}.e_score_correction_bias"), experts)?,
            rule,
        })
    }
}

impl Router for SigmoidRouter {
    fn weight(&self) -> &Matrix {
        &self.weight
    }
    fn top_k(&self) -> usize {
        self.rule.top_k
    }
    fn route(&self, logits: &[f32], probs: &mut Vec<f32>) -> (Vec<usize>, Vec<f32>) {
        self.rule.route(logits, &self.bias, probs)
    }
    fn skip_missing(&self, sel: &mut Choices, missing: &[bool]) -> usize {
        self.rule.skip_missing(sel, missing)
    }
    fn distribution(&self, logits: &mut [f32]) {
        selection_distribution(logits, &self.bias)
    }
}

/// The predictor's input for a sigmoid router: per token, the biased
/// selection scores shifted to be non-negative and normalized, so that they
/// rank the experts as selection does (groups aside) and mix with the
/// profile's co-activation shares as a distribution.
fn selection_distribution(logits: &mut [f32], bias: &[f32]) {
    for row in logits.chunks_exact_mut(bias.len()) {
        for (x, b) in row.iter_mut().zip(bias) {
            *x = 1.0 / (1.0 + (-*x).exp()) + b;
        }
        let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
        let sum: f32 = row.iter().map(|x| x - lo).sum();
        for x in row.iter_mut() {
            *x = if sum > 0.0 {
                (*x - lo) / sum
            } else {
                1.0 / bias.len() as f32
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_skipping_renormalizes_only_where_the_family_does() {
        let missing = [false, true, false, false];
        let sel = vec![(0, 0.5), (1, 0.3), (2, 0.2)];
        let renorm = Routing {
            top_k: 3,
            renormalize: true,
        };
        let mut a = sel.clone();
        assert_eq!(renorm.skip_missing(&mut a, &missing), 1);
        assert_eq!(a.len(), 2);
        assert!((a[0].1 - 0.5 / 0.7).abs() < 1e-6 && (a[1].1 - 0.2 / 0.7).abs() < 1e-6);
        let plain = Routing {
            top_k: 3,
            renormalize: false,
        };
        let mut b = sel.clone();
        assert_eq!(plain.skip_missing(&mut b, &missing), 1);
        assert_eq!(b, vec![(0, 0.5), (2, 0.2)]);
    }

    #[test]
    fn skipping_renormalizes_and_keeps_the_scaling_factor() {
        let missing = [false, true, false, false];
        let mut r = SigmoidRouting {
            top_k: 3,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        };
        let logits = [2.0, 1.0, 0.5, -3.0];
        let mut s = Vec::new();
        let (sel, w) = r.route(&logits, &[0.0; 4], &mut s);
        assert_eq!(sel, vec![0, 1, 2]);
        let mut kept: Vec<(usize, f32)> = sel.iter().copied().zip(w.iter().copied()).collect();
        assert_eq!(r.skip_missing(&mut kept, &missing), 1);
        // As if the router had selected only experts 0 and 2.
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (a, b) = (sig(2.0), sig(0.5));
        assert_eq!(kept.len(), 2);
        assert!((kept[0].1 - 2.5 * a / (a + b)).abs() < 1e-5, "{kept:?}");
        assert!((kept[1].1 - 2.5 * b / (a + b)).abs() < 1e-5, "{kept:?}");
        // Without renormalization the kept weights are unchanged.
        r.norm_topk_prob = false;
        let (sel, w) = r.route(&logits, &[0.0; 4], &mut s);
        let mut kept: Vec<(usize, f32)> = sel.iter().copied().zip(w.iter().copied()).collect();
        assert_eq!(r.skip_missing(&mut kept, &missing), 1);
        assert_eq!(kept, vec![(0, w[0]), (2, w[2])]);
    }

    #[test]
    fn selection_distribution_ranks_like_selection() {
        let mut x = [0.0, 2.0, -1.0, 0.5];
        let bias = [0.0, -0.5, 1.0, 0.0];
        selection_distribution(&mut x, &bias);
        let sum: f32 = x.iter().sum();
        assert!(
            (sum - 1.0).abs() < 1e-6 && x.iter().all(|&p| p >= 0.0),
            "{x:?}"
        );
        // Biased scores: 0.5, 0.38, 1.27, 0.62 -> order 2, 3, 0, 1.
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
        assert_eq!(order, vec![2, 3, 0, 1]);
    }

    #[test]
    fn bias_selects_but_does_not_weigh() {
        let r = SigmoidRouting {
            top_k: 1,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: false,
            routed_scaling_factor: 2.0,
        };
        let mut s = Vec::new();
        let (sel, w) = r.route(&[1.0, 0.0], &[0.0, 10.0], &mut s);
        assert_eq!(sel, vec![1]);
        assert!((w[0] - 2.0 * 0.5).abs() < 1e-6);
    }

    #[test]
    fn groups_limit_selection() {
        // Group 0 = {0,1}, group 1 = {2,3}; group 1's top-2 sum wins, so expert 0
        // (the single best) is excluded.
        let r = SigmoidRouting {
            top_k: 2,
            n_group: 2,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        };
        let mut s = Vec::new();
        let (sel, w) = r.route(&[3.0, -5.0, 2.0, 2.0], &[0.0; 4], &mut s);
        assert_eq!(sel, vec![2, 3]);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
