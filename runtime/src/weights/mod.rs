//! Checkpoint loading: named tensors from wherever they live, turned into
//! the runtime's weight handles.
//!
//! A [`WeightSource`] yields tensors lazily by name; [`Matrix`] is an owned,
//! cheap-to-clone handle (an `Arc` on the mapped file plus a byte range) that
//! lends out a [`MatRef`] for the kernels. Keeping handles owned (rather than
//! borrowing from the source) is what lets a model hold its weights, lets
//! prep load one layer, run it and drop it, and lets an expert cache own the
//! bytes it decides to keep resident.
//!
//! Sources: Hugging Face safetensors checkpoints (one file or index +
//! shards, bf16/f16/f32) and MLX-quantized ones (uint32-packed weights with
//! `scales`/`biases`, stacked `switch_mlp` experts) are both read by
//! [`safetensors::SafetensorsSource`]; the difference is only how a matrix is
//! assembled, which [`WeightSource::matrix`] decides per tensor.

pub mod hub_layout;
pub mod mmap;
pub mod mxfp4;
pub mod pack;
pub mod safetensors;

use crate::error::RuntimeError;
use crate::kernels::MatRef;
use half::{bf16, f16};
use memmap2::Mmap;
use mfx_formats::mxfp4::Mxfp4Matrix;
use mfx_formats::quant::AffineMatrix;
use std::sync::Arc;

/// Element types a checkpoint tensor can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    Bf16,
    U32,
    /// Bytes: MXFP4 `*_blocks` codes and `*_scales` (e8m0).
    U8,
    Other,
}

impl DType {
    pub fn size(&self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::U8 | DType::Other => 1,
        }
    }
}

/// Owned bytes: a range of a mapped file, or a heap copy (4-byte aligned, so
/// any element type can be viewed in place).
#[derive(Clone)]
pub struct Blob {
    src: BlobSrc,
    start: usize,
    len: usize,
}

#[derive(Clone)]
enum BlobSrc {
    Map(Arc<Mmap>),
    Heap(Arc<Vec<u32>>),
    Owned(Arc<dyn BlobOwner>),
}

/// Bytes owned elsewhere, e.g. one of the expert cache's recycled aligned
/// buffers: the owner goes (and may hand its buffer back to a pool) when the
/// last [`Blob`] over it drops, so a cache can evict while a forward pass
/// still reads the expert.
pub trait BlobOwner: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.src {
            BlobSrc::Map(_) => "mapped",
            BlobSrc::Heap(_) => "heap",
            BlobSrc::Owned(_) => "owned",
        };
        write!(f, "Blob({kind}, {} bytes)", self.len)
    }
}

impl Blob {
    /// A view of `map[start..start+len]`; the caller has bounds-checked it.
    pub(crate) fn mapped(map: Arc<Mmap>, start: usize, len: usize) -> Self {
        Blob {
            src: BlobSrc::Map(map),
            start,
            len,
        }
    }

    /// Copies `bytes` to an aligned heap buffer.
    pub fn copy_of(bytes: &[u8]) -> Self {
        let mut v = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut v)[..bytes.len()].copy_from_slice(bytes);
        Blob {
            src: BlobSrc::Heap(Arc::new(v)),
            start: 0,
            len: bytes.len(),
        }
    }

    /// A view of `owner.bytes()[start..start+len]`; `None` if out of range.
    pub fn owned(owner: Arc<dyn BlobOwner>, start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        if end > owner.bytes().len() {
            return None;
        }
        Some(Blob {
            src: BlobSrc::Owned(owner),
            start,
            len,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.src {
            BlobSrc::Owned(o) => &o.bytes()[self.start..self.start + self.len],
            BlobSrc::Map(m) => &m[self.start..self.start + self.len],
            BlobSrc::Heap(v) => {
                &bytemuck::cast_slice::<u32, u8>(v)[self.start..self.start + self.len]
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A sub-range (e.g. one expert of a stacked tensor); bounds-checked by the caller.
    pub fn slice(&self, start: usize, len: usize) -> Blob {
        debug_assert!(start + len <= self.len);
        Blob {
            src: self.src.clone(),
            start: self.start + start,
            len,
        }
    }

    /// This blob if its bytes are aligned for elements of `align` bytes, else an aligned copy.
    pub fn aligned(self, align: usize) -> Blob {
        if (self.bytes().as_ptr() as usize).is_multiple_of(align) {
            self
        } else {
            Blob::copy_of(self.bytes())
        }
    }

    /// Whether the bytes live in a file mapping (zero-copy) rather than on the heap.
    pub fn is_mapped(&self) -> bool {
        matches!(self.src, BlobSrc::Map(_))
    }
}

/// A raw tensor as stored: dtype, shape and bytes.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Blob,
}

impl RawTensor {
    /// The values as f32 (f32, f16 or bf16 storage; anything else is an
    /// error naming `name` in `location`). The one such conversion: the
    /// weight sources, prep's quantizer and the families all use it.
    pub fn to_f32(&self, name: &str, location: &str) -> Result<Vec<f32>, RuntimeError> {
        let b = self.data.bytes();
        Ok(match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::Bf16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(RuntimeError::Dtype {
                    name: name.into(),
                    location: location.into(),
                    dtype: format!("{other:?}"),
                    expected: "f32, f16 or bf16".into(),
                })
            }
        })
    }
}

/// An owned weight matrix `[rows, cols]` (rows = output features) in one of
/// the schemes the kernels understand. Invariant (checked at construction):
/// buffers are aligned for their element type and have exactly the lengths
/// the shape implies, so [`Matrix::mat`] cannot fail.
#[derive(Debug, Clone)]
pub enum Matrix {
    Dense {
        dtype: DType,
        rows: usize,
        cols: usize,
        data: Blob,
    },
    Affine {
        rows: usize,
        cols: usize,
        bits: u8,
        group_size: usize,
        packed: Blob,
        scales: Blob,
        biases: Blob,
    },
    /// MXFP4 (see `mfx_formats::mxfp4`): `blocks` holds `rows * cols / 2`
    /// code bytes, `scales` `rows * cols / 32` e8m0 bytes.
    Mxfp4 {
        rows: usize,
        cols: usize,
        blocks: Blob,
        scales: Blob,
    },
}

impl Matrix {
    /// Builds a dense matrix from raw bytes of `dtype`.
    pub fn dense(dtype: DType, rows: usize, cols: usize, data: Blob) -> Result<Self, String> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::Bf16) {
            return Err(format!(
                "dense weights must be f32, f16 or bf16, found {dtype:?}"
            ));
        }
        let want = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or("size overflow")?;
        if data.len() != want {
            return Err(format!("expected {want} bytes, found {}", data.len()));
        }
        Ok(Matrix::Dense {
            dtype,
            rows,
            cols,
            data: data.aligned(dtype.size()),
        })
    }

    /// Builds an affine-quantized matrix; scales/biases are bf16 bytes.
    pub fn affine(
        rows: usize,
        cols: usize,
        bits: u8,
        group_size: usize,
        packed: Blob,
        scales: Blob,
        biases: Blob,
    ) -> Result<Self, mfx_formats::quant::QuantError> {
        let scales = scales.aligned(2);
        let biases = biases.aligned(2);
        // Validate lengths once, through the formats crate's own checks.
        AffineMatrix::new(
            rows,
            cols,
            bits,
            group_size,
            packed.bytes(),
            bytemuck::cast_slice(scales.bytes()),
            bytemuck::cast_slice(biases.bytes()),
        )?;
        Ok(Matrix::Affine {
            rows,
            cols,
            bits,
            group_size,
            packed,
            scales,
            biases,
        })
    }

    /// Builds an MXFP4 matrix from its code and scale bytes (no copy). A
    /// NaN scale (0xFF) is refused here, naming row and block, so kernels
    /// never meet one.
    pub fn mxfp4(
        rows: usize,
        cols: usize,
        blocks: Blob,
        scales: Blob,
    ) -> Result<Self, mfx_formats::quant::QuantError> {
        Mxfp4Matrix::new(rows, cols, blocks.bytes(), scales.bytes())?.check_scales()?;
        Ok(Matrix::Mxfp4 {
            rows,
            cols,
            blocks,
            scales,
        })
    }

    /// An owned copy of an MXFP4 matrix (e.g. rows gathered out of a fused
    /// projection).
    pub fn from_mxfp4(
        m: &mfx_formats::mxfp4::Mxfp4Owned,
    ) -> Result<Self, mfx_formats::quant::QuantError> {
        Matrix::mxfp4(
            m.rows,
            m.cols,
            Blob::copy_of(&m.blocks),
            Blob::copy_of(&m.scales),
        )
    }

    pub fn rows(&self) -> usize {
        match self {
            Matrix::Dense { rows, .. }
            | Matrix::Affine { rows, .. }
            | Matrix::Mxfp4 { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Matrix::Dense { cols, .. }
            | Matrix::Affine { cols, .. }
            | Matrix::Mxfp4 { cols, .. } => *cols,
        }
    }

    /// Bytes this matrix occupies (what a cache budgets).
    pub fn nbytes(&self) -> usize {
        match self {
            Matrix::Dense { data, .. } => data.len(),
            Matrix::Affine {
                packed,
                scales,
                biases,
                ..
            } => packed.len() + scales.len() + biases.len(),
            Matrix::Mxfp4 { blocks, scales, .. } => blocks.len() + scales.len(),
        }
    }

    /// The values as the kernels define them (the scalar reference
    /// dequantization for quantized schemes), row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = vec![0.0f32; rows * cols];
        let m = self.mat();
        for (r, o) in out.chunks_exact_mut(cols.max(1)).enumerate() {
            m.row_f32(r, o);
        }
        out
    }

    /// A copy of the given rows (in that order) in the same scheme, with no
    /// requantization: e.g. gpt-oss's gate (even rows) and up (odd rows)
    /// out of one fused `gate_up_proj`.
    ///
    /// # Panics
    /// If a row index is out of range (a caller bug).
    pub fn gather_rows(&self, pick: &[usize]) -> Matrix {
        let n = self.rows();
        let copy = |b: &Blob, per_row: usize| {
            let mut v = Vec::with_capacity(pick.len() * per_row);
            for &r in pick {
                assert!(r < n, "gather_rows: row {r} of {n}");
                v.extend_from_slice(&b.bytes()[r * per_row..(r + 1) * per_row]);
            }
            Blob::copy_of(&v)
        };
        let rows = pick.len();
        match self {
            Matrix::Dense {
                dtype, cols, data, ..
            } => Matrix::Dense {
                dtype: *dtype,
                rows,
                cols: *cols,
                data: copy(data, cols * dtype.size()),
            },
            Matrix::Affine {
                cols,
                bits,
                group_size,
                packed,
                scales,
                biases,
                ..
            } => Matrix::Affine {
                rows,
                cols: *cols,
                bits: *bits,
                group_size: *group_size,
                packed: copy(packed, cols * *bits as usize / 8),
                scales: copy(scales, cols / group_size * 2),
                biases: copy(biases, cols / group_size * 2),
            },
            Matrix::Mxfp4 {
                cols,
                blocks,
                scales,
                ..
            } => Matrix::Mxfp4 {
                rows,
                cols: *cols,
                blocks: copy(blocks, cols / 2),
                scales: copy(scales, cols / mfx_formats::mxfp4::BLOCK),
            },
        }
    }

    /// The kernel view.
    pub fn mat(&self) -> MatRef<'_> {
        match self {
            Matrix::Dense {
                dtype,
                rows,
                cols,
                data,
            } => {
                let (rows, cols) = (*rows, *cols);
                match dtype {
                    DType::F32 => MatRef::F32 {
                        rows,
                        cols,
                        data: bytemuck::cast_slice(data.bytes()),
                    },
                    DType::F16 => MatRef::F16 {
                        rows,
                        cols,
                        data: bytemuck::cast_slice::<u8, f16>(data.bytes()),
                    },
                    _ => MatRef::Bf16 {
                        rows,
                        cols,
                        data: bytemuck::cast_slice::<u8, bf16>(data.bytes()),
                    },
                }
            }
            Matrix::Affine {
                rows,
                cols,
                bits,
                group_size,
                packed,
                scales,
                biases,
            } => MatRef::Affine(AffineMatrix {
                rows: *rows,
                cols: *cols,
                bits: *bits,
                group_size: *group_size,
                packed: packed.bytes(),
                scales: bytemuck::cast_slice(scales.bytes()),
                biases: bytemuck::cast_slice(biases.bytes()),
            }),
            Matrix::Mxfp4 {
                rows,
                cols,
                blocks,
                scales,
            } => MatRef::Mxfp4(Mxfp4Matrix {
                rows: *rows,
                cols: *cols,
                blocks: blocks.bytes(),
                scales: scales.bytes(),
            }),
        }
    }
}

/// Where named tensors come from. Implementations must be cheap to query by
/// name and must not copy tensor data unless they have to (alignment,
/// conversion): a 100 GB checkpoint is opened by mapping it, not reading it.
pub trait WeightSource: Send + Sync {
    /// A human-readable location for error messages (directory or file).
    fn location(&self) -> String;
    /// Where tensor `name` lives (its shard file), for error messages.
    fn location_of(&self, name: &str) -> String {
        let _ = name;
        self.location()
    }
    /// All tensor names, sorted.
    fn names(&self) -> Vec<String>;
    fn contains(&self, name: &str) -> bool;
    /// The raw tensor, `Ok(None)` if there is no tensor of that name.
    fn raw(&self, name: &str) -> Result<Option<RawTensor>, RuntimeError>;

    /// The raw tensor or an error naming it.
    fn require(&self, name: &str) -> Result<RawTensor, RuntimeError> {
        self.raw(name)?.ok_or_else(|| RuntimeError::MissingTensor {
            name: name.into(),
            location: self.location_of(name),
        })
    }

    /// A 1-D tensor of `len` floats (norm weights, biases), converted to f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, RuntimeError> {
        let t = self.require(name)?;
        if t.shape != [len] {
            return Err(shape_err(self, name, format!("[{len}]"), &t.shape));
        }
        to_f32(self, name, &t)
    }

    /// A float tensor of exactly `shape` (any rank), converted to f32.
    fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, RuntimeError> {
        let t = self.require(name)?;
        if t.shape != shape {
            return Err(shape_err(self, name, format!("{shape:?}"), &t.shape));
        }
        to_f32(self, name, &t)
    }

    /// The linear layer `prefix` (`prefix.weight`, plus `prefix.scales` and
    /// `prefix.biases` when quantized) as a `[rows, cols]` matrix.
    fn matrix(&self, prefix: &str, rows: usize, cols: usize) -> Result<Matrix, RuntimeError> {
        stacked_matrix(self, prefix, None, rows, cols)
    }

    /// Expert `index` of a stacked `[count, rows, cols]` linear layer
    /// (MLX `switch_mlp.*`), as a zero-copy view.
    fn stacked_matrix(
        &self,
        prefix: &str,
        index: usize,
        count: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Matrix, RuntimeError> {
        stacked_matrix(self, prefix, Some((index, count)), rows, cols)
    }
}

pub(crate) fn shape_err<S: WeightSource + ?Sized>(
    src: &S,
    name: &str,
    expected: String,
    found: &[usize],
) -> RuntimeError {
    RuntimeError::Shape {
        name: name.into(),
        location: src.location_of(name),
        expected,
        found: found.to_vec(),
    }
}

fn to_f32<S: WeightSource + ?Sized>(
    src: &S,
    name: &str,
    t: &RawTensor,
) -> Result<Vec<f32>, RuntimeError> {
    t.to_f32(name, &src.location_of(name))
}

/// Group scales and biases must be bf16 for the kernels; f16/f32 ones
/// (MLX float16 or float32 models) are converted once at load.
fn bf16_blob<S: WeightSource + ?Sized>(
    src: &S,
    name: &str,
    t: &RawTensor,
) -> Result<Blob, RuntimeError> {
    if t.dtype == DType::Bf16 {
        return Ok(t.data.clone());
    }
    let v: Vec<bf16> = to_f32(src, name, t)?
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    Ok(Blob::copy_of(bytemuck::cast_slice(&v)))
}

/// Shared body of [`WeightSource::matrix`] and [`WeightSource::stacked_matrix`].
fn stacked_matrix<S: WeightSource + ?Sized>(
    src: &S,
    prefix: &str,
    stack: Option<(usize, usize)>,
    rows: usize,
    cols: usize,
) -> Result<Matrix, RuntimeError> {
    let wname = format!("{prefix}.weight");
    let w = src.require(&wname)?;
    let lead: Vec<usize> = stack.map(|(_, n)| vec![n]).unwrap_or_default();
    // Picks expert `index` out of a stacked tensor's bytes.
    let pick = |t: &RawTensor| -> Blob {
        match stack {
            None => t.data.clone(),
            Some((i, n)) => {
                let per = t.data.len() / n;
                t.data.slice(i * per, per)
            }
        }
    };
    let sname = format!("{prefix}.scales");
    if src.contains(&sname) {
        // MLX affine: weight uint32 [.., rows, cols*bits/32], scales/biases [.., rows, cols/group].
        let bname = format!("{prefix}.biases");
        let s = src.require(&sname)?;
        let b = src.require(&bname)?;
        if w.dtype != DType::U32 {
            return Err(RuntimeError::Dtype {
                name: wname.clone(),
                location: src.location_of(&wname),
                dtype: format!("{:?}", w.dtype),
                expected: "U32 (packed quantized weights)".into(),
            });
        }
        let nd = lead.len() + 2;
        let ok_rank = |t: &RawTensor| {
            t.shape.len() == nd && t.shape[..lead.len()] == lead[..] && t.shape[lead.len()] == rows
        };
        let (pc, sc) = (
            w.shape.last().copied().unwrap_or(0),
            s.shape.last().copied().unwrap_or(0),
        );
        if !ok_rank(&w) || pc == 0 || (pc * 32) % cols != 0 {
            return Err(shape_err(
                src,
                &wname,
                format!("{lead:?} + [{rows}, {cols}*bits/32]"),
                &w.shape,
            ));
        }
        if !ok_rank(&s) || sc == 0 || !cols.is_multiple_of(sc) {
            return Err(shape_err(
                src,
                &sname,
                format!("{lead:?} + [{rows}, {cols}/group_size]"),
                &s.shape,
            ));
        }
        if b.shape != s.shape {
            return Err(shape_err(
                src,
                &bname,
                format!("{:?} (same as scales)", s.shape),
                &b.shape,
            ));
        }
        let bits = (pc * 32 / cols) as u8;
        let group_size = cols / sc;
        let sblob = bf16_blob(src, &sname, &s)?;
        let bblob = bf16_blob(src, &bname, &b)?;
        let per_s = sblob.len() / stack.map(|(_, n)| n).unwrap_or(1);
        let (si, sb) = match stack {
            None => (sblob, bblob),
            Some((i, _)) => (sblob.slice(i * per_s, per_s), bblob.slice(i * per_s, per_s)),
        };
        return Matrix::affine(rows, cols, bits, group_size, pick(&w), si, sb).map_err(|e| {
            RuntimeError::Quant {
                name: wname.clone(),
                location: src.location_of(&wname),
                source: e,
            }
        });
    }
    let mut want = lead.clone();
    want.extend([rows, cols]);
    if w.shape != want {
        return Err(shape_err(src, &wname, format!("{want:?}"), &w.shape));
    }
    Matrix::dense(w.dtype, rows, cols, pick(&w)).map_err(|msg| RuntimeError::Dtype {
        name: wname.clone(),
        location: src.location_of(&wname),
        dtype: format!("{:?}", w.dtype),
        expected: msg,
    })
}
