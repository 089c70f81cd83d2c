//! Measured quality: the next-token NLL a pack will have, computed by prep's
//! forward pass with every weight quantized and dequantized exactly as the
//! pack stores it (dense at `--dense-bits`, routers at 8, each expert at its
//! planned hot/cold bits, merged experts remapped). This lets `mfx prep`
//! put a measured number in the report and the model card without loading
//! the pack; `mfx eval ppl PACK` measures the same thing with the runtime.
//!
//! Protocol: ../shared's `val_nll` (64 rows of 512 tokens by default, each
//! row scored from an empty cache, 511 predictions per row).

use crate::calib::{CalibText, Tok};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::forward::{self, ExpertSource, ExpertWeights};
use crate::merge::MergeOutcome;
use crate::plan::Plan;
use crate::quantize::{dequant, group_for, quantize_mat};
use crate::routing::{self, CalibBatch};
use mfx_formats::quant::Scheme;
use std::collections::HashMap;
use std::sync::Arc;

/// Experts as a pack stores them.
pub struct SimExperts<'a> {
    pub ck: &'a Checkpoint,
    /// `(layer, expert)` -> bits.
    pub bits: HashMap<(usize, usize), u8>,
    pub group: u32,
    pub merge: Option<&'a MergeOutcome>,
}

impl<'a> SimExperts<'a> {
    pub fn new(
        ck: &'a Checkpoint,
        pl: &Plan,
        hot_bits: u8,
        cold_bits: u8,
        group: u32,
        merge: Option<&'a MergeOutcome>,
    ) -> Self {
        let mut bits = HashMap::new();
        for lp in &pl.layers {
            for e in 0..ck.config.experts {
                bits.insert((lp.layer as usize, e), cold_bits);
            }
            for &h in &lp.hot {
                bits.insert((lp.layer as usize, h as usize), hot_bits);
            }
        }
        Self {
            ck,
            bits,
            group,
            merge,
        }
    }
}

impl ExpertSource for SimExperts<'_> {
    fn expert(&self, layer: usize, e: usize) -> Result<Arc<ExpertWeights>> {
        let w = match self.merge.and_then(|m| m.weights(layer, e)) {
            Some(w) => w,
            None => forward::load_expert(self.ck, layer, e)?,
        };
        let bits = self.bits.get(&(layer, e)).copied().unwrap_or(4);
        let q = |m: &crate::checkpoint::Mat, what: &str| -> Result<crate::checkpoint::Mat> {
            let g = group_for(m.cols, self.group).unwrap_or(32);
            let s = quantize_mat(m, Scheme::affine(bits, g)?, what)?;
            Ok(dequant(&s, m.rows, m.cols))
        };
        Ok(Arc::new(ExpertWeights {
            gate: q(&w.gate, "gate_proj")?,
            up: q(&w.up, "up_proj")?,
            down: q(&w.down, "down_proj")?,
        }))
    }
    fn remap(&self, layer: usize, e: usize) -> usize {
        self.merge
            .and_then(|m| m.layer_map(layer))
            .map_or(e, |m| m[e] as usize)
    }
}

/// NLL per evaluation text with `experts` (and whatever dense simulation is set on `ck`).
pub fn nll_per_text(
    ck: &Checkpoint,
    tok: &Tok,
    texts: &[CalibText],
    rows: usize,
    seq: usize,
    experts: &dyn ExpertSource,
) -> Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for t in texts {
        let batch: CalibBatch = routing::tokenize(tok, std::slice::from_ref(t), rows, seq)?;
        let quiet = |_: usize, _: usize| {};
        let (_, nll) = routing::profile(ck, &batch, experts, true, &quiet)?;
        out.push((t.name.clone(), nll.unwrap_or(f64::NAN)));
    }
    Ok(out)
}
