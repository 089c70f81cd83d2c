//! Models: the [`Model`] trait the generation loop drives, and the model
//! families as a registry over one generic stack.
//!
//! - [`registry`]: the one table `model_type` -> family.
//! - [`family`]: the [`Family`] trait (a family's dimensions, layer and
//!   per-layer state) and [`FamilyConfig`], any family's parsed config.
//! - [`stack`]: the generic stack implementing [`Model`] and
//!   [`layerwise::Layerwise`] for every family.
//! - [`nn`]: the building blocks (config reader, rope, attention, KV cache,
//!   routers, the routed-experts path).
//! - One file per family: [`decoder`] (the shared decoder) with its four
//!   specs [`qwen3_moe`], [`qwen2_moe`], [`mixtral`], [`olmoe`]; and
//!   [`glm4_moe`], [`deepseek_v3`], [`qwen3_next`] (and [`qwen3_5_moe`] on
//!   its layer), [`minimax_m2`], [`gpt_oss`] with their own layers;
//!   [`glm4_moe_lite`], [`deepseek_v32`], [`glm_moe_dsa`] are specs of
//!   [`deepseek_v3`]'s MLA layer.
//!
//! Loading (MODEL resolution, packs, the expert cache) is [`crate::load`].

pub mod decoder;
pub mod deepseek_v3;
pub mod deepseek_v32;
pub mod family;
pub mod glm4_moe;
pub mod glm4_moe_lite;
pub mod glm_moe_dsa;
pub mod gpt_oss;
pub mod layerwise;
pub mod minimax_m2;
pub mod mixtral;
pub mod nn;
pub mod olmoe;
pub mod qwen2_moe;
pub mod qwen3_5_moe;
pub mod qwen3_moe;
pub mod qwen3_next;
pub mod registry;
pub mod stack;
pub mod state;
pub mod working;

pub use crate::experts::{ExpertMats, ExpertProvider, ExpertWeights, ResidentExperts};
pub use decoder::{Decoder, FamilySpec, ModelConfig};
pub use family::{Dims, Family, FamilyConfig};
pub use nn::kv_cache::{KvBits, LayerKv};
pub use nn::moe::RouterObserver;
pub use nn::router::Routing;
pub use stack::{FamilyModel, Stack};
pub use state::{Checkpoint, SeqStates, StateError};

use crate::cache::{CacheOptions, ExpertCache};
use crate::error::RuntimeError;
use crate::weights::WeightSource;
use std::sync::Arc;

/// What callers need to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The family's `model_type` (see [`registry::FAMILIES`]).
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub max_position_embeddings: usize,
    /// The context this instance accepts (`LoadOptions::max_context` or the config's).
    pub max_context: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
}

/// A causal LM with its own sequence state.
pub trait Model: Send {
    fn info(&self) -> &ModelInfo;
    /// Appends `tokens` to this model's sequence state (KV cache) and returns logits:
    /// all positions `[tokens.len() * vocab]` if `all_logits`, else only the last `[vocab]`.
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, RuntimeError>;
    /// Appends `tokens` and returns every position's logits
    /// (`[tokens.len() * vocab]`), each exactly what a one-token forward at
    /// that position returns, so drafted tokens can be verified in one pass
    /// without changing a single output. This default feeds the tokens one at
    /// a time; models that batch it say so in [`Model::batched_steps`].
    fn forward_steps(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        forward_each(self, tokens)
    }
    /// Whether [`Model::forward_steps`] runs as one batched pass and the
    /// positions it added can be truncated again (speculative decoding pays
    /// only then).
    fn batched_steps(&self) -> bool {
        false
    }
    fn seq_len(&self) -> usize;
    /// Keep only the first `len` positions of the state (prompt-prefix reuse).
    /// Returns false if this model cannot (then callers reset).
    fn truncate(&mut self, len: usize) -> bool;
    fn reset(&mut self);
    /// The sequence state, for prompt-cache checkpoints (`None`: this model
    /// has no movable state, and the generator keeps no slots).
    fn state(&self) -> Option<&dyn SeqStates> {
        None
    }
    fn state_mut(&mut self) -> Option<&mut dyn SeqStates> {
        None
    }
    /// Moves the sequence state out (a prompt-cache slot), leaving the model
    /// empty as after [`Model::reset`].
    fn take_state(&mut self) -> Option<Box<dyn SeqStates>> {
        None
    }
    /// Moves a state taken from this model (or read by
    /// [`Model::load_state`]) back in; hands it back if it is not this
    /// model's kind of state.
    fn put_state(&mut self, s: Box<dyn SeqStates>) -> Result<(), Box<dyn SeqStates>> {
        Err(s)
    }
    /// A state of this model rebuilt from [`SeqStates::save`]'s bytes,
    /// every layer's shape checked.
    fn load_state(&self, bytes: &[u8]) -> Result<Box<dyn SeqStates>, StateError> {
        let _ = bytes;
        Err(StateError::Mismatch(
            "this model keeps no movable state".into(),
        ))
    }
    /// The streaming expert cache behind this model's routed experts, when
    /// it was loaded from a pack (for `--stats`, `/metrics`, `mfx bench`).
    fn expert_cache(&self) -> Option<Arc<ExpertCache>> {
        None
    }
}

/// [`Model::forward_steps`] the plain way: one forward call per token.
pub(crate) fn forward_each<M: Model + ?Sized>(
    m: &mut M,
    tokens: &[u32],
) -> Result<Vec<f32>, RuntimeError> {
    let mut out = Vec::with_capacity(tokens.len() * m.info().vocab_size);
    for &t in tokens {
        out.extend(m.forward(&[t], false)?);
    }
    Ok(out)
}

/// The largest prompt chunk one forward pass takes unless
/// [`LoadOptions::prefill_chunk`] says otherwise.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// How to load a model (see [`crate::load`]).
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// KV cache storage precision (f16 unless asked otherwise).
    pub kv_bits: KvBits,
    /// Cap on positions (default: the config's `max_position_embeddings`).
    /// Also the context `--ram`'s working reserve covers (default
    /// [`crate::cache::RESERVED_CONTEXT_DEFAULT`]).
    pub max_context: Option<usize>,
    /// The largest prompt chunk the caller will run in one forward pass
    /// (default [`DEFAULT_PREFILL_CHUNK`]); sizes the
    /// activation part of the working reserve, and `Generator` prefills in
    /// chunks of this size.
    pub prefill_chunk: Option<usize>,
    /// How a pack's routed experts are cached (ignored for checkpoint
    /// directories, whose experts stay mapped).
    pub cache: CacheOptions,
}

/// The shared decoder's model type (qwen3_moe, qwen2_moe, mixtral, olmoe).
pub type MoeModel = FamilyModel<Decoder>;

impl FamilyModel<Decoder> {
    /// Builds a model from an opened source. `experts`: a provider to use
    /// instead of holding every expert of `src` resident (the streaming cache).
    pub fn from_source(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        opts: &LoadOptions,
        experts: Option<Arc<dyn ExpertProvider>>,
    ) -> Result<Self, RuntimeError> {
        FamilyModel::build(Decoder::new(cfg.clone()), src, opts, experts)
    }

    /// The family (config and switches).
    pub fn transformer(&self) -> &Decoder {
        self.family()
    }
}
