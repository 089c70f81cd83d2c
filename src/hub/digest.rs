//! Whole-file checksums of a pack: sha256 (what the hub's LFS/xet storage
//! names a file by, so a published checksum can be compared with the hub's
//! own listing) and xxh3-64 (the hash the `.mfx` format uses everywhere else,
//! cheap enough to recheck often). Both are computed in one streaming pass.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use xxhash_rust::xxh3::Xxh3;

/// Size and checksums of one file, as lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub size: u64,
    /// 64 hex digits.
    pub sha256: String,
    /// 16 hex digits, the u64 most significant digit first (as in FORMAT.md).
    pub xxh3: String,
}

/// Reads `path` once, 4 MiB at a time, feeding both hashes.
pub fn digest_file(path: &Path) -> Result<FileDigest> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut sha = Sha256::new();
    let mut xx = Xxh3::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        sha.update(&buf[..n]);
        xx.update(&buf[..n]);
        size += n as u64;
    }
    let sha256 = sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(FileDigest {
        size,
        sha256,
        xxh3: format!("{:016x}", xx.digest()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_known_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        let d = digest_file(&p).unwrap();
        assert_eq!(d.size, 3);
        // FIPS 180-2 test vector.
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            d.xxh3,
            format!("{:016x}", xxhash_rust::xxh3::xxh3_64(b"abc"))
        );
        // Larger than one buffer, so the streaming path is exercised.
        let big: Vec<u8> = (0..(9u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&p, &big).unwrap();
        let d = digest_file(&p).unwrap();
        assert_eq!(d.size, big.len() as u64);
        assert_eq!(d.xxh3, format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&big)));
        let want: String = Sha256::digest(&big)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(d.sha256, want);
    }
}
