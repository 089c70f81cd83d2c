//! The config.json fields prep needs, accepting both the hub spelling
//! (`rope_theta`, `num_experts`) and transformers 5's (`rope_parameters`,
//! `num_local_experts`).

use crate::error::{PrepError, Result};
use serde_json::Value;
use std::path::Path;

/// Families whose calibration forward prep implements (see `forward.rs`).
pub const PROFILED_ARCHS: [&str; 1] = ["qwen3_moe"];

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub raw: Value,
    pub model_type: String,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub top_k: usize,
    pub moe_inter: usize,
    pub inter: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_theta: f64,
    pub norm_topk_prob: bool,
    pub tie_embeddings: bool,
    /// Layers with a dense MLP instead of experts.
    pub dense_layers: Vec<usize>,
    /// `quantization` block of an MLX checkpoint: default (bits, group_size).
    pub mlx_quant: Option<(u8, usize)>,
}

impl ModelConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let bytes = std::fs::read(&path).map_err(|e| PrepError::BadFile {
            path: path.clone(),
            msg: format!("no readable config.json ({e}); MODEL must be a Hugging Face or MLX checkpoint directory"),
        })?;
        let raw: Value = serde_json::from_slice(&bytes).map_err(|e| PrepError::BadFile {
            path: path.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        Self::from_value(raw, dir)
    }

    pub fn from_value(raw: Value, dir: &Path) -> Result<Self> {
        let err = |msg: String| PrepError::Config {
            model: dir.to_path_buf(),
            msg,
        };
        let get_u = |keys: &[&str]| -> Option<usize> {
            keys.iter()
                .find_map(|k| raw.get(*k).and_then(Value::as_u64))
                .map(|v| v as usize)
        };
        let need = |keys: &[&str]| -> Result<usize> {
            get_u(keys).ok_or_else(|| err(format!("missing integer field {}", keys.join(" / "))))
        };
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| err("missing model_type".into()))?
            .to_string();
        let hidden = need(&["hidden_size"])?;
        let layers = need(&["num_hidden_layers"])?;
        let heads = need(&["num_attention_heads"])?;
        let kv_heads = get_u(&["num_key_value_heads"]).unwrap_or(heads);
        let head_dim = get_u(&["head_dim"]).unwrap_or(if heads > 0 { hidden / heads } else { 0 });
        let experts = need(&["num_experts", "num_local_experts", "n_routed_experts"])?;
        let top_k = need(&["num_experts_per_tok"])?;
        let moe_inter =
            get_u(&["moe_intermediate_size"]).unwrap_or(get_u(&["intermediate_size"]).unwrap_or(0));
        let inter = get_u(&["intermediate_size"]).unwrap_or(moe_inter);
        let vocab = need(&["vocab_size"])?;
        let rms_eps = raw
            .get("rms_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6) as f32;
        let rope_theta = raw
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                raw.get("rope_parameters")
                    .and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
        let norm_topk_prob = raw
            .get("norm_topk_prob")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let tie_embeddings = raw
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut dense_layers: Vec<usize> = raw
            .get("mlp_only_layers")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|v| v as usize)
                    .collect()
            })
            .unwrap_or_default();
        if let Some(k) = get_u(&["first_k_dense_replace"]) {
            dense_layers.extend(0..k.min(layers));
        }
        let step = get_u(&["decoder_sparse_step"]).unwrap_or(1).max(1);
        for l in 0..layers {
            if (l + 1) % step != 0 && !dense_layers.contains(&l) {
                dense_layers.push(l);
            }
        }
        dense_layers.sort_unstable();
        dense_layers.dedup();
        let mlx_quant = raw.get("quantization").map(|q| {
            let bits = q.get("bits").and_then(Value::as_u64).unwrap_or(4) as u8;
            let gs = q.get("group_size").and_then(Value::as_u64).unwrap_or(64) as usize;
            (bits, gs)
        });
        if hidden == 0 || layers == 0 || heads == 0 || experts == 0 || top_k == 0 || top_k > experts
        {
            return Err(err(format!(
                "implausible sizes: hidden_size={hidden} num_hidden_layers={layers} num_attention_heads={heads} experts={experts} num_experts_per_tok={top_k}"
            )));
        }
        if layers > 4096 || experts > 65536 || hidden > 1 << 20 {
            return Err(err("sizes beyond what mfx supports".into()));
        }
        Ok(Self {
            raw,
            model_type,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            experts,
            top_k,
            moe_inter,
            inter,
            vocab,
            rms_eps,
            rope_theta,
            norm_topk_prob,
            tie_embeddings,
            dense_layers,
            mlx_quant,
        })
    }

    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.layers)
            .filter(|l| !self.dense_layers.contains(l))
            .collect()
    }

    pub fn identity(&self) -> mfx_formats::profile::ModelIdentity {
        mfx_formats::profile::ModelIdentity {
            arch: self.model_type.clone(),
            num_layers: self.layers as u32,
            num_experts: self.experts as u32,
            top_k: self.top_k as u32,
            config_hash: mfx_formats::profile::config_hash(&self.raw),
        }
    }
}
