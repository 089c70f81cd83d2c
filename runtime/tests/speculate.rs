//! Speculative decoding changes no output: a verify pass's rows equal
//! one-token steps bit for bit on every family that batches it, and
//! generation with drafting gives the same tokens as without, greedy and
//! seeded sampling alike.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns: a panic is the failure report

use mfx_runtime::generate::{Completion, GenerateOptions, Generator};
use mfx_runtime::models::{KvBits, LoadOptions, Model};
use mfx_runtime::sampling::SamplingParams;
use mfx_runtime::speculate::SpecOptions;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

fn shared() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")).to_path_buf()
}

fn fixture_ids(dir: &Path) -> Vec<u32> {
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    r["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn load(dir: &Path, kv: KvBits) -> Box<dyn Model> {
    let opts = LoadOptions {
        kv_bits: kv,
        ..Default::default()
    };
    mfx_runtime::load::load(dir, &opts).unwrap()
}

/// Logits of `steps` fed one token at a time after `prefix`.
fn one_at_a_time(m: &mut dyn Model, prefix: &[u32], steps: &[u32]) -> Vec<f32> {
    m.reset();
    m.forward(prefix, false).unwrap();
    let mut out = Vec::new();
    for &t in steps {
        out.extend(m.forward(&[t], false).unwrap());
    }
    out
}

fn first_difference(a: &[f32], b: &[f32], vocab: usize) -> Option<String> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
        .map(|i| {
            format!(
                "position {} logit {}: {} vs {}",
                i / vocab,
                i % vocab,
                a[i],
                b[i]
            )
        })
}

/// Every family fixture: `forward_steps` after a prefill equals one-token
/// forwards, and after truncating a rejected tail the model continues as if
/// the tail had never been fed. The prompt is longer than gpt-oss's window
/// (8), so windowed layers are exercised past it.
#[test]
fn verify_rows_equal_one_token_steps_on_every_family() {
    let batched = [
        "qwen3_moe",
        "qwen2_moe",
        "mixtral",
        "olmoe",
        "glm4_moe",
        "deepseek_v3",
        "glm4_moe_lite",
        "gpt_oss",
        "gpt_oss_mxfp4",
        "minimax_m2",
    ];
    // Recurrent state cannot drop a rejected tail, and the indexer's top-k
    // is not held to one-token steps: these loop (no speed-up, same rows).
    let looped = ["qwen3_next", "qwen3_5_moe", "deepseek_v32", "glm_moe_dsa"];
    for kv in [KvBits::F16, KvBits::Q8] {
        for name in batched.iter().chain(&looped) {
            let dir = shared().join("fixtures").join(name);
            let ids = fixture_ids(&dir);
            let (prefix, steps) = ids.split_at(9);
            let mut m = load(&dir, kv);
            let vocab = m.info().vocab_size;
            assert_eq!(m.batched_steps(), batched.contains(name), "{name}");
            let want = one_at_a_time(m.as_mut(), prefix, steps);
            m.reset();
            m.forward(prefix, false).unwrap();
            let got = m.forward_steps(steps).unwrap();
            if let Some(d) = first_difference(&got, &want, vocab) {
                panic!("{name} {kv:?}: verify pass differs from one-token steps at {d}");
            }
            if !m.batched_steps() {
                continue;
            }
            // Reject all but the first 3 steps, then feed another token.
            assert!(m.truncate(prefix.len() + 3), "{name}");
            let other = (steps[3] + 1) % vocab as u32;
            let after = m.forward(&[other], false).unwrap();
            let fresh = [&steps[..3], &[other]].concat();
            let want = one_at_a_time(m.as_mut(), prefix, &fresh);
            if let Some(d) = first_difference(&after, &want[3 * vocab..], vocab) {
                panic!("{name} {kv:?}: after truncation: {d}");
            }
        }
    }
}

fn tiny_mlx() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-qwen3-moe-coder-mlx-4bit")
}

/// A file the model has read and is asked to write again: drafts hit.
fn repeat_prompt(g: &Generator) -> Vec<u32> {
    let code = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument(\"--input\", required=True)\n    parser.add_argument(\"--output\", default=\"out.txt\")\n    return parser.parse_args(argv)\n\n\ndef main(argv):\n    args = parse_args(argv)\n    with open(args.input) as f:\n        text = f.read()\n    with open(args.output, \"w\") as f:\n        f.write(text.upper())\n";
    let text = format!(
        "{code}\n\n# The same file again:\n{code}\n\n# Once more:\ndef parse_args(argv):\n"
    );
    g.encode_prompt(&text).unwrap()
}

fn generate(
    g: &mut Generator,
    prompt: &[u32],
    p: &SamplingParams,
    max_tokens: usize,
) -> Completion {
    let opts = GenerateOptions {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    g.generate(prompt, p, &opts, &mut |_| ControlFlow::Continue(()))
        .unwrap()
}

/// 96 tokens from a fresh state with drafting set to `spec`: the tokens,
/// verify passes and accepted draft tokens.
fn run(
    g: &mut Generator,
    prompt: &[u32],
    p: &SamplingParams,
    spec: SpecOptions,
) -> (Vec<u32>, usize, usize) {
    g.reset();
    g.set_speculation(spec);
    let c = generate(g, prompt, p, 96);
    assert_eq!(c.token_ids.len(), 96);
    // The state holds what it would without drafting: the prompt and the
    // reply but its last token (sampled, not yet fed); no drafted tail.
    assert_eq!(g.cached_tokens(), prompt.len() + 95);
    (
        c.token_ids,
        c.timings.draft.passes,
        c.timings.draft.accepted,
    )
}

#[test]
fn drafting_changes_no_token_greedy_or_seeded() {
    for kv in [KvBits::F16, KvBits::Q8] {
        let opts = LoadOptions {
            kv_bits: kv,
            ..Default::default()
        };
        let mut g = Generator::load(&tiny_mlx(), &opts).unwrap();
        // Reuse any prefix (as `mfx chat` does), not only whole 512-token chunks.
        g.set_exact_prefix_reuse(false);
        let prompt = repeat_prompt(&g);
        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let seeded = SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: Some(7),
            ..Default::default()
        };
        let draft = SpecOptions {
            auto_off: false,
            ..SpecOptions::ngram(8)
        };
        for (what, p) in [("greedy", &greedy), ("seeded", &seeded)] {
            let (plain, passes, _) = run(&mut g, &prompt, p, SpecOptions::OFF);
            assert_eq!(passes, 0);
            let (spec, passes, accepted) = run(&mut g, &prompt, p, draft);
            assert_eq!(spec, plain, "{what} {kv:?}: drafting changed the tokens");
            assert!(passes > 0, "{what} {kv:?}: no verify pass ran");
            if what == "greedy" {
                // The model copies the file: most drafts hold.
                assert!(
                    accepted > 24,
                    "{what} {kv:?}: only {accepted} draft tokens accepted"
                );
            }
            // A follow-up turn reuses the state drafting left behind.
            let mut next = prompt.clone();
            next.extend(&spec[..95]);
            next.extend(g.encode_prompt("\n# end\n").unwrap());
            g.set_speculation(draft);
            let c = generate(&mut g, &next, &greedy, 8);
            assert!(
                c.reused_prompt_tokens > 0,
                "{what} {kv:?}: nothing reused after drafting"
            );
            g.reset();
            let cold = generate(&mut g, &next, &greedy, 8);
            assert_eq!(
                c.token_ids, cold.token_ids,
                "{what} {kv:?}: reuse after drafting"
            );
        }
    }
}

/// What a verify pass costs against one-token steps on the tiny model
/// (a measurement, not a check): `cargo test --release --test speculate
/// -- --ignored --nocapture verify_cost`.
#[test]
#[ignore]
fn verify_cost() {
    let mut m = load(&tiny_mlx(), KvBits::F16);
    let prompt: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 4000 + 5).collect();
    for k in [1usize, 2, 3, 5, 9] {
        let mut best = f64::MAX;
        for _ in 0..20 {
            m.reset();
            m.forward(&prompt, false).unwrap();
            let t = std::time::Instant::now();
            if k == 1 {
                m.forward(&[7], false).unwrap();
            } else {
                m.forward_steps(&vec![7; k]).unwrap();
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let mut plain = f64::MAX;
        for _ in 0..20 {
            m.reset();
            m.forward(&prompt, false).unwrap();
            let t = std::time::Instant::now();
            m.forward(&vec![7; k], true).unwrap();
            plain = plain.min(t.elapsed().as_secs_f64());
        }
        println!(
            "k={k}: forward_steps {:.2} ms, forward(all logits) {:.2} ms",
            best * 1e3,
            plain * 1e3
        );
    }
}

/// A loop to profile a k-token pass (`perf record` around it):
/// `MFX_PROFILE_K=2 cargo test --release --test speculate -- --ignored
/// --nocapture verify_profile`.
#[test]
#[ignore]
fn verify_profile() {
    let k: usize = std::env::var("MFX_PROFILE_K")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut m = load(&tiny_mlx(), KvBits::F16);
    let prompt: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 4000 + 5).collect();
    m.forward(&prompt, false).unwrap();
    let toks: Vec<u32> = (0..k as u32).map(|i| 7 + 13 * i).collect();
    let t = std::time::Instant::now();
    let iters = 2000;
    for _ in 0..iters {
        if k == 1 {
            m.forward(&toks, false).unwrap();
        } else {
            m.forward_steps(&toks).unwrap();
        }
        assert!(m.truncate(prompt.len()));
    }
    println!(
        "k={k}: {:.3} ms per pass",
        t.elapsed().as_secs_f64() * 1e3 / iters as f64
    );
}
