//! Stage 4 (memory side): what fits in `--ram`. Picks each expert's bit
//! width (hot or cold) by routing mass and the experts to pin, then sizes
//! the cache with the runtime's own budget split ([`split_budget`]) over
//! the pack it is about to write, so the predicted hit rate is for the
//! slots `mfx run --ram` will give the cache.

use crate::error::{PrepError, Result};
use crate::pin::{hit_rate, mass_order};
use mfx_runtime::cache::human;
use serde::Serialize;

/// The runtime's working reserve inside `--ram` (one definition, the runtime's).
pub use mfx_runtime::cache::runtime_reserve;
use mfx_runtime::cache::{minimum_budget, needs_of, split_budget, LayerExperts, Needs};

/// Working cache wanted beyond the pinned experts, in multiples of top_k per
/// layer: 4x holds the current token's experts plus recent ones, so a token
/// that reuses a neighbour's experts hits; 1x is the floor (one token's experts).
pub const CACHE_TOPK_FACTOR: usize = 4;

/// Routing mass that is always kept at hot bits when the hot set is chosen
/// automatically, however small the budget: half of the traffic at full quality.
pub const MIN_HOT_MASS: f64 = 0.5;

/// Per-layer routing numbers the planner needs (from the profile).
pub struct LayerUse<'a> {
    pub layer: u32,
    pub counts: &'a [u64],
    pub gate_mass: &'a [f64],
    /// With merging: each expert id's representative (an alias is stored as
    /// its representative's blob, at its bits). `None`: no merging.
    pub alias_of: Option<&'a [u32]>,
}

pub struct PlanInput<'a> {
    pub ram: u64,
    pub dense_bytes: u64,
    /// Bytes of one expert at hot / cold bits (all projections).
    pub hot_bytes: u64,
    pub cold_bytes: u64,
    /// The runtime's working set at its default context ([`working_bytes`]),
    /// without expert buffers.
    pub working: u64,
    /// Expert-sized buffers the runtime keeps outside the cache's slots
    /// ([`expert_buffers`]); each is as large as the pack's largest expert.
    pub expert_buffers: u64,
    pub top_k: usize,
    pub experts: usize,
    pub layers: Vec<LayerUse<'a>>,
    /// `--hot-fraction`: fraction of each layer's experts at hot bits.
    pub hot_fraction: Option<f64>,
    /// Pin experts in mass order until this share of the layer's mass.
    pub pin_mass: f64,
}

impl PlanInput<'_> {
    /// The working set with buffers for the larger of a hot and a cold
    /// expert: what the runtime reserves at most, before the plan is known.
    pub fn working_bound(&self) -> u64 {
        self.working + self.expert_buffers * self.hot_bytes.max(self.cold_bytes)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerPlan {
    pub layer: u32,
    /// Expert ids stored at hot bits (the rest are cold).
    pub hot: Vec<u32>,
    /// Expert ids kept resident by the runtime, descending mass.
    pub pinned: Vec<u32>,
    /// Cache slots for streamed experts: what the runtime's budget split
    /// gives this layer of the written pack at this `--ram`.
    pub cache_slots: usize,
    pub predicted_hit_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub ram: u64,
    pub reserve: u64,
    pub dense_bytes: u64,
    pub pinned_bytes: u64,
    pub cache_bytes: u64,
    pub minimum_ram: u64,
    pub hot_fraction: f64,
    pub all_resident: bool,
    /// Token-weighted mean over layers.
    pub predicted_hit_rate: f64,
    pub layers: Vec<LayerPlan>,
    /// One or two sentences on why this split was chosen.
    pub reason: String,
}

/// What any pack of the model needs at least, before hot sets and pins are
/// chosen: dense weights, a cache of one token's experts (top_k) in each of
/// `moe_layers` layers at `expert_bytes` each, and `working` bytes of
/// working set (expert buffers included). Its [`minimum_budget`] is the
/// runtime's, so a budget prep accepts is one `mfx run` accepts.
pub fn model_needs(
    dense_bytes: u64,
    expert_bytes: u64,
    top_k: usize,
    moe_layers: usize,
    working: u64,
) -> Needs {
    Needs {
        dense: dense_bytes,
        pinned: 0,
        min_cache: moe_layers as u64 * top_k as u64 * expert_bytes,
        working,
        slots: 0,
    }
}

/// Refuses `ram` (spelled `label`) for a model at `what` that needs `needs`.
pub fn check_ram(ram: u64, label: &str, what: &str, needs: &Needs) -> Result<()> {
    if ram < minimum_budget(needs) {
        return Err(PrepError::Budget {
            ram: label.to_string(),
            budget: mfx_runtime::cache::too_small(what.to_string(), ram, needs),
        });
    }
    Ok(())
}

/// The working bytes `mfx run` reserves for `family` at its defaults
/// (f16 KV, 4096 positions, 512-token prompt chunks) on this machine's
/// threads, without expert buffers ([`expert_buffers`]).
pub fn working_bytes(family: &mfx_runtime::models::family::FamilyConfig) -> u64 {
    use mfx_runtime::models::{working, KvBits, LoadOptions};
    let shape = working::family(family, KvBits::F16);
    working::bytes(
        &shape,
        family.max_position_embeddings(),
        &LoadOptions::default(),
    )
}

/// How many expert-sized buffers `mfx run` keeps outside the cache's slots
/// at its defaults on this machine ([`mfx_runtime::cache::transient_expert_bytes`]
/// is linear in the expert size).
pub fn expert_buffers() -> u64 {
    mfx_runtime::cache::transient_expert_bytes(
        1,
        mfx_runtime::cache::CacheOptions::default().io_threads,
        rayon::current_num_threads(),
    )
}

/// One layer's choices before the cache is sized.
struct Chosen {
    hot: Vec<u32>,
    pinned: Vec<u32>,
    /// Decoded bytes of each expert id as the pack will store it.
    bytes: Vec<u64>,
    pinned_bytes: u64,
}

pub fn plan(inp: &PlanInput<'_>) -> Result<Plan> {
    let nl = inp.layers.len();
    let e = inp.experts;
    let bound = model_needs(
        inp.dense_bytes,
        inp.hot_bytes.max(inp.cold_bytes),
        inp.top_k,
        nl,
        inp.working_bound(),
    );
    check_ram(inp.ram, &human(inp.ram), "the model", &bound)?;
    let min = minimum_budget(&bound);
    // Hot sets and pins are chosen against the upper bound of the reserve;
    // the cache is then sized for the pack these choices make.
    let reserve = mfx_runtime::cache::reserve_for(inp.ram, inp.working_bound());
    let avail = inp.ram - reserve - inp.dense_bytes;
    let everything_hot = nl as u64 * e as u64 * inp.hot_bytes;
    let all_resident = inp.hot_fraction.is_none() && everything_hot <= avail;
    // How many experts per layer fit resident at hot bits after the working cache.
    let cache_want = (CACHE_TOPK_FACTOR * inp.top_k).min(e);
    let per_layer = avail / nl.max(1) as u64;
    let fit_hot = (per_layer / inp.hot_bytes.max(1)).saturating_sub(cache_want as u64) as usize;

    let mut chosen = Vec::with_capacity(nl);
    let mut hot_total = 0usize;
    for lu in &inp.layers {
        let order = mass_order(lu.gate_mass, lu.counts);
        let total_mass: f64 = lu.gate_mass.iter().sum();
        let n_hot = match inp.hot_fraction {
            Some(f) => ((f * e as f64).round() as usize).min(e),
            None if all_resident => e,
            None => {
                let mut acc = 0.0;
                let mut need = 0;
                for &id in &order {
                    if total_mass <= 0.0 || acc >= MIN_HOT_MASS * total_mass {
                        break;
                    }
                    acc += lu.gate_mass[id as usize];
                    need += 1;
                }
                fit_hot.min(e).max(need)
            }
        };
        let hot: Vec<u32> = order[..n_hot].to_vec();
        hot_total += n_hot;
        let mut is_hot = vec![false; e];
        for &h in &hot {
            is_hot[h as usize] = true;
        }
        // An alias is stored as its representative (at the representative's bits).
        let bytes: Vec<u64> = (0..e)
            .map(|id| {
                let rep = lu
                    .alias_of
                    .and_then(|m| m.get(id))
                    .map_or(id, |&r| r as usize);
                if is_hot.get(rep).copied().unwrap_or(false) {
                    inp.hot_bytes
                } else {
                    inp.cold_bytes
                }
            })
            .collect();
        // While pinning, room is kept for a cache of the largest expert that
        // may stream in (the final slot count comes from the runtime's split).
        let slot = if n_hot < e {
            inp.cold_bytes
                .max(if n_hot > 0 { inp.hot_bytes } else { 0 })
        } else {
            inp.hot_bytes
        };
        let min_cache = inp.top_k.min(e) as u64 * slot;
        let want_cache = cache_want as u64 * slot;
        // Pin in mass order while the working cache still fits; stop at pin_mass.
        let mut used = 0u64;
        let mut pinned = Vec::new();
        let mut acc = 0.0;
        for (rank, &id) in order.iter().enumerate() {
            let reach = if all_resident { 1.0 } else { inp.pin_mass };
            if total_mass > 0.0 && acc >= reach * total_mass && !all_resident {
                break;
            }
            let b = bytes[id as usize];
            let remaining_after = e - rank - 1;
            let cache_need = if remaining_after == 0 {
                0
            } else {
                want_cache
                    .min(remaining_after as u64 * slot)
                    .max(min_cache.min(remaining_after as u64 * slot))
            };
            if used + b + cache_need > per_layer {
                break;
            }
            used += b;
            acc += lu.gate_mass[id as usize];
            pinned.push(id);
        }
        chosen.push(Chosen {
            hot,
            pinned,
            bytes,
            pinned_bytes: used,
        });
    }

    // The cache: the runtime's split of this budget over the pack as it
    // will be written (its experts' sizes, its pins, its largest expert).
    let experts: Vec<LayerExperts> = chosen
        .iter()
        .map(|c| LayerExperts {
            experts: c.bytes.len(),
            bytes: c.bytes.iter().sum(),
            pinned: c.pinned.len(),
        })
        .collect();
    let pinned_bytes: u64 = chosen.iter().map(|c| c.pinned_bytes).sum();
    let largest = chosen
        .iter()
        .flat_map(|c| c.bytes.iter().copied())
        .max()
        .unwrap_or(0);
    let needs = needs_of(
        &experts,
        inp.dense_bytes,
        pinned_bytes,
        inp.top_k,
        inp.working + inp.expert_buffers * largest,
    );
    let split = split_budget(inp.ram, &needs, &experts, || "the planned pack".into()).map_err(
        |budget| PrepError::Budget {
            ram: human(inp.ram),
            budget,
        },
    )?;

    let (mut hit_num, mut hit_den) = (0f64, 0f64);
    let mut layers = Vec::with_capacity(nl);
    for ((lu, c), &slots) in inp.layers.iter().zip(chosen).zip(&split.capacity) {
        let hr = hit_rate(lu.counts, c.pinned.len() + slots);
        let toks: u64 = lu.counts.iter().sum();
        hit_num += hr * toks as f64;
        hit_den += toks as f64;
        layers.push(LayerPlan {
            layer: lu.layer,
            hot: c.hot,
            pinned: c.pinned,
            cache_slots: slots,
            predicted_hit_rate: hr,
        });
    }
    let hot_fraction = if nl == 0 || e == 0 {
        1.0
    } else {
        hot_total as f64 / (nl * e) as f64
    };
    let mut reason = String::new();
    if let Some(f) = inp.hot_fraction {
        reason.push_str(&format!(
            "--hot-fraction {f} given: the most-used {:.0}% of each layer's experts by routing mass are at hot bits. ",
            f * 100.0
        ));
    } else if all_resident {
        reason.push_str(&format!(
            "every expert fits in RAM at hot bits ({} of {} available after dense weights and reserve), so all are hot and pinned. ",
            human(everything_hot),
            human(avail)
        ));
    } else {
        reason.push_str(&format!(
            "not all experts fit at hot bits ({} needed, {} available): the experts that fit resident at hot bits beside a {}-slot cache per layer \
             are hot, and at least those carrying {:.0}% of each layer's routing mass; the rest are cold and stream from disk. ",
            human(everything_hot),
            human(avail),
            cache_want,
            MIN_HOT_MASS * 100.0
        ));
    }
    let hit = if hit_den > 0.0 {
        hit_num / hit_den
    } else {
        0.0
    };
    Ok(Plan {
        ram: inp.ram,
        reserve: split.reserve_bytes,
        dense_bytes: inp.dense_bytes,
        pinned_bytes,
        cache_bytes: split.cache_bytes,
        minimum_ram: min,
        hot_fraction,
        all_resident,
        predicted_hit_rate: hit,
        layers,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer<'a>(counts: &'a [u64], mass: &'a [f64]) -> LayerUse<'a> {
        LayerUse {
            layer: 0,
            counts,
            gate_mass: mass,
            alias_of: None,
        }
    }

    #[test]
    fn too_small_names_the_minimum() {
        let c = [10u64; 8];
        let m = [1.0; 8];
        let inp = PlanInput {
            ram: 100 << 20,
            dense_bytes: 90 << 20,
            hot_bytes: 1 << 20,
            cold_bytes: 1 << 19,
            working: 0,
            expert_buffers: 0,
            top_k: 2,
            experts: 8,
            layers: vec![layer(&c, &m)],
            hot_fraction: None,
            pin_mass: 0.9,
        };
        // dense 90 MiB + one layer's top-2 hot experts 2 MiB + the 64 MiB reserve floor.
        let err = plan(&inp).unwrap_err();
        let PrepError::Budget {
            budget: mfx_runtime::cache::BudgetError::TooSmall { min, .. },
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(*min, 156 << 20);
        let e = err.to_string();
        assert!(e.contains("minimum is") && e.contains("156 MiB"), "{e}");
    }

    #[test]
    fn everything_fits_is_all_hot_and_pinned() {
        let c = [5u64, 1, 0, 2];
        let m = [5.0, 1.0, 0.0, 2.0];
        let inp = PlanInput {
            ram: 1 << 30,
            dense_bytes: 1 << 20,
            hot_bytes: 1 << 20,
            cold_bytes: 1 << 19,
            working: 0,
            expert_buffers: 0,
            top_k: 2,
            experts: 4,
            layers: vec![layer(&c, &m)],
            hot_fraction: None,
            pin_mass: 0.5,
        };
        let p = plan(&inp).unwrap();
        assert!(p.all_resident);
        assert_eq!(p.layers[0].hot.len(), 4);
        assert_eq!(p.layers[0].pinned, vec![0, 3, 1, 2]);
        assert_eq!(p.predicted_hit_rate, 1.0);
    }

    #[test]
    fn tight_budget_pins_the_heavy_experts_and_keeps_a_cache() {
        // 16 experts, 1 MiB each hot; room for ~10 per layer after reserve.
        let counts: Vec<u64> = (0..16).map(|i| 100 - i * 6).collect();
        let mass: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
        let inp = PlanInput {
            ram: (64 << 20) + (10 << 20) + (1 << 20),
            dense_bytes: 1 << 20,
            hot_bytes: 1 << 20,
            cold_bytes: 1 << 19,
            working: 0,
            expert_buffers: 0,
            top_k: 2,
            experts: 16,
            layers: vec![layer(&counts, &mass)],
            hot_fraction: Some(0.25),
            pin_mass: 0.9,
        };
        let p = plan(&inp).unwrap();
        let l = &p.layers[0];
        assert_eq!(l.hot, vec![0, 1, 2, 3]);
        assert!(l.cache_slots >= 2, "{l:?}");
        assert_eq!(l.pinned[0], 0);
        assert!(
            p.dense_bytes + p.pinned_bytes + p.cache_bytes + p.reserve <= inp.ram,
            "{p:?}"
        );
        assert!(p.predicted_hit_rate > 0.5 && p.predicted_hit_rate < 1.0);
    }
}
