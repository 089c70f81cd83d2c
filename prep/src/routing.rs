//! Stage 1: the routing profile. Runs the model layer by layer over the
//! whole calibration batch and records, per MoE layer and expert, how often
//! it was picked, its summed gate weight, and which experts of the previous
//! MoE layer the same tokens went to (prefetch hints).

use crate::calib::{CalibText, Tok};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::forward::{self, Batch, CheckpointExperts, ExpertSource, LayerWeights, Routing};
use mfx_formats::profile::{CalibSource, Calibration, LayerProfile};

/// Top pairs kept per previous-layer expert; a dense `E x E` table would be
/// 50 MB for a 48-layer, 512-expert model.
pub const COACT_TOP_N: usize = 8;

/// Counters for one MoE layer.
pub struct LayerStats {
    pub layer: usize,
    pub counts: Vec<u64>,
    pub gate_mass: Vec<f64>,
    /// `[E_prev * E]` co-activation counts (dense while profiling, one layer pair at a time).
    coact: Vec<u32>,
    has_prev: bool,
}

impl LayerStats {
    pub fn new(layer: usize, experts: usize, has_prev: bool) -> Self {
        Self {
            layer,
            counts: vec![0; experts],
            gate_mass: vec![0.0; experts],
            coact: if has_prev {
                vec![0; experts * experts]
            } else {
                Vec::new()
            },
            has_prev,
        }
    }

    /// Adds one layer's routing; `prev` is the previous MoE layer's routing of the same tokens.
    pub fn add(&mut self, r: &Routing, prev: Option<&Routing>) {
        let e = self.counts.len();
        for (id, w) in r.ids.iter().zip(&r.weights) {
            self.counts[*id as usize] += 1;
            self.gate_mass[*id as usize] += *w as f64;
        }
        if let (true, Some(p)) = (self.has_prev, prev) {
            let n = r.ids.len() / r.top_k;
            for t in 0..n {
                for &pe in &p.ids[t * p.top_k..(t + 1) * p.top_k] {
                    for &ce in &r.ids[t * r.top_k..(t + 1) * r.top_k] {
                        self.coact[pe as usize * e + ce as usize] += 1;
                    }
                }
            }
        }
    }

    /// Sparse top-N co-activation rows (descending count, then id).
    pub fn coactivation_top(&self, n: usize) -> Vec<Vec<[u64; 2]>> {
        if !self.has_prev {
            return Vec::new();
        }
        let e = self.counts.len();
        (0..e)
            .map(|p| {
                let row = &self.coact[p * e..(p + 1) * e];
                let mut pairs: Vec<[u64; 2]> = row
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c > 0)
                    .map(|(i, c)| [i as u64, *c as u64])
                    .collect();
                pairs.sort_by(|a, b| b[1].cmp(&a[1]).then(a[0].cmp(&b[0])));
                pairs.truncate(n);
                pairs
            })
            .collect()
    }

    pub fn into_profile(self, pinned: Vec<u32>) -> LayerProfile {
        let coactivation = self.coactivation_top(COACT_TOP_N);
        LayerProfile {
            layer: self.layer as u32,
            counts: self.counts,
            gate_mass: self.gate_mass.iter().map(|&g| round_mass(g)).collect(),
            coactivation,
            pinned,
        }
    }
}

/// Rounds a gate mass to 6 decimals. serde_json's default float parser is
/// exact only for short decimals, so a long shortest-repr value can come
/// back one ulp off; short values make `--profile FILE` give byte-identical
/// packs to the run that wrote FILE. (1e-6 of a token's weight is noise.)
pub fn round_mass(g: f64) -> f64 {
    format!("{g:.6}").parse().unwrap_or(g)
}

/// Calibration token rows plus what they are.
pub struct CalibBatch {
    pub ids: Vec<u32>,
    pub rows: usize,
    pub seq: usize,
    pub calibration: Calibration,
}

pub fn tokenize(
    tok: &Tok,
    texts: &[CalibText],
    rows_per_source: usize,
    seq: usize,
) -> Result<CalibBatch> {
    let mut ids = Vec::new();
    let mut sources = Vec::new();
    for t in texts {
        let r = tok.rows(&t.name, &t.text, rows_per_source, seq)?;
        sources.push(CalibSource {
            name: t.name.clone(),
            tokens: r.len() as u64,
        });
        ids.extend(r);
    }
    let rows = ids.len() / seq;
    Ok(CalibBatch {
        calibration: Calibration {
            sources,
            tokens: ids.len() as u64,
            protocol: format!(
                "up to {rows_per_source} rows x {seq} tokens per source; documents split on \\n<|endoftext|>\\n, \
                 encoded without BOS, end-of-text token appended to each"
            ),
        },
        ids,
        rows,
        seq,
    })
}

/// Progress callback: `(layers done, layers total)`.
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Runs the model over the batch and returns per-MoE-layer stats and, if
/// asked, the mean next-token NLL (needs the LM head: a full extra matmul).
pub fn profile(
    ck: &Checkpoint,
    batch: &CalibBatch,
    experts: &dyn ExpertSource,
    want_nll: bool,
    progress: Progress<'_>,
) -> Result<(Vec<LayerStats>, Option<f64>)> {
    let c = &ck.config;
    forward::check_supported(c)?;
    let mut b: Batch = forward::embed(ck, &batch.ids, batch.rows, batch.seq)?;
    let mut stats = Vec::new();
    let mut prev: Option<Routing> = None;
    for l in 0..c.layers {
        let lw = LayerWeights::load(ck, l)?;
        let r = forward::layer_forward(c, l, &lw, experts, &mut b)?;
        drop(lw);
        let mut s = LayerStats::new(l, c.experts, prev.is_some());
        s.add(&r, prev.as_ref());
        stats.push(s);
        prev = Some(r);
        ck.release_pages();
        progress(l + 1, c.layers);
    }
    let nll = if want_nll {
        Some(forward::final_nll(ck, &b, &batch.ids)?)
    } else {
        None
    };
    Ok((stats, nll))
}

/// Convenience: profile with the checkpoint's own experts.
pub fn profile_checkpoint(
    ck: &Checkpoint,
    batch: &CalibBatch,
    want_nll: bool,
    progress: Progress<'_>,
) -> Result<(Vec<LayerStats>, Option<f64>)> {
    profile(ck, batch, &CheckpointExperts(ck), want_nll, progress)
}
