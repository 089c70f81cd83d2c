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
    /// Secondary experts skipped because they were not resident (`--skip-missing`).
    pub skipped: AtomicU64,
    /// Experts predicted for a next layer (summed over predictions).
    pub predicted: AtomicU64,
    /// Of those, routed to by the pass that followed.
    pub predicted_used: AtomicU64,
    /// Experts routed to in passes that had a prediction.
    pub routed_predicted: AtomicU64,
    /// Reads started by predictions (not yet resident when predicted).
    pub hint_loads: AtomicU64,
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
    pub predicted: u64,
    pub predicted_used: u64,
    pub routed_predicted: u64,
    pub hint_loads: u64,
    /// `predicted_used / predicted` (0 when nothing was predicted).
    pub prefetch_precision: f64,
    /// `predicted_used / routed_predicted` (0 when nothing was predicted).
    pub prefetch_recall: f64,
    /// Gauges, not counters (filled by [`super::ExpertCache::stats`]; `since`
    /// keeps the later value): bytes of pinned and cached experts now, and
    /// the cache's slots now, which memory pressure moves (`--ram auto`).
    pub resident_bytes: u64,
    pub slots: u64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

impl CacheStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let hits = self.hits.load(Relaxed);
        let misses = self.misses.load(Relaxed);
        let total = hits + misses;
        let predicted = self.predicted.load(Relaxed);
        let used = self.predicted_used.load(Relaxed);
        let routed = self.routed_predicted.load(Relaxed);
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
            predicted,
            predicted_used: used,
            routed_predicted: routed,
            hint_loads: self.hint_loads.load(Relaxed),
            prefetch_precision: ratio(used, predicted),
            prefetch_recall: ratio(used, routed),
            resident_bytes: 0,
            slots: 0,
        }
    }

    pub fn add(&self, c: &AtomicU64, v: u64) {
        c.fetch_add(v, Relaxed);
    }
}

impl StatsSnapshot {
    /// The counters accumulated since `earlier` (ratios recomputed).
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let hits = d(self.hits, earlier.hits);
        let misses = d(self.misses, earlier.misses);
        let predicted = d(self.predicted, earlier.predicted);
        let used = d(self.predicted_used, earlier.predicted_used);
        let routed = d(self.routed_predicted, earlier.routed_predicted);
        StatsSnapshot {
            hits,
            misses,
            prefetched: d(self.prefetched, earlier.prefetched),
            loads: d(self.loads, earlier.loads),
            bytes_read: d(self.bytes_read, earlier.bytes_read),
            evictions: d(self.evictions, earlier.evictions),
            stall_ms: (self.stall_ms - earlier.stall_ms).max(0.0),
            skipped: d(self.skipped, earlier.skipped),
            hit_rate: if hits + misses == 0 {
                1.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            predicted,
            predicted_used: used,
            routed_predicted: routed,
            hint_loads: d(self.hint_loads, earlier.hint_loads),
            prefetch_precision: ratio(used, predicted),
            prefetch_recall: ratio(used, routed),
            resident_bytes: self.resident_bytes,
            slots: self.slots,
        }
    }
}
