//! The DeepSeek-V3 router family (also GLM-4-MoE): sigmoid expert scores,
//! a per-expert `e_score_correction_bias` that only steers *selection*,
//! group-limited top-k (`n_group` groups ranked by the sum of their two best
//! biased scores, keep `topk_group`), optional renormalization and a
//! `routed_scaling_factor`. The mixing weights come from the unbiased
//! sigmoid scores, as in transformers' `DeepseekV3TopkRouter`.
//!
//! Also the pieces those families share: a small JSON config reader (their
//! configs use keys `ModelConfig` does not know) and the routed-expert
//! combine over an [`ExpertProvider`], so the streaming cache serves them
//! exactly as it serves the softmax families.

use super::moe::{routed_experts_forward, ExpertProvider, RoutedBatch, RouterObserver};
use crate::error::RuntimeError;
use crate::kernels;
use crate::weights::Matrix;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Reads `config.json` keys, naming the file and key in every error.
pub struct JsonCfg {
    pub path: PathBuf,
    pub obj: Map<String, Value>,
}

impl JsonCfg {
    pub fn from_file(path: &Path) -> Result<Self, RuntimeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_str(&text, path)
    }

    pub fn from_str(text: &str, path: &Path) -> Result<Self, RuntimeError> {
        let v: Value = serde_json::from_str(text).map_err(|e| RuntimeError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        match v {
            Value::Object(obj) => Ok(JsonCfg {
                path: path.to_path_buf(),
                obj,
            }),
            _ => Err(RuntimeError::BadKey {
                path: path.to_path_buf(),
                key: "(top level)".into(),
                msg: "expected a JSON object".into(),
            }),
        }
    }

    pub fn bad(&self, key: &str, msg: impl Into<String>) -> RuntimeError {
        RuntimeError::BadKey {
            path: self.path.clone(),
            key: key.into(),
            msg: msg.into(),
        }
    }

    /// A key at top level or, failing that, inside `rope_parameters` /
    /// `rope_scaling` (transformers 5 moved rope keys there).
    fn get(&self, key: &str) -> Option<&Value> {
        if let Some(v) = self.obj.get(key).filter(|v| !v.is_null()) {
            return Some(v);
        }
        for nest in ["rope_parameters", "rope_scaling"] {
            if let Some(v) = self
                .obj
                .get(nest)
                .and_then(|o| o.get(key))
                .filter(|v| !v.is_null())
            {
                return Some(v);
            }
        }
        None
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>, RuntimeError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => crate::config::check_cap(key, n)
                    .map(Some)
                    .map_err(|m| self.bad(key, m)),
                None => Err(self.bad(key, format!("expected a non-negative integer, found {v}"))),
            },
        }
    }

    pub fn usize_req(&self, key: &str) -> Result<usize, RuntimeError> {
        self.usize_opt(key)?
            .ok_or_else(|| RuntimeError::MissingKey {
                path: self.path.clone(),
                key: key.into(),
            })
    }

    pub fn positive(&self, key: &str) -> Result<usize, RuntimeError> {
        let n = self.usize_req(key)?;
        if n == 0 {
            return Err(self.bad(key, "must be positive"));
        }
        Ok(n)
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>, RuntimeError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("expected a number, found {v}"))),
        }
    }

    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>, RuntimeError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("expected true or false, found {v}"))),
        }
    }

    pub fn str_opt(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }

    pub fn ids(&self, key: &str) -> Result<Vec<u32>, RuntimeError> {
        let one = |v: &Value| -> Result<u32, RuntimeError> {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.bad(key, format!("expected a token id, found {v}")))
        };
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    /// Refuses scaled rope types this reader does not implement.
    pub fn default_rope_only(&self) -> Result<(), RuntimeError> {
        match self.str_opt("rope_type").or_else(|| self.str_opt("type")) {
            None | Some("default") => Ok(()),
            Some(t) => Err(self.bad(
                "rope_parameters.rope_type",
                format!("rope type `{t}` is not supported (only the default rope)"),
            )),
        }
    }

    /// `hidden_act` must be silu (the only activation the experts implement).
    pub fn silu_only(&self) -> Result<(), RuntimeError> {
        match self.obj.get("hidden_act") {
            None => Ok(()),
            Some(v) if v.as_str() == Some("silu") => Ok(()),
            Some(v) => Err(self.bad(
                "hidden_act",
                format!("activation {v} is not supported (only silu)"),
            )),
        }
    }
}

/// The sigmoid, bias-corrected, group-limited router.
#[derive(Debug, Clone)]
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
    pub fn skip_missing(&self, sel: &mut Vec<(usize, f32)>, missing: &[bool]) -> usize {
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

/// A sigmoid-routed MoE block's resident weights (router and its bias).
#[derive(Debug, Clone)]
pub struct SigmoidRouter {
    pub weight: Matrix,
    pub bias: Vec<f32>,
}

/// The next MoE layer, for prefetch: its router and a proxy of its input
/// (this layer's post-attention residual stream under the next layer's
/// post-attention norm), as [`super::moe::NextLayer`] is for the softmax
/// families.
pub struct SigmoidNext<'a> {
    pub layer: usize,
    pub router: &'a SigmoidRouter,
    pub input: &'a [f32],
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

/// Routes `n` tokens of `xn` and returns the weighted sum of their routed
/// experts' outputs (`[n, hidden]`), fetching experts from `experts`. With
/// `next`, the provider also gets a prediction of the next MoE layer's
/// experts before this layer's experts compute.
#[allow(clippy::too_many_arguments)]
pub fn routed_forward(
    layer: usize,
    routing: &SigmoidRouting,
    router: &SigmoidRouter,
    experts: &dyn ExpertProvider,
    xn: &[f32],
    n: usize,
    mut observer: Option<&mut (dyn RouterObserver + '_)>,
    next: Option<SigmoidNext<'_>>,
) -> Result<Vec<f32>, RuntimeError> {
    let hidden = router.weight.cols();
    let ne = router.weight.rows();
    let mut logits = vec![0.0; n * ne];
    kernels::matmul(&router.weight.mat(), xn, n, &mut logits);
    let mut per_token: Vec<Vec<(usize, f32)>> = Vec::with_capacity(n);
    let mut scores = Vec::with_capacity(ne);
    for t in 0..n {
        let lg = &logits[t * ne..(t + 1) * ne];
        let (sel, wts) = routing.route(lg, &router.bias, &mut scores);
        if let Some(obs) = observer.as_deref_mut() {
            obs.observe(layer, t, lg, &scores, &sel, &wts);
        }
        per_token.push(sel.into_iter().zip(wts).collect());
    }
    let hint = next
        .filter(|nx| experts.wants_next_hint(nx.layer))
        .map(|nx| {
            let probs = move || {
                let ne2 = nx.router.weight.rows();
                let mut p2 = vec![0.0; n * ne2];
                kernels::matmul(&nx.router.weight.mat(), nx.input, n, &mut p2);
                selection_distribution(&mut p2, &nx.router.bias);
                p2
            };
            (nx.layer, probs)
        });
    routed_experts_forward(
        RoutedBatch {
            layer,
            per_token,
            num_experts: ne,
            top_k: routing.top_k,
            reweight: &|sel, missing| routing.skip_missing(sel, missing),
            next: hint.as_ref().map(|(l, f)| (*l, f as &dyn Fn() -> Vec<f32>)),
        },
        experts,
        xn,
        n,
        hidden,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
