//! Pack reader: validate once at open, then zero-copy access.
//!
//! All validation happens in [`Parsed::parse`] over a byte slice, so the
//! fuzzer exercises exactly the code that guards the runtime; [`Pack`] adds the
//! file, the map and positioned reads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use super::header::{Header, HEADER_LEN};
use super::layout::TensorLayout;
use super::manifest::{self, ExpertEntry, Index, Manifest, TensorEntry};
use crate::error::FormatError;
use crate::mxfp4::Mxfp4Matrix;
use crate::quant::{AffineMatrix, Scheme};

/// Header, manifest and lookup index of a validated pack.
#[derive(Debug)]
pub struct Parsed {
    pub header: Header,
    pub manifest: Manifest,
    index: Index,
}

/// What [`Pack::verify`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub tensors: usize,
    /// Distinct expert blobs checked (merged entries share their representative's).
    pub expert_blobs: usize,
    pub merged_experts: usize,
    pub bytes_checked: u64,
    /// Padding bytes (outside every blob, header and manifest) checked to be zero.
    pub padding_bytes: u64,
}

impl Parsed {
    /// Validates a whole pack held in `bytes` (header, manifest checksum,
    /// manifest rules, ranges). Blob checksums are left to [`Self::verify`].
    pub fn parse(bytes: &[u8]) -> Result<Parsed, FormatError> {
        let header = Header::decode(&bytes[..bytes.len().min(HEADER_LEN)], bytes.len() as u64)?;
        // Header::decode proved manifest_offset + manifest_length == bytes.len().
        let m = &bytes[header.manifest_offset as usize..header.file_length as usize];
        let found = xxhash_rust::xxh3::xxh3_64(m);
        if found != header.manifest_checksum {
            return Err(FormatError::Checksum {
                what: "manifest".into(),
                expected: header.manifest_checksum,
                found,
            });
        }
        let manifest = manifest::parse_manifest(m)?;
        let index = manifest::validate(&manifest, &header)?;
        Ok(Parsed {
            header,
            manifest,
            index,
        })
    }

    fn tensor_entry(&self, name: &str) -> Option<&TensorEntry> {
        self.index
            .tensors
            .get(name)
            .map(|&i| &self.manifest.tensors[i])
    }

    fn expert_entry(&self, layer: u32, expert: u32) -> Option<&ExpertEntry> {
        self.index
            .experts
            .get(&(layer, expert))
            .map(|&i| &self.manifest.experts[i])
    }

    /// Recomputes every blob checksum (tensors, then experts, in file order)
    /// and checks that compressed experts decode to `raw_length` bytes.
    /// Stops at the first bad item and names it.
    pub fn verify(&self, bytes: &[u8]) -> Result<VerifyReport, FormatError> {
        let mut r = VerifyReport::default();
        for t in &self.manifest.tensors {
            let b = &bytes[t.offset as usize..(t.offset + t.length) as usize];
            let found = xxhash_rust::xxh3::xxh3_64(b);
            if found != t.checksum.0 {
                return Err(FormatError::Checksum {
                    what: format!("tensor {}", t.name),
                    expected: t.checksum.0,
                    found,
                });
            }
            r.tensors += 1;
            r.bytes_checked += t.length;
        }
        for e in &self.manifest.experts {
            if e.merged_into.is_some() {
                r.merged_experts += 1;
                continue;
            }
            let b = &bytes[e.offset as usize..(e.offset + e.length) as usize];
            let found = xxhash_rust::xxh3::xxh3_64(b);
            if found != e.checksum.0 {
                return Err(FormatError::Checksum {
                    what: e.label(),
                    expected: e.checksum.0,
                    found,
                });
            }
            e.codec
                .check(b, e.raw_length)
                .map_err(|err| relabel(err, &e.label()))?;
            r.expert_blobs += 1;
            r.bytes_checked += e.length;
        }
        r.padding_bytes = self.check_padding(bytes)?;
        Ok(r)
    }

    /// Checks that every byte no checksum covers is zero: after the header,
    /// between blobs and before the manifest (FORMAT.md section 3). With the
    /// header, manifest and blob checksums this accounts for every byte of
    /// the file, so a flipped bit anywhere fails `verify`. Returns how many
    /// padding bytes were checked.
    fn check_padding(&self, bytes: &[u8]) -> Result<u64, FormatError> {
        let h = &self.header;
        let mut blobs: Vec<(u64, u64)> = self
            .manifest
            .tensors
            .iter()
            .map(|t| (t.offset, t.offset + t.length))
            .chain(
                self.manifest
                    .experts
                    .iter()
                    .filter(|e| e.merged_into.is_none())
                    .map(|e| (e.offset, e.offset + e.length)),
            )
            .filter(|(s, e)| e > s)
            .collect();
        blobs.sort_unstable();
        let mut checked = 0u64;
        // `pos`: end of the last covered byte; each gap [pos, start) must be zero.
        let mut pos = HEADER_LEN as u64;
        for (start, end) in blobs
            .into_iter()
            .chain(std::iter::once((h.manifest_offset, h.manifest_offset)))
        {
            if start > pos {
                let gap = &bytes[pos as usize..start as usize];
                if let Some(i) = gap.iter().position(|&b| b != 0) {
                    return Err(FormatError::Invalid {
                        what: format!("padding [{pos}, {start})"),
                        reason: format!(
                            "byte at offset {} is 0x{:02x}; padding must be zero (the file is corrupt)",
                            pos + i as u64,
                            gap[i]
                        ),
                    });
                }
                checked += start - pos;
            }
            pos = pos.max(end);
        }
        Ok(checked)
    }
}

fn relabel(err: FormatError, what: &str) -> FormatError {
    match err {
        FormatError::Codec { codec, reason, .. } => FormatError::Codec {
            what: what.to_string(),
            codec,
            reason,
        },
        other => other,
    }
}

/// Parses and verifies a pack held in memory: the fuzz target's entry point.
#[doc(hidden)]
pub fn parse_and_verify_bytes(bytes: &[u8]) -> Result<VerifyReport, FormatError> {
    let p = Parsed::parse(bytes)?;
    p.verify(bytes)
}

/// An open, validated pack.
///
/// # Mapping safety
/// The file is mapped read-only. The map is only sound while nobody modifies
/// or truncates the file: truncation makes later page faults raise SIGBUS
/// (the process dies), an in-place rewrite changes tensors under running code.
/// mfx's writer never writes in place (temp file + rename), so replacing a
/// pack while it is served is safe; editing it in place is not. The runtime's
/// streaming path reads experts with [`Pack::read_expert_into`] (pread), which
/// turns a shrunken file into an I/O error instead.
#[derive(Debug)]
pub struct Pack {
    path: PathBuf,
    file: File,
    map: Mmap,
    parsed: Parsed,
}

impl Pack {
    /// Opens and validates a pack: header, manifest checksum, every manifest
    /// rule, and that every blob lies inside the data section without
    /// overlapping another. Blob checksums are checked by [`Self::verify`].
    pub fn open(path: impl AsRef<Path>) -> Result<Pack, FormatError> {
        let path = path.as_ref().to_path_buf();
        let ctx = |what: &str| format!("{what} {}", path.display());
        // A FIFO or device would block or never end in the reads below:
        // refuse anything but a regular file before opening it.
        let meta = std::fs::metadata(&path).map_err(|e| FormatError::io(ctx("opening"), e))?;
        if !meta.is_file() {
            return Err(FormatError::Invalid {
                what: path.display().to_string(),
                reason: format!(
                    "not a regular file ({}); a pack must be a regular file",
                    file_kind(&meta.file_type())
                ),
            });
        }
        let file = File::open(&path).map_err(|e| FormatError::io(ctx("opening"), e))?;
        let len = file
            .metadata()
            .map_err(|e| FormatError::io(ctx("reading metadata of"), e))?
            .len();
        // Validate the header with a plain read first: a foreign or truncated
        // file is rejected before anything is mapped.
        let mut prefix = vec![0u8; (len as usize).min(HEADER_LEN)];
        file.read_exact_at(&mut prefix, 0)
            .map_err(|e| FormatError::io(ctx("reading the header of"), e))?;
        Header::decode(&prefix, len)?;
        // SAFETY: the map is read-only and lives as long as `Pack`. Soundness
        // additionally needs the file to stay unmodified while mapped; that is
        // the documented contract of this type (see "Mapping safety" above and
        // docs/FORMAT.md section 10), the same one ripgrep's searcher makes.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(ctx("mapping"), e))?;
        let parsed = Parsed::parse(&map)?;
        Ok(Pack {
            path,
            file,
            map,
            parsed,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.parsed.header
    }

    pub fn manifest(&self) -> &Manifest {
        &self.parsed.manifest
    }

    /// The open file, for callers that want their own (e.g. O_DIRECT) reads.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// A dense tensor, zero-copy from the map.
    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let e = self.parsed.tensor_entry(name)?;
        let bytes = &self.map[e.offset as usize..(e.offset + e.length) as usize];
        // Validated at open, so the layout exists.
        let layout = TensorLayout::of(e.scheme, &e.shape).ok()?;
        Some(TensorView {
            name: &e.name,
            shape: &e.shape,
            layout,
            bytes,
        })
    }

    pub fn expert(&self, layer: u32, expert: u32) -> Option<&ExpertEntry> {
        self.parsed.expert_entry(layer, expert)
    }

    /// The stored (possibly compressed) bytes of an expert blob, through the map.
    ///
    /// # Panics
    /// If `entry` does not come from this pack's manifest and lies outside the file.
    pub fn expert_bytes_mapped(&self, entry: &ExpertEntry) -> &[u8] {
        let end = entry
            .offset
            .checked_add(entry.length)
            .expect("expert entry from another pack");
        &self.map[entry.offset as usize..end as usize]
    }

    /// Reads an expert's stored bytes into `buf` (exactly `entry.length` bytes)
    /// with a positioned read: no shared file cursor, safe from many threads.
    pub fn read_expert_into(&self, entry: &ExpertEntry, buf: &mut [u8]) -> Result<(), FormatError> {
        if buf.len() as u64 != entry.length {
            return Err(FormatError::BufferSize {
                what: entry.label(),
                expected: entry.length,
                got: buf.len() as u64,
            });
        }
        self.file.read_exact_at(buf, entry.offset).map_err(|e| {
            FormatError::io(
                format!("reading {} from {}", entry.label(), self.path.display()),
                e,
            )
        })
    }

    /// Checks every blob checksum; the error names the first bad tensor or expert.
    pub fn verify(&self) -> Result<VerifyReport, FormatError> {
        self.parsed.verify(&self.map)
    }
}

/// What kind of non-regular file `t` is, for error messages.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

impl ExpertEntry {
    /// Decodes this expert's stored bytes into `out` (exactly `raw_length` bytes).
    pub fn decode_into(&self, stored: &[u8], out: &mut [u8]) -> Result<(), FormatError> {
        if out.len() as u64 != self.raw_length {
            return Err(FormatError::BufferSize {
                what: format!("{} decode buffer", self.label()),
                expected: self.raw_length,
                got: out.len() as u64,
            });
        }
        self.codec
            .decode_into(stored, out)
            .map_err(|e| relabel(e, &self.label()))
    }

    /// A view of part `i` inside a decoded blob (`decoded.len() == raw_length`).
    /// For `&[bf16]` access the buffer must be at least 2-byte aligned (the
    /// cache's buffers are 64-byte aligned, which also aligns each part).
    pub fn part<'a>(&'a self, decoded: &'a [u8], i: usize) -> Result<TensorView<'a>, FormatError> {
        let what = || format!("{} part {i}", self.label());
        if decoded.len() as u64 != self.raw_length {
            return Err(FormatError::BufferSize {
                what: what(),
                expected: self.raw_length,
                got: decoded.len() as u64,
            });
        }
        let (off, layout) = self
            .part_layout(i)
            .ok_or_else(|| FormatError::invalid(what(), "no such part"))?;
        let bytes = decoded
            .get(off as usize..(off + layout.length) as usize)
            .ok_or_else(|| FormatError::invalid(what(), "outside the decoded blob"))?;
        let p = &self.parts[i];
        Ok(TensorView {
            name: &p.name,
            shape: &p.shape,
            layout,
            bytes,
        })
    }
}

/// A stored tensor (dense, or one part of an expert) borrowed in place.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub shape: &'a [u64],
    pub layout: TensorLayout,
    bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    pub fn scheme(&self) -> Scheme {
        self.layout.scheme
    }

    /// The stored bytes (for affine: packed | pad | scales | pad | biases;
    /// for mxfp4: blocks | pad | scales).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    fn want(&self, s: Scheme, wanted: &'static str) -> Result<(), FormatError> {
        if self.layout.scheme != s {
            return Err(FormatError::WrongScheme {
                what: self.name.to_string(),
                scheme: self.layout.scheme.to_string(),
                wanted,
            });
        }
        Ok(())
    }

    fn cast<T: bytemuck::Pod>(&self, b: &'a [u8]) -> Result<&'a [T], FormatError> {
        bytemuck::try_cast_slice(b).map_err(|e| {
            FormatError::invalid(
                self.name,
                format!("cannot view as {}: {e}", std::any::type_name::<T>()),
            )
        })
    }

    pub fn as_bf16(&self) -> Result<&'a [bf16], FormatError> {
        self.want(Scheme::Bf16, "bf16")?;
        self.cast(self.bytes)
    }

    pub fn as_f16(&self) -> Result<&'a [f16], FormatError> {
        self.want(Scheme::F16, "f16")?;
        self.cast(self.bytes)
    }

    pub fn as_f32(&self) -> Result<&'a [f32], FormatError> {
        self.want(Scheme::F32, "f32")?;
        self.cast(self.bytes)
    }

    /// Splits an affine tensor into MLX's three arrays, as the reference
    /// kernels take them (rows = product of leading dims).
    pub fn affine(&self) -> Result<AffineMatrix<'a>, FormatError> {
        let Scheme::Affine { bits, group_size } = self.layout.scheme else {
            return Err(FormatError::WrongScheme {
                what: self.name.to_string(),
                scheme: self.layout.scheme.to_string(),
                wanted: "affine",
            });
        };
        let l = &self.layout;
        let packed = &self.bytes[..l.packed_len as usize];
        let scales = self.cast(
            &self.bytes[l.scales_offset as usize..(l.scales_offset + l.groups_len) as usize],
        )?;
        let biases = self.cast(
            &self.bytes[l.biases_offset as usize..(l.biases_offset + l.groups_len) as usize],
        )?;
        AffineMatrix::new(
            l.rows as usize,
            l.cols as usize,
            bits,
            group_size as usize,
            packed,
            scales,
            biases,
        )
        .map_err(|e| FormatError::invalid(self.name, e.to_string()))
    }

    /// Splits an mxfp4 tensor into its codes and e8m0 scales (rows =
    /// product of leading dims). Scales are not inspected here: a NaN scale
    /// (0xFF) is refused by [`Mxfp4Matrix::check_scales`] where the caller
    /// wants that pass over the bytes.
    pub fn mxfp4(&self) -> Result<Mxfp4Matrix<'a>, FormatError> {
        if self.layout.scheme != Scheme::Mxfp4 {
            return Err(FormatError::WrongScheme {
                what: self.name.to_string(),
                scheme: self.layout.scheme.to_string(),
                wanted: "mxfp4",
            });
        }
        let l = &self.layout;
        Mxfp4Matrix::new(
            l.rows as usize,
            l.cols as usize,
            &self.bytes[..l.packed_len as usize],
            &self.bytes[l.scales_offset as usize..(l.scales_offset + l.groups_len) as usize],
        )
        .map_err(|e| FormatError::invalid(self.name, e.to_string()))
    }
}
