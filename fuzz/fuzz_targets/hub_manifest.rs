//! Fuzzes the hub `manifest.json` parser (src/hub/manifest.rs, compiled in
//! here by path since the CLI has no library) and the pack choice on what it
//! accepts. A manifest comes from whoever controls the repo, so beyond "no
//! panic" the target asserts what pull relies on: every accepted file name
//! is safe to hand to `hf` and to join under the cache, budgets are sorted
//! and unique, and the choice never exceeds the budget it was given.
#![no_main]

#[path = "../../src/hub"]
#[allow(dead_code)]
mod hub {
    pub mod digest;
    pub mod manifest;
    pub mod memory;
    pub mod select;
}

use hub::manifest::{check_pack_file_name, HubManifest};
use hub::select::{choose, Budget};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = HubManifest::parse(data, "fuzz manifest.json") else {
        return;
    };
    for p in &m.packs {
        assert!(check_pack_file_name(&p.file).is_ok(), "{:?}", p.file);
        assert!(!p.file.starts_with('-') && !p.file.contains(['/', '\\', '\n', '\0']));
        assert!(!p.ram_label.chars().any(char::is_control));
    }
    assert!(m.packs.windows(2).all(|w| w[0].ram_bytes < w[1].ram_bytes));
    // What pull would write back (push) parses again to the same packs.
    let json = m.to_json().expect("serializes");
    let again = HubManifest::parse(json.as_bytes(), "again").expect("own output parses");
    assert_eq!(m.packs.len(), again.packs.len());
    for (a, b) in m.packs.iter().zip(&again.packs) {
        assert_eq!((&a.file, a.ram_bytes, &a.sha256), (&b.file, b.ram_bytes, &b.sha256));
    }
    for budget in [0, 1 << 20, 1 << 30, 16 << 30, u64::MAX] {
        if let Ok(p) = choose(&m.packs, Budget::Given(budget), "fuzz/repo") {
            assert!(p.ram_bytes <= budget);
        }
        let _ = choose(&m.packs, Budget::Detected(budget), "fuzz/repo");
    }
});
