//! Whether a model suits expert streaming at all, from its shape and its
//! measured routing: the report's and the model card's verdict.
//!
//! Streaming pays when one token touches a small share of the model (many
//! experts, few active: experts per active expert), when routing is
//! concentrated enough that a cache of the most-used experts serves most
//! of it (the top quarter's share of calibration routing), and when the
//! always-resident part (attention, embeddings, shared experts) is not most
//! of the bytes a token reads.

use mfx_formats::profile::{LayerProfile, Profile};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Suitability {
    pub experts: usize,
    pub top_k: usize,
    /// `experts / top_k`: how many experts per active one.
    pub experts_per_active: f64,
    pub shared_expert: bool,
    /// Mean over MoE layers of the share of routed tokens served by the
    /// quarter of experts used most (0.25 if routing were uniform).
    pub top_quarter_share: f64,
    /// Parameters one decode token reads (dense plus top-k experts per MoE
    /// layer) over all parameters.
    pub active_share: f64,
    /// Parameters outside routed experts over the parameters a token reads.
    pub dense_share_of_active: f64,
    pub verdict: String,
}

/// The share of one layer's routed tokens served by its most-used quarter
/// of experts (`None` if the layer saw no tokens).
pub fn layer_top_quarter_share(l: &LayerProfile) -> Option<f64> {
    let tot: u64 = l.counts.iter().sum();
    (tot > 0).then(|| {
        let mut c = l.counts.clone();
        c.sort_unstable_by(|a, b| b.cmp(a));
        c.iter().take(c.len().div_ceil(4)).sum::<u64>() as f64 / tot as f64
    })
}

/// Mean over layers of the top quarter's share of routing counts.
pub fn top_quarter_share(p: &Profile) -> f64 {
    let shares: Vec<f64> = p
        .layers
        .iter()
        .filter_map(layer_top_quarter_share)
        .collect();
    if shares.is_empty() {
        0.0
    } else {
        shares.iter().sum::<f64>() / shares.len() as f64
    }
}

/// `dense_params`: everything but the routed experts; `expert_params`: one
/// routed expert's; `moe_layers` MoE layers of `experts` experts, `top_k` active.
pub fn assess(
    profile: &Profile,
    experts: usize,
    top_k: usize,
    moe_layers: usize,
    dense_params: u64,
    expert_params: u64,
    shared_expert: bool,
) -> Suitability {
    let per_active = experts as f64 / top_k.max(1) as f64;
    let all = dense_params as f64 + (moe_layers * experts) as f64 * expert_params as f64;
    let active = dense_params as f64 + (moe_layers * top_k) as f64 * expert_params as f64;
    let active_share = if all > 0.0 { active / all } else { 1.0 };
    let dense_share = if active > 0.0 {
        dense_params as f64 / active
    } else {
        1.0
    };
    let conc = top_quarter_share(profile);
    let facts = format!(
        "{experts} experts, top-{top_k} ({per_active:.0} per active one); a token reads {:.1}% of the parameters, {:.0}% of them always resident{}; the most-used quarter of experts serves {:.0}% of calibration routing",
        active_share * 100.0,
        dense_share * 100.0,
        if shared_expert { " (shared expert included)" } else { "" },
        conc * 100.0
    );
    let verdict = if per_active < 4.0 || active_share > 0.5 {
        format!("poorly suited to streaming: {facts}. Each token needs most of the model; give it RAM for the whole pack")
    } else if per_active >= 8.0 && conc >= 0.4 {
        format!("well suited to streaming: {facts}. A cache of a quarter of the experts plus prefetch hides most reads")
    } else {
        format!("suited to streaming with a large cache: {facts}. Routing is spread, so hit rates follow the cache's share of experts closely")
    };
    Suitability {
        experts,
        top_k,
        experts_per_active: per_active,
        shared_expert,
        top_quarter_share: conc,
        active_share,
        dense_share_of_active: dense_share,
        verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mfx_formats::profile::{Calibration, ModelIdentity, PinRule};

    fn profile(counts: Vec<Vec<u64>>) -> Profile {
        Profile {
            schema: "mfx-profile".into(),
            version: 1,
            model: ModelIdentity {
                arch: "test".into(),
                num_layers: 1,
                num_experts: 8,
                top_k: 2,
                config_hash: String::new(),
            },
            calibration: Calibration {
                sources: vec![],
                tokens: 0,
                protocol: String::new(),
            },
            pin_rule: PinRule {
                mass_threshold: 0.8,
                max_per_layer: 0,
            },
            layers: counts
                .into_iter()
                .enumerate()
                .map(|(l, c)| LayerProfile {
                    layer: l as u32,
                    gate_mass: c.iter().map(|&x| x as f64).collect(),
                    counts: c,
                    coactivation: vec![],
                    pinned: vec![],
                })
                .collect(),
        }
    }

    #[test]
    fn verdicts_follow_shape_and_concentration() {
        // 8 experts: top quarter = 2 experts.
        let skewed = profile(vec![vec![40, 30, 5, 5, 5, 5, 5, 5]]);
        assert!((top_quarter_share(&skewed) - 0.7).abs() < 1e-12);
        let uniform = profile(vec![vec![10; 8]]);
        assert!((top_quarter_share(&uniform) - 0.25).abs() < 1e-12);
        // 128 experts top-8, small dense part, concentrated: well suited.
        let mut c = vec![1u64; 128];
        c[..32].iter_mut().for_each(|x| *x = 10);
        let s = assess(
            &profile(vec![c.clone()]),
            128,
            8,
            48,
            1_000_000_000,
            4_700_000,
            false,
        );
        assert!(s.verdict.starts_with("well suited"), "{}", s.verdict);
        // Same shape, uniform routing: needs a large cache.
        let s = assess(
            &profile(vec![vec![1; 128]]),
            128,
            8,
            48,
            1_000_000_000,
            4_700_000,
            false,
        );
        assert!(
            s.verdict
                .starts_with("suited to streaming with a large cache"),
            "{}",
            s.verdict
        );
        // Mixtral-like 8 experts top-2: a quarter of the experts per token.
        let s = assess(&skewed, 8, 2, 32, 1_600_000_000, 176_000_000, false);
        assert!(
            s.verdict
                .starts_with("suited to streaming with a large cache"),
            "{}",
            s.verdict
        );
        assert!((s.experts_per_active - 4.0).abs() < 1e-12 && s.active_share > 0.25);
        // 4 experts top-2: half of every layer per token.
        let s = assess(
            &profile(vec![vec![5, 4, 3, 2]]),
            4,
            2,
            32,
            1_600_000_000,
            176_000_000,
            true,
        );
        assert!(s.verdict.starts_with("poorly suited"), "{}", s.verdict);
        assert!(s.verdict.contains("shared expert"), "{}", s.verdict);
    }
}
