//! Counters the cache keeps for `--stats`, `mfx bench` and the plan model.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Misses whose load a `prefetch` had already started.
    pub prefetched: AtomicU64,
    pub loads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub evictions: AtomicU64,
    /// Nanoseconds `get` spent waiting for loads (summed over threads).
    pub stall_ns: AtomicU64,
    pub skipped: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StatsSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub prefetched: u64,
    pub loads: u64,
    pub bytes_read: u64,
    pub evictions: u64,
    pub stall_ms: f64,
    pub skipped: u64,
    pub hit_rate: f64,
}

impl CacheStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let hits = self.hits.load(Relaxed);
        let misses = self.misses.load(Relaxed);
        let total = hits + misses;
        StatsSnapshot {
            hits,
            misses,
            prefetched: self.prefetched.load(Relaxed),
            loads: self.loads.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            stall_ms: self.stall_ns.load(Relaxed) as f64 / 1e6,
            skipped: self.skipped.load(Relaxed),
            hit_rate: if total == 0 {
                1.0
            } else {
                hits as f64 / total as f64
            },
        }
    }

    pub fn add(&self, c: &AtomicU64, v: u64) {
        c.fetch_add(v, Relaxed);
    }
}
