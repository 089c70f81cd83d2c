//! Predicting the next MoE layer's experts, so their reads start while the
//! current layer computes.
//!
//! Two signals, mixed per token (mlx-moe / MLX-Flash style plus the pack's
//! profile):
//! * the next layer's router applied to a proxy of its input: the residual
//!   stream after the current layer's attention, normalized with the next
//!   layer's norm (the current layer's FFN output and the next attention
//!   are missing from it, so it is a guess, measured below);
//! * the profile's co-activation rows: of the tokens that used expert `p` in
//!   the previous MoE layer, how many used `e` in this one (prep records the
//!   top pairs per `p`), weighted by the token's gate weight on `p`.
//!
//! Score `e` = `ROUTER_WEIGHT * p_router(e) + (1 - ROUTER_WEIGHT) * p_coact(e)`;
//! each token predicts its `top_k` best, the batch predicts their union.
//! Precision and recall against the routing that follows are kept in the
//! cache's stats.

use mfx_formats::pack::Pack;
use mfx_formats::profile::Profile;

/// Weight of the router signal against co-activation (both are
/// distributions over experts). An even mix, not tuned: on the tiny model
/// this gives 64.6% precision and recall at --capacity 8 (docs/PERF.md);
/// other weights have not been measured yet.
pub const ROUTER_WEIGHT: f32 = 0.5;

pub use crate::experts::NextHint;

/// Co-activation rows per layer: `coact[layer][p]` = normalized `(e, share)`.
pub struct Predictor {
    coact: Vec<Vec<Vec<(usize, f32)>>>,
}

impl Predictor {
    /// Reads the co-activation rows from `pack`'s routing profile (none for
    /// hand-made packs: then only the router signal is used).
    pub fn from_pack(pack: &Pack, n_layers: usize) -> Self {
        let mut coact = vec![Vec::new(); n_layers];
        let profile = pack
            .manifest()
            .pin_profile
            .as_ref()
            .and_then(|v| serde_json::from_value::<Profile>(v.clone()).ok());
        if let Some(p) = profile {
            for lp in &p.layers {
                let Some(slot) = coact.get_mut(lp.layer as usize) else {
                    continue;
                };
                *slot = lp
                    .coactivation
                    .iter()
                    .map(|row| {
                        let total: u64 = row.iter().map(|pair| pair[1]).sum();
                        row.iter()
                            .map(|pair| (pair[0] as usize, pair[1] as f32 / total.max(1) as f32))
                            .collect()
                    })
                    .collect();
            }
        }
        Predictor { coact }
    }

    pub fn has_coactivation(&self, layer: usize) -> bool {
        self.coact.get(layer).is_some_and(|r| !r.is_empty())
    }

    /// The predicted expert set of `layer` (ascending).
    pub fn predict(&self, layer: usize, h: &NextHint<'_>) -> Vec<usize> {
        let ne = h.probs.len().checked_div(h.n).unwrap_or(0);
        let rows = self.coact.get(layer).filter(|r| !r.is_empty());
        let alpha = if rows.is_some() { ROUTER_WEIGHT } else { 1.0 };
        let mut chosen = vec![false; ne];
        let mut score = vec![0.0f32; ne];
        for t in 0..h.n {
            let p = &h.probs[t * ne..(t + 1) * ne];
            for (s, &x) in score.iter_mut().zip(p) {
                *s = alpha * x;
            }
            if let (Some(rows), Some(prev)) = (rows, h.prev.get(t)) {
                let wsum: f32 = prev.iter().map(|x| x.1).sum::<f32>().max(1e-12);
                for &(pe, w) in prev {
                    for &(e, share) in rows.get(pe).map(Vec::as_slice).unwrap_or(&[]) {
                        if let Some(s) = score.get_mut(e) {
                            *s += (1.0 - alpha) * share * w / wsum;
                        }
                    }
                }
            }
            let mut idx: Vec<usize> = (0..ne).collect();
            idx.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
            for &e in idx.iter().take(h.top_k) {
                chosen[e] = true;
            }
        }
        (0..ne).filter(|&e| chosen[e]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_only_prediction_is_per_token_top_k_union() {
        let p = Predictor {
            coact: vec![Vec::new(); 2],
        };
        let probs = [0.1, 0.6, 0.3, 0.0, 0.0, 0.1, 0.2, 0.7];
        let prev = vec![vec![], vec![]];
        let h = NextHint {
            probs: &probs,
            n: 2,
            top_k: 1,
            prev: &prev,
        };
        assert_eq!(p.predict(1, &h), vec![1, 3]);
    }

    #[test]
    fn coactivation_can_outvote_a_weak_router() {
        // Layer 1: tokens on expert 0 in layer 0 go to expert 2 here.
        let p = Predictor {
            coact: vec![Vec::new(), vec![vec![(2, 1.0)]]],
        };
        let probs = [0.3, 0.35, 0.2, 0.15];
        let prev = vec![vec![(0, 1.0)]];
        let h = NextHint {
            probs: &probs,
            n: 1,
            top_k: 1,
            prev: &prev,
        };
        assert_eq!(p.predict(1, &h), vec![2]);
    }
}
