//! Stage 2: which experts to pin. Per layer, experts sorted by routing mass
//! (summed gate weight; ties by count, then id) are taken until their share
//! of the layer's mass reaches the threshold, capped by what the budget allows.

/// Expert ids of one layer in descending routing mass (the order every
/// later stage uses: pinning, hot/cold bits, predicted hit rate).
pub fn mass_order(gate_mass: &[f64], counts: &[u64]) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..gate_mass.len() as u32).collect();
    ids.sort_by(|&a, &b| {
        let (a, b) = (a as usize, b as usize);
        gate_mass[b]
            .total_cmp(&gate_mass[a])
            .then(counts[b].cmp(&counts[a]))
            .then(a.cmp(&b))
    });
    ids
}

/// The smallest prefix of `mass_order` whose mass reaches `threshold` of the
/// total, at most `cap` experts (`cap` = 0: no cap).
pub fn pin_by_mass(gate_mass: &[f64], counts: &[u64], threshold: f64, cap: usize) -> Vec<u32> {
    let order = mass_order(gate_mass, counts);
    let total: f64 = gate_mass.iter().sum();
    let mut out = Vec::new();
    let mut acc = 0.0;
    for id in order {
        if total <= 0.0 || acc >= threshold * total || (cap > 0 && out.len() >= cap) {
            break;
        }
        acc += gate_mass[id as usize];
        out.push(id);
    }
    out
}

/// Share of a layer's routed tokens that land on the `resident` most-used
/// experts: the hit rate of a cache that keeps exactly those resident (an
/// upper bound for an LRU cache of the same size, reached when routing is
/// stationary).
pub fn hit_rate(counts: &[u64], resident: usize) -> f64 {
    let mut c: Vec<u64> = counts.to_vec();
    c.sort_unstable_by(|a, b| b.cmp(a));
    let total: u64 = c.iter().sum();
    if total == 0 {
        return 0.0;
    }
    c.iter().take(resident).sum::<u64>() as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_until_threshold() {
        let m = [0.1, 5.0, 3.0, 2.0];
        let c = [1, 50, 30, 20];
        assert_eq!(mass_order(&m, &c), vec![1, 2, 3, 0]);
        // total 10.1: 5.0 < 5.05 so two experts are needed for 50%.
        assert_eq!(pin_by_mass(&m, &c, 0.5, 0), vec![1, 2]);
        assert_eq!(pin_by_mass(&m, &c, 0.49, 0), vec![1]);
        assert_eq!(pin_by_mass(&m, &c, 1.0, 0), vec![1, 2, 3, 0]);
        assert_eq!(pin_by_mass(&m, &c, 1.0, 2), vec![1, 2]);
        assert_eq!(pin_by_mass(&[0.0; 3], &[0; 3], 0.9, 0), Vec::<u32>::new());
    }

    #[test]
    fn hit_rate_counts_top_experts() {
        assert_eq!(hit_rate(&[10, 30, 60, 0], 1), 0.6);
        assert_eq!(hit_rate(&[10, 30, 60, 0], 2), 0.9);
        assert_eq!(hit_rate(&[10, 30, 60, 0], 9), 1.0);
    }
}
