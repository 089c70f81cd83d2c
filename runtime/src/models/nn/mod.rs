//! The building blocks every family is made of, each written once:
//!
//! | module | what |
//! | --- | --- |
//! | [`config`] | the one `config.json` reader ([`config::JsonCfg`]) |
//! | [`linear`] | matmul, bias, RMSNorm, residual add, the SwiGLU MLP loader |
//! | [`rope`] | rotary embedding: rotary width, offset, interleave, YaRN |
//! | [`delta_rule`] | Gated DeltaNet's gated delta rule, per token and chunked |
//! | [`attention`] | [`attention::attend`] (causal GQA over the head-major KV cache) and the standard GQA block |
//! | [`kv_cache`] | the per-layer KV cache (f32, f16 or int8 storage) |
//! | [`mla`] | multi-head latent attention (DeepSeek-V3 and the families after it) |
//! | [`indexer`] | DeepSeek sparse attention: the indexer's top-k selection, attention over it |
//! | [`topk`] | top-k in torch's CPU order, ties included (the DSA indexer's selection) |
//! | [`router`] | the [`router::Router`] trait: softmax top-k, sigmoid group-limited |
//! | [`moe`] | the one routed-experts path and the feed-forward half of a layer |

pub mod attention;
pub mod config;
pub mod delta_rule;
pub mod indexer;
pub mod kv_cache;
pub mod linear;
pub mod mla;
pub mod moe;
pub mod rope;
pub mod router;
pub mod topk;
