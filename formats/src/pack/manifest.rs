//! The JSON manifest (docs/FORMAT.md section 6) and its validation.
//!
//! JSON because the manifest embeds JSON already (config, tokenizer, profiles)
//! and because a person debugging a pack can read it with `jq`; the tables are
//! small next to the data (tens of bytes per tensor or expert).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::header::{align_up, Header, FLAG_MXFP4};
use super::layout::{TensorLayout, PART_ALIGN};
use crate::codec::{self, Codec};
use crate::error::FormatError;
use crate::quant::Scheme;

pub const MAX_TENSORS: u64 = 1 << 20;
pub const MAX_EXPERTS: u64 = 1 << 24;
pub const MAX_PARTS: u64 = 16;
pub const MAX_NAME_LEN: usize = 1024;
pub const MAX_PART_NAME_LEN: usize = 64;
pub const MAX_RAW_LEN: u64 = 64 << 30;

/// A u64 xxh3 checksum, written as 16 lowercase hex digits in JSON because
/// JSON numbers above 2^53 are not portable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Checksum(pub u64);

impl Serialize for Checksum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:016x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() != 16
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(serde::de::Error::custom(format!(
                "checksum {s:?} is not 16 lowercase hex digits"
            )));
        }
        u64::from_str_radix(&s, 16)
            .map(Checksum)
            .map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Which program wrote the pack: versioned metadata, not the format version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriterInfo {
    pub name: String,
    pub version: String,
}

/// One dense tensor (section 6.1). `offset` is absolute in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub scheme: Scheme,
    /// Logical (unquantized) shape; rows = product of leading dims.
    pub shape: Vec<u64>,
    pub offset: u64,
    pub length: u64,
    pub checksum: Checksum,
}

/// One projection inside an expert's decoded blob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertPart {
    /// Canonical: `gate_proj`, `up_proj`, `down_proj` (Mixtral's w1, w3, w2).
    pub name: String,
    pub scheme: Scheme,
    pub shape: Vec<u64>,
    /// Offset within the *decoded* blob; 64-byte aligned.
    pub offset: u64,
}

/// One routed expert (section 6.2). `offset`/`length` are the stored bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertEntry {
    pub layer: u32,
    pub expert: u32,
    pub offset: u64,
    pub length: u64,
    pub raw_length: u64,
    pub codec: Codec,
    pub checksum: Checksum,
    /// When set, this entry shares the blob of expert `merged_into` of the
    /// same layer, and every blob field equals that entry's.
    pub merged_into: Option<u32>,
    pub parts: Vec<ExpertPart>,
}

impl ExpertEntry {
    /// "expert L3 E17", the name errors and `mfx verify` use.
    pub fn label(&self) -> String {
        expert_label(self.layer, self.expert)
    }

    /// The layout of part `i` inside the decoded blob.
    pub fn part_layout(&self, i: usize) -> Option<(u64, TensorLayout)> {
        let p = self.parts.get(i)?;
        TensorLayout::of(p.scheme, &p.shape)
            .ok()
            .map(|l| (p.offset, l))
    }

    /// Index of the part called `name`.
    pub fn part_index(&self, name: &str) -> Option<usize> {
        self.parts.iter().position(|p| p.name == name)
    }

    fn same_blob(&self, o: &ExpertEntry) -> bool {
        self.offset == o.offset
            && self.length == o.length
            && self.raw_length == o.raw_length
            && self.codec == o.codec
            && self.checksum == o.checksum
            && self.parts == o.parts
    }
}

pub fn expert_label(layer: u32, expert: u32) -> String {
    format!("expert L{layer} E{expert}")
}

/// The whole manifest. Field order is the serialization order (determinism).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub writer: WriterInfo,
    /// The source model's config.json, as read.
    pub config: serde_json::Value,
    /// The source tokenizer.json, byte for byte.
    pub tokenizer_json: String,
    pub chat_template: Option<String>,
    pub generation: serde_json::Value,
    pub pin_profile: Option<serde_json::Value>,
    pub routing_summary: Option<serde_json::Value>,
    pub provenance: serde_json::Value,
    pub tensors: Vec<TensorEntry>,
    pub experts: Vec<ExpertEntry>,
}

/// Lookup tables built once at open: tables are sorted, so these are only
/// for O(1) access on the hot path.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub tensors: HashMap<String, usize>,
    pub experts: HashMap<(u32, u32), usize>,
}

/// Parses manifest bytes, reporting the JSON path of the first problem.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, FormatError> {
    // Count-cap before building big vectors: serde_json allocates per element,
    // bounded by the (capped) manifest size, so this is about clear errors.
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let m: Manifest = serde_path_to_error::deserialize(de).map_err(|e| FormatError::Manifest {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })?;
    Ok(m)
}

fn check_range(what: &str, offset: u64, length: u64, h: &Header) -> Result<u64, FormatError> {
    let out = || FormatError::RangeOutOfFile {
        what: what.to_string(),
        section: "data section",
        offset,
        length,
        start: h.data_offset,
        end: h.data_end(),
    };
    let end = offset.checked_add(length).ok_or_else(out)?;
    if offset < h.data_offset || end > h.data_end() {
        return Err(out());
    }
    if !offset.is_multiple_of(h.alignment as u64) {
        return Err(FormatError::Misaligned {
            what: what.to_string(),
            offset,
            alignment: h.alignment as u64,
        });
    }
    Ok(end)
}

/// A pack with an `mxfp4` tensor or part must carry [`FLAG_MXFP4`], so
/// that readers from before MXFP4 refuse it at the header.
fn check_mxfp4_flag(m: &Manifest, h: &Header) -> Result<(), FormatError> {
    if h.flags & FLAG_MXFP4 != 0 {
        return Ok(());
    }
    let first = m
        .tensors
        .iter()
        .find(|t| t.scheme == Scheme::Mxfp4)
        .map(|t| format!("tensor {}", t.name))
        .or_else(|| {
            m.experts
                .iter()
                .find(|e| e.parts.iter().any(|p| p.scheme == Scheme::Mxfp4))
                .map(|e| e.label())
        });
    match first {
        None => Ok(()),
        Some(what) => Err(FormatError::BadHeader {
            field: "flags",
            reason: format!("{what} is mxfp4 but the mxfp4 feature bit (0) is not set"),
        }),
    }
}

/// Checks every rule of FORMAT.md section 6 against the header: caps, order,
/// uniqueness, sizes implied by schemes, ranges inside the data section and
/// pairwise non-overlap. Returns the lookup index.
pub(crate) fn validate(m: &Manifest, h: &Header) -> Result<Index, FormatError> {
    let cap = |field: &'static str, count: usize, cap: u64| {
        if count as u64 > cap {
            Err(FormatError::TooMany {
                field,
                count: count as u64,
                cap,
            })
        } else {
            Ok(())
        }
    };
    cap("tensors", m.tensors.len(), MAX_TENSORS)?;
    cap("experts", m.experts.len(), MAX_EXPERTS)?;
    check_mxfp4_flag(m, h)?;

    let mut index = Index::default();
    // (start, end, label) of every distinct blob, for the overlap check.
    let mut ranges: Vec<(u64, u64, String)> = Vec::with_capacity(m.tensors.len() + m.experts.len());

    for (i, t) in m.tensors.iter().enumerate() {
        let what = format!("tensor {}", t.name);
        if t.name.is_empty() || t.name.len() > MAX_NAME_LEN {
            return Err(FormatError::invalid(
                format!("tensors[{i}]"),
                format!("name length {} not in 1..={MAX_NAME_LEN}", t.name.len()),
            ));
        }
        if i > 0 && m.tensors[i - 1].name.as_bytes() >= t.name.as_bytes() {
            return Err(FormatError::Order {
                what: "tensors",
                prev: m.tensors[i - 1].name.clone(),
                got: t.name.clone(),
            });
        }
        let layout = TensorLayout::of(t.scheme, &t.shape)
            .map_err(|r| FormatError::invalid(&what, format!("{} {:?}: {r}", t.scheme, t.shape)))?;
        if layout.length != t.length {
            return Err(FormatError::invalid(
                &what,
                format!(
                    "length {} but {} {:?} needs {}",
                    t.length, t.scheme, t.shape, layout.length
                ),
            ));
        }
        let end = check_range(&what, t.offset, t.length, h)?;
        ranges.push((t.offset, end, what));
        index.tensors.insert(t.name.clone(), i);
    }

    for (i, e) in m.experts.iter().enumerate() {
        let what = e.label();
        if i > 0 {
            let p = &m.experts[i - 1];
            if (p.layer, p.expert) >= (e.layer, e.expert) {
                return Err(FormatError::Order {
                    what: "experts",
                    prev: p.label(),
                    got: what,
                });
            }
        }
        index.experts.insert((e.layer, e.expert), i);
    }

    for e in &m.experts {
        let what = e.label();
        if let Some(r) = e.merged_into {
            let rep = index
                .experts
                .get(&(e.layer, r))
                .map(|&j| &m.experts[j])
                .ok_or_else(|| {
                    FormatError::invalid(
                        &what,
                        format!("merged_into {r}, but layer {} has no expert {r}", e.layer),
                    )
                })?;
            if rep.merged_into.is_some() || rep.expert == e.expert {
                return Err(FormatError::invalid(
                    &what,
                    format!("merged_into {r}, which is itself merged"),
                ));
            }
            if !e.same_blob(rep) {
                return Err(FormatError::invalid(
                    &what,
                    format!(
                        "merged into {} but its blob fields differ from it",
                        rep.label()
                    ),
                ));
            }
            continue; // the representative's checks cover the shared blob
        }
        validate_expert_blob(e)?;
        let end = check_range(&what, e.offset, e.length, h)?;
        ranges.push((e.offset, end, what));
    }

    ranges.sort_by_key(|r| (r.0, r.1));
    for w in ranges.windows(2) {
        // Zero-length blobs occupy nothing and cannot overlap.
        if w[1].0 < w[0].1 && w[1].1 > w[1].0 {
            return Err(FormatError::Overlap {
                a: w[0].2.clone(),
                b: w[1].2.clone(),
            });
        }
    }
    Ok(index)
}

fn validate_expert_blob(e: &ExpertEntry) -> Result<(), FormatError> {
    let what = e.label();
    if e.parts.is_empty() {
        return Err(FormatError::invalid(&what, "no parts"));
    }
    if e.parts.len() as u64 > MAX_PARTS {
        return Err(FormatError::TooMany {
            field: "expert parts",
            count: e.parts.len() as u64,
            cap: MAX_PARTS,
        });
    }
    if e.raw_length > MAX_RAW_LEN {
        return Err(FormatError::invalid(
            &what,
            format!("raw_length {} exceeds {MAX_RAW_LEN}", e.raw_length),
        ));
    }
    let mut expect_offset = 0u64;
    for (k, p) in e.parts.iter().enumerate() {
        let pw = format!("{what} part {k} ({})", p.name);
        if p.name.is_empty() || p.name.len() > MAX_PART_NAME_LEN {
            return Err(FormatError::invalid(
                &pw,
                format!(
                    "name length {} not in 1..={MAX_PART_NAME_LEN}",
                    p.name.len()
                ),
            ));
        }
        if e.parts[..k].iter().any(|q| q.name == p.name) {
            return Err(FormatError::invalid(&pw, "duplicate part name"));
        }
        if p.offset != expect_offset {
            return Err(FormatError::invalid(
                &pw,
                format!("offset {}, expected {expect_offset}", p.offset),
            ));
        }
        let l = TensorLayout::of(p.scheme, &p.shape)
            .map_err(|r| FormatError::invalid(&pw, format!("{} {:?}: {r}", p.scheme, p.shape)))?;
        let end = p
            .offset
            .checked_add(l.length)
            .ok_or_else(|| FormatError::invalid(&pw, "size overflows"))?;
        expect_offset = if k + 1 < e.parts.len() {
            align_up(end, PART_ALIGN).ok_or_else(|| FormatError::invalid(&pw, "size overflows"))?
        } else {
            end
        };
    }
    if expect_offset != e.raw_length {
        return Err(FormatError::invalid(
            &what,
            format!(
                "raw_length {} but its parts end at {expect_offset}",
                e.raw_length
            ),
        ));
    }
    match e.codec {
        Codec::None if e.length != e.raw_length => Err(FormatError::invalid(
            &what,
            format!(
                "codec none with length {} != raw_length {}",
                e.length, e.raw_length
            ),
        )),
        Codec::Huffman => codec::huffman_bound_len(e.length, e.raw_length)
            .map_err(|r| FormatError::invalid(&what, r)),
        _ => Ok(()),
    }
}
