//! `.mfx` packs as a weight source (their routed experts as a provider
//! without a budget: [`crate::experts::PackExperts`]).
//!
//! Dense tensors are viewed in place in the pack's mapping (the format
//! aligns every part to 64 bytes). Experts are stored as one blob each,
//! possibly compressed: an uncompressed blob is viewed in place, a
//! compressed one is decoded on first use and kept. That keep-everything
//! policy is the simple default; the budgeted streaming cache replaces
//! [`PackExperts`] (see `crate::load`).

use super::{Blob, BlobOwner, DType, Matrix, RawTensor, WeightSource};
use crate::error::RuntimeError;
use mfx_formats::pack::Pack;
use mfx_formats::quant::Scheme;
use std::path::Path;
use std::sync::Arc;

/// Keeps a pack's mapping alive for as long as a [`Blob`] views it.
struct PackBytes(Arc<Pack>);

impl BlobOwner for PackBytes {
    fn bytes(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// Tensors of an opened pack (cheap to clone: the pack is shared).
#[derive(Clone)]
pub struct PackSource {
    pack: Arc<Pack>,
    /// Read tensors into owned memory instead of viewing the mapping
    /// (see `cache::dense` for why the streaming runtime wants that).
    read: bool,
    /// Check each tensor's (and, for [`PackExperts`], each expert's) xxh3
    /// against the manifest when it is first read, so a corrupt blob is an
    /// error naming it rather than silently wrong output.
    verify: bool,
}

pub(crate) fn pack_err(path: &Path, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Pack {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

impl PackSource {
    pub fn open(path: &Path) -> Result<Self, RuntimeError> {
        let pack = Pack::open(path).map_err(|e| pack_err(path, e))?;
        Ok(PackSource {
            pack: Arc::new(pack),
            read: false,
            verify: true,
        })
    }

    /// The same tensors, each read with `pread` into owned memory when the
    /// model asks for it, so nothing loaded from here touches the mapping.
    /// `verify`: check each tensor's checksum as it is read.
    pub fn reading(pack: Arc<Pack>, verify: bool) -> Self {
        PackSource {
            pack,
            read: true,
            verify,
        }
    }

    /// Whether blobs are checked against their checksums when read (the
    /// default; off only for `--no-verify-checksums`).
    pub fn with_verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    /// Fails naming `what` and the pack if `bytes` do not hash to `expected`.
    pub(crate) fn check(
        &self,
        what: &str,
        bytes: &[u8],
        expected: u64,
    ) -> Result<(), RuntimeError> {
        if !self.verify {
            return Ok(());
        }
        let found = xxhash_rust::xxh3::xxh3_64(bytes);
        if found != expected {
            return Err(pack_err(
                self.pack.path(),
                format!(
                    "{what}: checksum mismatch (manifest {expected:016x}, read {found:016x}): the pack is corrupt or changed on disk (`mfx verify` checks it whole)"
                ),
            ));
        }
        Ok(())
    }

    /// A dense tensor's stored bytes, checked against its checksum.
    fn tensor_blob(&self, e: &mfx_formats::TensorEntry) -> Result<Blob, RuntimeError> {
        let blob = self.blob(&e.name, e.offset, e.length)?;
        self.check(&format!("tensor {}", e.name), blob.bytes(), e.checksum.0)?;
        Ok(blob)
    }

    pub fn pack(&self) -> &Arc<Pack> {
        &self.pack
    }

    /// Bytes `[offset, offset+len)` of the file: a zero-copy view of the
    /// mapping, or (for [`Self::reading`]) a fresh owned copy.
    pub(crate) fn blob(&self, what: &str, offset: u64, len: u64) -> Result<Blob, RuntimeError> {
        if self.read {
            return crate::cache::dense::read_blob(&self.pack, what, offset, len);
        }
        let owner: Arc<dyn BlobOwner> = Arc::new(PackBytes(self.pack.clone()));
        Blob::owned(owner, offset as usize, len as usize).ok_or_else(|| {
            pack_err(
                self.pack.path(),
                format!("range {offset}+{len} lies outside the file"),
            )
        })
    }

    fn entry(&self, name: &str) -> Option<&mfx_formats::TensorEntry> {
        self.pack.manifest().tensors.iter().find(|t| t.name == name)
    }
}

fn dtype_of(s: Scheme) -> DType {
    match s {
        Scheme::F32 => DType::F32,
        Scheme::F16 => DType::F16,
        Scheme::Bf16 => DType::Bf16,
        Scheme::Affine { .. } | Scheme::Mxfp4 => DType::Other,
    }
}

/// A matrix from a stored tensor's bytes (`blob` = exactly the tensor's
/// stored bytes), checked against the expected shape.
fn matrix_from(
    name: &str,
    location: &str,
    scheme: Scheme,
    shape: &[u64],
    blob: Blob,
    rows: usize,
    cols: usize,
) -> Result<Matrix, RuntimeError> {
    if shape != [rows as u64, cols as u64] {
        return Err(RuntimeError::Shape {
            name: name.into(),
            location: location.into(),
            expected: format!("[{rows}, {cols}]"),
            found: shape.iter().map(|&d| d as usize).collect(),
        });
    }
    let layout = mfx_formats::pack::TensorLayout::of(scheme, shape)
        .map_err(|e| RuntimeError::Other(format!("{name}: {e}")))?;
    if blob.len() as u64 != layout.length {
        return Err(RuntimeError::Other(format!(
            "{name} in {location}: {} stored bytes, layout needs {}",
            blob.len(),
            layout.length
        )));
    }
    match scheme {
        Scheme::Affine { bits, group_size } => {
            let packed = blob.slice(0, layout.packed_len as usize);
            let scales = blob.slice(layout.scales_offset as usize, layout.groups_len as usize);
            let biases = blob.slice(layout.biases_offset as usize, layout.groups_len as usize);
            Matrix::affine(
                rows,
                cols,
                bits,
                group_size as usize,
                packed,
                scales,
                biases,
            )
            .map_err(|e| RuntimeError::Quant {
                name: name.into(),
                location: location.into(),
                source: e,
            })
        }
        Scheme::Mxfp4 => Matrix::mxfp4(
            rows,
            cols,
            blob.slice(0, layout.packed_len as usize),
            blob.slice(layout.scales_offset as usize, layout.groups_len as usize),
        )
        .map_err(|e| RuntimeError::Quant {
            name: name.into(),
            location: location.into(),
            source: e,
        }),
        s => Matrix::dense(dtype_of(s), rows, cols, blob)
            .map_err(|msg| RuntimeError::Other(format!("{name} in {location}: {msg}"))),
    }
}

impl WeightSource for PackSource {
    fn location(&self) -> String {
        self.pack.path().display().to_string()
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .pack
            .manifest()
            .tensors
            .iter()
            .map(|t| t.name.clone())
            .collect();
        v.sort();
        v
    }

    fn contains(&self, name: &str) -> bool {
        self.entry(name).is_some()
    }

    /// Dense (f32/f16/bf16) tensors only; affine ones come through [`Self::matrix`].
    fn raw(&self, name: &str) -> Result<Option<RawTensor>, RuntimeError> {
        let Some(e) = self.entry(name) else {
            return Ok(None);
        };
        if matches!(e.scheme, Scheme::Affine { .. } | Scheme::Mxfp4) {
            return Err(RuntimeError::Dtype {
                name: name.into(),
                location: self.location(),
                dtype: e.scheme.to_string(),
                expected: "f32, f16 or bf16 here (a vector cannot be quantized)".into(),
            });
        }
        Ok(Some(RawTensor {
            dtype: dtype_of(e.scheme),
            shape: e.shape.iter().map(|&d| d as usize).collect(),
            data: self.tensor_blob(e)?,
        }))
    }

    fn matrix(&self, prefix: &str, rows: usize, cols: usize) -> Result<Matrix, RuntimeError> {
        let name = format!("{prefix}.weight");
        let e = self
            .entry(&name)
            .ok_or_else(|| RuntimeError::MissingTensor {
                name: name.clone(),
                location: self.location(),
            })?;
        matrix_from(
            &name,
            &self.location(),
            e.scheme,
            &e.shape,
            self.tensor_blob(e)?,
            rows,
            cols,
        )
    }

    fn stacked_matrix(
        &self,
        prefix: &str,
        index: usize,
        _count: usize,
        _rows: usize,
        _cols: usize,
    ) -> Result<Matrix, RuntimeError> {
        Err(RuntimeError::MissingTensor {
            name: format!("{prefix}.weight[{index}]"),
            location: format!("{} (packs store experts as blobs)", self.location()),
        })
    }
}
