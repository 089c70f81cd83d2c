//! `mfx prep --ram 16G,32G`: a list of budgets, one pack each. A single
//! size is the runtime's [`parse_size`] (shared with every command that
//! takes `--ram`).

use crate::error::{PrepError, Result};
use mfx_runtime::cache::parse_size;

/// Parses a comma-separated list of sizes, keeping the user's spelling for `{ram}`.
pub fn parse_list(s: &str) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let size = parse_size(part).map_err(|e| PrepError::BadRam {
            value: e.value,
            msg: e.msg,
        })?;
        out.push((part.to_string(), size));
    }
    if out.is_empty() {
        return Err(PrepError::BadRam {
            value: s.to_string(),
            msg: "empty list",
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_list_keeping_the_spelling() {
        let l = parse_list("16G, 32G,64G").unwrap();
        assert_eq!(
            l.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            ["16G", "32G", "64G"]
        );
        assert_eq!(l[1].1, 32 << 30);
    }

    #[test]
    fn names_the_bad_entry() {
        let e = parse_list("16G,lots").unwrap_err().to_string();
        assert!(e.contains("\"lots\""), "{e}");
        assert!(parse_list(" , ").is_err());
    }
}
