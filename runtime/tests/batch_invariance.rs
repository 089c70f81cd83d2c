//! Batch invariance: a token's logits must not depend on how the sequence
//! was cut into forward calls (whole prompt, chunks, one token at a time).
//! Speculative decoding verifies drafts in one batched forward and must
//! give exactly the greedy tokens of one-token decode; prefix reuse and
//! several sequences batched together rely on the same property.
//!
//! The kernels guarantee it per product (tests/kernels.rs
//! `rows_do_not_depend_on_the_batch`); attention guarantees it when cached
//! and fresh keys are the same numbers, i.e. with the f32 KV cache. With
//! the default f16 cache a prompt's own keys are read in f32 and earlier
//! ones in f16, so splits differ by f16 rounding (the test below shows
//! that it does).
#![allow(clippy::unwrap_used)]

use mfx_runtime::kernels;
use mfx_runtime::models::{KvBits, LoadOptions, Model, MoeModel};
use std::path::PathBuf;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-qwen3-moe-coder-mlx-4bit")
}

/// The first logit that differs between a split run and the whole run.
fn split_diff(m: &mut MoeModel, prompt: &[u32], split: usize) -> Option<(usize, f32, f32)> {
    m.reset();
    let whole = m.forward(prompt, true).unwrap();
    m.reset();
    let mut got = Vec::new();
    for c in prompt.chunks(split) {
        got.extend(m.forward(c, true).unwrap());
    }
    got.iter()
        .zip(&whole)
        .enumerate()
        .find(|(_, (x, y))| x.to_bits() != y.to_bits())
        .map(|(i, (x, y))| (i, *x, *y))
}

fn prompt() -> Vec<u32> {
    (0..40u32).map(|i| (i * 37 + 11) % 4000 + 5).collect()
}

#[test]
fn logits_do_not_depend_on_the_batch_split_with_f32_kv() {
    let opts = LoadOptions {
        kv_bits: KvBits::F32,
        ..Default::default()
    };
    let mut m = MoeModel::load(&model_dir(), &opts).unwrap();
    let vocab = m.info().vocab_size;
    for split in [1usize, 3, 8, 13] {
        if let Some((i, x, y)) = split_diff(&mut m, &prompt(), split) {
            panic!(
                "tier {}: chunks of {split}: logit {} of position {} is {x}, whole {y}",
                kernels::backend().name(),
                i % vocab,
                i / vocab
            );
        }
    }
}

/// The f16 cache's split dependence is real (so the test above could fail
/// for the KV reason alone): a documented cost, not a hidden one.
#[test]
fn f16_kv_makes_splits_differ() {
    let mut m = MoeModel::load(&model_dir(), &LoadOptions::default()).unwrap();
    assert!(split_diff(&mut m, &prompt(), 1).is_some());
}
