//! Publishing packs on the Hugging Face hub (`mfx push`) and fetching the one
//! that fits this machine (`mfx pull`, `mfx run ORG/NAME`).
//!
//! One person preps a model for several RAM budgets and pushes the packs with
//! a `manifest.json` (schema: docs/PUBLISHING.md); everyone else pulls the
//! pack whose budget fits their memory. mfx never speaks the hub's HTTP/LFS/xet
//! protocol itself: every transfer goes through the official `hf` command of
//! the `huggingface_hub` Python package ([`hf`] is the only module that runs
//! it), so authentication, resumable transfers, the cache layout and future
//! protocol changes stay the hub's business.

pub mod digest;
pub mod hf;
pub mod manifest;
pub mod memory;
pub mod pull;
pub mod push;
pub mod repo;
pub mod select;

#[allow(unused_imports)] // `Pulled` is part of `pull`'s signature
pub use pull::{pull, resolve_model_arg, PullOptions, Pulled};
pub use push::{push, PushOptions};
pub use repo::RepoId;
