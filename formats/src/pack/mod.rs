//! The `.mfx` pack: one file holding a whole prepared model. The normative
//! spec is docs/FORMAT.md; this module is its reference implementation.
//!
//! - [`Pack::open`] validates everything structural (header, manifest, ranges)
//!   and then serves dense tensors zero-copy from a read-only map and expert
//!   blobs either from the map or with positioned reads into caller buffers.
//! - [`PackWriter`] streams blobs to a temp file and renames it into place;
//!   the same inputs always give the same bytes.
//!
//! ```
//! use mfx_formats::codec::Codec;
//! use mfx_formats::pack::{Pack, PackMeta, PackWriter, PartData};
//! use mfx_formats::quant::{quantize, Scheme};
//!
//! # fn main() -> Result<(), mfx_formats::FormatError> {
//! let dir = tempfile::tempdir().expect("tempdir");
//! let path = dir.path().join("m.mfx");
//! let mut w = PackWriter::create(&path, PackMeta::default(), 4096)?;
//! let norm = vec![0u8; 2 * 64]; // bf16 [64]
//! w.add_tensor("model.norm.weight", Scheme::Bf16, &[64], &[&norm])?;
//! let q = quantize(&vec![0.5f32; 32 * 64], 32, 64, 4, 64).expect("valid shape");
//! let (s, b): (&[u8], &[u8]) = (bytemuck::cast_slice(&q.scales), bytemuck::cast_slice(&q.biases));
//! let gate = PartData { name: "gate_proj".into(), scheme: Scheme::affine(4, 64)?, shape: vec![32, 64], bytes: vec![&q.packed, s, b] };
//! w.add_expert(0, 0, Codec::Zstd, &[gate])?;
//! w.finish()?;
//!
//! let pack = Pack::open(&path)?;
//! pack.verify()?;
//! assert_eq!(pack.tensor("model.norm.weight").expect("present").as_bf16()?.len(), 64);
//! let e = pack.expert(0, 0).expect("present");
//! let mut stored = vec![0u8; e.length as usize];
//! pack.read_expert_into(e, &mut stored)?; // pread, as the runtime streams
//! let mut raw = vec![0u8; e.raw_length as usize];
//! e.decode_into(&stored, &mut raw)?;
//! let m = e.part(&raw, 0)?.affine()?;
//! assert_eq!(m.dequantize()[0], 0.5);
//! # Ok(())
//! # }
//! ```

pub mod header;
pub mod layout;
pub mod manifest;
pub mod reader;
pub mod writer;

pub use header::{Header, DEFAULT_ALIGNMENT, FLAG_MXFP4, FORMAT_VERSION, HEADER_LEN, MAGIC};
pub use layout::TensorLayout;
pub use manifest::{Checksum, ExpertEntry, ExpertPart, Manifest, TensorEntry, WriterInfo};
pub use reader::{parse_and_verify_bytes, Pack, Parsed, TensorView, VerifyReport};
pub use writer::{PackMeta, PackSummary, PackWriter, PartData};
