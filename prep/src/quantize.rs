//! Stage 4 (bytes side): turns checkpoint tensors into pack tensors and
//! expert parts with `mfx_formats::quant::quantize` (the MLX affine rule).
//! MLX-quantized sources are dequantized with the reference first and then
//! requantized, so every pack is made by one rule whatever the source.

use crate::checkpoint::{Checkpoint, Mat};
use crate::error::{PrepError, Result};
use mfx_formats::quant::{quantize, AffineOwned, Scheme};

/// Dense-weight bit widths: 2 bits wrecks attention and embeddings.
pub const DENSE_BITS: [u8; 2] = [4, 8];
/// Routers stay at 8 bits whatever `--dense-bits` says: a flipped top-k
/// choice costs more than the bytes saved (MLX makes the same choice).
pub const ROUTER_BITS: u8 = 8;

/// How a dense tensor is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseTensor {
    /// Pack name (the Hugging Face name, with `.weight`).
    pub name: String,
    /// Module name (without `.weight`) to read it from the checkpoint.
    pub module: String,
    pub shape: Vec<u64>,
    pub scheme: Scheme,
}

fn is_expert_tensor(name: &str) -> bool {
    name.contains(".mlp.experts.") || name.contains(".mlp.switch_mlp.")
}

/// The group size to use for `cols`: the requested one if it divides, else
/// the largest of 64/32 that does (MLX needs `cols % group == 0`).
pub fn group_for(cols: usize, want: u32) -> Option<u32> {
    [want, 64, 32].into_iter().find(|g| cols % *g as usize == 0)
}

/// The dense tensors of the checkpoint in pack order (ascending name) with
/// the scheme each gets. Matrices are quantized; vectors (norms) stay in
/// their float type (bf16 unless the source is f32).
pub fn dense_tensors(ck: &Checkpoint, dense_bits: u8, group: u32) -> Result<Vec<DenseTensor>> {
    let mut out = Vec::new();
    for name in ck.names() {
        if is_expert_tensor(name) || name.ends_with(".scales") || name.ends_with(".biases") {
            continue;
        }
        let shape = ck.shape(name).unwrap_or(&[]).to_vec();
        let module = name.strip_suffix(".weight").unwrap_or(name).to_string();
        let quantized_src = ck.has(&format!("{module}.scales"));
        let (logical, scheme) = if shape.len() == 2 {
            let rows = shape[0];
            let cols = if quantized_src {
                logical_cols(ck, &module, shape[1])?
            } else {
                shape[1]
            };
            let bits = if module.ends_with(".mlp.gate") {
                ROUTER_BITS
            } else {
                dense_bits
            };
            let scheme = match group_for(cols, group) {
                Some(g) => Scheme::affine(bits, g)?,
                None => Scheme::Bf16,
            };
            (vec![rows as u64, cols as u64], scheme)
        } else {
            (shape.iter().map(|&d| d as u64).collect(), Scheme::Bf16)
        };
        out.push(DenseTensor {
            name: name.to_string(),
            module,
            shape: logical,
            scheme,
        });
    }
    out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    Ok(out)
}

fn logical_cols(ck: &Checkpoint, module: &str, words: usize) -> Result<usize> {
    let rows_groups = ck
        .shape(&format!("{module}.scales"))
        .map(|s| s.to_vec())
        .unwrap_or_default();
    let bits = ck
        .config
        .raw
        .get("quantization")
        .and_then(|q| q.get(module))
        .and_then(|o| o.get("bits"))
        .and_then(|b| b.as_u64());
    let bits = bits
        .map(|b| b as u8)
        .or(ck.config.mlx_quant.map(|q| q.0))
        .unwrap_or(4);
    let cols = words * 32 / bits as usize;
    if rows_groups.len() != 2 || rows_groups[1] == 0 || cols % rows_groups[1] != 0 {
        return Err(PrepError::Tensor {
            name: format!("{module}.scales"),
            msg: format!("shape {rows_groups:?} does not match {cols} columns"),
        });
    }
    Ok(cols)
}

/// Stored bytes of one dense tensor in its scheme (exact, via `Scheme::matrix_bytes`).
pub fn dense_bytes(t: &DenseTensor) -> Result<u64> {
    let rows: u64 = t.shape[..t.shape.len().saturating_sub(1)].iter().product();
    let cols = *t.shape.last().unwrap_or(&1);
    Ok(t.scheme.matrix_bytes(rows as usize, cols as usize)? as u64)
}

/// Bytes of one expert (gate, up, down) at `bits`.
pub fn expert_bytes(hidden: usize, inter: usize, bits: u8, group: u32) -> Result<u64> {
    let g1 = group_for(hidden, group).ok_or_else(|| {
        PrepError::Option(format!("hidden size {hidden} is not a multiple of 32"))
    })?;
    let g2 = group_for(inter, group).ok_or_else(|| {
        PrepError::Option(format!("expert width {inter} is not a multiple of 32"))
    })?;
    let a = Scheme::affine(bits, g1)?.matrix_bytes(inter, hidden)?;
    let b = Scheme::affine(bits, g2)?.matrix_bytes(hidden, inter)?;
    Ok((2 * a + b) as u64)
}

/// Bytes of a stored tensor: one slice for floats, (packed, scales, biases) for affine.
pub enum Stored {
    Float(Vec<u8>),
    Affine(AffineOwned),
}

impl Stored {
    pub fn parts(&self) -> Vec<&[u8]> {
        match self {
            Stored::Float(b) => vec![b.as_slice()],
            Stored::Affine(a) => vec![
                &a.packed,
                bytemuck_bf16(&a.scales),
                bytemuck_bf16(&a.biases),
            ],
        }
    }
}

fn bytemuck_bf16(v: &[half::bf16]) -> &[u8] {
    // `half`'s bytemuck feature makes bf16 Pod; little-endian like the format.
    bytemuck::cast_slice(v)
}

pub fn quantize_mat(m: &Mat, scheme: Scheme, what: &str) -> Result<Stored> {
    match scheme {
        Scheme::Affine { bits, group_size } => {
            quantize(&m.data, m.rows, m.cols, bits, group_size as usize)
                .map(Stored::Affine)
                .map_err(|e| PrepError::Tensor {
                    name: what.into(),
                    msg: format!("quantize to {scheme}: {e}"),
                })
        }
        Scheme::Bf16 => Ok(Stored::Float(
            m.data
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        )),
        Scheme::F16 => Ok(Stored::Float(
            m.data
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        )),
        Scheme::F32 => Ok(Stored::Float(
            m.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )),
    }
}

/// Reads and encodes one dense tensor.
pub fn encode_dense(ck: &Checkpoint, t: &DenseTensor) -> Result<Stored> {
    if t.shape.len() == 2 {
        let m = ck.matrix_source(&t.module, None)?;
        quantize_mat(&m, t.scheme, &t.name)
    } else {
        let (_, v) = ck.float_tensor(&t.name)?;
        let m = Mat {
            rows: 1,
            cols: v.len(),
            data: v,
        };
        quantize_mat(&m, t.scheme, &t.name)
    }
}

/// Dequantizes stored bytes back to f32 (to evaluate what a pack will compute).
pub fn dequant(s: &Stored, rows: usize, cols: usize) -> Mat {
    match s {
        Stored::Affine(a) => Mat {
            rows,
            cols,
            data: a.view().dequantize(),
        },
        Stored::Float(b) => Mat {
            rows,
            cols,
            data: b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        },
    }
}
