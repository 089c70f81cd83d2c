//! Turning `--ram SIZE` into per-layer expert capacities.
//!
//! The budget covers the process: dense tensors (read into owned memory),
//! pinned experts, a working reserve ([`runtime_reserve`]) and the cache.
//! What is left after the first three is split evenly
//! over MoE layers in expert slots; each layer's slot size is its own mean
//! decoded expert size (mixed precision makes layers differ).

use mfx_formats::pack::Pack;
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BudgetError {
    #[error(
        "a RAM budget of {budget} bytes is below what {pack} must keep resident: dense weights {dense} + pinned experts {pinned} = at least {min} bytes ({min_mib} MiB)"
    )]
    TooSmall {
        pack: String,
        budget: u64,
        dense: u64,
        pinned: u64,
        min: u64,
        min_mib: u64,
    },
}

/// Memory the runtime needs besides weights (KV cache, activations, I/O
/// buffers in flight, allocator slack): 1/16 of the budget, at least 64 MiB.
/// It is part of `--ram`, in `mfx prep`'s planning and in the runtime's cache
/// sizing alike. (Measured: with the budget counting weights only, a
/// 2048-token prompt peaked at budget + 125 MiB on the 8-layer
/// Qwen3-30B-A3B-shaped pack and was OOM-killed in a cgroup of the budget's
/// size.) Known short: proportional to the budget, while the working set is
/// the KV cache plus one prefill chunk's activations (~137 MiB for that
/// prompt), so `--ram` equal to a 1391 MiB cgroup still OOMs on it; sizing
/// the reserve from the model's shapes and context is the fix.
pub fn runtime_reserve(ram: u64) -> u64 {
    (ram / 16).max(64 << 20)
}

/// What a budget buys.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BudgetPlan {
    pub budget_bytes: u64,
    pub dense_bytes: u64,
    pub pinned_bytes: u64,
    /// [`runtime_reserve`] of the budget, left out of the cache.
    pub reserve_bytes: u64,
    pub cache_bytes: u64,
    /// Per model layer: cached experts besides pinned ones (0 for dense layers).
    pub capacity: Vec<usize>,
    /// Per model layer: routed experts in the pack.
    pub experts: Vec<usize>,
}

/// Free memory (Linux `MemAvailable`) minus a margin for KV cache,
/// activations and the OS: the default budget when `--ram` is absent.
pub fn detect_budget() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let avail = kb * 1024;
    let margin = (avail / 10).max(512 << 20);
    Some(avail.saturating_sub(margin))
}

/// Splits `budget` bytes for `pack` (a model of `n_layers` layers).
pub fn plan_budget(
    pack: &Pack,
    n_layers: usize,
    budget: u64,
    pin: bool,
) -> Result<BudgetPlan, BudgetError> {
    let m = pack.manifest();
    let dense: u64 = m.tensors.iter().map(|t| t.length).sum();
    let pins = if pin {
        super::pinned_from_manifest(pack)
    } else {
        Vec::new()
    };
    let pinned: u64 = pins
        .iter()
        .filter_map(|&(l, e)| pack.expert(l as u32, e as u32))
        .map(|e| e.raw_length)
        .sum();
    let min = dense + pinned;
    if budget < min {
        return Err(BudgetError::TooSmall {
            pack: pack.path().display().to_string(),
            budget,
            dense,
            pinned,
            min,
            min_mib: min.div_ceil(1 << 20),
        });
    }
    let mut experts = vec![0usize; n_layers];
    let mut bytes = vec![0u64; n_layers];
    for e in &m.experts {
        if let Some(l) = experts.get_mut(e.layer as usize) {
            *l += 1;
            bytes[e.layer as usize] += e.raw_length;
        }
    }
    let moe_layers = experts.iter().filter(|&&n| n > 0).count().max(1) as u64;
    let reserve = runtime_reserve(budget);
    let cache = budget.saturating_sub(min + reserve);
    let per_layer = cache / moe_layers;
    let capacity = (0..n_layers)
        .map(|l| {
            if experts[l] == 0 {
                return 0;
            }
            let mean = (bytes[l] / experts[l] as u64).max(1);
            let pinned_here = pins.iter().filter(|p| p.0 == l).count();
            ((per_layer / mean) as usize).min(experts[l] - pinned_here.min(experts[l]))
        })
        .collect();
    Ok(BudgetPlan {
        budget_bytes: budget,
        dense_bytes: dense,
        pinned_bytes: pinned,
        reserve_bytes: reserve,
        cache_bytes: cache,
        capacity,
        experts,
    })
}
