//! Measured quality: the next-token NLL of a written pack, computed by the
//! runtime's own layer-by-layer forward pass over the pack itself (dense
//! tensors as stored, each expert at its stored bits, merged experts
//! resolved by the pack), so the number in the report and the model card is
//! what `mfx eval ppl PACK` measures, not a simulation of it.
//!
//! Protocol: ../shared's `val_nll` (64 rows of 512 tokens by default, each
//! row scored from an empty cache, 511 predictions per row).

use crate::calib::{CalibText, Tok};
use crate::error::Result;
use crate::routing::{self, CalibBatch};
use crate::source::{from_runtime, LayerExperts};
use mfx_runtime::experts::PackExperts;
use mfx_runtime::models::layerwise::Layerwise;
use mfx_runtime::models::ExpertProvider;
use mfx_runtime::weights::pack::PackSource;
use mfx_runtime::weights::WeightSource;
use std::path::Path;
use std::sync::Arc;

/// A pack's experts, one layer at a time: a fresh [`PackExperts`] per layer,
/// so decoded (entropy-coded) experts of earlier layers are not kept.
pub struct PackLayerExperts {
    pub src: PackSource,
    pub hidden: usize,
    pub inter: usize,
}

impl LayerExperts for PackLayerExperts {
    fn layer(&self, _l: usize) -> Result<Arc<dyn ExpertProvider>> {
        Ok(Arc::new(PackExperts::new(
            self.src.clone(),
            self.hidden,
            self.inter,
        )))
    }
}

/// NLL per evaluation text of `model` over `weights` with `experts`.
pub fn nll_per_text(
    model: &dyn Layerwise,
    weights: &dyn WeightSource,
    tok: &Tok,
    texts: &[CalibText],
    rows: usize,
    seq: usize,
    experts: &dyn LayerExperts,
) -> Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for t in texts {
        let batch: CalibBatch = routing::tokenize(tok, std::slice::from_ref(t), rows, seq)?;
        let quiet = |_: usize, _: usize| {};
        let (_, nll) = routing::profile(model, weights, &batch, experts, true, &quiet, &|| {})?;
        out.push((t.name.clone(), nll.unwrap_or(f64::NAN)));
    }
    Ok(out)
}

/// NLL per evaluation text of the pack at `path`, loaded by the runtime.
pub fn pack_nll_per_text(
    path: &Path,
    tok: &Tok,
    texts: &[CalibText],
    rows: usize,
    seq: usize,
) -> Result<Vec<(String, f64)>> {
    let resolved = mfx_runtime::load::resolve(path).map_err(from_runtime)?;
    let mfx_runtime::load::Origin::Pack(src) = &resolved.origin else {
        return Err(from_runtime(mfx_runtime::RuntimeError::Other(format!(
            "{} is not an .mfx pack",
            path.display()
        ))));
    };
    let cfg = &resolved.config;
    let model = cfg.layerwise(src).map_err(from_runtime)?;
    let experts = PackLayerExperts {
        src: src.clone(),
        hidden: cfg.hidden_size(),
        inter: cfg.moe_intermediate_size(),
    };
    nll_per_text(model.as_ref(), src, tok, texts, rows, seq, &experts)
}
