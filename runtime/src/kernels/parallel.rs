//! Splitting a matmul over output rows: chunk sizes, the single-thread
//! threshold, and the shared output pointer the chunks write through.

use rayon::prelude::*;
use std::ops::Range;

/// Below this much work (weight bytes x inputs) a product stays on the
/// calling thread: rayon's fork/join costs a few microseconds, which is what
/// a whole 256x256 projection of the tiny test models costs.
const PARALLEL_MIN_WORK: usize = 256 << 10;
/// Each task reads at least this many weight bytes (for n = 1), so task
/// overhead stays under a few percent of the memory time.
const MIN_TASK_BYTES: usize = 16 << 10;
/// For many inputs a chunk is reread once per block of 8 inputs; keeping it
/// within L2 makes those rereads cache hits.
const MAX_TASK_BYTES_BATCHED: usize = 256 << 10;

/// `y[i * ld + r]`, shared by tasks that write disjoint row ranges.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    ptr: *mut f32,
    ld: usize,
    n: usize,
}

// SAFETY: tasks only write rows inside their own chunk (see `write`), so no
// two threads touch the same element; the borrow of `y` outlives the scope.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    pub(crate) fn new(y: &mut [f32], n: usize, ld: usize) -> Self {
        assert!(y.len() >= n * ld);
        Out {
            ptr: y.as_mut_ptr(),
            ld,
            n,
        }
    }

    /// # Safety
    /// `r` must lie in the calling task's row range (so writes are disjoint)
    /// and the `y` this was made from must still be borrowed by the caller.
    #[inline(always)]
    pub(crate) unsafe fn write(&self, i: usize, r: usize, v: f32) {
        debug_assert!(i < self.n && r < self.ld);
        // SAFETY: in bounds by the constructor's assertion and i < n, r < ld.
        unsafe { self.ptr.add(i * self.ld + r).write(v) }
    }
}

/// Calls `f` on consecutive row ranges covering `0..rows`, in parallel when
/// the product is big enough.
pub(crate) fn for_row_chunks(
    rows: usize,
    row_bytes: usize,
    n: usize,
    f: impl Fn(Range<usize>) + Sync,
) {
    if rows == 0 || n == 0 {
        return;
    }
    let row_bytes = row_bytes.max(1);
    let total = rows * row_bytes;
    let threads = rayon::current_num_threads().max(1);
    // ~4 tasks per thread balances uneven progress; never below the minimum.
    let mut chunk_bytes = (total / (threads * 4)).max(MIN_TASK_BYTES / n.min(16));
    if n > 8 {
        chunk_bytes = chunk_bytes.min(MAX_TASK_BYTES_BATCHED);
    }
    let chunk_rows = (chunk_bytes / row_bytes).clamp(1, rows);
    let n_chunks = rows.div_ceil(chunk_rows);
    let range = |c: usize| c * chunk_rows..((c + 1) * chunk_rows).min(rows);
    if threads == 1 || n_chunks == 1 || total.saturating_mul(n) < PARALLEL_MIN_WORK {
        (0..n_chunks).for_each(|c| f(range(c)));
    } else {
        (0..n_chunks).into_par_iter().for_each(|c| f(range(c)));
    }
}

/// Runs `f` on one of the current rayon pool's worker threads and blocks the
/// caller until it returns.
///
/// A generation driven from a thread outside the pool makes one thread more
/// than there are workers: every product wakes the workers, and while the
/// driver does serial work (norms, attention, sampling) the idle workers
/// spin and `sched_yield` on the same cores. With `--threads` equal to the
/// cores that cost 10-20% of decode speed, and made it jump between runs.
/// Driven from a worker, the caller sleeps on a latch and the pool is the
/// only thing running, as llama.cpp's main thread is one of its `-t` threads.
/// Called from a worker already, `f` simply runs in place.
pub fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // `scope` executes its body inside the pool (injected when called from
    // outside it); the scope itself spawns nothing.
    rayon::scope(|_| f())
}
