//! Memory sizes as users write them (`--ram 32G`) and as messages print
//! them, in one place for every command and library that takes a budget
//! (`mfx prep`, `plan`, `run`, `serve`, `eval`, `bench`, `pull`, `push`).
//!
//! All suffixes are binary (`G` = `GB` = `GiB` = 2^30): RAM is sold and
//! reported in binary units, so "a 32GB machine" has 32 GiB, and reading
//! `32GB` as 32e9 would plan for 7% less memory than is there.

/// A size that does not parse, with the text as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?}: {msg}")]
pub struct SizeError {
    pub value: String,
    pub msg: &'static str,
}

/// Parses `16G`, `32GB`, `48GiB`, `512M`, `1.5g`, `1T`, `4096K` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bad = |msg: &'static str| SizeError {
        value: s.to_string(),
        msg,
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
    fn parses_binary_sizes() {
        assert_eq!(parse_size("16G"), Ok(16 << 30));
        assert_eq!(parse_size("32GB"), Ok(32 << 30));
        assert_eq!(parse_size("48GiB"), Ok(48 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("1500M"), Ok(1500 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 2GiB "), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4096K"), Ok(4 << 20));
    }

    #[test]
    fn rejects_garbage_naming_the_value() {
        for s in ["", "G", "12X", "-3G", "0", "1e3G", "lots", "1..2G"] {
            assert!(parse_size(s).is_err(), "{s}");
        }
        let e = parse_size("12X").unwrap_err();
        assert_eq!(e.value, "12X");
        assert!(e.to_string().contains("\"12X\""), "{e}");
    }

    #[test]
    fn human_is_binary() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.50 GiB");
        assert_eq!(human(156 << 20), "156.00 MiB");
    }
}
