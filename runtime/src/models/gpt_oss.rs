//! gpt-oss (`GptOssForCausalLM`, openai/gpt-oss-20b and -120b), read from
//! transformers' `modeling_gpt_oss.py`:
//!
//! - attention: GQA with q/k/v/o biases, YaRN rope, per-head attention
//!   sinks (a logit in every softmax's denominator) and, on the layers
//!   `layer_types` marks `sliding_attention` (every other one by default),
//!   a sliding window of `sliding_window` keys;
//! - feed-forward: a router with a bias that picks the top-k logits and
//!   takes the softmax over those k, and experts with biases and the
//!   clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`,
//!   [`crate::experts::Glu::Clamped`]), no shared expert.
//!
//! Experts are fused per layer in the checkpoint: `mlp.experts.gate_up_proj`
//! with gate and up interleaved (gate the even outputs, up the odd ones)
//! and `down_proj`, either bf16 as transformers stores parameters
//! (`[experts, in, out]`, the transpose of `nn.Linear`) or, on the hub, as
//! MXFP4 `*_blocks`/`*_scales` pairs (`[experts, out, ...]`), plus bf16
//! `gate_up_proj_bias` / `down_proj_bias`. [`GptOss::load_expert`] slices
//! one expert out of either into the runtime's gate/up/down with biases;
//! MXFP4 stays MXFP4 (rows gathered, nothing requantized).

use super::decoder::kv_vector;
use super::family::{Dims, Family, FamilyConfig};
use super::nn::attention::{gqa_with, AttnParams, AttnShape, AttnWeights, QkNorm};
use super::nn::config::{JsonCfg, RopeScaling};
use super::nn::kv_cache::{KvBits, LayerKv};
use super::nn::linear::{add_into, layer_name, norm_rows};
use super::nn::moe::{ffn_residual, Ffn, FfnLayer, MoeFfn, RouterObserver};
use super::nn::rope::{Rope, Yarn};
use super::nn::router::{Routing, SoftmaxRouter};
use crate::cache::WorkingShape;
use crate::error::RuntimeError;
use crate::experts::{ExpertBias, ExpertMats, ExpertProvider, Glu};
use crate::weights::{mxfp4, Blob, Matrix, RawTensor, WeightSource};
use serde_json::Value;

/// gpt-oss as a [`Family`].
#[derive(Debug, Clone)]
pub struct GptOss {
    dims: Dims,
    attn: AttnShape,
    attention_bias: bool,
    rope: Rope,
    /// Per layer: `Some(window)` for sliding-window layers, `None` for full.
    windows: Vec<Option<usize>>,
    glu: Glu,
}

/// transformers' `GptOssConfig` default when a config has neither
/// `rope_parameters` nor `rope_scaling`: YaRN x32 over 4096 positions.
fn default_yarn() -> Yarn {
    Yarn {
        factor: 32.0,
        original_max_position: 4096,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: None,
        mscale_all_dim: None,
        attention_factor: None,
        truncate: false,
    }
}

/// `layer_types` (each `sliding_attention` or `full_attention`), else
/// transformers' default: sliding on even layers, full on odd ones.
fn layer_windows(
    c: &JsonCfg,
    layers: usize,
    window: Option<usize>,
) -> Result<Vec<Option<usize>>, RuntimeError> {
    let Some(v) = c.obj.get("layer_types").filter(|v| !v.is_null()) else {
        return Ok((0..layers)
            .map(|l| if l % 2 == 0 { window } else { None })
            .collect());
    };
    let a = v
        .as_array()
        .ok_or_else(|| c.bad("layer_types", "expected an array of strings"))?;
    if a.len() != layers {
        return Err(c.bad(
            "layer_types",
            format!("{} entries for {layers} layers", a.len()),
        ));
    }
    a.iter()
        .map(|t| match t.as_str() {
            Some("sliding_attention") => Ok(window),
            Some("full_attention") => Ok(None),
            _ => Err(c.bad(
                "layer_types",
                format!("{t}: expected \"sliding_attention\" or \"full_attention\""),
            )),
        })
        .collect()
}

/// Parses a `gpt_oss` config (the registry's entry point). Accepts the
/// hub's spellings (`rope_scaling`, `experts_per_token`, top-level
/// `rope_theta`) and transformers 5's (`rope_parameters`,
/// `num_experts_per_tok`). `initial_context_length`, which only the hub's
/// configs carry, is ignored as transformers ignores it (YaRN's original
/// context comes from `original_max_position_embeddings`).
pub fn parse(c: &JsonCfg) -> Result<FamilyConfig, RuntimeError> {
    c.silu_only()?;
    let hidden_size = c.positive("hidden_size")?;
    let heads = c.positive("num_attention_heads")?;
    let kv_heads = c.kv_heads(heads)?;
    let head_dim = c.usize_opt("head_dim")?.unwrap_or(hidden_size / heads);
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(c.bad(
            "head_dim",
            format!("{head_dim} must be even and positive for rotary embeddings"),
        ));
    }
    let num_experts = c.positive_any(&["num_local_experts", "num_experts"])?;
    let top_k = c.positive_any(&["num_experts_per_tok", "experts_per_token"])?;
    if top_k > num_experts {
        return Err(c.bad(
            "num_experts_per_tok",
            format!("{top_k} > {num_experts} experts"),
        ));
    }
    let layers = c.positive("num_hidden_layers")?;
    let max_pos = c.usize_opt("max_position_embeddings")?.unwrap_or(131072);
    let theta = c.f64_opt("rope_theta")?.unwrap_or(150000.0) as f32;
    let has_rope_cfg = ["rope_parameters", "rope_scaling"]
        .iter()
        .any(|k| c.obj.get(*k).is_some_and(|v| !v.is_null()));
    let scaling = if has_rope_cfg {
        c.rope_scaling(max_pos)?
    } else {
        RopeScaling::Yarn(default_yarn())
    };
    // Absent: transformers' default 128; an explicit null: no window.
    let window = match c.obj.get("sliding_window") {
        None => Some(128),
        Some(Value::Null) => None,
        Some(_) => Some(c.positive("sliding_window")?),
    };
    let eps = c.f64_opt("rms_norm_eps")?.unwrap_or(1e-5) as f32;
    let limit = c.f64_opt("swiglu_limit")?.unwrap_or(7.0) as f32;
    let alpha = c.f64_opt("swiglu_alpha")?.unwrap_or(1.702) as f32;
    if limit.is_nan() || limit <= 0.0 || !alpha.is_finite() {
        return Err(c.bad(
            "swiglu_limit",
            format!("limit {limit} must be positive and alpha {alpha} finite"),
        ));
    }
    Ok(FamilyConfig::new(GptOss {
        dims: Dims {
            arch: "gpt_oss",
            vocab_size: c.positive("vocab_size")?,
            hidden_size,
            num_hidden_layers: layers,
            num_experts,
            top_k,
            moe_intermediate_size: c.positive("intermediate_size")?,
            max_position_embeddings: max_pos,
            eps,
            tie_word_embeddings: c.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            zero_centred_norm: false,
            bos_token_id: c.ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.ids("eos_token_id")?,
        },
        attn: AttnShape {
            heads,
            kv_heads,
            head_dim,
            eps,
            qk_norm: QkNorm::None,
            clip_qkv: None,
        },
        attention_bias: c.bool_opt("attention_bias")?.unwrap_or(true),
        rope: Rope::scaled(theta, head_dim, &scaling),
        windows: layer_windows(c, layers, window)?,
        glu: Glu::Clamped { alpha, limit },
    }))
}

/// Everything of one layer except routed experts.
#[derive(Debug, Clone)]
pub struct GptOssLayer {
    pub index: usize,
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub attn: AttnWeights,
    pub o_bias: Option<Vec<f32>>,
    /// One attention-sink logit per query head.
    pub sinks: Vec<f32>,
    pub ffn: Ffn<SoftmaxRouter>,
}

impl GptOssLayer {
    fn ffn_layer(&self) -> FfnLayer<'_, SoftmaxRouter> {
        FfnLayer {
            index: self.index,
            post_norm: &self.post_norm,
            ffn: &self.ffn,
        }
    }
}

/// `model.layers.{l}.mlp.experts.{name}`.
fn fused(l: usize, name: &str) -> String {
    layer_name(l, &format!("mlp.experts.{name}"))
}

/// Row `index` of the float tensor `name`, which must be `[count, len]`, as f32.
fn stacked_row(
    src: &dyn WeightSource,
    name: &str,
    index: usize,
    count: usize,
    len: usize,
) -> Result<Vec<f32>, RuntimeError> {
    let t = src.require(name)?;
    if t.shape != [count, len] {
        return Err(shape_mismatch(src, name, &[count, len], &t.shape));
    }
    let per = t.data.len() / count;
    RawTensor {
        dtype: t.dtype,
        shape: vec![len],
        data: t.data.slice(index * per, per),
    }
    .to_f32(name, &src.location_of(name))
}

fn shape_mismatch(
    src: &dyn WeightSource,
    name: &str,
    want: &[usize],
    found: &[usize],
) -> RuntimeError {
    RuntimeError::Shape {
        name: name.into(),
        location: src.location_of(name),
        expected: format!("{want:?}"),
        found: found.to_vec(),
    }
}

/// Expert `e` of a float `[count, rows_in, cols_out]` tensor (transformers'
/// parameter layout, `y = x @ W`) as `nn.Linear` matrices `[out, in]`: one
/// per `outs` selection of output columns, each element copied in its own
/// dtype (no rounding).
fn transposed_columns(
    src: &dyn WeightSource,
    name: &str,
    (e, count): (usize, usize),
    (ins, cols): (usize, usize),
    outs: &[Vec<usize>],
) -> Result<Vec<Matrix>, RuntimeError> {
    let t = src.require(name)?;
    if t.shape != [count, ins, cols] {
        return Err(shape_mismatch(src, name, &[count, ins, cols], &t.shape));
    }
    let es = t.dtype.size();
    let per = ins * cols * es;
    let b = &t.data.bytes()[e * per..(e + 1) * per];
    outs.iter()
        .map(|pick| {
            let mut v = Vec::with_capacity(pick.len() * ins * es);
            for &c in pick {
                for r in 0..ins {
                    let at = (r * cols + c) * es;
                    v.extend_from_slice(&b[at..at + es]);
                }
            }
            Matrix::dense(t.dtype, pick.len(), ins, Blob::copy_of(&v)).map_err(|msg| {
                RuntimeError::Dtype {
                    name: name.into(),
                    location: src.location_of(name),
                    dtype: format!("{:?}", t.dtype),
                    expected: msg,
                }
            })
        })
        .collect()
}

impl Family for GptOss {
    type Layer = GptOssLayer;
    type State = LayerKv;

    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn is_moe_layer(&self, _l: usize) -> bool {
        true
    }

    fn working_shape(&self, kv: KvBits) -> WorkingShape {
        let (d, a) = (&self.dims, &self.attn);
        WorkingShape {
            hidden: d.hidden_size as u64,
            vocab: d.vocab_size as u64,
            // Sliding-window layers keep every position too (their KV
            // cache is the same `LayerKv`), so all layers count.
            kv_bytes_per_token: d.num_hidden_layers as u64
                * 2
                * a.kv_heads as u64
                * kv_vector(kv, a.head_dim),
            state_bytes: 0,
            qkv: ((a.heads + 2 * a.kv_heads) * a.head_dim) as u64,
            top_k: d.top_k as u64,
            expert_inter: d.moe_intermediate_size as u64,
            shared_inter: 0,
            experts: d.num_experts as u64,
        }
    }

    fn fused_expert_tensors(&self, l: usize) -> Vec<String> {
        let mut out = Vec::new();
        for p in ["gate_up_proj", "down_proj"] {
            for s in ["", "_bias", "_blocks", "_scales"] {
                out.push(fused(l, &format!("{p}{s}")));
            }
        }
        out
    }

    fn load_expert(
        &self,
        src: &dyn WeightSource,
        l: usize,
        e: usize,
    ) -> Result<ExpertMats, RuntimeError> {
        let (n, h, i) = (
            self.dims.num_experts,
            self.dims.hidden_size,
            self.dims.moe_intermediate_size,
        );
        let even: Vec<usize> = (0..i).map(|r| 2 * r).collect();
        let odd: Vec<usize> = (0..i).map(|r| 2 * r + 1).collect();
        let (gu, dn) = (fused(l, "gate_up_proj"), fused(l, "down_proj"));
        let (gate, up, down) = if mxfp4::has_pair(src, &gu) {
            // Hub layout: rows are outputs; gate/up interleaved by row.
            let m = mxfp4::expert(src, &gu, e, n, 2 * i, h)?;
            (
                m.gather_rows(&even),
                m.gather_rows(&odd),
                mxfp4::expert(src, &dn, e, n, h, i)?,
            )
        } else if src.contains(&gu) {
            let mut gu_m =
                transposed_columns(src, &gu, (e, n), (h, 2 * i), &[even, odd])?.into_iter();
            let all: Vec<usize> = (0..h).collect();
            let mut d = transposed_columns(src, &dn, (e, n), (i, h), &[all])?.into_iter();
            match (gu_m.next(), gu_m.next(), d.next()) {
                (Some(g), Some(u), Some(d)) => (g, u, d),
                _ => return Err(RuntimeError::Other(format!("{gu}: expert {e} not sliced"))),
            }
        } else {
            return Err(RuntimeError::MissingTensor {
                name: format!("{gu} (or {gu}_blocks and {gu}_scales)"),
                location: src.location(),
            });
        };
        let gub = stacked_row(src, &format!("{gu}_bias"), e, n, 2 * i)?;
        let bias = ExpertBias {
            gate: gub.iter().step_by(2).copied().collect(),
            up: gub.iter().skip(1).step_by(2).copied().collect(),
            down: stacked_row(src, &format!("{dn}_bias"), e, n, h)?,
        };
        Ok(ExpertMats {
            gate,
            up,
            down,
            bias: Some(bias),
        })
    }

    fn load_layer(&self, src: &dyn WeightSource, l: usize) -> Result<GptOssLayer, RuntimeError> {
        let (h, a) = (self.dims.hidden_size, &self.attn);
        let router = layer_name(l, "mlp.router");
        let rule = Routing {
            top_k: self.dims.top_k,
            renormalize: true,
        };
        Ok(GptOssLayer {
            index: l,
            input_norm: src.vector(&layer_name(l, "input_layernorm.weight"), h)?,
            post_norm: src.vector(&layer_name(l, "post_attention_layernorm.weight"), h)?,
            attn: AttnWeights::load(src, l, a, h, self.attention_bias)?,
            o_bias: if self.attention_bias {
                Some(src.vector(&layer_name(l, "self_attn.o_proj.bias"), h)?)
            } else {
                None
            },
            sinks: src.vector(&layer_name(l, "self_attn.sinks"), a.heads)?,
            ffn: Ffn::Moe(MoeFfn {
                router: SoftmaxRouter::load(src, &router, self.dims.num_experts, h, rule)?
                    .with_bias(src, &router)?,
                shared: None,
                glu: self.glu,
            }),
        })
    }

    fn new_state(&self, kv: KvBits) -> LayerKv {
        LayerKv::new(kv, self.attn.kv_heads, self.attn.head_dim)
    }

    fn layer_forward(
        &self,
        lw: &GptOssLayer,
        next: Option<&GptOssLayer>,
        experts: &dyn ExpertProvider,
        hidden: &mut [f32],
        kv: &mut LayerKv,
        observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<(), RuntimeError> {
        let (eps, a) = (self.dims.eps, &self.attn);
        let n = hidden.len() / self.dims.hidden_size;
        let xn = norm_rows(hidden, &lw.input_norm, eps);
        let p = AttnParams::new(a.heads, a.kv_heads, a.head_dim)
            .windowed(self.windows[lw.index])
            .with_sinks(&lw.sinks);
        let mut y = gqa_with(a, &lw.attn, &self.rope, &p, &xn, n, kv);
        if let Some(b) = &lw.o_bias {
            for row in y.chunks_exact_mut(b.len()) {
                add_into(row, b);
            }
        }
        add_into(hidden, &y);
        ffn_residual(
            lw.ffn_layer(),
            next.map(GptOssLayer::ffn_layer),
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

    fn parse_str(s: &str) -> Result<GptOss, RuntimeError> {
        let c = JsonCfg::from_str(s, Path::new("config.json"))?;
        Ok(parse(&c)?.downcast::<GptOss>().unwrap().clone())
    }

    const BASE: &str = r#""model_type":"gpt_oss","vocab_size":10,"hidden_size":64,"num_hidden_layers":3,
        "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"intermediate_size":32,
        "num_local_experts":8"#;

    #[test]
    fn hub_and_transformers5_spellings_agree() {
        let hub = parse_str(&format!(
            r#"{{{BASE},"experts_per_token":2,"rope_theta":150000.0,"initial_context_length":4096,
            "rope_scaling":{{"rope_type":"yarn","factor":32.0,"beta_fast":32.0,"beta_slow":1.0,
            "truncate":false,"original_max_position_embeddings":4096}}}}"#
        ))
        .unwrap();
        let t5 = parse_str(&format!(
            r#"{{{BASE},"num_experts_per_tok":2,"rope_parameters":{{"rope_theta":150000.0,
            "rope_type":"yarn","factor":32.0,"beta_fast":32.0,"beta_slow":1.0,"truncate":false,
            "original_max_position_embeddings":4096}}}}"#
        ))
        .unwrap();
        // No rope keys at all: transformers' default is this same YaRN.
        let bare = parse_str(&format!(r#"{{{BASE},"num_experts_per_tok":2}}"#)).unwrap();
        for m in [&hub, &t5, &bare] {
            assert_eq!(m.dims.top_k, 2);
            assert_eq!(m.windows, vec![Some(128), None, Some(128)]);
            assert_eq!(
                m.glu,
                Glu::Clamped {
                    alpha: 1.702,
                    limit: 7.0
                }
            );
        }
        let (mut c1, mut s1) = (vec![0.0; 8], vec![0.0; 8]);
        let (mut c2, mut s2) = (vec![0.0; 8], vec![0.0; 8]);
        for other in [&t5, &bare] {
            hub.rope.angles(1000, &mut c1, &mut s1);
            other.rope.angles(1000, &mut c2, &mut s2);
            assert_eq!((&c1, &s1), (&c2, &s2));
        }
        // YaRN's attention factor scales cos/sin: 0.1 ln 32 + 1.
        hub.rope.angles(0, &mut c1, &mut s1);
        assert!((c1[0] - (0.1 * 32f32.ln() + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn bad_layer_types_are_named() {
        let e = parse_str(&format!(
            r#"{{{BASE},"num_experts_per_tok":2,"layer_types":["full_attention","sliding_attention"]}}"#
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("layer_types") && e.contains("2 entries for 3 layers"),
            "{e}"
        );
        let e = parse_str(&format!(
            r#"{{{BASE},"num_experts_per_tok":2,"layer_types":["full_attention","chunked","full_attention"]}}"#
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("layer_types") && e.contains("chunked"), "{e}");
        let e = parse_str(&format!(r#"{{{BASE},"num_experts_per_tok":9}}"#))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("num_experts_per_tok"), "{e}");
    }
}
