//! The one `config.json` reader every family parses its config with: each
//! getter names the file and key in its error, size keys are capped where
//! they are read ([`check_cap`]), and a key is found at the
//! top level or, failing that, inside `rope_parameters` / `rope_scaling`
//! (transformers 5 moved rope keys there). The `_any` getters take the
//! spellings a key has in the wild (`num_experts` / `num_local_experts`).

use crate::error::RuntimeError;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Keys that transformers 5 reads from `rope_parameters` (see [`JsonCfg`]'s `get`).
const ROPE_KEYS: [&str; 3] = ["rope_theta", "partial_rotary_factor", "rope_type"];

/// Reads `config.json` keys, naming the file and key in every error.
#[derive(Debug, Clone)]
pub struct JsonCfg {
    pub path: PathBuf,
    pub obj: Map<String, Value>,
    /// Where `obj` sits in the file (`text_config.` for [`JsonCfg::nested`]),
    /// prepended to key names in errors.
    prefix: String,
}

/// How a family's rotary embedding is scaled (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Unscaled (`default`, or no `rope_type`).
    None,
    /// YaRN (`rope_type: yarn`), as transformers' `_compute_yarn_parameters`.
    Yarn(super::rope::Yarn),
}

impl JsonCfg {
    pub fn from_file(path: &Path) -> Result<Self, RuntimeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
        Self::from_str(&text, path)
    }

    /// Parses config text; `path` is only used in error messages.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, path: &Path) -> Result<Self, RuntimeError> {
        let v: Value = serde_json::from_str(text).map_err(|e| RuntimeError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        match v {
            Value::Object(obj) => Ok(JsonCfg {
                path: path.to_path_buf(),
                obj,
                prefix: String::new(),
            }),
            _ => Err(RuntimeError::BadKey {
                path: path.to_path_buf(),
                key: "(top level)".into(),
                msg: "expected a JSON object".into(),
            }),
        }
    }

    pub fn bad(&self, key: &str, msg: impl Into<String>) -> RuntimeError {
        RuntimeError::BadKey {
            path: self.path.clone(),
            key: format!("{}{key}", self.prefix),
            msg: msg.into(),
        }
    }

    /// The object under `key` (a multimodal checkpoint's `text_config`) as
    /// a config of its own, `None` if absent; its errors name keys as
    /// `key.inner`.
    pub fn nested(&self, key: &str) -> Result<Option<JsonCfg>, RuntimeError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(obj)) => Ok(Some(JsonCfg {
                path: self.path.clone(),
                obj: obj.clone(),
                prefix: format!("{}{key}.", self.prefix),
            })),
            Some(v) => Err(self.bad(key, format!("expected an object, found {v}"))),
        }
    }

    /// The error for a missing key, naming its other spellings.
    pub fn missing(&self, keys: &[&str]) -> RuntimeError {
        let p = &self.prefix;
        let key = match keys {
            [one] => format!("{p}{one}"),
            [first, rest @ ..] => format!(
                "{p}{first}` (or `{}",
                rest.iter()
                    .map(|k| format!("{p}{k}"))
                    .collect::<Vec<_>>()
                    .join("` or `")
            ),
            [] => String::new(),
        };
        RuntimeError::MissingKey {
            path: self.path.clone(),
            key,
        }
    }

    /// The non-null value of `key` at top level or, failing that, inside
    /// `rope_parameters` / `rope_scaling`. A rope key ([`ROPE_KEYS`]) in
    /// `rope_parameters` wins over a top-level copy: transformers 5 reads
    /// rope from there, and its configs may keep a stale top-level default
    /// (Qwen3-Next/3.5 save `partial_rotary_factor: 0.25` beside
    /// `rope_parameters.partial_rotary_factor`).
    fn get(&self, key: &str) -> Option<&Value> {
        let nested = |nest: &str| {
            self.obj
                .get(nest)
                .and_then(|o| o.get(key))
                .filter(|v| !v.is_null())
        };
        if ROPE_KEYS.contains(&key) {
            if let Some(v) = nested("rope_parameters") {
                return Some(v);
            }
        }
        if let Some(v) = self.obj.get(key).filter(|v| !v.is_null()) {
            return Some(v);
        }
        ["rope_parameters", "rope_scaling"]
            .into_iter()
            .find_map(nested)
    }

    /// The first of `keys` that is present.
    fn first<'k>(&self, keys: &[&'k str]) -> Option<&'k str> {
        keys.iter().copied().find(|k| self.get(k).is_some())
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>, RuntimeError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => check_cap(key, n).map(Some).map_err(|m| self.bad(key, m)),
                None => Err(self.bad(key, format!("expected a non-negative integer, found {v}"))),
            },
        }
    }

    /// [`Self::usize_opt`] of the first of `keys` present.
    pub fn usize_opt_any(&self, keys: &[&str]) -> Result<Option<usize>, RuntimeError> {
        match self.first(keys) {
            Some(k) => self.usize_opt(k),
            None => Ok(None),
        }
    }

    pub fn usize_req(&self, key: &str) -> Result<usize, RuntimeError> {
        self.usize_opt(key)?.ok_or_else(|| self.missing(&[key]))
    }

    pub fn positive(&self, key: &str) -> Result<usize, RuntimeError> {
        self.positive_any(&[key])
    }

    /// A positive integer under the first of `keys` present; the error
    /// for none of them names them all.
    pub fn positive_any(&self, keys: &[&str]) -> Result<usize, RuntimeError> {
        let k = self.first(keys).ok_or_else(|| self.missing(keys))?;
        let n = self.usize_req(k)?;
        if n == 0 {
            return Err(self.bad(k, "must be positive"));
        }
        Ok(n)
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>, RuntimeError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("expected a number, found {v}"))),
        }
    }

    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>, RuntimeError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("expected true or false, found {v}"))),
        }
    }

    pub fn str_opt(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }

    /// A list of layer indices (`mlp_only_layers`); empty when absent.
    pub fn indices(&self, key: &str) -> Result<Vec<usize>, RuntimeError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| self.bad(key, "expected layer indices"))
                })
                .collect(),
            Some(_) => Err(self.bad(key, "expected an array of layer indices")),
        }
    }

    pub fn ids(&self, key: &str) -> Result<Vec<u32>, RuntimeError> {
        let one = |v: &Value| -> Result<u32, RuntimeError> {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.bad(key, format!("expected a token id, found {v}")))
        };
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    /// The family's `model_type`, else the first of `architectures` (a
    /// class name such as `MixtralForCausalLM`).
    pub fn model_type(&self) -> Result<&str, RuntimeError> {
        if let Some(v) = self.obj.get("model_type").filter(|v| !v.is_null()) {
            return v
                .as_str()
                .ok_or_else(|| self.bad("model_type", "expected a string"));
        }
        if let Some(Value::Array(a)) = self.obj.get("architectures") {
            if let Some(s) = a.first().and_then(|v| v.as_str()) {
                return Ok(s);
            }
        }
        Err(self.missing(&["model_type", "architectures"]))
    }

    /// The rope scaling the config asks for. Families that implement only
    /// the default rope call [`Self::default_rope_only`] instead.
    pub fn rope_scaling(&self, max_position: usize) -> Result<RopeScaling, RuntimeError> {
        match self.str_opt("rope_type").or_else(|| self.str_opt("type")) {
            None | Some("default") => Ok(RopeScaling::None),
            Some("yarn") => {
                let factor = self
                    .f64_opt("factor")?
                    .ok_or_else(|| self.missing(&["rope_parameters.factor"]))?;
                if factor < 1.0 {
                    return Err(self.bad("rope_parameters.factor", "must be at least 1"));
                }
                Ok(RopeScaling::Yarn(super::rope::Yarn {
                    factor,
                    original_max_position: self
                        .usize_opt("original_max_position_embeddings")?
                        .unwrap_or(max_position),
                    beta_fast: self.f64_opt("beta_fast")?.unwrap_or(32.0),
                    beta_slow: self.f64_opt("beta_slow")?.unwrap_or(1.0),
                    mscale: self.f64_opt("mscale")?,
                    mscale_all_dim: self.f64_opt("mscale_all_dim")?,
                    attention_factor: self.f64_opt("attention_factor")?,
                    truncate: self.bool_opt("truncate")?.unwrap_or(true),
                }))
            }
            Some(t) => Err(self.bad(
                "rope_parameters.rope_type",
                format!("rope type `{t}` is not supported (only default and yarn)"),
            )),
        }
    }

    /// Refuses scaled rope types this family does not implement.
    pub fn default_rope_only(&self) -> Result<(), RuntimeError> {
        match self.str_opt("rope_type").or_else(|| self.str_opt("type")) {
            None | Some("default") => Ok(()),
            Some(t) => Err(self.bad(
                "rope_parameters.rope_type",
                format!("rope type `{t}` is not supported (only the default rope)"),
            )),
        }
    }

    /// `hidden_act` must be silu (the only activation the experts implement).
    pub fn silu_only(&self) -> Result<(), RuntimeError> {
        match self.obj.get("hidden_act") {
            None => Ok(()),
            Some(v) if v.as_str() == Some("silu") => Ok(()),
            Some(v) => Err(self.bad(
                "hidden_act",
                format!("activation {v} is not supported (only silu)"),
            )),
        }
    }

    /// `num_key_value_heads` (default: `heads`), which must divide `heads`.
    pub fn kv_heads(&self, heads: usize) -> Result<usize, RuntimeError> {
        let kv = self.usize_opt("num_key_value_heads")?.unwrap_or(heads);
        if kv == 0 || !heads.is_multiple_of(kv) {
            return Err(self.bad(
                "num_key_value_heads",
                format!("{kv} does not divide num_attention_heads = {heads}"),
            ));
        }
        Ok(kv)
    }

    /// The rotated width of each head: `partial_rotary_factor` (default
    /// `default`) of `head_dim`, which must come out even and non-zero.
    pub fn rotary_dim(&self, head_dim: usize, default: f64) -> Result<usize, RuntimeError> {
        let prf = self.f64_opt("partial_rotary_factor")?.unwrap_or(default);
        let rotary_dim = (head_dim as f64 * prf) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(self.bad(
                "partial_rotary_factor",
                format!(
                    "{prf} x head_dim {head_dim} must give an even rotary width in 2..={head_dim}"
                ),
            ));
        }
        Ok(rotary_dim)
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

    /// The `quantization` (or `quantization_config`) object of an MLX
    /// checkpoint's config, if any; only MLX affine is accepted.
    pub fn from_cfg(c: &JsonCfg) -> Result<Option<QuantConfig>, RuntimeError> {
        let Some((key, v)) = ["quantization", "quantization_config"]
            .into_iter()
            .find_map(|k| c.obj.get(k).filter(|v| !v.is_null()).map(|v| (k, v)))
        else {
            return Ok(None);
        };
        let o = v
            .as_object()
            .ok_or_else(|| c.bad(key, "expected an object"))?;
        if let Some(mode) = o.get("mode").and_then(|m| m.as_str()) {
            if mode != "affine" {
                return Err(c.bad(
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
                _ => Err(c.bad(
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
}
