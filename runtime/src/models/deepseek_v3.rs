//! DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-head latent attention (MLA)
//! and the DeepSeekMoE feed-forward (sigmoid group-limited router with
//! shared experts; dense SwiGLU for the first `first_k_dense_replace`
//! layers), both from `nn`.
//!
//! MLA as transformers computes it: queries through an optional low-rank
//! pair (`q_a_proj` -> `q_a_layernorm` -> `q_b_proj`, or `q_proj` when
//! `q_lora_rank` is null), each head split into a no-rope part
//! (`qk_nope_head_dim`) and a rope part (`qk_rope_head_dim`);
//! `kv_a_proj_with_mqa` yields a `kv_lora_rank` latent (normalized by
//! `kv_a_layernorm`, expanded per head by `kv_b_proj` into no-rope keys and
//! values) and one rope key shared by all heads. With `rope_interleave` the
//! rope part is de-interleaved (even dims, then odd) before rotate-half.
//! Softmax scale `qk_head_dim^-0.5` (no yarn `mscale`: scaled rope is
//! refused). After the projection it is plain attention:
//! [`super::nn::attention::attend`] with as many KV heads as query heads.
//!
//! The KV cache holds the expanded per-head keys and values (values padded
//! to the key width), not the latent: simple and exact, but it does not
//! give MLA's memory saving yet.

use super::decoder::kv_vector;
use super::family::{Dims, Family, FamilyConfig};
use super::nn::attention::{attend, AttnParams};
use super::nn::config::JsonCfg;
use super::nn::kv_cache::{KvBits, LayerKv};
use super::nn::linear::{add_into, layer_name, matmul, norm_in_place, norm_rows};
use super::nn::moe::{ffn_residual, DeepseekMoe, Ffn, FfnLayer, RouterObserver};
use super::nn::rope::Rope;
use super::nn::router::{SigmoidRouter, SigmoidRouting};
use crate::cache::WorkingShape;
use crate::error::RuntimeError;
use crate::experts::ExpertProvider;
use crate::weights::{Matrix, WeightSource};

/// MLA's shape.
#[derive(Debug, Clone, Copy)]
pub struct Mla {
    pub heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl Mla {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// DeepSeek-V3 as a [`Family`].
#[derive(Debug, Clone)]
pub struct DeepseekV3 {
    dims: Dims,
    pub mla: Mla,
    rope: Rope,
    pub ffn: DeepseekMoe,
}

/// Parses a `deepseek_v3` config (the registry's entry point).
pub fn parse(c: &JsonCfg) -> Result<FamilyConfig, RuntimeError> {
    c.silu_only()?;
    c.default_rope_only()?;
    if c.bool_opt("attention_bias")?.unwrap_or(false) {
        return Err(c.bad(
            "attention_bias",
            "attention bias is not supported for deepseek_v3",
        ));
    }
    let qk_rope_head_dim = c.positive("qk_rope_head_dim")?;
    if qk_rope_head_dim % 2 != 0 {
        return Err(c.bad("qk_rope_head_dim", "must be even"));
    }
    let n_routed = c.positive("n_routed_experts")?;
    let hidden_size = c.positive("hidden_size")?;
    let ffn = DeepseekMoe {
        hidden: hidden_size,
        intermediate: c.positive("intermediate_size")?,
        moe_intermediate: c.positive("moe_intermediate_size")?,
        n_routed,
        n_shared: c.usize_opt("n_shared_experts")?.unwrap_or(0),
        first_k_dense: c.usize_opt("first_k_dense_replace")?.unwrap_or(0),
        rule: SigmoidRouting::from_cfg(c, n_routed)?,
    };
    Ok(FamilyConfig::new(DeepseekV3 {
        dims: Dims {
            arch: "deepseek_v3",
            vocab_size: c.positive("vocab_size")?,
            hidden_size,
            num_hidden_layers: c.positive("num_hidden_layers")?,
            num_experts: n_routed,
            top_k: ffn.rule.top_k,
            moe_intermediate_size: ffn.moe_intermediate,
            max_position_embeddings: c.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            eps: c.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            tie_word_embeddings: c.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            zero_centred_norm: false,
            bos_token_id: c.ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.ids("eos_token_id")?,
        },
        mla: Mla {
            heads: c.positive("num_attention_heads")?,
            q_lora_rank: c.usize_opt("q_lora_rank")?,
            kv_lora_rank: c.positive("kv_lora_rank")?,
            qk_nope_head_dim: c.positive("qk_nope_head_dim")?,
            qk_rope_head_dim,
            v_head_dim: c.positive("v_head_dim")?,
        },
        rope: Rope::new(
            c.f64_opt("rope_theta")?.unwrap_or(10000.0) as f32,
            qk_rope_head_dim,
        )
        .interleaved(c.bool_opt("rope_interleave")?.unwrap_or(true)),
        ffn,
    }))
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

#[derive(Debug, Clone)]
pub struct MlaWeights {
    pub q: QProj,
    pub kv_a: Matrix,
    pub kv_a_norm: Vec<f32>,
    pub kv_b: Matrix,
    pub o: Matrix,
}

#[derive(Debug, Clone)]
pub struct DsLayer {
    pub index: usize,
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub attn: MlaWeights,
    pub ffn: Ffn<SigmoidRouter>,
}

impl DsLayer {
    fn ffn_layer(&self) -> FfnLayer<'_, SigmoidRouter> {
        FfnLayer {
            index: self.index,
            post_norm: &self.post_norm,
            ffn: &self.ffn,
        }
    }
}

impl DeepseekV3 {
    fn attention(&self, w: &MlaWeights, xn: &[f32], n: usize, kv: &mut LayerKv) -> Vec<f32> {
        let m = &self.mla;
        let (nh, nope, rd, vd, r) = (
            m.heads,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.kv_lora_rank,
        );
        let qk = nope + rd;
        let mut q = match &w.q {
            QProj::Lora { a, norm, b } => {
                let mut qa = matmul(a, xn, n);
                norm_in_place(&mut qa, a.rows(), norm, self.dims.eps);
                matmul(b, &qa, n)
            }
            QProj::Full(m) => matmul(m, xn, n),
        };
        let ckv = matmul(&w.kv_a, xn, n);
        let mut lat = vec![0.0; n * r];
        let mut krot = vec![0.0; n * rd];
        for i in 0..n {
            let row = &ckv[i * (r + rd)..(i + 1) * (r + rd)];
            lat[i * r..(i + 1) * r].copy_from_slice(&row[..r]);
            krot[i * rd..(i + 1) * rd].copy_from_slice(&row[r..]);
        }
        norm_in_place(&mut lat, r, &w.kv_a_norm, self.dims.eps);
        let kvb = matmul(&w.kv_b, &lat, n); // [n, heads * (nope + vd)]
                                            // Rope on each query head's rope part and on the one shared rope key.
        self.rope
            .apply(&mut [q.as_mut_slice()], n, qk, nope, kv.len());
        self.rope
            .apply(&mut [krot.as_mut_slice()], n, rd, 0, kv.len());
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
        // Values are padded to qk: attend over the padded width, keep the first vd.
        let padded = attend(&AttnParams::new(nh, nh, qk), &q, &k, &v, kv, n);
        kv.append(&k, &v);
        let mut out = vec![0.0; n * nh * vd];
        for (o, p) in out.chunks_exact_mut(vd).zip(padded.chunks_exact(qk)) {
            o.copy_from_slice(&p[..vd]);
        }
        matmul(&w.o, &out, n)
    }
}

impl Family for DeepseekV3 {
    type Layer = DsLayer;
    type State = LayerKv;

    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn is_moe_layer(&self, l: usize) -> bool {
        self.ffn.is_moe_layer(l)
    }

    // MLA: keys and values are cached expanded, per head.
    fn working_shape(&self, kv: KvBits) -> WorkingShape {
        let (d, m, f) = (&self.dims, &self.mla, &self.ffn);
        WorkingShape {
            hidden: d.hidden_size as u64,
            vocab: d.vocab_size as u64,
            kv_bytes_per_token: d.num_hidden_layers as u64
                * 2
                * m.heads as u64
                * kv_vector(kv, m.qk_head_dim()),
            state_bytes: 0,
            qkv: (3 * m.heads * m.qk_head_dim() + m.kv_lora_rank + m.q_lora_rank.unwrap_or(0))
                as u64,
            top_k: d.top_k as u64,
            expert_inter: f.moe_intermediate as u64,
            shared_inter: (f.n_shared * f.moe_intermediate).max(f.intermediate) as u64,
            experts: f.n_routed as u64,
        }
    }

    fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<DsLayer, RuntimeError> {
        let (m, h) = (&self.mla, self.dims.hidden_size);
        let qk = m.qk_head_dim();
        let a = |n: &str| layer_name(l, &format!("self_attn.{n}"));
        let q = match m.q_lora_rank {
            Some(r) => QProj::Lora {
                a: src.matrix(&a("q_a_proj"), r, h)?,
                norm: src.vector(&a("q_a_layernorm.weight"), r)?,
                b: src.matrix(&a("q_b_proj"), m.heads * qk, r)?,
            },
            None => QProj::Full(src.matrix(&a("q_proj"), m.heads * qk, h)?),
        };
        let attn = MlaWeights {
            q,
            kv_a: src.matrix(
                &a("kv_a_proj_with_mqa"),
                m.kv_lora_rank + m.qk_rope_head_dim,
                h,
            )?,
            kv_a_norm: src.vector(&a("kv_a_layernorm.weight"), m.kv_lora_rank)?,
            kv_b: src.matrix(
                &a("kv_b_proj"),
                m.heads * (m.qk_nope_head_dim + m.v_head_dim),
                m.kv_lora_rank,
            )?,
            o: src.matrix(&a("o_proj"), h, m.heads * m.v_head_dim)?,
        };
        Ok(DsLayer {
            index: l,
            input_norm: src.vector(&layer_name(l, "input_layernorm.weight"), h)?,
            post_norm: src.vector(&layer_name(l, "post_attention_layernorm.weight"), h)?,
            attn,
            ffn: self.ffn.load(src, l)?,
        })
    }

    /// Keys and values of every head, values padded to the key width.
    fn new_state(&self, kv: KvBits) -> LayerKv {
        LayerKv::new(kv, self.mla.heads, self.mla.qk_head_dim())
    }

    fn layer_forward(
        &self,
        lw: &DsLayer,
        next: Option<&DsLayer>,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        kv: &mut LayerKv,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        let eps = self.dims.eps;
        let n = hidden.len() / self.dims.hidden_size;
        let xn = norm_rows(hidden, &lw.input_norm, eps);
        add_into(hidden, &self.attention(&lw.attn, &xn, n, kv));
        ffn_residual(
            lw.ffn_layer(),
            next.map(DsLayer::ffn_layer),
            experts,
            hidden,
            eps,
            observer,
        )
    }
}
