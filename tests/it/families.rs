//! `mfx prep` then `mfx eval` on a pack of every family fixture in
//! ../shared/fixtures, against the fixture's transformers reference.
//!
//! The fixtures have no tokenizer, so calibration is `--calib-ids` (a fixed
//! pseudo-random id stream). At 8-bit dense and 8-bit experts the pack's
//! logits stay within [`TOL_8BIT`] (relative L2) of transformers' float32
//! logits; measured 2026-12-01: see the table in docs/ARCHITECTURE.md
//! ("One forward pass"). A wrong tensor mapping (a swapped projection, an
//! expert of another id, a norm stored as a quantized matrix) gives errors
//! of order 1, far above the tolerance.

use crate::common::{ok, read_npy, rel_err};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Relative L2 error allowed at 8/8 bits: about twice the largest measured
/// (5.4e-2, glm4_moe; it halves at --group-size 32, so it is rounding noise
/// through random weights, not a mapping error, which gives errors ~1).
const TOL_8BIT: f64 = 0.1;
/// qwen3_next measures 2.8e-1 at 8/8 bits: its random DeltaNet gates
/// amplify rounding noise (with every dense tensor left float and only the
/// experts at 8 bits it is 7.6e-2 at group 64 and 5.1e-2 at group 32, i.e.
/// it scales with the quantization step). Still well below a wrong mapping.
const TOL_8BIT_QWEN3_NEXT: f64 = 0.4;
/// At the default bits (4-bit hot, 2-bit cold experts) only sanity: the
/// logits are finite and still correlated with the reference.
const TOL_DEFAULT: f64 = 0.9;

const FAMILIES: [&str; 15] = [
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "glm4_moe",
    "deepseek_v3",
    "qwen3_next",
    "glm4_moe_lite",
    "deepseek_v32",
    "glm_moe_dsa",
    "gpt_oss",
    "gpt_oss_mxfp4",
    "qwen3_5_moe",
    "qwen3_5_moe_hub",
    "minimax_m2",
];

/// The fixtures of Gated DeltaNet models (see [`TOL_8BIT_QWEN3_NEXT`]).
fn is_delta_net(fixture: &str) -> bool {
    matches!(fixture, "qwen3_next" | "qwen3_5_moe" | "qwen3_5_moe_hub")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures")).join(name)
}

/// These tests measure what prep's weight rounding costs against
/// transformers, so mfx runs with f32 activations. The default tier's int8
/// activations add an error of their own that the random-weight fixtures
/// amplify (deepseek_v3 at 8/8 bits: 5.0e-2 -> 1.2e-1, qwen3_next 2.8e-1 ->
/// 3.9e-1); on a trained model it is measured by NLL instead
/// (`default_tier_int8_activations_cost_little_nll` in tests/it/run.rs).
/// A tier the CPU lacks falls back to scalar, which is f32 too.
const WEIGHT_ROUNDING_TIER: &str = if cfg!(target_arch = "x86_64") {
    "avx2-f32x"
} else {
    "scalar"
};

fn mfx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mfx"))
        .args(args)
        .env("MFX_KERNELS", WEIGHT_ROUNDING_TIER)
        .output()
        .expect("run mfx")
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A fixed pseudo-random id stream below the fixtures' vocabulary (512).
fn write_calib_ids(path: &Path) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let ids: Vec<String> = (0..256)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % 512).to_string()
        })
        .collect();
    std::fs::write(path, ids.join(" ")).unwrap();
}

struct Measured {
    rel: f64,
    /// DeepSeek sparse attention: the error over the positions that see at
    /// most `index_topk` keys (where the indexer keeps them all).
    rel_dense_part: Option<f64>,
    greedy_same: usize,
    argmax_same: usize,
}

/// The fixture's `index_topk` (families with DeepSeek sparse attention).
fn index_topk(family: &str) -> Option<usize> {
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(family).join("config.json")).unwrap(),
    )
    .unwrap();
    c["index_topk"].as_u64().map(|k| k as usize)
}

/// `mfx prep MODEL` into `dir/NAME.mfx` at the fixtures' settings (1G,
/// the shared calibration ids, 4 rows of 64), with `extra` prep flags.
fn prep_fixture(model: &Path, dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let calib = dir.join("ids.txt");
    write_calib_ids(&calib);
    let pack = dir.join(format!("{name}.mfx"));
    let mut args = vec![
        "prep",
        model.to_str().unwrap(),
        "--ram",
        "1G",
        "-o",
        pack.to_str().unwrap(),
        "--calib-ids",
        calib.to_str().unwrap(),
        "--calib-rows",
        "4",
        "--calib-seq",
        "64",
        "--no-card",
        "-q",
    ];
    args.extend(extra);
    ok(&mfx(&args));
    pack
}

/// Preps `family` with `bits` (extra prep args), then scores the pack.
fn prep_and_score(family: &str, dir: &Path, bits: &[&str]) -> Measured {
    let fx = fixture(family);
    let pack = prep_fixture(&fx, dir, family, bits);
    ok(&mfx(&["verify", pack.to_str().unwrap()]));

    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("reference.json")).unwrap()).unwrap();
    let input = ids_of(&r["input_ids"]);
    let want = ids_of(&r["greedy_16"]);
    let id_arg: Vec<String> = input.iter().map(|i| i.to_string()).collect();
    let id_arg = id_arg.join(",");
    let npy = dir.join(format!("{family}.npy"));
    ok(&mfx(&[
        "eval",
        "logits",
        pack.to_str().unwrap(),
        "--ids",
        &id_arg,
        "--out",
        npy.to_str().unwrap(),
    ]));
    let (shape, got) = read_npy(&npy);
    let (rshape, reference) = read_npy(&fx.join("reference_logits.npy"));
    assert_eq!(shape, rshape, "{family}");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{family}: non-finite logits"
    );
    let vocab = shape[1];
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap()
    };
    let argmax_same = got
        .chunks_exact(vocab)
        .zip(reference.chunks_exact(vocab))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let out = ok(&mfx(&[
        "eval",
        "greedy",
        pack.to_str().unwrap(),
        "--ids",
        &id_arg,
        "--n",
        "16",
    ]));
    let toks: Vec<u32> = out.split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(toks.len(), 16, "{family}: {out}");
    let greedy_same = toks.iter().zip(&want).take_while(|(a, b)| a == b).count();
    let head = index_topk(family).map(|k| k.min(shape[0]) * vocab);
    Measured {
        rel: rel_err(&got, &reference),
        rel_dense_part: head.map(|h| rel_err(&got[..h], &reference[..h])),
        greedy_same,
        argmax_same,
    }
}

#[test]
fn every_family_preps_to_a_pack_that_matches_transformers_at_8_bits() {
    let d = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for f in FAMILIES {
        let m = prep_and_score(
            f,
            d.path(),
            &["--dense-bits", "8", "--hot-bits", "8", "--cold-bits", "8"],
        );
        eprintln!(
            "{f:12} 8/8 bits: logits rel err {:.2e}{}, argmax {}/20 positions, greedy prefix {}/16",
            m.rel,
            m.rel_dense_part
                .map_or(String::new(), |e| format!(" ({e:.2e} within index_topk)")),
            m.argmax_same,
            m.greedy_same
        );
        let tol = if is_delta_net(f) {
            TOL_8BIT_QWEN3_NEXT
        } else {
            TOL_8BIT
        };
        // DeepSeek sparse attention: past index_topk a query keeps the keys
        // its indexer ranks highest, and these fixtures' 2-head indexers
        // give many exact ties, which 8-bit rounding of anything upstream
        // resolves differently (nn::topk): measured 2026-12-07, the
        // positions within index_topk are at 1.6e-2..3.4e-2 like
        // deepseek_v3, later ones up to 1.4 (deepseek_v32 2.0e-1 and
        // glm_moe_dsa 3.2e-1 overall). The weights are held to the
        // tolerance where the selection is everything; the bf16 pack's
        // exact parity is runtime/tests/parity_pack.rs.
        if let Some(e) = m.rel_dense_part {
            if e > tol {
                failures.push(format!("{f}: rel err {e:.3e} > {tol} within index_topk"));
            }
            continue;
        }
        if m.rel > tol {
            failures.push(format!("{f}: rel err {:.3e} > {tol}", m.rel));
        }
        // The first generated token is the argmax at the prompt's last
        // position; random-weight fixtures have small margins further on,
        // so later tokens may legitimately differ after 8-bit rounding.
        // DeltaNet fixtures amplify the rounding to 0.14-0.28 relative, of
        // the order of the last position's margin (qwen3_5_moe: top-2 gap
        // 0.88 against ~0.4 rms logit error), so there most positions'
        // argmax must agree instead; their tensor mapping is checked
        // exactly by runtime/tests/parity_pack.rs (a bf16 pack, 1e-5).
        if is_delta_net(f) {
            if m.argmax_same < 12 {
                failures.push(format!("{f}: argmax agrees at {}/20", m.argmax_same));
            }
        } else if m.greedy_same == 0 {
            failures.push(format!("{f}: first greedy token differs"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn every_family_preps_and_runs_at_default_bits() {
    let d = tempfile::tempdir().unwrap();
    for f in FAMILIES {
        // Round-to-nearest, then GPTQ (`--gptq`: the expert-input
        // statistics come through every family's routed-experts path).
        // GPTQ must not be further from transformers than rounding: on
        // 2026-12-07 it was closer on every family with quantized experts
        // (rel err -3% .. -33%) and equal for gpt_oss_mxfp4 (stored as is).
        let mut rel = Vec::new();
        for extra in [&[][..], &["--gptq"][..]] {
            let mut args = vec!["--hot-fraction", "0.5"];
            args.extend(extra);
            let m = prep_and_score(f, d.path(), &args);
            eprintln!(
                "{f:12} default bits (8-bit dense, 4/2 experts at --hot-fraction 0.5) {extra:?}: logits rel err {:.2e}, argmax {}/20",
                m.rel, m.argmax_same
            );
            assert!(m.rel < TOL_DEFAULT, "{f} {extra:?}: rel err {:.3e}", m.rel);
            rel.push(m.rel);
        }
        assert!(
            rel[1] <= rel[0] * 1.02,
            "{f}: GPTQ rel err {:.3e} above round-to-nearest's {:.3e}",
            rel[1],
            rel[0]
        );
    }
}

/// Decode logits of `ids` fed one token at a time from `pack` through an
/// expert cache set up by `cache`, and the cache's counters afterwards.
fn stepwise(
    pack: &Path,
    ids: &[u32],
    cache: mfx_runtime::cache::CacheOptions,
) -> (Vec<f32>, mfx_runtime::cache::StatsSnapshot) {
    let opts = mfx_runtime::models::LoadOptions {
        cache,
        ..Default::default()
    };
    let mut m = mfx_runtime::load::load(pack, &opts).expect("load pack");
    let mut logits = Vec::new();
    for &t in ids {
        logits.extend(m.forward(&[t], false).expect("forward"));
    }
    let s = m
        .expert_cache()
        .expect("a pack has an expert cache")
        .stats();
    (logits, s)
}

/// `family`'s fixture prepped to an all-8-bit pack in `dir` (and scored
/// against transformers on the way), and the fixture's prompt ids.
fn pack_8bit_and_prompt(family: &str, dir: &Path) -> (PathBuf, Vec<u32>) {
    prep_and_score(
        family,
        dir,
        &["--dense-bits", "8", "--hot-bits", "8", "--cold-bits", "8"],
    );
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(family).join("reference.json")).unwrap(),
    )
    .unwrap();
    (dir.join(format!("{family}.mfx")), ids_of(&r["input_ids"]))
}

/// [`stepwise`] through a cache of `capacity` unpinned slots per layer
/// (reads on demand only, so what is resident when a layer starts does not
/// depend on I/O timing), with its skipped-use and bytes-read counters.
/// `None`: a budget that holds every expert, all loaded at open.
fn stepwise_through_cache(
    pack: &Path,
    ids: &[u32],
    capacity: Option<usize>,
    skip_missing: bool,
) -> (Vec<f32>, u64, u64) {
    let (logits, s) = stepwise(
        pack,
        ids,
        mfx_runtime::cache::CacheOptions {
            ram: Some(1 << 30),
            capacity,
            skip_missing,
            pin: capacity.is_none(),
            io_threads: 0,
            ..Default::default()
        },
    );
    (logits, s.skipped, s.bytes_read)
}

/// `--skip-missing` in the sigmoid-router families (DeepSeek-V3's
/// group-limited, bias-corrected routing with `routed_scaling_factor` 2.5,
/// and GLM-4-MoE), which route outside the shared decoder: with 1 slot of
/// 16 per layer it skips secondary experts and reads less; with it off the
/// same tiny cache gives exactly the all-resident logits, and with every
/// expert resident skipping changes nothing.
#[test]
fn sigmoid_families_skip_missing_through_a_partial_cache() {
    let d = tempfile::tempdir().unwrap();
    for family in [
        "deepseek_v3",
        "glm4_moe",
        "glm4_moe_lite",
        "deepseek_v32",
        "glm_moe_dsa",
        "qwen3_5_moe_hub",
        "minimax_m2",
    ] {
        let (pack, ids) = pack_8bit_and_prompt(family, d.path());
        let (all, skipped_all, _) = stepwise_through_cache(&pack, &ids, None, true);
        let (exact, skipped_exact, read_exact) =
            stepwise_through_cache(&pack, &ids, Some(1), false);
        let (skip, skipped, read_skip) = stepwise_through_cache(&pack, &ids, Some(1), true);
        eprintln!(
            "{family}: skipped {skipped} uses, read {read_skip} vs {read_exact} bytes, rel err vs exact {:.3e}",
            rel_err(&skip, &exact)
        );
        assert_eq!(skipped_all, 0, "{family}: nothing is missing when all fits");
        assert_eq!(skipped_exact, 0, "{family}: skip-missing is off");
        assert_eq!(
            exact, all,
            "{family}: a 1-slot cache must not change the logits"
        );
        assert!(skipped > 0, "{family}: a 1-of-16 cache must skip some uses");
        assert!(read_skip < read_exact, "{family}: skipping reads less");
        assert!(
            skip.iter().all(|v| v.is_finite()),
            "{family}: non-finite logits"
        );
        assert_ne!(
            skip, exact,
            "{family}: skipping experts must change the output"
        );
    }
}

/// The families outside the shared decoder (Qwen3-Next / Qwen3-Coder-Next,
/// and the sigmoid routers of DeepSeek-V3 and GLM-4-MoE) predict and read
/// ahead the next layer's experts like it: with 2 of a fixture's experts
/// cached per layer, predictions are made and scored, and the logits are
/// exactly those of the same cache without prefetch and of the
/// all-resident model.
#[test]
fn every_own_forward_family_prefetches_the_next_layer_without_changing_outputs() {
    let d = tempfile::tempdir().unwrap();
    for family in [
        "qwen3_next",
        "deepseek_v3",
        "glm4_moe",
        "glm4_moe_lite",
        "deepseek_v32",
        "glm_moe_dsa",
    ] {
        let (pack, ids) = pack_8bit_and_prompt(family, d.path());
        let run = |prefetch: bool| {
            stepwise(
                &pack,
                &ids,
                mfx_runtime::cache::CacheOptions {
                    ram: Some(1 << 30),
                    capacity: Some(2),
                    prefetch,
                    pin: false,
                    io_threads: 2,
                    ..Default::default()
                },
            )
        };
        let (with, s) = run(true);
        let (without, s0) = run(false);
        let (all, _, _) = stepwise_through_cache(&pack, &ids, None, false);
        eprintln!(
            "{family}, 2 slots: predicted {} (used {}), precision {:.2}, recall {:.2}, hint loads {}",
            s.predicted, s.predicted_used, s.prefetch_precision, s.prefetch_recall, s.hint_loads
        );
        assert!(
            s.predicted > 0,
            "{family}: no next-layer predictions: {s:?}"
        );
        assert!(
            s.routed_predicted > 0,
            "{family}: predictions never scored: {s:?}"
        );
        assert_eq!(
            s0.predicted, 0,
            "{family}: --no-prefetch still predicted: {s0:?}"
        );
        assert_eq!(with, without, "{family}: prefetch changed the logits");
        assert_eq!(with, all, "{family}: a 2-slot cache changed the logits");
    }
}

/// A word-level tokenizer over `vocab` ids: token `i` is the word `t{i}`,
/// words split on whitespace. The fixtures have no tokenizer; this one
/// lets `mfx run` take a text prompt that is exactly a fixture's ids.
fn word_tokenizer(vocab: usize) -> String {
    let words: serde_json::Map<String, serde_json::Value> =
        (0..vocab).map(|i| (format!("t{i}"), i.into())).collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "t0"}
    })
    .to_string()
}

/// `family`'s fixture with [`word_tokenizer`] beside it, in `dir` (the
/// weights linked, not copied).
fn fixture_with_tokenizer(family: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{family}-tok"));
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(fixture(family)).unwrap() {
        let p = e.unwrap().path();
        std::os::unix::fs::symlink(&p, out.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(out.join("tokenizer.json"), word_tokenizer(512)).unwrap();
    out
}

/// The MLA families (GLM-4.7-Flash, and DeepSeek-V3.2 / GLM-5 with sparse
/// attention) end to end: `mfx run` on the checkpoint writes transformers'
/// greedy tokens; prep writes a pack, and `mfx run` on it streaming through
/// 2 unpinned expert slots per layer (of 16) writes what it writes with
/// every expert resident.
#[test]
fn mla_families_run_streamed_from_a_pack_as_resident() {
    let d = tempfile::tempdir().unwrap();
    for family in ["glm4_moe_lite", "deepseek_v32", "glm_moe_dsa"] {
        let ckpt = fixture_with_tokenizer(family, d.path());
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(family).join("reference.json")).unwrap(),
        )
        .unwrap();
        let words = |v: &serde_json::Value| {
            ids_of(v)
                .iter()
                .map(|i| format!("t{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let prompt = words(&r["input_ids"]);
        let run = |model: &Path, extra: &[&str]| {
            let mut args = vec![
                "run",
                model.to_str().unwrap(),
                "--prompt",
                &prompt,
                "--temp",
                "0",
                "-n",
                "16",
            ];
            args.extend_from_slice(extra);
            ok(&mfx(&args))
        };
        assert_eq!(
            run(&ckpt, &[]).trim(),
            words(&r["greedy_16"]),
            "{family}: mfx run on the checkpoint"
        );

        let pack = prep_fixture(
            &ckpt,
            d.path(),
            family,
            &["--dense-bits", "8", "--hot-bits", "8", "--cold-bits", "8"],
        );
        let resident = run(&pack, &[]);
        let out = mfx(&[
            "run",
            pack.to_str().unwrap(),
            "--prompt",
            &prompt,
            "--temp",
            "0",
            "-n",
            "16",
            "--capacity",
            "2",
            "--no-pin",
            "--stats",
        ]);
        let (streamed, err) = (ok(&out), crate::common::stderr(&out));
        eprintln!(
            "{family}: {}",
            err.lines().find(|l| l.starts_with("cache: ")).unwrap_or("")
        );
        assert_eq!(
            streamed, resident,
            "{family}: streamed through 2 slots vs resident"
        );
        assert_eq!(
            resident.split_whitespace().count(),
            16,
            "{family}: {resident}"
        );
        // 2 unpinned slots of 16 experts per layer: experts are read
        // during generation, not all held.
        let stats = err
            .lines()
            .find(|l| l.starts_with("cache: hit rate "))
            .unwrap_or_else(|| panic!("{family}: no cache stats: {err}"));
        assert!(
            stats.contains(" misses) | read ") && !stats.contains(" 0 misses)"),
            "{family}: {stats}"
        );
    }
}
/// `mfx eval greedy` of `model` (a checkpoint directory or a pack) over
/// `ids`, with extra flags (the expert cache's).
fn greedy_cli(model: &Path, ids: &[u32], extra: &[&str]) -> Vec<u32> {
    let id_arg: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let id_arg = id_arg.join(",");
    let mut args = vec![
        "eval",
        "greedy",
        model.to_str().unwrap(),
        "--ids",
        &id_arg,
        "--n",
        "16",
    ];
    args.extend(extra);
    let out = ok(&mfx(&args));
    out.split_whitespace().map(|t| t.parse().unwrap()).collect()
}

/// gpt-oss through prep (8-bit dense; the bf16 fixture's experts at 8
/// bits, the hub fixture's MXFP4 experts as they are) then streamed with
/// 2 of 16 experts cached per layer and nothing pinned (`mfx eval greedy
/// --capacity 2 --no-pin`: the fixtures have no tokenizer for `mfx run`):
/// the greedy tokens and the decode logits are the pack's own all-resident
/// ones. (Transformers parity through a pack, streamed too:
/// runtime/tests/parity_pack.rs.)
#[test]
fn gpt_oss_streams_through_a_2_slot_cache_like_resident() {
    let d = tempfile::tempdir().unwrap();
    for family in ["gpt_oss", "gpt_oss_mxfp4"] {
        let (pack, ids) = pack_8bit_and_prompt(family, d.path());
        let resident = greedy_cli(&pack, &ids, &[]);
        let streamed = greedy_cli(&pack, &ids, &["--capacity", "2", "--no-pin"]);
        eprintln!("{family}: resident {resident:?}, streamed {streamed:?}");
        assert_eq!(
            streamed, resident,
            "{family}: a 2-slot cache changed the tokens"
        );
        let (all, _, _) = stepwise_through_cache(&pack, &ids, None, false);
        let (two, _, read) = stepwise_through_cache(&pack, &ids, Some(2), false);
        assert!(read > 0, "{family}: the 2-slot cache read nothing");
        assert_eq!(two, all, "{family}: a 2-slot cache changed the logits");
    }
}

/// The hub's MXFP4 experts go into the pack byte for byte (each expert's
/// gate = the even rows and up = the odd rows of its `gate_up_proj`
/// blocks and scales, down its `down_proj`), whatever `--hot-bits` and
/// `--cold-bits` say, with their bf16 biases as bias parts; and prep's
/// planner sizes them as stored (4.25 bits plus biases, hot = cold), not as
/// affine experts at those bits.
#[test]
fn gpt_oss_mxfp4_experts_are_stored_as_they_are_and_sized_so() {
    use mfx_formats::pack::Pack;
    use mfx_formats::quant::Scheme;
    use mfx_runtime::weights::safetensors::SafetensorsSource;
    use mfx_runtime::weights::{mxfp4, Matrix, WeightSource};
    let d = tempfile::tempdir().unwrap();
    let fx = fixture("gpt_oss_mxfp4");
    let calib = d.path().join("ids.txt");
    write_calib_ids(&calib);
    let pack = d.path().join("g.mfx");
    let report = d.path().join("report.json");
    ok(&mfx(&[
        "prep",
        fx.to_str().unwrap(),
        "--ram",
        "1G",
        "-o",
        pack.to_str().unwrap(),
        "--calib-ids",
        calib.to_str().unwrap(),
        "--calib-rows",
        "2",
        "--calib-seq",
        "32",
        "--hot-bits",
        "4",
        "--cold-bits",
        "2",
        "--hot-fraction",
        "0.5",
        "--report",
        report.to_str().unwrap(),
        "--no-card",
        "-q",
    ]));
    let src = SafetensorsSource::open(&fx).unwrap();
    let p = Pack::open(&pack).unwrap();
    let (n, h, i) = (16, 64, 32);
    let even: Vec<usize> = (0..i).map(|r| 2 * r).collect();
    let odd: Vec<usize> = (0..i).map(|r| 2 * r + 1).collect();
    let bytes = |m: &Matrix| match m {
        Matrix::Mxfp4 { blocks, scales, .. } => (blocks.bytes().to_vec(), scales.bytes().to_vec()),
        other => panic!("not mxfp4: {other:?}"),
    };
    let mut stored_sizes = std::collections::BTreeSet::new();
    for l in 0..4u32 {
        let pre = format!("model.layers.{l}.mlp.experts");
        let gu_bias = src.require(&format!("{pre}.gate_up_proj_bias")).unwrap();
        let dn_bias = src.require(&format!("{pre}.down_proj_bias")).unwrap();
        for e in 0..n as u32 {
            let gu = mxfp4::expert(
                &src,
                &format!("{pre}.gate_up_proj"),
                e as usize,
                n,
                2 * i,
                h,
            )
            .unwrap();
            let dn = mxfp4::expert(&src, &format!("{pre}.down_proj"), e as usize, n, h, i).unwrap();
            let want = [
                bytes(&gu.gather_rows(&even)),
                bytes(&gu.gather_rows(&odd)),
                bytes(&dn),
            ];
            let entry = p.expert(l, e).unwrap();
            let mut stored = vec![0u8; entry.length as usize];
            p.read_expert_into(entry, &mut stored).unwrap();
            let mut raw = vec![0u8; entry.raw_length as usize];
            entry.decode_into(&stored, &mut raw).unwrap();
            let names: Vec<&str> = entry.parts.iter().map(|x| x.name.as_str()).collect();
            assert_eq!(
                names,
                [
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                    "gate_bias",
                    "up_bias",
                    "down_bias"
                ],
                "L{l} E{e}"
            );
            let mut size = 0;
            for (k, (wb, ws)) in want.iter().enumerate() {
                let v = entry.part(&raw, k).unwrap();
                assert_eq!(v.scheme(), Scheme::Mxfp4, "L{l} E{e} part {k}");
                let m = v.mxfp4().unwrap();
                assert_eq!(
                    (m.blocks, m.scales),
                    (&wb[..], &ws[..]),
                    "L{l} E{e} part {k}"
                );
                size += wb.len() + ws.len();
            }
            // Biases: bf16 as in the checkpoint; gate/up de-interleaved.
            let gub = &gu_bias.data.bytes()[e as usize * 4 * i..(e as usize + 1) * 4 * i];
            let dnb = &dn_bias.data.bytes()[e as usize * 2 * h..(e as usize + 1) * 2 * h];
            let pick = |parity: usize| -> Vec<u8> {
                gub.chunks_exact(2)
                    .skip(parity)
                    .step_by(2)
                    .flatten()
                    .copied()
                    .collect()
            };
            for (k, want) in [(3, pick(0)), (4, pick(1)), (5, dnb.to_vec())] {
                let v = entry.part(&raw, k).unwrap();
                assert_eq!(v.scheme(), Scheme::Bf16, "L{l} E{e} part {k}");
                assert_eq!(v.bytes(), &want[..], "L{l} E{e} part {k}");
                size += want.len();
            }
            stored_sizes.insert(size as u64);
        }
    }
    assert_eq!(stored_sizes.len(), 1, "{stored_sizes:?}");
    let per_expert = *stored_sizes.first().unwrap();
    // 3 x (32 x 64 codes at 4 bits + one scale byte per 32) + 256 bytes of bf16 biases.
    assert_eq!(
        per_expert,
        3 * (32 * 64 / 2 + 32 * 64 / 32) + 2 * (32 + 32 + 64)
    );
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let plan = &rep["packs"][0]["plan"];
    eprintln!("plan: {plan}");
    // The plan counts each pinned expert at its stored size, hot (4-bit)
    // or cold (2-bit) alike: an affine q4 or q2 expert would be 3840 or
    // 2304 bytes + biases. (`--hot-fraction` is given, so the plan pins by
    // routing mass rather than keeping everything resident.)
    let pinned: u64 = plan["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["pinned"].as_array().unwrap().len() as u64)
        .sum();
    assert!(pinned > 0, "{plan}");
    assert_eq!(
        plan["pinned_bytes"].as_u64().unwrap(),
        pinned * per_expert,
        "{plan}"
    );
    let code_bits = rep["packs"][0]["expert_code_bits"].as_f64().unwrap();
    assert!(
        (code_bits - 4.25).abs() < 1e-9,
        "expert_code_bits {code_bits}"
    );
}

/// The 2026 families through prep -> pack -> the CLI with the streaming
/// cache at 2 slots per layer (`--capacity 2`, so most experts are read
/// and evicted per token): `mfx run` and `mfx eval greedy` give the same
/// greedy tokens as with every expert of the pack resident.
#[test]
fn new_families_stream_through_two_slots_like_resident() {
    let d = tempfile::tempdir().unwrap();
    let calib = d.path().join("ids.txt");
    write_calib_ids(&calib);
    for family in ["qwen3_5_moe", "qwen3_5_moe_hub", "minimax_m2"] {
        let model = fixture_with_tokenizer(family, d.path());
        let pack = d.path().join(format!("{family}.mfx"));
        let p = pack.to_str().unwrap();
        ok(&mfx(&[
            "prep",
            model.to_str().unwrap(),
            "--ram",
            "1G",
            "-o",
            p,
            "--calib-ids",
            calib.to_str().unwrap(),
            "--calib-rows",
            "4",
            "--calib-seq",
            "64",
            "--dense-bits",
            "8",
            "--hot-bits",
            "8",
            "--cold-bits",
            "8",
            "--no-card",
            "-q",
        ]));
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(family).join("reference.json")).unwrap(),
        )
        .unwrap();
        let input = ids_of(&r["input_ids"]);
        let ids: Vec<String> = input.iter().map(|i| i.to_string()).collect();
        let ids = ids.join(",");
        let greedy = |extra: &[&str]| {
            let mut args = vec!["eval", "greedy", p, "--ids", &ids, "--n", "16"];
            args.extend_from_slice(extra);
            ok(&mfx(&args))
        };
        let resident = greedy(&[]);
        assert_eq!(
            resident.split_whitespace().count(),
            16,
            "{family}: {resident}"
        );
        assert_eq!(
            greedy(&["--capacity", "2"]),
            resident,
            "{family}: eval greedy through 2 slots"
        );
        let words: Vec<String> = input.iter().map(|i| format!("t{i}")).collect();
        let prompt = words.join(" ");
        let run = |extra: &[&str]| {
            let mut args = vec!["run", p, "--prompt", &prompt, "--temp", "0", "-n", "16"];
            args.extend_from_slice(extra);
            let out = ok(&mfx(&args));
            // The word-level tokenizer decodes to `t<id>` words (joined
            // with or without spaces).
            out.split('t')
                .skip(1)
                .map(|w| {
                    w.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let streamed = run(&["--capacity", "2"]);
        eprintln!("{family}: run --capacity 2: {streamed}");
        assert_eq!(run(&[]), streamed, "{family}: mfx run through 2 slots");
        // Greedy until the fixture's end-of-sequence id (1), if it comes.
        let until_eos: Vec<&str> = resident
            .split_whitespace()
            .take_while(|t| *t != "1")
            .collect();
        assert_eq!(
            streamed,
            until_eos.join(" "),
            "{family}: run vs eval greedy"
        );
    }
}
