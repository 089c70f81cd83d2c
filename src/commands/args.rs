//! Flags several subcommands share, defined once: the expert cache's
//! (`--ram`, `--capacity`, ...) for run, chat, serve, eval and bench, and
//! the value parsers behind them. A flag means the same thing, with the
//! same help text and the same error, wherever it appears.

use mfx_runtime::cache::{parse_size, CacheOptions, PolicyKind};
use mfx_runtime::speculate::SpecOptions;

/// The streaming expert cache's flags (`.mfx` packs only).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CacheArgs {
    /// Memory budget for the whole process (weights, expert cache and a
    /// working reserve), e.g. 32G, 512M. Default: available memory (or the
    /// memory cgroup's limit) minus a margin. `auto`: that default, and the
    /// expert cache shrinks when other programs need memory (--adapt).
    #[arg(long, value_name = "SIZE|auto", value_parser = ram)]
    pub ram: Option<Ram>,
    /// Give expert-cache memory back when other programs need it (memory
    /// pressure: cgroup usage, PSI, MemAvailable; macOS pressure level) and
    /// take it again when they are done. Outputs do not change.
    #[arg(long)]
    pub adapt: bool,
    /// Experts cached per MoE layer besides pinned ones (overrides --ram's split).
    #[arg(long)]
    pub capacity: Option<usize>,
    /// Eviction policy: lfu-decay (default, chosen by measurement of bytes
    /// read: docs/PERF.md), lru or depth.
    #[arg(long, default_value = PolicyKind::default().name(), value_parser = policy)]
    pub policy: PolicyKind,
    /// Skip a non-resident secondary expert instead of waiting for its read
    /// (never the top-1; weights renormalized as the model's routing does).
    /// Changes outputs.
    #[arg(long)]
    pub skip_missing: bool,
    /// Do not predict and read ahead the next layer's experts.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Do not keep the pack's pinned experts resident (measure the cache alone).
    #[arg(long)]
    pub no_pin: bool,
    /// Background expert readers: the reads in flight at once. SSDs and
    /// network disks read faster with more requests queued; each reader
    /// costs one expert-sized buffer of the budget.
    #[arg(long, default_value_t = CacheOptions::default().io_threads)]
    pub io_threads: usize,
    /// Do not check each blob's checksum when it is first read (dense
    /// tensors at load, experts on their first read). Checking is the
    /// default: a corrupt pack is then an error naming the tensor or expert
    /// instead of silently wrong output; its cost is in docs/PERF.md.
    #[arg(long)]
    pub no_verify_checksums: bool,
}

/// Speculative decoding's flags (run, chat, serve).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DraftArgs {
    /// Speculative decoding by prompt lookup: draft up to N tokens per step
    /// from the context (what followed the last earlier occurrence of the
    /// newest 3- or 2-token sequence) and verify them in one forward pass.
    /// The output is the same token for token, greedy or seeded; only the
    /// time changes. Pays when the reply repeats the context (code being
    /// edited). 0: off
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub draft: usize,
    /// Verify every draft, also where that measures slower than plain
    /// decoding (by default a draft is verified only while drafting pays)
    #[arg(long)]
    pub draft_always: bool,
}

impl DraftArgs {
    pub fn options(&self) -> SpecOptions {
        SpecOptions {
            auto_off: !self.draft_always,
            ..SpecOptions::ngram(self.draft)
        }
    }
}

/// `--ram`: a size, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ram {
    Auto,
    Bytes(u64),
}

impl CacheArgs {
    /// The fixed budget, if `--ram` gave one.
    pub fn ram_bytes(&self) -> Option<u64> {
        match self.ram {
            Some(Ram::Bytes(b)) => Some(b),
            Some(Ram::Auto) | None => None,
        }
    }

    pub fn options(&self) -> CacheOptions {
        CacheOptions {
            ram: self.ram_bytes(),
            adapt: self.adapt || self.ram == Some(Ram::Auto),
            capacity: self.capacity,
            policy: self.policy,
            skip_missing: self.skip_missing,
            prefetch: !self.no_prefetch,
            pin: !self.no_pin,
            io_threads: self.io_threads,
            verify: !self.no_verify_checksums,
            ..CacheOptions::default()
        }
    }
}

/// A memory size (`32G`, `512M`, `1.5GiB`; binary units) for clap: a bad
/// one is a usage error naming the flag, before anything is loaded.
pub fn size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.msg.to_string())
}

fn ram(s: &str) -> Result<Ram, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Ram::Auto);
    }
    size(s)
        .map(Ram::Bytes)
        .map_err(|e| format!("{e}; or `auto`"))
}

fn policy(s: &str) -> Result<PolicyKind, String> {
    PolicyKind::parse(s).ok_or_else(|| "expected lru, lfu-decay or depth".to_string())
}
