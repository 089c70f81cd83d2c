//! The [`Family`] trait every model family implements, and
//! [`FamilyConfig`], a parsed `config.json` of any registered family with
//! the family's type erased: what loaders, prep and the CLI hold.
//!
//! A family supplies its dimensions ([`Dims`]), its layer (load and
//! forward, with its own per-layer sequence state) and its working-memory
//! shape; [`super::stack`] does everything else once for all of them
//! (embeddings, final norm and lm_head, the [`super::Model`] and
//! [`super::layerwise::Layerwise`] implementations, resident or streamed
//! experts). Which `model_type` is which family is decided in
//! [`super::registry`] and nowhere else.

use super::layerwise::{load_expert_by_names, Layerwise};
use super::nn::kv_cache::{KvBits, LayerKv};
use super::nn::moe::RouterObserver;
use super::stack::{FamilyModel, Stack};
use super::state::{StateError, StateReader};
use super::{LoadOptions, Model};
use crate::cache::{ExpertCache, WorkingShape};
use crate::error::RuntimeError;
use crate::experts::{ExpertMats, ExpertNames, ExpertProvider};
use crate::weights::WeightSource;
use std::any::Any;
use std::path::Path;
use std::sync::Arc;

/// What every family shares, read once from its config: the stack, the
/// expert cache, prep and the CLI read these and never match on the family.
#[derive(Debug, Clone)]
pub struct Dims {
    /// The registry's `model_type` (`qwen3_moe`, `glm4_moe`, ...).
    pub arch: &'static str,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon (the final norm's too).
    pub eps: f32,
    pub tie_word_embeddings: bool,
    /// The final norm is zero-centred (`x * rsqrt(ms + eps) * (1 + w)`, qwen3_next).
    pub zero_centred_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// A layer's state across forward calls (KV cache, recurrent state).
pub trait SeqState: Send + Sync + Clone {
    /// Positions held.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keeps the first `len` positions; false if this state cannot.
    fn truncate(&mut self, len: usize) -> bool;
    fn clear(&mut self);
    /// Whether [`SeqState::truncate`] works for every shorter length (a KV
    /// cache); false for recurrent state, which a prompt cache reaches
    /// earlier positions of only through checkpoints (`models::state`).
    fn rolls_back(&self) -> bool {
        true
    }
    /// Whether this state can compute several new positions exactly as
    /// one-token steps would ([`SeqState::set_exact_steps`]) and truncate
    /// them again: what speculative decoding's verify pass needs.
    fn supports_exact_steps(&self) -> bool {
        false
    }
    /// Switches exact steps on or off (ignored where unsupported).
    fn set_exact_steps(&mut self, on: bool) {
        let _ = on;
    }
    /// Heap bytes held (what a prompt-cache slot costs).
    fn bytes(&self) -> usize;
    /// Appends everything [`SeqState::load`] needs to rebuild this state.
    fn save(&self, out: &mut Vec<u8>);
    /// Replaces this state with bytes [`SeqState::save`] wrote, refusing
    /// bytes of another shape (head counts, widths, storage precision).
    fn load(&mut self, r: &mut StateReader<'_>) -> Result<(), StateError>;
}

impl SeqState for LayerKv {
    fn len(&self) -> usize {
        LayerKv::len(self)
    }
    fn truncate(&mut self, len: usize) -> bool {
        LayerKv::truncate(self, len);
        true
    }
    fn clear(&mut self) {
        LayerKv::clear(self)
    }
    fn supports_exact_steps(&self) -> bool {
        true
    }
    fn set_exact_steps(&mut self, on: bool) {
        LayerKv::set_exact_steps(self, on)
    }
    fn bytes(&self) -> usize {
        LayerKv::bytes(self)
    }
    fn save(&self, out: &mut Vec<u8>) {
        LayerKv::save(self, out)
    }
    fn load(&mut self, r: &mut StateReader<'_>) -> Result<(), StateError> {
        LayerKv::load(self, r)
    }
}

/// The (gate, up, down) projection names of the hub's SwiGLU experts.
pub const GATE_UP_DOWN: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Expert `e` of layer `l` under `module` in the hub layout (names without `.weight`).
pub fn hub_expert_names(l: usize, module: &str, e: usize, proj: [&str; 3]) -> ExpertNames {
    proj.map(|p| format!("model.layers.{l}.{module}.experts.{e}.{p}"))
}

/// Layer `l`'s stacked experts under `module` in the MLX layout (`switch_mlp`).
pub fn stacked_expert_names(l: usize, module: &str) -> ExpertNames {
    GATE_UP_DOWN.map(|p| format!("model.layers.{l}.{module}.switch_mlp.{p}"))
}

/// One model family: its config turned into [`Dims`] plus whatever its
/// layer needs, its layer, and its per-layer state. See
/// docs/ARCHITECTURE.md, "Adding a family".
pub trait Family: Clone + Send + Sync + 'static {
    /// Everything of one layer except its routed experts.
    type Layer: Send + Sync + 'static;
    /// One layer's sequence state.
    type State: SeqState + 'static;

    fn dims(&self) -> &Dims;
    /// Whether layer `l` has routed experts.
    fn is_moe_layer(&self, l: usize) -> bool;
    /// Routed expert `e` of layer `l` in the hub layout (default: `mlp.experts.{e}.{gate,up,down}_proj`).
    fn expert_names(&self, l: usize, e: usize) -> ExpertNames {
        hub_expert_names(l, "mlp", e, GATE_UP_DOWN)
    }
    /// Layer `l`'s stacked MLX experts (default: `mlp.switch_mlp.*`).
    fn stacked_expert_names(&self, l: usize) -> ExpertNames {
        stacked_expert_names(l, "mlp")
    }
    /// Routed expert `e` of layer `l` from a checkpoint (default: by
    /// [`Self::expert_names`], else [`Self::stacked_expert_names`]).
    /// Families whose checkpoints fuse experts into other tensors (gpt-oss's
    /// `mlp.experts.gate_up_proj`) slice them here.
    fn load_expert(
        &self,
        src: &dyn WeightSource,
        l: usize,
        e: usize,
    ) -> Result<ExpertMats, RuntimeError> {
        let d = self.dims();
        load_expert_by_names(
            src,
            &self.expert_names(l, e),
            &self.stacked_expert_names(l),
            (e, d.num_experts),
            d.hidden_size,
            d.moe_intermediate_size,
        )
    }
    /// Tensors of MoE layer `l` that belong to its routed experts beyond
    /// the names [`Self::expert_names`] implies (fused tensors and their
    /// biases), so that prep does not store them as dense tensors.
    fn fused_expert_tensors(&self, l: usize) -> Vec<String> {
        let _ = l;
        Vec::new()
    }
    /// What this family needs in memory besides weights (the budget's working reserve).
    fn working_shape(&self, kv: KvBits) -> WorkingShape;

    /// Layer `l` without its routed experts.
    fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<Self::Layer, RuntimeError>;
    /// An empty state for one layer (`kv`: KV cache storage precision).
    fn new_state(&self, kv: KvBits) -> Self::State;
    /// Runs `layer` over `hidden` (`[n, hidden]`, one sequence, the
    /// positions after those in `state`), in place, appending to `state`.
    /// Routed experts come from `experts`, which may prefetch for `next`
    /// (the following layer, see [`crate::cache::prefetch`]); every routing
    /// decision goes to `observer`.
    fn layer_forward(
        &self,
        layer: &Self::Layer,
        next: Option<&Self::Layer>,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        state: &mut Self::State,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError>;
}

/// [`Family`] with its types erased, so one value holds any family.
trait AnyFamily: Send + Sync {
    fn dims(&self) -> &Dims;
    fn working_shape(&self, kv: KvBits) -> WorkingShape;
    fn layerwise(&self, src: &dyn WeightSource) -> Result<Box<dyn Layerwise>, RuntimeError>;
    fn build(
        &self,
        src: &dyn WeightSource,
        opts: &LoadOptions,
        experts: Option<Arc<dyn ExpertProvider>>,
        cache: Option<Arc<ExpertCache>>,
    ) -> Result<Box<dyn Model>, RuntimeError>;
    fn as_any(&self) -> &dyn Any;
}

impl<F: Family> AnyFamily for F {
    fn dims(&self) -> &Dims {
        Family::dims(self)
    }
    fn working_shape(&self, kv: KvBits) -> WorkingShape {
        Family::working_shape(self, kv)
    }
    fn layerwise(&self, src: &dyn WeightSource) -> Result<Box<dyn Layerwise>, RuntimeError> {
        Ok(Box::new(Stack::load(self.clone(), src)?))
    }
    fn build(
        &self,
        src: &dyn WeightSource,
        opts: &LoadOptions,
        experts: Option<Arc<dyn ExpertProvider>>,
        cache: Option<Arc<ExpertCache>>,
    ) -> Result<Box<dyn Model>, RuntimeError> {
        let mut m = FamilyModel::build(self.clone(), src, opts, experts)?;
        m.set_cache(cache);
        Ok(Box::new(m))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A parsed `config.json` of any registered family (a checkpoint's or the
/// copy embedded in a pack).
#[derive(Clone)]
pub struct FamilyConfig(Arc<dyn AnyFamily>);

impl std::fmt::Debug for FamilyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FamilyConfig").field(self.dims()).finish()
    }
}

impl FamilyConfig {
    /// Wraps a parsed family (what each family's `parse` returns).
    pub fn new<F: Family>(family: F) -> Self {
        FamilyConfig(Arc::new(family))
    }

    pub fn from_file(path: &Path) -> Result<Self, RuntimeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses config text with the family the registry names for its
    /// `model_type`; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, RuntimeError> {
        let c = super::nn::config::JsonCfg::from_str(text, path)?;
        super::registry::parse(&c)
    }

    pub fn dims(&self) -> &Dims {
        self.0.dims()
    }

    /// The family's `model_type`.
    pub fn arch(&self) -> &'static str {
        self.dims().arch
    }

    pub fn hidden_size(&self) -> usize {
        self.dims().hidden_size
    }

    /// Width of one routed expert.
    pub fn moe_intermediate_size(&self) -> usize {
        self.dims().moe_intermediate_size
    }

    pub fn max_position_embeddings(&self) -> usize {
        self.dims().max_position_embeddings
    }

    pub fn num_hidden_layers(&self) -> usize {
        self.dims().num_hidden_layers
    }

    /// The family's working-memory shape for the budget.
    pub fn working_shape(&self, kv: KvBits) -> WorkingShape {
        self.0.working_shape(kv)
    }

    /// The family itself, when it is an `F` (tests, `mfx eval`'s aux loss).
    pub fn downcast<F: Family>(&self) -> Option<&F> {
        self.0.as_any().downcast_ref()
    }

    /// The layer-by-layer view of this model over `src` (loads only what
    /// every layer shares: embeddings, final norm, lm_head).
    pub fn layerwise(&self, src: &dyn WeightSource) -> Result<Box<dyn Layerwise>, RuntimeError> {
        check_layers_present(self.num_hidden_layers(), src, Path::new(&src.location()))?;
        self.0.layerwise(src)
    }

    /// A whole model over `src`; `experts` replaces holding every routed
    /// expert of `src` resident (a pack's experts, the streaming cache),
    /// `cache` is the streaming cache behind them, if that is what they are.
    pub fn build(
        &self,
        src: &dyn WeightSource,
        opts: &LoadOptions,
        experts: Option<Arc<dyn ExpertProvider>>,
        cache: Option<Arc<ExpertCache>>,
    ) -> Result<Box<dyn Model>, RuntimeError> {
        check_layers_present(self.num_hidden_layers(), src, Path::new(&src.location()))?;
        self.0.build(src, opts, experts, cache)
    }
}

/// Refuses a config declaring more layers than `src` holds tensors for,
/// before anything is allocated per layer (the expert cache's slots, KV
/// caches, layer vectors): `num_hidden_layers` is checked against the
/// weights actually present, not trusted. `config` names the file in the
/// error (a pack's embedded config: the pack).
pub fn check_layers_present(
    n_layers: usize,
    src: &dyn WeightSource,
    config: &Path,
) -> Result<(), RuntimeError> {
    let present = src
        .names()
        .iter()
        .filter_map(|n| layer_of(n))
        .max()
        .map_or(0, |l| l + 1);
    if n_layers > present {
        return Err(RuntimeError::BadKey {
            path: config.to_path_buf(),
            key: "num_hidden_layers".into(),
            msg: format!(
                "{n_layers} layers declared, but {} holds tensors for {present} (layers.0 .. layers.{})",
                src.location(),
                present.saturating_sub(1)
            ),
        });
    }
    Ok(())
}

/// The layer index of a tensor name (`model.layers.12.mlp...` -> 12).
fn layer_of(name: &str) -> Option<usize> {
    let rest = name
        .strip_prefix("layers.")
        .or_else(|| name.split_once(".layers.").map(|(_, r)| r))?;
    rest.split('.').next()?.parse().ok()
}
