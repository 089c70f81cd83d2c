//! Qwen3-Next (`Qwen3NextForCausalLM`, Qwen3-Coder-Next): a hybrid of Gated
//! DeltaNet linear-attention layers and gated full-attention layers (kinds
//! from `layer_types`, else every `full_attention_interval`-th layer is
//! full), with qwen2_moe-style MoE (softmax top-k, sigmoid-gated shared
//! expert) served through an [`ExpertProvider`].
//!
//! Norms are zero-centred (`x * rsqrt(ms + eps) * (1 + w)`) except the gated
//! RMSNorm inside DeltaNet, which uses `w` as is and multiplies by
//! `silu(z)` after normalizing. Full attention: `q_proj` yields per head a
//! query and an output gate (`sigmoid`), q/k norm, rope on the first
//! `partial_rotary_factor * head_dim` dims. DeltaNet: `in_proj_qkvz` /
//! `in_proj_ba` are laid out per key-head group (`[q, k, v.., z..]`,
//! `[b.., a..]`), then a depthwise causal conv1d + silu over `[q|k|v]`, l2
//! normalized q/k (q scaled by `1/sqrt(d_k)`), and the gated delta rule
//! `S = S*exp(g); S += k (x) beta*(v - S^T k); o = S^T q` per value head
//! (key heads repeated for value heads). Prompts run the same per-token
//! recurrence as decoding, so both give identical results.
//!
//! Full attention runs on [`super::nn::attention::attend`] like every
//! family's, its keys/values kept f32 ([`KvBits::F32`]) so a prompt split
//! into pieces matches one pass; zero-centred norm weights are stored as
//! `1 + w` at load, so the shared RMSNorm applies them. The conv and
//! recurrent states and the KV cache live per layer in [`LayerState`].
//! Recurrent state cannot be truncated: `truncate` returns false unless
//! the length is unchanged.

use super::family::{Dims, Family, FamilyConfig, SeqState};
use super::nn::attention::{attend, AttnParams};
use super::nn::config::JsonCfg;
use super::nn::kv_cache::{KvBits, LayerKv};
use super::nn::linear::{add_into, layer_name as ln, load_mlp, matmul, norm_in_place, norm_rows};
use super::nn::moe::{ffn_residual, Ffn, FfnLayer, MoeFfn, RouterObserver, SharedExpert};
use super::nn::rope::Rope;
use super::nn::router::{Routing, SoftmaxRouter};
use crate::cache::WorkingShape;
use crate::error::RuntimeError;
use crate::experts::ExpertProvider;
use crate::kernels;
use crate::weights::{Matrix, WeightSource};
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct Qwen3NextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub full_attention: Vec<bool>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub rope_theta: f32,
    pub eps: f32,
    pub lin_k_heads: usize,
    pub lin_v_heads: usize,
    pub lin_k_dim: usize,
    pub lin_v_dim: usize,
    pub conv_kernel: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl Qwen3NextConfig {
    pub fn parse(c: &JsonCfg) -> Result<Self, RuntimeError> {
        c.silu_only()?;
        c.default_rope_only()?;
        let n_layers = c.positive("num_hidden_layers")?;
        let full_attention = match c.obj.get("layer_types") {
            Some(serde_json::Value::Array(a)) => {
                if a.len() != n_layers {
                    return Err(c.bad(
                        "layer_types",
                        format!("{} entries for {n_layers} layers", a.len()),
                    ));
                }
                a.iter()
                    .map(|v| match v.as_str() {
                        Some("full_attention") => Ok(true),
                        Some("linear_attention") => Ok(false),
                        _ => Err(c.bad("layer_types", format!("unknown layer type {v}"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            _ => {
                let k = c.usize_opt("full_attention_interval")?.unwrap_or(4).max(1);
                (0..n_layers).map(|l| (l + 1) % k == 0).collect()
            }
        };
        let hidden_size = c.positive("hidden_size")?;
        let heads = c.positive("num_attention_heads")?;
        let kv_heads = c.usize_opt("num_key_value_heads")?.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(c.bad(
                "num_key_value_heads",
                format!("{kv_heads} does not divide {heads}"),
            ));
        }
        let head_dim = c.usize_opt("head_dim")?.unwrap_or(hidden_size / heads);
        let prf = c.f64_opt("partial_rotary_factor")?.unwrap_or(0.25);
        let rotary_dim = (head_dim as f64 * prf) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(c.bad(
                "partial_rotary_factor",
                format!("{prf} x head_dim {head_dim} is not an even width"),
            ));
        }
        let lin_k_heads = c.positive("linear_num_key_heads")?;
        let lin_v_heads = c.positive("linear_num_value_heads")?;
        if lin_v_heads % lin_k_heads != 0 {
            return Err(c.bad(
                "linear_num_value_heads",
                format!("{lin_v_heads} is not a multiple of linear_num_key_heads {lin_k_heads}"),
            ));
        }
        let num_experts = c.positive("num_experts")?;
        let top_k = c.positive("num_experts_per_tok")?;
        if top_k > num_experts {
            return Err(c.bad(
                "num_experts_per_tok",
                format!("{top_k} > {num_experts} experts"),
            ));
        }
        if c.usize_opt("decoder_sparse_step")?.unwrap_or(1) != 1
            || c.obj
                .get("mlp_only_layers")
                .and_then(|v| v.as_array())
                .is_some_and(|a| !a.is_empty())
        {
            return Err(c.bad(
                "mlp_only_layers",
                "dense layers are not supported for qwen3_next",
            ));
        }
        Ok(Qwen3NextConfig {
            vocab_size: c.positive("vocab_size")?,
            hidden_size,
            num_hidden_layers: n_layers,
            full_attention,
            heads,
            kv_heads,
            head_dim,
            rotary_dim,
            rope_theta: c.f64_opt("rope_theta")?.unwrap_or(10000.0) as f32,
            eps: c.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            lin_k_heads,
            lin_v_heads,
            lin_k_dim: c.positive("linear_key_head_dim")?,
            lin_v_dim: c.positive("linear_value_head_dim")?,
            conv_kernel: c.positive("linear_conv_kernel_dim")?,
            num_experts,
            top_k,
            norm_topk_prob: c.bool_opt("norm_topk_prob")?.unwrap_or(true),
            moe_intermediate_size: c.positive("moe_intermediate_size")?,
            shared_expert_intermediate_size: c
                .usize_opt("shared_expert_intermediate_size")?
                .unwrap_or(0),
            tie_word_embeddings: c.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            max_position_embeddings: c.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            bos_token_id: c.ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.ids("eos_token_id")?,
        })
    }

    fn key_dim(&self) -> usize {
        self.lin_k_heads * self.lin_k_dim
    }
    fn value_dim(&self) -> usize {
        self.lin_v_heads * self.lin_v_dim
    }
    fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
}

/// Parses a `qwen3_next` config (the registry's entry point).
pub fn parse(c: &JsonCfg) -> Result<FamilyConfig, RuntimeError> {
    let cfg = Qwen3NextConfig::parse(c)?;
    Ok(FamilyConfig::new(Qwen3Next {
        dims: Dims {
            arch: "qwen3_next",
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_experts: cfg.num_experts,
            top_k: cfg.top_k,
            moe_intermediate_size: cfg.moe_intermediate_size,
            max_position_embeddings: cfg.max_position_embeddings,
            eps: cfg.eps,
            tie_word_embeddings: cfg.tie_word_embeddings,
            zero_centred_norm: true,
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg.eos_token_ids.clone(),
        },
        rope: Rope::new(cfg.rope_theta, cfg.rotary_dim),
        cfg,
    }))
}

/// A zero-centred norm weight (`1 + w`), so the shared RMSNorm applies it.
fn zero_centred(src: &dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>, RuntimeError> {
    let mut w = src.vector(name, len)?;
    w.iter_mut().for_each(|x| *x += 1.0);
    Ok(w)
}

/// Gated full attention: `q_proj` yields a query and an output gate per head.
#[derive(Debug, Clone)]
pub struct FullAttn {
    pub q: Matrix,
    pub k: Matrix,
    pub v: Matrix,
    pub o: Matrix,
    /// `1 + w` (zero-centred).
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct DeltaNet {
    pub in_qkvz: Matrix,
    pub in_ba: Matrix,
    /// `[conv_dim, kernel]`.
    pub conv: Vec<f32>,
    pub a_log: Vec<f32>,
    pub dt_bias: Vec<f32>,
    pub norm: Vec<f32>,
    pub out: Matrix,
}

#[derive(Debug, Clone)]
pub enum Mixer {
    Full(FullAttn),
    Linear(DeltaNet),
}

#[derive(Debug, Clone)]
pub struct QnLayer {
    pub index: usize,
    /// `1 + w` (zero-centred), as is `post_norm`.
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub mixer: Mixer,
    pub ffn: Ffn<SoftmaxRouter>,
}

impl QnLayer {
    fn ffn_layer(&self) -> FfnLayer<'_, SoftmaxRouter> {
        FfnLayer {
            index: self.index,
            post_norm: &self.post_norm,
            ffn: &self.ffn,
        }
    }
}

/// Per-layer sequence state: the f32 KV cache for full attention, conv
/// window and recurrent matrices for DeltaNet.
#[derive(Debug, Clone)]
pub struct LayerState {
    pub len: usize,
    pub kv: LayerKv,
    /// Last `kernel - 1` conv inputs, `[kernel-1, conv_dim]`, oldest first.
    pub conv: Vec<f32>,
    /// `[v_heads, k_dim, v_dim]`.
    pub rec: Vec<f32>,
}

impl SeqState for LayerState {
    fn len(&self) -> usize {
        self.len
    }
    /// Recurrent state has no snapshots: only a no-op truncation succeeds.
    fn truncate(&mut self, len: usize) -> bool {
        len == self.len
    }
    fn clear(&mut self) {
        self.len = 0;
        self.kv.clear();
        self.conv = Vec::new();
        self.rec = Vec::new();
    }
}

/// Qwen3-Next as a [`Family`].
#[derive(Debug, Clone)]
pub struct Qwen3Next {
    dims: Dims,
    pub cfg: Qwen3NextConfig,
    rope: Rope,
}

impl Qwen3Next {
    fn full_attention(&self, w: &FullAttn, xn: &[f32], n: usize, st: &mut LayerState) -> Vec<f32> {
        let c = &self.cfg;
        let hd = c.head_dim;
        let qd = c.heads * hd;
        let qg = matmul(&w.q, xn, n);
        let mut q = vec![0.0; n * qd];
        let mut gate = vec![0.0; n * qd];
        for (i, row) in qg.chunks_exact(2 * hd).enumerate() {
            q[i * hd..(i + 1) * hd].copy_from_slice(&row[..hd]);
            gate[i * hd..(i + 1) * hd].copy_from_slice(&row[hd..]);
        }
        let mut k = matmul(&w.k, xn, n);
        let v = matmul(&w.v, xn, n);
        norm_in_place(&mut q, hd, &w.q_norm, c.eps);
        norm_in_place(&mut k, hd, &w.k_norm, c.eps);
        self.rope.apply(
            &mut [q.as_mut_slice(), k.as_mut_slice()],
            n,
            hd,
            0,
            st.kv.len(),
        );
        let p = AttnParams::new(c.heads, c.kv_heads, hd);
        let mut out = attend(&p, &q, &k, &v, &st.kv, n);
        st.kv.append(&k, &v);
        for (o, g) in out.iter_mut().zip(&gate) {
            *o *= 1.0 / (1.0 + (-g).exp());
        }
        matmul(&w.o, &out, n)
    }

    fn delta_net(&self, w: &DeltaNet, xn: &[f32], n: usize, st: &mut LayerState) -> Vec<f32> {
        let c = &self.cfg;
        let (nk, nv, dk, dv, kk) = (
            c.lin_k_heads,
            c.lin_v_heads,
            c.lin_k_dim,
            c.lin_v_dim,
            c.conv_kernel,
        );
        let r = nv / nk;
        let (key_dim, value_dim, conv_dim) = (c.key_dim(), c.value_dim(), c.conv_dim());
        let qkvz = matmul(&w.in_qkvz, xn, n);
        let ba = matmul(&w.in_ba, xn, n);
        if st.conv.is_empty() {
            st.conv = vec![0.0; (kk - 1) * conv_dim];
            st.rec = vec![0.0; nv * dk * dv];
        }
        let scale = 1.0 / (dk as f32).sqrt();
        let gw = 2 * dk + 2 * r * dv;
        // Per token: the conv (sequential through its rolling state), the
        // normalized q/k, v, z, and each value head's log-decay g and beta.
        let mut qs = vec![0.0; n * key_dim];
        let mut ks = vec![0.0; n * key_dim];
        let mut vs = vec![0.0; n * value_dim];
        let mut zs = vec![0.0; n * value_dim];
        let mut gs = vec![0.0; n * nv];
        let mut bs = vec![0.0; n * nv];
        let mut mixed = vec![0.0; conv_dim];
        let mut conv_out = vec![0.0; conv_dim];
        for t in 0..n {
            // Un-group [q,k,v,z] per key head into [q all | k all | v all] and z.
            let row =
                &qkvz[t * (2 * key_dim + 2 * value_dim)..(t + 1) * (2 * key_dim + 2 * value_dim)];
            let z = &mut zs[t * value_dim..(t + 1) * value_dim];
            for g in 0..nk {
                let grp = &row[g * gw..(g + 1) * gw];
                mixed[g * dk..(g + 1) * dk].copy_from_slice(&grp[..dk]);
                mixed[key_dim + g * dk..key_dim + (g + 1) * dk].copy_from_slice(&grp[dk..2 * dk]);
                mixed[2 * key_dim + g * r * dv..2 * key_dim + (g + 1) * r * dv]
                    .copy_from_slice(&grp[2 * dk..2 * dk + r * dv]);
                z[g * r * dv..(g + 1) * r * dv].copy_from_slice(&grp[2 * dk + r * dv..]);
            }
            let barow = &ba[t * 2 * nv..(t + 1) * 2 * nv];
            for g in 0..nk {
                for j in 0..r {
                    let h = g * r + j;
                    let (beta, a) = (barow[g * 2 * r + j], barow[g * 2 * r + r + j]);
                    let sp = {
                        let x = a + w.dt_bias[h];
                        if x > 20.0 {
                            x
                        } else {
                            x.exp().ln_1p()
                        }
                    };
                    gs[t * nv + h] = -w.a_log[h].exp() * sp;
                    bs[t * nv + h] = 1.0 / (1.0 + (-beta).exp());
                }
            }
            // Depthwise causal conv over [state..., mixed], then silu.
            for (ch, o) in conv_out.iter_mut().enumerate() {
                let wrow = &w.conv[ch * kk..(ch + 1) * kk];
                let mut s = 0.0;
                for (j, wj) in wrow[..kk - 1].iter().enumerate() {
                    s += wj * st.conv[j * conv_dim + ch];
                }
                s += wrow[kk - 1] * mixed[ch];
                *o = kernels::silu(s);
            }
            if kk > 1 {
                st.conv.drain(..conv_dim);
                st.conv.extend_from_slice(&mixed);
            }
            let (qa, rest) = conv_out.split_at_mut(key_dim);
            let (ka, va) = rest.split_at_mut(key_dim);
            for hq in qa.chunks_exact_mut(dk) {
                let inv = 1.0 / (hq.iter().map(|x| x * x).sum::<f32>() + 1e-6).sqrt();
                hq.iter_mut().for_each(|x| *x *= inv * scale);
            }
            for hk in ka.chunks_exact_mut(dk) {
                let inv = 1.0 / (hk.iter().map(|x| x * x).sum::<f32>() + 1e-6).sqrt();
                hk.iter_mut().for_each(|x| *x *= inv);
            }
            qs[t * key_dim..(t + 1) * key_dim].copy_from_slice(qa);
            ks[t * key_dim..(t + 1) * key_dim].copy_from_slice(ka);
            vs[t * value_dim..(t + 1) * value_dim].copy_from_slice(va);
        }
        // The delta rule per value head (heads are independent: each owns
        // its slice of the recurrent state), then the gated RMSNorm.
        let heads: Vec<Vec<f32>> = st
            .rec
            .par_chunks_mut(dk * dv)
            .enumerate()
            .map(|(h, state)| {
                let kh = h / r;
                let gather = |src: &[f32], width: usize, off: usize, len: usize| -> Vec<f32> {
                    (0..n)
                        .flat_map(|t| src[t * width + off..t * width + off + len].iter().copied())
                        .collect()
                };
                let q = gather(&qs, key_dim, kh * dk, dk);
                let k = gather(&ks, key_dim, kh * dk, dk);
                let v = gather(&vs, value_dim, h * dv, dv);
                let g: Vec<f32> = (0..n).map(|t| gs[t * nv + h]).collect();
                let b: Vec<f32> = (0..n).map(|t| bs[t * nv + h]).collect();
                let mut o = vec![0.0; n * dv];
                let head = DeltaHead { dk, dv };
                let x = HeadSeq {
                    q: &q,
                    k: &k,
                    v: &v,
                    g: &g,
                    b: &b,
                };
                if n == 1 {
                    head.recurrent(state, x, &mut o);
                } else {
                    head.prompt(state, x, &mut o);
                }
                // Gated RMSNorm: normalize, weight, then times silu(z).
                for (t, oh) in o.chunks_exact_mut(dv).enumerate() {
                    let ms = oh.iter().map(|x| x * x).sum::<f32>() / dv as f32;
                    let inv = 1.0 / (ms + c.eps).sqrt();
                    let z = &zs[t * value_dim + h * dv..t * value_dim + (h + 1) * dv];
                    for ((x, wn), zz) in oh.iter_mut().zip(&w.norm).zip(z) {
                        *x = *x * inv * wn * kernels::silu(*zz);
                    }
                }
                o
            })
            .collect();
        let mut out = vec![0.0; n * value_dim];
        for (h, o) in heads.iter().enumerate() {
            for t in 0..n {
                out[t * value_dim + h * dv..t * value_dim + (h + 1) * dv]
                    .copy_from_slice(&o[t * dv..(t + 1) * dv]);
            }
        }
        matmul(&w.out, &out, n)
    }
}

impl Family for Qwen3Next {
    type Layer = QnLayer;
    type State = LayerState;

    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn is_moe_layer(&self, _l: usize) -> bool {
        // Qwen3-Next has no dense layers (the config parser refuses them).
        true
    }

    // Full-attention layers keep an f32 KV cache; DeltaNet layers a fixed
    // recurrent state (value heads x k_dim x v_dim) and a conv window.
    fn working_shape(&self, _kv: KvBits) -> WorkingShape {
        let c = &self.cfg;
        let full = c.full_attention.iter().filter(|&&f| f).count() as u64;
        let linear = c.num_hidden_layers as u64 - full;
        let conv_width = 2 * c.lin_k_heads * c.lin_k_dim + c.lin_v_heads * c.lin_v_dim;
        let state = c.lin_v_heads * c.lin_k_dim * c.lin_v_dim + c.conv_kernel * conv_width;
        WorkingShape {
            hidden: c.hidden_size as u64,
            vocab: c.vocab_size as u64,
            kv_bytes_per_token: full * 2 * (c.kv_heads * c.head_dim) as u64 * 4,
            state_bytes: linear * 4 * state as u64,
            qkv: ((2 * c.heads + 2 * c.kv_heads) * c.head_dim)
                .max(conv_width + c.lin_v_heads * c.lin_v_dim) as u64,
            top_k: c.top_k as u64,
            expert_inter: c.moe_intermediate_size as u64,
            shared_inter: c.shared_expert_intermediate_size as u64,
            experts: c.num_experts as u64,
        }
    }

    fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<QnLayer, RuntimeError> {
        let c = &self.cfg;
        let h = c.hidden_size;
        let mixer = if c.full_attention[l] {
            let (qd, kd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
            Mixer::Full(FullAttn {
                q: src.matrix(&ln(l, "self_attn.q_proj"), 2 * qd, h)?,
                k: src.matrix(&ln(l, "self_attn.k_proj"), kd, h)?,
                v: src.matrix(&ln(l, "self_attn.v_proj"), kd, h)?,
                o: src.matrix(&ln(l, "self_attn.o_proj"), h, qd)?,
                q_norm: zero_centred(src, &ln(l, "self_attn.q_norm.weight"), c.head_dim)?,
                k_norm: zero_centred(src, &ln(l, "self_attn.k_norm.weight"), c.head_dim)?,
            })
        } else {
            Mixer::Linear(DeltaNet {
                in_qkvz: src.matrix(
                    &ln(l, "linear_attn.in_proj_qkvz"),
                    2 * c.key_dim() + 2 * c.value_dim(),
                    h,
                )?,
                in_ba: src.matrix(&ln(l, "linear_attn.in_proj_ba"), 2 * c.lin_v_heads, h)?,
                // The depthwise conv1d weight `[conv_dim, 1, kernel]`.
                conv: src.tensor_f32(
                    &ln(l, "linear_attn.conv1d.weight"),
                    &[c.conv_dim(), 1, c.conv_kernel],
                )?,
                a_log: src.vector(&ln(l, "linear_attn.A_log"), c.lin_v_heads)?,
                dt_bias: src.vector(&ln(l, "linear_attn.dt_bias"), c.lin_v_heads)?,
                norm: src.vector(&ln(l, "linear_attn.norm.weight"), c.lin_v_dim)?,
                out: src.matrix(&ln(l, "linear_attn.out_proj"), h, c.value_dim())?,
            })
        };
        let shared = if c.shared_expert_intermediate_size > 0 {
            Some(SharedExpert {
                mlp: load_mlp(
                    src,
                    &ln(l, "mlp.shared_expert"),
                    h,
                    c.shared_expert_intermediate_size,
                )?,
                gate: Some(src.matrix(&ln(l, "mlp.shared_expert_gate"), 1, h)?),
            })
        } else {
            None
        };
        let rule = Routing {
            top_k: c.top_k,
            renormalize: c.norm_topk_prob,
        };
        Ok(QnLayer {
            index: l,
            input_norm: zero_centred(src, &ln(l, "input_layernorm.weight"), h)?,
            post_norm: zero_centred(src, &ln(l, "post_attention_layernorm.weight"), h)?,
            mixer,
            ffn: Ffn::Moe(MoeFfn {
                router: SoftmaxRouter::load(src, &ln(l, "mlp.gate"), c.num_experts, h, rule)?,
                shared,
                glu: crate::experts::Glu::Silu,
            }),
        })
    }

    fn new_state(&self, _kv: KvBits) -> LayerState {
        LayerState {
            len: 0,
            kv: LayerKv::new(KvBits::F32, self.cfg.kv_heads, self.cfg.head_dim),
            conv: Vec::new(),
            rec: Vec::new(),
        }
    }

    fn layer_forward(
        &self,
        lw: &QnLayer,
        next: Option<&QnLayer>,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        st: &mut LayerState,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        let eps = self.cfg.eps;
        let n = hidden.len() / self.cfg.hidden_size;
        let xn = norm_rows(hidden, &lw.input_norm, eps);
        let a = match &lw.mixer {
            Mixer::Full(w) => self.full_attention(w, &xn, n, st),
            Mixer::Linear(w) => self.delta_net(w, &xn, n, st),
        };
        st.len += n;
        add_into(hidden, &a);
        ffn_residual(
            lw.ffn_layer(),
            next.map(QnLayer::ffn_layer),
            experts,
            hidden,
            eps,
            observer,
        )
    }
}

/// Prompt tokens per chunk of the chunked delta rule.
const DELTA_CHUNK: usize = 64;

/// The gated delta rule of one value head: state `S` (`[dk, dv]`, key-major),
/// per token `S = exp(g) S + k (x) u` with `u = beta (v - (exp(g) S)^T k)`,
/// output `S^T q`.
struct DeltaHead {
    dk: usize,
    dv: usize,
}

/// One value head's inputs over `g.len()` tokens: `q`, `k` (`[t, dk]`,
/// normalized), `v` (`[t, dv]`), log-decays `g` and betas `b`.
#[derive(Clone, Copy)]
struct HeadSeq<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
    b: &'a [f32],
}

impl<'a> HeadSeq<'a> {
    /// Tokens `t0..t1`.
    fn slice(&self, t0: usize, t1: usize, dk: usize, dv: usize) -> HeadSeq<'a> {
        HeadSeq {
            q: &self.q[t0 * dk..t1 * dk],
            k: &self.k[t0 * dk..t1 * dk],
            v: &self.v[t0 * dv..t1 * dv],
            g: &self.g[t0..t1],
            b: &self.b[t0..t1],
        }
    }
}

impl DeltaHead {
    /// Token by token: the definition, and the decode path.
    fn recurrent(&self, s: &mut [f32], x: HeadSeq<'_>, out: &mut [f32]) {
        let (dk, dv) = (self.dk, self.dv);
        let HeadSeq { q, k, v, g, b } = x;
        let be = kernels::backend();
        let mut mem = vec![0.0; dv];
        for t in 0..g.len() {
            let (qt, kt, vt) = (
                &q[t * dk..(t + 1) * dk],
                &k[t * dk..(t + 1) * dk],
                &v[t * dv..(t + 1) * dv],
            );
            let decay = g[t].exp();
            mem.fill(0.0);
            for (i, row) in s.chunks_exact_mut(dv).enumerate() {
                row.iter_mut().for_each(|x| *x *= decay);
                be.axpy(kt[i], row, &mut mem);
            }
            for (m, vj) in mem.iter_mut().zip(vt) {
                *m = (vj - *m) * b[t];
            }
            let o = &mut out[t * dv..(t + 1) * dv];
            o.fill(0.0);
            for (i, row) in s.chunks_exact_mut(dv).enumerate() {
                be.axpy(kt[i], &mem, row);
                be.axpy(qt[i], row, o);
            }
        }
    }

    /// A prompt: [`DeltaHead::chunk`] over consecutive `DELTA_CHUNK` tokens.
    fn prompt(&self, s: &mut [f32], x: HeadSeq<'_>, out: &mut [f32]) {
        let n = x.g.len();
        for c0 in (0..n).step_by(DELTA_CHUNK) {
            let c1 = (c0 + DELTA_CHUNK).min(n);
            let o = &mut out[c0 * self.dv..c1 * self.dv];
            self.chunk(s, x.slice(c0, c1, self.dk, self.dv), o);
        }
    }

    /// One chunk of `L` prompt tokens at once (the WY/UT form, as in the
    /// chunked kernels of flash-linear-attention and transformers'
    /// `torch_chunk_gated_delta_rule`, written directly): with `G_i` the
    /// cumulative log-decay inside the chunk, the updates `u_i` solve the
    /// unit lower-triangular system
    /// `u_i + sum_{j<i} beta_i e^(G_i-G_j) (k_i.k_j) u_j = beta_i (v_i - e^(G_i) S0^T k_i)`,
    /// outputs are `e^(G_i) S0^T q_i + sum_{j<=i} e^(G_i-G_j) (q_i.k_j) u_j` and the
    /// state becomes `e^(G_L) S0 + sum_j e^(G_L-G_j) k_j (x) u_j`. Why: the
    /// state (64 KiB per head at 128x128, beyond L1/L2 across 32 heads) is
    /// streamed twice per chunk instead of four times per token. Every
    /// `e^(...)` has a non-positive exponent, so nothing overflows.
    fn chunk(&self, s: &mut [f32], x: HeadSeq<'_>, out: &mut [f32]) {
        let HeadSeq { q, k, v, g, b } = x;
        let (dk, dv, l) = (self.dk, self.dv, g.len());
        let be = kernels::backend();
        let mut gc = vec![0.0f32; l];
        let mut acc = 0.0;
        for (c, gi) in gc.iter_mut().zip(g) {
            acc += gi;
            *c = acc;
        }
        // S0^T k_i and S0^T q_i, reading the state once.
        let mut sk = vec![0.0; l * dv];
        let mut sq = vec![0.0; l * dv];
        for (a, row) in s.chunks_exact(dv).enumerate() {
            for i in 0..l {
                be.axpy(k[i * dk + a], row, &mut sk[i * dv..(i + 1) * dv]);
                be.axpy(q[i * dk + a], row, &mut sq[i * dv..(i + 1) * dv]);
            }
        }
        // Forward substitution for u.
        let mut u = vec![0.0; l * dv];
        for i in 0..l {
            let ki = &k[i * dk..(i + 1) * dk];
            let ei = gc[i].exp();
            let (done, rest) = u.split_at_mut(i * dv);
            let ui = &mut rest[..dv];
            for ((x, vj), skj) in ui
                .iter_mut()
                .zip(&v[i * dv..(i + 1) * dv])
                .zip(&sk[i * dv..])
            {
                *x = b[i] * (vj - ei * skj);
            }
            for j in 0..i {
                let c = b[i] * (gc[i] - gc[j]).exp() * be.dot(ki, &k[j * dk..(j + 1) * dk]);
                be.axpy(-c, &done[j * dv..(j + 1) * dv], ui);
            }
        }
        for i in 0..l {
            let qi = &q[i * dk..(i + 1) * dk];
            let o = &mut out[i * dv..(i + 1) * dv];
            let ei = gc[i].exp();
            for (x, sqj) in o.iter_mut().zip(&sq[i * dv..(i + 1) * dv]) {
                *x = ei * sqj;
            }
            for j in 0..=i {
                let c = (gc[i] - gc[j]).exp() * be.dot(qi, &k[j * dk..(j + 1) * dk]);
                be.axpy(c, &u[j * dv..(j + 1) * dv], o);
            }
        }
        let last = gc[l - 1];
        let d = last.exp();
        let w: Vec<f32> = gc.iter().map(|x| (last - x).exp()).collect();
        for (a, row) in s.chunks_exact_mut(dv).enumerate() {
            row.iter_mut().for_each(|x| *x *= d);
            for j in 0..l {
                be.axpy(w[j] * k[j * dk + a], &u[j * dv..(j + 1) * dv], row);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn noise(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn unit_rows(mut v: Vec<f32>, d: usize) -> Vec<f32> {
        for r in v.chunks_exact_mut(d) {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= n);
        }
        v
    }

    /// The chunked form equals the token-by-token recurrence (outputs and
    /// final state), from a non-zero state and over a length that is not a
    /// multiple of the chunk: what lets prompts take the chunked path and
    /// decode the recurrent one.
    #[test]
    fn chunked_delta_rule_equals_recurrence() {
        let (dk, dv) = (16, 12);
        let head = DeltaHead { dk, dv };
        for &n in &[1usize, 2, 7, 64, 150] {
            let q = unit_rows(noise(n * dk, 1), dk);
            let k = unit_rows(noise(n * dk, 2), dk);
            let v = noise(n * dv, 3);
            // Log-decays in [-2, 0), betas in (0, 1).
            let g: Vec<f32> = noise(n, 4).iter().map(|x| x - 1.0).collect();
            let b: Vec<f32> = noise(n, 5).iter().map(|x| 0.5 + 0.49 * x).collect();
            let s0 = noise(dk * dv, 6);
            let (mut sr, mut sc) = (s0.clone(), s0.clone());
            let (mut or, mut oc) = (vec![0.0; n * dv], vec![0.0; n * dv]);
            let x = HeadSeq {
                q: &q,
                k: &k,
                v: &v,
                g: &g,
                b: &b,
            };
            head.recurrent(&mut sr, x, &mut or);
            head.prompt(&mut sc, x, &mut oc);
            let err = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max)
                    / a.iter().map(|x| x.abs()).fold(1e-6, f32::max)
            };
            assert!(
                err(&or, &oc) < 1e-4,
                "n={n}: outputs differ by {}",
                err(&or, &oc)
            );
            assert!(
                err(&sr, &sc) < 1e-4,
                "n={n}: states differ by {}",
                err(&sr, &sc)
            );
            assert!(
                or.iter().any(|x| x.abs() > 1e-3),
                "n={n}: outputs are all ~0"
            );
        }
    }
}
