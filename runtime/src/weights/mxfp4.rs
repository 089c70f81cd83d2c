//! The hub's MXFP4 experts (gpt-oss): a `{prefix}_blocks` uint8
//! `[experts, rows, cols / 32, 16]` and `{prefix}_scales` uint8
//! `[experts, rows, cols / 32]` pair, exposed per expert as one
//! [`Matrix::Mxfp4`] that borrows the mapped bytes (no dequantization, no
//! copy). Rows are output features, as in `nn.Linear`: gpt-oss's
//! `gate_up_proj_blocks` is `[E, 2 * intermediate, hidden / 32, 16]`
//! (gate in the even rows, up in the odd ones) and `down_proj_blocks`
//! `[E, hidden, intermediate / 32, 16]`. transformers' dequantized
//! parameters are the transpose of these (`[E, in, out]`).

use super::{shape_err, Matrix, RawTensor, WeightSource};
use crate::error::RuntimeError;
use crate::weights::DType;
use mfx_formats::mxfp4::{BLOCK, BLOCK_BYTES};

/// The tensor names of an MXFP4 pair: `{prefix}_blocks`, `{prefix}_scales`.
pub fn pair_names(prefix: &str) -> (String, String) {
    (format!("{prefix}_blocks"), format!("{prefix}_scales"))
}

/// Whether `src` holds `prefix` as an MXFP4 pair.
pub fn has_pair<S: WeightSource + ?Sized>(src: &S, prefix: &str) -> bool {
    let (b, s) = pair_names(prefix);
    src.contains(&b) && src.contains(&s)
}

/// Expert `index` of the stacked MXFP4 pair `prefix` (`count` experts of
/// `[rows, cols]`) as a zero-copy [`Matrix::Mxfp4`]. Errors name the tensor
/// and its shard: a missing half, a dtype other than U8, a shape other than
/// the one above, an index out of range, a NaN (0xFF) scale.
pub fn expert<S: WeightSource + ?Sized>(
    src: &S,
    prefix: &str,
    index: usize,
    count: usize,
    rows: usize,
    cols: usize,
) -> Result<Matrix, RuntimeError> {
    let (bname, sname) = pair_names(prefix);
    let blocks = src.require(&bname)?;
    let scales = src.require(&sname)?;
    if !cols.is_multiple_of(BLOCK) {
        return Err(shape_err(
            src,
            &bname,
            format!("a column count that is a multiple of {BLOCK} (asked for {cols})"),
            &blocks.shape,
        ));
    }
    let nb = cols / BLOCK;
    check(src, &bname, &blocks, &[count, rows, nb, BLOCK_BYTES])?;
    check(src, &sname, &scales, &[count, rows, nb])?;
    if index >= count {
        return Err(RuntimeError::Other(format!(
            "{bname} in {}: expert {index} of {count}",
            src.location_of(&bname)
        )));
    }
    let (per_b, per_s) = (rows * cols / 2, rows * nb);
    Matrix::mxfp4(
        rows,
        cols,
        blocks.data.slice(index * per_b, per_b),
        scales.data.slice(index * per_s, per_s),
    )
    .map_err(|e| RuntimeError::Quant {
        name: format!("{sname}[{index}]"),
        location: src.location_of(&sname),
        source: e,
    })
}

/// The same expert dequantized to f32 by the scalar reference
/// (`mfx_formats::mxfp4`), row-major `[rows, cols]`: for prep's f32 passes
/// and parity checks. Equal, element for element, to transformers'
/// dequantization transposed back to `[out, in]`.
pub fn expert_f32<S: WeightSource + ?Sized>(
    src: &S,
    prefix: &str,
    index: usize,
    count: usize,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, RuntimeError> {
    Ok(expert(src, prefix, index, count, rows, cols)?.dequantize())
}

fn check<S: WeightSource + ?Sized>(
    src: &S,
    name: &str,
    t: &RawTensor,
    want: &[usize],
) -> Result<(), RuntimeError> {
    if t.dtype != DType::U8 {
        return Err(RuntimeError::Dtype {
            name: name.into(),
            location: src.location_of(name),
            dtype: format!("{:?}", t.dtype),
            expected: "U8 (MXFP4 codes or e8m0 scales)".into(),
        });
    }
    if t.shape != want {
        return Err(shape_err(src, name, format!("{want:?}"), &t.shape));
    }
    Ok(())
}
