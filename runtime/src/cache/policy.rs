//! Which resident expert to drop when a layer's slots are full.
//!
//! One policy instance per layer: capacities and access patterns differ per
//! layer, and keeping the state apart avoids a global lock.

use std::collections::HashMap;

/// Decides eviction for one layer. `touch` is called on every use (hit or
/// fresh load), `victim` picks among `candidates` (resident, not pinned).
pub trait EvictionPolicy: Send {
    fn touch(&mut self, expert: usize);
    fn remove(&mut self, expert: usize);
    fn victim(&mut self, candidates: &[usize]) -> Option<usize>;
}

/// Which policy to build (CLI `--policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// Least recently used.
    #[default]
    Lru,
    /// Least frequently used, counts halved every `half_life` uses, so a
    /// topic change (code -> prose) can displace formerly hot experts.
    LfuDecay,
}

impl PolicyKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lru" => Some(PolicyKind::Lru),
            "lfu" | "lfu-decay" => Some(PolicyKind::LfuDecay),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::LfuDecay => "lfu-decay",
        }
    }

    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            PolicyKind::Lru => Box::<Lru>::default(),
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

/// Least frequently used with exponential decay of the counts.
pub struct LfuDecay {
    half_life: u64,
    uses: u64,
    count: HashMap<usize, f64>,
}

impl LfuDecay {
    pub fn new(half_life: u64) -> Self {
        LfuDecay {
            half_life: half_life.max(1),
            uses: 0,
            count: HashMap::new(),
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
    }
    fn remove(&mut self, _expert: usize) {
        // Frequency survives eviction: a re-loaded expert keeps its history.
    }
    fn victim(&mut self, candidates: &[usize]) -> Option<usize> {
        candidates.iter().copied().min_by(|a, b| {
            let ca = self.count.get(a).copied().unwrap_or(0.0);
            let cb = self.count.get(b).copied().unwrap_or(0.0);
            ca.total_cmp(&cb).then(a.cmp(b))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_least_recent() {
        let mut p = Lru::default();
        for e in [1, 2, 3, 1] {
            p.touch(e);
        }
        assert_eq!(p.victim(&[1, 2, 3]), Some(2));
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
