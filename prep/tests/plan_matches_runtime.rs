//! Issue 17: `mfx prep` sizes the cache with the runtime's budget split, so
//! the slots its plan (and the model card's predicted hit rate) counts are
//! the slots `mfx run --ram` gives the cache of the pack it wrote. Checked
//! by loading each written pack through the runtime's own loader at the
//! same `--ram` and reading the capacities its expert cache was opened with.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns: a panic is the failure report

use mfx_prep::{run, Options};
use mfx_runtime::cache::CacheOptions;
use mfx_runtime::load;
use mfx_runtime::models::LoadOptions;
use std::path::{Path, PathBuf};

fn shared() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")).to_path_buf()
}

/// Preps the tiny model at each budget (with `hot_fraction`) and checks
/// every pack's plan against the runtime's cache.
fn check(rams: &[(&str, u64)], hot_fraction: Option<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        model: shared()
            .join("models/tiny-qwen3-moe-coder")
            .display()
            .to_string(),
        rams: rams.iter().map(|&(l, b)| (l.to_string(), b)).collect(),
        output: dir.path().join("tiny-{ram}.mfx").display().to_string(),
        calib: vec![shared().join("data/c.val.txt")],
        calib_rows: 2,
        calib_seq: 128,
        hot_fraction,
        model_card: false,
        ..Options::default()
    };
    let outcome = run(&opts, &|_| {}).unwrap();
    assert_eq!(outcome.packs.len(), rams.len());
    let mut streamed_somewhere = false;
    for rep in &outcome.packs {
        let lopts = LoadOptions {
            cache: CacheOptions {
                ram: Some(rep.ram),
                ..CacheOptions::default()
            },
            ..LoadOptions::default()
        };
        let model = load::load(Path::new(&rep.path), &lopts).unwrap();
        let capacities = model.expert_cache().expect("a pack streams").capacities();
        for lp in &rep.plan.layers {
            assert_eq!(
                capacities[lp.layer as usize], lp.cache_slots,
                "{} layer {}: prep planned {} slots, the runtime gives {} (all {capacities:?})",
                rep.ram_label, lp.layer, lp.cache_slots, capacities[lp.layer as usize]
            );
            // A layer whose streamed experts do not all fit is one where the
            // split (not the cap at the streamed count) decided the slots.
            streamed_somewhere |= lp.pinned.len() + lp.cache_slots < 64;
        }
        let total =
            rep.plan.dense_bytes + rep.plan.pinned_bytes + rep.plan.reserve + rep.plan.cache_bytes;
        assert_eq!(
            total, rep.ram,
            "the plan splits exactly --ram {}",
            rep.ram_label
        );
    }
    assert!(
        streamed_somewhere,
        "no budget made experts stream: the test would not tell formulas apart"
    );
}

/// Mixed hot (4-bit) and cold (2-bit) experts, at a budget near the minimum
/// and a larger one.
#[test]
fn prep_plans_the_slots_the_runtime_gives() {
    check(&[("70M", 70 << 20), ("76M", 76 << 20)], None);
}

/// Every expert cold: the runtime's expert buffers are cold-sized, and the
/// plan must size its reserve for them, not for hot experts it does not have.
#[test]
fn prep_plans_the_runtime_slots_with_no_hot_experts() {
    check(&[("70M", 70 << 20)], Some(0.0));
}
