//! `mfx verify PACK`: recompute every checksum and check that all padding is
//! zero; exit 1 naming the first bad tensor, expert or padding range. A
//! truncated or foreign file, or one that is not a regular file (a FIFO
//! would block forever), already fails at open.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use mfx_formats::pack::Pack;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .mfx pack to check.
    pub pack: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let pack = Pack::open(&args.pack)
        .with_context(|| format!("cannot open pack {}", args.pack.display()))?;
    let r = pack
        .verify()
        .with_context(|| format!("{} failed verification", args.pack.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "ok: {} — header, manifest, {} tensors, {} expert blobs ({} merged entries), {} padding bytes (all zero) verified; {:.1} MiB in {:.2} s ({:.2} GB/s)",
        args.pack.display(),
        r.tensors,
        r.expert_blobs,
        r.merged_experts,
        r.padding_bytes,
        r.bytes_checked as f64 / (1 << 20) as f64,
        secs,
        r.bytes_checked as f64 / secs.max(1e-9) / 1e9
    );
    Ok(())
}
