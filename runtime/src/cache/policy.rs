//! Which resident expert to drop when a layer's slots are full.
//!
//! One policy instance per layer: capacities and access patterns differ per
//! layer, and keeping the state apart avoids a global lock.

use std::collections::HashMap;

/// Decides eviction for one layer. `touch` is called on every use (hit or
/// fresh load), `victim` picks among `candidates` (resident, not pinned).
pub trait EvictionPolicy: Send {
    fn touch(&mut self, expert: usize);
    /// An expert entering the cache without being used (a prefetch): by
    /// default it counts as a use.
    fn admit(&mut self, expert: usize) {
        self.touch(expert);
    }
    fn remove(&mut self, expert: usize);
    fn victim(&mut self, candidates: &[usize]) -> Option<usize>;
}

/// Which policy to build (CLI `--policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// Least frequently used, counts halved every `half_life` uses, so a
    /// topic change (code -> prose) can displace formerly hot experts. The
    /// default by measurement of bytes read per decoded token: 1-27% fewer
    /// than LRU on the trained tiny model (python/docs/c text, 4/8/16 of 64
    /// slots per layer) and 4-7% fewer on the Qwen3-30B-A3B-shaped
    /// synthetic model at its 50% budget (docs/PERF.md, "Eviction policy"). An MoE layer's experts
    /// differ in popularity for a whole document, and LRU lets each one-off
    /// cold expert push out a frequently used one.
    #[default]
    LfuDecay,
    /// The seeds' layer-depth bias: the same total slots, shifted towards
    /// early MoE layers (see [`depth_capacities`]); LRU within a layer.
    Depth,
}

impl PolicyKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lru" => Some(PolicyKind::Lru),
            "lfu" | "lfu-decay" => Some(PolicyKind::LfuDecay),
            "depth" => Some(PolicyKind::Depth),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::LfuDecay => "lfu-decay",
            PolicyKind::Depth => "depth",
        }
    }

    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            PolicyKind::Lru | PolicyKind::Depth => Box::<Lru>::default(),
            PolicyKind::LfuDecay => Box::new(LfuDecay::new(256)),
        }
    }
}

/// Least recently used, by a logical clock.
#[derive(Default)]
pub struct Lru {
    clock: u64,
    last: HashMap<usize, u64>,
}

impl EvictionPolicy for Lru {
    fn touch(&mut self, expert: usize) {
        self.clock += 1;
        self.last.insert(expert, self.clock);
    }
    fn remove(&mut self, expert: usize) {
        self.last.remove(&expert);
    }
    fn victim(&mut self, candidates: &[usize]) -> Option<usize> {
        candidates
            .iter()
            .copied()
            .min_by_key(|e| (self.last.get(e).copied().unwrap_or(0), *e))
    }
}

/// Least frequently used with exponential decay of the counts; among equal
/// counts (common right after a halving) the least recently used goes.
pub struct LfuDecay {
    half_life: u64,
    uses: u64,
    count: HashMap<usize, f64>,
    last: HashMap<usize, u64>,
}

impl LfuDecay {
    pub fn new(half_life: u64) -> Self {
        LfuDecay {
            half_life: half_life.max(1),
            uses: 0,
            count: HashMap::new(),
            last: HashMap::new(),
        }
    }
}

impl EvictionPolicy for LfuDecay {
    fn touch(&mut self, expert: usize) {
        self.uses += 1;
        if self.uses.is_multiple_of(self.half_life) {
            for c in self.count.values_mut() {
                *c *= 0.5;
            }
        }
        *self.count.entry(expert).or_insert(0.0) += 1.0;
        self.last.insert(expert, self.uses);
    }
    fn admit(&mut self, expert: usize) {
        self.count.entry(expert).or_insert(0.0);
    }
    fn remove(&mut self, _expert: usize) {
        // Frequency survives eviction: a re-loaded expert keeps its history.
    }
    fn victim(&mut self, candidates: &[usize]) -> Option<usize> {
        candidates.iter().copied().min_by(|a, b| {
            let ca = self.count.get(a).copied().unwrap_or(0.0);
            let cb = self.count.get(b).copied().unwrap_or(0.0);
            let la = self.last.get(a).copied().unwrap_or(0);
            let lb = self.last.get(b).copied().unwrap_or(0);
            ca.total_cmp(&cb).then(la.cmp(&lb)).then(a.cmp(b))
        })
    }
}

/// How much more an early layer gets than the last under [`PolicyKind::Depth`]:
/// MoE layer `i` of `m` gets slots in proportion to `1 + DEPTH_BIAS * (m-1-i)/(m-1)`,
/// so the first MoE layer has `1 + DEPTH_BIAS` times the last one's share.
pub const DEPTH_BIAS: f64 = 1.0;

/// Redistributes the slots of `caps` (per model layer; `usize::MAX` and
/// zero-expert layers untouched) towards early layers, keeping their sum and
/// never giving a layer more than `max[l]` (its evictable experts). Slots a
/// layer cannot take go to the next-earliest layer that can.
pub fn depth_capacities(caps: &[usize], max: &[usize]) -> Vec<usize> {
    let moe: Vec<usize> = (0..caps.len())
        .filter(|&l| max.get(l).copied().unwrap_or(0) > 0 && caps[l] != usize::MAX)
        .collect();
    let mut out = caps.to_vec();
    let m = moe.len();
    if m < 2 {
        return out;
    }
    let total: usize = moe.iter().map(|&l| caps[l].min(max[l])).sum();
    let w: Vec<f64> = (0..m)
        .map(|i| 1.0 + DEPTH_BIAS * (m - 1 - i) as f64 / (m - 1) as f64)
        .collect();
    let wsum: f64 = w.iter().sum();
    let mut given = 0;
    for (i, &l) in moe.iter().enumerate() {
        let c = ((total as f64 * w[i] / wsum).floor() as usize).min(max[l]);
        out[l] = c;
        given += c;
    }
    // Rounding and caps leave slots over: earliest layers first.
    let mut left = total - given;
    while left > 0 {
        let before = left;
        for &l in &moe {
            if left > 0 && out[l] < max[l] {
                out[l] += 1;
                left -= 1;
            }
        }
        if left == before {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_keeps_the_total_and_favours_early_layers() {
        // Dense layer 0, four MoE layers with 4 slots each.
        let caps = [0, 4, 4, 4, 4];
        let max = [0, 60, 60, 60, 60];
        let d = depth_capacities(&caps, &max);
        assert_eq!(d[0], 0);
        assert_eq!(d[1..].iter().sum::<usize>(), 16);
        assert!(d[1] > d[4], "{d:?}");
        assert!(d.windows(2).skip(1).all(|w| w[0] >= w[1]), "{d:?}");
        // A layer at its cap passes its share on (layer 1 can hold only 3,
        // so 3 + 4 + 4 + 4 = 15 slots are shared out).
        let d = depth_capacities(&[0, 4, 4, 4, 4], &[0, 3, 60, 60, 60]);
        assert_eq!(d[1], 3);
        assert_eq!(d[1..].iter().sum::<usize>(), 15, "{d:?}");
        assert!(d[2] > d[4], "{d:?}");
    }

    #[test]
    fn lru_evicts_least_recent() {
        let mut p = Lru::default();
        for e in [1, 2, 3, 1] {
            p.touch(e);
        }
        assert_eq!(p.victim(&[1, 2, 3]), Some(2));
    }

    #[test]
    fn lfu_breaks_ties_by_recency() {
        let mut p = LfuDecay::new(1000);
        for e in [5, 1, 3] {
            p.touch(e);
        }
        // All used once: the oldest use goes, not the lowest id.
        assert_eq!(p.victim(&[1, 3, 5]), Some(5));
        p.touch(5);
        assert_eq!(p.victim(&[1, 3, 5]), Some(1));
    }

    #[test]
    fn lfu_is_the_default() {
        assert_eq!(PolicyKind::default(), PolicyKind::LfuDecay);
        assert_eq!(
            PolicyKind::parse(PolicyKind::default().name()),
            Some(PolicyKind::default())
        );
    }

    #[test]
    fn lfu_evicts_least_frequent_and_decays() {
        let mut p = LfuDecay::new(4);
        for e in [1, 1, 1, 2] {
            p.touch(e);
        }
        assert_eq!(p.victim(&[1, 2]), Some(2));
        // After decay, a burst of expert 2 overtakes expert 1.
        for _ in 0..8 {
            p.touch(2);
        }
        assert_eq!(p.victim(&[1, 2]), Some(1));
    }
}
