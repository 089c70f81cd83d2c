//! Physical memory of this machine, to pick the pack that fits when the user
//! gives no `--ram`. (`mfx_runtime::memory` measures this *process*'s RSS;
//! the machine total is only needed here.)

use anyhow::{Context, Result};

/// Total physical memory in bytes: `MemTotal` of `/proc/meminfo` on Linux,
/// `sysctl -n hw.memsize` on macOS.
pub fn total_ram_bytes() -> Result<u64> {
    #[cfg(target_os = "linux")]
    {
        let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        parse_meminfo_total(&text).context("/proc/meminfo has no readable `MemTotal: N kB` line")
    }
    #[cfg(target_os = "macos")]
    {
        let out = std::process::Command::new("sysctl")
            // `--` as on every subprocess mfx runs (the name is constant
            // here, but no positional may ever be read as an option).
            .args(["-n", "--", "hw.memsize"])
            .output()
            .context("running `sysctl -n hw.memsize`")?;
        let s = String::from_utf8_lossy(&out.stdout);
        match s.trim().parse::<u64>() {
            Ok(v) if out.status.success() && v > 0 => Ok(v),
            _ => anyhow::bail!(
                "`sysctl -n hw.memsize` printed {:?}, expected a byte count",
                s.trim()
            ),
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        anyhow::bail!("cannot detect this machine's memory on this OS: pass --ram (e.g. --ram 32G)")
    }
}

/// The `MemTotal:` line of `/proc/meminfo`, in bytes.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut it = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

/// Whether a pack prepared for `budget` bytes fits a machine whose kernel
/// reports `detected` bytes. The kernel reports less than the installed RAM
/// (firmware and kernel reservations: a 32 GiB Linux box shows ~31.3 GiB), so
/// a detected total counts as the installed size if it is within 1/32
/// (~3%) below it; without this a 32G pack would never be chosen on a 32 GB
/// machine. An explicit `--ram` is taken literally instead.
pub fn fits_detected(budget: u64, detected: u64) -> bool {
    budget <= detected.saturating_add(detected / 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memtotal() {
        let t = "MemTotal:       32803144 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_meminfo_total(t), Some(32803144 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 3 kB\n"), None);
        assert_eq!(parse_meminfo_total("MemTotal: 3 MB\n"), None);
        #[cfg(target_os = "linux")]
        assert!(total_ram_bytes().unwrap() > 16 << 20);
    }

    #[test]
    fn detected_memory_has_slack_for_kernel_reservations() {
        let g = 1u64 << 30;
        // A 32 GiB machine as Linux reports it.
        assert!(fits_detected(32 * g, 32803144 * 1024));
        assert!(!fits_detected(64 * g, 32803144 * 1024));
        // 28 GiB is not a 32 GiB machine.
        assert!(!fits_detected(32 * g, 28 * g));
    }
}
