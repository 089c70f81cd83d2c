//! Multi-head latent attention (MLA), as transformers computes it for
//! DeepSeek-V3 and the families built on it (glm4_moe_lite, deepseek_v32,
//! glm_moe_dsa).
//!
//! Queries go through an optional low-rank pair (`q_a_proj` ->
//! `q_a_layernorm` -> `q_b_proj`, or `q_proj` when `q_lora_rank` is null);
//! each head is a no-rope part (`qk_nope_head_dim`) followed by a rope part
//! (`qk_rope_head_dim`). `kv_a_proj_with_mqa` yields a `kv_lora_rank`
//! latent (normalized by `kv_a_layernorm`, expanded per head by
//! `kv_b_proj` into no-rope keys and values) and one rope key shared by
//! all heads. With `rope_interleave` the rope part is de-interleaved (even
//! dims, then odd) before rotate-half, which gives the same dot products
//! as transformers' `apply_rotary_pos_emb_interleave`. Softmax scale
//! `qk_head_dim^-0.5`, times YaRN's `mscale_all_dim` factor squared under
//! YaRN. After the projection it is plain attention:
//! [`super::attention::attend`] with as many KV heads as query heads, or,
//! under DeepSeek sparse attention, [`super::indexer::attend_selected`]
//! over the indexer's selection.
//!
//! The KV cache holds the expanded per-head keys and values (values padded
//! to the key width), not the latent: simple and exact, but it does not
//! give MLA's memory saving yet.

use super::attention::{attend, AttnParams};
use super::config::{JsonCfg, RopeScaling};
use super::indexer::{attend_selected, Indexer, IndexerKeys, IndexerWeights};
use super::kv_cache::{KvBits, LayerKv};
use super::linear::{layer_name, matmul, norm_in_place};
use super::rope::Rope;
use crate::error::RuntimeError;
use crate::models::family::SeqState;
use crate::weights::{Matrix, WeightSource};

/// RMSNorm epsilon of `q_a_layernorm` and `kv_a_layernorm`: transformers
/// builds them with its RMSNorm's default, not `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;

/// MLA's shape, rope and softmax scale.
#[derive(Debug, Clone)]
pub struct Mla {
    pub heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Softmax scale of `q . k`.
    pub scale: f32,
    /// Rope over each head's last `qk_rope_head_dim` dims (and the shared rope key).
    pub rope: Rope,
}

impl Mla {
    /// Reads MLA's keys. `interleave`: whether the rope part is
    /// de-interleaved first (the family decides: `rope_interleave` for
    /// deepseek_v3 and glm4_moe_lite, always for the DSA families).
    pub fn from_cfg(c: &JsonCfg, interleave: bool) -> Result<Self, RuntimeError> {
        if c.bool_opt("attention_bias")?.unwrap_or(false) {
            return Err(c.bad(
                "attention_bias",
                "attention bias is not supported for MLA (q_a/kv_a/o projections without bias)",
            ));
        }
        let qk_rope_head_dim = c.positive("qk_rope_head_dim")?;
        if !qk_rope_head_dim.is_multiple_of(2) {
            return Err(c.bad("qk_rope_head_dim", "must be even"));
        }
        let qk_nope_head_dim = c.positive("qk_nope_head_dim")?;
        let max_pos = c.usize_opt("max_position_embeddings")?.unwrap_or(4096);
        let scaling = c.rope_scaling(max_pos)?;
        let theta = c.f64_opt("rope_theta")?.unwrap_or(10000.0) as f32;
        let mscale = match &scaling {
            RopeScaling::Yarn(y) => y.softmax_mscale(),
            RopeScaling::None => 1.0,
        };
        let qk = qk_nope_head_dim + qk_rope_head_dim;
        let mla = Mla {
            heads: c.positive("num_attention_heads")?,
            q_lora_rank: c.usize_opt("q_lora_rank")?.filter(|&r| r > 0),
            kv_lora_rank: c.positive("kv_lora_rank")?,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim: c.positive("v_head_dim")?,
            scale: mscale / (qk as f32).sqrt(),
            rope: Rope::scaled(theta, qk_rope_head_dim, &scaling).interleaved(interleave),
        };
        if mla.v_head_dim > qk {
            // Values are stored padded to the key width (see the module doc).
            return Err(c.bad(
                "v_head_dim",
                format!(
                    "{} exceeds qk_nope_head_dim + qk_rope_head_dim = {qk}",
                    mla.v_head_dim
                ),
            ));
        }
        Ok(mla)
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// KV cache bytes per position of one layer.
    pub fn kv_bytes_per_token(&self, kv: KvBits) -> u64 {
        2 * self.heads as u64 * crate::models::decoder::kv_vector(kv, self.qk_head_dim())
    }

    /// Widths of one layer's projections (the budget's `qkv`).
    pub fn qkv_width(&self) -> usize {
        3 * self.heads * self.qk_head_dim() + self.kv_lora_rank + self.q_lora_rank.unwrap_or(0)
    }

    /// An empty cache for one layer: keys and values of every head, values
    /// padded to the key width.
    pub fn new_kv(&self, kv: KvBits) -> LayerKv {
        LayerKv::new(kv, self.heads, self.qk_head_dim())
    }

    /// Layer `l`'s `self_attn` projections over `hidden` inputs.
    pub fn load(
        &self,
        src: &dyn WeightSource,
        l: usize,
        hidden: usize,
    ) -> Result<MlaWeights, RuntimeError> {
        let qk = self.qk_head_dim();
        let a = |n: &str| layer_name(l, &format!("self_attn.{n}"));
        let q = match self.q_lora_rank {
            Some(r) => QProj::Lora {
                a: src.matrix(&a("q_a_proj"), r, hidden)?,
                norm: src.vector(&a("q_a_layernorm.weight"), r)?,
                b: src.matrix(&a("q_b_proj"), self.heads * qk, r)?,
            },
            None => QProj::Full(src.matrix(&a("q_proj"), self.heads * qk, hidden)?),
        };
        Ok(MlaWeights {
            q,
            kv_a: src.matrix(
                &a("kv_a_proj_with_mqa"),
                self.kv_lora_rank + self.qk_rope_head_dim,
                hidden,
            )?,
            kv_a_norm: src.vector(&a("kv_a_layernorm.weight"), self.kv_lora_rank)?,
            kv_b: src.matrix(
                &a("kv_b_proj"),
                self.heads * (self.qk_nope_head_dim + self.v_head_dim),
                self.kv_lora_rank,
            )?,
            o: src.matrix(&a("o_proj"), hidden, self.heads * self.v_head_dim)?,
        })
    }

    /// The attention over `n` new tokens whose normalized hidden states are
    /// `xn` (`[n, hidden]`), at positions `state.len()..`: projections,
    /// rope, the indexer's selection where the layer has one, attention,
    /// `o_proj`. Appends the new keys (and indexer keys) to `state`;
    /// returns `[n, hidden]`.
    pub fn forward(
        &self,
        w: &MlaWeights,
        indexer: Option<(&Indexer, &IndexerWeights)>,
        xn: &[f32],
        n: usize,
        state: &mut MlaState,
    ) -> Vec<f32> {
        let (nh, nope, rd, vd, r) = (
            self.heads,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
            self.kv_lora_rank,
        );
        let qk = nope + rd;
        let past = state.kv.len();
        // q_resid (the normalized low-rank query) is also the indexer's input.
        let (mut q, q_resid) = match &w.q {
            QProj::Lora { a, norm, b } => {
                let mut qa = matmul(a, xn, n);
                norm_in_place(&mut qa, a.rows(), norm, LATENT_NORM_EPS);
                (matmul(b, &qa, n), Some(qa))
            }
            QProj::Full(m) => (matmul(m, xn, n), None),
        };
        let ckv = matmul(&w.kv_a, xn, n);
        let mut lat = vec![0.0; n * r];
        let mut krot = vec![0.0; n * rd];
        for i in 0..n {
            let row = &ckv[i * (r + rd)..(i + 1) * (r + rd)];
            lat[i * r..(i + 1) * r].copy_from_slice(&row[..r]);
            krot[i * rd..(i + 1) * rd].copy_from_slice(&row[r..]);
        }
        norm_in_place(&mut lat, r, &w.kv_a_norm, LATENT_NORM_EPS);
        let kvb = matmul(&w.kv_b, &lat, n); // [n, heads * (nope + vd)]
                                            // Rope on each query head's rope part and on the one shared rope key.
        self.rope.apply(&mut [q.as_mut_slice()], n, qk, nope, past);
        self.rope.apply(&mut [krot.as_mut_slice()], n, rd, 0, past);
        let mut k = vec![0.0; n * nh * qk];
        let mut v = vec![0.0; n * nh * qk];
        for i in 0..n {
            let kr = &krot[i * rd..(i + 1) * rd];
            for hh in 0..nh {
                let src = &kvb[(i * nh + hh) * (nope + vd)..(i * nh + hh + 1) * (nope + vd)];
                let kh = &mut k[(i * nh + hh) * qk..(i * nh + hh + 1) * qk];
                kh[..nope].copy_from_slice(&src[..nope]);
                kh[nope..].copy_from_slice(kr);
                v[(i * nh + hh) * qk..(i * nh + hh) * qk + vd].copy_from_slice(&src[nope..]);
            }
        }
        let selection = indexer.and_then(|(ix, iw)| {
            // The DSA families require q_lora_rank (checked at parse).
            let q_resid = q_resid.as_deref().unwrap_or(&[]);
            ix.select(iw, xn, q_resid, n, &mut state.index)
        });
        // Values are padded to qk: attend over the padded width, keep the first vd.
        let p = AttnParams {
            scale: self.scale,
            ..AttnParams::new(nh, nh, qk)
        };
        let padded = match &selection {
            None => attend(&p, &q, &k, &v, &mut state.kv, n),
            Some(sel) => {
                let out = attend_selected(&p, &q, &k, &v, &state.kv, n, sel);
                state.kv.append(&k, &v);
                out
            }
        };
        let mut out = vec![0.0; n * nh * vd];
        for (o, p) in out.chunks_exact_mut(vd).zip(padded.chunks_exact(qk)) {
            o.copy_from_slice(&p[..vd]);
        }
        matmul(&w.o, &out, n)
    }
}

/// Query projection: low-rank with a norm in between, or direct.
#[derive(Debug, Clone)]
pub enum QProj {
    Lora {
        a: Matrix,
        norm: Vec<f32>,
        b: Matrix,
    },
    Full(Matrix),
}

/// One layer's MLA projections.
#[derive(Debug, Clone)]
pub struct MlaWeights {
    pub q: QProj,
    pub kv_a: Matrix,
    pub kv_a_norm: Vec<f32>,
    pub kv_b: Matrix,
    pub o: Matrix,
}

/// One MLA layer's sequence state: its KV cache, and the indexer's keys
/// where the layer has an indexer (empty otherwise). Both always hold the
/// same positions.
#[derive(Debug, Clone)]
pub struct MlaState {
    pub kv: LayerKv,
    pub index: IndexerKeys,
}

impl SeqState for MlaState {
    fn len(&self) -> usize {
        self.kv.len()
    }
    fn truncate(&mut self, len: usize) -> bool {
        self.kv.truncate(len);
        self.index.truncate(len);
        true
    }
    fn clear(&mut self) {
        self.kv.clear();
        self.index.clear();
    }
    /// Dense MLA only: the indexer's top-k selection over a batch is not
    /// held to one-token steps (ties may resolve differently).
    fn supports_exact_steps(&self) -> bool {
        !self.index.is_used()
    }
    fn set_exact_steps(&mut self, on: bool) {
        self.kv.set_exact_steps(on)
    }
    fn bytes(&self) -> usize {
        self.kv.bytes() + self.index.bytes()
    }
    fn save(&self, out: &mut Vec<u8>) {
        self.kv.save(out);
        self.index.save(out);
    }
    fn load(
        &mut self,
        r: &mut crate::models::state::StateReader<'_>,
    ) -> Result<(), crate::models::state::StateError> {
        self.kv.load(r)?;
        self.index.load(r)?;
        if !self.index.is_empty() && self.index.len() != self.kv.len() {
            return Err(crate::models::state::StateError::Mismatch(format!(
                "{} indexer keys for {} KV positions",
                self.index.len(),
                self.kv.len()
            )));
        }
        Ok(())
    }
}
