//! Where config.json handling lives, for callers that know it by this
//! path: the reader, its size caps and MLX quantization metadata are
//! `models::nn::config` (the one config-JSON reader every family parses
//! with); the shared decoder's config is `models::decoder::ModelConfig`;
//! each family parses its own keys in its file.

pub use crate::models::decoder::ModelConfig;
pub use crate::models::nn::config::{
    check_cap, size_cap, JsonCfg, QuantConfig, MAX_EXPERTS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB,
    MAX_WIDTH,
};
