//! One config type over all seven families, so that whatever holds a
//! `config.json` (a checkpoint directory, or the copy embedded in a `.mfx`
//! pack) routes to the right model: the four shared-decoder families are
//! described by [`ModelConfig`], the other three by their own structs.
//!
//! This is the dispatch `models::load` and prep both go through; neither
//! re-reads `model_type` itself.

use super::deepseek_v3::{DeepseekV3, DeepseekV3Config};
use super::glm4_moe::{Glm4Config, Glm4Moe};
use super::layerwise::Layerwise;
use super::qwen3_next::{Qwen3Next, Qwen3NextConfig};
use super::sigmoid_moe::JsonCfg;
use super::{is_pack, ExpertProvider, LoadOptions, Model, MoeModel, Transformer};
use crate::cache::ExpertCache;
use crate::config::{Arch, ModelConfig};
use crate::error::RuntimeError;
use crate::weights::pack::PackSource;
use crate::weights::safetensors::SafetensorsSource;
use crate::weights::WeightSource;
use std::path::Path;
use std::sync::Arc;

/// A parsed `config.json` of any supported family.
#[derive(Debug, Clone)]
pub enum FamilyConfig {
    /// qwen3_moe, qwen2_moe, mixtral, olmoe.
    Decoder(ModelConfig),
    Glm4(Glm4Config),
    Deepseek(DeepseekV3Config),
    Next(Qwen3NextConfig),
}

impl FamilyConfig {
    pub fn from_file(path: &Path) -> Result<Self, RuntimeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses config text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, RuntimeError> {
        let c = JsonCfg::from_str(text, path)?;
        Ok(match Arch::of_config(&c.obj, path)? {
            Arch::Glm4Moe => FamilyConfig::Glm4(Glm4Config::parse(&c)?),
            Arch::DeepseekV3 => FamilyConfig::Deepseek(DeepseekV3Config::parse(&c)?),
            Arch::Qwen3Next => FamilyConfig::Next(Qwen3NextConfig::parse(&c)?),
            _ => FamilyConfig::Decoder(ModelConfig::from_json_str(text, path)?),
        })
    }

    pub fn arch(&self) -> Arch {
        match self {
            FamilyConfig::Decoder(c) => c.arch,
            FamilyConfig::Glm4(_) => Arch::Glm4Moe,
            FamilyConfig::Deepseek(_) => Arch::DeepseekV3,
            FamilyConfig::Next(_) => Arch::Qwen3Next,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            FamilyConfig::Decoder(c) => c.hidden_size,
            FamilyConfig::Glm4(c) => c.hidden_size,
            FamilyConfig::Deepseek(c) => c.hidden_size,
            FamilyConfig::Next(c) => c.hidden_size,
        }
    }

    /// Width of one routed expert.
    pub fn moe_intermediate_size(&self) -> usize {
        match self {
            FamilyConfig::Decoder(c) => c.moe_intermediate_size,
            FamilyConfig::Glm4(c) => c.moe_intermediate_size,
            FamilyConfig::Deepseek(c) => c.ffn.moe_intermediate,
            FamilyConfig::Next(c) => c.moe_intermediate_size,
        }
    }

    pub fn max_position_embeddings(&self) -> usize {
        match self {
            FamilyConfig::Decoder(c) => c.max_position_embeddings,
            FamilyConfig::Glm4(c) => c.max_position_embeddings,
            FamilyConfig::Deepseek(c) => c.max_position_embeddings,
            FamilyConfig::Next(c) => c.max_position_embeddings,
        }
    }

    pub fn num_hidden_layers(&self) -> usize {
        match self {
            FamilyConfig::Decoder(c) => c.num_hidden_layers,
            FamilyConfig::Glm4(c) => c.num_hidden_layers,
            FamilyConfig::Deepseek(c) => c.num_hidden_layers,
            FamilyConfig::Next(c) => c.num_hidden_layers,
        }
    }

    /// The layer-by-layer view of this model over `src` (loads only what
    /// every layer shares: embeddings, final norm, lm_head).
    pub fn layerwise(&self, src: &dyn WeightSource) -> Result<Box<dyn Layerwise>, RuntimeError> {
        check_layers_present(self.num_hidden_layers(), src, Path::new(&src.location()))?;
        Ok(match self {
            FamilyConfig::Decoder(c) => Box::new(Transformer::load(c, src)?),
            FamilyConfig::Glm4(c) => Box::new(super::glm4_moe::Glm4Shared::load(c, src)?),
            FamilyConfig::Deepseek(c) => Box::new(super::deepseek_v3::DsShared::load(c, src)?),
            FamilyConfig::Next(c) => Box::new(super::qwen3_next::QnShared::load(c, src)?),
        })
    }

    /// A whole model over `src`; `experts` replaces holding every routed
    /// expert of `src` resident (a pack's experts, the streaming cache).
    pub fn build(
        &self,
        src: &dyn WeightSource,
        opts: &LoadOptions,
        experts: Option<Arc<dyn ExpertProvider>>,
    ) -> Result<Box<dyn Model>, RuntimeError> {
        check_layers_present(self.num_hidden_layers(), src, Path::new(&src.location()))?;
        Ok(match self {
            FamilyConfig::Decoder(c) => Box::new(MoeModel::from_source(c, src, opts, experts)?),
            FamilyConfig::Glm4(c) => Box::new(Glm4Moe::from_source(c, src, opts, experts)?),
            FamilyConfig::Deepseek(c) => Box::new(DeepseekV3::from_source(c, src, opts, experts)?),
            FamilyConfig::Next(c) => Box::new(Qwen3Next::from_source(c, src, opts, experts)?),
        })
    }
}

/// Opens a checkpoint directory (or its `config.json`) or an `.mfx` pack of
/// any family: its config and a lazy source of its tensors (for a pack,
/// routed experts come from [`PackExperts`], not the source).
pub fn open(path: &Path) -> Result<(FamilyConfig, Box<dyn WeightSource>), RuntimeError> {
    let dir = if path.is_file() && path.file_name().is_some_and(|n| n == "config.json") {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        path.to_path_buf()
    };
    if dir.is_file() && is_pack(&dir) {
        let src = PackSource::open(&dir)?;
        let cfg = pack_config(&src, &dir)?;
        return Ok((cfg, Box::new(src)));
    }
    if !dir.is_dir() {
        if !dir.exists() {
            return Err(RuntimeError::io(
                &dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        return Err(RuntimeError::NotAModel { path: dir });
    }
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(RuntimeError::NotAModel { path: dir });
    }
    let cfg = FamilyConfig::from_file(&cfg_path)?;
    Ok((cfg, Box::new(SafetensorsSource::open(&dir)?)))
}

/// Refuses a config declaring more layers than `src` holds tensors for,
/// before anything is allocated per layer (the expert cache's slots, KV
/// caches, layer vectors): `num_hidden_layers` is checked against the
/// weights actually present, not trusted. `config` names the file in the
/// error (a pack's embedded config: the pack).
pub fn check_layers_present(
    n_layers: usize,
    src: &dyn WeightSource,
    config: &Path,
) -> Result<(), RuntimeError> {
    let present = src
        .names()
        .iter()
        .filter_map(|n| layer_of(n))
        .max()
        .map_or(0, |l| l + 1);
    if n_layers > present {
        return Err(RuntimeError::BadKey {
            path: config.to_path_buf(),
            key: "num_hidden_layers".into(),
            msg: format!(
                "{n_layers} layers declared, but {} holds tensors for {present} (layers.0 .. layers.{})",
                src.location(),
                present.saturating_sub(1)
            ),
        });
    }
    Ok(())
}

/// The layer index of a tensor name (`model.layers.12.mlp...` -> 12).
fn layer_of(name: &str) -> Option<usize> {
    let rest = name
        .strip_prefix("layers.")
        .or_else(|| name.split_once(".layers.").map(|(_, r)| r))?;
    rest.split('.').next()?.parse().ok()
}

/// The family config embedded in a pack's manifest.
pub fn pack_config(src: &PackSource, path: &Path) -> Result<FamilyConfig, RuntimeError> {
    FamilyConfig::from_json_str(&src.pack().manifest().config.to_string(), path)
}

/// Loads a glm4_moe, deepseek_v3 or qwen3_next model from a checkpoint
/// directory or a pack; `None` for the shared-decoder families (and for
/// paths that are neither, so the caller reports them its own way).
pub fn load_own_type(
    path: &Path,
    opts: &LoadOptions,
) -> Result<Option<Box<dyn Model>>, RuntimeError> {
    if path.is_file() && is_pack(path) {
        let src = PackSource::open(path)?;
        let cfg = pack_config(&src, path)?;
        if cfg.arch().uses_shared_decoder() {
            return Ok(None);
        }
        check_layers_present(cfg.num_hidden_layers(), &src, path)?;
        // Same streaming path as the shared-decoder families: routed experts
        // behind the budgeted cache, dense tensors read into owned memory so
        // a pack truncated while running is an error, not a SIGBUS.
        crate::cache::check_expert_shapes(
            src.pack(),
            cfg.hidden_size(),
            cfg.moe_intermediate_size(),
        )?;
        let shape = super::working::family(&cfg, opts.kv_bits);
        let opts = &super::working::budgeted(opts, cfg.max_position_embeddings());
        let copts = super::working::cache_options(&shape, cfg.max_position_embeddings(), opts);
        let cache = crate::cache::provider_for_open_pack(
            Arc::clone(src.pack()),
            &copts,
            cfg.num_hidden_layers(),
        )?;
        let provider: Arc<dyn ExpertProvider> = cache.clone();
        let dense = PackSource::reading(Arc::clone(src.pack()), opts.cache.verify);
        let inner = cfg.build(&dense, opts, Some(provider))?;
        return Ok(Some(Box::new(Cached { inner, cache })));
    }
    let cfg_path = path.join("config.json");
    if !path.is_dir() || !cfg_path.is_file() {
        return Ok(None);
    }
    let cfg = FamilyConfig::from_file(&cfg_path)?;
    if cfg.arch().uses_shared_decoder() {
        return Ok(None);
    }
    let src = SafetensorsSource::open(path)?;
    let shape = super::working::family(&cfg, opts.kv_bits);
    let opts = &super::working::check_resident(path, &shape, cfg.max_position_embeddings(), opts)?;
    cfg.build(&src, opts, None).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixture_config_routes_to_its_family() {
        let root = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures"
        ));
        for (dir, arch, decoder) in [
            ("qwen3_moe", Arch::Qwen3Moe, true),
            ("qwen2_moe", Arch::Qwen2Moe, true),
            ("mixtral", Arch::Mixtral, true),
            ("olmoe", Arch::Olmoe, true),
            ("glm4_moe", Arch::Glm4Moe, false),
            ("deepseek_v3", Arch::DeepseekV3, false),
            ("qwen3_next", Arch::Qwen3Next, false),
        ] {
            let c = FamilyConfig::from_file(&root.join(dir).join("config.json")).unwrap();
            assert_eq!(c.arch(), arch, "{dir}");
            assert_eq!(matches!(c, FamilyConfig::Decoder(_)), decoder, "{dir}");
            assert!(
                c.hidden_size() > 0 && c.moe_intermediate_size() > 0,
                "{dir}"
            );
        }
    }

    #[test]
    fn shared_decoder_config_refuses_own_type_families() {
        let e = ModelConfig::from_json_str(r#"{"model_type":"glm4_moe"}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("glm4_moe") && e.contains("FamilyConfig"), "{e}");
    }
}

/// A family model whose routed experts stream through an [`ExpertCache`]:
/// the model itself only sees an `ExpertProvider`, so this wrapper is what
/// hands the cache to `--stats`, `/metrics` and `mfx bench`.
struct Cached {
    inner: Box<dyn Model>,
    cache: Arc<ExpertCache>,
}

impl Model for Cached {
    fn info(&self) -> &super::ModelInfo {
        self.inner.info()
    }
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, RuntimeError> {
        self.inner.forward(tokens, all_logits)
    }
    fn seq_len(&self) -> usize {
        self.inner.seq_len()
    }
    fn truncate(&mut self, len: usize) -> bool {
        self.inner.truncate(len)
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn expert_cache(&self) -> Option<Arc<ExpertCache>> {
        Some(Arc::clone(&self.cache))
    }
}
