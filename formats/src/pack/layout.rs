//! Byte layout of one stored tensor (docs/FORMAT.md section 7).
//!
//! The layout is a pure function of scheme and shape, so it is not stored:
//! writer and reader both derive it here and cannot disagree.

use crate::quant::Scheme;

/// Every affine sub-part starts on this boundary so `&[bf16]` views and SIMD
/// loads over mapped memory are aligned.
pub const PART_ALIGN: u64 = 64;
pub const MAX_DIMS: usize = 8;

/// Where the parts of one stored tensor lie, relative to its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorLayout {
    pub scheme: Scheme,
    /// Product of all dims but the last (1 for 0-d and 1-d tensors).
    pub rows: u64,
    /// The last dim (1 for a 0-d tensor).
    pub cols: u64,
    /// Bytes of the element data (raw) or the packed codes (affine, mxfp4).
    pub packed_len: u64,
    /// Sub-offset of the scales (bf16 for affine, e8m0 bytes for mxfp4; 0 otherwise).
    pub scales_offset: u64,
    /// Sub-offset of the bf16 biases (affine only; 0 otherwise).
    pub biases_offset: u64,
    /// Bytes of scales, equally of biases for affine (0 for raw schemes).
    pub groups_len: u64,
    /// Total stored bytes.
    pub length: u64,
}

fn up64(x: u64) -> Option<u64> {
    x.checked_add(PART_ALIGN - 1).map(|v| v & !(PART_ALIGN - 1))
}

impl TensorLayout {
    /// Derives the layout, or explains why the scheme/shape pair is impossible.
    pub fn of(scheme: Scheme, shape: &[u64]) -> Result<TensorLayout, String> {
        scheme.validate().map_err(|e| e.to_string())?;
        if shape.len() > MAX_DIMS {
            return Err(format!("{} dims, at most {MAX_DIMS} allowed", shape.len()));
        }
        let cols = shape.last().copied().unwrap_or(1);
        let mut rows: u64 = 1;
        for &d in shape.iter().take(shape.len().saturating_sub(1)) {
            rows = rows.checked_mul(d).ok_or("element count overflows u64")?;
        }
        let numel = rows
            .checked_mul(cols)
            .ok_or("element count overflows u64")?;
        let mut l = TensorLayout {
            scheme,
            rows,
            cols,
            packed_len: 0,
            scales_offset: 0,
            biases_offset: 0,
            groups_len: 0,
            length: 0,
        };
        match scheme {
            Scheme::F32 | Scheme::F16 | Scheme::Bf16 => {
                let es = if scheme == Scheme::F32 { 4 } else { 2 };
                l.packed_len = numel.checked_mul(es).ok_or("byte size overflows u64")?;
                l.length = l.packed_len;
            }
            Scheme::Affine { bits, group_size } => {
                if shape.is_empty() {
                    return Err("an affine tensor needs at least one dimension".into());
                }
                let g = group_size as u64;
                if cols % g != 0 {
                    return Err(format!(
                        "last dim {cols} is not a multiple of the group size {g}"
                    ));
                }
                let bits = bits as u64;
                if !(cols * bits).is_multiple_of(32) {
                    return Err(format!(
                        "last dim {cols} times {bits} bits is not a multiple of 32"
                    ));
                }
                let packed_bits = numel.checked_mul(bits).ok_or("byte size overflows u64")?;
                l.packed_len = packed_bits / 8;
                l.groups_len = (numel / g)
                    .checked_mul(2)
                    .ok_or("byte size overflows u64")?;
                l.scales_offset = up64(l.packed_len).ok_or("byte size overflows u64")?;
                let s_end = l
                    .scales_offset
                    .checked_add(l.groups_len)
                    .ok_or("byte size overflows u64")?;
                l.biases_offset = up64(s_end).ok_or("byte size overflows u64")?;
                l.length = l
                    .biases_offset
                    .checked_add(l.groups_len)
                    .ok_or("byte size overflows u64")?;
            }
            Scheme::Mxfp4 => {
                // codes | pad to 64 | one e8m0 byte per 32 elements.
                if shape.is_empty() {
                    return Err("an mxfp4 tensor needs at least one dimension".into());
                }
                if cols % crate::mxfp4::BLOCK as u64 != 0 {
                    return Err(format!("last dim {cols} is not a multiple of 32"));
                }
                l.packed_len = numel / 2;
                l.groups_len = numel / crate::mxfp4::BLOCK as u64;
                l.scales_offset = up64(l.packed_len).ok_or("byte size overflows u64")?;
                l.length = l
                    .scales_offset
                    .checked_add(l.groups_len)
                    .ok_or("byte size overflows u64")?;
            }
        }
        Ok(l)
    }

    pub fn is_affine(&self) -> bool {
        matches!(self.scheme, Scheme::Affine { .. })
    }

    /// The (offset, length) of each stored part in order: one for raw
    /// schemes, `packed, scales, biases` for affine ones, `blocks, scales`
    /// for mxfp4.
    pub fn parts(&self) -> Vec<(u64, u64)> {
        match self.scheme {
            Scheme::Affine { .. } => vec![
                (0, self.packed_len),
                (self.scales_offset, self.groups_len),
                (self.biases_offset, self.groups_len),
            ],
            Scheme::Mxfp4 => vec![(0, self.packed_len), (self.scales_offset, self.groups_len)],
            Scheme::F32 | Scheme::F16 | Scheme::Bf16 => vec![(0, self.packed_len)],
        }
    }

    /// Names of [`Self::parts`], for error messages.
    pub fn part_names(&self) -> &'static [&'static str] {
        match self.scheme {
            Scheme::Affine { .. } => &["packed", "scales", "biases"],
            Scheme::Mxfp4 => &["blocks", "scales"],
            Scheme::F32 | Scheme::F16 | Scheme::Bf16 => &["data"],
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn affine_parts_are_64_aligned_and_sized_like_mlx() {
        // q_proj of the shared MLX model: [256, 256] at 4 bits, group 64
        // -> uint32 [256, 32] packed, bf16 [256, 4] scales and biases.
        let l = TensorLayout::of(Scheme::affine(4, 64).unwrap(), &[256, 256]).unwrap();
        assert_eq!(l.packed_len, 256 * 32 * 4);
        assert_eq!(l.groups_len, 256 * 4 * 2);
        assert_eq!(l.scales_offset % 64, 0);
        assert_eq!(l.biases_offset % 64, 0);
        assert_eq!(l.length, l.biases_offset + l.groups_len);
        assert_eq!(l.length, 36864);
        // 3 bits: 64 cols * 3 bits = 24 bytes per row, 72 in all: an
        // odd packed length forces real padding before the scales.
        let l = TensorLayout::of(Scheme::affine(3, 32).unwrap(), &[3, 64]).unwrap();
        assert_eq!(l.packed_len, 72);
        assert_eq!(l.scales_offset, 128);
        assert_eq!(l.biases_offset, 128 + 64);
        assert_eq!(l.length, 204, "the worked example of FORMAT.md section 12");
    }

    #[test]
    fn mxfp4_is_codes_then_scales() {
        // gpt-oss-120b's down_proj: [2880, 2880] -> 4147200 code bytes,
        // 259200 scales; 4.25 bits per weight up to the 64-byte pad.
        let l = TensorLayout::of(Scheme::Mxfp4, &[2880, 2880]).unwrap();
        assert_eq!(l.packed_len, 2880 * 2880 / 2);
        assert_eq!(l.scales_offset, 4147200);
        assert_eq!(l.groups_len, 2880 * 90);
        assert_eq!(l.length, 4147200 + 259200);
        assert_eq!(l.parts(), vec![(0, 4147200), (4147200, 259200)]);
        // [3, 32]: 48 code bytes, scales after the pad at 64.
        let l = TensorLayout::of(Scheme::Mxfp4, &[3, 32]).unwrap();
        assert_eq!((l.packed_len, l.scales_offset, l.length), (48, 64, 67));
        assert!(TensorLayout::of(Scheme::Mxfp4, &[4, 48])
            .unwrap_err()
            .contains("multiple of 32"));
        assert!(TensorLayout::of(Scheme::Mxfp4, &[]).is_err());
        assert_eq!(
            Scheme::Mxfp4.matrix_bytes(2880, 2880).unwrap() as f64 * 8.0 / (2880.0 * 2880.0),
            4.25
        );
    }

    #[test]
    fn rejects_impossible_shapes() {
        let q = Scheme::affine(4, 64).unwrap();
        assert!(TensorLayout::of(q, &[4, 100])
            .unwrap_err()
            .contains("group size"));
        assert!(TensorLayout::of(q, &[]).is_err());
        assert!(TensorLayout::of(Scheme::F32, &[u64::MAX, 3])
            .unwrap_err()
            .contains("overflow"));
        assert!(TensorLayout::of(Scheme::F32, &[1; 9])
            .unwrap_err()
            .contains("dims"));
        assert_eq!(TensorLayout::of(Scheme::Bf16, &[]).unwrap().length, 2);
    }
}
