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
        "a RAM budget of {budget} bytes ({budget_mib} MiB) cannot hold {what}: dense weights {dense} + pinned experts {pinned} + a cache of one token's experts per MoE layer {min_cache} + the working reserve {reserve} (KV cache, prompt activations, I/O buffers, the process itself); the minimum is {min} bytes ({min_mib} MiB)"
    )]
    TooSmall {
        what: String,
        budget: u64,
        budget_mib: u64,
        dense: u64,
        pinned: u64,
        min_cache: u64,
        /// The working reserve at the minimum budget.
        reserve: u64,
        min: u64,
        min_mib: u64,
    },
    /// No `--ram` and no way to read free memory.
    #[error(
        "cannot detect free memory (no MemAvailable in /proc/meminfo); pass --ram SIZE or --capacity N"
    )]
    Undetected,
}

/// What a model must hold in memory whatever the budget: the inputs of the
/// one budget arithmetic ([`minimum_budget`], [`reserve_for`]) that `mfx
/// run`/`serve`/`eval`/`bench` (through [`plan_budget`]), `mfx plan` and
/// `mfx prep` (its `minimum_ram`) all use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// Resident weights: a pack's dense tensors (or, for a checkpoint
    /// directory, every tensor: its experts are not streamed).
    pub dense: u64,
    /// Pinned experts.
    pub pinned: u64,
    /// The least expert cache: one token's routed experts (top_k) per MoE
    /// layer. Below it a single token re-reads experts it just evicted.
    pub min_cache: u64,
    /// The model's working set ([`WorkingShape::bytes`]) plus the expert
    /// buffers that live outside the cache's slots ([`transient_expert_bytes`]).
    pub working: u64,
    /// Prompt-cache slots asked for (`mfx serve --slot-ram`): other
    /// sessions' KV and recurrent state. Not part of the minimum: the slots
    /// get what the budget holds above it, up to this ([`split_budget`]).
    pub slots: u64,
}

impl Needs {
    /// Dense + pinned + the minimum cache: what the budget holds besides its reserve.
    pub fn resident(&self) -> u64 {
        self.dense + self.pinned + self.min_cache
    }
}

/// The working reserve of a budget of `budget` bytes: [`runtime_reserve`]'s
/// proportional floor, or the model's measured-shape working set when larger.
pub fn reserve_for(budget: u64, working: u64) -> u64 {
    runtime_reserve(budget).max(working)
}

/// The least budget that holds `n`: the smallest `ram` with
/// `ram >= n.resident() + reserve_for(ram, n.working)`. Every budget below
/// it is refused ([`BudgetError::TooSmall`]) rather than taken out of the
/// cache, which is what let `--ram` be exceeded (issue 16).
pub fn minimum_budget(n: &Needs) -> u64 {
    let base = n.resident();
    // reserve_for is max(64 MiB, ram/16, working): solve each branch.
    let fixed = base + (64u64 << 20).max(n.working);
    let proportional = (base * 16).div_ceil(15);
    fixed.max(proportional)
}

/// Expert-sized buffers alive outside the cache's slots, each at most
/// `largest` bytes: the [`pooled_buffers`] kept for reuse, one read in
/// flight per I/O thread, one expert held by each compute thread while it
/// runs (a miss may be evicted while still in use), and the pending load of
/// the current and the next layer that a zero-slot layer keeps until use.
pub fn transient_expert_bytes(largest: u64, io_threads: usize, threads: usize) -> u64 {
    (pooled_buffers(io_threads) + io_threads + threads.max(1) + 2) as u64 * largest
}

/// The proportional floor of the working reserve: 1/16 of the budget, at
/// least 64 MiB. `mfx prep` plans with it (it does not know the context a
/// pack will run at); the runtime reserves at least this much, and more
/// when the model's [`WorkingShape`] needs more (see [`plan_budget`]).
/// (Measured: with the budget counting weights only, a 2048-token prompt
/// peaked at budget + 125 MiB on the 8-layer Qwen3-30B-A3B-shaped pack and
/// was OOM-killed in a cgroup of the budget's size.)
pub fn runtime_reserve(ram: u64) -> u64 {
    (ram / 16).max(64 << 20)
}

/// Context positions the working reserve covers when the caller sets no
/// `--max-context`: a model's trained context (40k-256k) would reserve
/// gigabytes of KV cache up front that most sessions never use, so the
/// reserve covers llama.cpp's default `-c`; longer sessions should say so.
pub const RESERVED_CONTEXT_DEFAULT: usize = 4096;

/// The process itself: binary, stacks, tokenizer, allocator slack.
const PROCESS_BASE: u64 = 48 << 20;

/// What a model needs besides weights, from its shapes; each family fills
/// this from its config. Upper bounds, not exact counts: the budget is a
/// limit the process must stay under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkingShape {
    pub hidden: u64,
    pub vocab: u64,
    /// KV cache bytes per context position, all layers (k and v, at the
    /// KV precision in use).
    pub kv_bytes_per_token: u64,
    /// Per-sequence state of fixed size (DeltaNet recurrent and conv state).
    pub state_bytes: u64,
    /// Widths of q, k and v together (one attention layer's projections).
    pub qkv: u64,
    pub top_k: u64,
    pub expert_inter: u64,
    pub shared_inter: u64,
    pub experts: u64,
}

impl WorkingShape {
    /// Activation bytes one prompt position holds during a forward chunk
    /// with `threads` compute threads: the residual stream and its normed
    /// copy, attention's projections and output, every routed slot's output
    /// (all live until the MoE combine), the gate/up intermediates of the
    /// experts in flight (one per thread, each at most the whole chunk),
    /// router logits; all f32.
    pub fn activation_bytes_per_token(&self, threads: usize) -> u64 {
        let in_flight = self.top_k.min(threads.max(1) as u64);
        4 * ((6 + self.top_k) * self.hidden
            + 2 * self.qkv
            + 3 * in_flight * self.expert_inter
            + 3 * self.shared_inter
            + 2 * self.experts)
    }

    /// Bytes for a sequence of up to `context` positions whose prompts run
    /// in chunks of `chunk` positions on `threads` threads.
    pub fn bytes(&self, context: usize, chunk: usize, threads: usize) -> u64 {
        let (context, chunk) = (context as u64, chunk.min(context.max(1)) as u64);
        PROCESS_BASE
            + 2 * 4 * self.vocab
            + self.kv_bytes_per_token * context
            + self.state_bytes
            + self.activation_bytes_per_token(threads) * chunk
    }
}

/// Free read buffers the cache keeps for reuse with `io_threads` readers
/// (each may also have one in flight): they sit outside the cache's slots,
/// so the working reserve counts them.
pub fn pooled_buffers(io_threads: usize) -> usize {
    2 * io_threads + 2
}

/// What a budget buys.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BudgetPlan {
    pub budget_bytes: u64,
    pub dense_bytes: u64,
    pub pinned_bytes: u64,
    /// The working reserve left out of the cache: the larger of
    /// [`runtime_reserve`] and the model's working set plus I/O buffers.
    pub reserve_bytes: u64,
    /// Prompt-cache slots granted: [`Needs::slots`], or less where the
    /// expert cache would fall below its minimum.
    pub slot_bytes: u64,
    pub cache_bytes: u64,
    /// Per model layer: cached experts besides pinned ones (0 for dense layers).
    pub capacity: Vec<usize>,
    /// Per model layer: routed experts in the pack.
    pub experts: Vec<usize>,
}

/// Free memory (Linux `MemAvailable`, capped by the process's memory
/// cgroup limit inside a container) minus a margin for KV cache,
/// activations and the OS: the default budget when `--ram` is absent or
/// `auto`.
pub fn detect_budget() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let mut avail = kb * 1024;
    // MemAvailable is the machine's; a cgroup's limit is the real ceiling.
    if let Some(limit) = crate::pressure::cgroup_limit() {
        avail = avail.min(limit);
    }
    let margin = (avail / 10).max((512u64 << 20).min(avail / 4));
    Some(avail.saturating_sub(margin))
}

/// One model layer as the budget sees it: its routed experts (0 for a
/// dense layer), their decoded bytes in all, and how many of them are
/// pinned. The runtime reads these from a pack ([`pack_layers`]); `mfx prep`
/// builds them from its plan before writing the pack, so both split a
/// budget with the same arithmetic ([`needs_of`], [`split_budget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerExperts {
    pub experts: usize,
    pub bytes: u64,
    pub pinned: usize,
}

impl LayerExperts {
    /// The mean decoded expert: a layer's cache slot (mixed precision makes
    /// experts of one layer differ; the mean is what a full cache holds).
    fn slot(&self) -> u64 {
        (self.bytes / self.experts.max(1) as u64).max(1)
    }

    /// Experts that stream through the cache (not pinned).
    fn streamed(&self) -> usize {
        self.experts - self.pinned.min(self.experts)
    }
}

/// The [`Needs`] of a model with these `layers` routing `top_k` experts
/// per token: `dense` and `pinned` bytes resident, `working` bytes of
/// working set (expert buffers included).
pub fn needs_of(
    layers: &[LayerExperts],
    dense: u64,
    pinned: u64,
    top_k: usize,
    working: u64,
) -> Needs {
    let moe = layers.iter().filter(|l| l.experts > 0);
    // The cache is split evenly over MoE layers, so the minimum gives every
    // layer room for top_k of its own (mean-sized) experts, not pinned ones.
    let per_layer_min = moe
        .clone()
        .map(|l| top_k.min(l.streamed()) as u64 * l.slot())
        .max()
        .unwrap_or(0);
    Needs {
        dense,
        pinned,
        min_cache: moe.count() as u64 * per_layer_min,
        working,
        slots: 0,
    }
}

/// Splits `budget` over a model of `layers` that needs `needs`: the
/// reserve ([`reserve_for`]) and resident weights first, the rest evenly
/// over MoE layers in slots of each layer's mean expert. A budget below
/// [`minimum_budget`] is refused naming `what` (the pack).
pub fn split_budget(
    budget: u64,
    needs: &Needs,
    layers: &[LayerExperts],
    what: impl FnOnce() -> String,
) -> Result<BudgetPlan, BudgetError> {
    if budget < minimum_budget(needs) {
        return Err(too_small(what(), budget, needs));
    }
    let moe_layers = layers.iter().filter(|l| l.experts > 0).count().max(1) as u64;
    let reserve = reserve_for(budget, needs.working);
    let cache = budget - (needs.dense + needs.pinned + reserve);
    // Slots come out of what the cache has above its minimum, never below.
    let slots = needs.slots.min(cache.saturating_sub(needs.min_cache));
    let cache = cache - slots;
    let per_layer = cache / moe_layers;
    let capacity = layers
        .iter()
        .map(|l| {
            if l.experts == 0 {
                return 0;
            }
            ((per_layer / l.slot()) as usize).min(l.streamed())
        })
        .collect();
    Ok(BudgetPlan {
        budget_bytes: budget,
        dense_bytes: needs.dense,
        pinned_bytes: needs.pinned,
        reserve_bytes: reserve,
        slot_bytes: slots,
        cache_bytes: cache,
        capacity,
        experts: layers.iter().map(|l| l.experts).collect(),
    })
}

/// Per model layer of `pack` (`n_layers` layers): its [`LayerExperts`],
/// counting the manifest's pins when `pin`; and the pinned experts' bytes.
pub fn pack_layers(pack: &Pack, n_layers: usize, pin: bool) -> (Vec<LayerExperts>, u64) {
    let mut layers = vec![LayerExperts::default(); n_layers];
    for e in &pack.manifest().experts {
        if let Some(l) = layers.get_mut(e.layer as usize) {
            l.experts += 1;
            l.bytes += e.raw_length;
        }
    }
    let pins = if pin {
        super::pinned_from_manifest(pack)
    } else {
        Vec::new()
    };
    let mut pinned = 0u64;
    for &(l, e) in &pins {
        if let Some(x) = pack.expert(l as u32, e as u32) {
            pinned += x.raw_length;
        }
        if let Some(layer) = layers.get_mut(l) {
            layer.pinned += 1;
        }
    }
    (layers, pinned)
}

/// The [`Needs`] of `pack` (a model of `n_layers` layers routing `top_k`
/// experts per token) whose working set is `working` bytes
/// ([`WorkingShape::bytes`], 0 when unknown), with `io_threads` readers
/// and `threads` compute threads.
pub fn pack_needs(
    pack: &Pack,
    n_layers: usize,
    top_k: usize,
    pin: bool,
    working: u64,
    io_threads: usize,
    threads: usize,
) -> Needs {
    let (layers, pinned) = pack_layers(pack, n_layers, pin);
    needs_of(
        &layers,
        dense_bytes(pack),
        pinned,
        top_k,
        working + pack_buffers(pack, io_threads, threads),
    )
}

/// A pack's dense tensors as stored (read into owned memory at load).
fn dense_bytes(pack: &Pack) -> u64 {
    pack.manifest().tensors.iter().map(|t| t.length).sum()
}

/// [`transient_expert_bytes`] for the pack's largest decoded expert.
fn pack_buffers(pack: &Pack, io_threads: usize, threads: usize) -> u64 {
    let largest = pack
        .manifest()
        .experts
        .iter()
        .map(|e| e.raw_length)
        .max()
        .unwrap_or(0);
    transient_expert_bytes(largest, io_threads, threads)
}

/// Splits `budget` bytes for `pack` (a model of `n_layers` layers, routing
/// `top_k` experts per token). `working`: the model's working set
/// ([`WorkingShape::bytes`]) when known; `slots`: prompt-cache slot bytes
/// asked for ([`Needs::slots`]); `io_threads`: the cache's readers;
/// `threads`: compute threads. A budget below [`minimum_budget`] is refused
/// with that minimum: the reserve is never taken out of the cache.
#[allow(clippy::too_many_arguments)] // each is one of the budget's inputs; a struct would only rename them
pub fn plan_budget(
    pack: &Pack,
    n_layers: usize,
    top_k: usize,
    budget: u64,
    pin: bool,
    working: Option<u64>,
    slots: u64,
    io_threads: usize,
    threads: usize,
) -> Result<BudgetPlan, BudgetError> {
    let (layers, pinned) = pack_layers(pack, n_layers, pin);
    let working = working.unwrap_or(0) + pack_buffers(pack, io_threads, threads);
    let needs = Needs {
        slots,
        ..needs_of(&layers, dense_bytes(pack), pinned, top_k, working)
    };
    split_budget(budget, &needs, &layers, || {
        pack.path().display().to_string()
    })
}

/// The refusal of `budget` for `what` (a pack or checkpoint path), stating
/// the minimum of `needs`.
pub fn too_small(what: String, budget: u64, needs: &Needs) -> BudgetError {
    let min = minimum_budget(needs);
    BudgetError::TooSmall {
        what,
        budget,
        budget_mib: budget >> 20,
        dense: needs.dense,
        pinned: needs.pinned,
        min_cache: needs.min_cache,
        reserve: reserve_for(min, needs.working),
        min,
        min_mib: min.div_ceil(1 << 20),
    }
}

/// `--ram` for a model whose weights are all resident (a checkpoint
/// directory: experts are mapped, not streamed, and a mapped file's pages
/// count against a memory cgroup like owned memory): refused unless it
/// holds every tensor plus the working reserve.
pub fn check_resident_budget(
    what: &std::path::Path,
    budget: Option<u64>,
    weights: u64,
    working: u64,
) -> Result<(), BudgetError> {
    let Some(budget) = budget else {
        return Ok(());
    };
    let needs = Needs {
        dense: weights,
        pinned: 0,
        min_cache: 0,
        working,
        slots: 0,
    };
    if budget < minimum_budget(&needs) {
        return Err(too_small(what.display().to_string(), budget, &needs));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_budget_holds_its_own_reserve() {
        for (base, working) in [
            (0u64, 0u64),
            (10 << 20, 0),
            (900 << 20, 100 << 20),
            (4 << 30, 300 << 20),
        ] {
            let n = Needs {
                dense: base,
                pinned: 0,
                min_cache: 0,
                working,
                slots: 0,
            };
            let m = minimum_budget(&n);
            assert!(m >= base + reserve_for(m, working), "{base} {working}: {m}");
            // ... and it is the least such budget (to the byte).
            assert!(
                m - 1 < base + reserve_for(m - 1, working),
                "{base} {working}: {m}"
            );
        }
    }

    /// Prompt-cache slots (issue 19) come out of the cache above its
    /// minimum: granted in full where that leaves the minimum, cut to it
    /// where not, and never a reason to refuse a budget.
    #[test]
    fn slots_take_only_what_the_cache_has_above_its_minimum() {
        let layers = vec![
            LayerExperts {
                experts: 8,
                bytes: 8 << 20,
                pinned: 0,
            };
            4
        ];
        let base = needs_of(&layers, 100 << 20, 0, 2, 10 << 20);
        let min = minimum_budget(&base);
        let asked = Needs {
            slots: 64 << 20,
            ..base
        };
        // At the minimum: no slots, the budget is still accepted.
        let p = split_budget(min, &asked, &layers, || "x".into()).expect("minimum accepted");
        assert_eq!(p.slot_bytes, 0);
        // 16 MiB above it: 16 MiB of slots (the reserve grows by 1/16 of it).
        let b = min + (16 << 20);
        let p = split_budget(b, &asked, &layers, || "x".into()).expect("plan");
        let without = split_budget(b, &base, &layers, || "x".into()).expect("plan");
        assert_eq!(p.slot_bytes + p.cache_bytes, without.cache_bytes);
        assert_eq!(p.cache_bytes, base.min_cache);
        // Plenty: the slots get all they asked for.
        let p = split_budget(min + (1 << 30), &asked, &layers, || "x".into()).expect("plan");
        assert_eq!(p.slot_bytes, 64 << 20);
        assert_eq!(
            p.dense_bytes + p.pinned_bytes + p.reserve_bytes + p.slot_bytes + p.cache_bytes,
            p.budget_bytes
        );
    }
}
