//! The streaming expert cache: run MoE models whose experts do not fit in
//! RAM. Dense weights stay with the model; routed experts come from
//! [`ExpertCache`], an [`crate::experts::ExpertProvider`] that keeps pinned
//! experts resident, caches up to a per-layer capacity of the others
//! (eviction by [`policy`]), and reads misses from the `.mfx` pack with
//! positioned reads into recycled aligned buffers ([`io`], [`buf`]).

pub mod budget;
pub mod buf;
pub mod dense;
pub mod io;
pub mod options;
pub mod policy;
pub mod prefetch;
pub mod size;
pub mod stats;
pub mod store;

pub use budget::{
    check_resident_budget, detect_budget, minimum_budget, needs_of, pack_layers, pack_needs,
    plan_budget, pooled_buffers, reserve_for, runtime_reserve, split_budget, too_small,
    transient_expert_bytes, BudgetError, BudgetPlan, LayerExperts, Needs, WorkingShape,
    RESERVED_CONTEXT_DEFAULT,
};
pub use options::{check_expert_shapes, provider_for_open_pack, provider_for_pack, CacheOptions};
pub use policy::{EvictionPolicy, PolicyKind};
pub use prefetch::NextHint;
pub use size::{human, parse_size, SizeError};
pub use stats::{CacheStats, StatsSnapshot};
pub use store::{pinned_from_manifest, CacheConfig, Capacity, ExpertCache, RoutedPass};
