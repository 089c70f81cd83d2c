//! Top-k selection in the order transformers' reference makes it on the
//! CPU, ties included: torch's CPU `topk` pairs each value with its index
//! and runs libstdc++'s `std::nth_element` (introselect: median-of-three
//! partitions, insertion sort below four elements, heap select past the
//! depth limit) with the comparator "NaN first, then greater", or
//! `std::partial_sort` (heap select) when `64 k <= len`. Which of several
//! equal values end up in the top k is decided by that algorithm alone.
//!
//! Why reproduce it: DeepSeek sparse attention's indexer scores are a sum
//! of relu'd terms, so keys where every head's score is cut to zero tie
//! exactly, and which of them a query keeps changes its attention. Any
//! fixed rule (say, the earlier position wins) is as defensible, but only
//! this one gives transformers' numbers. Like torch, the choice among
//! ties depends on the whole row searched, so on how a sequence was split
//! into forward calls; without ties at the cut it is just the k largest.

/// One element: (value, original index).
type E = (f32, u32);

/// torch's comparator for `largest=True`: `a` goes before `b`.
#[inline]
fn before(a: &E, b: &E) -> bool {
    (a.0.is_nan() && !b.0.is_nan()) || a.0 > b.0
}

/// The indices of the `k` largest of `values` as torch's CPU `topk`
/// selects them, in ascending index order. All indices when `k >= len`.
pub fn torch_topk(values: &[f32], k: usize) -> Vec<u32> {
    let n = values.len();
    if k >= n {
        return (0..n as u32).collect();
    }
    let mut a: Vec<E> = values.iter().copied().zip(0u32..).collect();
    if k > 0 {
        if k * 64 <= n {
            heap_select(&mut a, k);
        } else {
            nth_element(&mut a, k - 1);
        }
    }
    let mut out: Vec<u32> = a[..k].iter().map(|e| e.1).collect();
    out.sort_unstable();
    out
}

/// libstdc++'s `__introselect` over the whole slice.
fn nth_element(a: &mut [E], nth: usize) {
    let (mut first, mut last) = (0, a.len());
    if first == last || nth == last {
        return;
    }
    // 2 * floor(log2(len)), as `std::__lg(len) * 2`.
    let mut depth = 2 * (usize::BITS - 1 - last.leading_zeros()) as usize;
    while last - first > 3 {
        if depth == 0 {
            heap_select(&mut a[first..last], nth + 1 - first);
            a.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(a, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(&mut a[first..last]);
}

/// Median of `a[first + 1]`, the middle and the last moved to `first`,
/// then an unguarded partition of the rest around it.
fn partition_pivot(a: &mut [E], first: usize, last: usize) -> usize {
    let mid = first + (last - first) / 2;
    let (x, y, z) = (first + 1, mid, last - 1);
    let m = if before(&a[x], &a[y]) {
        if before(&a[y], &a[z]) {
            y
        } else if before(&a[x], &a[z]) {
            z
        } else {
            x
        }
    } else if before(&a[x], &a[z]) {
        x
    } else if before(&a[y], &a[z]) {
        z
    } else {
        y
    };
    a.swap(first, m);
    let (mut lo, mut hi, pivot) = (first + 1, last, first);
    loop {
        while before(&a[lo], &a[pivot]) {
            lo += 1;
        }
        hi -= 1;
        while before(&a[pivot], &a[hi]) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        a.swap(lo, hi);
        lo += 1;
    }
}

/// libstdc++'s `__insertion_sort`.
fn insertion_sort(a: &mut [E]) {
    for i in 1..a.len() {
        let v = a[i];
        if before(&v, &a[0]) {
            a.copy_within(0..i, 1);
            a[0] = v;
        } else {
            let mut j = i;
            while before(&v, &a[j - 1]) {
                a[j] = a[j - 1];
                j -= 1;
            }
            a[j] = v;
        }
    }
}

/// libstdc++'s `__heap_select`: the first `middle` elements become the
/// top `middle` (as a heap whose root is the smallest of them).
fn heap_select(a: &mut [E], middle: usize) {
    make_heap(a, middle);
    for i in middle..a.len() {
        if before(&a[i], &a[0]) {
            // __pop_heap(first, middle, i)
            let v = a[i];
            a[i] = a[0];
            adjust_heap(a, 0, middle, v);
        }
    }
}

fn make_heap(a: &mut [E], len: usize) {
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let v = a[parent];
        adjust_heap(a, parent, len, v);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

fn adjust_heap(a: &mut [E], mut hole: usize, len: usize, v: E) {
    let top = hole;
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if before(&a[child], &a[child - 1]) {
            child -= 1;
        }
        a[hole] = a[child];
        hole = child;
    }
    if len & 1 == 0 && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        a[hole] = a[child - 1];
        hole = child - 1;
    }
    // __push_heap(first, hole, top, v)
    while hole > top {
        let parent = (hole - 1) / 2;
        if !before(&a[parent], &v) {
            break;
        }
        a[hole] = a[parent];
        hole = parent;
    }
    a[hole] = v;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct values: exactly the k largest, whichever path runs
    /// (introselect below 64 k elements, heap select above).
    #[test]
    fn distinct_values_give_the_k_largest() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for n in [1usize, 2, 3, 4, 5, 9, 20, 33, 100, 700] {
            let v: Vec<f32> = (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 + i as f32 / 1024.0
                })
                .collect();
            for k in [1usize, 2, 3, 8, 10, n] {
                let k = k.min(n);
                let mut want: Vec<u32> = (0..n as u32).collect();
                want.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]));
                want.truncate(k);
                want.sort_unstable();
                assert_eq!(torch_topk(&v, k), want, "n {n} k {k}");
            }
        }
    }

    /// Ties are decided by the algorithm, not by a rule. The expected sets
    /// come from a line-by-line Python transcription of the same libstdc++
    /// routines, which with the fixtures' indexers reproduces transformers'
    /// logits of deepseek_v32 and glm_moe_dsa (7.5e-7 relative) and greedy
    /// tokens, where "earlier position wins" or "later wins" miss both.
    #[test]
    fn ties_follow_introselect() {
        let cases: [(&[f32], usize, &[u32]); 6] = [
            (&[0.0, 0.0, 0.5, 1.0, 0.0], 3, &[2, 3, 4]),
            (
                &[
                    0.0, -0.25, 0.0, 0.0, -0.25, 0.0, -0.25, 0.0, 0.0, 0.0, 0.5, 0.5,
                ],
                8,
                &[0, 2, 3, 7, 8, 9, 10, 11],
            ),
            (
                &[
                    0.0, 0.0, 0.0, -0.25, 0.5, 0.0, -0.25, 0.0, 0.0, 1.0, 1.0, -0.25, 0.0, -0.25,
                    -0.25, 0.5, 0.0, 0.0, 0.0, -0.25,
                ],
                8,
                &[1, 4, 9, 10, 12, 15, 17, 18],
            ),
            (
                &[
                    0.0, 0.0, 0.5, 0.0, -0.25, 0.0, -0.25, 0.0, -0.25, 1.0, 0.0, 0.0, -0.25, -0.25,
                    1.0, 0.0, 0.0, 0.0, -0.25, 1.0, 0.0,
                ],
                8,
                &[2, 9, 11, 14, 16, 17, 19, 20],
            ),
            (
                &[
                    -0.25, 0.0, -0.25, 0.0, 0.5, 1.0, -0.25, 0.5, 0.0, 0.5, -0.25, 0.5, 0.0, 0.0,
                    0.0, 0.0, 1.0, 0.0, 0.0, -0.25, 0.0, -0.25, 0.5, 0.0, 1.0, 0.5, 0.0, -0.25,
                    0.0, 0.0, -0.25, 0.5, 0.0, 0.0, 0.0, 0.5,
                ],
                8,
                &[5, 7, 9, 11, 16, 24, 25, 31],
            ),
            (
                &[
                    0.5, 0.0, 1.0, 0.0, -0.25, -0.25, 0.0, 0.0, 1.0, 0.0, -0.25, 0.5, -0.25,
                ],
                8,
                &[0, 1, 2, 3, 7, 8, 9, 11],
            ),
        ];
        for (v, k, want) in cases {
            assert_eq!(torch_topk(v, k), want, "{v:?}");
        }
        // Masked (-inf) entries only fill up; NaN counts as largest.
        let v = [1.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
        assert_eq!(torch_topk(&v, 2), vec![0, 1]);
        assert_eq!(torch_topk(&[2.0, f32::NAN, 3.0], 1), vec![1]);
    }
}
