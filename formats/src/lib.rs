//! Every byte mfx puts on disk: the `.mfx` pack format (see docs/FORMAT.md),
//! the quantization codecs with their scalar reference, and the profile schema.

pub mod codec;
pub mod error;
pub mod mxfp4;
pub mod pack;
pub mod profile;
pub mod quant;
pub mod tempfiles;
#[doc(hidden)]
pub mod testing;

pub use codec::Codec;
pub use error::FormatError;
pub use pack::{ExpertEntry, Pack, PackMeta, PackWriter, PartData, TensorEntry, TensorView};
