//! MODEL as prep sees it: where it lives (a local directory or the Hugging
//! Face cache) and the runtime's view of it. Config parsing, tensor reading
//! (bf16/f16/f32 safetensors, MLX affine triples, stacked `switch_mlp`
//! experts), which tensors are routed experts and the forward pass all come
//! from `mfx-runtime`; prep adds only the f32 copies it quantizes from.
//!
//! Shards are memory-mapped and tensors are converted one at a time, so the
//! resident set is one layer (plus page cache the kernel can drop), never
//! the checkpoint: that is what lets prep work on models larger than RAM.

use crate::error::{PrepError, Result};
use mfx_runtime::experts::ExpertBias;
use mfx_runtime::models::family::FamilyConfig;
use mfx_runtime::models::layerwise::Layerwise;
use mfx_runtime::models::{ExpertMats, ExpertProvider, ResidentExperts};
use mfx_runtime::weights::safetensors::SafetensorsSource;
use mfx_runtime::weights::{Blob, DType, Matrix};
use mfx_runtime::RuntimeError;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the Hugging Face hub cache is: `$HF_HUB_CACHE`, else `$HF_HOME/hub`,
/// else `~/.cache/huggingface/hub` (the order huggingface_hub uses).
pub fn hf_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("~"));
    home.join(".cache").join("huggingface").join("hub")
}

/// MODEL as a directory: a path that exists, or a hub id `ORG/NAME` found in
/// the local cache (the revision `refs/main` points to, else the only or
/// lexically last snapshot). The error says where we looked and how to download.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        return Err(PrepError::ModelNotFound(format!(
            "{spec} is a file; MODEL must be a checkpoint directory (with config.json and *.safetensors) or a hub id ORG/NAME"
        )));
    }
    let looks_like_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
    let cache = hf_cache_dir();
    if looks_like_id {
        let repo_dir = cache.join(format!("models--{}", spec.replace('/', "--")));
        let snaps = repo_dir.join("snapshots");
        let from_ref = std::fs::read_to_string(repo_dir.join("refs").join("main"))
            .ok()
            .map(|r| snaps.join(r.trim()))
            .filter(|d| d.is_dir());
        let chosen = from_ref.or_else(|| {
            let mut revs: Vec<PathBuf> = std::fs::read_dir(&snaps)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            revs.sort();
            revs.pop()
        });
        if let Some(d) = chosen {
            return Ok(d);
        }
        return Err(PrepError::ModelNotFound(format!(
            "model {spec} is not a local directory and is not in the Hugging Face cache: looked for {}/REV \
             (cache dir from $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub). \
             Download it with `huggingface-cli download {spec}` (or `hf download {spec}`), or pass a local directory.",
            snaps.display()
        )));
    }
    Err(PrepError::ModelNotFound(format!(
        "model directory {spec} does not exist (and it is not a hub id ORG/NAME to look up in {})",
        cache.display()
    )))
}

/// A row-major f32 matrix `[rows, cols]`: what prep quantizes and merges.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    /// The matrix's values as the runtime computes with them (quantized
    /// sources dequantized by the reference rule).
    pub fn of(m: &Matrix) -> Mat {
        let (rows, cols) = (m.rows(), m.cols());
        let mut data = vec![0f32; rows * cols];
        let v = m.mat();
        for (r, out) in data.chunks_exact_mut(cols.max(1)).enumerate() {
            v.row_f32(r, out);
        }
        Mat { rows, cols, data }
    }

    /// An f32 runtime matrix with these values (merged experts).
    pub fn to_matrix(&self) -> Result<Matrix> {
        let blob = Blob::copy_of(bytemuck::cast_slice(&self.data));
        Matrix::dense(DType::F32, self.rows, self.cols, blob).map_err(|msg| PrepError::Tensor {
            name: "merged expert".into(),
            msg,
        })
    }
}

/// One SwiGLU expert's three projections as f32.
#[derive(Debug)]
pub struct ExpertWeights {
    pub gate: Mat,
    pub up: Mat,
    pub down: Mat,
    /// The source matrices (gate, up, down) that are MXFP4 (gpt-oss's hub
    /// experts): the pack stores these bytes as they are
    /// (`quantize::as_is`) instead of requantizing `gate`/`up`/`down`.
    /// Zero-copy handles on the mapped checkpoint.
    pub mxfp4: [Option<Matrix>; 3],
    /// The expert's projection biases (gpt-oss), stored beside the
    /// projections in its pack blob.
    pub bias: Option<ExpertBias>,
}

impl ExpertWeights {
    pub fn of(m: &ExpertMats) -> Self {
        let keep = |x: &Matrix| matches!(x, Matrix::Mxfp4 { .. }).then(|| x.clone());
        ExpertWeights {
            gate: Mat::of(&m.gate),
            up: Mat::of(&m.up),
            down: Mat::of(&m.down),
            mxfp4: [keep(&m.gate), keep(&m.up), keep(&m.down)],
            bias: m.bias.clone(),
        }
    }

    pub fn to_mats(&self) -> Result<ExpertMats> {
        Ok(ExpertMats {
            gate: self.gate.to_matrix()?,
            up: self.up.to_matrix()?,
            down: self.down.to_matrix()?,
            bias: self.bias.clone(),
        })
    }
}

/// Runtime errors as prep reports them: an unknown architecture is an
/// unsupported model, everything else keeps the runtime's message (which
/// names the file, tensor or key).
pub fn from_runtime(e: RuntimeError) -> PrepError {
    match e {
        RuntimeError::UnsupportedArch { .. } => {
            PrepError::Unsupported(format!("{e}; mfx prep supports the same families"))
        }
        e => PrepError::Runtime(e),
    }
}

/// An opened checkpoint: its config, tensors and layer-by-layer model.
pub struct Source {
    pub dir: PathBuf,
    /// config.json as written (embedded in the pack, hashed into the profile).
    pub raw: Value,
    pub family: FamilyConfig,
    pub weights: SafetensorsSource,
    pub model: Box<dyn Layerwise>,
    routed: BTreeSet<String>,
}

impl Source {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| PrepError::BadFile {
            path: path.clone(),
            msg: format!("no readable config.json ({e}); MODEL must be a Hugging Face or MLX checkpoint directory"),
        })?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| PrepError::BadFile {
            path: path.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let family = FamilyConfig::from_json_str(&text, &path).map_err(from_runtime)?;
        let weights = SafetensorsSource::open(dir).map_err(from_runtime)?;
        let model = family.layerwise(&weights).map_err(from_runtime)?;
        let routed = model.routed_expert_tensors();
        Ok(Source {
            dir: dir.to_path_buf(),
            raw,
            family,
            weights,
            model,
            routed,
        })
    }

    pub fn arch(&self) -> &'static str {
        self.model.arch()
    }

    pub fn model_type(&self) -> &'static str {
        self.arch()
    }

    pub fn layers(&self) -> usize {
        self.model.n_layers()
    }

    pub fn experts(&self) -> usize {
        self.model.num_experts()
    }

    pub fn top_k(&self) -> usize {
        self.model.top_k()
    }

    pub fn hidden(&self) -> usize {
        self.model.hidden_size()
    }

    pub fn moe_inter(&self) -> usize {
        self.model.moe_intermediate_size()
    }

    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.layers())
            .filter(|&l| self.model.is_moe_layer(l))
            .collect()
    }

    /// Whether the source is an MLX-quantized checkpoint (requantized by prep).
    pub fn mlx_quantized(&self) -> bool {
        self.raw.get("quantization").is_some()
    }

    /// Whether `name` (a checkpoint tensor) belongs to a routed expert.
    pub fn is_expert_tensor(&self, name: &str) -> bool {
        self.routed.contains(name)
    }

    /// Routed expert `e` of layer `l` as f32.
    pub fn expert(&self, l: usize, e: usize) -> Result<Arc<ExpertWeights>> {
        let m = self
            .model
            .load_expert(&self.weights, l, e)
            .map_err(from_runtime)?;
        Ok(Arc::new(ExpertWeights::of(&m)))
    }

    pub fn input_bytes(&self) -> u64 {
        self.weights.input_bytes()
    }

    pub fn release_pages(&self) {
        self.weights.release_pages();
    }

    pub fn identity(&self) -> mfx_formats::profile::ModelIdentity {
        mfx_formats::profile::ModelIdentity {
            arch: self.model_type().to_string(),
            num_layers: self.layers() as u32,
            num_experts: self.experts() as u32,
            top_k: self.top_k() as u32,
            config_hash: mfx_formats::profile::config_hash(&self.raw),
        }
    }
}

/// Supplies one MoE layer's routed experts at a time (the layer being run):
/// the checkpoint's own, merged candidates, or a written pack's.
pub trait LayerExperts: Sync {
    fn layer(&self, l: usize) -> Result<Arc<dyn ExpertProvider>>;
}

/// The checkpoint's experts, as handles into its mapped shards.
pub struct SourceExperts<'a>(pub &'a Source);

impl LayerExperts for SourceExperts<'_> {
    fn layer(&self, l: usize) -> Result<Arc<dyn ExpertProvider>> {
        let s = self.0;
        let mut r = ResidentExperts::new(s.layers());
        r.insert_layer(
            l,
            s.model.layer_experts(&s.weights, l).map_err(from_runtime)?,
        );
        Ok(Arc::new(r))
    }
}
