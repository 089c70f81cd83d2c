//! Stage 3 (`--merge`): merge experts that compute nearly the same function.
//!
//! Comparing raw weights finds nothing on trained models: two experts that
//! compute the same function with their hidden units in another order are
//! far apart as flat vectors (the shared tiny model has no pair above
//! cosine 0.28). So similarity and averaging are both done on what the
//! experts compute, as MC-SMoE does:
//!
//! 1. **Probe.** One layer-by-layer walk over the guard rows (spread over
//!    every calibration source) keeps up to [`PROBE_ROWS`] distinct inputs of
//!    each MoE layer's experts.
//! 2. **Similarity.** Every expert is run on the same probe rows; the cosine
//!    of two experts' outputs is permutation-invariant.
//! 3. **Forest.** Experts are ranked by saliency (router weight x output
//!    norm over the whole calibration batch, `--prune-by`); each points at
//!    its most similar higher-ranked expert, with that cosine as the edge's
//!    score.
//! 4. **Alignment.** Each expert's hidden units are matched to its target's
//!    by the correlation of their activations on the probe rows (a linear
//!    assignment, `pathfinding`'s Kuhn-Munkres).
//! 5. **Candidate.** The strongest edges are merged: each tree becomes one
//!    expert, the routing-frequency-weighted mean of its members aligned to
//!    the root's unit order, stored under the tree's smallest id (the pack
//!    writer's order), with the router's other ids mapped onto it.
//! 6. **Guard.** The candidate's next-token NLL on the guard rows against
//!    the source's; `--merge` (auto) keeps the loosest cosine threshold
//!    within `--merge-max-nll`, `--merge FRACTION` merges that share of each
//!    layer's experts and refuses (merges nothing) beyond the limit.

use crate::error::{PrepError, Result};
use crate::routing::{self, CalibBatch, RowObserver};
use crate::source::{from_runtime, ExpertWeights, LayerExperts, Mat, Source, SourceExperts};
use mfx_formats::profile::Profile;
use mfx_runtime::experts::{ExpertBias, Glu};
use mfx_runtime::models::{ExpertMats, ExpertProvider, RouterObserver};
use mfx_runtime::RuntimeError;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Cosine thresholds `--merge` (auto) tries, tight to loose: an expert
/// merges into its target when their outputs on the probe rows are at
/// least this similar. 0.99 finds duplicates; the loose end is there to
/// find any redundancy, and the NLL guard decides whether it may be used.
pub const THRESHOLDS: [f32; 7] = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5];
/// Calibration rows the guard measures NLL on (and the probe rows come
/// from), spread evenly over the batch so every source is in it.
pub const GUARD_ROWS: usize = 16;
/// Distinct inputs per MoE layer every expert is run on.
pub const PROBE_ROWS: usize = 512;
/// Cap on the probe outputs held for one layer (floats): wide models get
/// fewer probe rows rather than gigabytes of outputs.
const PROBE_FLOATS: usize = 64 << 20;

/// What `--merge` was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    /// The loosest similarity threshold whose NLL change is within the limit.
    Auto,
    /// Merge this share of each MoE layer's experts (the least salient ones,
    /// into their most similar survivors).
    Fraction(f64),
}

impl std::str::FromStr for MergeMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "auto" {
            return Ok(MergeMode::Auto);
        }
        match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f < 1.0 => Ok(MergeMode::Fraction(f)),
            _ => Err(format!(
                "expected `auto` or a fraction of each layer's experts in (0, 1), got `{s}`"
            )),
        }
    }
}

/// One tried candidate: the threshold (auto) or the fraction's weakest
/// merged similarity, experts merged away, relative NLL change.
#[derive(Debug, Clone, Serialize)]
pub struct Tried {
    pub threshold: f32,
    pub merged_away: usize,
    pub nll_change: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MergeOutcome {
    pub mode: MergeMode,
    pub applied: bool,
    /// Cosine threshold of the applied merge (the weakest similarity merged).
    pub threshold: Option<f32>,
    pub experts_before: usize,
    pub experts_after: usize,
    pub params_saved: u64,
    pub nll_before: f64,
    pub nll_after: f64,
    pub nll_change: f64,
    pub max_nll_change: f64,
    /// What the guard measured on: rows x tokens and the sources in them.
    pub guard: String,
    /// Each expert's output cosine with its most similar higher-ranked
    /// expert, over all MoE layers: median, 90th percentile, maximum.
    pub similarity: [f32; 3],
    pub tried: Vec<Tried>,
    pub message: String,
    #[serde(skip)]
    maps: BTreeMap<usize, Vec<u32>>,
    #[serde(skip)]
    merged: BTreeMap<(usize, usize), Arc<ExpertWeights>>,
}

impl MergeOutcome {
    /// `map[e]` = the stored expert id for router id `e`, if this layer merged anything.
    pub fn layer_map(&self, layer: usize) -> Option<&[u32]> {
        if !self.applied {
            return None;
        }
        self.maps.get(&layer).map(Vec::as_slice)
    }

    /// Merged weights of representative `e`, if it represents a cluster.
    pub fn weights(&self, layer: usize, e: usize) -> Option<Arc<ExpertWeights>> {
        if !self.applied {
            return None;
        }
        self.merged.get(&(layer, e)).cloned()
    }
}

/// Expert `expert` may merge into the higher-ranked `target`: their outputs'
/// cosine is `score`; `perm[i]` is `expert`'s hidden unit matched to
/// `target`'s unit `i`.
#[derive(Debug, Clone)]
pub struct Edge {
    pub expert: usize,
    pub target: usize,
    pub score: f32,
    pub perm: Vec<u32>,
}

/// Which router ids a candidate merges, per layer: `map[e]` = the tree's
/// smallest id, and each tree's members with their unit order aligned to
/// the root's.
struct Clusters {
    map: Vec<u32>,
    /// Representative (smallest id) -> `(member, permutation to the root's units)`.
    members: BTreeMap<usize, Vec<(usize, Vec<u32>)>>,
}

/// The trees formed by the `active` edges of one layer of `n` experts.
fn clusters(edges: &[Edge], active: &[bool], n: usize, inter: usize) -> Clusters {
    let mut out_edge: Vec<Option<&Edge>> = vec![None; n];
    for (e, &a) in edges.iter().zip(active) {
        if a {
            out_edge[e.expert] = Some(e);
        }
    }
    let identity: Vec<u32> = (0..inter as u32).collect();
    // Each expert's root and its units in the root's order: compose the
    // permutations along the path (unit i of the root is unit p_parent[i]
    // of the parent, which is unit p_e[p_parent[i]] of e).
    let mut by_root: BTreeMap<usize, Vec<(usize, Vec<u32>)>> = BTreeMap::new();
    for e in 0..n {
        let mut chain = Vec::new();
        let mut at = e;
        while let Some(edge) = out_edge[at] {
            chain.push(edge);
            at = edge.target;
        }
        let mut perm = identity.clone();
        for edge in chain.iter().rev() {
            perm = perm.iter().map(|&i| edge.perm[i as usize]).collect();
        }
        by_root.entry(at).or_default().push((e, perm));
    }
    let mut map: Vec<u32> = (0..n as u32).collect();
    let mut members = BTreeMap::new();
    for (_, ms) in by_root {
        if ms.len() < 2 {
            continue;
        }
        let rep = ms.iter().map(|m| m.0).min().unwrap_or(0);
        for (e, _) in &ms {
            map[*e] = rep as u32;
        }
        members.insert(rep, ms);
    }
    Clusters { map, members }
}

/// `w` with its hidden units reordered: unit `i` of the result is unit
/// `perm[i]` of `w` (rows of gate/up and their biases, columns of down).
fn aligned(w: &ExpertWeights, perm: &[u32]) -> ExpertWeights {
    let rows = |m: &Mat| {
        let mut data = Vec::with_capacity(m.data.len());
        for &p in perm {
            let p = p as usize;
            data.extend_from_slice(&m.data[p * m.cols..(p + 1) * m.cols]);
        }
        Mat {
            rows: m.rows,
            cols: m.cols,
            data,
        }
    };
    let d = &w.down;
    let mut down = vec![0f32; d.data.len()];
    for (out, src) in down
        .chunks_exact_mut(d.cols)
        .zip(d.data.chunks_exact(d.cols))
    {
        for (o, &p) in out.iter_mut().zip(perm) {
            *o = src[p as usize];
        }
    }
    let pick = |v: &[f32]| perm.iter().map(|&p| v[p as usize]).collect::<Vec<f32>>();
    ExpertWeights {
        gate: rows(&w.gate),
        up: rows(&w.up),
        down: Mat {
            rows: d.rows,
            cols: d.cols,
            data: down,
        },
        mxfp4: [None, None, None],
        bias: w.bias.as_ref().map(|b| ExpertBias {
            gate: pick(&b.gate),
            up: pick(&b.up),
            down: b.down.clone(),
        }),
    }
}

/// The `weights`-weighted mean of aligned experts (uniform if every weight is 0).
fn weighted_mean(members: &[(ExpertWeights, f64)]) -> ExpertWeights {
    let tot: f64 = members.iter().map(|m| m.1).sum();
    let f = |c: f64| {
        (if tot > 0.0 {
            c / tot
        } else {
            1.0 / members.len() as f64
        }) as f32
    };
    let avg = |get: &dyn Fn(&ExpertWeights) -> &[f32]| -> Vec<f32> {
        let mut data = vec![0f32; get(&members[0].0).len()];
        for (w, c) in members {
            let k = f(*c);
            for (d, x) in data.iter_mut().zip(get(w)) {
                *d += k * x;
            }
        }
        data
    };
    let first = &members[0].0;
    let mat = |m: &Mat, data: Vec<f32>| Mat {
        rows: m.rows,
        cols: m.cols,
        data,
    };
    ExpertWeights {
        gate: mat(&first.gate, avg(&|w| &w.gate.data)),
        up: mat(&first.up, avg(&|w| &w.up.data)),
        down: mat(&first.down, avg(&|w| &w.down.data)),
        // A mean of experts is new f32 weights: quantized like any other.
        mxfp4: [None, None, None],
        // Biases (gpt-oss) are averaged with the same weights as the matrices.
        bias: first.bias.as_ref().map(|_| ExpertBias {
            gate: avg(&|w| w.bias.as_ref().map_or(&[][..], |b| &b.gate)),
            up: avg(&|w| w.bias.as_ref().map_or(&[][..], |b| &b.up)),
            down: avg(&|w| w.bias.as_ref().map_or(&[][..], |b| &b.down)),
        }),
    }
}

/// Collects one layer's probe rows: distinct tokens' expert inputs, every
/// `stride`-th token.
struct Probe {
    layer: usize,
    moe: bool,
    h: usize,
    cap: usize,
    offset: usize,
    stride: usize,
    taken: HashSet<usize>,
    rows: Vec<f32>,
    glu: Glu,
    bad: Option<String>,
}

impl RouterObserver for Probe {
    fn observe(&mut self, _: usize, _: usize, _: &[f32], _: &[f32], _: &[usize], _: &[f32]) {}

    fn wants_expert_inputs(&self) -> bool {
        self.moe
    }

    fn expert_input(
        &mut self,
        layer: usize,
        _: usize,
        tokens: &[(usize, f32)],
        xs: &[f32],
        glu: Glu,
    ) {
        if layer != self.layer {
            self.bad.get_or_insert(format!(
                "layer {layer} reported while probing layer {}",
                self.layer
            ));
            return;
        }
        self.glu = glu;
        for (&(t, _), row) in tokens.iter().zip(xs.chunks_exact(self.h)) {
            let g = self.offset + t;
            if self.rows.len() < self.cap * self.h
                && g.is_multiple_of(self.stride)
                && self.taken.insert(g)
            {
                self.rows.extend_from_slice(row);
            }
        }
    }
}

impl RowObserver for Probe {
    fn start_row(&mut self, r: usize, seq: usize) {
        self.offset = r * seq;
    }
}

/// Each expert's intermediate activations and output on the probe rows `x`
/// (`m` rows): `(mid [m, inter], out [m, hidden])`.
fn run_expert(ex: &ExpertMats, x: &[f32], m: usize, glu: Glu) -> (Vec<f32>, Vec<f32>) {
    let g = ex.mid(x, m, glu);
    let y = ex.down_of(&g, m);
    (g, y)
}

/// Columns of `a` (`[m, n]`) centred and scaled to unit norm, transposed to
/// `[n, m]` (a dead unit's column stays zero).
fn unit_columns(a: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut t = vec![0f32; n * m];
    for j in 0..n {
        let mean = (0..m).map(|p| a[p * n + j] as f64).sum::<f64>() / m.max(1) as f64;
        let col = &mut t[j * m..(j + 1) * m];
        for (p, c) in col.iter_mut().enumerate() {
            *c = (a[p * n + j] as f64 - mean) as f32;
        }
        let norm = col.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        if norm > 1e-12 {
            col.iter_mut().for_each(|v| *v = (*v as f64 / norm) as f32);
        } else {
            col.iter_mut().for_each(|v| *v = 0.0);
        }
    }
    t
}

/// `perm[i]` = `e`'s unit matched to the target's unit `i`: the assignment
/// maximizing the summed correlation of matched units' activations. Ties
/// (units dead on every probe row) keep their own index, so an exact copy
/// aligns to the identity.
pub fn align(target: &[f32], e: &[f32], m: usize, inter: usize) -> Vec<u32> {
    let (zt, ze) = (unit_columns(target, m, inter), unit_columns(e, m, inter));
    let mut w = vec![0i64; inter * inter];
    for i in 0..inter {
        let a = &zt[i * m..(i + 1) * m];
        for j in 0..inter {
            let b = &ze[j * m..(j + 1) * m];
            let c: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            // Correlation in millionths, doubled so the diagonal's +1 only
            // breaks ties.
            w[i * inter + j] = 2 * (c as f64 * 1e6).round() as i64 + i64::from(i == j);
        }
    }
    let Ok(weights) = pathfinding::matrix::Matrix::from_vec(inter, inter, w) else {
        return (0..inter as u32).collect();
    };
    let (_, assign) = pathfinding::kuhn_munkres::kuhn_munkres(&weights);
    assign.into_iter().map(|j| j as u32).collect()
}

/// The forest of one MoE layer from its probe rows: experts ranked by
/// `rank` (higher first, ties to the lower id), each pointing at its most
/// similar higher-ranked expert. Only the `top` strongest edges and those
/// scoring at least `min_score` are aligned (the others keep an empty
/// `perm` and are never merged).
#[allow(clippy::too_many_arguments)]
pub fn layer_edges(
    provider: &dyn ExpertProvider,
    layer: usize,
    n: usize,
    x: &[f32],
    m: usize,
    glu: Glu,
    rank: &[f64],
    (top, min_score): (usize, f32),
) -> Result<Vec<Edge>> {
    let mut mids = Vec::with_capacity(n);
    let mut outs = Vec::with_capacity(n);
    let mut inter = 0;
    for e in 0..n {
        let ex = provider.get(layer, e).map_err(from_runtime)?;
        let (g, mut y) = run_expert(&ex, x, m, glu);
        inter = ex.gate.rows();
        let norm = y.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        if norm > 1e-12 {
            y.iter_mut().for_each(|v| *v = (*v as f64 / norm) as f32);
        }
        mids.push(g);
        outs.push(y);
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| rank[b].total_cmp(&rank[a]).then(a.cmp(&b)));
    let mut edges = Vec::new();
    for (pos, &e) in order.iter().enumerate().skip(1) {
        let (target, score) = order[..pos]
            .iter()
            .map(|&d| {
                let c: f64 = outs[e]
                    .iter()
                    .zip(&outs[d])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                (d, c as f32)
            })
            .fold((order[0], f32::NEG_INFINITY), |best, c| {
                if c.1 > best.1 {
                    c
                } else {
                    best
                }
            });
        edges.push(Edge {
            expert: e,
            target,
            score,
            perm: Vec::new(),
        });
    }
    // Alignment only where the mode may merge: the `top` strongest edges
    // and any at least `min_score` similar.
    let mut by_score: Vec<usize> = (0..edges.len()).collect();
    by_score.sort_by(|&a, &b| edges[b].score.total_cmp(&edges[a].score));
    for (k, &i) in by_score.iter().enumerate() {
        if k < top || edges[i].score >= min_score {
            let (e, d) = (edges[i].expert, edges[i].target);
            edges[i].perm = align(&mids[d], &mids[e], m, inter);
        }
    }
    Ok(edges)
}

/// Guard rows taken from every calibration source in turn (sources hold
/// whole rows, in order), spread within each source, so a small source
/// (a few rows of chat) is in the guard as much as the budget allows.
fn guard_batch(batch: &CalibBatch) -> (CalibBatch, String) {
    let seq = batch.seq.max(1);
    let mut spans = Vec::new();
    let mut start = 0usize;
    for s in &batch.calibration.sources {
        let n = s.tokens as usize / seq;
        spans.push((s.name.clone(), start, n));
        start += n;
    }
    if start != batch.rows || spans.is_empty() {
        spans = vec![("calibration".into(), 0, batch.rows)];
    }
    let want = batch.rows.min(GUARD_ROWS);
    let mut per = vec![0usize; spans.len()];
    let mut left = want;
    while left > 0 {
        let before = left;
        for (i, sp) in spans.iter().enumerate() {
            if left > 0 && per[i] < sp.2 {
                per[i] += 1;
                left -= 1;
            }
        }
        if left == before {
            break;
        }
    }
    let mut pick = Vec::new();
    let mut names = Vec::new();
    for (sp, &k) in spans.iter().zip(&per) {
        if k > 0 {
            names.push(format!("{} {k}", sp.0));
        }
        pick.extend((0..k).map(|i| sp.1 + i * sp.2 / k));
    }
    let rows = pick.len();
    let mut ids = Vec::with_capacity(rows * batch.seq);
    for &r in &pick {
        ids.extend_from_slice(&batch.ids[r * batch.seq..(r + 1) * batch.seq]);
    }
    let text = format!(
        "{rows} rows x {} tokens from the calibration batch ({})",
        batch.seq,
        names.join(", ")
    );
    (
        CalibBatch {
            ids,
            rows,
            seq: batch.seq,
            calibration: batch.calibration.clone(),
        },
        text,
    )
}

/// The layers' candidate merge for `active` edges: router maps and merged weights.
type Candidate = (
    BTreeMap<usize, Vec<u32>>,
    BTreeMap<(usize, usize), Arc<ExpertWeights>>,
    usize,
);

fn candidate(
    src: &Source,
    profile: &Profile,
    forest: &BTreeMap<usize, Vec<Edge>>,
    active: &dyn Fn(usize, &[Edge]) -> Vec<bool>,
) -> Result<Candidate> {
    let (mut maps, mut merged, mut removed) = (BTreeMap::new(), BTreeMap::new(), 0);
    let n = src.experts();
    let inter = src.moe_inter();
    for (&l, edges) in forest {
        let on = active(l, edges);
        let c = clusters(edges, &on, n, inter);
        if c.members.is_empty() {
            continue;
        }
        let counts = profile.layer(l as u32).map(|p| p.counts.clone());
        for (rep, ms) in &c.members {
            removed += ms.len() - 1;
            let ws: Vec<(ExpertWeights, f64)> = ms
                .iter()
                .map(|(e, perm)| {
                    let w = src.expert(l, *e)?;
                    let c = counts.as_ref().map_or(0.0, |c| c[*e] as f64);
                    Ok((aligned(&w, perm), c))
                })
                .collect::<Result<_>>()?;
            merged.insert((l, *rep), Arc::new(weighted_mean(&ws)));
        }
        maps.insert(l, c.map);
        src.release_pages();
    }
    Ok((maps, merged, removed))
}

struct Merged<'a> {
    src: &'a Source,
    maps: &'a BTreeMap<usize, Vec<u32>>,
    merged: &'a BTreeMap<(usize, usize), Arc<ExpertWeights>>,
}

impl LayerExperts for Merged<'_> {
    fn layer(&self, l: usize) -> Result<Arc<dyn ExpertProvider>> {
        let s = self.src;
        let mut experts: Vec<Arc<ExpertMats>> = s
            .model
            .layer_experts(&s.weights, l)
            .map_err(from_runtime)?
            .into_iter()
            .map(Arc::new)
            .collect();
        for (&(ml, r), w) in self.merged {
            if ml == l && r < experts.len() {
                experts[r] = Arc::new(w.to_mats()?);
            }
        }
        Ok(Arc::new(Remapped {
            layer: l,
            experts,
            map: self.maps.get(&l).cloned(),
        }))
    }
}

/// One layer's experts with the router's ids mapped onto merged ones: the
/// model routes as before, and a merged-away id gets its cluster's expert.
struct Remapped {
    layer: usize,
    experts: Vec<Arc<ExpertMats>>,
    map: Option<Vec<u32>>,
}

impl ExpertProvider for Remapped {
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertMats>, RuntimeError> {
        let r = self
            .map
            .as_ref()
            .and_then(|m| m.get(expert))
            .map_or(expert, |&r| r as usize);
        self.experts
            .get(r)
            .filter(|_| layer == self.layer)
            .cloned()
            .ok_or_else(|| {
                RuntimeError::Other(format!(
                    "merge: expert {expert} of layer {layer} is not loaded"
                ))
            })
    }
}

/// Runs stage 3. `saliency` is each MoE layer's expert saliency over the
/// calibration batch (`--prune-by`), which ranks experts.
pub fn run(
    src: &Source,
    profile: &Profile,
    batch: &CalibBatch,
    mode: MergeMode,
    max_nll: f64,
    saliency: &[(usize, Vec<f64>)],
    log: &dyn Fn(&str),
) -> Result<MergeOutcome> {
    let (sub, guard) = guard_batch(batch);
    let n = src.experts();
    let h = src.hidden();
    let cap = PROBE_ROWS.min((PROBE_FLOATS / (n * h).max(1)).max(32));
    let stride = (sub.rows * sub.seq / cap).max(1);
    // Which edges each mode may merge, so only those are aligned.
    let drop = match mode {
        MergeMode::Auto => 0,
        MergeMode::Fraction(f) => n - crate::prune::kept_count(n, src.top_k(), f),
    };
    let need = match mode {
        MergeMode::Auto => (0, THRESHOLDS[THRESHOLDS.len() - 1]),
        MergeMode::Fraction(_) => (drop, f32::INFINITY),
    };
    let model = src.model.as_ref();
    let stage1: BTreeMap<usize, &Vec<f64>> = saliency.iter().map(|(l, s)| (*l, s)).collect();
    let mut forest: BTreeMap<usize, Vec<Edge>> = BTreeMap::new();
    let t = std::time::Instant::now();
    let x = routing::walk_layers(
        model,
        &src.weights,
        &sub,
        &SourceExperts(src),
        &|_, _| {},
        &|| src.release_pages(),
        |l, moe, _| Probe {
            layer: l,
            moe,
            h,
            cap,
            offset: 0,
            stride,
            taken: HashSet::new(),
            rows: Vec::new(),
            glu: Glu::Silu,
            bad: None,
        },
        |l, moe, p| {
            if let Some(b) = p.bad {
                return Err(PrepError::Merge(b));
            }
            if !moe {
                return Ok(());
            }
            let rank = stage1.get(&l).filter(|s| s.len() == n).ok_or_else(|| {
                PrepError::Merge(format!("no saliency of layer {l}'s {n} experts"))
            })?;
            let m = p.rows.len() / h;
            let provider = SourceExperts(src).layer(l)?;
            forest.insert(
                l,
                layer_edges(provider.as_ref(), l, n, &p.rows, m, p.glu, rank, need)?,
            );
            Ok(())
        },
    )?;
    let base = routing::mean_nll(model, &x, &sub.ids, sub.rows, sub.seq);
    let mut scores: Vec<f32> = forest.values().flatten().map(|e| e.score).collect();
    scores.sort_by(f32::total_cmp);
    let q = |f: f64| {
        scores
            .get(((scores.len().max(1) - 1) as f64 * f).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let similarity = [q(0.5), q(0.9), q(1.0)];
    log(&format!(
        "  merge: similarity and alignment of {} layers in {:.1}s (output cosine to the nearest higher-ranked expert: median {:.3}, p90 {:.3}, max {:.3}); guard: {guard}, NLL {base:.4}",
        forest.len(),
        t.elapsed().as_secs_f64(),
        similarity[0], similarity[1], similarity[2]
    ));
    let mut out = MergeOutcome {
        mode,
        applied: false,
        threshold: None,
        experts_before: forest.len() * n,
        experts_after: forest.len() * n,
        params_saved: 0,
        nll_before: base,
        nll_after: base,
        nll_change: 0.0,
        max_nll_change: max_nll,
        guard,
        similarity,
        tried: Vec::new(),
        message: String::new(),
        maps: BTreeMap::new(),
        merged: BTreeMap::new(),
    };
    let per_expert_params = 3 * (src.hidden() * src.moe_inter()) as u64;
    // The candidates: (label threshold, which edges are on).
    type Rule = Box<dyn Fn(usize, &[Edge]) -> Vec<bool>>;
    let rules: Vec<(Option<f32>, Rule)> = match mode {
        MergeMode::Auto => THRESHOLDS
            .iter()
            .map(|&t| {
                let r: Rule = Box::new(move |_, es: &[Edge]| {
                    es.iter()
                        .map(|e| e.score >= t && !e.perm.is_empty())
                        .collect()
                });
                (Some(t), r)
            })
            .collect(),
        MergeMode::Fraction(_) => {
            let r: Rule = Box::new(move |_, es: &[Edge]| {
                let mut idx: Vec<usize> = (0..es.len()).collect();
                idx.sort_by(|&a, &b| es[b].score.total_cmp(&es[a].score));
                let mut on = vec![false; es.len()];
                for &i in idx.iter().take(drop) {
                    on[i] = !es[i].perm.is_empty();
                }
                on
            });
            vec![(None, r)]
        }
    };
    for (label, rule) in rules {
        let (maps, merged, removed) = candidate(src, profile, &forest, rule.as_ref())?;
        // The weakest similarity merged (the fraction mode's effective threshold).
        let weakest = label.unwrap_or_else(|| {
            forest
                .iter()
                .flat_map(|(&l, es)| {
                    let on = rule(l, es);
                    es.iter()
                        .zip(on)
                        .filter(|(_, a)| *a)
                        .map(|(e, _)| e.score)
                        .collect::<Vec<_>>()
                })
                .fold(f32::INFINITY, f32::min)
        });
        if removed == 0 {
            out.tried.push(Tried {
                threshold: weakest,
                merged_away: 0,
                nll_change: 0.0,
            });
            continue;
        }
        let cand = Merged {
            src,
            maps: &maps,
            merged: &merged,
        };
        let (_, nll) =
            routing::profile(model, &src.weights, &sub, &cand, true, &|_, _| {}, &|| {
                src.release_pages()
            })?;
        let nll = nll.unwrap_or(f64::NAN);
        let rel = (nll - base) / base;
        out.tried.push(Tried {
            threshold: weakest,
            merged_away: removed,
            nll_change: rel,
        });
        log(&format!(
            "  merge at cosine >= {weakest:.3}: {removed} experts merged away, NLL {base:.4} -> {nll:.4} ({:+.2}%)",
            rel * 100.0
        ));
        if rel.is_finite() && rel <= max_nll {
            out.applied = true;
            out.threshold = Some(weakest);
            out.experts_after = out.experts_before - removed;
            out.params_saved = removed as u64 * per_expert_params;
            out.nll_after = nll;
            out.nll_change = rel;
            out.maps = maps;
            out.merged = merged;
        } else {
            break;
        }
    }
    out.message = if out.applied {
        format!(
            "merged {} of {} experts into others (cosine >= {:.3}): {} parameters saved, guard NLL {:+.2}% (limit {:+.2}%)",
            out.experts_before - out.experts_after,
            out.experts_before,
            out.threshold.unwrap_or_default(),
            out.params_saved,
            out.nll_change * 100.0,
            max_nll * 100.0
        )
    } else if out.tried.iter().all(|t| t.merged_away == 0) {
        format!("no experts as similar as cosine {THRESHOLDS:?} allow; nothing merged")
    } else {
        let t = out
            .tried
            .iter()
            .find(|t| t.merged_away > 0)
            .cloned()
            .unwrap_or(Tried {
                threshold: 0.0,
                merged_away: 0,
                nll_change: 0.0,
            });
        format!(
            "refused: the tightest merge ({} experts at cosine >= {:.3}) raises the guard's NLL by {:+.2}%, beyond --merge-max-nll {:+.2}%; nothing merged",
            t.merged_away,
            t.threshold,
            t.nll_change * 100.0,
            max_nll * 100.0
        )
    };
    log(&format!("stage 3: {}", out.message));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    #[test]
    fn alignment_recovers_a_permutation_of_the_units() {
        let (m, inter) = (64, 12);
        let mut r = lcg(3);
        let a: Vec<f32> = (0..m * inter).map(|_| r()).collect();
        // b's unit j is a's unit p[j] (plus a little noise).
        let p: Vec<usize> = vec![5, 2, 11, 0, 7, 1, 9, 3, 10, 4, 8, 6];
        let mut b = vec![0f32; m * inter];
        for row in 0..m {
            for j in 0..inter {
                b[row * inter + j] = a[row * inter + p[j]] + 0.05 * r();
            }
        }
        let perm = align(&a, &b, m, inter);
        // Unit i of a is matched to b's unit j with p[j] = i.
        for (i, &j) in perm.iter().enumerate() {
            assert_eq!(p[j as usize], i, "perm {perm:?}");
        }
        // An exact copy with dead units aligns to the identity.
        let mut c = a.clone();
        for row in 0..m {
            c[row * inter + 4] = 0.0;
            c[row * inter + 9] = 0.0;
        }
        assert_eq!(
            align(&c, &c, m, inter),
            (0..inter as u32).collect::<Vec<_>>()
        );
    }

    fn expert(seed: u64, inter: usize, hidden: usize) -> ExpertWeights {
        let mut r = lcg(seed);
        let mut mat = |rows: usize, cols: usize| Mat {
            rows,
            cols,
            data: (0..rows * cols).map(|_| r()).collect(),
        };
        ExpertWeights {
            gate: mat(inter, hidden),
            up: mat(inter, hidden),
            down: mat(hidden, inter),
            mxfp4: [None, None, None],
            bias: None,
        }
    }

    #[test]
    fn aligned_experts_compute_the_same_function() {
        let (inter, hidden, m) = (6, 5, 3);
        let w = expert(7, inter, hidden);
        let perm = [3u32, 0, 5, 1, 4, 2];
        let p = aligned(&w, &perm);
        let x: Vec<f32> = {
            let mut r = lcg(9);
            (0..m * hidden).map(|_| r()).collect()
        };
        let (g0, y0) = run_expert(&w.to_mats().unwrap(), &x, m, Glu::Silu);
        let (g1, y1) = run_expert(&p.to_mats().unwrap(), &x, m, Glu::Silu);
        for (a, b) in y0.iter().zip(&y1) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        for row in 0..m {
            for (i, &q) in perm.iter().enumerate() {
                assert_eq!(g1[row * inter + i], g0[row * inter + q as usize]);
            }
        }
    }

    #[test]
    fn trees_merge_under_the_smallest_id_with_composed_permutations() {
        let inter = 3;
        let edge = |expert, target, perm: Vec<u32>| Edge {
            expert,
            target,
            score: 0.9,
            perm,
        };
        // 3 -> 1 -> 4; 0 -> 2 inactive; 5 alone.
        let edges = vec![
            edge(3, 1, vec![2, 0, 1]),
            edge(1, 4, vec![1, 2, 0]),
            edge(0, 2, vec![0, 1, 2]),
        ];
        let c = clusters(&edges, &[true, true, false], 6, inter);
        assert_eq!(c.map, vec![0, 1, 2, 1, 1, 5]);
        let ms = &c.members[&1];
        let perm_of = |e| ms.iter().find(|m| m.0 == e).unwrap().1.clone();
        assert_eq!(perm_of(4), vec![0, 1, 2]);
        assert_eq!(perm_of(1), vec![1, 2, 0]);
        // Root unit i -> unit p1[i] of 1 -> unit p3[p1[i]] of 3.
        let (p1, p3) = ([1usize, 2, 0], [2u32, 0, 1]);
        assert_eq!(perm_of(3), (0..3).map(|i| p3[p1[i]]).collect::<Vec<u32>>());
    }

    /// What merging exists for: an expert that is another's function with
    /// its hidden units shuffled is far from it as flat weights but found by
    /// its outputs, and alignment recovers the shuffle; only the edges the
    /// mode may merge are aligned.
    #[test]
    fn a_unit_shuffled_copy_is_found_by_function_and_aligned() {
        let (inter, hidden, m, n) = (8, 6, 48, 5);
        let base = expert(11, inter, hidden);
        let shuffle = [5u32, 3, 7, 0, 6, 1, 4, 2];
        let copy = aligned(&base, &shuffle);
        let flat = |w: &ExpertWeights| {
            let mut v = w.gate.data.clone();
            v.extend(&w.up.data);
            v.extend(&w.down.data);
            v
        };
        let (a, b) = (flat(&base), flat(&copy));
        let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            dot / (norm(&a) * norm(&b)) < 0.5,
            "weights already look alike"
        );
        // Experts: 0 = base, 3 = the shuffled copy, the rest unrelated.
        let ws: Vec<ExpertWeights> = (0..n)
            .map(|e| match e {
                0 => expert(11, inter, hidden),
                3 => aligned(&base, &shuffle),
                _ => expert(100 + e as u64, inter, hidden),
            })
            .collect();
        let mut provider = mfx_runtime::models::ResidentExperts::new(1);
        provider.insert_layer(0, ws.iter().map(|w| w.to_mats().unwrap()).collect());
        let x: Vec<f32> = {
            let mut r = lcg(5);
            (0..m * hidden).map(|_| r()).collect()
        };
        // Expert 0 ranks first, so the copy points at it.
        let rank = [5.0, 4.0, 3.0, 2.0, 1.0];
        let edges =
            layer_edges(&provider, 0, n, &x, m, Glu::Silu, &rank, (1, f32::INFINITY)).unwrap();
        assert_eq!(edges.len(), n - 1);
        let e3 = edges.iter().find(|e| e.expert == 3).unwrap();
        assert_eq!(e3.target, 0);
        assert!(e3.score > 0.999, "{}", e3.score);
        // perm[i] = the copy's unit matched to base's unit i: `aligned`
        // put base's unit shuffle[j] at the copy's unit j.
        for (i, &j) in e3.perm.iter().enumerate() {
            assert_eq!(shuffle[j as usize] as usize, i, "{:?}", e3.perm);
        }
        // Only the strongest edge was aligned (top = 1).
        assert_eq!(edges.iter().filter(|e| !e.perm.is_empty()).count(), 1);
        // The merged pair computes base's function.
        let merged = weighted_mean(&[
            (expert(11, inter, hidden), 3.0),
            (aligned(&copy, &e3.perm), 1.0),
        ]);
        let (_, y0) = run_expert(&base.to_mats().unwrap(), &x, m, Glu::Silu);
        let (_, y1) = run_expert(&merged.to_mats().unwrap(), &x, m, Glu::Silu);
        for (p, q) in y0.iter().zip(&y1) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }

    #[test]
    fn merge_mode_parses_auto_and_fractions_only() {
        assert_eq!("auto".parse::<MergeMode>(), Ok(MergeMode::Auto));
        assert_eq!("0.25".parse::<MergeMode>(), Ok(MergeMode::Fraction(0.25)));
        for bad in ["0", "1", "-0.1", "x"] {
            assert!(bad.parse::<MergeMode>().is_err(), "{bad}");
        }
    }
}
