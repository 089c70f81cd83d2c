//! The layer-by-layer interface every family implements, for work that
//! walks layers rather than tokens: `mfx prep` loads layer L, pushes its
//! whole calibration batch through it and drops it, so its peak memory is
//! about one layer plus activations whatever the model's size. It is the
//! same arithmetic the [`super::Model`] implementations run (both are
//! [`super::stack`] over the family's one `layer_forward`), which is what
//! keeps prep's routing profile and quality checks on the runtime's one
//! forward pass.
//!
//! ```ignore
//! let r = load::resolve(path)?;                    // config parsed by its family
//! let src = r.weights()?;
//! let lw = r.config.layerwise(src.as_ref())?;      // embeddings, final norm, lm_head
//! let mut hidden = lw.embed(&ids)?;                // one sequence, [n, hidden]
//! for l in 0..lw.n_layers() {
//!     let layer = lw.load_layer(src.as_ref(), l)?; // attention/mixer, norms, router, shared experts
//!     let mut ex = ResidentExperts::new(lw.n_layers());
//!     ex.insert_layer(l, lw.layer_experts(src.as_ref(), l)?);
//!     lw.layer_forward(&layer, &ex, &mut hidden, Some(&mut observer))?;
//! }                                                // layer, ex dropped here
//! let logits = lw.final_logits(&hidden, true);
//! ```
//!
//! Which tensors are routed experts, and their names, is each family's
//! `Family::expert_names` exposed here ([`Layerwise::expert_names`],
//! [`Layerwise::stacked_expert_names`]) and nowhere else: the models load
//! experts through it and prep uses it to tell experts from dense tensors.

use super::nn::moe::RouterObserver;
use crate::error::RuntimeError;
use crate::experts::{ExpertMats, ExpertNames, ExpertProvider};
use crate::weights::WeightSource;
use std::any::Any;
use std::collections::BTreeSet;

/// One loaded layer of some family (everything but its routed experts).
/// Opaque so that one object-safe trait covers every family; only the
/// family that made it can run it.
pub struct LayerBox(Box<dyn Any + Send + Sync>);

impl LayerBox {
    pub(crate) fn new<T: Any + Send + Sync>(layer: T) -> Self {
        LayerBox(Box::new(layer))
    }

    pub(crate) fn get<T: Any>(&self, family: &str) -> Result<&T, RuntimeError> {
        self.0.downcast_ref().ok_or_else(|| {
            RuntimeError::Other(format!("a layer of another family was passed to {family}"))
        })
    }
}

/// Suffixes a linear layer's tensors can have (`.scales`/`.biases`: MLX).
const LINEAR_SUFFIXES: [&str; 3] = ["weight", "scales", "biases"];

/// A model as a stack of separately loadable layers (see the module docs).
pub trait Layerwise: Send + Sync {
    /// The family's `model_type`.
    fn arch(&self) -> &'static str;
    fn n_layers(&self) -> usize;
    fn hidden_size(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Routed experts per MoE layer.
    fn num_experts(&self) -> usize;
    fn top_k(&self) -> usize;
    /// Width of one routed expert.
    fn moe_intermediate_size(&self) -> usize;
    /// Whether layer `l` has routed experts.
    fn is_moe_layer(&self, l: usize) -> bool;
    /// Routed expert `e` of layer `l` in the hub layout: the (gate, up,
    /// down) linear layers' names without `.weight`.
    fn expert_names(&self, l: usize, e: usize) -> ExpertNames;
    /// Layer `l`'s stacked `[experts, rows, cols]` (gate, up, down) linear
    /// layers in the MLX layout (`switch_mlp`).
    fn stacked_expert_names(&self, l: usize) -> ExpertNames;

    /// Hidden states `[ids.len(), hidden]` for token ids.
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError>;
    /// Layer `l` without its routed experts.
    fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<LayerBox, RuntimeError>;
    /// Runs `layer` over one whole sequence `hidden` (`[n, hidden]`,
    /// positions `0..n`, from an empty KV/recurrent state), in place.
    /// Routed experts come from `experts`, every routing decision goes to
    /// `observer`.
    fn layer_forward(
        &self,
        layer: &LayerBox,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError>;
    /// Final norm and lm_head: `[n, vocab]` if `all`, else the last row's `[vocab]`.
    fn final_logits(&self, hidden: &[f32], all: bool) -> Vec<f32>;

    /// Routed expert `e` of layer `l`: per-expert tensors when the source
    /// has them, else a slice of the stacked MLX tensors
    /// ([`load_expert_by_names`]; families with fused expert tensors
    /// override this through `Family::load_expert`).
    fn load_expert(
        &self,
        src: &dyn WeightSource,
        l: usize,
        e: usize,
    ) -> Result<ExpertMats, RuntimeError> {
        load_expert_by_names(
            src,
            &self.expert_names(l, e),
            &self.stacked_expert_names(l),
            (e, self.num_experts()),
            self.hidden_size(),
            self.moe_intermediate_size(),
        )
    }

    /// All routed experts of layer `l` (none for a dense layer).
    fn layer_experts(
        &self,
        src: &dyn WeightSource,
        l: usize,
    ) -> Result<Vec<ExpertMats>, RuntimeError> {
        if !self.is_moe_layer(l) {
            return Ok(Vec::new());
        }
        (0..self.num_experts())
            .map(|e| self.load_expert(src, l, e))
            .collect()
    }

    /// Every tensor name that belongs to a routed expert, in either layout
    /// (`.weight`, and `.scales`/`.biases` of quantized sources). Everything
    /// else in a checkpoint is a dense tensor.
    fn routed_expert_tensors(&self) -> BTreeSet<String> {
        routed_tensors_by_names(self)
    }
}

/// Expert `e` of `count` over `hidden` inputs, `inter` wide: the per-expert
/// tensors `per` when the source has them, else expert `e` of the stacked
/// MLX tensors `stacked`.
pub fn load_expert_by_names(
    src: &dyn WeightSource,
    per: &ExpertNames,
    stacked: &ExpertNames,
    (e, count): (usize, usize),
    h: usize,
    i: usize,
) -> Result<ExpertMats, RuntimeError> {
    if !src.contains(&format!("{}.weight", per[0]))
        && src.contains(&format!("{}.weight", stacked[0]))
    {
        let st = stacked;
        return Ok(ExpertMats {
            gate: src.stacked_matrix(&st[0], e, count, i, h)?,
            up: src.stacked_matrix(&st[1], e, count, i, h)?,
            down: src.stacked_matrix(&st[2], e, count, h, i)?,
            bias: None,
        });
    }
    Ok(ExpertMats {
        gate: src.matrix(&per[0], i, h)?,
        up: src.matrix(&per[1], i, h)?,
        down: src.matrix(&per[2], h, i)?,
        bias: None,
    })
}

/// The routed-expert tensor names a model's expert names imply (what
/// [`Layerwise::routed_expert_tensors`] returns unless a family adds its
/// fused tensors).
pub fn routed_tensors_by_names<L: Layerwise + ?Sized>(m: &L) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in (0..m.n_layers()).filter(|&l| m.is_moe_layer(l)) {
        let mut prefixes: Vec<String> = m.stacked_expert_names(l).to_vec();
        for e in 0..m.num_experts() {
            prefixes.extend(m.expert_names(l, e));
        }
        for p in prefixes {
            for s in LINEAR_SUFFIXES {
                out.insert(format!("{p}.{s}"));
            }
        }
    }
    out
}
