//! Mixture-of-experts feed-forward: routing (owned by the model) and expert
//! weights (owned by an [`ExpertProvider`]).
//!
//! The split follows mistral.rs: the model decides *which* experts a token
//! uses and how their outputs mix; the provider decides *where* an expert's
//! bytes live (mapped checkpoint, resident set, SSD-streaming cache). The
//! runtime's default provider, [`ResidentExperts`], hands out handles into
//! the mapped checkpoint; the streaming cache substitutes its own.

use crate::cache::NextHint;
use crate::error::RuntimeError;
use crate::kernels::{self, rms_norm, silu_mul, MatRef};
use crate::weights::Matrix;
use rayon::prelude::*;
use std::sync::Arc;

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`. Used for dense layers, for
/// routed experts and for qwen2_moe's shared expert.
#[derive(Debug, Clone)]
pub struct ExpertMats {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
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

    /// Bytes of the three matrices (what a cache budgets).
    pub fn nbytes(&self) -> usize {
        self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()
    }

    /// `y[n, hidden] = mlp(x[n, hidden])`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        swiglu(&self.weights(), x, n)
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

/// The next MoE layer, for prefetch: its router and a proxy of its input
/// (the residual stream after this layer's attention, normalized with the
/// next layer's post-attention norm), `[n, hidden]`.
pub struct NextLayer<'a> {
    pub layer: usize,
    pub router: &'a Matrix,
    pub input: &'a [f32],
}

/// Sees every routing decision. Prep uses this to count expert activations
/// over a calibration set; tests use it to compare router logits.
pub trait RouterObserver {
    /// MoE layer `layer`, token `token` (index within this forward call):
    /// `logits` are the router's pre-softmax outputs over all experts,
    /// `probs` their softmax, `selected` the top-k experts (descending
    /// probability, ties to the lower id) and `weights` the mixing weights
    /// actually applied (renormalized where the family does so).
    fn observe(
        &mut self,
        layer: usize,
        token: usize,
        logits: &[f32],
        probs: &[f32],
        selected: &[usize],
        weights: &[f32],
    );
}

/// How a family turns router logits into mixing weights.
#[derive(Debug, Clone, Copy)]
pub struct Routing {
    pub top_k: usize,
    /// Divide the top-k probabilities by their sum (Mixtral always; qwen and
    /// OLMoE when `norm_topk_prob`). Otherwise they are the softmax over all
    /// experts, unnormalized.
    pub renormalize: bool,
}

impl Routing {
    /// Softmax over all experts, top-k (ties to the lower index, as
    /// `torch.topk` on CPU does), optional renormalization. Fills `probs`
    /// and returns `(selected, weights)`.
    pub fn route(&self, logits: &[f32], probs: &mut Vec<f32>) -> (Vec<usize>, Vec<f32>) {
        probs.clear();
        probs.extend_from_slice(logits);
        kernels::softmax(probs);
        let mut idx: Vec<usize> = (0..probs.len()).collect();
        idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        idx.truncate(self.top_k);
        let mut w: Vec<f32> = idx.iter().map(|&e| probs[e]).collect();
        if self.renormalize {
            let s: f32 = w.iter().sum();
            for x in w.iter_mut() {
                *x /= s;
            }
        }
        (idx, w)
    }
}

/// qwen2_moe's always-on expert, scaled by `sigmoid(gate . x)`.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub mlp: ExpertMats,
    /// `[1, hidden]`.
    pub gate: Matrix,
}

/// One MoE layer's resident weights: the router, and the shared expert where
/// the family has one. Routed experts come from the provider.
#[derive(Debug, Clone)]
pub struct MoeWeights {
    pub router: Matrix,
    pub shared: Option<SharedExpert>,
}

/// The MoE block over `n` tokens of post-attention-normalized `xn`;
/// returns the block's output `[n, hidden]`.
pub fn moe_forward(
    layer: usize,
    routing: &Routing,
    w: &MoeWeights,
    experts: &dyn ExpertProvider,
    xn: &[f32],
    n: usize,
    observer: Option<&mut (dyn RouterObserver + '_)>,
) -> Result<Vec<f32>, RuntimeError> {
    moe_forward_ext(layer, routing, w, experts, xn, n, observer, None)
}

/// Drops the non-resident experts of `missing` from one token's selection
/// and re-weights the rest as the family's routing rule would have had it
/// chosen only those: renormalized over the kept experts when the family
/// renormalizes its top-k (`norm_topk_prob`, Mixtral), else the softmax
/// weights unchanged (the skipped experts' share is simply lost, as with
/// any expert outside the top-k). The top-1 expert is never in `missing`.
/// Returns how many were dropped.
fn skip_missing(routing: &Routing, sel: &mut Vec<(usize, f32)>, missing: &[bool]) -> usize {
    let before = sel.len();
    sel.retain(|&(e, _)| !missing[e]);
    let dropped = before - sel.len();
    if dropped > 0 && routing.renormalize {
        let s: f32 = sel.iter().map(|x| x.1).sum();
        if s > 0.0 {
            for x in sel.iter_mut() {
                x.1 /= s;
            }
        }
    }
    dropped
}

/// [`moe_forward`] with a view of the next MoE layer, for prefetch. With
/// [`ExpertProvider::skip_missing`], a secondary expert that is not resident
/// when the layer starts is skipped for every token of the call (its read
/// still starts, so later tokens find it); an expert that is any token's
/// top-1 is always waited for.
#[allow(clippy::too_many_arguments)]
pub fn moe_forward_ext(
    layer: usize,
    routing: &Routing,
    w: &MoeWeights,
    experts: &dyn ExpertProvider,
    xn: &[f32],
    n: usize,
    mut observer: Option<&mut (dyn RouterObserver + '_)>,
    next: Option<NextLayer<'_>>,
) -> Result<Vec<f32>, RuntimeError> {
    let hidden = w.router.cols();
    let ne = w.router.rows();
    let mut logits = vec![0.0; n * ne];
    kernels::matmul(&w.router.mat(), xn, n, &mut logits);

    // Route each token, then group tokens by expert so each expert's weights
    // are read once per call (one matmul with m rows).
    let mut per_token: Vec<Vec<(usize, f32)>> = Vec::with_capacity(n);
    let mut probs = Vec::with_capacity(ne);
    for t in 0..n {
        let lg = &logits[t * ne..(t + 1) * ne];
        let (sel, wts) = routing.route(lg, &mut probs);
        if let Some(obs) = observer.as_deref_mut() {
            obs.observe(layer, t, lg, &probs, &sel, &wts);
        }
        per_token.push(sel.into_iter().zip(wts).collect());
    }
    let hint = next
        .filter(|nx| experts.wants_next_hint(nx.layer))
        .map(|nx| {
            let probs = move || {
                let ne2 = nx.router.rows();
                let mut p2 = vec![0.0; n * ne2];
                kernels::matmul(&nx.router.mat(), nx.input, n, &mut p2);
                for row in p2.chunks_exact_mut(ne2) {
                    kernels::softmax(row);
                }
                p2
            };
            (nx.layer, probs)
        });
    let mut out = routed_experts_forward(
        RoutedBatch {
            layer,
            per_token,
            num_experts: ne,
            top_k: routing.top_k,
            reweight: &|sel, missing| skip_missing(routing, sel, missing),
            next: hint.as_ref().map(|(l, f)| (*l, f as &dyn Fn() -> Vec<f32>)),
        },
        experts,
        xn,
        n,
        hidden,
    )?;

    if let Some(sh) = &w.shared {
        let ys = sh.mlp.forward(xn, n);
        let mut g = vec![0.0; n];
        kernels::matmul(&sh.gate.mat(), xn, n, &mut g);
        for t in 0..n {
            let s = 1.0 / (1.0 + (-g[t]).exp());
            kernels::backend().axpy(
                s,
                &ys[t * hidden..(t + 1) * hidden],
                &mut out[t * hidden..(t + 1) * hidden],
            );
        }
    }
    Ok(out)
}

/// One token's `(expert, weight)` choices.
pub type Choices = Vec<(usize, f32)>;

/// A family's `--skip-missing` rule: drop the marked experts from one
/// token's choices, re-weight the rest, return how many were dropped.
pub type Reweight<'a> = dyn Fn(&mut Choices, &[bool]) -> usize + 'a;

/// A batch routed by a family's router, and what the shared routed-expert
/// path needs from that family (see [`routed_experts_forward`]).
pub struct RoutedBatch<'a> {
    pub layer: usize,
    /// Per token: `(expert, weight)` in the router's order, top-1 first.
    pub per_token: Vec<Choices>,
    pub num_experts: usize,
    pub top_k: usize,
    /// Drops the experts marked in `missing` from one token's selection and
    /// re-weights the rest as the family's routing rule would; returns how
    /// many were dropped (`--skip-missing`).
    pub reweight: &'a Reweight<'a>,
    /// The next MoE layer and how to compute its predicted routing
    /// distribution `[n, experts]`, when the provider wants a hint.
    pub next: Option<(usize, &'a dyn Fn() -> Vec<f32>)>,
}

/// Everything after routing, the same for every family: announce the
/// batch's experts to the provider (it starts their reads), skip the
/// non-resident secondary ones under `--skip-missing`, hand the provider a
/// prediction for the next layer, then run each expert once over its tokens,
/// resident ones first, and sum the weighted outputs in expert order.
/// One path, so that no family can silently lack a cache feature.
pub fn routed_experts_forward(
    b: RoutedBatch<'_>,
    experts: &dyn ExpertProvider,
    xn: &[f32],
    n: usize,
    hidden: usize,
) -> Result<Vec<f32>, RuntimeError> {
    let (layer, ne, mut per_token) = (b.layer, b.num_experts, b.per_token);
    let mut uses = vec![0u32; ne];
    for sel in &per_token {
        for &(e, _) in sel {
            uses[e] += 1;
        }
    }
    let active: Vec<usize> = (0..ne).filter(|&e| uses[e] > 0).collect();
    let tokens: Vec<u32> = active.iter().map(|&e| uses[e]).collect();
    experts.prefetch(layer, &active, &tokens);

    if experts.skip_missing() {
        // An expert that is any token's top-1 is always waited for.
        let mut top1 = vec![false; ne];
        for sel in &per_token {
            if let Some(&(e, _)) = sel.first() {
                top1[e] = true;
            }
        }
        let missing: Vec<bool> = (0..ne)
            .map(|e| uses[e] > 0 && !top1[e] && !experts.is_resident(layer, e))
            .collect();
        if missing.iter().any(|&m| m) {
            let skipped: usize = per_token
                .iter_mut()
                .map(|sel| (b.reweight)(sel, &missing))
                .sum();
            experts.record_skipped(layer, skipped);
        }
    }

    if let Some((next_layer, probs)) = b.next {
        let p2 = probs();
        experts.hint_next(
            next_layer,
            &NextHint {
                probs: &p2,
                n,
                top_k: b.top_k,
                prev: &per_token,
            },
        );
    }

    let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
    for (t, sel) in per_token.iter().enumerate() {
        for &(e, wt) in sel {
            by_expert[e].push((t, wt));
        }
    }
    let active: Vec<usize> = (0..ne).filter(|&e| !by_expert[e].is_empty()).collect();
    let run = |e: usize| -> Result<Vec<f32>, RuntimeError> {
        let toks = &by_expert[e];
        let m = toks.len();
        let mut xs = Vec::with_capacity(m * hidden);
        for &(t, _) in toks {
            xs.extend_from_slice(&xn[t * hidden..(t + 1) * hidden]);
        }
        let ex = experts.get(layer, e)?;
        Ok(ex.forward(&xs, m))
    };
    // Resident experts first, then the ones still being read: the compute
    // threads work through the hits while the readers fetch the misses,
    // instead of a worker blocking on a read with hits still queued. The
    // outputs are summed in expert order either way, so the result does not
    // depend on what was resident.
    let (hits, misses): (Vec<usize>, Vec<usize>) =
        active.iter().partition(|&&e| experts.is_resident(layer, e));
    let mut results: Vec<(usize, Vec<f32>)> = Vec::with_capacity(active.len());
    for phase in [hits, misses] {
        let done: Result<Vec<_>, RuntimeError> =
            phase.par_iter().map(|&e| run(e).map(|y| (e, y))).collect();
        results.extend(done?);
    }
    results.sort_unstable_by_key(|r| r.0);

    let mut out = vec![0.0; n * hidden];
    for (e, ys) in results {
        for (&(t, wt), y) in by_expert[e].iter().zip(ys.chunks_exact(hidden)) {
            kernels::backend().axpy(wt, y, &mut out[t * hidden..(t + 1) * hidden]);
        }
    }
    Ok(out)
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

/// RMSNorm of each row of `x` (`[n, width]`).
pub fn norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let width = w.len();
    let mut out = vec![0.0; x.len()];
    for (o, r) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
        rms_norm(r, w, eps, o);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipping_renormalizes_only_where_the_family_does() {
        let missing = [false, true, false, false];
        let sel = vec![(0, 0.5), (1, 0.3), (2, 0.2)];
        let renorm = Routing {
            top_k: 3,
            renormalize: true,
        };
        let mut a = sel.clone();
        assert_eq!(skip_missing(&renorm, &mut a, &missing), 1);
        assert_eq!(a.len(), 2);
        assert!((a[0].1 - 0.5 / 0.7).abs() < 1e-6 && (a[1].1 - 0.2 / 0.7).abs() < 1e-6);
        let plain = Routing {
            top_k: 3,
            renormalize: false,
        };
        let mut b = sel.clone();
        assert_eq!(skip_missing(&plain, &mut b, &missing), 1);
        assert_eq!(b, vec![(0, 0.5), (2, 0.2)]);
    }
}
