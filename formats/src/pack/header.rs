//! The fixed 128-byte header at offset 0 (docs/FORMAT.md section 4).
//!
//! Fixed-size and little-endian so a reader can tell "not a pack", "newer
//! format" and "damaged" apart before trusting a single offset.

use crate::error::FormatError;

pub const MAGIC: [u8; 8] = *b"MFXPACK\0";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 128;
/// Default blob alignment: Apple Silicon's 16 KiB page (a multiple of x86's 4 KiB).
pub const DEFAULT_ALIGNMENT: u32 = 16 * 1024;
pub const MIN_ALIGNMENT: u32 = 4096;
pub const MAX_ALIGNMENT: u32 = 1 << 20;
pub const MAX_MANIFEST_LEN: u64 = 1 << 30;
/// Bits 0..31 of `flags`: features a reader must understand.
pub const INCOMPATIBLE_FLAGS_MASK: u64 = 0xffff_ffff;
/// Incompatible bit 0: the pack holds `mxfp4` tensors or expert parts
/// (docs/FORMAT.md section 7). Set so that a reader from before MXFP4
/// refuses the pack at the header, naming `flags`, instead of failing later
/// on an unknown scheme name.
pub const FLAG_MXFP4: u64 = 1;
/// The incompatible bits this reader understands.
pub const KNOWN_INCOMPATIBLE_FLAGS: u64 = FLAG_MXFP4;

const CHECKSUM_AT: usize = 120;

/// The decoded header. Offsets are absolute file offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub format_version: u32,
    pub flags: u64,
    pub alignment: u32,
    pub data_offset: u64,
    pub data_length: u64,
    pub manifest_offset: u64,
    pub manifest_length: u64,
    pub manifest_checksum: u64,
    pub file_length: u64,
}

pub(crate) fn align_up(x: u64, a: u64) -> Option<u64> {
    debug_assert!(a.is_power_of_two());
    x.checked_add(a - 1).map(|v| v & !(a - 1))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// xxh3 of the header bytes with the checksum field zeroed.
pub fn header_checksum(bytes: &[u8; HEADER_LEN]) -> u64 {
    let mut b = *bytes;
    b[CHECKSUM_AT..].fill(0);
    xxhash_rust::xxh3::xxh3_64(&b)
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.flags.to_le_bytes());
        b[24..28].copy_from_slice(&self.alignment.to_le_bytes());
        b[32..40].copy_from_slice(&self.data_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.data_length.to_le_bytes());
        b[48..56].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.manifest_length.to_le_bytes());
        b[64..72].copy_from_slice(&self.manifest_checksum.to_le_bytes());
        b[72..80].copy_from_slice(&self.file_length.to_le_bytes());
        let c = header_checksum(&b);
        b[CHECKSUM_AT..].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Decodes and validates the header from the first bytes of a file of
    /// `file_len` bytes (`prefix` holds up to [`HEADER_LEN`] of them), in the
    /// order FORMAT.md section 4 prescribes.
    pub fn decode(prefix: &[u8], file_len: u64) -> Result<Header, FormatError> {
        let magic_have = prefix.len().min(MAGIC.len());
        if prefix[..magic_have] != MAGIC[..magic_have] {
            return Err(FormatError::BadMagic {
                found: prefix[..magic_have].to_vec(),
            });
        }
        if prefix.len() < HEADER_LEN {
            return Err(FormatError::Truncated {
                section: "header",
                need: HEADER_LEN as u64,
                have: file_len,
            });
        }
        let format_version = u32_at(prefix, 8);
        if format_version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: format_version,
                supported: FORMAT_VERSION,
            });
        }
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(&prefix[..HEADER_LEN]);
        let stored = u64_at(&raw, CHECKSUM_AT);
        let computed = header_checksum(&raw);
        if stored != computed {
            return Err(FormatError::Checksum {
                what: "header".into(),
                expected: stored,
                found: computed,
            });
        }
        let bad = |field: &'static str, reason: String| FormatError::BadHeader { field, reason };
        let header_length = u32_at(&raw, 12);
        if header_length as usize != HEADER_LEN {
            return Err(bad(
                "header_length",
                format!("{header_length}, expected {HEADER_LEN}"),
            ));
        }
        let h = Header {
            format_version,
            flags: u64_at(&raw, 16),
            alignment: u32_at(&raw, 24),
            data_offset: u64_at(&raw, 32),
            data_length: u64_at(&raw, 40),
            manifest_offset: u64_at(&raw, 48),
            manifest_length: u64_at(&raw, 56),
            manifest_checksum: u64_at(&raw, 64),
            file_length: u64_at(&raw, 72),
        };
        let unknown = h.flags & INCOMPATIBLE_FLAGS_MASK & !KNOWN_INCOMPATIBLE_FLAGS;
        if unknown != 0 {
            return Err(bad(
                "flags",
                format!("unknown incompatible feature bits {unknown:#x} (written by a newer mfx?)"),
            ));
        }
        if !h.alignment.is_power_of_two() || !(MIN_ALIGNMENT..=MAX_ALIGNMENT).contains(&h.alignment)
        {
            return Err(bad(
                "alignment",
                format!(
                    "{} is not a power of two in [{MIN_ALIGNMENT}, {MAX_ALIGNMENT}]",
                    h.alignment
                ),
            ));
        }
        if u32_at(&raw, 28) != 0 || raw[80..120].iter().any(|&b| b != 0) {
            return Err(bad("reserved", "reserved bytes must be zero".into()));
        }
        if h.data_offset != h.alignment as u64 {
            return Err(bad(
                "data_offset",
                format!("{}, expected the alignment {}", h.data_offset, h.alignment),
            ));
        }
        let data_end = h
            .data_offset
            .checked_add(h.data_length)
            .ok_or_else(|| bad("data_length", format!("{} overflows", h.data_length)))?;
        let want_manifest =
            align_up(data_end, 8).ok_or_else(|| bad("data_length", "overflows".into()))?;
        if h.manifest_offset != want_manifest {
            return Err(bad(
                "manifest_offset",
                format!(
                    "{}, expected {want_manifest} (data end rounded up to 8)",
                    h.manifest_offset
                ),
            ));
        }
        if h.manifest_length == 0 || h.manifest_length > MAX_MANIFEST_LEN {
            return Err(bad(
                "manifest_length",
                format!("{} is not in [1, {MAX_MANIFEST_LEN}]", h.manifest_length),
            ));
        }
        let end = h
            .manifest_offset
            .checked_add(h.manifest_length)
            .ok_or_else(|| bad("manifest_length", "overflows".into()))?;
        if h.file_length != end {
            return Err(bad(
                "file_length",
                format!("{}, expected manifest end {end}", h.file_length),
            ));
        }
        if file_len < h.file_length {
            let section = if file_len < data_end {
                "data"
            } else {
                "manifest"
            };
            return Err(FormatError::Truncated {
                section,
                need: h.file_length,
                have: file_len,
            });
        }
        if file_len > h.file_length {
            return Err(FormatError::TrailingBytes {
                expected: h.file_length,
                have: file_len - h.file_length,
            });
        }
        Ok(h)
    }

    pub fn data_end(&self) -> u64 {
        self.data_offset + self.data_length
    }
}
