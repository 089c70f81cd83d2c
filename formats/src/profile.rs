//! The routing/pin profile: which experts a model actually uses, measured on
//! calibration text by `mfx prep`, embedded in every pack and reusable with
//! `mfx prep --profile FILE`. The schema is documented in docs/PROFILE.md.
//!
//! A profile is plain JSON so that people can read, diff and hand-edit one;
//! it is small (counts and top pairs, never dense `E x E` matrices) so that it
//! stays cheap for 512-expert models. Everything here validates on load: a
//! profile is input, and a profile for a different model must be refused
//! with a message that says which field disagrees.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Bumped only for changes an old reader would misread; new optional fields
/// do not bump it (serde ignores unknown fields and defaults missing ones).
pub const PROFILE_VERSION: u32 = 1;
/// The `schema` tag every profile carries, so a stray JSON file is not taken for one.
pub const PROFILE_SCHEMA: &str = "mfx.profile";
/// Hard caps so a hostile file cannot make us allocate absurd amounts.
const MAX_LAYERS: usize = 4096;
const MAX_EXPERTS: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub schema: String,
    pub version: u32,
    pub model: ModelIdentity,
    pub calibration: Calibration,
    /// How `pinned` was chosen (so a reader can tell a mass rule from a budget cut).
    pub pin_rule: PinRule,
    /// One entry per MoE layer, in layer order (dense layers are absent).
    pub layers: Vec<LayerProfile>,
}

/// Enough about the model to refuse a profile made for another one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// `model_type` from config.json, e.g. `qwen3_moe`.
    pub arch: String,
    pub num_layers: u32,
    pub num_experts: u32,
    pub top_k: u32,
    /// xxh3-64 (hex) of the routing-relevant config fields, see [`config_hash`].
    pub config_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Calibration {
    /// One entry per calibration source (built-in domain or `--calib` file).
    pub sources: Vec<CalibSource>,
    /// Total tokens pushed through the model (every position is routed).
    pub tokens: u64,
    /// How text became token rows, e.g. `rows=64x512 sep=<|endoftext|>`.
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibSource {
    pub name: String,
    pub tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinRule {
    /// Experts are taken by descending routing mass until this share of the
    /// layer's mass is covered (0..=1).
    pub mass_threshold: f64,
    /// At most this many pinned experts per layer (0 = no cap).
    pub max_per_layer: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerProfile {
    /// Index of this layer in the model (not in `layers`).
    pub layer: u32,
    /// `counts[e]`: tokens for which expert `e` was in the top-k.
    pub counts: Vec<u64>,
    /// `gate_mass[e]`: sum over tokens of `e`'s (renormalized) gate weight.
    pub gate_mass: Vec<f64>,
    /// Prefetch hints from the previous MoE layer: `coactivation[p]` lists up
    /// to N pairs `[e, n]` (descending `n`): `n` tokens routed to expert `p`
    /// in the previous MoE layer were routed to `e` here. Empty for the first
    /// MoE layer.
    #[serde(default)]
    pub coactivation: Vec<Vec<[u64; 2]>>,
    /// Pinned expert ids, descending routing mass.
    pub pinned: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("profile {path} is not valid profile JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("profile: {0}")]
    Invalid(String),
    #[error("profile was made for a different model: {field} is {found} in the profile but {expected} in the model")]
    Mismatch {
        field: &'static str,
        found: String,
        expected: String,
    },
}

impl Profile {
    /// Structural checks: schema tag, version, sizes, id ranges.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let bad = |m: String| Err(ProfileError::Invalid(m));
        if self.schema != PROFILE_SCHEMA {
            return bad(format!(
                "schema is {:?}, expected {PROFILE_SCHEMA:?}",
                self.schema
            ));
        }
        if self.version != PROFILE_VERSION {
            return bad(format!(
                "version {} is not supported (this build reads version {PROFILE_VERSION})",
                self.version
            ));
        }
        let m = &self.model;
        if m.num_layers as usize > MAX_LAYERS
            || m.num_experts as usize > MAX_EXPERTS
            || m.num_experts == 0
        {
            return bad(format!(
                "model.num_layers={} / num_experts={} out of range",
                m.num_layers, m.num_experts
            ));
        }
        if m.top_k == 0 || m.top_k > m.num_experts {
            return bad(format!(
                "model.top_k={} must be in 1..={}",
                m.top_k, m.num_experts
            ));
        }
        if !(0.0..=1.0).contains(&self.pin_rule.mass_threshold) {
            return bad(format!(
                "pin_rule.mass_threshold={} must be in [0, 1]",
                self.pin_rule.mass_threshold
            ));
        }
        let e = m.num_experts as usize;
        let mut prev_layer: Option<u32> = None;
        for (i, l) in self.layers.iter().enumerate() {
            if l.layer >= m.num_layers || prev_layer.is_some_and(|p| l.layer <= p) {
                return bad(format!(
                    "layers[{i}].layer={} is out of order or >= num_layers {}",
                    l.layer, m.num_layers
                ));
            }
            prev_layer = Some(l.layer);
            if l.counts.len() != e || l.gate_mass.len() != e {
                return bad(format!(
                    "layers[{i}] (layer {}): counts has {} and gate_mass {} entries, expected {e}",
                    l.layer,
                    l.counts.len(),
                    l.gate_mass.len()
                ));
            }
            if l.gate_mass.iter().any(|g| !g.is_finite() || *g < 0.0) {
                return bad(format!(
                    "layers[{i}] (layer {}): gate_mass has a negative or non-finite value",
                    l.layer
                ));
            }
            if !l.coactivation.is_empty() && l.coactivation.len() != e {
                return bad(format!(
                    "layers[{i}] (layer {}): coactivation has {} rows, expected 0 or {e}",
                    l.layer,
                    l.coactivation.len()
                ));
            }
            if l.coactivation.iter().flatten().any(|p| p[0] as usize >= e) {
                return bad(format!(
                    "layers[{i}] (layer {}): coactivation names an expert >= {e}",
                    l.layer
                ));
            }
            let mut seen = vec![false; e];
            for &p in &l.pinned {
                let p = p as usize;
                if p >= e || seen[p] {
                    return bad(format!(
                        "layers[{i}] (layer {}): pinned id {p} is out of range or repeated",
                        l.layer
                    ));
                }
                seen[p] = true;
            }
        }
        Ok(())
    }

    /// Refuses a profile whose model identity differs from `expected`.
    pub fn check_model(&self, expected: &ModelIdentity) -> Result<(), ProfileError> {
        let m = &self.model;
        let mism = |field, found: String, exp: String| {
            Err(ProfileError::Mismatch {
                field,
                found,
                expected: exp,
            })
        };
        if m.arch != expected.arch {
            return mism("model.arch", m.arch.clone(), expected.arch.clone());
        }
        if m.num_layers != expected.num_layers {
            return mism(
                "model.num_layers",
                m.num_layers.to_string(),
                expected.num_layers.to_string(),
            );
        }
        if m.num_experts != expected.num_experts {
            return mism(
                "model.num_experts",
                m.num_experts.to_string(),
                expected.num_experts.to_string(),
            );
        }
        if m.top_k != expected.top_k {
            return mism(
                "model.top_k",
                m.top_k.to_string(),
                expected.top_k.to_string(),
            );
        }
        if m.config_hash != expected.config_hash {
            return mism(
                "model.config_hash",
                m.config_hash.clone(),
                expected.config_hash.clone(),
            );
        }
        Ok(())
    }

    pub fn from_json(bytes: &[u8], path: &str) -> Result<Self, ProfileError> {
        let p: Profile = serde_json::from_slice(bytes).map_err(|source| ProfileError::Json {
            path: path.to_string(),
            source,
        })?;
        p.validate()?;
        Ok(p)
    }

    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let ps = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ProfileError::Io {
            path: ps.clone(),
            source,
        })?;
        Self::from_json(&bytes, &ps)
    }

    /// Pretty JSON with a trailing newline; deterministic (field order is fixed).
    pub fn to_json(&self) -> String {
        // Serializing plain structs of numbers and strings cannot fail.
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// The layer entry for model layer `layer`, if it is a profiled MoE layer.
    pub fn layer(&self, layer: u32) -> Option<&LayerProfile> {
        self.layers.iter().find(|l| l.layer == layer)
    }
}

/// Hash of the config fields that decide routing, so that a profile survives
/// cosmetic config edits (e.g. `transformers_version`) but not a different
/// model. Input: `(key, canonical JSON value)` pairs; missing keys hash as null.
/// A multimodal config's keys are read from its `text_config` where the top
/// level lacks them (Qwen3.5's hub checkpoints), so its text model's shape
/// is hashed.
pub fn config_hash(config: &serde_json::Value) -> String {
    const KEYS: [&str; 10] = [
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_experts",
        "num_local_experts",
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "vocab_size",
        "norm_topk_prob",
    ];
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for k in KEYS {
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(
            config
                .get(k)
                .or_else(|| config.get("text_config").and_then(|t| t.get(k)))
                .unwrap_or(&serde_json::Value::Null)
                .to_string()
                .as_bytes(),
        );
        h.update(b";");
    }
    format!("{:016x}", h.digest())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Profile {
        Profile {
            schema: PROFILE_SCHEMA.into(),
            version: PROFILE_VERSION,
            model: ModelIdentity {
                arch: "qwen3_moe".into(),
                num_layers: 2,
                num_experts: 4,
                top_k: 2,
                config_hash: "00".into(),
            },
            calibration: Calibration {
                sources: vec![CalibSource {
                    name: "x".into(),
                    tokens: 3,
                }],
                tokens: 3,
                protocol: "t".into(),
            },
            pin_rule: PinRule {
                mass_threshold: 0.5,
                max_per_layer: 0,
            },
            layers: vec![
                LayerProfile {
                    layer: 0,
                    counts: vec![3, 2, 1, 0],
                    gate_mass: vec![1.5, 1.0, 0.5, 0.0],
                    coactivation: vec![],
                    pinned: vec![0],
                },
                LayerProfile {
                    layer: 1,
                    counts: vec![0, 1, 2, 3],
                    gate_mass: vec![0.0, 0.5, 1.0, 1.5],
                    coactivation: vec![vec![[3, 2]], vec![], vec![], vec![]],
                    pinned: vec![3, 2],
                },
            ],
        }
    }

    #[test]
    fn json_roundtrip() {
        let p = sample();
        let back = Profile::from_json(p.to_json().as_bytes(), "mem").unwrap();
        assert_eq!(p, back);
    }

    #[test]
    fn rejects_bad_lengths_and_ids() {
        let mut p = sample();
        p.layers[1].counts.pop();
        let e = Profile::from_json(p.to_json().as_bytes(), "mem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 1") && e.contains("expected 4"), "{e}");
        let mut p = sample();
        p.layers[0].pinned = vec![0, 0];
        let e = Profile::from_json(p.to_json().as_bytes(), "mem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("repeated"), "{e}");
        let mut p = sample();
        p.version = 99;
        let e = Profile::from_json(p.to_json().as_bytes(), "mem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 99"), "{e}");
        let e = Profile::from_json(b"{\"a\":1}", "f.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.json"), "{e}");
    }

    #[test]
    fn model_mismatch_names_field() {
        let p = sample();
        let mut other = p.model.clone();
        other.num_experts = 8;
        let e = p.check_model(&other).unwrap_err().to_string();
        assert!(e.contains("model.num_experts") && e.contains('8'), "{e}");
    }

    #[test]
    fn config_hash_ignores_cosmetic_keys() {
        let a = serde_json::json!({"model_type": "qwen3_moe", "num_experts": 64, "transformers_version": "4"});
        let b = serde_json::json!({"model_type": "qwen3_moe", "num_experts": 64, "transformers_version": "5"});
        let c = serde_json::json!({"model_type": "qwen3_moe", "num_experts": 32});
        assert_eq!(config_hash(&a), config_hash(&b));
        assert_ne!(config_hash(&a), config_hash(&c));
    }

    #[test]
    fn config_hash_reads_a_multimodal_text_config() {
        let hub = |n: u32| {
            serde_json::json!({"model_type": "qwen3_5_moe",
                "text_config": {"num_experts": n, "hidden_size": 64}})
        };
        assert_ne!(config_hash(&hub(16)), config_hash(&hub(8)));
        assert_eq!(config_hash(&hub(16)), config_hash(&hub(16)));
    }
}
