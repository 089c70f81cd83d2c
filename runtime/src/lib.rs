//! The mfx inference engine: model families, CPU kernels, expert cache,
//! sampling and the server.

pub mod cache;
pub mod chat;
pub mod config;
pub mod constrain;
pub mod error;
pub mod experts;
pub mod generate;
pub mod kernels;
pub mod load;
pub mod memory;
pub mod models;
pub mod pressure;
pub mod prompt_cache;
pub mod sampling;
pub mod speculate;
pub mod tokenizer;
pub mod weights;

pub use error::RuntimeError;
pub mod server;
pub mod toolcall;
