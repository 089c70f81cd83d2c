//! What a user asks of the cache (`--ram`, `--capacity`, `--policy`, ...)
//! and the one place that turns it into an [`ExpertCache`] over a pack.
//!
//! Every family that loads from a pack calls [`provider_for_pack`], so that
//! `--ram` means the same thing (dense + pinned + cache bytes) whatever the
//! architecture, and the budget errors read the same everywhere.

use super::budget::{detect_budget, plan_budget, BudgetError};
use super::policy::PolicyKind;
use super::store::{CacheConfig, Capacity, ExpertCache};
use crate::error::RuntimeError;
use mfx_formats::pack::Pack;
use std::path::Path;
use std::sync::Arc;

/// Cache settings carried in [`crate::models::LoadOptions`].
#[derive(Debug, Clone, PartialEq)]
pub struct CacheOptions {
    /// Budget in bytes for all weights (dense + pinned + cache). `None`:
    /// available memory minus a margin ([`detect_budget`]).
    pub ram: Option<u64>,
    /// Experts cached per MoE layer besides the pinned ones; overrides the
    /// split of `ram` (mlx-moe's `--capacity`).
    pub capacity: Option<usize>,
    pub policy: PolicyKind,
    /// Skip a low-weight secondary expert that is not resident instead of
    /// waiting for its read (see `moe_forward`). Changes outputs; off by default.
    pub skip_missing: bool,
    /// Predict the next MoE layer's experts and read them ahead.
    pub prefetch: bool,
    /// Bypass the page cache (O_DIRECT / F_NOCACHE) where the filesystem allows.
    pub direct_io: bool,
    /// Check each blob's xxh3 when it is first read: dense tensors at load,
    /// each expert on its first read into the cache. On by default: a
    /// flipped byte in an uncompressed blob otherwise computes silently wrong
    /// output (issue 16); the hash costs far less than the read
    /// (docs/PERF.md). `--no-verify-checksums` turns it off.
    pub verify: bool,
    /// Keep the pack's pinned experts resident.
    pub pin: bool,
    /// Background reader threads.
    pub io_threads: usize,
    /// The model's working set for the context it will run
    /// ([`super::WorkingShape::bytes`]); the model loaders fill this in, so
    /// `--ram` leaves room for KV cache and activations as well as weights.
    pub working_bytes: Option<u64>,
    /// Experts each token routes to; the minimum cache holds this many per
    /// MoE layer. Filled in by the model loaders with `working_bytes`.
    pub top_k: usize,
    /// Shrink the cache when others need memory and grow it back after
    /// ([`crate::pressure`]; `--ram auto` or `--adapt`).
    pub adapt: bool,
    /// Prompt-cache slot bytes asked for (`mfx serve --slot-ram`); the plan
    /// grants what the budget holds above its minimum, up to this, and the
    /// cache carries the grant ([`ExpertCache::slot_ram`]).
    pub slot_bytes: u64,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            ram: None,
            capacity: None,
            policy: PolicyKind::default(),
            skip_missing: false,
            prefetch: true,
            direct_io: true,
            verify: true,
            pin: true,
            io_threads: 2,
            working_bytes: None,
            top_k: 1,
            adapt: false,
            slot_bytes: 0,
        }
    }
}

/// Opens `path` and builds its expert cache (see [`provider_for_open_pack`]).
pub fn provider_for_pack(
    path: &Path,
    opts: &CacheOptions,
    n_layers: usize,
) -> Result<Arc<ExpertCache>, RuntimeError> {
    let pack = Pack::open(path).map_err(|e| RuntimeError::Pack {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    provider_for_open_pack(Arc::new(pack), opts, n_layers)
}

/// The routed experts of `pack` (a model of `n_layers` layers) behind a
/// budgeted [`ExpertCache`]. `--capacity` wins over `--ram`; with neither,
/// the budget is detected free memory minus a margin. A budget below the
/// dense weights plus pinned experts is an error stating the minimum.
pub fn provider_for_open_pack(
    pack: Arc<Pack>,
    opts: &CacheOptions,
    n_layers: usize,
) -> Result<Arc<ExpertCache>, RuntimeError> {
    // With --capacity there is no plan: the slots get what was asked.
    let mut granted_slots = opts.slot_bytes;
    let capacity = match opts.capacity {
        Some(n) => Capacity::PerLayer(n),
        None => {
            let budget = match opts.ram {
                Some(b) => b,
                None => detect_budget().ok_or(RuntimeError::Budget {
                    budget: BudgetError::Undetected,
                    hint: String::new(),
                })?,
            };
            let plan = plan_budget(
                &pack,
                n_layers,
                opts.top_k,
                budget,
                opts.pin,
                opts.working_bytes,
                opts.slot_bytes,
                opts.io_threads,
                rayon::current_num_threads(),
            )
            .map_err(|e| {
                let hint = if opts.ram.is_none() {
                    " (budget detected from free memory; free some, or pass --ram / --capacity)"
                } else {
                    ""
                };
                RuntimeError::Budget {
                    budget: e,
                    hint: hint.to_string(),
                }
            })?;
            granted_slots = plan.slot_bytes;
            Capacity::Layers(plan.capacity)
        }
    };
    let cfg = CacheConfig {
        capacity,
        policy: opts.policy,
        direct_io: opts.direct_io,
        verify_checksums: opts.verify,
        io_threads: opts.io_threads,
        pin: opts.pin,
        skip_missing: opts.skip_missing,
        prefetch_next: opts.prefetch,
        adaptive: opts.adapt,
    };
    let cache = Arc::new(ExpertCache::open(pack, n_layers, &cfg)?);
    cache.set_slot_ram(granted_slots);
    if opts.adapt {
        // The floor is the budget's minimum: top_k slots per MoE layer.
        let full = cache.capacities();
        let floor = full
            .iter()
            .map(|&c| if c == 0 { 0 } else { opts.top_k.max(1) })
            .collect();
        crate::pressure::Governor::new(full, floor)
            .spawn(&cache)
            .map_err(|e| {
                RuntimeError::Other(format!("cannot start the memory-pressure thread: {e}"))
            })?;
    }
    Ok(cache)
}

/// Checks every routed expert's part shapes against the model's dimensions
/// (gate/up `[inter, hidden]`, down `[hidden, inter]`) at load, so that a
/// mismatched pack fails naming the expert before any token is run rather
/// than when the cache first reads it.
pub fn check_expert_shapes(pack: &Pack, hidden: usize, inter: usize) -> Result<(), RuntimeError> {
    let (h, i) = (hidden as u64, inter as u64);
    for e in &pack.manifest().experts {
        for (name, want) in [
            ("gate_proj", [i, h]),
            ("up_proj", [i, h]),
            ("down_proj", [h, i]),
        ] {
            let got = e
                .part_index(name)
                .map(|k| e.parts[k].shape.clone())
                .ok_or_else(|| RuntimeError::Pack {
                    path: pack.path().to_path_buf(),
                    msg: format!("{}: no part `{name}`", e.label()),
                })?;
            if got != want {
                return Err(RuntimeError::Pack {
                    path: pack.path().to_path_buf(),
                    msg: format!(
                        "{} {name}: shape {got:?}, the model's config needs {want:?}",
                        e.label()
                    ),
                });
            }
        }
    }
    Ok(())
}
