//! Measured quality: the next-token NLL of a written pack, computed by the
//! runtime's own layer-by-layer forward pass over the pack itself (dense
//! tensors as stored, each expert at its stored bits, merged experts
//! resolved by the pack), so the number in the report and the model card is
//! what `mfx eval ppl PACK` measures, not a simulation of it.
//!
//! Beside the NLL, each pack's KL divergence from the source (prep's
//! forward over the checkpoint), per position over the same rows
//! ([`crate::kld`], the numbers `mfx eval kld PACK --base CHECKPOINT`
//! reports).
//!
//! Protocol: ../shared's `val_nll` (64 rows of 512 tokens by default, each
//! row scored from an empty cache, 511 predictions per row).

use crate::calib::{CalibText, Tok};
use crate::error::Result;
use crate::kld::{KldStats, KldSummary};
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

/// The source model on one evaluation text: its NLL, and the final hidden
/// states (`[rows * seq, hidden]`, f32, before the final norm) from which
/// its logits are recomputed one row at a time when a pack is compared with
/// it, so that the reference's logits need not be kept (they are `vocab /
/// hidden` times larger).
pub struct SourceEval {
    pub name: String,
    pub nll: f64,
    batch: CalibBatch,
    hidden: Vec<f32>,
}

/// A pack on one evaluation text: its NLL and, against the source, its KL
/// divergence (`kld.nll_model == nll`).
pub struct PackEval {
    pub name: String,
    pub nll: f64,
    pub kld: KldSummary,
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
    Ok(
        source_per_text(model, weights, tok, texts, rows, seq, experts)?
            .into_iter()
            .map(|s| (s.name, s.nll))
            .collect(),
    )
}

/// The source (or any model) on each evaluation text, kept for comparison.
pub fn source_per_text(
    model: &dyn Layerwise,
    weights: &dyn WeightSource,
    tok: &Tok,
    texts: &[CalibText],
    rows: usize,
    seq: usize,
    experts: &dyn LayerExperts,
) -> Result<Vec<SourceEval>> {
    let mut out = Vec::new();
    for t in texts {
        let batch: CalibBatch = routing::tokenize(tok, std::slice::from_ref(t), rows, seq)?;
        let quiet = |_: usize, _: usize| {};
        let (_, hidden) = routing::run_layers(model, weights, &batch, experts, &quiet, &|| {})?;
        let nll = routing::mean_nll(model, &hidden, &batch.ids, batch.rows, batch.seq);
        out.push(SourceEval {
            name: t.name.clone(),
            nll,
            batch,
            hidden,
        });
    }
    Ok(out)
}

/// Compares `model` (over `weights` with `experts`) with the source on
/// each text of `reference`, whose logits `ref_model` recomputes.
pub fn compare_per_text(
    model: &dyn Layerwise,
    weights: &dyn WeightSource,
    experts: &dyn LayerExperts,
    ref_model: &dyn Layerwise,
    reference: &[SourceEval],
) -> Result<Vec<PackEval>> {
    let (h, vocab) = (model.hidden_size(), model.vocab_size());
    if ref_model.hidden_size() != h || ref_model.vocab_size() != vocab {
        return Err(from_runtime(mfx_runtime::RuntimeError::Other(format!(
            "the pack (hidden {h}, vocabulary {vocab}) and its source (hidden {}, vocabulary {}) differ",
            ref_model.hidden_size(),
            ref_model.vocab_size()
        ))));
    }
    let mut out = Vec::new();
    for r in reference {
        let quiet = |_: usize, _: usize| {};
        let (_, x) = routing::run_layers(model, weights, &r.batch, experts, &quiet, &|| {})?;
        let seq = r.batch.seq;
        let mut stats = KldStats::default();
        for row in 0..r.batch.rows {
            let span = row * seq * h..(row + 1) * seq * h;
            let lb = ref_model.final_logits(&r.hidden[span.clone()], true);
            let lm = model.final_logits(&x[span], true);
            stats.add_row(&lb, &lm, vocab, &r.batch.ids[row * seq..(row + 1) * seq]);
        }
        let kld = stats.summary();
        out.push(PackEval {
            name: r.name.clone(),
            nll: kld.nll_model,
            kld,
        });
    }
    Ok(out)
}

/// The pack at `path`, loaded by the runtime, against the source on each
/// text of `reference`.
pub fn pack_per_text(
    path: &Path,
    ref_model: &dyn Layerwise,
    reference: &[SourceEval],
) -> Result<Vec<PackEval>> {
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
    compare_per_text(model.as_ref(), src, &experts, ref_model, reference)
}
