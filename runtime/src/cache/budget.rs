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
/// `working`: the model's working set ([`WorkingShape::bytes`]) when known;
/// `io_threads`: the cache's readers, whose buffers (one in flight each,
/// plus the [`pooled_buffers`] kept for reuse) sit outside the cached experts.
pub fn plan_budget(
    pack: &Pack,
    n_layers: usize,
    budget: u64,
    pin: bool,
    working: Option<u64>,
    io_threads: usize,
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
    let largest = m.experts.iter().map(|e| e.raw_length).max().unwrap_or(0);
    let io_buffers = (pooled_buffers(io_threads) + io_threads) as u64;
    let reserve = runtime_reserve(budget).max(working.unwrap_or(0) + io_buffers * largest);
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
