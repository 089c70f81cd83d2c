//! The shared decoder: Qwen3-MoE, Qwen2-MoE, Mixtral and OLMoE are one
//! architecture with different switches (q/k norm and its width, q/k/v
//! bias, a gated shared expert, top-k renormalization, tensor and config
//! key names). Each of those families is a [`FamilySpec`] in its own short
//! file, registered with [`super::registry`]; this file is the one
//! [`Family`] they all run as: [`ModelConfig`] (their config), a GQA
//! attention block, softmax top-k routing over an optional shared expert.

use super::family::{hub_expert_names, stacked_expert_names, Dims, Family, FamilyConfig};
use super::nn::attention::{gqa, AttnShape, AttnWeights, QkNorm};
use super::nn::config::{JsonCfg, QuantConfig};
use super::nn::kv_cache::{KvBits, LayerKv};
use super::nn::linear::{add_into, layer_name, load_mlp, norm_rows};
use super::nn::moe::{ffn_residual, Ffn, FfnLayer, MoeFfn, RouterObserver, SharedExpert};
use super::nn::rope::Rope;
use super::nn::router::{Routing, SoftmaxRouter};
use crate::cache::WorkingShape;
use crate::error::RuntimeError;
use crate::experts::{ExpertNames, ExpertProvider, Glu};
use crate::weights::WeightSource;
use std::path::{Path, PathBuf};

/// What distinguishes one shared-decoder family from another (see the
/// family files).
#[derive(Debug, Clone)]
pub struct FamilySpec {
    /// The registry's `model_type`.
    pub name: &'static str,
    pub qk_norm: QkNorm,
    /// The module holding router and experts: `mlp` or `block_sparse_moe`.
    pub moe_module: &'static str,
    /// Per-expert projection names in (gate, up, down) order.
    pub expert_proj: [&'static str; 3],
    /// A sigmoid-gated shared expert next to the routed ones (qwen2_moe),
    /// `shared_expert_intermediate_size` wide.
    pub shared_expert: bool,
    /// Experts are `intermediate_size` wide (Mixtral, OLMoE), not
    /// `moe_intermediate_size`.
    pub experts_in_intermediate_size: bool,
    /// Top-k weights always renormalized (Mixtral), not per `norm_topk_prob`.
    pub always_renormalize: bool,
    /// The config key switching q/k/v bias on, and its default.
    pub bias_key: (&'static str, bool),
}

/// Everything the shared-decoder families need from `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The file this was read from, for error messages.
    pub path: PathBuf,
    /// The family's `model_type`.
    pub arch: &'static str,
    /// The family's switches.
    pub spec: FamilySpec,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (qwen2_moe always; others via `attention_bias`).
    pub attention_bias: bool,
    /// OLMoE's optional clamp of q/k/v activations.
    pub clip_qkv: Option<f32>,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Width of the dense MLP of non-MoE layers (qwen `mlp_only_layers`).
    pub intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub mlp_only_layers: Vec<usize>,
    pub decoder_sparse_step: usize,
    /// qwen2_moe's always-on shared expert width (0 = none).
    pub shared_expert_intermediate_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub quantization: Option<QuantConfig>,
    /// Weight of the load-balancing loss transformers adds to the LM loss
    /// when router logits are requested (only used by `mfx eval ppl --router-aux-loss`).
    pub router_aux_loss_coef: f32,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, RuntimeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses the config of a shared-decoder family; `path` is only used in
    /// error messages. Families with their own layer are refused (they
    /// load through [`FamilyConfig`]).
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, RuntimeError> {
        let c = JsonCfg::from_str(text, path)?;
        match super::registry::lookup(&c)?.kind {
            super::registry::Kind::Decoder(spec) => Self::parse(&c, &spec()),
            super::registry::Kind::Own(_) => Err(c.bad(
                "model_type",
                format!(
                    "`{}` has its own layer type; load it through models::FamilyConfig",
                    c.model_type()?
                ),
            )),
        }
    }

    /// Whether layer `l` has routed experts (the qwen rule; all layers for
    /// Mixtral and OLMoE, which have no such keys so the defaults apply).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        !self.mlp_only_layers.contains(&l)
            && self.num_experts > 0
            && self.decoder_sparse_step > 0
            && (l + 1).is_multiple_of(self.decoder_sparse_step)
    }

    fn parse(c: &JsonCfg, spec: &FamilySpec) -> Result<Self, RuntimeError> {
        c.silu_only()?;
        c.default_rope_only()?;
        let hidden_size = c.positive("hidden_size")?;
        let num_attention_heads = c.positive("num_attention_heads")?;
        let num_key_value_heads = c.kv_heads(num_attention_heads)?;
        let head_dim = c
            .usize_opt("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(c.bad(
                "head_dim",
                format!("{head_dim} must be even and positive for rotary embeddings"),
            ));
        }
        let num_experts = c.positive_any(&["num_experts", "num_local_experts"])?;
        let num_experts_per_tok = c.positive("num_experts_per_tok")?;
        if num_experts_per_tok > num_experts {
            return Err(c.bad(
                "num_experts_per_tok",
                format!("{num_experts_per_tok} > {num_experts} experts"),
            ));
        }
        let (moe_intermediate_size, intermediate_size) = if spec.experts_in_intermediate_size {
            let i = c.positive("intermediate_size")?;
            (i, i)
        } else {
            (
                c.positive("moe_intermediate_size")?,
                c.usize_opt("intermediate_size")?.unwrap_or(0),
            )
        };
        let (bias_key, bias_default) = spec.bias_key;
        let cfg = ModelConfig {
            path: c.path.clone(),
            arch: spec.name,
            spec: spec.clone(),
            vocab_size: c.positive("vocab_size")?,
            hidden_size,
            num_hidden_layers: c.positive("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: c.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta: c
                .f64_opt("rope_theta")?
                .ok_or_else(|| c.missing(&["rope_theta", "rope_parameters.rope_theta"]))?
                as f32,
            max_position_embeddings: c.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: c.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: c.bool_opt(bias_key)?.unwrap_or(bias_default),
            clip_qkv: c.f64_opt("clip_qkv")?.map(|v| v as f32),
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size,
            intermediate_size,
            norm_topk_prob: spec.always_renormalize
                || c.bool_opt("norm_topk_prob")?.unwrap_or(false),
            mlp_only_layers: c.indices("mlp_only_layers")?,
            decoder_sparse_step: c.usize_opt("decoder_sparse_step")?.unwrap_or(1),
            shared_expert_intermediate_size: if spec.shared_expert {
                c.usize_opt("shared_expert_intermediate_size")?.unwrap_or(0)
            } else {
                0
            },
            bos_token_id: c.ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.ids("eos_token_id")?,
            quantization: QuantConfig::from_cfg(c)?,
            router_aux_loss_coef: c.f64_opt("router_aux_loss_coef")?.unwrap_or(0.001) as f32,
        };
        if (0..cfg.num_hidden_layers).any(|l| !cfg.is_moe_layer(l)) && cfg.intermediate_size == 0 {
            return Err(c.missing(&["intermediate_size"]));
        }
        Ok(cfg)
    }
}

/// A shared-decoder family's config parsed with its spec (the registry's
/// entry point for the four spec files).
pub fn parse(c: &JsonCfg, spec: FamilySpec) -> Result<FamilyConfig, RuntimeError> {
    Ok(FamilyConfig::new(Decoder::new(ModelConfig::parse(
        c, &spec,
    )?)))
}

/// The shared decoder as a [`Family`].
#[derive(Debug, Clone)]
pub struct Decoder {
    pub cfg: ModelConfig,
    pub spec: FamilySpec,
    dims: Dims,
    attn: AttnShape,
    rope: Rope,
}

impl Decoder {
    pub fn new(cfg: ModelConfig) -> Self {
        let spec = cfg.spec.clone();
        Decoder {
            dims: Dims {
                arch: cfg.arch,
                vocab_size: cfg.vocab_size,
                hidden_size: cfg.hidden_size,
                num_hidden_layers: cfg.num_hidden_layers,
                num_experts: cfg.num_experts,
                top_k: cfg.num_experts_per_tok,
                moe_intermediate_size: cfg.moe_intermediate_size,
                max_position_embeddings: cfg.max_position_embeddings,
                eps: cfg.rms_norm_eps,
                tie_word_embeddings: cfg.tie_word_embeddings,
                zero_centred_norm: false,
                bos_token_id: cfg.bos_token_id,
                eos_token_ids: cfg.eos_token_ids.clone(),
            },
            attn: AttnShape {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                eps: cfg.rms_norm_eps,
                qk_norm: spec.qk_norm,
                clip_qkv: cfg.clip_qkv,
            },
            rope: Rope::new(cfg.rope_theta, cfg.head_dim),
            cfg,
            spec,
        }
    }
}

/// Everything of one layer except routed experts.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub index: usize,
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub attn: AttnWeights,
    pub ffn: Ffn<SoftmaxRouter>,
}

impl DecoderLayer {
    fn ffn_layer(&self) -> FfnLayer<'_, SoftmaxRouter> {
        FfnLayer {
            index: self.index,
            post_norm: &self.post_norm,
            ffn: &self.ffn,
        }
    }
}

/// Bytes of one cached key or value vector of `dim` elements.
pub(crate) fn kv_vector(bits: KvBits, dim: usize) -> u64 {
    match bits {
        KvBits::F32 => 4 * dim as u64,
        KvBits::F16 => 2 * dim as u64,
        // int8 codes plus one f32 scale per vector.
        KvBits::Q8 => dim as u64 + 4,
    }
}

/// The working shape of a shared-decoder config.
pub fn working_shape(c: &ModelConfig, kv: KvBits) -> WorkingShape {
    let dense_mlp = if !c.mlp_only_layers.is_empty() || c.decoder_sparse_step > 1 {
        c.intermediate_size
    } else {
        0
    };
    WorkingShape {
        hidden: c.hidden_size as u64,
        vocab: c.vocab_size as u64,
        kv_bytes_per_token: c.num_hidden_layers as u64
            * 2
            * c.num_key_value_heads as u64
            * kv_vector(kv, c.head_dim),
        state_bytes: 0,
        qkv: ((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim) as u64,
        top_k: c.num_experts_per_tok as u64,
        expert_inter: c.moe_intermediate_size as u64,
        shared_inter: c.shared_expert_intermediate_size.max(dense_mlp) as u64,
        experts: c.num_experts as u64,
    }
}

impl Family for Decoder {
    type Layer = DecoderLayer;
    type State = LayerKv;

    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn is_moe_layer(&self, l: usize) -> bool {
        self.cfg.is_moe_layer(l)
    }

    fn expert_names(&self, l: usize, e: usize) -> ExpertNames {
        hub_expert_names(l, self.spec.moe_module, e, self.spec.expert_proj)
    }

    fn stacked_expert_names(&self, l: usize) -> ExpertNames {
        stacked_expert_names(l, self.spec.moe_module)
    }

    fn working_shape(&self, kv: KvBits) -> WorkingShape {
        working_shape(&self.cfg, kv)
    }

    fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<DecoderLayer, RuntimeError> {
        let c = &self.cfg;
        let h = c.hidden_size;
        let attn = AttnWeights::load(src, l, &self.attn, h, c.attention_bias)?;
        let ffn = if c.is_moe_layer(l) {
            let shared = if self.spec.shared_expert && c.shared_expert_intermediate_size > 0 {
                Some(SharedExpert {
                    mlp: load_mlp(
                        src,
                        &layer_name(l, "mlp.shared_expert"),
                        h,
                        c.shared_expert_intermediate_size,
                    )?,
                    gate: Some(src.matrix(&layer_name(l, "mlp.shared_expert_gate"), 1, h)?),
                })
            } else {
                None
            };
            let rule = Routing {
                top_k: c.num_experts_per_tok,
                renormalize: c.norm_topk_prob,
            };
            let gate = layer_name(l, &format!("{}.gate", self.spec.moe_module));
            Ffn::Moe(MoeFfn {
                router: SoftmaxRouter::load(src, &gate, c.num_experts, h, rule)?,
                shared,
                glu: Glu::Silu,
            })
        } else {
            Ffn::Dense(load_mlp(
                src,
                &layer_name(l, "mlp"),
                h,
                c.intermediate_size,
            )?)
        };
        Ok(DecoderLayer {
            index: l,
            input_norm: src.vector(&layer_name(l, "input_layernorm.weight"), h)?,
            post_norm: src.vector(&layer_name(l, "post_attention_layernorm.weight"), h)?,
            attn,
            ffn,
        })
    }

    fn new_state(&self, kv: KvBits) -> LayerKv {
        LayerKv::new(kv, self.cfg.num_key_value_heads, self.cfg.head_dim)
    }

    fn layer_forward(
        &self,
        lw: &DecoderLayer,
        next: Option<&DecoderLayer>,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        kv: &mut LayerKv,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        let eps = self.cfg.rms_norm_eps;
        let n = hidden.len() / self.cfg.hidden_size;
        let xn = norm_rows(hidden, &lw.input_norm, eps);
        add_into(hidden, &gqa(&self.attn, &lw.attn, &self.rope, &xn, n, kv));
        ffn_residual(
            lw.ffn_layer(),
            next.map(DecoderLayer::ffn_layer),
            experts,
            hidden,
            eps,
            observer,
        )
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(s: &str) -> Result<ModelConfig, RuntimeError> {
        ModelConfig::from_json_str(s, Path::new("config.json"))
    }

    const BASE: &str = r#""model_type":"qwen3_moe","vocab_size":10,"hidden_size":8,"num_hidden_layers":2,
        "num_attention_heads":2,"num_key_value_heads":1,"moe_intermediate_size":4,"num_experts_per_tok":2"#;

    #[test]
    fn accepts_hub_and_transformers5_spellings() {
        let hub = parse(&format!(
            "{{{BASE},\"num_experts\":4,\"rope_theta\":1000000.0}}"
        ))
        .unwrap();
        let t5 =
            parse(&format!("{{{BASE},\"num_local_experts\":4,\"rope_parameters\":{{\"rope_theta\":1000000.0,\"rope_type\":\"default\"}}}}"))
                .unwrap();
        assert_eq!(hub.num_experts, 4);
        assert_eq!(t5.num_experts, 4);
        assert_eq!(hub.rope_theta, 1e6);
        assert_eq!(t5.rope_theta, 1e6);
        assert_eq!(hub.head_dim, 4);
    }

    #[test]
    fn missing_key_is_named() {
        let e = parse(&format!("{{{BASE},\"rope_theta\":10000.0}}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("num_experts") && e.contains("num_local_experts"),
            "{e}"
        );
        let e = parse(r#"{"model_type":"mixtral"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }

    #[test]
    fn unknown_arch_and_scaled_rope_are_refused() {
        let e = parse(r#"{"model_type":"llama"}"#).unwrap_err().to_string();
        assert!(e.contains("unsupported architecture `llama`"), "{e}");
        let e = parse(&format!("{{{BASE},\"num_experts\":4,\"rope_scaling\":{{\"rope_type\":\"yarn\",\"factor\":4.0}},\"rope_theta\":1.0}}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("yarn"), "{e}");
    }
}
