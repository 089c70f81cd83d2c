//! Stage 5: entropy coding. For every expert blob we measure what zstd and
//! the pack's byte-wise Huffman code save on the quantized bytes and store the
//! coded form only where it saves at least `min_saving` of the raw size.
//!
//! Why a threshold: a coded blob must be decoded on every cache miss, on the
//! critical path of a token. zstd decodes ~1-2 GB/s per core and our Huffman
//! decoder is of the same order, while an NVMe SSD reads 3-7 GB/s; below
//! ~10% saving the decode time costs more than the I/O time it saves.
//! Dense tensors are never coded (they are mapped and used in place), but we
//! measure them too so the report shows the real ratios.

use mfx_formats::codec::Codec;
use serde::Serialize;

/// Default minimum saving (fraction of raw bytes) for storing a coded blob.
pub const DEFAULT_MIN_SAVING: f64 = 0.10;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Measure {
    pub raw: u64,
    pub zstd: u64,
    pub huffman: u64,
}

impl Measure {
    pub fn of(raw: &[u8]) -> Self {
        Self {
            raw: raw.len() as u64,
            zstd: Codec::Zstd.encode(raw).len() as u64,
            huffman: Codec::Huffman.encode(raw).len() as u64,
        }
    }

    pub fn add(&mut self, o: &Measure) {
        self.raw += o.raw;
        self.zstd += o.zstd;
        self.huffman += o.huffman;
    }

    /// The codec to store with: the smaller coded form if it saves at least
    /// `min_saving`, else none (ties go to zstd, the faster decoder).
    pub fn choose(&self, min_saving: f64) -> Codec {
        let best = if self.zstd <= self.huffman {
            (Codec::Zstd, self.zstd)
        } else {
            (Codec::Huffman, self.huffman)
        };
        if self.raw > 0 && (1.0 - best.1 as f64 / self.raw as f64) >= min_saving {
            best.0
        } else {
            Codec::None
        }
    }

    pub fn stored(&self, c: Codec) -> u64 {
        match c {
            Codec::None => self.raw,
            Codec::Zstd => self.zstd,
            Codec::Huffman => self.huffman,
        }
    }
}

/// Shannon entropy (bits per code) of the `bits`-bit codes in a packed stream:
/// the floor for any code that treats weights as independent symbols.
pub fn code_entropy(packed: &[u8], bits: u8) -> f64 {
    let n = packed.len() * 8 / bits as usize;
    if n == 0 {
        return 0.0;
    }
    let mut hist = vec![0u64; 1 << bits];
    for i in 0..n {
        hist[mfx_formats::quant::get_bits(packed, i, bits) as usize] += 1;
    }
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_uniform_and_constant_codes() {
        let uniform: Vec<u8> = (0..=255u8).collect();
        assert!((code_entropy(&uniform, 4) - 4.0).abs() < 1e-9);
        assert_eq!(code_entropy(&[0x55; 64], 2), 0.0);
    }

    #[test]
    fn choose_respects_threshold() {
        let m = Measure {
            raw: 1000,
            zstd: 950,
            huffman: 920,
        };
        assert_eq!(m.choose(0.10), Codec::None);
        assert_eq!(m.choose(0.05), Codec::Huffman);
        let skewed: Vec<u8> = (0..4096u32)
            .map(|i| if i % 7 == 0 { 0x10 } else { 0x77 })
            .collect();
        let m = Measure::of(&skewed);
        assert!(m.zstd < m.raw / 2 && m.huffman < m.raw / 2, "{m:?}");
        assert_ne!(m.choose(0.10), Codec::None);
    }
}
