//! Fuzzes model loading from a pack whose manifest passes the outer checks.
//!
//! A real pack (`mfx prep` of a fixture, see docs/FUZZING.md) is the base;
//! the input replaces part of its manifest, which is then resealed (new
//! length, file length and checksums, as formats/tests/hostile.rs does) so
//! the mutation gets past `Pack::open`'s checksums and reaches config
//! parsing, shape checks, allocation and a forward pass. The first byte
//! picks what the rest is:
//! - even: the model's `config.json` (JSON), put into the base manifest;
//! - odd: the whole manifest (JSON bytes, used as they are).
//!
//! Anything may be refused with an error; a panic, an abort, a hang or an
//! allocation past libFuzzer's `-rss_limit_mb` is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mfx_runtime::models::{self, LoadOptions};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

struct Base {
    /// The base pack up to its manifest (header, data, padding).
    prefix: Vec<u8>,
    manifest: Value,
    /// Where each case is written (one file per fuzzing process).
    case: PathBuf,
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let path = std::env::var_os("MFX_FUZZ_BASE_PACK")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("base/qwen3_moe.mfx"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: make the base pack first (docs/FUZZING.md) or set MFX_FUZZ_BASE_PACK",
                path.display()
            )
        });
        let mo = u64::from_le_bytes(bytes[48..56].try_into().expect("8 bytes")) as usize;
        let manifest = serde_json::from_slice(&bytes[mo..]).expect("base manifest is JSON");
        let dir = std::env::var_os("MFX_FUZZ_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        Base {
            prefix: bytes[..mo].to_vec(),
            manifest,
            case: dir.join(format!("mfx-fuzz-load-{}.mfx", std::process::id())),
        }
    })
}

/// The base pack with `manifest` in place of its own, header fields and
/// checksums updated so that it opens.
fn reseal(b: &Base, manifest: &[u8]) -> Vec<u8> {
    let mo = b.prefix.len();
    let mut out = Vec::with_capacity(mo + manifest.len());
    out.extend_from_slice(&b.prefix);
    out.extend_from_slice(manifest);
    out[56..64].copy_from_slice(&(manifest.len() as u64).to_le_bytes());
    out[72..80].copy_from_slice(&((mo + manifest.len()) as u64).to_le_bytes());
    mfx_formats::testing::fix_checksums(&mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let b = base();
    let manifest = if mode % 2 == 0 {
        let Ok(config) = serde_json::from_slice::<Value>(rest) else {
            return;
        };
        let mut m = b.manifest.clone();
        m["config"] = config;
        serde_json::to_vec(&m).expect("a Value serializes")
    } else {
        rest.to_vec()
    };
    std::fs::write(&b.case, reseal(b, &manifest)).expect("write the case");
    let opts = LoadOptions {
        max_context: Some(64),
        ..LoadOptions::default()
    };
    if let Ok(mut model) = models::load(&b.case, &opts) {
        let vocab = model.info().vocab_size.max(1) as u32;
        let _ = model.forward(&[0, 1 % vocab, 2 % vocab], false);
        let _ = model.forward(&[3 % vocab], false);
    }
});
