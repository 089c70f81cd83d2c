//! Stage 3 (`--merge`): merge near-duplicate experts.
//!
//! Per layer, each expert's weights (gate|up|down, flattened) are scaled to
//! unit norm and clustered with DBSCAN (linfa-clustering; `min_points` 2, so
//! only experts with a close neighbour cluster). Each cluster becomes one
//! expert: the routing-frequency-weighted mean of its members, stored once
//! under the cluster's smallest id; the router's original ids map onto it
//! (the pack records `merged_into`). Tolerances are tried from tight to
//! loose on a calibration subset, and the loosest one whose NLL rise stays
//! within `--merge-max-nll` is kept; if even the tightest exceeds it, nothing
//! is merged and the report says so.

use crate::error::{PrepError, Result};
use crate::routing::{self, CalibBatch};
use crate::source::{from_runtime, ExpertWeights, LayerExperts, Mat, Source};
use linfa::traits::Transformer;
use linfa_clustering::Dbscan;
use linfa_nn::{distance::L2Dist, CommonNearestNeighbour};
use mfx_formats::profile::Profile;
use mfx_runtime::experts::ExpertBias;
use mfx_runtime::models::{ExpertMats, ExpertProvider};
use mfx_runtime::RuntimeError;
use ndarray::Array2;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// DBSCAN tolerances on unit-norm expert vectors (L2 distance d between
/// unit vectors is cosine 1 - d^2/2: 0.2 ~ 0.98, 0.8 ~ 0.68, 1.2 ~ 0.28).
/// Trained experts are close to orthogonal (the tiny model has no pair
/// within 0.8), so the loose end is there to find *any* redundancy; the NLL
/// check decides whether it may be used.
pub const TOLERANCES: [f32; 6] = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2];
/// Calibration rows used to measure the NLL change (keeps `--merge` quick).
pub const NLL_ROWS: usize = 8;

#[derive(Debug, Clone, Serialize)]
pub struct MergeOutcome {
    pub applied: bool,
    pub tolerance: Option<f32>,
    pub experts_before: usize,
    pub experts_after: usize,
    pub params_saved: u64,
    pub nll_before: f64,
    pub nll_after: f64,
    pub nll_change: f64,
    pub max_nll_change: f64,
    /// Every tolerance tried: (tolerance, experts merged away, relative NLL change).
    pub tried: Vec<(f32, usize, f64)>,
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

struct Candidate<'a> {
    src: &'a Source,
    maps: BTreeMap<usize, Vec<u32>>,
    merged: BTreeMap<(usize, usize), Arc<ExpertWeights>>,
}

impl LayerExperts for Candidate<'_> {
    fn layer(&self, l: usize) -> Result<Arc<dyn ExpertProvider>> {
        let s = self.src;
        let mut experts: Vec<Arc<ExpertMats>> = s
            .model
            .layer_experts(&s.weights, l)
            .map_err(from_runtime)?
            .into_iter()
            .map(Arc::new)
            .collect();
        for (&(ml, r), w) in &self.merged {
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

fn flat(w: &ExpertWeights) -> Vec<f32> {
    let mut v = Vec::with_capacity(w.gate.data.len() * 3);
    v.extend_from_slice(&w.gate.data);
    v.extend_from_slice(&w.up.data);
    v.extend_from_slice(&w.down.data);
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// Clusters of one layer at `tol`: `map[e]` = smallest id of e's cluster.
pub fn cluster_layer(vectors: &[Vec<f32>], tol: f32) -> Result<Vec<u32>> {
    let n = vectors.len();
    let d = vectors.first().map_or(0, Vec::len);
    let arr = Array2::from_shape_fn((n, d), |(i, j)| vectors[i][j]);
    let labels = Dbscan::params_with(2, L2Dist, CommonNearestNeighbour::LinearSearch)
        .tolerance(tol)
        .transform(&arr)
        .map_err(|e| PrepError::Merge(format!("DBSCAN: {e}")))?;
    let mut first: BTreeMap<usize, u32> = BTreeMap::new();
    let mut map = Vec::with_capacity(n);
    for (i, l) in labels.iter().enumerate() {
        match l {
            Some(c) => map.push(*first.entry(*c).or_insert(i as u32)),
            None => map.push(i as u32),
        }
    }
    Ok(map)
}

fn weighted_mean(members: &[(Arc<ExpertWeights>, f64)]) -> ExpertWeights {
    let tot: f64 = members.iter().map(|m| m.1).sum();
    let uniform = tot <= 0.0;
    let avg = |get: &dyn Fn(&ExpertWeights) -> &Mat| -> Mat {
        let first = get(&members[0].0);
        let mut data = vec![0f32; first.data.len()];
        for (w, c) in members {
            let f = if uniform {
                1.0 / members.len() as f64
            } else {
                c / tot
            } as f32;
            for (d, x) in data.iter_mut().zip(&get(w).data) {
                *d += f * x;
            }
        }
        Mat {
            rows: first.rows,
            cols: first.cols,
            data,
        }
    };
    let weight = |c: f64| {
        if uniform {
            1.0 / members.len() as f64
        } else {
            c / tot
        }
    };
    // Biases (gpt-oss) are averaged with the same weights as the matrices.
    let bias = members[0].0.bias.as_ref().map(|b0| {
        let mut b = ExpertBias {
            gate: vec![0.0; b0.gate.len()],
            up: vec![0.0; b0.up.len()],
            down: vec![0.0; b0.down.len()],
        };
        for (w, c) in members {
            if let Some(x) = &w.bias {
                let f = weight(*c) as f32;
                for (acc, v) in [
                    (&mut b.gate, &x.gate),
                    (&mut b.up, &x.up),
                    (&mut b.down, &x.down),
                ] {
                    for (a, y) in acc.iter_mut().zip(v) {
                        *a += f * y;
                    }
                }
            }
        }
        b
    });
    ExpertWeights {
        gate: avg(&|w| &w.gate),
        up: avg(&|w| &w.up),
        down: avg(&|w| &w.down),
        // A mean of experts is new f32 weights: quantized like any other.
        mxfp4: [None, None, None],
        bias,
    }
}

pub fn run(
    src: &Source,
    profile: &Profile,
    batch: &CalibBatch,
    max_nll: f64,
    _calib_nll: Option<f64>,
    log: &dyn Fn(&str),
) -> Result<MergeOutcome> {
    let rows = batch.rows.min(NLL_ROWS);
    let sub = CalibBatch {
        ids: batch.ids[..rows * batch.seq].to_vec(),
        rows,
        seq: batch.seq,
        calibration: batch.calibration.clone(),
    };
    let quiet = |_: usize, _: usize| {};
    let (_, base) = routing::profile_source(src, &sub, true, &quiet)?;
    let base = base.unwrap_or(f64::NAN);
    // Unit-norm vectors per layer, computed once (one layer at a time in memory).
    let mut per_layer_maps: Vec<BTreeMap<usize, Vec<u32>>> =
        vec![BTreeMap::new(); TOLERANCES.len()];
    let n_experts = src.experts();
    let moe_layers = src.moe_layers();
    for &l in &moe_layers {
        let vecs: Vec<Vec<f32>> = (0..n_experts)
            .map(|e| src.expert(l, e).map(|w| flat(&w)))
            .collect::<Result<_>>()?;
        for (ti, &tol) in TOLERANCES.iter().enumerate() {
            per_layer_maps[ti].insert(l, cluster_layer(&vecs, tol)?);
        }
        src.release_pages();
    }
    let mut out = MergeOutcome {
        applied: false,
        tolerance: None,
        experts_before: moe_layers.len() * n_experts,
        experts_after: moe_layers.len() * n_experts,
        params_saved: 0,
        nll_before: base,
        nll_after: base,
        nll_change: 0.0,
        max_nll_change: max_nll,
        tried: Vec::new(),
        message: String::new(),
        maps: BTreeMap::new(),
        merged: BTreeMap::new(),
    };
    let per_expert_params = 3 * (src.hidden() * src.moe_inter()) as u64;
    for (ti, &tol) in TOLERANCES.iter().enumerate() {
        let maps = &per_layer_maps[ti];
        let removed: usize = maps
            .values()
            .map(|m| {
                m.iter()
                    .enumerate()
                    .filter(|(i, r)| **r as usize != *i)
                    .count()
            })
            .sum();
        if removed == 0 {
            out.tried.push((tol, 0, 0.0));
            continue;
        }
        let mut merged = BTreeMap::new();
        for (&l, m) in maps {
            let lp = profile.layer(l as u32);
            let mut clusters: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
            for (e, r) in m.iter().enumerate() {
                clusters.entry(*r).or_default().push(e);
            }
            for (r, members) in clusters.into_iter().filter(|(_, m)| m.len() > 1) {
                let ws: Vec<(Arc<ExpertWeights>, f64)> = members
                    .iter()
                    .map(|&e| Ok((src.expert(l, e)?, lp.map_or(0.0, |p| p.counts[e] as f64))))
                    .collect::<Result<_>>()?;
                merged.insert((l, r as usize), Arc::new(weighted_mean(&ws)));
            }
        }
        let cand = Candidate {
            src,
            maps: maps.clone(),
            merged,
        };
        let (_, nll) = routing::profile(
            src.model.as_ref(),
            &src.weights,
            &sub,
            &cand,
            true,
            &quiet,
            &|| src.release_pages(),
        )?;
        let nll = nll.unwrap_or(f64::NAN);
        let rel = (nll - base) / base;
        out.tried.push((tol, removed, rel));
        log(&format!("  merge tolerance {tol}: {removed} experts merged away, NLL {base:.4} -> {nll:.4} ({:+.2}%)", rel * 100.0));
        if rel.is_finite() && rel <= max_nll {
            out.applied = true;
            out.tolerance = Some(tol);
            out.experts_after = out.experts_before - removed;
            out.params_saved = removed as u64 * per_expert_params;
            out.nll_after = nll;
            out.nll_change = rel;
            out.maps = cand.maps;
            out.merged = cand.merged;
        } else {
            break;
        }
    }
    out.message = if out.applied {
        format!(
            "merged {} experts into others at tolerance {:?}: {} parameters saved, NLL {:+.2}% (limit {:+.2}%)",
            out.experts_before - out.experts_after,
            out.tolerance.unwrap_or_default(),
            out.params_saved,
            out.nll_change * 100.0,
            max_nll * 100.0
        )
    } else if out.tried.iter().all(|t| t.1 == 0) {
        format!("no near-duplicate experts at any tolerance {TOLERANCES:?}; nothing merged")
    } else {
        let t = out
            .tried
            .iter()
            .find(|t| t.1 > 0)
            .copied()
            .unwrap_or((0.0, 0, 0.0));
        format!(
            "refused: the tightest merge ({} experts at tolerance {}) raises NLL by {:+.2}%, beyond --merge-max-nll {:+.2}%; nothing merged",
            t.1,
            t.0,
            t.2 * 100.0,
            max_nll * 100.0
        )
    };
    log(&format!("stage 3: {}", out.message));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_duplicates_cluster_to_smallest_id() {
        let a = vec![1.0, 0.0, 0.0];
        let b = vec![0.0, 1.0, 0.0];
        let a2 = vec![0.99, 0.05, 0.0];
        let n = |v: &Vec<f32>| {
            let s = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / s).collect::<Vec<f32>>()
        };
        let vs = vec![n(&b), n(&a), n(&a2)];
        assert_eq!(cluster_layer(&vs, 0.2).unwrap(), vec![0, 1, 1]);
        assert_eq!(cluster_layer(&vs, 0.01).unwrap(), vec![0, 1, 2]);
    }
}
