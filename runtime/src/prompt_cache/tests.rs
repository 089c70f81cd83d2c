//! The prompt cache through the generator: sessions interleaved, a hybrid
//! history re-rendered late, slots spilled and read back by a new
//! generator, damaged files refused. Every reuse is checked against a cold
//! run (the logits' bits of each sampled token), so a slot giving back state
//! computed in another split, or garbage, fails here.

use super::*;
use crate::chat::ChatTemplate;
use crate::generate::{Event, GenerateOptions, GenerationConfig, Generator};
use crate::models::LoadOptions;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

fn shared(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(rel)
}

/// The tiny 4-bit model (int8 kernels on the default tier, where the
/// batch split changes the bits) on a 16-token grid.
fn tiny() -> Generator {
    let mut g = Generator::load(
        &shared("models/tiny-qwen3-moe-coder-mlx-4bit"),
        &LoadOptions::default(),
    )
    .expect("load tiny model");
    g.set_prefill_chunk(16);
    g
}

/// The qwen3_next fixture (DeltaNet + gated attention) with the tiny
/// model's tokenizer (its ids cover the fixture's 512), on a 16-token grid.
fn qwen3_next() -> Generator {
    hybrid("qwen3_next")
}

/// A hybrid fixture (`qwen3_next`, `qwen3_5_moe`: the same DeltaNet state).
fn hybrid(fixture: &str) -> Generator {
    let dir = shared("fixtures").join(fixture);
    let model = crate::load::resolve(&dir)
        .and_then(|r| r.load(&LoadOptions::default()))
        .expect("load qwen3_next fixture");
    let tok = Tokenizer::from_model_dir(&shared("models/tiny-qwen3-moe-coder")).expect("tokenizer");
    let mut g = Generator::new(
        model,
        tok,
        None::<ChatTemplate>,
        GenerationConfig::default(),
    );
    g.set_model_identity(0x0123_4567);
    g.set_prefill_chunk(16);
    g
}

fn slots(n: usize, dir: Option<&Path>) -> SlotOptions {
    SlotOptions {
        slots: n,
        ram_bytes: 1 << 30,
        dir: dir.map(Path::to_path_buf),
        checkpoint_every: 1,
        ..SlotOptions::default()
    }
}

/// Greedy tokens, the bits of each one's log-probability, and the prompt
/// tokens reused.
fn run(g: &mut Generator, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<u32>, usize) {
    let opts = GenerateOptions {
        max_tokens: n,
        ignore_eos: true,
        logprobs: Some(0),
        ..Default::default()
    };
    let mut bits = Vec::new();
    let c = g
        .generate(prompt, &SamplingParams::greedy(), &opts, &mut |e| {
            if let Event::Token { logprob, .. } = e {
                bits.push(logprob.expect("asked for").logprob.to_bits());
            }
            ControlFlow::Continue(())
        })
        .expect("generate");
    (c.token_ids, bits, c.reused_prompt_tokens)
}

/// Deterministic pseudo-random ids below `vocab` (a conversation's text
/// stands in; what matters is where prompts agree).
fn ids(seed: u64, n: usize, vocab: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32 + 3
        })
        .collect()
}

/// Two conversations interleaved A, B, A, B...: each turn extends its own
/// history by the reply and a new message. With slots both keep more than
/// 90% of their prompt; without, each turn after the other's starts over.
/// Every turn's tokens and logits equal a cold run's.
#[test]
fn interleaved_sessions_keep_their_prefixes() {
    let mut g = tiny();
    g.set_slots(slots(4, None));
    let mut cold = tiny();
    let mut plain = tiny();
    let mut hist = [ids(1, 400, 5000), ids(2, 420, 5000)];
    for turn in 0..3 {
        for (s, h) in hist.iter_mut().enumerate() {
            let (toks, bits, reused) = run(&mut g, h, 6);
            let (plain_toks, _, plain_reused) = run(&mut plain, h, 6);
            cold.reset();
            let (cold_toks, cold_bits, _) = run(&mut cold, h, 6);
            assert_eq!(
                (&toks, &bits),
                (&cold_toks, &cold_bits),
                "session {s} turn {turn}"
            );
            assert_eq!(plain_toks, toks);
            if turn > 0 {
                assert!(
                    reused * 10 > h.len() * 9,
                    "session {s} turn {turn}: {reused} of {} reused",
                    h.len()
                );
                assert_eq!(
                    plain_reused, 0,
                    "without slots the other session's turn evicts"
                );
            }
            h.extend(&toks);
            h.extend(ids(10 + turn as u64 * 2 + s as u64, 12, 5000));
        }
    }
    let st = g.slot_stats();
    assert_eq!(st.hits, 4, "{st:?}");
    assert!(st.slots >= 1 && st.cached_tokens > 0, "{st:?}");
}

/// A qwen3_next history whose last message is re-rendered (differs from
/// position 90 on): the recurrent state cannot be truncated, so the prompt
/// resumes from the checkpoint at 80 (the grid point before the
/// divergence), and its logits are bit-identical to a cold run's.
#[test]
fn hybrid_history_differing_late_resumes_from_a_checkpoint() {
    for fixture in ["qwen3_next", "qwen3_5_moe"] {
        resumes_from_a_checkpoint(fixture);
    }
}

fn resumes_from_a_checkpoint(fixture: &str) {
    let mut g = hybrid(fixture);
    g.set_slots(SlotOptions {
        checkpoint_every: 1,
        ..SlotOptions::default()
    });
    let mut cold = hybrid(fixture);
    let base = ids(7, 90, 500);
    let mut h1 = base.clone();
    h1.extend(ids(8, 30, 500));
    let mut h2 = base.clone();
    h2.extend(ids(9, 25, 500));
    let _ = run(&mut g, &h1, 4);
    let (toks, bits, reused) = run(&mut g, &h2, 8);
    assert_eq!(
        reused, 80,
        "{fixture}: the checkpoint at 80 before the divergence at 90"
    );
    let (cold_toks, cold_bits, cold_reused) = run(&mut cold, &h2, 8);
    assert_eq!(cold_reused, 0);
    assert_eq!((toks, bits), (cold_toks, cold_bits), "{fixture}");
    // Without checkpoints the recurrent state cannot go back.
    let mut none = hybrid(fixture);
    none.set_slots(SlotOptions {
        max_checkpoints: 0,
        ..SlotOptions::default()
    });
    let _ = run(&mut none, &h1, 4);
    assert_eq!(run(&mut none, &h2, 8).2, 0);
}

/// Hybrid sessions interleaved: slots carry the recurrent state (and its
/// checkpoints) along with the KV cache.
#[test]
fn hybrid_sessions_interleave_through_slots() {
    let mut g = qwen3_next();
    g.set_slots(slots(2, None));
    let mut cold = qwen3_next();
    let mut hist = [ids(21, 100, 500), ids(22, 90, 500)];
    for turn in 0..2 {
        for h in hist.iter_mut() {
            let (toks, bits, reused) = run(&mut g, h, 4);
            cold.reset();
            let (ct, cb, _) = run(&mut cold, h, 4);
            assert_eq!((&toks, &bits), (&ct, &cb));
            if turn > 0 {
                assert!(reused >= h.len() - 16 - 4 - 8, "{reused} of {}", h.len());
            }
            h.extend(&toks);
            h.extend(ids(30 + turn, 8, 500));
        }
    }
}

/// A session spilled by one generator (dropped: a server restart) and read
/// back by a new one over the same directory gives the cold run's tokens
/// and logits; for the KV-cache model and the hybrid.
#[test]
fn slots_restored_from_disk_after_a_restart_equal_a_cold_run() {
    for (name, make, vocab) in [
        ("tiny", tiny as fn() -> Generator, 5000u32),
        ("qwen3_next", qwen3_next as fn() -> Generator, 500),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = ids(41, 150, vocab);
        {
            let mut g = make();
            g.set_slots(slots(2, Some(dir.path())));
            let (toks, _, _) = run(&mut g, &h, 4);
            h.extend(&toks);
            h.extend(ids(42, 10, vocab));
        } // dropped: the live session is spilled
        let files = std::fs::read_dir(dir.path()).expect("dir").count();
        assert_eq!(files, 1, "{name}: one spilled slot");
        let mut g = make();
        g.set_slots(slots(2, Some(dir.path())));
        let (toks, bits, reused) = run(&mut g, &h, 6);
        assert_eq!(reused, 144, "{name}: the grid prefix of the first prompt");
        assert_eq!(g.slot_stats().restores, 1, "{name}");
        let mut cold = make();
        let (ct, cb, _) = run(&mut cold, &h, 6);
        assert_eq!((toks, bits), (ct, cb), "{name}");
    }
}

/// A damaged slot file (one byte flipped) and one written for another
/// model are refused with their reason; the prompt is prefilled again and
/// gives the cold run's output.
#[test]
fn damaged_or_foreign_slot_files_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = ids(51, 100, 5000);
    {
        let mut g = tiny();
        g.set_slots(slots(2, Some(dir.path())));
        run(&mut g, &h, 2);
    }
    let file = std::fs::read_dir(dir.path())
        .expect("dir")
        .next()
        .expect("a spilled slot")
        .expect("entry")
        .path();
    let mut cold = tiny();
    let want = run(&mut cold, &h, 4);
    // One flipped bit in the state.
    let mut b = std::fs::read(&file).expect("read");
    let at = b.len() - 100;
    b[at] ^= 0x10;
    std::fs::write(&file, &b).expect("write");
    let mut g = tiny();
    g.set_slots(slots(2, Some(dir.path())));
    let got = run(&mut g, &h, 4);
    assert_eq!(got.2, 0, "nothing reused");
    assert_eq!((got.0, got.1), (want.0.clone(), want.1.clone()));
    let st = g.slot_stats();
    assert_eq!(st.restore_errors, 1);
    let msg = st.last_error.expect("an error message");
    assert!(
        msg.contains("checksum mismatch") && msg.contains(&*file.to_string_lossy()),
        "{msg}"
    );
    assert!(!file.exists(), "a refused file is removed");

    // A file of another model (here: another identity) under this
    // model's name is refused by its header, never read as state.
    let header = spill::Header {
        identity: 42,
        grid: 16,
        tokens: h[..96].to_vec(),
        on_grid: 96,
    };
    let mut g = tiny();
    g.set_slots(slots(2, Some(dir.path())));
    let foreign = dir
        .path()
        .join(spill::file_name(g.model_identity(), 16, &h[..96]));
    std::fs::write(&foreign, spill::encode(&header, &[], &[0; 64])).expect("write");
    g.set_slots(slots(2, Some(dir.path())));
    let got = run(&mut g, &h, 4);
    assert_eq!(got.2, 0);
    assert_eq!((got.0, got.1), (want.0, want.1));
    let msg = g.slot_stats().last_error.expect("an error message");
    assert!(msg.contains("written for another model"), "{msg}");
}

/// Spill files: every kind of damage is an error naming the file.
#[test]
fn spill_file_checks() {
    let p = Path::new("/x/slot.mfxslot");
    let header = spill::Header {
        identity: 7,
        grid: 16,
        tokens: vec![1, 2, 3],
        on_grid: 0,
    };
    let cp = Checkpoint {
        len: 2,
        layers: vec![None, Some(vec![1, 2, 3])],
    };
    let b = spill::encode(&header, std::slice::from_ref(&cp), &[9; 10]);
    let f = spill::decode(p, &b, 7, 16).expect("round trip");
    assert_eq!(f.header, header);
    assert_eq!(f.checkpoints, vec![cp]);
    assert_eq!(f.state, vec![9; 10]);
    let err = |b: &[u8], id, grid| spill::decode(p, b, id, grid).unwrap_err().to_string();
    assert!(err(&b, 8, 16).contains("another model"));
    assert!(err(&b, 7, 32).contains("prefill grid of 16"));
    assert!(err(&b[..b.len() - 1], 7, 16).contains("checksum"));
    assert!(err(&b[..20], 7, 16).contains("shorter"));
    let mut v = b.clone();
    v[0] = b'X';
    assert!(err(&v, 7, 16).contains("checksum"));
    assert!(err(&v, 7, 16).contains("/x/slot.mfxslot"));
}
