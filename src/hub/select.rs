//! Which published pack to use on this machine: the one prepared for the
//! largest budget that still fits. A larger budget means more experts pinned
//! in RAM and more at high precision, so it is both faster and better; a
//! budget above the machine's memory would thrash or be killed.

use super::manifest::PackRecord;
use super::memory::fits_detected;
use anyhow::{bail, Result};
use mfx_formats::pack::FORMAT_VERSION;

/// How much memory the pack may assume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// `--ram`: taken literally.
    Given(u64),
    /// The machine's total as the OS reports it (see [`fits_detected`]).
    Detected(u64),
}

impl Budget {
    fn admits(&self, ram_bytes: u64) -> bool {
        match *self {
            Budget::Given(b) => ram_bytes <= b,
            Budget::Detected(d) => fits_detected(ram_bytes, d),
        }
    }

    fn describe(&self) -> String {
        match *self {
            Budget::Given(b) => format!("--ram {}", human(b)),
            Budget::Detected(d) => format!("this machine's {} of memory", human(d)),
        }
    }
}

/// Picks the pack for `budget` from `packs` (a validated manifest's list).
/// Packs of a `.mfx` format version this mfx cannot read are never chosen.
pub fn choose<'a>(packs: &'a [PackRecord], budget: Budget, repo: &str) -> Result<&'a PackRecord> {
    let readable: Vec<&PackRecord> = packs
        .iter()
        .filter(|p| p.format_version == FORMAT_VERSION)
        .collect();
    if readable.is_empty() {
        let found: Vec<String> = packs
            .iter()
            .map(|p| format!("{} (v{})", p.file, p.format_version))
            .collect();
        bail!(
            "{repo}: no pack in .mfx format version {FORMAT_VERSION}, the one this mfx reads (found: {}); upgrade mfx",
            found.join(", ")
        );
    }
    let best = readable
        .iter()
        .filter(|p| budget.admits(p.ram_bytes))
        .max_by_key(|p| p.ram_bytes);
    match best {
        Some(p) => Ok(p),
        None => bail!(
            "{repo}: no pack fits {}. Published packs:\n{}\nPass --ram with one of these budgets to take one anyway, \
             or prep the model for a smaller budget.",
            budget.describe(),
            listing(packs)
        ),
    }
}

/// One line per pack, for errors and `mfx pull --list`.
pub fn listing(packs: &[PackRecord]) -> String {
    packs
        .iter()
        .map(|p| {
            format!(
                "  {:<6} {}  ({}, {:.2} bits/weight)",
                p.ram_label,
                p.file,
                human(p.size_bytes),
                p.bits_per_weight
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(label: &str, gib: u64) -> PackRecord {
        PackRecord {
            file: format!("m-{label}.mfx"),
            ram_label: label.into(),
            ram_bytes: gib << 30,
            size_bytes: (gib << 30) / 2,
            bits_per_weight: 3.0,
            sha256: "0".repeat(64),
            xxh3: "0".repeat(16),
            format_version: FORMAT_VERSION,
            quality: None,
        }
    }

    #[test]
    fn picks_the_largest_budget_that_fits() {
        let packs = vec![rec("16G", 16), rec("32G", 32), rec("64G", 64)];
        let pick = |b| choose(&packs, b, "o/n").map(|p| p.ram_label.clone());
        assert_eq!(pick(Budget::Given(40 << 30)).unwrap(), "32G");
        assert_eq!(pick(Budget::Given(32 << 30)).unwrap(), "32G");
        assert_eq!(pick(Budget::Given((32 << 30) - 1)).unwrap(), "16G");
        assert_eq!(pick(Budget::Given(1 << 50)).unwrap(), "64G");
        // What Linux reports on a 32 GiB machine.
        assert_eq!(pick(Budget::Detected(32803144 * 1024)).unwrap(), "32G");
        let err = pick(Budget::Given(8 << 30)).unwrap_err().to_string();
        assert!(err.contains("no pack fits --ram 8.0 GiB"), "{err}");
        for l in ["16G", "32G", "64G", "m-64G.mfx"] {
            assert!(err.contains(l), "{err}");
        }
    }

    #[test]
    fn skips_unreadable_format_versions() {
        let mut packs = vec![rec("16G", 16), rec("32G", 32)];
        packs[1].format_version = FORMAT_VERSION + 1;
        assert_eq!(
            choose(&packs, Budget::Given(64 << 30), "o/n")
                .unwrap()
                .ram_label,
            "16G"
        );
        packs[0].format_version = FORMAT_VERSION + 1;
        let err = choose(&packs, Budget::Given(64 << 30), "o/n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("upgrade mfx"), "{err}");
    }
}
