//! `mfx push` / `mfx pull` against a stand-in `hf` (tests/fake_hf/hf) placed
//! first on PATH: it accepts only the real CLI's options, logs every
//! invocation, serves a "hub" from a local folder and downloads into the real
//! cache layout. The tests pin the exact invocations, the manifest, the
//! budget-based choice, the refusal of a corrupted download and the errors.

use mfx_formats::quant::Scheme;
use mfx_formats::{Codec, PackMeta, PackWriter, PartData};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MFX: &str = env!("CARGO_BIN_EXE_mfx");
const TOKEN: &str = "hf_TestTokenDoNotPrint0123456789abcd";

fn fake_hf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_hf")
}

/// One hub + cache + log in a temp folder.
struct Hub {
    tmp: tempfile::TempDir,
}

impl Hub {
    fn new() -> Hub {
        let tmp = tempfile::tempdir().unwrap();
        for d in ["remote", "cache", "empty-path", "home"] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        Hub { tmp }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }
    fn cache(&self) -> PathBuf {
        self.p("cache")
    }
    fn remote(&self, repo: &str) -> PathBuf {
        self.p("remote").join(repo)
    }

    /// Runs mfx with the fake `hf` first on PATH (`with_hf`) or with no `hf` at all.
    fn mfx(&self, args: &[&str], with_hf: bool, env: &[(&str, &str)]) -> Output {
        let path = if with_hf {
            let sys = std::env::var("PATH").unwrap_or_default();
            format!("{}:{sys}", fake_hf_dir().display())
        } else {
            self.p("empty-path").display().to_string()
        };
        let mut c = Command::new(MFX);
        c.args(args)
            .env_clear()
            .env("PATH", path)
            .env("HOME", self.p("home"))
            .env("HF_HUB_CACHE", self.cache())
            .env("FAKE_HF_REMOTE", self.p("remote"))
            .env("FAKE_HF_LOG", self.p("hf.log"));
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("running mfx")
    }

    /// The argv of every `hf` call so far, then clears the log.
    fn calls(&self) -> Vec<Vec<String>> {
        let log = self.p("hf.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}
fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Logical weights of every test pack besides the `rows x 64` bf16 tensor:
/// q4g64 [64,128] tensor + one expert (gate/up [32,64] q4g64, down [64,32] q4g32).
const FIXED_WEIGHTS: u64 = 64 * 128 + 32 * 64 * 2 + 64 * 32;

/// A small valid pack; `rows` varies the size, `provenance` may carry a budget.
fn write_pack(path: &Path, rows: u64, provenance: Value) {
    let meta = PackMeta {
        config: json!({"model_type": "qwen3_moe"}),
        tokenizer_json: "{}".into(),
        chat_template: None,
        generation: json!({}),
        pin_profile: None,
        routing_summary: None,
        provenance,
    };
    let fill = |n: u64, seed: u8| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    let mut w = PackWriter::create(path, meta, 4096).unwrap();
    w.add_tensor(
        "a.weight",
        Scheme::Bf16,
        &[rows, 64],
        &[&fill(rows * 64 * 2, rows as u8)],
    )
    .unwrap();
    let q = Scheme::affine(4, 64).unwrap();
    let (p, s) = (fill(64 * 128 / 2, 1), fill(64 * 2 * 2, 2));
    w.add_tensor("b.weight", q, &[64, 128], &[&p, &s, &s])
        .unwrap();
    let (gp, gs) = (fill(32 * 64 / 2, 3), fill(32 * 2, 4));
    let q32 = Scheme::affine(4, 32).unwrap();
    let (dp, ds) = (fill(64 * 32 / 2, 5), fill(64 * 2, 6));
    let parts = [
        PartData {
            name: "gate_proj".into(),
            scheme: q,
            shape: vec![32, 64],
            bytes: vec![&gp, &gs, &gs],
        },
        PartData {
            name: "up_proj".into(),
            scheme: q,
            shape: vec![32, 64],
            bytes: vec![&gp, &gs, &gs],
        },
        PartData {
            name: "down_proj".into(),
            scheme: q32,
            shape: vec![64, 32],
            bytes: vec![&dp, &ds, &ds],
        },
    ];
    w.add_expert(0, 0, Codec::None, &parts).unwrap();
    w.finish().unwrap();
}

/// Three packs as `mfx prep --ram 16G,32G,64G -o m-{ram}.mfx` names them,
/// with a card. The 16G and 32G packs carry their budget in provenance the
/// way prep writes it; the 64G one only in its name.
fn prep_dir(h: &Hub) -> PathBuf {
    let d = h.p("out");
    std::fs::create_dir_all(&d).unwrap();
    write_pack(
        &d.join("m-16G.mfx"),
        64,
        json!({"options": {"ram": "16G", "ram_bytes": 16u64 << 30}}),
    );
    write_pack(
        &d.join("m-32G.mfx"),
        128,
        json!({"options": {"ram": "32G", "ram_bytes": 32u64 << 30}}),
    );
    write_pack(&d.join("m-64G.mfx"), 256, json!({"tool": "mfx prep"}));
    std::fs::write(
        d.join("README.md"),
        "---\nlibrary_name: mfx\n---\n# m for mfx\n",
    )
    .unwrap();
    let q = json!({"reference": "bf16", "rows": 2, "ctx": 64,
                   "domains": {"python": {"nll": 1.5, "ppl": 4.4817, "ref_nll": 1.45, "delta_nll": 0.05}}});
    std::fs::write(d.join("m-32G.quality.json"), q.to_string()).unwrap();
    d
}

fn push_all(h: &Hub, d: &Path, extra_env: &[(&str, &str)]) -> Output {
    let packs: Vec<String> = ["m-64G.mfx", "m-16G.mfx", "m-32G.mfx"]
        .iter()
        .map(|f| d.join(f).display().to_string())
        .collect();
    let mut args = vec!["push"];
    args.extend(packs.iter().map(String::as_str));
    args.extend(["--repo", "org/name"]);
    let mut env = vec![("FAKE_HF_LOGGED_IN", "1")];
    env.extend_from_slice(extra_env);
    h.mfx(&args, true, &env)
}

#[test]
fn push_uploads_packs_card_and_manifest_in_one_commit() {
    let h = Hub::new();
    let d = prep_dir(&h);
    let o = push_all(&h, &d, &[("HF_TOKEN", TOKEN), ("FAKE_HF_ECHO_TOKEN", "1")]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The token `hf` echoed is masked; mfx itself never prints it.
    let all = stdout(&o) + &stderr(&o);
    assert!(
        !all.contains(TOKEN) && !all.contains("TestTokenDoNotPrint"),
        "{all}"
    );
    assert!(all.contains("authenticating with ***"), "{all}");

    let calls = h.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0], argv(&["auth", "whoami"]));
    let up = &calls[1];
    assert_eq!(
        up[..5],
        argv(&[
            "upload",
            "--repo-type=model",
            "--revision=main",
            "--commit-message=mfx push: 3 pack(s) for 16G, 32G, 64G RAM",
            "--",
        ])
    );
    assert_eq!(up[5], "org/name");
    assert!(up[6].contains("mfx-push-"), "staging folder: {}", up[6]);
    assert_eq!(up[7..], argv(&["."]));

    // What landed on the "hub": the packs byte for byte, the card, the manifest.
    let r = h.remote("org/name");
    let mut files: Vec<String> = std::fs::read_dir(&r)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "README.md",
            "m-16G.mfx",
            "m-32G.mfx",
            "m-64G.mfx",
            "manifest.json"
        ]
    );
    for f in ["m-16G.mfx", "m-32G.mfx", "m-64G.mfx"] {
        assert_eq!(
            std::fs::read(r.join(f)).unwrap(),
            std::fs::read(d.join(f)).unwrap(),
            "{f}"
        );
    }
    let card = std::fs::read_to_string(r.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nlibrary_name: mfx\n---\n# m for mfx\n"),
        "{card}"
    );
    assert!(
        card.contains("## Packs in this repo") && card.contains("mfx pull org/name"),
        "{card}"
    );
    assert!(
        card.contains("| 32G | `m-32G.mfx` |") && card.contains("python NLL 1.500 (+0.050)"),
        "{card}"
    );

    let m: Value =
        serde_json::from_slice(&std::fs::read(r.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format"], "mfx-hub-manifest");
    assert_eq!(m["schema_version"], 1);
    assert_eq!(m["writer"]["name"], "mfx");
    let packs = m["packs"].as_array().unwrap();
    let labels: Vec<&str> = packs
        .iter()
        .map(|p| p["ram_label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["16G", "32G", "64G"], "sorted by budget");
    for (p, (rows, gib)) in packs.iter().zip([(64u64, 16u64), (128, 32), (256, 64)]) {
        let file = p["file"].as_str().unwrap();
        let bytes = std::fs::read(d.join(file)).unwrap();
        assert_eq!(p["ram_bytes"], gib << 30, "{file}");
        assert_eq!(p["size_bytes"], bytes.len() as u64, "{file}");
        assert_eq!(p["sha256"], sha256_hex(&bytes), "{file}");
        assert_eq!(
            p["xxh3"],
            format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)),
            "{file}"
        );
        assert_eq!(p["format_version"], 1);
        // Stored blob bytes: bf16 rows x 64, q4g64 [64,128] = 4096 packed +
        // 256 scales + 256 biases, expert = gate and up 1024+64+64 each and
        // down 1024+128+128 (codec none: stored = raw).
        let stored = rows * 64 * 2 + 4608 + 1152 * 2 + 1280;
        let want_bpw =
            (stored as f64 * 8.0 / (rows * 64 + FIXED_WEIGHTS) as f64 * 1e4).round() / 1e4;
        assert_eq!(p["bits_per_weight"].as_f64().unwrap(), want_bpw, "{file}");
    }
    assert_eq!(packs[0]["quality"], Value::Null);
    assert_eq!(packs[1]["quality"]["domains"]["python"]["nll"], 1.5);

    // Pushing the same packs again: identical manifest, the hub sees no change.
    let before = std::fs::read(r.join("manifest.json")).unwrap();
    let o = push_all(&h, &d, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("No files have been modified"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(r.join("manifest.json")).unwrap(), before);
}

#[test]
fn push_dry_run_needs_no_hf_and_prints_the_manifest() {
    let h = Hub::new();
    let d = prep_dir(&h);
    let pack = d.join("m-16G.mfx").display().to_string();
    let o = h.mfx(
        &[
            "push",
            &pack,
            "--repo",
            "org/name",
            "--private",
            "--dry-run",
        ],
        false,
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(m["packs"][0]["file"], "m-16G.mfx");
    assert!(
        stderr(&o)
            .contains("hf upload --repo-type=model --revision=main --private '--commit-message="),
        "{}",
        stderr(&o)
    );
    assert!(!h.p("hf.log").exists());
}

fn pushed_hub() -> Hub {
    let h = Hub::new();
    let d = prep_dir(&h);
    let o = push_all(&h, &d, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    h.calls();
    h
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[test]
fn pull_picks_the_largest_budget_that_fits_and_verifies_it() {
    let h = pushed_hub();
    for (ram, want) in [
        ("40G", "m-32G.mfx"),
        ("64G", "m-64G.mfx"),
        ("16GiB", "m-16G.mfx"),
        ("1T", "m-64G.mfx"),
    ] {
        let o = h.mfx(&["pull", "org/name", "--ram", ram], true, &[]);
        assert!(o.status.success(), "--ram {ram}: {}", stderr(&o));
        let calls = h.calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(
            calls[0],
            argv(&[
                "download",
                "--repo-type=model",
                "--revision=main",
                "--",
                "org/name",
                "manifest.json",
            ])
        );
        // The pack comes from the commit the manifest came from.
        assert_eq!(calls[1][..2], argv(&["download", "--repo-type=model"]));
        assert_eq!(calls[1][3..], argv(&["--", "org/name", want]));
        let commit = calls[1][2].strip_prefix("--revision=").unwrap();
        assert!(is_commit(commit), "{commit}");
        let path = PathBuf::from(stdout(&o).trim());
        assert_eq!(
            path,
            h.cache()
                .join("models--org--name/snapshots")
                .join(commit)
                .join(want)
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(h.p("out").join(want)).unwrap()
        );
    }

    let o = h.mfx(&["pull", "org/name", "--ram", "8G"], true, &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("no pack fits --ram 8.0 GiB"), "{e}");
    for f in ["16G", "m-16G.mfx", "m-32G.mfx", "m-64G.mfx"] {
        assert!(e.contains(f), "listing lacks {f}: {e}");
    }
    assert_eq!(h.calls().len(), 1, "nothing but the manifest is downloaded");
}

#[test]
fn pull_without_ram_uses_this_machines_memory() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let total = kib * 1024;
    let h = Hub::new();
    let d = h.p("out");
    std::fs::create_dir_all(&d).unwrap();
    // Budgets below, around and far above this machine's memory.
    write_pack(&d.join("s-1M.mfx"), 64, json!({}));
    write_pack(&d.join("s-half.mfx"), 128, json!({"ram_bytes": total / 2}));
    write_pack(&d.join("s-1024T.mfx"), 256, json!({}));
    std::fs::write(d.join("README.md"), "card\n").unwrap();
    let packs: Vec<String> = ["s-1M.mfx", "s-half.mfx", "s-1024T.mfx"]
        .iter()
        .map(|f| d.join(f).display().to_string())
        .collect();
    let mut args = vec!["push", "--repo", "org/sized"];
    args.extend(packs.iter().map(String::as_str));
    let o = h.mfx(&args, true, &[("FAKE_HF_LOGGED_IN", "1")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = h.mfx(&["pull", "org/sized"], true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).trim().ends_with("/s-half.mfx"), "{}", stdout(&o));
}

#[test]
fn a_corrupted_download_is_refused_and_nothing_is_deleted() {
    let h = pushed_hub();
    let o = h.mfx(
        &["pull", "org/name", "--ram", "32G"],
        true,
        &[("FAKE_HF_CORRUPT", "m-32G.mfx")],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "", "no path is printed for a bad file");
    let e = stderr(&o);
    let good = std::fs::read(h.p("out/m-32G.mfx")).unwrap();
    let blob = h
        .cache()
        .join("models--org--name/blobs")
        .join(sha256_hex(&good));
    let bad = std::fs::read(&blob).expect("the corrupt file is left in the cache");
    assert_ne!(bad, good);
    assert!(e.contains("checksum mismatch for m-32G.mfx"), "{e}");
    assert!(
        e.contains(&format!("expected sha256 {}", sha256_hex(&good))),
        "{e}"
    );
    assert!(
        e.contains(&format!("found sha256 {}", sha256_hex(&bad))),
        "{e}"
    );
}

#[test]
fn clear_errors_for_bad_repos_and_missing_or_logged_out_hf() {
    let h = pushed_hub();
    // A repo without an mfx manifest.
    std::fs::create_dir_all(h.remote("org/plain")).unwrap();
    std::fs::write(h.remote("org/plain").join("config.json"), "{}").unwrap();
    let o = h.mfx(&["pull", "org/plain", "--ram", "32G"], true, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("org/plain has no mfx manifest (manifest.json) at revision main"),
        "{}",
        stderr(&o)
    );
    // A manifest.json that is someone else's.
    std::fs::write(
        h.remote("org/plain").join("manifest.json"),
        r#"{"files": []}"#,
    )
    .unwrap();
    let o = h.mfx(&["pull", "org/plain", "--ram", "32G"], true, &[]);
    assert!(stderr(&o).contains("not an mfx manifest"), "{}", stderr(&o));
    // No such repo.
    let o = h.mfx(&["pull", "org/missing"], true, &[]);
    assert!(
        stderr(&o).contains("repository not found"),
        "{}",
        stderr(&o)
    );
    // Not a repo id at all.
    let o = h.mfx(&["pull", "not-a-repo"], true, &[]);
    assert!(
        stderr(&o).contains("is not a hub repo id"),
        "{}",
        stderr(&o)
    );
    h.calls();

    // No `hf` on PATH: say how to install it and log in.
    let o = h.mfx(&["pull", "org/name", "--ram", "32G"], false, &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("`hf` was not found on PATH")
            && e.contains("pip install -U \"huggingface_hub>=0.34\""),
        "{e}"
    );
    assert!(e.contains("hf auth login"), "{e}");
    let pack = h.p("out/m-16G.mfx").display().to_string();
    let o = h.mfx(&["push", &pack, "--repo", "org/name"], false, &[]);
    assert!(
        stderr(&o).contains("`hf` was not found on PATH"),
        "{}",
        stderr(&o)
    );

    // Logged out: push stops before uploading anything.
    let o = h.mfx(&["push", &pack, "--repo", "org/new"], true, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not logged in to the Hugging Face hub: run `hf auth login`"),
        "{}",
        stderr(&o)
    );
    assert_eq!(h.calls(), vec![argv(&["auth", "whoami"])]);
    assert!(!h.remote("org/new").exists());
}

#[test]
fn push_rejects_packs_it_cannot_describe() {
    let h = Hub::new();
    let d = h.p("out");
    std::fs::create_dir_all(&d).unwrap();
    write_pack(&d.join("model.mfx"), 64, json!({}));
    let p = d.join("model.mfx").display().to_string();
    // No card beside it.
    let o = h.mfx(&["push", &p, "--repo", "org/name", "--dry-run"], false, &[]);
    assert!(
        stderr(&o).contains("no model card") && stderr(&o).contains("--card"),
        "{}",
        stderr(&o)
    );
    // No budget in provenance or name.
    std::fs::write(d.join("README.md"), "card\n").unwrap();
    let o = h.mfx(&["push", &p, "--repo", "org/name", "--dry-run"], false, &[]);
    assert!(
        stderr(&o).contains("cannot tell which RAM budget"),
        "{}",
        stderr(&o)
    );
    // Not a pack.
    std::fs::write(d.join("x-16G.mfx"), b"not a pack").unwrap();
    let x = d.join("x-16G.mfx").display().to_string();
    let o = h.mfx(&["push", &x, "--repo", "org/name", "--dry-run"], false, &[]);
    assert!(
        stderr(&o).contains("x-16G.mfx: not a valid .mfx pack"),
        "{}",
        stderr(&o)
    );
    // Two packs for one budget.
    write_pack(&d.join("a-16G.mfx"), 64, json!({}));
    write_pack(&d.join("b-16G.mfx"), 128, json!({}));
    let (a, b) = (
        d.join("a-16G.mfx").display().to_string(),
        d.join("b-16G.mfx").display().to_string(),
    );
    let o = h.mfx(
        &["push", &a, &b, "--repo", "org/name", "--dry-run"],
        false,
        &[],
    );
    assert!(stderr(&o).contains("same RAM budget"), "{}", stderr(&o));
}

/// Issue 16 item 7: a manifest is whoever-owns-the-repo's input. A file
/// name like `--local-dir=injected` reached `hf download` as an option, and
/// newline/NUL were accepted. Now the manifest is refused before any pack
/// download, and every `hf` call ends its options with `--`.
#[test]
fn option_injection_into_hf_is_refused() {
    let h = pushed_hub();
    let good: Value =
        serde_json::from_slice(&std::fs::read(h.remote("org/name").join("manifest.json")).unwrap())
            .unwrap();
    for (i, (name, why)) in [
        ("--local-dir=injected", "starts with `-`"),
        ("-x.mfx", "starts with `-`"),
        ("a\nb.mfx", "control character"),
        ("a\u{0}b.mfx", "control character"),
        ("a\u{1b}[2Jb.mfx", "control character"),
        ("../up.mfx", "starts with `.`"),
        ("x/../../up.mfx", "path separator"),
        ("a\\b.mfx", "path separator"),
        ("C:x.mfx", "path separator"),
        ("a..b.mfx", "`..`"),
        ("manifest.json", "does not end in `.mfx`"),
        (".mfx", "starts with `.`"),
    ]
    .into_iter()
    .enumerate()
    {
        let repo = format!("org/evil{i}");
        let mut m = good.clone();
        // The budget that `--ram 64G` picks, so the bad name would be the download.
        m["packs"][2]["file"] = Value::String(name.to_owned());
        std::fs::create_dir_all(h.remote(&repo)).unwrap();
        std::fs::write(
            h.remote(&repo).join("manifest.json"),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        let o = h.mfx(&["pull", &repo, "--ram", "64G"], true, &[]);
        assert_eq!(o.status.code(), Some(1), "{name:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("`file` must be a plain `.mfx` file name") && e.contains(why),
            "{name:?}: {e}"
        );
        // Only the manifest was fetched, with the options before `--`.
        let calls = h.calls();
        assert_eq!(
            calls,
            vec![argv(&[
                "download",
                "--repo-type=model",
                "--revision=main",
                "--",
                &repo,
                "manifest.json"
            ])],
            "{name:?}"
        );
        assert!(!h.p("injected").exists() && !h.p("home/injected").exists());
    }

    // A revision is a value too: refused before `hf` runs.
    for rev in ["--local-dir=injected", "../../x", "a\nb"] {
        let flag = format!("--revision={rev}");
        let o = h.mfx(&["pull", "org/name", "--ram", "64G", &flag], true, &[]);
        assert_eq!(o.status.code(), Some(1), "{rev:?}");
        assert!(
            stderr(&o).contains("is not a branch, tag or commit name"),
            "{rev:?}: {}",
            stderr(&o)
        );
        assert!(h.calls().is_empty(), "{rev:?}");
    }
    // ... also as `ORG/NAME@REV` of `mfx run`.
    let o = h.mfx(
        &["run", "org/name@--local-dir=injected", "-p", "hi"],
        true,
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is not a branch, tag or commit name"),
        "{}",
        stderr(&o)
    );
    assert!(h.calls().is_empty());

    // And the legitimate pull still works through `--`.
    let o = h.mfx(&["pull", "org/name", "--ram", "64G"], true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let calls = h.calls();
    assert_eq!(calls[1][..2], argv(&["download", "--repo-type=model"]));
    assert!(calls[1][2].starts_with("--revision="), "{calls:?}");
    assert_eq!(calls[1][3..], argv(&["--", "org/name", "m-64G.mfx"]));
}

/// Issue 16 item 8: `mfx push` uploaded a pack that fails `mfx verify`, and
/// `pull` then reported "sha256 ok". Push now runs verify's checks on every
/// pack first, names the damaged blob and uploads nothing.
#[test]
fn push_refuses_a_pack_that_fails_verify() {
    let h = Hub::new();
    let d = prep_dir(&h);
    let bad = d.join("m-32G.mfx");
    let entry = mfx_formats::Pack::open(&bad)
        .unwrap()
        .manifest()
        .tensors
        .iter()
        .find(|t| t.name == "a.weight")
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(&bad).unwrap();
    bytes[(entry.offset + entry.length / 2) as usize] ^= 0x40;
    std::fs::write(&bad, &bytes).unwrap();

    for extra in [&["--dry-run"][..], &[]] {
        let mut args = vec!["push"];
        let packs: Vec<String> = ["m-16G.mfx", "m-32G.mfx"]
            .iter()
            .map(|f| d.join(f).display().to_string())
            .collect();
        args.extend(packs.iter().map(String::as_str));
        args.extend(["--repo", "org/name"]);
        args.extend(extra);
        let o = h.mfx(&args, true, &[("FAKE_HF_LOGGED_IN", "1")]);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("m-32G.mfx fails `mfx verify`; refusing to publish it")
                && e.contains("a.weight"),
            "{extra:?}: {e}"
        );
        assert_eq!(stdout(&o), "", "{extra:?}: no manifest printed");
        let calls = h.calls();
        assert!(
            calls.iter().all(|c| c[0] != "upload"),
            "{extra:?}: {calls:?}"
        );
        assert!(!h.remote("org/name").exists(), "{extra:?}");
    }
}

/// Issue 16 item 8: `mfx run ORG/NAME --ram X` chose by this machine's
/// memory and ignored `--ram`, so it ran another pack than `mfx pull
/// ORG/NAME --ram X` downloads. Both now choose with the same budget.
#[test]
fn run_and_pull_with_ram_pick_the_same_pack() {
    let h = pushed_hub();
    // 16G/32G/64G are published; whatever this machine has, only the
    // budget can make the choice 32G.
    let o = h.mfx(&["pull", "org/name", "--ram", "40G"], true, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pulled = stdout(&o).trim().to_owned();
    assert!(pulled.ends_with("/m-32G.mfx"), "{pulled}");
    let pull_calls = h.calls();

    // The test packs are valid packs but not runnable models, so run stops
    // at loading; what matters is which pack it pulled and tried to load.
    let o = h.mfx(
        &[
            "run",
            "org/name",
            "--ram",
            "40G",
            "-p",
            "hi",
            "--max-tokens",
            "1",
        ],
        true,
        &[],
    );
    let e = stderr(&o);
    assert!(
        e.contains("org/name: using m-32G.mfx (prepared for 32G RAM)"),
        "{e}"
    );
    assert!(e.contains(&format!("loading {pulled}")), "{e}");
    assert_eq!(
        h.calls(),
        pull_calls,
        "run made the same `hf` calls as pull"
    );

    // A budget under every pack: run refuses as pull does.
    let o = h.mfx(&["run", "org/name", "--ram", "8G", "-p", "hi"], true, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no pack fits --ram 8.0 GiB"),
        "{}",
        stderr(&o)
    );
}
