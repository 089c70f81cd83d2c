//! `mfx inspect` and `mfx verify` on packs written by the real writer, and on
//! the damaged and foreign files users actually hit.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use crate::common::mfx;

use std::path::Path;

use mfx_formats::pack::Pack;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tiny(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("tiny.mfx");
    mfx_formats::testing::write_tiny_pack(&p).unwrap();
    p
}

#[test]
fn verify_passes_a_written_pack() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path());
    let out = mfx(&["verify", p.to_str().unwrap()]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.starts_with("ok: ") && s.contains("6 tensors, 7 expert blobs (1 merged entries)"),
        "{s}"
    );
}

#[test]
fn inspect_json_is_valid_and_matches_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path());
    let out = mfx(&["inspect", "--json", p.to_str().unwrap()]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("inspect --json prints valid JSON");
    let pack = Pack::open(&p).unwrap();
    let m = pack.manifest();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["alignment"], 4096);
    assert_eq!(v["file_bytes"], std::fs::metadata(&p).unwrap().len());
    assert_eq!(v["tensors"]["count"], m.tensors.len());
    assert_eq!(
        v["tensors"]["bytes"],
        m.tensors.iter().map(|t| t.length).sum::<u64>()
    );
    assert_eq!(v["tensors"]["by_scheme"]["bf16"]["count"], 1);
    assert_eq!(v["tensors"]["by_scheme"]["q4g32"]["count"], 2);
    assert_eq!(v["experts"]["entries"], 8);
    assert_eq!(v["experts"]["merged"], 1);
    assert_eq!(v["experts"]["blobs"], 7);
    assert_eq!(v["experts"]["by_codec"]["huffman"]["count"], 2);
    assert_eq!(v["experts"]["by_codec"]["none"]["count"], 3);
    assert_eq!(v["experts"]["by_part"]["down_proj q2g32"]["count"], 7);
    assert_eq!(v["model"]["model_type"], "qwen3_moe");
    // Precision mix: shares sum to 1 and the average lies between 2 and 32 bits.
    let shares: f64 = v["precision"]["by_scheme"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["share"].as_f64().unwrap())
        .sum();
    assert!((shares - 1.0).abs() < 1e-9);
    let avg = v["precision"]["avg_bits_per_weight"].as_f64().unwrap();
    assert!(avg > 2.0 && avg < 32.0, "{avg}");
    // The tiny pack's pin profile is not a prep profile: shown raw.
    assert_eq!(
        v["pin_profile"]["raw"]["pinned"][0],
        serde_json::json!([0, 1])
    );

    let human = mfx(&["inspect", "--list", p.to_str().unwrap()]);
    assert!(human.status.success());
    let h = text(&human.stdout);
    for want in [
        "format v1",
        "tensors    6",
        "8 entries in 2 layers",
        "codec huffman",
        "L1 E3",
        "merged into E0",
        "bits/weight",
    ] {
        assert!(h.contains(want), "missing {want:?} in:\n{h}");
    }
}

#[test]
fn verify_names_the_first_bad_expert_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path());
    let pack = Pack::open(&p).unwrap();
    let e = pack.expert(1, 2).unwrap().clone();
    let t = pack
        .manifest()
        .tensors
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .unwrap()
        .clone();
    drop(pack);
    let good = std::fs::read(&p).unwrap();

    let mut bad = good.clone();
    bad[(e.offset + e.length / 2) as usize] ^= 0x10;
    std::fs::write(&p, &bad).unwrap();
    let out = mfx(&["verify", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("failed verification") && err.contains("checksum mismatch in expert L1 E2"),
        "{err}"
    );

    let mut bad = good.clone();
    bad[t.offset as usize + 3] ^= 0x01;
    bad[(e.offset + 1) as usize] ^= 0x01; // later in the file: the tensor is reported first
    std::fs::write(&p, &bad).unwrap();
    let out = mfx(&["verify", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("checksum mismatch in tensor model.embed_tokens.weight"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn truncated_and_foreign_files_fail_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path());
    let good = std::fs::read(&p).unwrap();
    std::fs::write(&p, &good[..good.len() - 100]).unwrap();
    for cmd in ["verify", "inspect"] {
        let out = mfx(&[cmd, p.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = text(&out.stderr);
        assert!(
            err.contains("cannot open pack") && err.contains("truncated in the manifest section"),
            "{cmd}: {err}"
        );
    }
    let foreign = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/models/tiny-qwen3-moe-coder-mlx-4bit/model.safetensors"
    );
    let out = mfx(&["verify", foreign]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not an mfx pack"),
        "{}",
        text(&out.stderr)
    );
    let out = mfx(&[
        "inspect",
        "--json",
        dir.path().join("missing.mfx").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("missing.mfx"));
}
