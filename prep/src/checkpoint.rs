//! Reading a checkpoint: where MODEL lives (local dir or the Hugging Face
//! cache) and its tensors as f32, whatever their storage (bf16/f16/f32
//! safetensors, or MLX affine-quantized `weight`/`scales`/`biases` triples,
//! per-expert or stacked `switch_mlp`).
//!
//! Shards are memory-mapped and tensors are converted one at a time, so the
//! resident set is one tensor (plus page cache the kernel can drop), never
//! the checkpoint: that is what lets prep work on models larger than RAM.

use crate::config::ModelConfig;
use crate::error::{io_err, PrepError, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A row-major f32 matrix `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    shard_paths: Vec<PathBuf>,
    shards: Vec<Mmap>,
    tensors: BTreeMap<String, Entry>,
    input_bytes: u64,
    /// When set, `matrix` returns dense (non-expert) matrices as the pack
    /// will hold them: quantized at (dense bits, group) then dequantized, so
    /// prep can measure a pack's quality with its own forward pass.
    dense_sim: Option<(u8, u32)>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let config = ModelConfig::load(dir)?;
        let index = dir.join("model.safetensors.index.json");
        let mut files: Vec<String> = if index.is_file() {
            let bytes = std::fs::read(&index).map_err(io_err(&index))?;
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| PrepError::BadFile {
                    path: index.clone(),
                    msg: format!("not valid JSON: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| PrepError::BadFile {
                    path: index.clone(),
                    msg: "missing object weight_map".into(),
                })?;
            map.values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        } else if dir.join("model.safetensors").is_file() {
            vec!["model.safetensors".into()]
        } else {
            return Err(PrepError::BadFile {
                path: dir.to_path_buf(),
                msg: "no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)"
                    .into(),
            });
        };
        files.sort();
        files.dedup();
        let mut shards = Vec::new();
        let mut shard_paths = Vec::new();
        let mut tensors = BTreeMap::new();
        let mut input_bytes = 0u64;
        for (si, f) in files.iter().enumerate() {
            if f.contains("..") || f.starts_with('/') {
                return Err(PrepError::BadFile {
                    path: index.clone(),
                    msg: format!("shard name {f:?} escapes the model directory"),
                });
            }
            let path = dir.join(f);
            let file = std::fs::File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the checkpoint is read-only input; if another process
            // truncates it while we run we may get SIGBUS, as every mmap
            // reader of safetensors does. We never write through the map.
            let map = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            let (hlen, meta) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| PrepError::BadFile {
                    path: path.clone(),
                    msg: format!("not a valid safetensors file: {e}"),
                })?;
            input_bytes += map.len() as u64;
            for (name, info) in meta.tensors() {
                let start = 8 + hlen + info.data_offsets.0;
                let end = 8 + hlen + info.data_offsets.1;
                tensors.insert(
                    name,
                    Entry {
                        shard: si,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
            shards.push(map);
            shard_paths.push(path);
        }
        Ok(Self {
            dense_sim: None,
            dir: dir.to_path_buf(),
            config,
            shard_paths,
            shards,
            tensors,
            input_bytes,
        })
    }

    /// Total bytes of the safetensors shards (for throughput reports).
    pub fn input_bytes(&self) -> u64 {
        self.input_bytes
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| PrepError::Tensor {
            name: name.to_string(),
            msg: format!("not found in the checkpoint at {}", self.dir.display()),
        })
    }

    fn bytes(&self, e: &Entry) -> &[u8] {
        &self.shards[e.shard][e.start..e.end]
    }

    /// Tells the kernel we are done with a shard's pages so a memory-limited
    /// prep does not keep the whole checkpoint in its page cache share.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        for m in &self.shards {
            // SAFETY: the map is a read-only view of a file we never write;
            // after MADV_DONTNEED the kernel re-reads the same bytes from the
            // file on the next access, so no slice we hand out can change.
            // Advisory only; failure just means the kernel keeps the pages.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
        let _ = &self.shard_paths;
    }

    /// A float tensor (bf16/f16/f32) as f32, any shape, flattened.
    pub fn float_tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let e = self.entry(name)?;
        let b = self.bytes(e);
        let n: usize = e.shape.iter().product();
        let terr = |msg: String| PrepError::Tensor {
            name: name.to_string(),
            msg,
        };
        let out: Vec<f32> = match e.dtype {
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            d => {
                return Err(terr(format!(
                    "dtype {d:?} is not a float type (expected BF16, F16 or F32)"
                )))
            }
        };
        if out.len() != n {
            return Err(terr(format!(
                "byte length does not match shape {:?}",
                e.shape
            )));
        }
        Ok((e.shape.clone(), out))
    }

    /// A 1-D float tensor, checked against the expected length.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (shape, v) = self.float_tensor(name)?;
        if v.len() != len {
            return Err(PrepError::Tensor {
                name: name.into(),
                msg: format!("shape {shape:?}, expected [{len}]"),
            });
        }
        Ok(v)
    }

    /// The MLX quantization (bits, group_size) for `module`, if it is quantized.
    fn mlx_bits(&self, module: &str) -> Option<(u8, usize)> {
        let q = self.config.raw.get("quantization")?;
        if !self.has(&format!("{module}.scales")) {
            return None;
        }
        if let Some(o) = q.get(module) {
            let bits = o.get("bits").and_then(|b| b.as_u64()).map(|b| b as u8);
            let gs = o
                .get("group_size")
                .and_then(|b| b.as_u64())
                .map(|b| b as usize);
            if let (Some(b), Some(g)) = (bits, gs) {
                return Some((b, g));
            }
        }
        self.config.mlx_quant
    }

    /// The weight matrix of `module` (name without `.weight`) as f32, with
    /// MLX-quantized weights dequantized by the reference. `index` picks one
    /// slice of a stacked `[E, rows, cols]` tensor (MLX `switch_mlp`).
    pub fn matrix(&self, module: &str, index: Option<usize>) -> Result<Mat> {
        let m = self.matrix_source(module, index)?;
        match self.dense_sim {
            Some((bits, group)) if index.is_none() && !module.contains(".mlp.experts.") => {
                let bits = if module.ends_with(".mlp.gate") {
                    crate::quantize::ROUTER_BITS
                } else {
                    bits
                };
                match crate::quantize::group_for(m.cols, group) {
                    Some(g) => {
                        let s = crate::quantize::quantize_mat(
                            &m,
                            mfx_formats::quant::Scheme::affine(bits, g)?,
                            module,
                        )?;
                        Ok(crate::quantize::dequant(&s, m.rows, m.cols))
                    }
                    None => Ok(m),
                }
            }
            _ => Ok(m),
        }
    }

    /// Turns the dense-weight simulation on (`Some((bits, group))`) or off.
    pub fn set_dense_sim(&mut self, sim: Option<(u8, u32)>) {
        self.dense_sim = sim;
    }

    /// The matrix exactly as the checkpoint stores it (MLX dequantized).
    pub fn matrix_source(&self, module: &str, index: Option<usize>) -> Result<Mat> {
        let wname = format!("{module}.weight");
        let terr = |msg: String| PrepError::Tensor {
            name: wname.clone(),
            msg,
        };
        if let Some((bits, gs)) = self.mlx_bits(module) {
            let w = self.entry(&wname)?;
            let s = self.entry(&format!("{module}.scales"))?;
            let b = self.entry(&format!("{module}.biases"))?;
            if w.dtype != Dtype::U32 || s.dtype != Dtype::BF16 || b.dtype != Dtype::BF16 {
                return Err(terr(format!(
                    "MLX quantized weight expects U32 weight with BF16 scales/biases, found {:?}/{:?}/{:?}",
                    w.dtype, s.dtype, b.dtype
                )));
            }
            let (rows, words, slab) = match (index, w.shape.as_slice()) {
                (None, [r, c]) => (*r, *c, 0),
                (Some(i), [e, r, c]) if i < *e => (*r, *c, i),
                _ => {
                    return Err(terr(format!(
                        "unexpected shape {:?} for index {index:?}",
                        w.shape
                    )))
                }
            };
            let cols = words * 32 / bits as usize;
            let wb = rows * words * 4;
            let sb = rows * (cols / gs.max(1)) * 2;
            let wbytes = self
                .bytes(w)
                .get(slab * wb..(slab + 1) * wb)
                .ok_or_else(|| terr("truncated".into()))?;
            let sbytes = self
                .bytes(s)
                .get(slab * sb..(slab + 1) * sb)
                .ok_or_else(|| terr("scales truncated".into()))?;
            let bbytes = self
                .bytes(b)
                .get(slab * sb..(slab + 1) * sb)
                .ok_or_else(|| terr("biases truncated".into()))?;
            let scales: Vec<bf16> = sbytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                .collect();
            let biases: Vec<bf16> = bbytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                .collect();
            let m = mfx_formats::quant::AffineMatrix::new(
                rows, cols, bits, gs, wbytes, &scales, &biases,
            )
            .map_err(|e| terr(format!("MLX quantized layout: {e}")))?;
            return Ok(Mat {
                rows,
                cols,
                data: m.dequantize(),
            });
        }
        let (shape, data) = self.float_tensor(&wname)?;
        match (index, shape.as_slice()) {
            (None, [r, c]) => Ok(Mat {
                rows: *r,
                cols: *c,
                data,
            }),
            (Some(i), [e, r, c]) if i < *e => {
                let n = r * c;
                Ok(Mat {
                    rows: *r,
                    cols: *c,
                    data: data[i * n..(i + 1) * n].to_vec(),
                })
            }
            _ => Err(terr(format!("unexpected shape {shape:?} for a matrix"))),
        }
    }

    /// Whether experts are stored stacked (`mlp.switch_mlp.*`, MLX) rather
    /// than one tensor per expert (`mlp.experts.E.*`, Hugging Face).
    pub fn stacked_experts(&self, layer: usize) -> bool {
        self.has(&format!(
            "model.layers.{layer}.mlp.switch_mlp.gate_proj.weight"
        ))
    }

    /// One expert projection (`gate`, `up` or `down`) as f32.
    pub fn expert(&self, layer: usize, expert: usize, proj: &str) -> Result<Mat> {
        if self.stacked_experts(layer) {
            self.matrix(
                &format!("model.layers.{layer}.mlp.switch_mlp.{proj}_proj"),
                Some(expert),
            )
        } else {
            self.matrix(
                &format!("model.layers.{layer}.mlp.experts.{expert}.{proj}_proj"),
                None,
            )
        }
    }

    /// A matrix with a checked shape.
    pub fn matrix_shaped(&self, module: &str, rows: usize, cols: usize) -> Result<Mat> {
        let m = self.matrix(module, None)?;
        if m.rows != rows || m.cols != cols {
            return Err(PrepError::Tensor {
                name: format!("{module}.weight"),
                msg: format!("shape [{}, {}], expected [{rows}, {cols}]", m.rows, m.cols),
            });
        }
        Ok(m)
    }
}
