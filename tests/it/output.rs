//! Snapshots (insta) of what users read: `--help` of every command,
//! `mfx inspect` of a pack, and the main error messages. A change to any of
//! them shows up as a reviewed diff of `tests/it/snapshots/*.snap`
//! (`INSTA_UPDATE=always cargo test --release --test it output` rewrites
//! them; review with `git diff`).
//!
//! Paths that differ between machines (temporary directories, the
//! checkout) are replaced by `[TMP]` and `[SHARED]`; byte counts that
//! depend on the machine's thread count are pinned by running with `-t 1`.

use crate::common::{mfx, shared};
use std::path::Path;
use std::process::Output;

/// `s` as a regex matching itself (insta's filters are regexes).
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Asserts the snapshot `name` of `text` with machine-specific paths redacted.
fn snap(name: &str, text: &str, tmp: Option<&Path>) {
    let mut settings = insta::Settings::clone_current();
    // The checkout's ../shared, however it is spelled.
    let shared = shared();
    let mut filters = vec![(literal(&shared.display().to_string()), "[SHARED]")];
    if let Ok(c) = shared.canonicalize() {
        filters.push((literal(&c.display().to_string()), "[SHARED]"));
    }
    if let Some(t) = tmp {
        filters.push((literal(&t.display().to_string()), "[TMP]"));
    }
    for (re, to) in &filters {
        settings.add_filter(re, *to);
    }
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| insta::assert_snapshot!(name, text));
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// stderr of a run that must fail with `code`, with no panic.
fn failure(o: &Output, code: i32) -> String {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

const COMMANDS: [&str; 11] = [
    "eval", "run", "serve", "chat", "push", "pull", "prep", "inspect", "verify", "bench", "plan",
];

#[test]
fn help_of_every_command() {
    let top = mfx(&["--help"]);
    assert!(top.status.success());
    let top = text(&top.stdout);
    snap("help", &top, None);
    for cmd in COMMANDS {
        // The list above is the whole list: a new command gets a snapshot.
        assert!(
            top.contains(&format!("  {cmd} ")),
            "{cmd} missing from --help"
        );
        let o = mfx(&[cmd, "--help"]);
        assert!(o.status.success(), "{cmd} --help: {}", text(&o.stderr));
        snap(&format!("help_{cmd}"), &text(&o.stdout), None);
    }
    let listed = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.trim_start().starts_with("help "))
        .count();
    assert_eq!(listed, COMMANDS.len(), "{top}");
    for sub in ["logits", "greedy", "ppl"] {
        let o = mfx(&["eval", sub, "--help"]);
        assert!(o.status.success(), "eval {sub} --help: {}", text(&o.stderr));
        snap(&format!("help_eval_{sub}"), &text(&o.stdout), None);
    }
}

#[test]
fn inspect_of_a_pack() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.mfx");
    mfx_formats::testing::write_tiny_pack(&p).unwrap();
    let ps = p.to_str().unwrap();
    for (name, args) in [
        ("inspect", vec!["inspect", ps]),
        ("inspect_list", vec!["inspect", "--list", ps]),
    ] {
        let o = mfx(&args);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        snap(name, &text(&o.stdout), Some(dir.path()));
    }
}

#[test]
fn error_bad_ram() {
    // A usage error (exit 2), refused before any model is looked at.
    for cmd in ["run", "bench", "plan", "pull", "serve"] {
        let mut args = vec![cmd, "model.mfx", "--ram", "lots"];
        if cmd == "run" {
            args.extend(["--prompt", "x"]);
        }
        let err = failure(&mfx(&args), 2);
        assert!(err.contains("'--ram <SIZE"), "{cmd}: {err}");
        if cmd == "run" {
            snap("error_bad_ram", &err, None);
        }
    }
    let err = failure(&mfx(&["run", "m.mfx", "--prompt", "x", "--ram", "12X"]), 2);
    snap("error_bad_ram_unit", &err, None);
    // prep takes a list; its entry is named.
    let err = failure(&mfx(&["prep", "m", "--ram", "16G,lots", "-o", "x.mfx"]), 1);
    snap("error_bad_ram_prep", &err, None);
}

#[test]
fn error_missing_model_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let m = missing.to_str().unwrap();
    let err = failure(&mfx(&["run", m, "--prompt", "x"]), 1);
    snap("error_missing_model_run", &err, Some(dir.path()));
    let err = failure(&mfx(&["inspect", &format!("{m}.mfx")]), 1);
    snap("error_missing_model_inspect", &err, Some(dir.path()));
}

#[test]
fn error_corrupt_pack() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.mfx");
    mfx_formats::testing::write_tiny_pack(&p).unwrap();
    let good = std::fs::read(&p).unwrap();
    // Truncated: refused on open.
    std::fs::write(&p, &good[..good.len() - 100]).unwrap();
    let err = failure(&mfx(&["inspect", p.to_str().unwrap()]), 1);
    snap("error_corrupt_pack_truncated", &err, Some(dir.path()));
    // A flipped byte in a blob: `verify` names the tensor.
    let pack = mfx_formats::pack::Pack::open({
        std::fs::write(&p, &good).unwrap();
        &p
    })
    .unwrap();
    let t = &pack.manifest().tensors[0];
    let at = (t.offset + t.length / 2) as usize;
    drop(pack);
    let mut bad = good.clone();
    bad[at] ^= 0x40;
    std::fs::write(&p, &bad).unwrap();
    let err = failure(&mfx(&["verify", p.to_str().unwrap()]), 1);
    snap("error_corrupt_pack_checksum", &err, Some(dir.path()));
}

#[test]
fn error_unsupported_architecture() {
    // A dense Llama config: a family mfx does not run.
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(shared().join("fixtures/qwen3_moe/config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"qwen3_moe\"", "\"llama\""),
    )
    .unwrap();
    for f in std::fs::read_dir(shared().join("fixtures/qwen3_moe")).unwrap() {
        let f = f.unwrap().path();
        if f.extension()
            .is_some_and(|e| e == "safetensors" || e == "json")
            && f.file_name().is_some_and(|n| n != "config.json")
        {
            std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
    }
    let d = dir.path().to_str().unwrap();
    let err = failure(&mfx(&["eval", "greedy", d, "--ids", "1,2,3", "-n", "1"]), 1);
    snap("error_unsupported_architecture", &err, Some(dir.path()));
}

#[test]
fn error_budget_below_minimum() {
    // A checkpoint directory keeps every tensor resident: its minimum is
    // the files plus the working reserve (thread count pinned by -t 1).
    let tiny = shared().join("models/tiny-qwen3-moe-coder");
    let args = [
        "-t",
        "1",
        "run",
        tiny.to_str().unwrap(),
        "--prompt",
        "x",
        "--ram",
        "1M",
    ];
    let err = failure(&mfx(&args), 1);
    snap("error_budget_below_minimum", &err, None);
}
