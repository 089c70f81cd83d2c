//! Stage 1: the routing profile. Runs the model layer by layer over the
//! whole calibration batch and records, per MoE layer and expert, how often
//! it was picked, its summed gate weight, and which experts of the previous
//! MoE layer the same tokens went to (prefetch hints).

use crate::calib::{CalibText, Tok};
use crate::error::{PrepError, Result};
use crate::source::{from_runtime, LayerExperts, Source, SourceExperts};
use mfx_formats::profile::{CalibSource, Calibration, LayerProfile};
use mfx_runtime::models::layerwise::Layerwise;
use mfx_runtime::models::{ExpertProvider, ResidentExperts, RouterObserver};
use mfx_runtime::weights::WeightSource;
use std::sync::Arc;

/// The routing decisions of one MoE layer for every token of the batch.
pub struct Routing {
    pub top_k: usize,
    /// `[tokens * top_k]` expert ids, in the router's top-k order.
    pub ids: Vec<u32>,
    /// `[tokens * top_k]` mixing weights as the model applies them.
    pub weights: Vec<f32>,
}

/// Collects a layer's routing over the batch, one sequence at a time.
struct Collect {
    r: Routing,
    /// Index of the current sequence's first token in the batch.
    offset: usize,
    bad: Option<String>,
    /// Per expert: summed `gate weight * ||expert output||` (REAP saliency).
    saliency: Vec<f64>,
}

impl RouterObserver for Collect {
    fn observe(
        &mut self,
        layer: usize,
        token: usize,
        _logits: &[f32],
        _probs: &[f32],
        selected: &[usize],
        weights: &[f32],
    ) {
        let k = self.r.top_k;
        let at = (self.offset + token) * k;
        if selected.len() != k || at + k > self.r.ids.len() {
            self.bad = Some(format!(
                "layer {layer}: {} experts routed for token {token}, expected {k}",
                selected.len()
            ));
            return;
        }
        for (j, (&e, &w)) in selected.iter().zip(weights).enumerate() {
            self.r.ids[at + j] = e as u32;
            self.r.weights[at + j] = w;
        }
    }

    fn wants_expert_outputs(&self) -> bool {
        !self.saliency.is_empty()
    }

    fn expert_output(&mut self, _layer: usize, expert: usize, tokens: &[(usize, f32)], y: &[f32]) {
        let h = y.len() / tokens.len().max(1);
        if let Some(s) = self.saliency.get_mut(expert) {
            for (&(_, w), row) in tokens.iter().zip(y.chunks_exact(h.max(1))) {
                let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                *s += w as f64 * norm;
            }
        }
    }
}

/// Top pairs kept per previous-layer expert; a dense `E x E` table would be
/// 50 MB for a 48-layer, 512-expert model.
pub const COACT_TOP_N: usize = 8;

/// Counters for one MoE layer.
pub struct LayerStats {
    pub layer: usize,
    pub counts: Vec<u64>,
    pub gate_mass: Vec<f64>,
    /// Per expert: summed `gate weight * ||expert output||_2` over the
    /// tokens routed to it (REAP's saliency is this over `counts`).
    pub saliency_sum: Vec<f64>,
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
            saliency_sum: vec![0.0; experts],
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

    /// Saliency per expert from its mixing weight times the L2 norm of its
    /// output over the tokens routed to it: summed, or REAP's mean (0 if unused).
    pub fn saliency(&self, kind: crate::prune::SaliencyKind) -> Vec<f64> {
        self.saliency_sum
            .iter()
            .zip(&self.counts)
            .map(|(&s, &c)| match kind {
                crate::prune::SaliencyKind::Total => s,
                crate::prune::SaliencyKind::Mean if c == 0 => 0.0,
                crate::prune::SaliencyKind::Mean => s / c as f64,
            })
            .collect()
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
        let rows = ((rows_per_source as f64 * t.weight).round() as usize).max(1);
        let r = tok.rows(&t.name, &t.text, rows, seq)?;
        sources.push(CalibSource {
            name: t.name.clone(),
            tokens: r.len() as u64,
        });
        ids.extend(r);
    }
    let rows = ids.len() / seq;
    // A task mix (`--task`) is part of the protocol; the plain one reads as before.
    let weights = if texts.iter().all(|t| t.weight == 1.0) {
        String::new()
    } else {
        let w: Vec<String> = texts
            .iter()
            .map(|t| format!("{} x{}", t.name, t.weight))
            .collect();
        format!(" times each source's weight ({})", w.join(", "))
    };
    Ok(CalibBatch {
        calibration: Calibration {
            sources,
            tokens: ids.len() as u64,
            protocol: format!(
                "up to {rows_per_source} rows x {seq} tokens per source{}; documents split on \\n<|endoftext|>\\n, \
                 encoded without BOS, end-of-text token appended to each",
                weights
            ),
        },
        ids,
        rows,
        seq,
    })
}

/// Calibration rows from files of token ids (whitespace- or
/// comma-separated): up to `rows_per_source` rows of `seq` per file.
pub fn id_rows(
    paths: &[std::path::PathBuf],
    rows_per_source: usize,
    seq: usize,
) -> Result<CalibBatch> {
    let mut ids = Vec::new();
    let mut sources = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(crate::error::io_err(p))?;
        let mut v = Vec::new();
        for t in text
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|t| !t.is_empty())
        {
            v.push(t.parse::<u32>().map_err(|_| PrepError::BadFile {
                path: p.clone(),
                msg: format!(
                    "{t:?} is not a token id (expected whitespace- or comma-separated integers)"
                ),
            })?);
        }
        let rows = (v.len() / seq).min(rows_per_source);
        if rows == 0 {
            return Err(PrepError::Calibration(format!(
                "{} has only {} token ids; a calibration source needs at least one row of {seq} (--calib-seq)",
                p.display(),
                v.len()
            )));
        }
        v.truncate(rows * seq);
        sources.push(CalibSource {
            name: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            tokens: v.len() as u64,
        });
        ids.extend(v);
    }
    let rows = ids.len() / seq;
    Ok(CalibBatch {
        calibration: Calibration {
            sources,
            tokens: ids.len() as u64,
            protocol: format!("up to {rows_per_source} rows x {seq} token ids per file, as given"),
        },
        ids,
        rows,
        seq,
    })
}

/// Progress callback: `(layers done, layers total)`.
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Runs the model layer by layer over the whole batch (load layer L, push
/// every calibration sequence through it, drop it) and returns per-MoE-layer
/// stats and, if asked, the mean next-token NLL of each sequence's
/// predictions averaged over all of them (needs the LM head).
pub fn profile(
    model: &dyn Layerwise,
    weights: &dyn WeightSource,
    batch: &CalibBatch,
    experts: &dyn LayerExperts,
    want_nll: bool,
    progress: Progress<'_>,
    release: &dyn Fn(),
) -> Result<(Vec<LayerStats>, Option<f64>)> {
    let (stats, x) = run_layers(model, weights, batch, experts, progress, release)?;
    let nll = if want_nll {
        Some(mean_nll(model, &x, &batch.ids, batch.rows, batch.seq))
    } else {
        None
    };
    Ok((stats, nll))
}

/// A [`RouterObserver`] that [`walk_layers`] tells which calibration row
/// the next forward call covers.
pub trait RowObserver: RouterObserver {
    /// Row `r` (batch tokens `r * seq..(r + 1) * seq`) goes through the layer next.
    fn start_row(&mut self, r: usize, seq: usize) {
        let _ = (r, seq);
    }
}

impl RowObserver for Collect {
    fn start_row(&mut self, r: usize, seq: usize) {
        self.offset = r * seq;
    }
}

/// The one layer-by-layer pass over a calibration batch: load layer L,
/// push every row through it with the observer `observe(L, is_moe)` made,
/// hand that observer to `done(L, is_moe, observer)`, drop the layer.
/// Returns the final hidden states `[rows * seq, hidden]` (before the
/// final norm). Stage 1 and GPTQ's statistics both walk through here.
#[allow(clippy::too_many_arguments)]
pub fn walk_layers<O: RowObserver>(
    model: &dyn Layerwise,
    weights: &dyn WeightSource,
    batch: &CalibBatch,
    experts: &dyn LayerExperts,
    progress: Progress<'_>,
    release: &dyn Fn(),
    mut observe: impl FnMut(usize, bool, &Arc<dyn ExpertProvider>) -> O,
    mut done: impl FnMut(usize, bool, O) -> Result<()>,
) -> Result<Vec<f32>> {
    let (h, seq, rows) = (model.hidden_size(), batch.seq, batch.rows);
    let n_layers = model.n_layers();
    let mut x = Vec::with_capacity(rows * seq * h);
    for r in 0..rows {
        x.extend(
            model
                .embed(&batch.ids[r * seq..(r + 1) * seq])
                .map_err(|e| PrepError::Calibration(format!("calibration row {r}: {e}")))?,
        );
    }
    for l in 0..n_layers {
        let layer = model.load_layer(weights, l).map_err(from_runtime)?;
        let moe = model.is_moe_layer(l);
        let ex = if moe {
            experts.layer(l)?
        } else {
            Arc::new(ResidentExperts::new(n_layers))
        };
        let mut obs = observe(l, moe, &ex);
        for (r, xs) in x.chunks_exact_mut(seq * h).enumerate() {
            obs.start_row(r, seq);
            model
                .layer_forward(&layer, ex.as_ref(), xs, Some(&mut obs))
                .map_err(from_runtime)?;
        }
        drop((layer, ex));
        done(l, moe, obs)?;
        release();
        progress(l + 1, n_layers);
    }
    Ok(x)
}

/// [`walk_layers`] collecting [`profile`]'s per-MoE-layer stats; also
/// returns the final hidden states.
pub fn run_layers(
    model: &dyn Layerwise,
    weights: &dyn WeightSource,
    batch: &CalibBatch,
    experts: &dyn LayerExperts,
    progress: Progress<'_>,
    release: &dyn Fn(),
) -> Result<(Vec<LayerStats>, Vec<f32>)> {
    let (seq, rows) = (batch.seq, batch.rows);
    let (k, ne) = (model.top_k(), model.num_experts());
    let mut stats = Vec::new();
    let mut prev: Option<Routing> = None;
    let x = walk_layers(
        model,
        weights,
        batch,
        experts,
        progress,
        release,
        |_, moe, _| Collect {
            r: Routing {
                top_k: k,
                ids: vec![0; if moe { rows * seq * k } else { 0 }],
                weights: vec![0.0; if moe { rows * seq * k } else { 0 }],
            },
            offset: 0,
            bad: None,
            saliency: vec![0.0; if moe { ne } else { 0 }],
        },
        |l, moe, mut obs| {
            if let Some(b) = obs.bad {
                return Err(PrepError::Calibration(b));
            }
            if moe {
                let mut s = LayerStats::new(l, ne, prev.is_some());
                s.add(&obs.r, prev.as_ref());
                s.saliency_sum = std::mem::take(&mut obs.saliency);
                stats.push(s);
                prev = Some(obs.r);
            }
            Ok(())
        },
    )?;
    Ok((stats, x))
}

/// Mean next-token NLL (nats) of each row's `seq - 1` predictions, averaged
/// over rows: the protocol of ../shared's reference `val_nll`.
pub fn mean_nll(model: &dyn Layerwise, x: &[f32], ids: &[u32], rows: usize, seq: usize) -> f64 {
    let (h, vocab) = (model.hidden_size(), model.vocab_size());
    let mut total = 0f64;
    let mut count = 0usize;
    for r in 0..rows {
        let base = r * seq;
        let logits = model.final_logits(&x[base * h..(base + seq) * h], true);
        for t in 0..seq.saturating_sub(1) {
            let l = &logits[t * vocab..(t + 1) * vocab];
            let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = l.iter().map(|v| ((v - m) as f64).exp()).sum();
            let target = ids[base + t + 1] as usize;
            total += z.ln() + m as f64 - l[target] as f64;
            count += 1;
        }
    }
    if count == 0 {
        f64::NAN
    } else {
        total / count as f64
    }
}

/// Convenience: profile a checkpoint with its own experts.
pub fn profile_source(
    src: &Source,
    batch: &CalibBatch,
    want_nll: bool,
    progress: Progress<'_>,
) -> Result<(Vec<LayerStats>, Option<f64>)> {
    profile(
        src.model.as_ref(),
        &src.weights,
        batch,
        &SourceExperts(src),
        want_nll,
        progress,
        &|| src.release_pages(),
    )
}
