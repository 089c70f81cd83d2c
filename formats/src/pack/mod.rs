//! The `.mfx` pack: one file holding a whole prepared model. The normative
//! spec is docs/FORMAT.md; this module is its reference implementation.
//!
//! - [`Pack::open`] validates everything structural (header, manifest, ranges)
//!   and then serves dense tensors zero-copy from a read-only map and expert
//!   blobs either from the map or with positioned reads into caller buffers.
//! - [`PackWriter`] streams blobs to a temp file and renames it into place;
//!   the same inputs always give the same bytes.

pub mod header;
pub mod layout;
pub mod manifest;
pub mod reader;
pub mod writer;

pub use header::{Header, DEFAULT_ALIGNMENT, FORMAT_VERSION, HEADER_LEN, MAGIC};
pub use layout::TensorLayout;
pub use manifest::{Checksum, ExpertEntry, ExpertPart, Manifest, TensorEntry, WriterInfo};
pub use reader::{parse_and_verify_bytes, Pack, Parsed, TensorView, VerifyReport};
pub use writer::{PackMeta, PackSummary, PackWriter, PartData};
