//! A pack's dense tensors read into owned memory, so that nothing the model
//! touches after load lives in the pack's mapping.
//!
//! Why: a mapped page whose file offset is past the end of the file raises
//! SIGBUS when touched. If a pack is truncated (or replaced by a shorter
//! file through an in-place write) while mfx runs, mapped dense weights
//! (attention, embeddings, lm_head: touched every token) would kill the
//! process on the next token. Read with `pread` instead, the bytes are ours:
//! the cache's identity check (size and inode at each forward pass) then
//! reports the change as an error, and expert reads (also `pread`) report a
//! short read naming the expert. The dense set is resident anyway (it is
//! touched every token), so the copy costs load time, not memory: the budget
//! already counts it.

use super::buf::{AlignedBuf, IO_ALIGN};
use crate::error::RuntimeError;
use crate::weights::{Blob, BlobOwner, DType, Matrix, RawTensor, WeightSource};
use mfx_formats::pack::{Pack, TensorEntry, TensorLayout};
use mfx_formats::quant::Scheme;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

struct Owned(AlignedBuf);

impl BlobOwner for Owned {
    fn bytes(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// Dense tensors of a pack, each read (not mapped) when the model asks for it.
pub struct ReadDense {
    pack: Arc<Pack>,
}

impl ReadDense {
    pub fn new(pack: Arc<Pack>) -> Self {
        ReadDense { pack }
    }

    fn err(&self, msg: String) -> RuntimeError {
        RuntimeError::Pack {
            path: self.pack.path().to_path_buf(),
            msg,
        }
    }

    fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.pack.manifest().tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of `e`, read into a fresh aligned buffer.
    fn read(&self, e: &TensorEntry) -> Result<Blob, RuntimeError> {
        let len = usize::try_from(e.length)
            .map_err(|_| self.err(format!("tensor `{}`: too large", e.name)))?;
        let mut buf = AlignedBuf::new(len.max(1).div_ceil(IO_ALIGN) * IO_ALIGN);
        buf.set_len(len);
        let dst = &mut buf.full_mut()[..len];
        let mut done = 0;
        while done < len {
            match self.pack.file().read_at(&mut dst[done..], e.offset + done as u64) {
                Ok(0) => {
                    return Err(self.err(format!(
                        "tensor `{}`: short read, {done} of {len} bytes at offset {} (the file was truncated or replaced)",
                        e.name, e.offset
                    )))
                }
                Ok(n) => done += n,
                Err(x) if x.kind() == std::io::ErrorKind::Interrupted => {}
                Err(x) => return Err(self.err(format!("tensor `{}`: {x}", e.name))),
            }
        }
        Blob::owned(Arc::new(Owned(buf)), 0, len)
            .ok_or_else(|| self.err(format!("tensor `{}`: buffer too small", e.name)))
    }
}

fn dtype_of(s: Scheme) -> DType {
    match s {
        Scheme::F32 => DType::F32,
        Scheme::F16 => DType::F16,
        Scheme::Bf16 => DType::Bf16,
        Scheme::Affine { .. } => DType::Other,
    }
}

impl WeightSource for ReadDense {
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

    fn raw(&self, name: &str) -> Result<Option<RawTensor>, RuntimeError> {
        let Some(e) = self.entry(name) else {
            return Ok(None);
        };
        if let Scheme::Affine { .. } = e.scheme {
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
            data: self.read(e)?,
        }))
    }

    fn matrix(&self, prefix: &str, rows: usize, cols: usize) -> Result<Matrix, RuntimeError> {
        let name = format!("{prefix}.weight");
        let location = self.location();
        let e = self
            .entry(&name)
            .ok_or_else(|| RuntimeError::MissingTensor {
                name: name.clone(),
                location: location.clone(),
            })?;
        if e.shape != [rows as u64, cols as u64] {
            return Err(RuntimeError::Shape {
                name,
                location,
                expected: format!("[{rows}, {cols}]"),
                found: e.shape.iter().map(|&d| d as usize).collect(),
            });
        }
        let layout = TensorLayout::of(e.scheme, &e.shape)
            .map_err(|x| self.err(format!("tensor `{name}`: {x}")))?;
        if e.length != layout.length {
            return Err(self.err(format!(
                "tensor `{name}`: {} stored bytes, its layout needs {}",
                e.length, layout.length
            )));
        }
        let blob = self.read(e)?;
        match e.scheme {
            Scheme::Affine { bits, group_size } => Matrix::affine(
                rows,
                cols,
                bits,
                group_size as usize,
                blob.slice(0, layout.packed_len as usize),
                blob.slice(layout.scales_offset as usize, layout.groups_len as usize),
                blob.slice(layout.biases_offset as usize, layout.groups_len as usize),
            )
            .map_err(|source| RuntimeError::Quant {
                name,
                location,
                source,
            }),
            s => Matrix::dense(dtype_of(s), rows, cols, blob)
                .map_err(|msg| RuntimeError::Other(format!("{name} in {location}: {msg}"))),
        }
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
