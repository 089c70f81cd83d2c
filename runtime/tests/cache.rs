//! The streaming expert cache against transformers' reference: any capacity
//! must give the all-resident model's greedy tokens, and a pack damaged while
//! running must give an error naming the expert, not SIGBUS or garbage.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns: a panic is the failure report

use mfx_formats::codec::Codec;
use mfx_formats::pack::{Pack, PackMeta, PackWriter, PartData};
use mfx_formats::quant::Scheme;
use mfx_runtime::cache::{
    plan_budget, BudgetError, CacheConfig, CacheOptions, Capacity, ExpertCache, PolicyKind,
};
use mfx_runtime::config::ModelConfig;
use mfx_runtime::models::{ExpertProvider, LoadOptions, Model, MoeModel, RouterObserver};
use mfx_runtime::weights::WeightSource;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn tiny_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/models/tiny-qwen3-moe-coder"
    ))
}

fn reference() -> serde_json::Value {
    let p = tiny_dir().join("reference/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Writes the tiny model's routed experts (bf16, as stored) into a pack,
/// plus one dense tensor so that budgets have a dense floor.
fn write_expert_pack(
    path: &Path,
    codec: Codec,
    pins: &[(u32, u32)],
) -> (ModelConfig, Box<dyn WeightSource>) {
    let (cfg, src) = mfx_runtime::load::open(&tiny_dir()).unwrap();
    let meta = PackMeta {
        pin_profile: Some(
            serde_json::json!({ "pinned": pins.iter().map(|&(l, e)| [l, e]).collect::<Vec<_>>() }),
        ),
        ..PackMeta::default()
    };
    let mut w = PackWriter::create(path, meta, 4096).unwrap();
    let norm = src.require("model.norm.weight").unwrap();
    w.add_tensor(
        "model.norm.weight",
        Scheme::Bf16,
        &[cfg.hidden_size as u64],
        &[norm.data.bytes()],
    )
    .unwrap();
    for l in 0..cfg.num_hidden_layers {
        if !cfg.is_moe_layer(l) {
            continue;
        }
        for e in 0..cfg.num_experts {
            let raws: Vec<_> = ["gate_proj", "up_proj", "down_proj"]
                .iter()
                .map(|p| {
                    src.require(&format!("model.layers.{l}.mlp.experts.{e}.{p}.weight"))
                        .unwrap()
                })
                .collect();
            let parts: Vec<PartData> = ["gate_proj", "up_proj", "down_proj"]
                .iter()
                .zip(&raws)
                .map(|(n, r)| PartData {
                    name: n.to_string(),
                    scheme: Scheme::Bf16,
                    shape: r.shape.iter().map(|&d| d as u64).collect(),
                    bytes: vec![r.data.bytes()],
                })
                .collect();
            w.add_expert(l as u32, e as u32, codec, &parts).unwrap();
        }
    }
    w.finish().unwrap();
    (cfg, src)
}

fn cache_model(
    path: &Path,
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    cc: &CacheConfig,
) -> (MoeModel, Arc<ExpertCache>) {
    let pack = Arc::new(Pack::open(path).unwrap());
    let cache = Arc::new(ExpertCache::open(pack, cfg.num_hidden_layers, cc).unwrap());
    let provider: Arc<dyn ExpertProvider> = cache.clone();
    let m = MoeModel::from_source(cfg, src, &LoadOptions::default(), Some(provider)).unwrap();
    (m, cache)
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn greedy(m: &mut dyn Model, prompt: &[u32], n: usize) -> Vec<u32> {
    m.reset();
    let mut logits = m.forward(prompt, false).unwrap();
    let mut out = vec![];
    while out.len() < n {
        let t = argmax(&logits);
        out.push(t);
        if out.len() < n {
            logits = m.forward(&[t], false).unwrap();
        }
    }
    out
}

#[test]
fn cache_capacity_far_below_expert_count_matches_reference_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.mfx");
    let (cfg, src) = write_expert_pack(&path, Codec::Zstd, &[(0, 3), (5, 7)]);
    let r = reference();
    for policy in [PolicyKind::Lru, PolicyKind::LfuDecay, PolicyKind::Depth] {
        let cc = CacheConfig {
            capacity: Capacity::PerLayer(2),
            policy,
            verify_checksums: true,
            io_threads: 2,
            ..CacheConfig::default()
        };
        let (mut m, cache) = cache_model(&path, &cfg, src.as_ref(), &cc);
        assert_eq!(cache.pinned(0), vec![3]);
        assert_eq!(cache.pinned(5), vec![7]);
        for name in ["python", "c"] {
            let p = &r["prompts"][name];
            let got = greedy(&mut m, &ids(&p["ids"]), 48);
            assert_eq!(
                got,
                ids(&p["greedy_48"]),
                "{name} with capacity 2 ({policy:?})"
            );
        }
        let caps = cache.capacities();
        assert_eq!(caps.iter().sum::<usize>(), 12, "{policy:?}: {caps:?}");
        if policy == PolicyKind::Depth {
            assert!(caps[0] > caps[5], "depth favours early layers: {caps:?}");
        } else {
            assert_eq!(caps, vec![2; 6]);
        }
        assert_eq!(caps.len(), cfg.num_hidden_layers);
        for (l, &cap) in caps.iter().enumerate() {
            assert!(
                cache.resident(l).len() <= cap,
                "layer {l} holds {:?}",
                cache.resident(l)
            );
        }
        let s = cache.stats();
        eprintln!("capacity 2, {policy:?}: {s:?}");
        assert!(s.misses > 0 && s.evictions > 0 && s.hits > 0);
        // Prefetch ran (router-only: this pack has no co-activation rows)
        // and was scored against the routing that followed.
        assert!(s.predicted > 0 && s.routed_predicted > 0, "{s:?}");
        assert!(
            s.prefetch_precision > 0.0 && s.prefetch_precision <= 1.0,
            "{s:?}"
        );
        assert!(s.prefetch_recall > 0.0 && s.prefetch_recall <= 1.0, "{s:?}");
        assert_eq!(s.skipped, 0, "skip-missing is off by default");
        assert!(s.bytes_read > 0);
        assert!(
            s.hit_rate < 0.9,
            "capacity 2 of 64 cannot hit {:.2}",
            s.hit_rate
        );
    }
}

/// Collects the (layer, expert) pairs a forward pass routes to.
struct Routed(BTreeSet<(usize, usize)>);
impl RouterObserver for Routed {
    fn observe(
        &mut self,
        layer: usize,
        _t: usize,
        _l: &[f32],
        _p: &[f32],
        sel: &[usize],
        _w: &[f32],
    ) {
        for &e in sel {
            self.0.insert((layer, e));
        }
    }
}

#[test]
fn cache_prompt_chunk_reads_each_expert_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.mfx");
    let (cfg, src) = write_expert_pack(&path, Codec::None, &[]);
    let cc = CacheConfig {
        capacity: Capacity::PerLayer(0),
        pin: false,
        ..CacheConfig::default()
    };
    let (mut m, cache) = cache_model(&path, &cfg, src.as_ref(), &cc);
    let prompt = ids(&reference()["prompts"]["docs"]["ids"]);
    let mut routed = Routed(BTreeSet::new());
    m.forward_observed(&prompt, false, Some(&mut routed))
        .unwrap();
    let s = cache.stats();
    assert!(routed.0.len() > 6 * 4, "a prompt routes to many experts");
    assert_eq!(
        s.loads as usize,
        routed.0.len(),
        "one read per active expert per chunk"
    );
    assert_eq!(s.hits, 0);
}

/// A layer's read-ahead never holds more loaded-but-unconsumed experts than
/// the layer has slots (unbounded, a prompt routing to every expert kept them
/// all in memory, far beyond the budget), and topping it up as `get`
/// consumes them still reads each expert exactly once.
#[test]
fn cache_read_ahead_is_bounded_by_the_slots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.mfx");
    let (cfg, _src) = write_expert_pack(&path, Codec::None, &[]);
    let cc = CacheConfig {
        capacity: Capacity::PerLayer(3),
        pin: false,
        io_threads: 2,
        ..CacheConfig::default()
    };
    let pack = Arc::new(Pack::open(&path).unwrap());
    let cache = ExpertCache::open(pack, cfg.num_hidden_layers, &cc).unwrap();
    let all: Vec<usize> = (0..cfg.num_experts).collect();
    cache.prefetch(0, &all, &vec![1; all.len()]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let ahead = cache.stats().loads;
    assert!(ahead >= 1, "read-ahead started nothing");
    assert!(ahead <= 3, "read ahead {ahead} experts with 3 slots");
    for &e in &all {
        cache.get(0, e).unwrap();
    }
    let s = cache.stats();
    assert_eq!(s.loads as usize, all.len(), "each expert read once");
}

/// With slots for every expert, the cache loads the whole pack at open:
/// decode then never waits on a first-touch miss.
#[test]
fn cache_loads_everything_at_open_when_it_fits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.mfx");
    let (cfg, src) = write_expert_pack(&path, Codec::None, &[(0, 1)]);
    let cc = CacheConfig {
        capacity: Capacity::PerLayer(cfg.num_experts),
        ..CacheConfig::default()
    };
    let (mut m, cache) = cache_model(&path, &cfg, src.as_ref(), &cc);
    let moe_layers = (0..cfg.num_hidden_layers)
        .filter(|&l| cfg.is_moe_layer(l))
        .count();
    assert_eq!(
        cache.stats().loads as usize,
        moe_layers * cfg.num_experts,
        "every expert loaded at open"
    );
    let prompt = ids(&reference()["prompts"]["docs"]["ids"]);
    m.forward(&prompt, false).unwrap();
    assert_eq!(cache.stats().misses, 0);
    // One slot short of the whole layer: nothing beyond the pins at open.
    let cc = CacheConfig {
        capacity: Capacity::PerLayer(cfg.num_experts - 2),
        ..CacheConfig::default()
    };
    let (_m, cache) = cache_model(&path, &cfg, src.as_ref(), &cc);
    assert_eq!(cache.stats().loads, 1, "only the pinned expert");
}

#[test]
fn cache_truncated_pack_is_an_error_naming_the_expert() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.mfx");
    let (cfg, src) = write_expert_pack(&path, Codec::None, &[]);
    let cc = CacheConfig {
        capacity: Capacity::PerLayer(1),
        pin: false,
        ..CacheConfig::default()
    };
    let (mut m, cache) = cache_model(&path, &cfg, src.as_ref(), &cc);
    let prompt = ids(&reference()["prompts"]["rust"]["ids"]);
    m.forward(&prompt, false).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    // A direct read past the new end: short read, named.
    let e = cache
        .get(5, 63)
        .expect_err("truncated blob must fail")
        .to_string();
    assert!(
        e.contains("expert L5 E63") && e.contains("short read"),
        "{e}"
    );
    // The next forward pass notices at its safe point.
    let e = m
        .forward(&[42], false)
        .expect_err("changed pack must fail")
        .to_string();
    assert!(e.contains("changed while running"), "{e}");
}

#[test]
fn cache_rewritten_blob_fails_its_checksum() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.mfx");
    write_expert_pack(&path, Codec::None, &[]);
    let pack = Arc::new(Pack::open(&path).unwrap());
    let off = pack.expert(1, 9).unwrap().offset;
    let cc = CacheConfig {
        capacity: Capacity::PerLayer(4),
        verify_checksums: true,
        pin: false,
        io_threads: 0,
        ..CacheConfig::default()
    };
    let cache = ExpertCache::open(pack, 6, &cc).unwrap();
    cache.get(1, 8).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xAB; 64], off + 128).unwrap();
    let e = cache
        .get(1, 9)
        .expect_err("rewritten blob must fail")
        .to_string();
    assert!(
        e.contains("expert L1 E9") && e.contains("checksum mismatch"),
        "{e}"
    );
}

/// Since issue 16 a budget below the minimum (dense + pinned + one token's
/// experts per MoE layer + the working reserve) is refused stating that
/// minimum, and the reserve is never taken out of the cache: every accepted
/// plan adds up to at most the budget and holds one token's experts.
#[test]
fn cache_budget_below_minimum_states_the_minimum() {
    use mfx_runtime::cache::{minimum_budget, pack_needs};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.mfx");
    write_expert_pack(&path, Codec::None, &[(0, 1)]);
    let pack = Pack::open(&path).unwrap();
    let (layers, top_k, io, threads) = (6, 4, 1, 2);
    let needs = pack_needs(&pack, layers, top_k, true, 0, io, threads);
    assert_eq!(needs.dense, 512, "model.norm.weight: 256 bf16");
    assert_eq!(needs.pinned, pack.expert(0, 1).unwrap().raw_length);
    let per = pack.expert(0, 0).unwrap().raw_length;
    assert_eq!(
        needs.min_cache,
        6 * top_k as u64 * per,
        "top_k experts in each MoE layer"
    );
    let min = minimum_budget(&needs);
    assert!(
        min >= needs.resident() + (64 << 20),
        "the reserve's 64 MiB floor"
    );

    let err = plan_budget(&pack, layers, top_k, min - 1, true, None, 0, io, threads).unwrap_err();
    let BudgetError::TooSmall {
        min: stated,
        dense,
        pinned,
        ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!((*stated, *dense, *pinned), (min, needs.dense, needs.pinned));
    assert!(
        err.to_string()
            .contains(&format!("the minimum is {min} bytes")),
        "{err}"
    );

    let check = |budget: u64, working: Option<u64>| {
        let plan =
            plan_budget(&pack, layers, top_k, budget, true, working, 0, io, threads).unwrap();
        let total = plan.dense_bytes + plan.pinned_bytes + plan.reserve_bytes + plan.cache_bytes;
        assert!(total <= budget, "{plan:?} adds up to {total} > {budget}");
        assert!(plan.reserve_bytes >= needs.working + working.unwrap_or(0));
        for (l, &c) in plan.capacity.iter().enumerate() {
            let streamed = plan.experts[l] - usize::from(l == 0);
            assert!(c >= top_k.min(streamed), "layer {l}: {c} slots < top_k");
        }
        plan
    };
    let at_min = check(min, None);
    // More budget never means fewer slots; a big working set comes on top of
    // the floor, not out of the cache's minimum.
    let more = check(min + 12 * per, None);
    assert!(more
        .capacity
        .iter()
        .zip(&at_min.capacity)
        .all(|(a, b)| a >= b));
    let working = 100u64 << 20;
    let err = plan_budget(
        &pack,
        layers,
        top_k,
        min,
        true,
        Some(working),
        0,
        io,
        threads,
    )
    .unwrap_err();
    let BudgetError::TooSmall {
        min: with_working, ..
    } = err
    else {
        panic!("{err:?}");
    };
    assert!(with_working > min);
    check(with_working, Some(working));
}

/// The working set grows with the context and the prompt chunk, and on the
/// shapes of Qwen3-30B-A3B (48 layers, 4 KV heads of 128, f16 KV) the KV
/// part is the published 96 KiB per position.
#[test]
fn working_shape_scales_with_context_and_chunk() {
    let text = std::fs::read_to_string(tiny_dir().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (k, x) in [
        ("hidden_size", 2048),
        ("num_hidden_layers", 48),
        ("num_attention_heads", 32),
        ("num_key_value_heads", 4),
        ("head_dim", 128),
        ("num_experts", 128),
        ("num_experts_per_tok", 8),
        ("moe_intermediate_size", 768),
    ] {
        v[k] = serde_json::json!(x);
    }
    let cfg =
        mfx_runtime::config::ModelConfig::from_json_str(&v.to_string(), Path::new("config.json"))
            .unwrap();
    let f16 = mfx_runtime::models::working::decoder(&cfg, mfx_runtime::models::KvBits::F16);
    assert_eq!(f16.kv_bytes_per_token, 48 * 2 * 4 * 128 * 2);
    let q8 = mfx_runtime::models::working::decoder(&cfg, mfx_runtime::models::KvBits::Q8);
    assert!(q8.kv_bytes_per_token * 2 < f16.kv_bytes_per_token + 48 * 2 * 4 * 8 * 2);
    let base = f16.bytes(4096, 512, 2);
    assert_eq!(
        f16.bytes(8192, 512, 2) - base,
        4096 * f16.kv_bytes_per_token,
        "context adds KV"
    );
    assert_eq!(
        f16.bytes(4096, 1024, 2) - base,
        512 * f16.activation_bytes_per_token(2),
        "chunk adds activations"
    );
    // A chunk longer than the context is the context.
    assert_eq!(f16.bytes(100, 512, 2), f16.bytes(100, 100, 2));
}

/// Mean NLL of `ids[from..]` with `ids` fed one token at a time (as
/// decoding does), and how many of those tokens were the argmax.
fn stepwise_nll(m: &mut dyn Model, ids: &[u32], from: usize) -> (f64, usize) {
    m.reset();
    let mut nll = 0.0;
    let mut top1 = 0;
    for (i, w) in ids.windows(2).enumerate() {
        let l = m.forward(&w[..1], false).unwrap();
        if i + 1 < from {
            continue;
        }
        let mx = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = l.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln() + mx;
        nll += lse - l[w[1] as usize] as f64;
        top1 += usize::from(argmax(&l) == w[1]);
    }
    (nll / (ids.len() - from) as f64, top1)
}

#[test]
fn cache_skip_missing_with_a_partial_cache_skips_and_stays_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.mfx");
    let (cfg, src) = write_expert_pack(&path, Codec::None, &[]);
    let r = reference();
    let p = &r["prompts"]["python"];
    let mut seq = ids(&p["ids"]);
    let from = seq.len();
    seq.extend(ids(&p["greedy_48"]));
    let run = |skip: bool| {
        let cc = CacheConfig {
            capacity: Capacity::PerLayer(4),
            pin: false,
            skip_missing: skip,
            // Reads only on demand: which experts are resident when a layer
            // starts then does not depend on I/O timing.
            io_threads: 0,
            ..CacheConfig::default()
        };
        let (mut m, cache) = cache_model(&path, &cfg, src.as_ref(), &cc);
        let (nll, top1) = stepwise_nll(&mut m, &seq, from);
        (nll, top1, cache.stats())
    };
    let (nll_exact, top1_exact, s0) = run(false);
    let (nll_skip, top1_skip, s1) = run(true);
    eprintln!("exact nll {nll_exact:.4} top1 {top1_exact}; skip nll {nll_skip:.4} top1 {top1_skip}; {s1:?}");
    assert_eq!(s0.skipped, 0);
    assert!(s1.skipped > 0, "a 4-of-64 cache must skip some: {s1:?}");
    assert!(s1.bytes_read < s0.bytes_read, "skipping reads less");
    // The greedy continuation is the exact model's argmax at every step.
    assert_eq!(top1_exact, 48);
    assert!(
        nll_skip.is_finite() && nll_skip < nll_exact + 1.0,
        "{nll_skip} vs {nll_exact}"
    );
    assert!(
        top1_skip * 10 >= top1_exact * 7,
        "{top1_skip} of {top1_exact} greedy tokens kept"
    );
}

/// The whole tiny model as a bf16 pack (dense tensors and experts), loadable
/// with `load::load`.
fn write_full_pack(path: &Path) {
    let (cfg, src) = mfx_runtime::load::open(&tiny_dir()).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_dir().join("config.json")).unwrap())
            .unwrap();
    let meta = PackMeta {
        config,
        ..PackMeta::default()
    };
    let mut w = PackWriter::create(path, meta, 4096).unwrap();
    let mut names = src.names();
    names.sort();
    for n in names.iter().filter(|n| !n.contains(".experts.")) {
        let t = src.require(n).unwrap();
        let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
        w.add_tensor(n, Scheme::Bf16, &shape, &[t.data.bytes()])
            .unwrap();
    }
    for l in 0..cfg.num_hidden_layers {
        for e in 0..cfg.num_experts {
            let raws: Vec<_> = ["gate_proj", "up_proj", "down_proj"]
                .iter()
                .map(|p| {
                    src.require(&format!("model.layers.{l}.mlp.experts.{e}.{p}.weight"))
                        .unwrap()
                })
                .collect();
            let parts: Vec<PartData> = ["gate_proj", "up_proj", "down_proj"]
                .iter()
                .zip(&raws)
                .map(|(n, r)| PartData {
                    name: n.to_string(),
                    scheme: Scheme::Bf16,
                    shape: r.shape.iter().map(|&d| d as u64).collect(),
                    bytes: vec![r.data.bytes()],
                })
                .collect();
            w.add_expert(l as u32, e as u32, Codec::None, &parts)
                .unwrap();
        }
    }
    w.finish().unwrap();
}

/// Truncating the pack under a model loaded through `load::load` must be
/// an error: its dense weights were read into owned memory (cache::dense), so
/// nothing touches the shrunken mapping. Were they still mapped, the next
/// forward pass would die of SIGBUS in the embedding lookup (the whole dense
/// region is cut off here) and this test process with it.
#[test]
fn cache_pack_truncated_under_a_loaded_model_errors_instead_of_sigbus() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-full.mfx");
    write_full_pack(&path);
    let opts = LoadOptions {
        cache: CacheOptions {
            capacity: Some(1),
            pin: false,
            ..CacheOptions::default()
        },
        ..LoadOptions::default()
    };
    let mut m = mfx_runtime::load::load(&path, &opts).unwrap();
    let r = reference();
    let p = &r["prompts"]["rust"];
    // Exact through the pack path too.
    let got = greedy(m.as_mut(), &ids(&p["ids"]), 8);
    assert_eq!(got, ids(&p["greedy_48"])[..8].to_vec());
    let cache = m.expert_cache().expect("a pack streams its experts");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(4096).unwrap();
    let e = m
        .forward(&[42], false)
        .expect_err("a truncated pack must fail")
        .to_string();
    assert!(e.contains("changed while running"), "{e}");
    let missing = (0..64)
        .find(|x| !cache.resident(3).contains(x))
        .expect("capacity 1 leaves experts out");
    let e = cache
        .get(3, missing)
        .expect_err("poisoned cache")
        .to_string();
    assert!(e.contains("changed while running"), "{e}");
}
