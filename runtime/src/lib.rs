//! The mfx inference engine: model families, CPU kernels, expert cache,
//! sampling and the server.

pub mod kernels;
