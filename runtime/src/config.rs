//! `config.json` as the runtime needs it.
//!
//! Parsed by hand from a JSON value rather than with a serde struct because
//! the same field has several spellings in the wild: hub checkpoints write
//! `rope_theta` and `num_experts`, transformers 5 writes `rope_parameters`
//! and `num_local_experts`, Mixtral calls its expert width
//! `intermediate_size`. Unknown keys are ignored; a missing required key is
//! an error naming it (and its alternative spellings).

use crate::error::RuntimeError;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The model families the runtime implements, one file each in `models/`.
/// The first four share the decoder (`models::decoder`) and are described
/// by [`ModelConfig`]; the last three have their own model types and config
/// structs (`models::family::FamilyConfig` dispatches on this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Qwen3Moe,
    Qwen2Moe,
    Mixtral,
    Olmoe,
    Glm4Moe,
    DeepseekV3,
    Qwen3Next,
}

impl Arch {
    pub fn name(&self) -> &'static str {
        match self {
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Mixtral => "mixtral",
            Arch::Olmoe => "olmoe",
            Arch::Glm4Moe => "glm4_moe",
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Qwen3Next => "qwen3_next",
        }
    }

    /// Whether the family runs on the shared decoder (and so is described
    /// by a [`ModelConfig`]).
    pub fn uses_shared_decoder(&self) -> bool {
        matches!(
            self,
            Arch::Qwen3Moe | Arch::Qwen2Moe | Arch::Mixtral | Arch::Olmoe
        )
    }

    fn from_model_type(s: &str) -> Option<Arch> {
        match s {
            "qwen3_moe" => Some(Arch::Qwen3Moe),
            "qwen2_moe" => Some(Arch::Qwen2Moe),
            "mixtral" => Some(Arch::Mixtral),
            "olmoe" => Some(Arch::Olmoe),
            "glm4_moe" => Some(Arch::Glm4Moe),
            "deepseek_v3" => Some(Arch::DeepseekV3),
            "qwen3_next" => Some(Arch::Qwen3Next),
            _ => None,
        }
    }

    fn from_class(s: &str) -> Option<Arch> {
        match s {
            "Qwen3MoeForCausalLM" => Some(Arch::Qwen3Moe),
            "Qwen2MoeForCausalLM" => Some(Arch::Qwen2Moe),
            "MixtralForCausalLM" => Some(Arch::Mixtral),
            "OlmoeForCausalLM" => Some(Arch::Olmoe),
            "Glm4MoeForCausalLM" => Some(Arch::Glm4Moe),
            "DeepseekV3ForCausalLM" => Some(Arch::DeepseekV3),
            "Qwen3NextForCausalLM" => Some(Arch::Qwen3Next),
            _ => None,
        }
    }

    /// The family of a parsed `config.json` (`model_type`, else the first
    /// of `architectures`); `path` is only used in error messages.
    pub fn of_config(obj: &Map<String, Value>, path: &Path) -> Result<Arch, RuntimeError> {
        Cfg { path, obj }.arch()
    }
}

/// The most layers a config may declare. Far above any released model
/// (DeepSeek-V3: 61, Kimi K2: 61, Qwen3-235B: 94); checked before anything
/// per layer is allocated (`num_hidden_layers: 1000000000` took 5 GB, issue 16).
pub const MAX_LAYERS: u64 = 1024;
/// The most routed experts per layer (released models: at most 512).
pub const MAX_EXPERTS: u64 = 1 << 16;
/// The largest vocabulary (released models: at most ~260k).
pub const MAX_VOCAB: u64 = 1 << 22;
/// The longest trained context a config may declare.
pub const MAX_POSITIONS: u64 = 1 << 24;
/// Any other width (hidden, heads, head dims, intermediate sizes).
pub const MAX_WIDTH: u64 = 1 << 20;

/// The cap on config key `key`'s value ([`MAX_LAYERS`] and the rest): a
/// hostile config is refused naming the field before the loader allocates
/// anything proportional to it. Shared by every family's config reader.
pub fn size_cap(key: &str) -> u64 {
    match key {
        "num_hidden_layers" => MAX_LAYERS,
        k if k.contains("experts") => MAX_EXPERTS,
        "vocab_size" => MAX_VOCAB,
        k if k.contains("position") || k.contains("context") => MAX_POSITIONS,
        _ => MAX_WIDTH,
    }
}

/// `n` for config key `key` if within [`size_cap`], else the error message.
pub fn check_cap(key: &str, n: u64) -> Result<usize, String> {
    let cap = size_cap(key);
    if n > cap {
        return Err(format!(
            "{n} is larger than any model mfx can run (at most {cap}); the config is corrupt or hostile"
        ));
    }
    usize::try_from(n).map_err(|_| "value too large".to_string())
}

/// Per-module MLX quantization (`quantization` in an mlx-community config).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantConfig {
    pub bits: u8,
    pub group_size: u32,
    /// Module path (e.g. `model.layers.0.mlp.gate`) -> `(bits, group_size)`,
    /// or `None` where the module is explicitly left unquantized.
    pub overrides: BTreeMap<String, Option<(u8, u32)>>,
}

impl QuantConfig {
    /// The expected `(bits, group_size)` of a module, `None` if unquantized.
    pub fn for_module(&self, module: &str) -> Option<(u8, u32)> {
        match self.overrides.get(module) {
            Some(o) => *o,
            None => Some((self.bits, self.group_size)),
        }
    }
}

/// Everything the four MoE families need from `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The file this was read from, for error messages.
    pub path: PathBuf,
    pub arch: Arch,
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

    /// Parses config text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, RuntimeError> {
        let v: Value = serde_json::from_str(text).map_err(|e| RuntimeError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        let obj = v.as_object().ok_or_else(|| RuntimeError::BadKey {
            path: path.to_path_buf(),
            key: "(top level)".into(),
            msg: "expected a JSON object".into(),
        })?;
        let c = Cfg { path, obj };
        c.parse()
    }

    /// Whether layer `l` has routed experts (the qwen rule; all layers for
    /// Mixtral and OLMoE, which have no such keys so the defaults apply).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        !self.mlp_only_layers.contains(&l)
            && self.num_experts > 0
            && self.decoder_sparse_step > 0
            && (l + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

struct Cfg<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Cfg<'_> {
    fn bad(&self, key: &str, msg: impl Into<String>) -> RuntimeError {
        RuntimeError::BadKey {
            path: self.path.to_path_buf(),
            key: key.into(),
            msg: msg.into(),
        }
    }

    /// The first present, non-null value among `keys`.
    fn get_any<'k>(&self, keys: &[&'k str]) -> Option<(&'k str, &Value)> {
        for k in keys {
            if let Some(v) = self.obj.get(*k) {
                if !v.is_null() {
                    return Some((k, v));
                }
            }
        }
        None
    }

    fn missing(&self, keys: &[&str]) -> RuntimeError {
        let key = match keys {
            [one] => one.to_string(),
            [first, rest @ ..] => format!("{first}` (or `{}", rest.join("` or `")),
            [] => String::new(),
        };
        RuntimeError::MissingKey {
            path: self.path.to_path_buf(),
            key,
        }
    }

    fn usize_opt(&self, keys: &[&str]) -> Result<Option<usize>, RuntimeError> {
        match self.get_any(keys) {
            None => Ok(None),
            Some((k, v)) => match v.as_u64() {
                Some(n) => check_cap(k, n).map(Some).map_err(|m| self.bad(k, m)),
                None => Err(self.bad(k, format!("expected a non-negative integer, found {v}"))),
            },
        }
    }

    fn usize_req(&self, keys: &[&str]) -> Result<usize, RuntimeError> {
        self.usize_opt(keys)?.ok_or_else(|| self.missing(keys))
    }

    fn positive(&self, keys: &[&str]) -> Result<usize, RuntimeError> {
        let n = self.usize_req(keys)?;
        if n == 0 {
            return Err(self.bad(keys[0], "must be positive"));
        }
        Ok(n)
    }

    fn f64_opt(&self, keys: &[&str]) -> Result<Option<f64>, RuntimeError> {
        match self.get_any(keys) {
            None => Ok(None),
            Some((k, v)) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(k, format!("expected a number, found {v}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>, RuntimeError> {
        match self.get_any(&[key]) {
            None => Ok(None),
            Some((k, v)) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(k, format!("expected true or false, found {v}"))),
        }
    }

    fn ids(&self, key: &str) -> Result<Vec<u32>, RuntimeError> {
        let one = |v: &Value| -> Result<u32, RuntimeError> {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.bad(key, format!("expected a token id, found {v}")))
        };
        match self.get_any(&[key]) {
            None => Ok(vec![]),
            Some((_, Value::Array(a))) => a.iter().map(one).collect(),
            Some((_, v)) => Ok(vec![one(v)?]),
        }
    }

    fn arch(&self) -> Result<Arch, RuntimeError> {
        let unsupported = |arch: &str| RuntimeError::UnsupportedArch {
            path: self.path.to_path_buf(),
            arch: arch.into(),
        };
        if let Some((_, v)) = self.get_any(&["model_type"]) {
            let s = v
                .as_str()
                .ok_or_else(|| self.bad("model_type", "expected a string"))?;
            return Arch::from_model_type(s).ok_or_else(|| unsupported(s));
        }
        if let Some((_, Value::Array(a))) = self.get_any(&["architectures"]) {
            if let Some(s) = a.first().and_then(|v| v.as_str()) {
                return Arch::from_class(s).ok_or_else(|| unsupported(s));
            }
        }
        Err(self.missing(&["model_type", "architectures"]))
    }

    /// `rope_theta` at top level (hub) or inside `rope_parameters` (transformers 5).
    /// Only the default (unscaled) rope is implemented; anything else is refused
    /// rather than silently computed wrong.
    fn rope_theta(&self) -> Result<f32, RuntimeError> {
        for key in ["rope_parameters", "rope_scaling"] {
            if let Some((_, v)) = self.get_any(&[key]) {
                let o = v
                    .as_object()
                    .ok_or_else(|| self.bad(key, "expected an object"))?;
                let ty = o
                    .get("rope_type")
                    .or_else(|| o.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("default");
                if ty != "default" {
                    return Err(self.bad(
                        key,
                        format!("rope type `{ty}` is not supported (only the default rope)"),
                    ));
                }
                if let Some(t) = o.get("rope_theta") {
                    let t = t
                        .as_f64()
                        .ok_or_else(|| self.bad(key, "rope_theta: expected a number"))?;
                    return Ok(t as f32);
                }
            }
        }
        match self.f64_opt(&["rope_theta"])? {
            Some(t) => Ok(t as f32),
            None => Err(self.missing(&["rope_theta", "rope_parameters.rope_theta"])),
        }
    }

    fn quantization(&self) -> Result<Option<QuantConfig>, RuntimeError> {
        let Some((key, v)) = self.get_any(&["quantization", "quantization_config"]) else {
            return Ok(None);
        };
        let o = v
            .as_object()
            .ok_or_else(|| self.bad(key, "expected an object"))?;
        if let Some(mode) = o.get("mode").and_then(|m| m.as_str()) {
            if mode != "affine" {
                return Err(self.bad(
                    key,
                    format!("quantization mode `{mode}` is not supported (only MLX affine)"),
                ));
            }
        }
        let pair = |what: &str, o: &Map<String, Value>| -> Result<(u8, u32), RuntimeError> {
            let bits = o
                .get("bits")
                .and_then(|b| b.as_u64())
                .and_then(|b| u8::try_from(b).ok());
            let gs = o
                .get("group_size")
                .and_then(|b| b.as_u64())
                .and_then(|b| u32::try_from(b).ok());
            match (bits, gs) {
                (Some(b), Some(g)) => Ok((b, g)),
                _ => Err(self.bad(
                    key,
                    format!("{what}: expected integer `bits` and `group_size`"),
                )),
            }
        };
        let (bits, group_size) = pair("top level", o)?;
        let mut overrides = BTreeMap::new();
        for (k, v) in o {
            match v {
                Value::Object(m) => {
                    overrides.insert(k.clone(), Some(pair(k, m)?));
                }
                Value::Bool(false) => {
                    overrides.insert(k.clone(), None);
                }
                _ => {}
            }
        }
        Ok(Some(QuantConfig {
            bits,
            group_size,
            overrides,
        }))
    }

    fn parse(&self) -> Result<ModelConfig, RuntimeError> {
        let arch = self.arch()?;
        if !arch.uses_shared_decoder() {
            return Err(self.bad(
                "model_type",
                format!(
                    "`{}` has its own model type; load it through models::family::FamilyConfig",
                    arch.name()
                ),
            ));
        }
        if let Some((_, act)) = self.get_any(&["hidden_act"]) {
            if act.as_str() != Some("silu") {
                return Err(self.bad(
                    "hidden_act",
                    format!("activation {act} is not supported (only silu)"),
                ));
            }
        }
        let hidden_size = self.positive(&["hidden_size"])?;
        let num_attention_heads = self.positive(&["num_attention_heads"])?;
        let num_key_value_heads = self
            .usize_opt(&["num_key_value_heads"])?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(self.bad(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = self
            .usize_opt(&["head_dim"])?
            .unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(self.bad(
                "head_dim",
                format!("{head_dim} must be even and positive for rotary embeddings"),
            ));
        }
        let num_experts = self.positive(&["num_experts", "num_local_experts"])?;
        let num_experts_per_tok = self.positive(&["num_experts_per_tok"])?;
        if num_experts_per_tok > num_experts {
            return Err(self.bad(
                "num_experts_per_tok",
                format!("{num_experts_per_tok} > {num_experts} experts"),
            ));
        }
        // Mixtral's experts are `intermediate_size` wide; the qwen families and
        // OLMoE name it `moe_intermediate_size` (OLMoE: `intermediate_size`).
        let (moe_intermediate_size, intermediate_size) = match arch {
            Arch::Mixtral | Arch::Olmoe => {
                let i = self.positive(&["intermediate_size"])?;
                (i, i)
            }
            _ => (
                self.positive(&["moe_intermediate_size"])?,
                self.usize_opt(&["intermediate_size"])?.unwrap_or(0),
            ),
        };
        let norm_topk_prob = match arch {
            Arch::Mixtral => true,
            _ => self.bool_opt("norm_topk_prob")?.unwrap_or(false),
        };
        let mlp_only_layers = match self.get_any(&["mlp_only_layers"]) {
            None => vec![],
            Some((k, Value::Array(a))) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| self.bad(k, "expected layer indices"))
                })
                .collect::<Result<_, _>>()?,
            Some((k, _)) => return Err(self.bad(k, "expected an array of layer indices")),
        };
        let attention_bias = match arch {
            Arch::Qwen2Moe => self.bool_opt("qkv_bias")?.unwrap_or(true),
            _ => self.bool_opt("attention_bias")?.unwrap_or(false),
        };
        let shared_expert_intermediate_size = match arch {
            Arch::Qwen2Moe => self
                .usize_opt(&["shared_expert_intermediate_size"])?
                .unwrap_or(0),
            _ => 0,
        };
        let cfg = ModelConfig {
            path: self.path.to_path_buf(),
            arch,
            vocab_size: self.positive(&["vocab_size"])?,
            hidden_size,
            num_hidden_layers: self.positive(&["num_hidden_layers"])?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.f64_opt(&["rms_norm_eps"])?.unwrap_or(1e-6) as f32,
            rope_theta: self.rope_theta()?,
            max_position_embeddings: self
                .usize_opt(&["max_position_embeddings"])?
                .unwrap_or(4096),
            tie_word_embeddings: self.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            attention_bias,
            clip_qkv: self.f64_opt(&["clip_qkv"])?.map(|v| v as f32),
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size,
            intermediate_size,
            norm_topk_prob,
            mlp_only_layers,
            decoder_sparse_step: self.usize_opt(&["decoder_sparse_step"])?.unwrap_or(1),
            shared_expert_intermediate_size,
            bos_token_id: self.ids("bos_token_id")?.first().copied(),
            eos_token_ids: self.ids("eos_token_id")?,
            quantization: self.quantization()?,
            router_aux_loss_coef: self.f64_opt(&["router_aux_loss_coef"])?.unwrap_or(0.001) as f32,
        };
        if (0..cfg.num_hidden_layers).any(|l| !cfg.is_moe_layer(l)) && cfg.intermediate_size == 0 {
            return Err(self.missing(&["intermediate_size"]));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
