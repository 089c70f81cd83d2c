//! The mfx inference engine: model families, CPU kernels, expert cache,
//! sampling and the server.

pub mod kernels;
pub mod cache;
pub mod config;
pub mod error;
pub mod models;
pub mod weights;
pub mod chat;
pub mod generate;
pub mod memory;
pub mod sampling;
pub mod tokenizer;

pub use error::RuntimeError;
pub mod server;
pub mod toolcall;
