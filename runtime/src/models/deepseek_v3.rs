//! DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-head latent attention (MLA)
//! and the sigmoid, bias-corrected, group-limited router of `sigmoid_moe.rs`
//! with shared experts; dense SwiGLU for the first `first_k_dense_replace`
//! layers (the feed-forward half is GLM-4-MoE's, see `glm4_moe.rs`).
//!
//! MLA as transformers computes it: queries through an optional low-rank
//! pair (`q_a_proj` -> `q_a_layernorm` -> `q_b_proj`, or `q_proj` when
//! `q_lora_rank` is null), each head split into a no-rope part
//! (`qk_nope_head_dim`) and a rope part (`qk_rope_head_dim`);
//! `kv_a_proj_with_mqa` yields a `kv_lora_rank` latent (normalized by
//! `kv_a_layernorm`, expanded per head by `kv_b_proj` into no-rope keys and
//! values) and one rope key shared by all heads. With `rope_interleave` the
//! rope part is de-interleaved (even dims, then odd) before rotate-half.
//! Softmax scale `qk_head_dim^-0.5` (no yarn `mscale`: scaled rope is refused).
//!
//! The KV cache holds the expanded per-head keys and values (values padded
//! to the key width), not the latent: simple and exact, but it does not
//! give MLA's memory saving yet.

use super::glm4_moe::{
    ffn_residual, final_logits, inv_freq, ln, load_ffn, norm_in_place, FfnLayer, FfnShape, Glm4Ffn,
};
use super::kv_cache::{KvBits, LayerKv};
use super::moe::{norm_rows, ExpertMats, ExpertProvider, ResidentExperts, RouterObserver};
use super::sigmoid_moe::{JsonCfg, SigmoidRouting};
use super::{LoadOptions, Model, ModelInfo};
use crate::error::RuntimeError;
use crate::kernels;
use crate::weights::safetensors::SafetensorsSource;
use crate::weights::{Matrix, WeightSource};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct DeepseekV3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rope_interleave: bool,
    pub rope_theta: f32,
    pub eps: f32,
    pub ffn: FfnShape,
    pub routing: SigmoidRouting,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl DeepseekV3Config {
    pub fn parse(c: &JsonCfg) -> Result<Self, RuntimeError> {
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
        Ok(DeepseekV3Config {
            vocab_size: c.positive("vocab_size")?,
            hidden_size,
            num_hidden_layers: c.positive("num_hidden_layers")?,
            heads: c.positive("num_attention_heads")?,
            q_lora_rank: c.usize_opt("q_lora_rank")?,
            kv_lora_rank: c.positive("kv_lora_rank")?,
            qk_nope_head_dim: c.positive("qk_nope_head_dim")?,
            qk_rope_head_dim,
            v_head_dim: c.positive("v_head_dim")?,
            rope_interleave: c.bool_opt("rope_interleave")?.unwrap_or(true),
            rope_theta: c.f64_opt("rope_theta")?.unwrap_or(10000.0) as f32,
            eps: c.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            ffn: FfnShape {
                hidden: hidden_size,
                intermediate: c.positive("intermediate_size")?,
                moe_intermediate: c.positive("moe_intermediate_size")?,
                n_routed,
                n_shared: c.usize_opt("n_shared_experts")?.unwrap_or(0),
                first_k_dense: c.usize_opt("first_k_dense_replace")?.unwrap_or(0),
            },
            routing: SigmoidRouting::from_cfg(c, n_routed)?,
            tie_word_embeddings: c.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            max_position_embeddings: c.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            bos_token_id: c.ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.ids("eos_token_id")?,
        })
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
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
    pub ffn: Glm4Ffn,
}

impl DsLayer {
    pub fn ffn_layer(&self) -> FfnLayer<'_> {
        FfnLayer {
            index: self.index,
            post_norm: &self.post_norm,
            ffn: &self.ffn,
        }
    }
}

/// Shared parts and the layer-by-layer interface.
pub struct DsShared {
    pub cfg: DeepseekV3Config,
    inv_freq: Vec<f32>,
    embed: Matrix,
    final_norm: Vec<f32>,
    lm_head: Matrix,
}

fn matmul(w: &Matrix, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0.0; n * w.rows()];
    kernels::matmul(&w.mat(), x, n, &mut y);
    y
}

/// Rope on a `d`-wide slice; with `interleave`, first permutes
/// `[x0,x1,x2,x3..]` to `[x0,x2,..,x1,x3,..]` as transformers'
/// `apply_rotary_pos_emb_interleave` does, then rotate-half.
fn rope_slice(x: &mut [f32], freqs: &[f32], pos: usize, interleave: bool) {
    let half = freqs.len();
    if interleave {
        let tmp: Vec<f32> = x.to_vec();
        for i in 0..half {
            x[i] = tmp[2 * i];
            x[i + half] = tmp[2 * i + 1];
        }
    }
    for (i, f) in freqs.iter().enumerate() {
        let a = pos as f32 * f;
        let (c, s) = (a.cos(), a.sin());
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

impl DsShared {
    pub fn load(cfg: &DeepseekV3Config, src: &dyn WeightSource) -> Result<Self, RuntimeError> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = src.matrix("model.embed_tokens", v, h)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            src.matrix("lm_head", v, h)?
        };
        Ok(DsShared {
            inv_freq: inv_freq(cfg.rope_theta, cfg.qk_rope_head_dim),
            final_norm: src.vector("model.norm.weight", h)?,
            embed,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        let h = self.cfg.hidden_size;
        let m = self.embed.mat();
        let mut out = vec![0.0; ids.len() * h];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(h)) {
            if id as usize >= self.cfg.vocab_size {
                return Err(RuntimeError::TokenOutOfRange {
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
            m.row_f32(id as usize, o);
        }
        Ok(out)
    }

    /// Keys and values of every head, values padded to the key width.
    pub fn new_kv(&self, bits: KvBits) -> LayerKv {
        LayerKv::new(bits, self.cfg.heads, self.cfg.qk_head_dim())
    }

    pub fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<DsLayer, RuntimeError> {
        let c = &self.cfg;
        let h = c.hidden_size;
        let qk = c.qk_head_dim();
        let q = match c.q_lora_rank {
            Some(r) => QProj::Lora {
                a: src.matrix(&ln(l, "self_attn.q_a_proj"), r, h)?,
                norm: src.vector(&ln(l, "self_attn.q_a_layernorm.weight"), r)?,
                b: src.matrix(&ln(l, "self_attn.q_b_proj"), c.heads * qk, r)?,
            },
            None => QProj::Full(src.matrix(&ln(l, "self_attn.q_proj"), c.heads * qk, h)?),
        };
        let attn = MlaWeights {
            q,
            kv_a: src.matrix(
                &ln(l, "self_attn.kv_a_proj_with_mqa"),
                c.kv_lora_rank + c.qk_rope_head_dim,
                h,
            )?,
            kv_a_norm: src.vector(&ln(l, "self_attn.kv_a_layernorm.weight"), c.kv_lora_rank)?,
            kv_b: src.matrix(
                &ln(l, "self_attn.kv_b_proj"),
                c.heads * (c.qk_nope_head_dim + c.v_head_dim),
                c.kv_lora_rank,
            )?,
            o: src.matrix(&ln(l, "self_attn.o_proj"), h, c.heads * c.v_head_dim)?,
        };
        Ok(DsLayer {
            index: l,
            input_norm: src.vector(&ln(l, "input_layernorm.weight"), h)?,
            post_norm: src.vector(&ln(l, "post_attention_layernorm.weight"), h)?,
            attn,
            ffn: load_ffn(src, &c.ffn, l)?,
        })
    }

    pub fn load_layer_experts(
        &self,
        src: &dyn WeightSource,
        l: usize,
    ) -> Result<Vec<ExpertMats>, RuntimeError> {
        super::layerwise::Layerwise::layer_experts(self, src, l)
    }

    fn attention(&self, w: &MlaWeights, xn: &[f32], n: usize, kv: &mut LayerKv) -> Vec<f32> {
        let c = &self.cfg;
        let (nh, nope, rd, vd, r) = (
            c.heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let qk = nope + rd;
        let mut q = match &w.q {
            QProj::Lora { a, norm, b } => {
                let mut qa = matmul(a, xn, n);
                norm_in_place(&mut qa, a.rows(), norm, c.eps);
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
        norm_in_place(&mut lat, r, &w.kv_a_norm, c.eps);
        let kvb = matmul(&w.kv_b, &lat, n); // [n, heads * (nope + vd)]
        let past = kv.len();
        let mut k = vec![0.0; n * nh * qk];
        let mut v = vec![0.0; n * nh * qk];
        for i in 0..n {
            let pos = past + i;
            let kr = &mut krot[i * rd..(i + 1) * rd];
            rope_slice(kr, &self.inv_freq, pos, c.rope_interleave);
            for hh in 0..nh {
                let qh = &mut q[(i * nh + hh) * qk..(i * nh + hh + 1) * qk];
                rope_slice(&mut qh[nope..], &self.inv_freq, pos, c.rope_interleave);
                let src = &kvb[(i * nh + hh) * (nope + vd)..(i * nh + hh + 1) * (nope + vd)];
                let kh = &mut k[(i * nh + hh) * qk..(i * nh + hh + 1) * qk];
                kh[..nope].copy_from_slice(&src[..nope]);
                kh[nope..].copy_from_slice(kr);
                v[(i * nh + hh) * qk..(i * nh + hh) * qk + vd].copy_from_slice(&src[nope..]);
            }
        }
        // Values are padded to qk: attend over the padded width, keep the first vd.
        let padded =
            super::attention::attend(&q, &k, &v, kv, n, nh, nh, qk, 1.0 / (qk as f32).sqrt());
        kv.append(&k, &v);
        let mut out = vec![0.0; n * nh * vd];
        for (o, p) in out.chunks_exact_mut(vd).zip(padded.chunks_exact(qk)) {
            o.copy_from_slice(&p[..vd]);
        }
        matmul(&w.o, &out, n)
    }

    pub fn layer_forward(
        &self,
        lw: &DsLayer,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        kv: &mut LayerKv,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        self.layer_forward_next(lw, None, experts, hidden, kv, observer)
    }

    /// [`Self::layer_forward`] that also lets the provider read ahead for
    /// the next layer `next` (see [`crate::cache::prefetch`]).
    pub fn layer_forward_next(
        &self,
        lw: &DsLayer,
        next: Option<&DsLayer>,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        kv: &mut LayerKv,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        let h = self.cfg.hidden_size;
        let n = hidden.len() / h;
        let eps = self.cfg.eps;
        let xn = norm_rows(hidden, &lw.input_norm, eps);
        let a = self.attention(&lw.attn, &xn, n, kv);
        for (x, y) in hidden.iter_mut().zip(&a) {
            *x += y;
        }
        ffn_residual(
            lw.ffn_layer(),
            next.map(DsLayer::ffn_layer),
            &self.cfg.routing,
            experts,
            hidden,
            eps,
            observer,
        )
    }

    pub fn final_logits(&self, hidden: &[f32], all: bool) -> Vec<f32> {
        let c = &self.cfg;
        final_logits(
            hidden,
            all,
            &self.final_norm,
            &self.lm_head,
            c.eps,
            c.hidden_size,
            c.vocab_size,
        )
    }
}

/// A loaded DeepSeek-V3 with its KV cache.
pub struct DeepseekV3 {
    info: ModelInfo,
    pub shared: DsShared,
    layers: Vec<DsLayer>,
    experts: Arc<dyn ExpertProvider>,
    kv: Vec<LayerKv>,
}

impl DeepseekV3 {
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self, RuntimeError> {
        let c = JsonCfg::from_file(&dir.join("config.json"))?;
        let cfg = DeepseekV3Config::parse(&c)?;
        let src = SafetensorsSource::open(dir)?;
        Self::from_source(&cfg, &src, opts, None)
    }

    pub fn from_source(
        cfg: &DeepseekV3Config,
        src: &dyn WeightSource,
        opts: &LoadOptions,
        experts: Option<Arc<dyn ExpertProvider>>,
    ) -> Result<Self, RuntimeError> {
        let shared = DsShared::load(cfg, src)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| shared.load_layer(src, l))
            .collect::<Result<Vec<_>, _>>()?;
        let experts = match experts {
            Some(p) => p,
            None => {
                let mut r = ResidentExperts::new(cfg.num_hidden_layers);
                for l in 0..cfg.num_hidden_layers {
                    r.insert_layer(l, shared.load_layer_experts(src, l)?);
                }
                Arc::new(r)
            }
        };
        let info = ModelInfo {
            arch: "deepseek_v3".into(),
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            n_layers: cfg.num_hidden_layers,
            max_position_embeddings: cfg.max_position_embeddings,
            max_context: opts.max_context.unwrap_or(cfg.max_position_embeddings),
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg.eos_token_ids.clone(),
            num_experts: cfg.ffn.n_routed,
            num_experts_per_tok: cfg.routing.top_k,
        };
        let kv = (0..cfg.num_hidden_layers)
            .map(|_| shared.new_kv(opts.kv_bits))
            .collect();
        Ok(DeepseekV3 {
            info,
            shared,
            layers,
            experts,
            kv,
        })
    }

    pub fn forward_observed(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
        mut observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<Vec<f32>, RuntimeError> {
        let past = self.seq_len();
        let needed = past + tokens.len();
        if needed > self.info.max_context {
            return Err(RuntimeError::ContextFull {
                needed,
                max: self.info.max_context,
            });
        }
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let mut hidden = self.shared.embed(tokens)?;
        for (l, kv) in self.kv.iter_mut().enumerate() {
            let obs = observer.as_deref_mut();
            let (lw, next) = (&self.layers[l], self.layers.get(l + 1));
            if let Err(e) = self.shared.layer_forward_next(
                lw,
                next,
                self.experts.as_ref(),
                &mut hidden,
                kv,
                obs,
            ) {
                for kv in self.kv.iter_mut() {
                    kv.truncate(past);
                }
                return Err(e);
            }
        }
        Ok(self.shared.final_logits(&hidden, all_logits))
    }
}

impl Model for DeepseekV3 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, RuntimeError> {
        self.forward_observed(tokens, all_logits, None)
    }

    fn seq_len(&self) -> usize {
        self.kv.first().map_or(0, |k| k.len())
    }

    fn truncate(&mut self, len: usize) -> bool {
        if len > self.seq_len() {
            return false;
        }
        for kv in self.kv.iter_mut() {
            kv.truncate(len);
        }
        true
    }

    fn reset(&mut self) {
        for kv in self.kv.iter_mut() {
            kv.clear();
        }
    }
}
