//! `--ram` sizes. All suffixes are binary (`G` = `GB` = `GiB` = 2^30): RAM is
//! sold and reported in binary units, so "a 32GB machine" has 32 GiB, and
//! reading `32GB` as 32e9 would plan for 7% less memory than is there.

use crate::error::{PrepError, Result};

/// Parses `16G`, `32GB`, `48GiB`, `512M`, `1T`, `4096K` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = |msg: &str| PrepError::BadRam {
        value: s.to_string(),
        msg: msg.to_string(),
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad("expected a number followed by K, M, G or T (e.g. 32G)"));
    }
    let n: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(bad(
                "unknown unit (expected K, M, G or T, optionally followed by B or iB)",
            ))
        }
    };
    let v = n * mult as f64;
    if !v.is_finite() || !(1.0..=1e18).contains(&v) {
        return Err(bad("size out of range"));
    }
    Ok(v as u64)
}

/// Parses a comma-separated list of sizes, keeping the user's spelling for `{ram}`.
pub fn parse_list(s: &str) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        out.push((part.to_string(), parse_size(part)?));
    }
    if out.is_empty() {
        return Err(PrepError::BadRam {
            value: s.to_string(),
            msg: "empty list".into(),
        });
    }
    Ok(out)
}

/// Human-readable binary size, e.g. `1.50 GiB`.
pub fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_issue_examples() {
        assert_eq!(parse_size("16G").unwrap(), 16 << 30);
        assert_eq!(parse_size("32GB").unwrap(), 32 << 30);
        assert_eq!(parse_size("48GiB").unwrap(), 48 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        // The forms `mfx bench`/`mfx plan` accepted before sharing this parser.
        assert_eq!(parse_size("1500M").unwrap(), 1500 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("lots").is_err());
        let l = parse_list("16G, 32G,64G").unwrap();
        assert_eq!(
            l.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            ["16G", "32G", "64G"]
        );
    }

    #[test]
    fn rejects_garbage() {
        for s in ["", "G", "12X", "-3G", "0", "1e3G"] {
            assert!(parse_size(s).is_err(), "{s}");
        }
        assert!(parse_size("12X").unwrap_err().to_string().contains("12X"));
    }
}
