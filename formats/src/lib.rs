//! Every byte mfx puts on disk: the `.mfx` pack format (see docs/FORMAT.md),
//! the quantization codecs with their scalar reference, and the profile schema.

pub mod quant;
pub mod profile;
