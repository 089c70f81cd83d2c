//! Safetensors checkpoints: a single `model.safetensors`, or shards listed in
//! `model.safetensors.index.json` (the hub layout). All shards are mapped at
//! open and their headers parsed (validated by the `safetensors` crate: header
//! size cap, offsets inside the file, no holes); tensor bytes are only touched
//! when a layer asks for them. The names are the text model's
//! ([`super::hub_layout`]: multimodal prefixes, fused experts).

use super::mmap::map_file;
use super::{Blob, DType, RawTensor, WeightSource};
use crate::error::RuntimeError;
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One tensor: its shard, dtype, shape and byte range in the shard's map.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) shard: usize,
    pub(super) dtype: DType,
    pub(super) shape: Vec<usize>,
    pub(super) start: usize,
    pub(super) len: usize,
}

/// Named tensors of a safetensors checkpoint directory, zero-copy.
pub struct SafetensorsSource {
    dir: PathBuf,
    shards: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: HashMap<String, Entry>,
}

pub const INDEX_FILE: &str = "model.safetensors.index.json";

fn map_dtype(d: safetensors::Dtype) -> DType {
    match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::Bf16,
        safetensors::Dtype::U32 => DType::U32,
        safetensors::Dtype::U8 => DType::U8,
        _ => DType::Other,
    }
}

impl SafetensorsSource {
    /// Total bytes of the mapped shard files (for throughput reports).
    pub fn input_bytes(&self) -> u64 {
        self.shards.iter().map(|(_, m)| m.len() as u64).sum()
    }

    /// Tells the kernel the shards' pages may go, so a memory-limited prep
    /// that walks a checkpoint layer by layer does not keep all of it in its
    /// page-cache share.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        for (_, m) in &self.shards {
            // SAFETY: the map is a read-only view of a file we never write;
            // after MADV_DONTNEED the kernel re-reads the same bytes from the
            // file on the next access, so no slice handed out can change.
            // Advisory only: on failure the kernel keeps the pages.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// Opens the checkpoint in `dir`: the index and its shards if an index
    /// exists, else `model.safetensors`, else every `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Self, RuntimeError> {
        let index = dir.join(INDEX_FILE);
        let mut expected: BTreeMap<String, String> = BTreeMap::new();
        let files: Vec<String> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| RuntimeError::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| RuntimeError::Json {
                    path: index.clone(),
                    source: e,
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| RuntimeError::MissingKey {
                    path: index.clone(),
                    key: "weight_map".into(),
                })?;
            let mut files = Vec::new();
            for (name, f) in map {
                let f = f.as_str().ok_or_else(|| RuntimeError::BadKey {
                    path: index.clone(),
                    key: format!("weight_map.{name}"),
                    msg: "expected a file name".into(),
                })?;
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(RuntimeError::BadKey {
                        path: index.clone(),
                        key: format!("weight_map.{name}"),
                        msg: format!("shard name {f:?} must be a plain file name in the checkpoint directory"),
                    });
                }
                if !files.iter().any(|x: &String| x == f) {
                    files.push(f.to_string());
                }
                expected.insert(name.clone(), f.to_string());
            }
            files.sort();
            files
        } else if dir.join("model.safetensors").is_file() {
            vec!["model.safetensors".into()]
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| RuntimeError::io(dir, e))?;
            let mut v: Vec<String> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            v.sort();
            if v.is_empty() {
                return Err(RuntimeError::NotAModel {
                    path: dir.to_path_buf(),
                });
            }
            v
        };

        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (si, f) in files.iter().enumerate() {
            let path = dir.join(f);
            let map = map_file(&path)?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
                RuntimeError::Safetensors {
                    path: path.clone(),
                    msg: match bad_tensor(&map) {
                        Some(t) => format!("{t} ({e})"),
                        None => e.to_string(),
                    },
                }
            })?;
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                tensors.insert(
                    name,
                    Entry {
                        shard: si,
                        dtype: map_dtype(info.dtype),
                        shape: info.shape.clone(),
                        start: base + a,
                        len: b - a,
                    },
                );
            }
            shards.push((path, map));
        }
        for (name, f) in &expected {
            let found = tensors
                .get(name)
                .map(|e| shards[e.shard].0.file_name() == Some(f.as_ref()));
            if found != Some(true) {
                return Err(RuntimeError::MissingTensor {
                    name: name.clone(),
                    location: dir.join(f).display().to_string(),
                });
            }
        }
        super::hub_layout::normalize(&mut tensors, |i| shards[i].0.display().to_string())?;
        Ok(SafetensorsSource {
            dir: dir.to_path_buf(),
            shards,
            tensors,
        })
    }
}

/// Which tensor of a safetensors header is at fault, for errors of the
/// `safetensors` crate that do not say ("invalid shape, data type, or offset
/// for tensor", an unknown dtype reported as a JSON position, an overflow):
/// `tensor `NAME`: what is wrong`. Only called once the crate has refused
/// the file, so it re-reads the header leniently and checks each entry.
fn bad_tensor(file: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?);
    let end = usize::try_from(n).ok()?.checked_add(8)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(file.get(8..end)?).ok()?;
    let data_len = (file.len() - end) as u64;
    for (name, v) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let bad = |what: String| Some(format!("tensor `{name}`: {what}"));
        let dtype: safetensors::Dtype = match v.get("dtype").cloned().map(serde_json::from_value) {
            Some(Ok(d)) => d,
            _ => {
                return bad(format!(
                    "unknown or missing dtype {}",
                    v.get("dtype").unwrap_or(&serde_json::Value::Null)
                ))
            }
        };
        let Some(shape) = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<u64>>>())
        else {
            return bad("`shape` is not a list of non-negative integers".into());
        };
        let Some([s, e]) = v
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<u64>>>())
            .and_then(|a| <[u64; 2]>::try_from(a).ok())
        else {
            return bad("`data_offsets` is not a pair of non-negative integers".into());
        };
        if e < s || e > data_len {
            return bad(format!(
                "data_offsets [{s}, {e}] outside the {data_len} data bytes"
            ));
        }
        let bits = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bitsize() as u64));
        match bits {
            None => return bad(format!("shape {shape:?} overflows")),
            Some(b) if b % 8 != 0 || b / 8 != e - s => {
                return bad(format!(
                    "shape {shape:?} of {dtype} needs {} bytes, data_offsets give {}",
                    b.div_ceil(8),
                    e - s
                ))
            }
            Some(_) => {}
        }
    }
    None
}

impl WeightSource for SafetensorsSource {
    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn location_of(&self, name: &str) -> String {
        match self.tensors.get(name) {
            Some(e) => self.shards[e.shard].0.display().to_string(),
            None => self.location(),
        }
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn raw(&self, name: &str) -> Result<Option<RawTensor>, RuntimeError> {
        let Some(e) = self.tensors.get(name) else {
            return Ok(None);
        };
        let map = self.shards[e.shard].1.clone();
        Ok(Some(RawTensor {
            dtype: e.dtype,
            shape: e.shape.clone(),
            data: Blob::mapped(map, e.start, e.len),
        }))
    }
}
