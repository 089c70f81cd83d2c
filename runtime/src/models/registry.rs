//! The one table from a config's `model_type` (or its `architectures`
//! class name) to the family that runs it. Adding a family is one file and
//! one line here (docs/ARCHITECTURE.md, "Adding a family"); the error for
//! an unknown `model_type` lists this table.

use super::decoder::FamilySpec;
use super::family::FamilyConfig;
use super::nn::config::JsonCfg;
use super::{
    deepseek_v3, deepseek_v32, glm4_moe, glm4_moe_lite, glm_moe_dsa, gpt_oss, minimax_m2, mixtral,
    olmoe, qwen2_moe, qwen3_5_moe, qwen3_moe, qwen3_next,
};
use crate::error::RuntimeError;

/// How a registered family is built from its config.
#[derive(Clone, Copy)]
pub enum Kind {
    /// A spec of the shared decoder (`super::decoder`).
    Decoder(fn() -> FamilySpec),
    /// A family with its own layer: parses its config into a [`FamilyConfig`].
    Own(fn(&JsonCfg) -> Result<FamilyConfig, RuntimeError>),
}

/// One registered family.
pub struct Entry {
    /// `model_type` in config.json.
    pub model_type: &'static str,
    /// The transformers class (`architectures[0]`), for configs without `model_type`.
    pub class: &'static str,
    pub kind: Kind,
}

const fn decoder(model_type: &'static str, class: &'static str, spec: fn() -> FamilySpec) -> Entry {
    Entry {
        model_type,
        class,
        kind: Kind::Decoder(spec),
    }
}

const fn own(
    model_type: &'static str,
    class: &'static str,
    parse: fn(&JsonCfg) -> Result<FamilyConfig, RuntimeError>,
) -> Entry {
    Entry {
        model_type,
        class,
        kind: Kind::Own(parse),
    }
}

/// Every family the runtime implements.
pub const FAMILIES: &[Entry] = &[
    decoder("qwen3_moe", "Qwen3MoeForCausalLM", qwen3_moe::spec),
    decoder("qwen2_moe", "Qwen2MoeForCausalLM", qwen2_moe::spec),
    decoder("mixtral", "MixtralForCausalLM", mixtral::spec),
    decoder("olmoe", "OlmoeForCausalLM", olmoe::spec),
    own("glm4_moe", "Glm4MoeForCausalLM", glm4_moe::parse),
    own("deepseek_v3", "DeepseekV3ForCausalLM", deepseek_v3::parse),
    own("qwen3_next", "Qwen3NextForCausalLM", qwen3_next::parse),
    own(
        "glm4_moe_lite",
        "Glm4MoeLiteForCausalLM",
        glm4_moe_lite::parse,
    ),
    own(
        "deepseek_v32",
        "DeepseekV32ForCausalLM",
        deepseek_v32::parse,
    ),
    own("glm_moe_dsa", "GlmMoeDsaForCausalLM", glm_moe_dsa::parse),
    own("gpt_oss", "GptOssForCausalLM", gpt_oss::parse),
    // The hub's multimodal checkpoints, and their text model alone.
    own(
        "qwen3_5_moe",
        "Qwen3_5MoeForConditionalGeneration",
        qwen3_5_moe::parse,
    ),
    own(
        "qwen3_5_moe_text",
        "Qwen3_5MoeForCausalLM",
        qwen3_5_moe::parse,
    ),
    own("minimax_m2", "MiniMaxM2ForCausalLM", minimax_m2::parse),
];

/// The registered `model_type`s, comma-separated (for messages).
pub fn names() -> String {
    FAMILIES
        .iter()
        .map(|e| e.model_type)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The entry for a config (`model_type`, else `architectures[0]`).
pub fn lookup(c: &JsonCfg) -> Result<&'static Entry, RuntimeError> {
    let t = c.model_type()?;
    FAMILIES
        .iter()
        .find(|e| e.model_type == t || e.class == t)
        .ok_or_else(|| RuntimeError::UnsupportedArch {
            path: c.path.clone(),
            arch: t.to_string(),
            supported: names(),
        })
}

/// Parses a config with its family.
pub fn parse(c: &JsonCfg) -> Result<FamilyConfig, RuntimeError> {
    match lookup(c)?.kind {
        Kind::Decoder(spec) => super::decoder::parse(c, spec()),
        Kind::Own(parse) => parse(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn every_fixture_config_routes_to_its_family() {
        let root = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures"
        ));
        for e in FAMILIES {
            // A text-only model type runs as its multimodal family; the
            // family's fixture folder is the text one, `_hub` the other.
            let (dir, arch) = match e.model_type {
                "qwen3_5_moe" => ("qwen3_5_moe_hub", "qwen3_5_moe"),
                "qwen3_5_moe_text" => ("qwen3_5_moe", "qwen3_5_moe"),
                t => (t, t),
            };
            let c = FamilyConfig::from_file(&root.join(dir).join("config.json")).unwrap();
            assert_eq!(c.arch(), arch);
            assert!(
                c.hidden_size() > 0 && c.moe_intermediate_size() > 0,
                "{}",
                e.model_type
            );
            let is_decoder = c.downcast::<super::super::decoder::Decoder>().is_some();
            assert_eq!(
                is_decoder,
                matches!(e.kind, Kind::Decoder(_)),
                "{}",
                e.model_type
            );
        }
    }

    #[test]
    fn unknown_family_lists_the_registry() {
        let c = JsonCfg::from_str(r#"{"model_type":"llama4_text"}"#, Path::new("c.json")).unwrap();
        let e = lookup(&c).err().unwrap().to_string();
        assert!(e.contains("unsupported architecture `llama4_text`"), "{e}");
        for f in FAMILIES {
            assert!(e.contains(f.model_type), "{e}");
        }
        let c = JsonCfg::from_str(
            r#"{"architectures":["MixtralForCausalLM"]}"#,
            Path::new("c.json"),
        )
        .unwrap();
        assert_eq!(lookup(&c).unwrap().model_type, "mixtral");
    }

    #[test]
    fn shared_decoder_config_refuses_own_type_families() {
        let e = super::super::decoder::ModelConfig::from_json_str(
            r#"{"model_type":"glm4_moe"}"#,
            Path::new("c.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("glm4_moe") && e.contains("FamilyConfig"), "{e}");
    }
}
