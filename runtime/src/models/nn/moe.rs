//! The mixture-of-experts feed-forward block, one path for every family:
//! the layer's [`Router`] routes the batch, then [`routed_experts_forward`]
//! announces the experts to the provider, applies `--skip-missing`, hands
//! the provider a prediction for the next MoE layer, runs each expert once
//! over its tokens (resident ones first) and combines; a shared expert, if
//! any, is added. So no family can silently lack a cache feature.

use super::linear::{add_into, norm_rows};
use super::router::{Choices, Router};
use crate::error::RuntimeError;
use crate::experts::{ExpertMats, ExpertProvider, Glu, NextHint};
use crate::kernels;
use crate::weights::Matrix;
use rayon::prelude::*;

/// An always-on expert next to the routed ones: scaled by
/// `sigmoid(gate . x)` when it has a gate (qwen2_moe, qwen3_next), added
/// as is otherwise (glm4_moe, deepseek_v3 `shared_experts`).
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub mlp: ExpertMats,
    /// `[1, hidden]`.
    pub gate: Option<Matrix>,
}

/// One MoE layer's resident weights: the router, and the shared expert where
/// the family has one; and how its routed experts gate (`glu`, SwiGLU but
/// for gpt-oss). Routed experts come from the provider.
#[derive(Debug, Clone)]
pub struct MoeFfn<R> {
    pub router: R,
    pub shared: Option<SharedExpert>,
    pub glu: Glu,
}

/// The feed-forward half of a layer. One per layer, so the size gap between
/// the variants costs a few kilobytes at most; boxing would only add an
/// indirection on the hot path.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Ffn<R> {
    Dense(ExpertMats),
    Moe(MoeFfn<R>),
}

/// What the feed-forward half needs of a layer: its index, post-attention
/// norm and feed-forward weights.
pub struct FfnLayer<'a, R> {
    pub index: usize,
    pub post_norm: &'a [f32],
    pub ffn: &'a Ffn<R>,
}

/// The next MoE layer, for prefetch: its router and a proxy of its input
/// (the residual stream after this layer's attention, normalized with the
/// next layer's post-attention norm), `[n, hidden]`.
pub struct NextLayer<'a> {
    pub layer: usize,
    pub router: &'a dyn Router,
    pub input: &'a [f32],
}

/// The second half of every family's layer, after attention has been added
/// to `hidden`: normalize, run the feed-forward block (handing the provider
/// a prediction for `next` when it wants one), add its output.
pub fn ffn_residual<R: Router>(
    lw: FfnLayer<'_, R>,
    next: Option<FfnLayer<'_, R>>,
    experts: &dyn ExpertProvider,
    hidden: &mut [f32],
    eps: f32,
    observer: Option<&mut (dyn RouterObserver + '_)>,
) -> Result<(), RuntimeError> {
    let n = hidden.len() / lw.post_norm.len();
    let xn = norm_rows(hidden, lw.post_norm, eps);
    // The next layer's router on this layer's post-attention residual under
    // the next layer's own post-attention norm.
    let proxy = next
        .filter(|nl| experts.wants_next_hint(nl.index))
        .and_then(|nl| match nl.ffn {
            Ffn::Moe(m) => Some((nl.index, &m.router, norm_rows(hidden, nl.post_norm, eps))),
            Ffn::Dense(_) => None,
        });
    let next = proxy.as_ref().map(|(layer, router, input)| NextLayer {
        layer: *layer,
        router: *router as &dyn Router,
        input,
    });
    let f = match lw.ffn {
        Ffn::Dense(m) => m.forward(&xn, n),
        Ffn::Moe(m) => moe_forward(lw.index, m, experts, &xn, n, observer, next)?,
    };
    add_into(hidden, &f);
    Ok(())
}

/// The MoE block over `n` tokens of post-attention-normalized `xn`;
/// returns the block's output `[n, hidden]`. With
/// [`ExpertProvider::skip_missing`], a secondary expert that is not
/// resident when the layer starts is skipped for every token of the call
/// (its read still starts, so later tokens find it); an expert that is any
/// token's top-1 is always waited for.
pub fn moe_forward<R: Router>(
    layer: usize,
    w: &MoeFfn<R>,
    experts: &dyn ExpertProvider,
    xn: &[f32],
    n: usize,
    mut observer: Option<&mut (dyn RouterObserver + '_)>,
    next: Option<NextLayer<'_>>,
) -> Result<Vec<f32>, RuntimeError> {
    let router = w.router.weight();
    let hidden = router.cols();
    let ne = router.rows();
    let mut logits = vec![0.0; n * ne];
    kernels::matmul(&router.mat(), xn, n, &mut logits);
    add_bias(&mut logits, w.router.bias());

    // Route each token, then group tokens by expert so each expert's weights
    // are read once per call (one matmul with m rows).
    let mut per_token: Vec<Choices> = Vec::with_capacity(n);
    let mut probs = Vec::with_capacity(ne);
    for t in 0..n {
        let lg = &logits[t * ne..(t + 1) * ne];
        let (sel, wts) = w.router.route(lg, &mut probs);
        if let Some(obs) = observer.as_deref_mut() {
            obs.observe(layer, t, lg, &probs, &sel, &wts);
        }
        per_token.push(sel.into_iter().zip(wts).collect());
    }
    let hint = next
        .filter(|nx| experts.wants_next_hint(nx.layer))
        .map(|nx| {
            let probs = move || {
                let ne2 = nx.router.weight().rows();
                let mut p2 = vec![0.0; n * ne2];
                kernels::matmul(&nx.router.weight().mat(), nx.input, n, &mut p2);
                add_bias(&mut p2, nx.router.bias());
                nx.router.distribution(&mut p2);
                p2
            };
            (nx.layer, probs)
        });
    let mut out = routed_experts_forward(
        RoutedBatch {
            layer,
            per_token,
            num_experts: ne,
            top_k: w.router.top_k(),
            reweight: &|sel, missing| w.router.skip_missing(sel, missing),
            next: hint.as_ref().map(|(l, f)| (*l, f as &dyn Fn() -> Vec<f32>)),
            glu: w.glu,
        },
        experts,
        xn,
        n,
        hidden,
        observer,
    )?;

    if let Some(sh) = &w.shared {
        let ys = sh.mlp.forward(xn, n);
        match &sh.gate {
            Some(gate) => {
                let mut g = vec![0.0; n];
                kernels::matmul(&gate.mat(), xn, n, &mut g);
                for t in 0..n {
                    let s = 1.0 / (1.0 + (-g[t]).exp());
                    kernels::backend().axpy(
                        s,
                        &ys[t * hidden..(t + 1) * hidden],
                        &mut out[t * hidden..(t + 1) * hidden],
                    );
                }
            }
            None => add_into(&mut out, &ys),
        }
    }
    Ok(out)
}

/// Adds a router's logit bias, if it has one, to each row of `logits`.
fn add_bias(logits: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in logits.chunks_exact_mut(b.len().max(1)) {
            for (a, c) in row.iter_mut().zip(b) {
                *a += c;
            }
        }
    }
}

/// A family's `--skip-missing` rule: drop the marked experts from one
/// token's choices, re-weight the rest, return how many were dropped.
pub type Reweight<'a> = dyn Fn(&mut Choices, &[bool]) -> usize + 'a;

/// A routed batch, and what the shared routed-expert path needs from its
/// router (see [`routed_experts_forward`]).
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
    /// How the routed experts gate.
    pub glu: Glu,
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

    /// Whether [`RouterObserver::expert_output`] is wanted (prep's expert
    /// saliency for `--prune`); nothing else pays for it.
    fn wants_expert_outputs(&self) -> bool {
        false
    }

    /// Routed expert `expert` of MoE layer `layer` computed `outputs`
    /// (`[tokens.len(), hidden]`, before its mixing weight) for `tokens`,
    /// `(token index in this call, mixing weight)` each.
    fn expert_output(
        &mut self,
        layer: usize,
        expert: usize,
        tokens: &[(usize, f32)],
        outputs: &[f32],
    ) {
        let _ = (layer, expert, tokens, outputs);
    }

    /// Whether [`RouterObserver::expert_input`] is wanted (prep's GPTQ
    /// statistics); nothing else pays for gathering the rows twice.
    fn wants_expert_inputs(&self) -> bool {
        false
    }

    /// Routed expert `expert` of MoE layer `layer` was given `inputs`
    /// (`[tokens.len(), hidden]`, the normalized hidden states of `tokens`)
    /// and combines its gate and up projections with `glu`.
    fn expert_input(
        &mut self,
        layer: usize,
        expert: usize,
        tokens: &[(usize, f32)],
        inputs: &[f32],
        glu: Glu,
    ) {
        let _ = (layer, expert, tokens, inputs, glu);
    }
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
    observer: Option<&mut (dyn RouterObserver + '_)>,
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
        Ok(ex.forward_glu(&xs, m, b.glu))
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
    if let Some(obs) = observer {
        if obs.wants_expert_inputs() {
            let mut xs = Vec::new();
            for &(e, _) in &results {
                xs.clear();
                for &(t, _) in &by_expert[e] {
                    xs.extend_from_slice(&xn[t * hidden..(t + 1) * hidden]);
                }
                obs.expert_input(layer, e, &by_expert[e], &xs, b.glu);
            }
        }
        if obs.wants_expert_outputs() {
            for (e, ys) in &results {
                obs.expert_output(layer, *e, &by_expert[*e], ys);
            }
        }
    }

    let mut out = vec![0.0; n * hidden];
    for (e, ys) in results {
        for (&(t, wt), y) in by_expert[e].iter().zip(ys.chunks_exact(hidden)) {
            kernels::backend().axpy(wt, y, &mut out[t * hidden..(t + 1) * hidden]);
        }
    }
    Ok(out)
}

/// The DeepSeekMoE feed-forward layout (deepseek_v3, glm4_moe and the
/// MLA families after them): a dense SwiGLU in some layers (the first
/// `first_k_dense_replace`, or those `mlp_layer_types` calls `dense`),
/// elsewhere a sigmoid router over `n_routed` experts plus
/// `n_shared * moe_intermediate`-wide always-on `shared_experts`, added
/// unscaled. Built once by [`DeepseekMoe::from_cfg`] for every such family.
#[derive(Debug, Clone)]
pub struct DeepseekMoe {
    pub hidden: usize,
    pub intermediate: usize,
    pub moe_intermediate: usize,
    pub n_routed: usize,
    pub n_shared: usize,
    /// Per layer: whether it has routed experts.
    pub moe_layers: Vec<bool>,
    pub rule: super::router::SigmoidRouting,
}

impl DeepseekMoe {
    /// Reads the layout of `n_layers` layers of width `hidden`. Which
    /// layers are dense: `mlp_layer_types` (`"dense"`/`"sparse"` per
    /// layer, transformers 5) when present, else the first
    /// `first_k_dense` (the family reads `first_k_dense_replace` with its
    /// own default).
    pub fn from_cfg(
        c: &super::config::JsonCfg,
        hidden: usize,
        n_layers: usize,
        first_k_dense: usize,
    ) -> Result<Self, RuntimeError> {
        let n_routed = c.positive_any(&["n_routed_experts", "num_local_experts"])?;
        let moe_layers = match c.obj.get("mlp_layer_types") {
            None | Some(serde_json::Value::Null) => {
                (0..n_layers).map(|l| l >= first_k_dense).collect()
            }
            Some(serde_json::Value::Array(a)) if a.len() == n_layers => a
                .iter()
                .map(|v| match v.as_str() {
                    Some("sparse") => Ok(true),
                    Some("dense") => Ok(false),
                    _ => Err(c.bad(
                        "mlp_layer_types",
                        format!("expected \"dense\" or \"sparse\", found {v}"),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => {
                return Err(c.bad(
                    "mlp_layer_types",
                    format!("expected a list of {n_layers} layer types, found {v}"),
                ))
            }
        };
        Ok(DeepseekMoe {
            hidden,
            intermediate: c.positive("intermediate_size")?,
            moe_intermediate: c.positive("moe_intermediate_size")?,
            n_routed,
            n_shared: c.usize_opt("n_shared_experts")?.unwrap_or(0),
            moe_layers,
            rule: super::router::SigmoidRouting::from_cfg(c, n_routed)?,
        })
    }

    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.moe_layers.get(l).copied().unwrap_or(false)
    }

    /// The working shape of a model with this feed-forward, given what its
    /// attention needs: KV bytes per position (all layers), fixed state
    /// bytes, and the width of one layer's projections.
    pub fn working_shape(
        &self,
        vocab: usize,
        kv_bytes_per_token: u64,
        state_bytes: u64,
        qkv: usize,
    ) -> crate::cache::WorkingShape {
        crate::cache::WorkingShape {
            hidden: self.hidden as u64,
            vocab: vocab as u64,
            kv_bytes_per_token,
            state_bytes,
            qkv: qkv as u64,
            top_k: self.rule.top_k as u64,
            expert_inter: self.moe_intermediate as u64,
            shared_inter: (self.n_shared * self.moe_intermediate).max(self.intermediate) as u64,
            experts: self.n_routed as u64,
        }
    }

    /// Layer `l`'s feed-forward weights except routed experts.
    pub fn load(
        &self,
        src: &dyn crate::weights::WeightSource,
        l: usize,
    ) -> Result<Ffn<super::router::SigmoidRouter>, RuntimeError> {
        use super::linear::{layer_name, load_mlp};
        let h = self.hidden;
        if !self.is_moe_layer(l) {
            return Ok(Ffn::Dense(load_mlp(
                src,
                &layer_name(l, "mlp"),
                h,
                self.intermediate,
            )?));
        }
        let shared = if self.n_shared > 0 {
            Some(SharedExpert {
                mlp: load_mlp(
                    src,
                    &layer_name(l, "mlp.shared_experts"),
                    h,
                    self.moe_intermediate * self.n_shared,
                )?,
                gate: None,
            })
        } else {
            None
        };
        Ok(Ffn::Moe(MoeFfn {
            router: super::router::SigmoidRouter::load(
                src,
                &layer_name(l, "mlp.gate"),
                self.n_routed,
                h,
                self.rule,
            )?,
            shared,
            glu: Glu::Silu,
        }))
    }
}
