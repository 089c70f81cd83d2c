//! The one generic stack: embeddings, the family's layers, final norm and
//! lm_head, for any [`Family`]. [`Stack`] (what every layer shares)
//! implements [`Layerwise`] for prep; [`FamilyModel`] (a stack with all its
//! layers, their sequence state and an expert provider) implements
//! [`Model`] for the runtime. Both run the family's one `layer_forward`.

use super::family::{Family, SeqState};
use super::layerwise::{routed_tensors_by_names, LayerBox, Layerwise};
use super::nn::kv_cache::KvBits;
use super::nn::linear::norm_rows;
use super::nn::moe::RouterObserver;
use super::state::{load_states, SeqStates, StateError};
use super::{LoadOptions, Model, ModelInfo};
use crate::cache::ExpertCache;
use crate::error::RuntimeError;
use crate::experts::{ExpertMats, ExpertNames, ExpertProvider, ResidentExperts};
use crate::kernels;
use crate::weights::{Matrix, WeightSource};
use std::collections::BTreeSet;
use std::sync::Arc;

/// A family plus what all its layers share: embeddings, final norm, lm_head.
pub struct Stack<F: Family> {
    pub family: F,
    embed: Matrix,
    final_norm: Vec<f32>,
    lm_head: Matrix,
}

impl<F: Family> Stack<F> {
    /// Loads embeddings, final norm and lm_head (tied to the embeddings
    /// when the config says so).
    pub fn load(family: F, src: &dyn WeightSource) -> Result<Self, RuntimeError> {
        let d = family.dims();
        let (v, h) = (d.vocab_size, d.hidden_size);
        let embed = src.matrix("model.embed_tokens", v, h)?;
        let lm_head = if d.tie_word_embeddings {
            embed.clone()
        } else {
            src.matrix("lm_head", v, h)?
        };
        let mut final_norm = src.vector("model.norm.weight", h)?;
        if d.zero_centred_norm {
            final_norm.iter_mut().for_each(|w| *w += 1.0);
        }
        Ok(Stack {
            family,
            embed,
            final_norm,
            lm_head,
        })
    }

    /// Hidden states `[ids.len(), hidden]` for token ids.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        let d = self.family.dims();
        let h = d.hidden_size;
        let m = self.embed.mat();
        let mut out = vec![0.0; ids.len() * h];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(h)) {
            if id as usize >= d.vocab_size {
                return Err(RuntimeError::TokenOutOfRange {
                    id,
                    vocab: d.vocab_size,
                });
            }
            m.row_f32(id as usize, o);
        }
        Ok(out)
    }

    /// Final norm and lm_head: `[n, vocab]` logits if `all`, else the last row's `[vocab]`.
    pub fn final_logits(&self, hidden: &[f32], all: bool) -> Vec<f32> {
        let d = self.family.dims();
        let h = d.hidden_size;
        let n = hidden.len() / h;
        let rows = if all || n == 0 {
            hidden
        } else {
            &hidden[(n - 1) * h..]
        };
        let m = rows.len() / h;
        let xn = norm_rows(rows, &self.final_norm, d.eps);
        let mut out = vec![0.0; m * d.vocab_size];
        kernels::matmul(&self.lm_head.mat(), &xn, m, &mut out);
        out
    }
}

impl<F: Family> Layerwise for Stack<F> {
    fn arch(&self) -> &'static str {
        self.family.dims().arch
    }
    fn n_layers(&self) -> usize {
        self.family.dims().num_hidden_layers
    }
    fn hidden_size(&self) -> usize {
        self.family.dims().hidden_size
    }
    fn vocab_size(&self) -> usize {
        self.family.dims().vocab_size
    }
    fn num_experts(&self) -> usize {
        self.family.dims().num_experts
    }
    fn top_k(&self) -> usize {
        self.family.dims().top_k
    }
    fn moe_intermediate_size(&self) -> usize {
        self.family.dims().moe_intermediate_size
    }
    fn is_moe_layer(&self, l: usize) -> bool {
        self.family.is_moe_layer(l)
    }
    fn expert_names(&self, l: usize, e: usize) -> ExpertNames {
        self.family.expert_names(l, e)
    }
    fn stacked_expert_names(&self, l: usize) -> ExpertNames {
        self.family.stacked_expert_names(l)
    }
    fn load_expert(
        &self,
        src: &dyn WeightSource,
        l: usize,
        e: usize,
    ) -> Result<ExpertMats, RuntimeError> {
        self.family.load_expert(src, l, e)
    }
    fn routed_expert_tensors(&self) -> BTreeSet<String> {
        let mut out = routed_tensors_by_names(self);
        for l in (0..self.n_layers()).filter(|&l| self.family.is_moe_layer(l)) {
            out.extend(self.family.fused_expert_tensors(l));
        }
        out
    }
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        Stack::embed(self, ids)
    }
    fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<LayerBox, RuntimeError> {
        Ok(LayerBox::new(self.family.load_layer(src, l)?))
    }
    fn layer_forward(
        &self,
        layer: &LayerBox,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        let lw: &F::Layer = layer.get(self.family.dims().arch)?;
        // Positions 0..n of one sequence attend to f32 keys computed in this
        // call; the cache's storage precision never enters.
        let mut state = self.family.new_state(KvBits::F16);
        self.family
            .layer_forward(lw, None, experts, hidden, &mut state, observer)
    }
    fn final_logits(&self, hidden: &[f32], all: bool) -> Vec<f32> {
        Stack::final_logits(self, hidden, all)
    }
}

/// A whole model of family `F`: all non-expert weights resident, routed
/// experts from a provider, one sequence state per layer.
pub struct FamilyModel<F: Family> {
    info: ModelInfo,
    stack: Stack<F>,
    layers: Vec<F::Layer>,
    experts: Arc<dyn ExpertProvider>,
    cache: Option<Arc<ExpertCache>>,
    state: Vec<F::State>,
    kv_bits: KvBits,
}

impl<F: Family> FamilyModel<F> {
    /// Builds a model from an opened source. `experts`: a provider to use
    /// instead of holding every expert of `src` resident (a pack's experts,
    /// the streaming cache).
    pub fn build(
        family: F,
        src: &dyn WeightSource,
        opts: &LoadOptions,
        experts: Option<Arc<dyn ExpertProvider>>,
    ) -> Result<Self, RuntimeError> {
        let d = family.dims().clone();
        super::family::check_layers_present(
            d.num_hidden_layers,
            src,
            std::path::Path::new(&src.location()),
        )?;
        let stack = Stack::load(family, src)?;
        let layers = (0..d.num_hidden_layers)
            .map(|l| stack.family.load_layer(src, l))
            .collect::<Result<Vec<_>, _>>()?;
        let experts = match experts {
            Some(p) => p,
            None => {
                let mut r = ResidentExperts::new(d.num_hidden_layers);
                for l in 0..d.num_hidden_layers {
                    r.insert_layer(l, stack.layer_experts(src, l)?);
                }
                Arc::new(r)
            }
        };
        let info = ModelInfo {
            arch: d.arch.to_string(),
            vocab_size: d.vocab_size,
            hidden_size: d.hidden_size,
            n_layers: d.num_hidden_layers,
            max_position_embeddings: d.max_position_embeddings,
            max_context: opts.max_context.unwrap_or(d.max_position_embeddings),
            bos_token_id: d.bos_token_id,
            eos_token_ids: d.eos_token_ids.clone(),
            num_experts: d.num_experts,
            num_experts_per_tok: d.top_k,
        };
        let state = (0..d.num_hidden_layers)
            .map(|_| stack.family.new_state(opts.kv_bits))
            .collect();
        Ok(FamilyModel {
            info,
            stack,
            layers,
            experts,
            cache: None,
            state,
            kv_bits: opts.kv_bits,
        })
    }

    /// Records the streaming cache behind this model's experts (for
    /// `--stats`, `/metrics`, `mfx bench`).
    pub fn set_cache(&mut self, cache: Option<Arc<ExpertCache>>) {
        self.cache = cache;
    }

    /// The family (its config and switches).
    pub fn family(&self) -> &F {
        &self.stack.family
    }

    /// [`Model::forward`] that also reports every routing decision.
    pub fn forward_observed(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
        mut observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<Vec<f32>, RuntimeError> {
        let past = self.seq_len();
        let needed = past + tokens.len();
        if needed > self.info.max_context {
            return Err(RuntimeError::ContextFull {
                needed,
                max: self.info.max_context,
            });
        }
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let mut hidden = self.stack.embed(tokens)?;
        for (l, st) in self.state.iter_mut().enumerate() {
            let obs = observer.as_deref_mut();
            let (lw, next) = (&self.layers[l], self.layers.get(l + 1));
            if let Err(e) = self.stack.family.layer_forward(
                lw,
                next,
                self.experts.as_ref(),
                &mut hidden,
                st,
                obs,
            ) {
                // Keep the layers consistent: drop this call's positions,
                // or the whole sequence where a state cannot roll back.
                let mut ok = true;
                for st in self.state.iter_mut() {
                    ok &= st.truncate(past);
                }
                if !ok {
                    self.reset();
                }
                return Err(e);
            }
        }
        Ok(self.stack.final_logits(&hidden, all_logits))
    }
}

impl<F: Family> Model for FamilyModel<F> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, RuntimeError> {
        self.forward_observed(tokens, all_logits, None)
    }

    fn forward_steps(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        if !self.batched_steps() {
            return super::forward_each(self, tokens);
        }
        for s in self.state.iter_mut() {
            s.set_exact_steps(true);
        }
        let out = self.forward_observed(tokens, true, None);
        for s in self.state.iter_mut() {
            s.set_exact_steps(false);
        }
        out
    }

    fn batched_steps(&self) -> bool {
        self.state
            .iter()
            .all(|s| s.supports_exact_steps() && s.rolls_back())
    }

    fn seq_len(&self) -> usize {
        self.state.first().map_or(0, |s| s.len())
    }

    fn truncate(&mut self, len: usize) -> bool {
        if len > self.seq_len() {
            return false;
        }
        // All or nothing: a state that cannot roll back refuses before any moves.
        len == self.seq_len() || SeqStates::truncate(&mut self.state, len)
    }

    fn reset(&mut self) {
        for s in self.state.iter_mut() {
            s.clear();
        }
    }

    fn expert_cache(&self) -> Option<Arc<ExpertCache>> {
        self.cache.clone()
    }

    fn state(&self) -> Option<&dyn SeqStates> {
        Some(&self.state)
    }

    fn state_mut(&mut self) -> Option<&mut dyn SeqStates> {
        Some(&mut self.state)
    }

    fn take_state(&mut self) -> Option<Box<dyn SeqStates>> {
        let fresh = self.fresh_state();
        Some(Box::new(std::mem::replace(&mut self.state, fresh)))
    }

    fn put_state(&mut self, s: Box<dyn SeqStates>) -> Result<(), Box<dyn SeqStates>> {
        let n = self.state.len();
        // Checked before the downcast consumes it, so a refusal hands it back.
        if s.as_ref().type_id_of() != std::any::TypeId::of::<Vec<F::State>>() {
            return Err(s);
        }
        let v: Vec<F::State> = *s.into_any().downcast().expect("type checked above");
        if v.len() != n {
            return Err(Box::new(v));
        }
        self.state = v;
        Ok(())
    }

    fn load_state(&self, bytes: &[u8]) -> Result<Box<dyn SeqStates>, StateError> {
        Ok(Box::new(load_states(self.fresh_state(), bytes)?))
    }
}

impl<F: Family> FamilyModel<F> {
    fn fresh_state(&self) -> Vec<F::State> {
        (0..self.info.n_layers)
            .map(|_| self.stack.family.new_state(self.kv_bits))
            .collect()
    }
}
