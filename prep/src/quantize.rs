//! Stage 4 (bytes side): turns checkpoint tensors into pack tensors and
//! expert parts with `mfx_formats::quant::quantize` (the MLX affine rule).
//! MLX-quantized sources are dequantized with the reference first and then
//! requantized, so every pack is made by one rule whatever the source.
//! The exception is MXFP4 (gpt-oss's hub experts): [`as_is`] stores those
//! bytes unchanged, 4.25 bits with no requantization loss.

use crate::error::{PrepError, Result};
use crate::source::{from_runtime, ExpertWeights, Mat, Source};
use mfx_formats::mxfp4::{quantize_mxfp4, Mxfp4Owned};
use mfx_formats::quant::{quantize, AffineOwned, Scheme};
use mfx_runtime::experts::{ExpertBias, BIAS_PARTS};
use mfx_runtime::kernels::MatRef;
use mfx_runtime::weights::{DType, Matrix, WeightSource};

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
    /// The source's row count and the source rows stored, in order (a
    /// pruned router, `--prune`); `shape` is then the stored shape.
    /// `None`: every row.
    pub keep_rows: Option<(u64, Vec<u32>)>,
}

/// Routers (and qwen's shared-expert gate, a router of one) stay at
/// [`ROUTER_BITS`]: `mlp.gate`, Mixtral's `block_sparse_moe.gate`,
/// gpt-oss's `mlp.router`, `mlp.shared_expert_gate`.
fn is_router(module: &str) -> bool {
    module.ends_with(".gate")
        || module.ends_with(".router")
        || module.ends_with(".shared_expert_gate")
}

/// The group size to use for `cols`: the requested one if it divides, else
/// the largest of 64/32 that does (MLX needs `cols % group == 0`).
pub fn group_for(cols: usize, want: u32) -> Option<u32> {
    [want, 64, 32]
        .into_iter()
        .find(|g| cols.is_multiple_of(*g as usize))
}

/// The float scheme that holds a float source tensor exactly.
fn float_scheme(d: DType) -> Scheme {
    match d {
        DType::F32 => Scheme::F32,
        DType::F16 => Scheme::F16,
        _ => Scheme::Bf16,
    }
}

/// The dense tensors of the checkpoint (everything the runtime does not
/// name as a routed expert) in pack order (ascending name) with the scheme
/// each gets. Matrices are quantized (routers at 8 bits, the rest at
/// `dense_bits`; a width no group size divides stays bf16); vectors and
/// other shapes (norms, biases, `e_score_correction_bias`, `A_log`,
/// `dt_bias`, conv1d kernels) keep their float type.
pub fn dense_tensors(src: &Source, dense_bits: u8, group: u32) -> Result<Vec<DenseTensor>> {
    let mut out = Vec::new();
    for name in src.weights.names() {
        if src.is_expert_tensor(&name) {
            continue;
        }
        let module = name.strip_suffix(".weight").unwrap_or(&name).to_string();
        let quantized_src =
            name.ends_with(".weight") && src.weights.contains(&format!("{module}.scales"));
        if (name.ends_with(".scales") || name.ends_with(".biases"))
            && src.weights.contains(&format!(
                "{}.weight",
                name.rsplit_once('.').map_or("", |p| p.0)
            ))
        {
            // The group scales/biases of an MLX-quantized weight.
            continue;
        }
        let t = src.weights.require(&name).map_err(from_runtime)?;
        let shape = t.shape.clone();
        let (logical, scheme) = if shape.len() == 2 {
            let rows = shape[0];
            let cols = if quantized_src {
                logical_cols(src, &module, shape[1])?
            } else {
                shape[1]
            };
            let bits = if is_router(&module) {
                ROUTER_BITS
            } else {
                dense_bits
            };
            let scheme = match group_for(cols, group) {
                Some(g) => Scheme::affine(bits, g)?,
                None if quantized_src => Scheme::Bf16,
                None => float_scheme(t.dtype),
            };
            (vec![rows as u64, cols as u64], scheme)
        } else {
            (
                shape.iter().map(|&d| d as u64).collect(),
                float_scheme(t.dtype),
            )
        };
        out.push(DenseTensor {
            name,
            module,
            shape: logical,
            scheme,
            keep_rows: None,
        });
    }
    out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    Ok(out)
}

fn logical_cols(src: &Source, module: &str, words: usize) -> Result<usize> {
    let rows_groups = src
        .weights
        .raw(&format!("{module}.scales"))
        .map_err(from_runtime)?
        .map(|t| t.shape)
        .unwrap_or_default();
    let q = src.raw.get("quantization");
    let bits = q
        .and_then(|q| q.get(module))
        .and_then(|o| o.get("bits"))
        .or_else(|| q.and_then(|q| q.get("bits")))
        .and_then(|b| b.as_u64())
        .unwrap_or(4);
    let cols = words * 32 / bits.max(1) as usize;
    if rows_groups.len() != 2 || rows_groups[1] == 0 || !cols.is_multiple_of(rows_groups[1]) {
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

/// Stored bytes of one expert as prep will write it, from a sample expert
/// of the source: each projection at `bits` (affine), except MXFP4 source
/// projections, which are stored as they are (4.25 bits, `as_is`), plus
/// the bias parts the expert has (gpt-oss).
pub fn expert_bytes_of(ew: &ExpertWeights, bits: u8, group: u32) -> Result<u64> {
    let mut total = 0u64;
    for (k, m) in [&ew.gate, &ew.up, &ew.down].into_iter().enumerate() {
        let scheme = if ew.mxfp4[k].is_some() {
            Scheme::Mxfp4
        } else {
            let g = group_for(m.cols, group).ok_or_else(|| {
                PrepError::Option(format!("expert width {} is not a multiple of 32", m.cols))
            })?;
            Scheme::affine(bits, g)?
        };
        total += scheme.matrix_bytes(m.rows, m.cols)? as u64;
    }
    if let Some(b) = &ew.bias {
        total += bias_parts(b, "expert")?
            .iter()
            .map(|p| p.bytes.len() as u64)
            .sum::<u64>();
    }
    Ok(total)
}

/// One bias part of an expert blob (docs/FORMAT.md 6.2).
pub struct BiasPart {
    pub name: &'static str,
    pub scheme: Scheme,
    pub len: usize,
    pub bytes: Vec<u8>,
}

/// An expert's biases as its blob stores them: each vector in bf16 when
/// every value is a bf16 (a bf16 source: exact), else in f32, so they are
/// never rounded. Non-finite values are refused naming `what`.
pub fn bias_parts(b: &ExpertBias, what: &str) -> Result<Vec<BiasPart>> {
    BIAS_PARTS
        .into_iter()
        .zip([&b.gate, &b.up, &b.down])
        .map(|(name, v)| {
            check_finite(v, v.len(), &format!("{what} {name}"))?;
            let exact = v.iter().all(|x| half::bf16::from_f32(*x).to_f32() == *x);
            let (scheme, bytes) = if exact {
                let b: Vec<u8> = v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect();
                (Scheme::Bf16, b)
            } else {
                (
                    Scheme::F32,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            };
            Ok(BiasPart {
                name,
                scheme,
                len: v.len(),
                bytes,
            })
        })
        .collect()
}

/// Bytes of a stored tensor: one slice for floats, (packed, scales, biases)
/// for affine, (blocks, scales) for mxfp4.
pub enum Stored {
    Float(Vec<u8>),
    Affine(AffineOwned),
    Mxfp4(Mxfp4Owned),
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
            Stored::Mxfp4(m) => vec![&m.blocks, &m.scales],
        }
    }
}

/// An MXFP4 source matrix stored as it is: its code and scale bytes copied
/// into the pack's `mxfp4` layout (the same bytes, see
/// `mfx_formats::mxfp4`), so the pack computes with exactly the hub's
/// weights. `None` for any other scheme. The values still pass
/// [`check_finite`] (a scale of 254 with code 6 overflows f32).
pub fn as_is(m: &Matrix, what: &str) -> Result<Option<(Scheme, Stored)>> {
    let MatRef::Mxfp4(v) = m.mat() else {
        return Ok(None);
    };
    check_finite(&m.dequantize(), v.cols, what)?;
    Ok(Some((Scheme::Mxfp4, Stored::Mxfp4(v.owned()))))
}

fn bytemuck_bf16(v: &[half::bf16]) -> &[u8] {
    // `half`'s bytemuck feature makes bf16 Pod; little-endian like the format.
    bytemuck::cast_slice(v)
}

pub fn quantize_mat(m: &Mat, scheme: Scheme, what: &str) -> Result<Stored> {
    check_finite(&m.data, m.cols, what)?;
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
        // f32 to MXFP4 by the OCP rule (not the as-is path of [`as_is`]).
        Scheme::Mxfp4 => quantize_mxfp4(&m.data, m.rows, m.cols)
            .map(Stored::Mxfp4)
            .map_err(|e| PrepError::Tensor {
                name: what.into(),
                msg: format!("quantize to {scheme}: {e}"),
            }),
    }
}

/// Refuses a tensor holding NaN or an infinity (issue 16: such weights
/// passed prep and `verify`, then every forward pass produced NaN logits).
/// Every weight prep writes, dense or expert, passes through
/// [`quantize_mat`], so this one check covers the whole pack without a
/// second pass over the checkpoint.
pub fn check_finite(data: &[f32], cols: usize, what: &str) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => {
            let bad = data.iter().filter(|v| !v.is_finite()).count();
            let cols = cols.max(1);
            Err(PrepError::Tensor {
                name: what.into(),
                msg: format!(
                    "{bad} non-finite weight(s), the first {} at [{}, {}]; the checkpoint is corrupt (prep refuses NaN/Inf weights)",
                    data[i],
                    i / cols,
                    i % cols
                ),
            })
        }
    }
}

/// Reads and encodes one dense tensor.
pub fn encode_dense(src: &Source, t: &DenseTensor) -> Result<Stored> {
    let m = if let (Some((src_rows, keep)), 2) = (&t.keep_rows, t.shape.len()) {
        let m = src
            .weights
            .matrix(&t.module, *src_rows as usize, t.shape[1] as usize)
            .map_err(from_runtime)?;
        let full = Mat::of(&m);
        let cols = full.cols;
        let mut data = Vec::with_capacity(keep.len() * cols);
        for &r in keep {
            let r = r as usize;
            if r >= full.rows || cols != t.shape[1] as usize {
                return Err(PrepError::Tensor {
                    name: t.name.clone(),
                    msg: format!(
                        "row {r} of a [{}, {cols}] matrix kept (expected [_, {}])",
                        full.rows, t.shape[1]
                    ),
                });
            }
            data.extend_from_slice(&full.data[r * cols..(r + 1) * cols]);
        }
        Mat {
            rows: keep.len(),
            cols,
            data,
        }
    } else if t.shape.len() == 2 {
        let m = src
            .weights
            .matrix(&t.module, t.shape[0] as usize, t.shape[1] as usize)
            .map_err(from_runtime)?;
        Mat::of(&m)
    } else {
        let n: u64 = t.shape.iter().product();
        let v = src.weights.vector(&t.name, n as usize).or_else(|_| {
            // Not 1-D (a conv kernel): read it flat.
            let raw = src.weights.require(&t.name)?;
            raw.to_f32(&t.name, "checkpoint")
        });
        let data = v.map_err(from_runtime)?;
        Mat {
            rows: 1,
            cols: data.len(),
            data,
        }
    };
    quantize_mat(&m, t.scheme, &t.name)
}
