//! Measures this machine's memory read bandwidth, the bound for decode-time
//! matvec (every weight byte is read once per token). Run through
//! `scripts/membw.sh`; the kernel benchmark states its GB/s as a fraction of
//! the read-sum number printed here.
//!
//! Usage: `membw [MIB]` (default 1024 MiB, far larger than any cache).

use rayon::prelude::*;
use std::time::Instant;

/// Sums u64 words with 8 independent lanes so the loop is load-bound, not
/// add-latency-bound; `black_box` keeps the compiler from skipping it.
fn read_sum(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in buf.chunks_exact(8) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*v);
        }
    }
    acc.iter().fold(0u64, |s, v| s.wrapping_add(*v))
}

fn best_of<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let words = mib * 1024 * 1024 / 8;
    // Touch every page (and make the contents non-trivial) before timing.
    let src: Vec<u64> = (0..words as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let mut dst = vec![0u64; words];
    dst.iter_mut().for_each(|v| *v = 1);
    let bytes = (words * 8) as f64;
    let max_threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("buffer {mib} MiB, best of 5");
    for threads in [1usize, 2, max_threads]
        .into_iter()
        .filter(|&t| t <= max_threads)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("cannot build a {threads}-thread pool: {e}");
                continue;
            }
        };
        let chunk = words.div_ceil(threads);
        let t_read = pool.install(|| {
            best_of(5, || {
                let s: u64 = src
                    .par_chunks(chunk)
                    .map(read_sum)
                    .reduce(|| 0, |a, b| a.wrapping_add(b));
                std::hint::black_box(s);
            })
        });
        let t_copy = pool.install(|| {
            best_of(5, || {
                dst.par_chunks_mut(chunk)
                    .zip(src.par_chunks(chunk))
                    .for_each(|(d, s)| d.copy_from_slice(s));
                std::hint::black_box(&dst);
            })
        });
        println!(
            "threads {threads}: read-sum {:6.1} GB/s   memcpy {:6.1} GB/s (read+write bytes)",
            bytes / t_read / 1e9,
            2.0 * bytes / t_copy / 1e9
        );
    }
}
