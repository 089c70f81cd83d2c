//! Models: the [`Model`] trait the generation loop drives, loading from any
//! supported checkpoint, and the four MoE families (one file each; the
//! shared decoder arithmetic is in `decoder.rs`).

pub mod attention;
pub mod decoder;
pub mod deepseek_v3;
pub mod family;
pub mod glm4_moe;
pub mod kv_cache;
pub mod layerwise;
pub mod mixtral;
pub mod moe;
pub mod olmoe;
pub mod qwen2_moe;
pub mod qwen3_moe;
pub mod qwen3_next;
pub mod rope;
pub mod sigmoid_moe;
pub mod working;

pub use decoder::{FamilySpec, Ffn, LayerWeights, Transformer};
pub use kv_cache::{KvBits, LayerKv};
pub use moe::{
    ExpertMats, ExpertProvider, ExpertWeights, ResidentExperts, RouterObserver, Routing,
};

use crate::cache::{CacheOptions, ExpertCache};
use crate::config::{Arch, ModelConfig};
use crate::error::RuntimeError;
use crate::weights::pack::PackSource;
use crate::weights::safetensors::SafetensorsSource;
use crate::weights::WeightSource;
use mfx_formats::pack::MAGIC;
use std::path::Path;
use std::sync::Arc;

/// What callers need to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `qwen3_moe`, `qwen2_moe`, `mixtral` or `olmoe`.
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub max_position_embeddings: usize,
    /// The context this instance accepts (`LoadOptions::max_context` or the config's).
    pub max_context: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
}

/// A causal LM with its own sequence state.
pub trait Model: Send {
    fn info(&self) -> &ModelInfo;
    /// Appends `tokens` to this model's sequence state (KV cache) and returns logits:
    /// all positions `[tokens.len() * vocab]` if `all_logits`, else only the last `[vocab]`.
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, RuntimeError>;
    fn seq_len(&self) -> usize;
    /// Keep only the first `len` positions of the state (prompt-prefix reuse).
    /// Returns false if this model cannot (then callers reset).
    fn truncate(&mut self, len: usize) -> bool;
    fn reset(&mut self);
    /// The streaming expert cache behind this model's routed experts, when
    /// it was loaded from a pack (for `--stats`, `/metrics`, `mfx bench`).
    fn expert_cache(&self) -> Option<Arc<ExpertCache>> {
        None
    }
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// KV cache storage precision (f16 unless asked otherwise).
    pub kv_bits: KvBits,
    /// Cap on positions (default: the config's `max_position_embeddings`).
    /// Also the context `--ram`'s working reserve covers (default
    /// [`crate::cache::RESERVED_CONTEXT_DEFAULT`]).
    pub max_context: Option<usize>,
    /// The largest prompt chunk the caller will run in one forward pass
    /// (default [`crate::generate::DEFAULT_PREFILL_CHUNK`]); sizes the
    /// activation part of the working reserve.
    pub prefill_chunk: Option<usize>,
    /// How a pack's routed experts are cached (ignored for checkpoint
    /// directories, whose experts stay mapped).
    pub cache: CacheOptions,
}

/// The family switches for a config (`None` for the families with their
/// own model type, which `ModelConfig::from_json_str` refuses anyway).
pub fn family_spec(cfg: &ModelConfig) -> Option<FamilySpec> {
    match cfg.arch {
        Arch::Qwen3Moe => Some(qwen3_moe::spec()),
        Arch::Qwen2Moe => Some(qwen2_moe::spec()),
        Arch::Mixtral => Some(mixtral::spec()),
        Arch::Olmoe => Some(olmoe::spec()),
        Arch::Glm4Moe | Arch::DeepseekV3 | Arch::Qwen3Next => None,
    }
}

/// Opens a checkpoint directory (Hugging Face or MLX layout) or an `.mfx`
/// pack: its config and a lazy source of its tensors (for a pack, routed
/// experts come from [`PackExperts`], not the source). Also accepts the path
/// of a checkpoint's `config.json`.
pub fn open(path: &Path) -> Result<(ModelConfig, Box<dyn WeightSource>), RuntimeError> {
    let dir = if path.is_file() && path.file_name().is_some_and(|n| n == "config.json") {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        path.to_path_buf()
    };
    if dir.is_file() && is_pack(&dir) {
        let src = PackSource::open(&dir)?;
        let cfg = ModelConfig::from_json_str(&src.pack().manifest().config.to_string(), &dir)?;
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
    let cfg = ModelConfig::from_file(&cfg_path)?;
    let src = SafetensorsSource::open(&dir)?;
    Ok((cfg, Box::new(src)))
}

/// Whether `path` is an `.mfx` pack (by its magic bytes, so a renamed pack still loads).
pub fn is_pack(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 8];
    let n = MAGIC.len().min(8);
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic[..n]))
        .is_ok()
        && magic[..n] == MAGIC[..n]
}

/// Loads a model from a checkpoint directory (HF or MLX) or a `.mfx` pack.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Box<dyn Model>, RuntimeError> {
    // Families with their own model type (not a FamilySpec of the shared
    // decoder), from a checkpoint directory or a pack's embedded config.
    if let Some(m) = family::load_own_type(path, opts)? {
        return Ok(m);
    }
    Ok(Box::new(MoeModel::load(path, opts)?))
}

/// The one [`Model`] implementation: the shared decoder over any family,
/// with all non-expert weights resident and routed experts from a provider.
pub struct MoeModel {
    info: ModelInfo,
    tf: Transformer,
    layers: Vec<LayerWeights>,
    experts: Arc<dyn ExpertProvider>,
    cache: Option<Arc<ExpertCache>>,
    kv: Vec<LayerKv>,
}

impl MoeModel {
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self, RuntimeError> {
        if path.is_file() && is_pack(path) {
            let src = PackSource::open(path)?;
            let cfg = ModelConfig::from_json_str(&src.pack().manifest().config.to_string(), path)?;
            family::check_layers_present(cfg.num_hidden_layers, &src, path)?;
            crate::cache::check_expert_shapes(
                src.pack(),
                cfg.hidden_size,
                cfg.moe_intermediate_size,
            )?;
            let shape = working::decoder(&cfg, opts.kv_bits);
            let opts = &working::budgeted(opts, cfg.max_position_embeddings);
            let copts = working::cache_options(&shape, cfg.max_position_embeddings, opts);
            let cache = crate::cache::provider_for_open_pack(
                Arc::clone(src.pack()),
                &copts,
                cfg.num_hidden_layers,
            )?;
            let provider: Arc<dyn ExpertProvider> = cache.clone();
            // Dense tensors read into owned memory, not viewed in the map:
            // a pack truncated while running must not SIGBUS (cache::dense).
            let dense = PackSource::reading(Arc::clone(src.pack()), opts.cache.verify);
            let mut m = Self::from_source(&cfg, &dense, opts, Some(provider))?;
            m.cache = Some(cache);
            return Ok(m);
        }
        let (cfg, src) = open(path)?;
        let shape = working::decoder(&cfg, opts.kv_bits);
        let opts = &working::check_resident(path, &shape, cfg.max_position_embeddings, opts)?;
        Self::from_source(&cfg, src.as_ref(), opts, None)
    }

    /// Builds a model from an opened source. `experts`: a provider to use
    /// instead of holding every expert of `src` resident (the streaming cache).
    pub fn from_source(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        opts: &LoadOptions,
        experts: Option<Arc<dyn ExpertProvider>>,
    ) -> Result<Self, RuntimeError> {
        family::check_layers_present(cfg.num_hidden_layers, src, &cfg.path)?;
        let tf = Transformer::load(cfg, src)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| tf.load_layer(src, l))
            .collect::<Result<Vec<_>, _>>()?;
        let experts = match experts {
            Some(p) => p,
            None => {
                let mut r = ResidentExperts::new(cfg.num_hidden_layers);
                for l in 0..cfg.num_hidden_layers {
                    r.insert_layer(l, tf.load_layer_experts(src, l)?);
                }
                Arc::new(r)
            }
        };
        let max_context = opts.max_context.unwrap_or(cfg.max_position_embeddings);
        let info = ModelInfo {
            arch: cfg.arch.name().to_string(),
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            n_layers: cfg.num_hidden_layers,
            max_position_embeddings: cfg.max_position_embeddings,
            max_context,
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg.eos_token_ids.clone(),
            num_experts: cfg.num_experts,
            num_experts_per_tok: cfg.num_experts_per_tok,
        };
        let kv = (0..cfg.num_hidden_layers)
            .map(|_| tf.new_kv(opts.kv_bits))
            .collect();
        Ok(MoeModel {
            info,
            tf,
            layers,
            experts,
            cache: None,
            kv,
        })
    }

    pub fn transformer(&self) -> &Transformer {
        &self.tf
    }

    /// [`Model::forward`] that also reports every routing decision.
    pub fn forward_observed(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
        mut observer: Option<&mut (dyn RouterObserver + '_)>,
    ) -> Result<Vec<f32>, RuntimeError> {
        let needed = self.seq_len() + tokens.len();
        if needed > self.info.max_context {
            return Err(RuntimeError::ContextFull {
                needed,
                max: self.info.max_context,
            });
        }
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let mut hidden = self.tf.embed(tokens)?;
        for (l, kv) in self.kv.iter_mut().enumerate() {
            let obs = observer.as_deref_mut();
            let (lw, next) = (&self.layers[l], self.layers.get(l + 1));
            if let Err(e) =
                self.tf
                    .layer_forward_next(lw, next, self.experts.as_ref(), &mut hidden, kv, obs)
            {
                // Keep the layers' caches consistent: drop this call's positions.
                let keep = needed - tokens.len();
                for kv in self.kv.iter_mut() {
                    kv.truncate(keep);
                }
                return Err(e);
            }
        }
        Ok(self.tf.final_logits(&hidden, all_logits))
    }

    /// Bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.iter().map(|k| k.bytes()).sum()
    }
}

impl Model for MoeModel {
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

    fn expert_cache(&self) -> Option<Arc<ExpertCache>> {
        self.cache.clone()
    }
}
