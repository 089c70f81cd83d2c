//! Expert pruning by router-weighted saliency (`--prune FRACTION`).
//!
//! REAP (Lasby et al., Cerebras 2025, "REAP: Router-weighted Expert
//! Activation Pruning") scores expert `j` of a layer by the mean, over the
//! calibration tokens routed to it, of its mixing weight times the L2 norm
//! of its output, `S_j = mean_{x routed to j} g_j(x) * ||f_j(x)||_2`, and
//! removes the lowest-scoring experts together with their router rows, so
//! the router's softmax and top-k run over the experts that remain.
//! `--prune-by total` (the default) uses the sum instead of the mean: the
//! expert's whole contribution to the calibration batch, so an expert that
//! is strong but rarely routed to goes before one the text leans on. On the
//! shared model at 10% it cost +0.03..+0.22% NLL where the mean cost
//! -0.22..+1.65% (docs/PERF.md).
//!
//! A pruned pack is an ordinary pack of a model with fewer experts: the
//! same number is dropped from every MoE layer (never leaving fewer than
//! `top_k`), the survivors keep their relative order and are renumbered
//! `0..kept`, each MoE layer's router matrix keeps only their rows, and the
//! embedded config's expert count says `kept`. No format change: the
//! runtime cannot route to a pruned expert because it no longer exists,
//! and every reader of packs runs it unchanged. Only families whose router
//! is one `[experts, hidden]` matrix per layer (`mlp.gate`,
//! `block_sparse_moe.gate`) without per-expert biases or group limits are
//! pruned; the others are refused by name.

use crate::error::{PrepError, Result};
use mfx_formats::profile::Profile;
use serde::Serialize;

/// Families whose routers [`Pruning`] knows how to cut.
pub const PRUNABLE: [&str; 4] = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"];

/// Config keys that hold the routed-expert count.
const EXPERT_KEYS: [&str; 3] = ["num_experts", "num_local_experts", "n_routed_experts"];

/// How [`choose`] scores experts (`--prune-by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SaliencyKind {
    /// Summed router weight x output norm over the calibration tokens.
    #[default]
    Total,
    /// REAP's mean over the tokens routed to the expert.
    Mean,
}

impl std::str::FromStr for SaliencyKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "total" => Ok(SaliencyKind::Total),
            "mean" => Ok(SaliencyKind::Mean),
            _ => Err(format!("expected total or mean, got `{s}`")),
        }
    }
}

/// Which experts each MoE layer keeps.
#[derive(Debug, Clone, Serialize)]
pub struct Pruning {
    pub fraction: f64,
    /// How the experts were scored.
    pub by: SaliencyKind,
    pub experts_before: usize,
    pub experts_after: usize,
    /// Per MoE layer: `(layer, kept source expert ids ascending, dropped
    /// ids, saliency of every source expert)`.
    pub layers: Vec<PrunedLayer>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrunedLayer {
    pub layer: usize,
    pub kept: Vec<u32>,
    pub dropped: Vec<u32>,
    pub saliency: Vec<f64>,
}

/// Experts kept per layer: `ceil(fraction * experts)` dropped (so at least
/// the fraction asked for is removed), never fewer than `top_k` kept.
pub fn kept_count(experts: usize, top_k: usize, fraction: f64) -> usize {
    // The epsilon keeps 0.25 * 64 at 16, not 17, through rounding.
    let drop = (fraction * experts as f64 - 1e-9).ceil().max(0.0) as usize;
    experts.saturating_sub(drop).max(top_k).min(experts)
}

/// Chooses the experts to keep from each layer's saliency (`(layer, one
/// score per expert)`): the `kept_count` highest, ties to the lower id.
pub fn choose(
    saliency: &[(usize, Vec<f64>)],
    experts: usize,
    top_k: usize,
    fraction: f64,
    by: SaliencyKind,
) -> Result<Pruning> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(PrepError::Option(format!(
            "--prune {fraction}: expected a fraction in [0, 1)"
        )));
    }
    let keep = kept_count(experts, top_k, fraction);
    let mut layers = Vec::new();
    for (l, s) in saliency {
        if s.len() != experts {
            return Err(PrepError::Calibration(format!(
                "layer {l}: saliency of {} experts, expected {experts}",
                s.len()
            )));
        }
        let mut order: Vec<u32> = (0..experts as u32).collect();
        order.sort_by(|&a, &b| s[b as usize].total_cmp(&s[a as usize]).then(a.cmp(&b)));
        let mut kept = order[..keep].to_vec();
        let mut dropped = order[keep..].to_vec();
        kept.sort_unstable();
        dropped.sort_unstable();
        layers.push(PrunedLayer {
            layer: *l,
            kept,
            dropped,
            saliency: s.clone(),
        });
    }
    Ok(Pruning {
        fraction,
        by,
        experts_before: experts,
        experts_after: keep,
        layers,
    })
}

impl Pruning {
    /// Source ids kept in `layer`, indexed by new id; `None` for a layer
    /// without routed experts.
    pub fn kept(&self, layer: usize) -> Option<&[u32]> {
        self.layers
            .iter()
            .find(|p| p.layer == layer)
            .map(|p| p.kept.as_slice())
    }

    /// New id of source expert `e` of `layer`, if kept.
    fn new_id(&self, layer: usize, e: u32) -> Option<u32> {
        self.kept(layer)
            .and_then(|k| k.binary_search(&e).ok())
            .map(|i| i as u32)
    }

    /// The profile of the pruned model: counts, gate mass, pins and
    /// co-activations of the kept experts under their new ids.
    pub fn remap_profile(&self, p: &Profile) -> Profile {
        let mut out = p.clone();
        let mut prev: Option<usize> = None;
        for lp in &mut out.layers {
            let l = lp.layer as usize;
            let Some(kept) = self.kept(l) else {
                continue;
            };
            lp.counts = kept.iter().map(|&e| lp.counts[e as usize]).collect();
            lp.gate_mass = kept.iter().map(|&e| lp.gate_mass[e as usize]).collect();
            lp.pinned = lp
                .pinned
                .iter()
                .filter_map(|&e| self.new_id(l, e))
                .collect();
            if !lp.coactivation.is_empty() {
                // Rows are the previous MoE layer's experts; entries this layer's.
                let rows = match prev.and_then(|pl| self.kept(pl)) {
                    Some(pk) => pk
                        .iter()
                        .map(|&pe| {
                            lp.coactivation
                                .get(pe as usize)
                                .cloned()
                                .unwrap_or_default()
                        })
                        .collect(),
                    None => lp.coactivation.clone(),
                };
                lp.coactivation = rows
                    .into_iter()
                    .map(|row: Vec<[u64; 2]>| {
                        row.into_iter()
                            .filter_map(|[e, c]| self.new_id(l, e as u32).map(|n| [n as u64, c]))
                            .collect()
                    })
                    .collect();
            }
            prev = Some(l);
        }
        out
    }

    /// The checkpoint's config with the kept expert count.
    pub fn config(&self, raw: &serde_json::Value) -> serde_json::Value {
        let mut c = raw.clone();
        if let Some(o) = c.as_object_mut() {
            for k in EXPERT_KEYS {
                if o.contains_key(k) {
                    o.insert(k.into(), self.experts_after.into());
                }
            }
            // A multimodal config nests the text model's keys.
            if let Some(t) = o.get_mut("text_config").and_then(|t| t.as_object_mut()) {
                for k in EXPERT_KEYS {
                    if t.contains_key(k) {
                        t.insert(k.into(), self.experts_after.into());
                    }
                }
            }
        }
        c
    }

    /// For a router tensor (`model.layers.L.<...>.gate`, `[experts, hidden]`)
    /// of a pruned layer, the source rows to keep.
    pub fn router_rows(&self, module: &str, rows: u64) -> Option<&[u32]> {
        if !module.ends_with(".gate") || rows != self.experts_before as u64 {
            return None;
        }
        let l: usize = module
            .strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()?;
        self.kept(l)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kept_counts_round_the_drop_up_and_respect_top_k() {
        assert_eq!(kept_count(64, 4, 0.10), 57);
        assert_eq!(kept_count(64, 4, 0.25), 48);
        assert_eq!(kept_count(64, 4, 0.0), 64);
        assert_eq!(kept_count(8, 4, 0.9), 4);
        assert_eq!(kept_count(8, 2, 0.5), 4);
    }

    #[test]
    fn lowest_saliency_goes_ties_to_the_higher_id() {
        let s = vec![(1, vec![0.5, 0.1, 0.9, 0.1, 0.3])];
        let p = choose(&s, 5, 2, 0.4, SaliencyKind::Total).unwrap();
        assert_eq!(p.experts_after, 3);
        assert_eq!(p.layers[0].kept, vec![0, 2, 4]);
        assert_eq!(p.layers[0].dropped, vec![1, 3]);
        let s = vec![(1, vec![0.5, 0.1, 0.9, 0.1, 0.3])];
        let p = choose(&s, 5, 2, 0.2, SaliencyKind::Total).unwrap();
        // One of the two tied 0.1s stays: the lower id.
        assert_eq!(p.layers[0].kept, vec![0, 1, 2, 4]);
        assert!(choose(&s, 5, 2, 1.0, SaliencyKind::Total).is_err());
    }

    #[test]
    fn router_rows_only_for_a_pruned_layers_router() {
        let p = choose(
            &[(3, vec![1.0, 0.0, 2.0, 3.0])],
            4,
            1,
            0.25,
            SaliencyKind::Mean,
        )
        .unwrap();
        assert_eq!(
            p.router_rows("model.layers.3.mlp.gate", 4),
            Some(&[0u32, 2, 3][..])
        );
        assert_eq!(p.router_rows("model.layers.2.mlp.gate", 4), None);
        assert_eq!(
            p.router_rows("model.layers.3.mlp.shared_expert_gate", 4),
            None
        );
        assert_eq!(p.router_rows("model.layers.3.mlp.gate", 1), None);
        let c = p.config(&serde_json::json!({"num_experts": 4, "top_k": 1}));
        assert_eq!(c["num_experts"], 3);
    }
}
