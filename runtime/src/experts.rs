//! Routed experts as the rest of the runtime sees them, below `models`,
//! `cache` and `weights` (all three use it, none of them owns it):
//! an expert's weights ([`ExpertMats`]), where they come from
//! ([`ExpertProvider`]: mapped checkpoint, resident set, the streaming
//! cache), the next-layer hint a model hands its provider ([`NextHint`]),
//! and the one decoder from a pack's expert blob to [`ExpertMats`]
//! ([`decode_blob`], used by the cache and by [`PackExperts`], a pack's
//! experts without a budget).
//!
//! The split follows mistral.rs: the model decides *which* experts a token
//! uses and how their outputs mix; the provider decides *where* an expert's
//! bytes live.

use crate::error::RuntimeError;
use crate::kernels::{self, silu_mul, MatRef};
use crate::weights::pack::{pack_err, PackSource};
use crate::weights::{Blob, DType, Matrix, WeightSource};
use mfx_formats::pack::ExpertEntry;
use mfx_formats::quant::Scheme;
use mfx_formats::Codec;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A gated MLP: `down(glu(gate(x), up(x)))`, SwiGLU unless the family
/// says otherwise ([`Glu`]). Used for dense layers, for routed experts and
/// for shared experts.
#[derive(Debug, Clone)]
pub struct ExpertMats {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
    /// Per-expert output biases of the three projections (gpt-oss); `None`
    /// for every other family. They travel with the expert (its pack blob
    /// holds them as parts `gate_bias`, `up_bias`, `down_bias`), so a
    /// streamed expert is as complete as a resident one.
    pub bias: Option<ExpertBias>,
}

/// An expert's projection biases, f32: `gate` and `up` are
/// `intermediate` long, `down` is `hidden` long.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBias {
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
}

impl ExpertBias {
    /// Bytes held (what a cache budgets beside the matrices).
    pub fn nbytes(&self) -> usize {
        4 * (self.gate.len() + self.up.len() + self.down.len())
    }
}

/// How a gated MLP combines its gate and up projections.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Glu {
    /// `silu(gate) * up`: every family but gpt-oss.
    #[default]
    Silu,
    /// gpt-oss's clamped SwiGLU (transformers' `GptOssExperts`): the gate
    /// clamped from above and the up projection on both sides at `limit`,
    /// then `(up + 1) * gate * sigmoid(alpha * gate)`.
    Clamped { alpha: f32, limit: f32 },
}

impl Glu {
    /// `g[i] = glu(g[i], u[i])`, in place.
    pub fn apply(self, g: &mut [f32], u: &[f32]) {
        match self {
            Glu::Silu => silu_mul(g, u),
            Glu::Clamped { alpha, limit } => {
                for (a, &b) in g.iter_mut().zip(u) {
                    let gate = a.min(limit);
                    let up = b.clamp(-limit, limit);
                    *a = (up + 1.0) * (gate / (1.0 + (-alpha * gate).exp()));
                }
            }
        }
    }
}

/// Borrowed kernel views of one expert.
#[derive(Debug, Clone, Copy)]
pub struct ExpertWeights<'a> {
    pub gate: MatRef<'a>,
    pub up: MatRef<'a>,
    pub down: MatRef<'a>,
}

impl ExpertMats {
    pub fn weights(&self) -> ExpertWeights<'_> {
        ExpertWeights {
            gate: self.gate.mat(),
            up: self.up.mat(),
            down: self.down.mat(),
        }
    }

    /// Bytes of the three matrices and any biases (what a cache budgets).
    pub fn nbytes(&self) -> usize {
        self.gate.nbytes()
            + self.up.nbytes()
            + self.down.nbytes()
            + self.bias.as_ref().map_or(0, ExpertBias::nbytes)
    }

    /// `y[n, hidden] = mlp(x[n, hidden])` with SwiGLU.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.forward_glu(x, n, Glu::Silu)
    }

    /// `y[n, hidden] = down(glu(gate(x) + bg, up(x) + bu)) + bd`, the biases
    /// where the expert has them.
    pub fn forward_glu(&self, x: &[f32], n: usize, glu: Glu) -> Vec<f32> {
        if self.bias.is_none() && glu == Glu::Silu {
            return swiglu(&self.weights(), x, n);
        }
        self.down_of(&self.mid(x, n, glu), n)
    }

    /// The intermediate activations `glu(gate(x) + bg, up(x) + bu)`,
    /// `[n, intermediate]` (prep's GPTQ statistics and merge alignment).
    pub fn mid(&self, x: &[f32], n: usize, glu: Glu) -> Vec<f32> {
        let w = self.weights();
        let inter = w.gate.rows();
        let mut g = vec![0.0; n * inter];
        let mut u = vec![0.0; n * inter];
        kernels::matmul_many(&[w.gate, w.up], x, n, &mut [&mut g, &mut u]);
        if let Some(b) = &self.bias {
            add_rows(&mut g, &b.gate);
            add_rows(&mut u, &b.up);
        }
        glu.apply(&mut g, &u);
        g
    }

    /// `down(mid) + bd` over `n` rows of [`ExpertMats::mid`]'s activations.
    pub fn down_of(&self, mid: &[f32], n: usize) -> Vec<f32> {
        let down = self.down.mat();
        let mut y = vec![0.0; n * down.rows()];
        kernels::matmul(&down, mid, n, &mut y);
        if let Some(b) = &self.bias {
            add_rows(&mut y, &b.down);
        }
        y
    }
}

/// `y[r] += b` for every `b.len()`-wide row of `y`.
fn add_rows(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len().max(1)) {
        for (a, c) in row.iter_mut().zip(b) {
            *a += c;
        }
    }
}

/// `down(silu(gate(x)) * up(x))` over `n` rows.
pub fn swiglu(w: &ExpertWeights<'_>, x: &[f32], n: usize) -> Vec<f32> {
    let inter = w.gate.rows();
    let mut g = vec![0.0; n * inter];
    let mut u = vec![0.0; n * inter];
    kernels::matmul_many(&[w.gate, w.up], x, n, &mut [&mut g, &mut u]);
    silu_mul(&mut g, &u);
    let mut y = vec![0.0; n * w.down.rows()];
    kernels::matmul(&w.down, &g, n, &mut y);
    y
}

/// What the model knows about the next MoE layer when it asks for a prefetch.
pub struct NextHint<'a> {
    /// `[n, num_experts]`: the next layer's router on the proxy input, as a
    /// distribution (each router says how, see `models::nn::router`).
    pub probs: &'a [f32],
    pub n: usize,
    pub top_k: usize,
    /// Per token: the current layer's selected experts and their weights.
    pub prev: &'a [Vec<(usize, f32)>],
}

/// Supplies routed experts' weights. `get` returns a shared handle so that a
/// cache may evict its own reference while a forward pass still uses the
/// expert; the bytes go when the last handle drops.
pub trait ExpertProvider: Send + Sync {
    /// Expert `expert` of MoE layer `layer`.
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertMats>, RuntimeError>;
    /// Called once per MoE layer and forward pass, before any `get`, with the
    /// experts the batch routes to (ascending) and, for each, how many of the
    /// batch's tokens it serves: a cache can start reading them all at once.
    /// The counts go into `mfx bench --trace-routing` (no policy weighs by
    /// them: replayed, that moved loads by -8% to +7%, docs/PERF.md). The
    /// default does nothing.
    fn prefetch(&self, layer: usize, experts: &[usize], tokens: &[u32]) {
        let _ = (layer, experts, tokens);
    }
    /// Whether `get` would return without reading (for `--skip-missing`).
    fn is_resident(&self, layer: usize, expert: usize) -> bool {
        let _ = (layer, expert);
        true
    }
    /// Whether the model may skip non-resident secondary experts.
    fn skip_missing(&self) -> bool {
        false
    }
    /// `n` (token, expert) uses of `layer` were skipped.
    fn record_skipped(&self, layer: usize, n: usize) {
        let _ = (layer, n);
    }
    /// Whether predictions for MoE layer `layer` are worth computing.
    fn wants_next_hint(&self, layer: usize) -> bool {
        let _ = layer;
        false
    }
    /// A prediction input for MoE layer `layer`, made while the layer before
    /// it computes: the provider may start reading (never blocking).
    fn hint_next(&self, layer: usize, hint: &NextHint<'_>) {
        let _ = (layer, hint);
    }
}

/// Routed experts held as handles into their weight source (for a mapped
/// checkpoint: the OS pages them in on first use). Layers without experts
/// (dense ones, or layers not loaded) have none.
pub struct ResidentExperts {
    layers: Vec<Vec<Arc<ExpertMats>>>,
}

impl ResidentExperts {
    /// An empty provider for a model of `n_layers` layers; fill with [`Self::insert_layer`].
    pub fn new(n_layers: usize) -> Self {
        ResidentExperts {
            layers: vec![Vec::new(); n_layers],
        }
    }

    pub fn insert_layer(&mut self, layer: usize, experts: Vec<ExpertMats>) {
        if layer < self.layers.len() {
            self.layers[layer] = experts.into_iter().map(Arc::new).collect();
        }
    }

    /// Drops a layer's experts (prep, after the layer is done).
    pub fn remove_layer(&mut self, layer: usize) {
        if layer < self.layers.len() {
            self.layers[layer] = Vec::new();
        }
    }

    pub fn nbytes(&self) -> usize {
        self.layers.iter().flatten().map(|e| e.nbytes()).sum()
    }
}

impl ExpertProvider for ResidentExperts {
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertMats>, RuntimeError> {
        self.layers
            .get(layer)
            .and_then(|l| l.get(expert))
            .cloned()
            .ok_or_else(|| {
                RuntimeError::Other(format!("expert {expert} of layer {layer} is not loaded"))
            })
    }
}

/// Tensor names of one expert's three projections (gate, up, down).
pub type ExpertNames = [String; 3];

/// The pack part names of an expert's biases, in blob order after the
/// three projections (docs/FORMAT.md, 6.2).
pub const BIAS_PARTS: [&str; 3] = ["gate_bias", "up_bias", "down_bias"];

/// [`ExpertMats`] over `blob`, an expert's decoded (uncompressed) bytes,
/// from the manifest's part table. Every part must lie inside the blob,
/// the three shapes must agree with each other, and with `expect`
/// (`(hidden, moe_intermediate)`) when given. The error names the expert
/// and part; callers add the pack's path.
pub fn decode_blob(
    entry: &ExpertEntry,
    blob: &Blob,
    expect: Option<(usize, usize)>,
) -> Result<ExpertMats, String> {
    let label = entry.label();
    let part = |name: &str| -> Result<Matrix, String> {
        let i = entry
            .part_index(name)
            .ok_or_else(|| format!("{label}: no part `{name}`"))?;
        let (off, l) = entry
            .part_layout(i)
            .ok_or_else(|| format!("{label}: part `{name}` has no valid layout"))?;
        if off
            .checked_add(l.length)
            .is_none_or(|end| end > blob.len() as u64)
        {
            return Err(format!(
                "{label}: part `{name}` lies outside the decoded blob"
            ));
        }
        let (rows, cols) = (l.rows as usize, l.cols as usize);
        let sub = |start: u64, len: u64| blob.slice((off + start) as usize, len as usize);
        match l.scheme {
            Scheme::F32 | Scheme::F16 | Scheme::Bf16 => {
                let dt = match l.scheme {
                    Scheme::F32 => DType::F32,
                    Scheme::F16 => DType::F16,
                    _ => DType::Bf16,
                };
                Matrix::dense(dt, rows, cols, sub(0, l.packed_len))
                    .map_err(|e| format!("{label} {name}: {e}"))
            }
            Scheme::Affine { bits, group_size } => Matrix::affine(
                rows,
                cols,
                bits,
                group_size as usize,
                sub(0, l.packed_len),
                sub(l.scales_offset, l.groups_len),
                sub(l.biases_offset, l.groups_len),
            )
            .map_err(|e| format!("{label} {name}: {e}")),
            Scheme::Mxfp4 => Matrix::mxfp4(
                rows,
                cols,
                sub(0, l.packed_len),
                sub(l.scales_offset, l.groups_len),
            )
            .map_err(|e| format!("{label} {name}: {e}")),
        }
    };
    let mut m = ExpertMats {
        gate: part("gate_proj")?,
        up: part("up_proj")?,
        down: part("down_proj")?,
        bias: None,
    };
    // The optional bias parts (gpt-oss): all three or none, each a float
    // vector as long as its projection's output.
    let present: Vec<&str> = BIAS_PARTS
        .into_iter()
        .filter(|p| entry.part_index(p).is_some())
        .collect();
    if !present.is_empty() {
        if present.len() != BIAS_PARTS.len() {
            return Err(format!(
                "{label}: has bias part(s) {present:?} but not all of {BIAS_PARTS:?}"
            ));
        }
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, String> {
            let v = part(name)?;
            if (v.rows(), v.cols()) != (1, len) || !matches!(v, Matrix::Dense { .. }) {
                return Err(format!(
                    "{label}: part `{name}` must be a float vector of {len}, found [{}, {}]",
                    v.rows(),
                    v.cols()
                ));
            }
            Ok(v.dequantize())
        };
        m.bias = Some(ExpertBias {
            gate: vector("gate_bias", m.gate.rows())?,
            up: vector("up_bias", m.up.rows())?,
            down: vector("down_bias", m.down.rows())?,
        });
    }
    let shapes = format!(
        "gate [{}, {}], up [{}, {}], down [{}, {}]",
        m.gate.rows(),
        m.gate.cols(),
        m.up.rows(),
        m.up.cols(),
        m.down.rows(),
        m.down.cols()
    );
    if m.gate.rows() != m.up.rows()
        || m.gate.cols() != m.up.cols()
        || m.down.cols() != m.gate.rows()
        || m.down.rows() != m.gate.cols()
    {
        return Err(format!("{label}: inconsistent shapes {shapes}"));
    }
    if let Some((hidden, inter)) = expect {
        if (m.gate.rows(), m.gate.cols()) != (inter, hidden) {
            return Err(format!(
                "{label}: {shapes}, the model expects gate [{inter}, {hidden}]"
            ));
        }
    }
    Ok(m)
}

/// Routed experts of a pack without a budget: an uncompressed blob is
/// viewed in place, a compressed one decoded on first use and kept (the
/// budgeted alternative is the streaming `ExpertCache`).
pub struct PackExperts {
    src: PackSource,
    hidden: usize,
    inter: usize,
    decoded: Mutex<HashMap<(usize, usize), Arc<ExpertMats>>>,
}

impl PackExperts {
    pub fn new(src: PackSource, hidden: usize, inter: usize) -> Self {
        PackExperts {
            src,
            hidden,
            inter,
            decoded: Mutex::new(HashMap::new()),
        }
    }

    fn build(&self, e: &ExpertEntry) -> Result<ExpertMats, RuntimeError> {
        let blob = if e.codec == Codec::None {
            let b = self.src.blob(&e.label(), e.offset, e.raw_length)?;
            self.src.check(&e.label(), b.bytes(), e.checksum.0)?;
            b
        } else {
            let stored = self.src.pack().expert_bytes_mapped(e);
            self.src.check(&e.label(), stored, e.checksum.0)?;
            let mut out = vec![0u8; e.raw_length as usize];
            e.decode_into(stored, &mut out)
                .map_err(|err| pack_err(self.src.pack().path(), err))?;
            Blob::copy_of(&out)
        };
        decode_blob(e, &blob, Some((self.hidden, self.inter)))
            .map_err(|msg| pack_err(self.src.pack().path(), msg))
    }
}

impl ExpertProvider for PackExperts {
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertMats>, RuntimeError> {
        if let Ok(m) = self.decoded.lock() {
            if let Some(x) = m.get(&(layer, expert)) {
                return Ok(x.clone());
            }
        }
        let e = self
            .src
            .pack()
            .expert(layer as u32, expert as u32)
            .ok_or_else(|| RuntimeError::MissingTensor {
                name: mfx_formats::pack::manifest::expert_label(layer as u32, expert as u32),
                location: self.src.location(),
            })?;
        let x = Arc::new(self.build(e)?);
        if let Ok(mut m) = self.decoded.lock() {
            m.insert((layer, expert), x.clone());
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(rows: usize, cols: usize, seed: usize) -> (Matrix, Vec<f32>) {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| (((i + seed) * 7919 % 101) as f32 / 50.0 - 1.0) * 3.0)
            .collect();
        let m = Matrix::dense(
            DType::F32,
            rows,
            cols,
            Blob::copy_of(bytemuck::cast_slice(&v)),
        )
        .unwrap();
        (m, v)
    }

    /// gpt-oss's expert, written out by hand: gate and up with their
    /// biases, the gate clamped above and up on both sides at `limit`,
    /// `(up + 1) * gate * sigmoid(alpha * gate)`, down plus its bias.
    #[test]
    fn clamped_glu_with_biases_is_the_reference_formula() {
        let (h, i, n) = (8, 4, 3);
        let (gate, gw) = dense(i, h, 1);
        let (up, uw) = dense(i, h, 2);
        let (down, dw) = dense(h, i, 3);
        let bias = ExpertBias {
            gate: vec![0.5, -1.0, 8.0, 0.0],
            up: vec![-9.0, 0.25, 1.0, 2.0],
            down: (0..h).map(|k| k as f32 * 0.1).collect(),
        };
        let m = ExpertMats {
            gate,
            up,
            down,
            bias: Some(bias.clone()),
        };
        let x: Vec<f32> = (0..n * h)
            .map(|k| ((k * 13 % 7) as f32 - 3.0) * 0.7)
            .collect();
        let (alpha, limit) = (1.702f32, 7.0f32);
        let got = m.forward_glu(&x, n, Glu::Clamped { alpha, limit });
        for t in 0..n {
            let xt = &x[t * h..(t + 1) * h];
            let dot = |w: &[f32], r: usize, c: usize, v: &[f32]| -> f32 {
                (0..c).map(|k| w[r * c + k] * v[k]).sum()
            };
            let act: Vec<f32> = (0..i)
                .map(|r| {
                    let g = (dot(&gw, r, h, xt) + bias.gate[r]).min(limit);
                    let u = (dot(&uw, r, h, xt) + bias.up[r]).clamp(-limit, limit);
                    (u + 1.0) * g / (1.0 + (-alpha * g).exp())
                })
                .collect();
            for r in 0..h {
                let want = dot(&dw, r, i, &act) + bias.down[r];
                let g = got[t * h + r];
                assert!(
                    (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "t{t} r{r}: {g} vs {want}"
                );
            }
        }
        // Without biases and with Silu it is the plain SwiGLU path.
        let plain = ExpertMats { bias: None, ..m };
        assert_eq!(plain.forward_glu(&x, n, Glu::Silu), plain.forward(&x, n));
    }
}
