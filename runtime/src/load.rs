//! The one loader: resolve MODEL once (a checkpoint directory, its
//! `config.json`, or an `.mfx` pack recognized by its magic bytes), open a
//! pack once, parse its config with the registry's family, and build the
//! model with its experts resident (checkpoint) or behind the budgeted
//! expert cache (pack). `Generator`, `mfx eval`/`bench` and the tests all
//! come through here.
//!
//! ```ignore
//! let m = load::resolve(path)?;          // opens the pack, parses config.json
//! let tokenizer = m.pack().map(|p| &p.manifest().tokenizer_json);
//! let model = m.load(&opts)?;            // Box<dyn Model>
//! ```

use crate::cache::ExpertCache;
use crate::error::RuntimeError;
use crate::experts::ExpertProvider;
use crate::models::decoder::{Decoder, ModelConfig};
use crate::models::family::{check_layers_present, Family, FamilyConfig};
use crate::models::stack::FamilyModel;
use crate::models::{working, LoadOptions, Model};
use crate::weights::pack::PackSource;
use crate::weights::safetensors::SafetensorsSource;
use crate::weights::WeightSource;
use mfx_formats::pack::{Pack, MAGIC};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::models::DEFAULT_PREFILL_CHUNK;

/// Whether `path` is an `.mfx` pack (by its magic bytes, so a renamed pack still loads).
pub fn is_pack(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 8];
    let n = MAGIC.len().min(8);
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic[..n]))
            .is_ok()
        && magic[..n] == MAGIC[..n]
}

/// Where a resolved model's tensors are.
pub enum Origin {
    /// A checkpoint directory (Hugging Face or MLX layout).
    Dir(PathBuf),
    /// An opened pack (tensors, experts, tokenizer and templates in one file).
    Pack(PackSource),
}

/// A resolved MODEL: its config, parsed by its family, and where its
/// tensors are.
pub struct Resolved {
    pub path: PathBuf,
    pub config: FamilyConfig,
    pub origin: Origin,
}

/// Resolves `path` (a checkpoint directory, its `config.json`, or a pack),
/// opening a pack and parsing the config exactly once.
pub fn resolve(path: &Path) -> Result<Resolved, RuntimeError> {
    let dir = if path.is_file() && path.file_name().is_some_and(|n| n == "config.json") {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        path.to_path_buf()
    };
    if is_pack(&dir) {
        let src = PackSource::open(&dir)?;
        let config = FamilyConfig::from_json_str(&src.pack().manifest().config.to_string(), &dir)?;
        return Ok(Resolved {
            path: dir,
            config,
            origin: Origin::Pack(src),
        });
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
    Ok(Resolved {
        config: FamilyConfig::from_file(&cfg_path)?,
        path: dir.clone(),
        origin: Origin::Dir(dir),
    })
}

/// A model's tensors and routed experts, ready to build any family over.
struct Parts {
    src: Box<dyn WeightSource>,
    opts: LoadOptions,
    experts: Option<Arc<dyn ExpertProvider>>,
    cache: Option<Arc<ExpertCache>>,
}

impl Resolved {
    /// The pack, when MODEL is one.
    pub fn pack(&self) -> Option<&Arc<Pack>> {
        match &self.origin {
            Origin::Pack(src) => Some(src.pack()),
            Origin::Dir(_) => None,
        }
    }

    /// A lazy source of the model's tensors (a pack's mapped in place; for
    /// a pack, routed experts are not among them).
    pub fn weights(&self) -> Result<Box<dyn WeightSource>, RuntimeError> {
        Ok(match &self.origin {
            Origin::Pack(src) => Box::new(src.clone()),
            Origin::Dir(dir) => Box::new(SafetensorsSource::open(dir)?),
        })
    }

    /// The tensors, the budgeted options and, for a pack, the expert cache
    /// sized for this family's working set.
    fn parts(&self, opts: &LoadOptions) -> Result<Parts, RuntimeError> {
        let cfg = &self.config;
        let shape = cfg.working_shape(opts.kv_bits);
        let max_pos = cfg.max_position_embeddings();
        match &self.origin {
            Origin::Pack(src) => {
                check_layers_present(cfg.num_hidden_layers(), src, &self.path)?;
                crate::cache::check_expert_shapes(
                    src.pack(),
                    cfg.hidden_size(),
                    cfg.moe_intermediate_size(),
                )?;
                let opts = working::budgeted(opts, max_pos);
                let copts = working::cache_options(&shape, max_pos, &opts);
                let cache = crate::cache::provider_for_open_pack(
                    Arc::clone(src.pack()),
                    &copts,
                    cfg.num_hidden_layers(),
                )?;
                // Dense tensors read into owned memory, not viewed in the
                // map: a pack truncated while running must be an error, not
                // a SIGBUS (cache::dense).
                let dense = PackSource::reading(Arc::clone(src.pack()), opts.cache.verify);
                Ok(Parts {
                    src: Box::new(dense),
                    experts: Some(cache.clone() as Arc<dyn ExpertProvider>),
                    cache: Some(cache),
                    opts,
                })
            }
            Origin::Dir(dir) => {
                let opts = working::check_resident(dir, &shape, max_pos, opts)?;
                Ok(Parts {
                    src: Box::new(SafetensorsSource::open(dir)?),
                    opts,
                    experts: None,
                    cache: None,
                })
            }
        }
    }

    /// The model, of whatever family its config names.
    pub fn load(&self, opts: &LoadOptions) -> Result<Box<dyn Model>, RuntimeError> {
        let p = self.parts(opts)?;
        self.config
            .build(p.src.as_ref(), &p.opts, p.experts, p.cache)
    }

    /// The model as its concrete family type `F` (for callers that need
    /// more than [`Model`], e.g. `forward_observed`); an error if the
    /// config is another family.
    pub fn load_as<F: Family>(&self, opts: &LoadOptions) -> Result<FamilyModel<F>, RuntimeError> {
        let family = self.config.downcast::<F>().ok_or_else(|| {
            RuntimeError::Other(format!(
                "{}: a {} model, not the family asked for",
                self.path.display(),
                self.config.arch()
            ))
        })?;
        let p = self.parts(opts)?;
        let mut m = FamilyModel::build(family.clone(), p.src.as_ref(), &p.opts, p.experts)?;
        m.set_cache(p.cache);
        Ok(m)
    }
}

/// Loads a model from a checkpoint directory (HF or MLX) or a `.mfx` pack.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Box<dyn Model>, RuntimeError> {
    resolve(path)?.load(opts)
}

/// Opens a shared-decoder checkpoint directory (or its `config.json`) or
/// pack: its config and a lazy source of its tensors (for a pack, routed
/// experts are not among them). Any family: [`resolve`].
pub fn open(path: &Path) -> Result<(ModelConfig, Box<dyn WeightSource>), RuntimeError> {
    let r = resolve(path)?;
    let cfg = r
        .config
        .downcast::<Decoder>()
        .map(|d| d.cfg.clone())
        .ok_or_else(|| {
            RuntimeError::Other(format!(
                "{}: `{}` does not run on the shared decoder (use load::resolve)",
                r.path.display(),
                r.config.arch()
            ))
        })?;
    Ok((cfg, r.weights()?))
}

impl FamilyModel<Decoder> {
    /// Loads a shared-decoder model (`MoeModel`) from a checkpoint
    /// directory or pack.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self, RuntimeError> {
        resolve(path)?.load_as::<Decoder>(opts)
    }
}
