//! Expert blob codecs (docs/FORMAT.md section 8).
//!
//! Low-bit expert weights are not uniformly distributed (codes near the
//! middle of the range dominate), so an entropy coder wins 5-20% of SSD
//! traffic on the streamed path. `zstd` is the general choice; `huffman` is a
//! byte-wise canonical Huffman code whose table is 256 code lengths, simple
//! enough to specify completely and to decode without a dependency.
//!
//! Everything here is deterministic: the same input gives the same bytes.

use serde::{Deserialize, Serialize};

use crate::error::FormatError;

/// How one expert blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    #[default]
    None,
    Zstd,
    Huffman,
}

/// zstd level the writer uses: prep compresses hundreds of GB, so favour speed;
/// decoders do not care which level made a frame.
pub const ZSTD_LEVEL: i32 = 3;
/// Longest Huffman code; keeps the decoder's bit window in one u32.
pub const HUFFMAN_MAX_LEN: u8 = 24;
const HUFFMAN_TABLE: usize = 256;
/// Codes up to this length decode with one table lookup.
const LUT_BITS: u32 = 12;

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Zstd => "zstd",
            Codec::Huffman => "huffman",
        }
    }

    /// Encodes a decoded blob into its stored form.
    pub fn encode(self, raw: &[u8]) -> Vec<u8> {
        match self {
            Codec::None => raw.to_vec(),
            Codec::Zstd => zstd_encode(raw),
            Codec::Huffman => huffman_encode(raw),
        }
    }

    /// Decodes `stored` into a new buffer of exactly `raw_len` bytes.
    pub fn decode(self, stored: &[u8], raw_len: usize) -> Result<Vec<u8>, FormatError> {
        // Refuse before allocating when the stored bytes cannot decode to
        // `raw_len` (a hostile length must not make us allocate it).
        match self {
            Codec::Huffman => {
                huffman_bound(stored, raw_len as u64).map_err(|r| self.err("blob", r))?
            }
            Codec::Zstd => {
                zstd_one_frame(stored).map_err(|r| self.err("blob", r))?;
                if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(stored) {
                    if n != raw_len as u64 {
                        return Err(
                            self.err("blob", format!("frame holds {n} bytes, expected {raw_len}"))
                        );
                    }
                }
            }
            Codec::None => {}
        }
        let mut out = vec![0u8; raw_len];
        self.decode_into(stored, &mut out)?;
        Ok(out)
    }

    /// Decodes `stored` into `out`, which must be exactly the decoded length.
    /// This is the runtime's path: the cache owns `out`, nothing allocates.
    pub fn decode_into(self, stored: &[u8], out: &mut [u8]) -> Result<(), FormatError> {
        match self {
            Codec::None => {
                if stored.len() != out.len() {
                    return Err(self.err(
                        "blob",
                        format!(
                            "{} stored bytes for {} decoded bytes",
                            stored.len(),
                            out.len()
                        ),
                    ));
                }
                out.copy_from_slice(stored);
                Ok(())
            }
            Codec::Zstd => {
                zstd_one_frame(stored).map_err(|r| self.err("blob", r))?;
                let n = zstd::bulk::Decompressor::new()
                    .and_then(|mut d| d.decompress_to_buffer(stored, out))
                    .map_err(|e| self.err("blob", e.to_string()))?;
                if n != out.len() {
                    return Err(
                        self.err("blob", format!("decoded {n} bytes, expected {}", out.len()))
                    );
                }
                Ok(())
            }
            Codec::Huffman => huffman_decode_into(stored, out).map_err(|r| self.err("blob", r)),
        }
    }

    /// Checks that `stored` decodes to exactly `raw_len` bytes without holding
    /// the decoded blob (a hostile `raw_len` must not make us allocate it).
    pub fn check(self, stored: &[u8], raw_len: u64) -> Result<(), FormatError> {
        match self {
            Codec::None => {
                if stored.len() as u64 != raw_len {
                    return Err(self.err(
                        "blob",
                        format!("{} stored bytes for {raw_len} decoded bytes", stored.len()),
                    ));
                }
                Ok(())
            }
            Codec::Zstd => {
                use std::io::Read;
                zstd_one_frame(stored).map_err(|r| self.err("blob", r))?;
                let mut dec = zstd::stream::read::Decoder::with_buffer(stored)
                    .map_err(|e| self.err("blob", e.to_string()))?;
                let mut buf = vec![0u8; 1 << 16];
                let mut total: u64 = 0;
                loop {
                    let n = dec
                        .read(&mut buf)
                        .map_err(|e| self.err("blob", e.to_string()))?;
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                    if total > raw_len {
                        return Err(
                            self.err("blob", format!("decodes to more than {raw_len} bytes"))
                        );
                    }
                }
                if total != raw_len {
                    return Err(
                        self.err("blob", format!("decoded {total} bytes, expected {raw_len}"))
                    );
                }
                Ok(())
            }
            Codec::Huffman => {
                let mut d =
                    HuffmanDecoder::new(stored, raw_len).map_err(|r| self.err("blob", r))?;
                for _ in 0..raw_len {
                    d.next().map_err(|r| self.err("blob", r))?;
                }
                d.finish().map_err(|r| self.err("blob", r))
            }
        }
    }

    fn err(self, what: &str, reason: impl Into<String>) -> FormatError {
        FormatError::Codec {
            what: what.into(),
            codec: self.name(),
            reason: reason.into(),
        }
    }
}

/// One zstd frame with the content size and the content checksum (XXH64)
/// flags set, so decoding itself detects a corrupt frame even when the caller
/// skips the blob checksum on the hot path.
fn zstd_encode(raw: &[u8]) -> Vec<u8> {
    // The only failures left with a valid constant level and parameter and
    // a bound-sized output buffer are allocation failures, which abort anyway.
    let mut c = zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd context");
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
        .expect("zstd checksum flag");
    c.compress(raw)
        .expect("zstd compress into a bound-sized buffer")
}

/// The spec allows exactly one frame and nothing after it. libzstd's one-shot
/// decoder would also accept zero or several concatenated frames while the
/// streaming one would not, so pin it down before either runs (found by
/// fuzzing: an empty blob "decoded" to zero bytes).
fn zstd_one_frame(stored: &[u8]) -> Result<(), String> {
    match zstd::zstd_safe::find_frame_compressed_size(stored) {
        Ok(n) if n == stored.len() => Ok(()),
        Ok(n) => Err(format!(
            "{} bytes after the zstd frame of {n} bytes",
            stored.len() - n
        )),
        Err(code) => Err(format!(
            "not a zstd frame: {}",
            zstd::zstd_safe::get_error_name(code)
        )),
    }
}

/// A Huffman blob spends at least one bit per symbol, so its decoded size is
/// bounded by its stored size: check that before allocating.
pub(crate) fn huffman_bound(stored: &[u8], raw_len: u64) -> Result<(), String> {
    huffman_bound_len(stored.len() as u64, raw_len)
}

/// [`huffman_bound`] on sizes alone, for validating a manifest entry.
pub(crate) fn huffman_bound_len(stored_len: u64, raw_len: u64) -> Result<(), String> {
    if stored_len < HUFFMAN_TABLE as u64 {
        return Err(format!(
            "{stored_len} bytes is shorter than the 256-byte Huffman code table"
        ));
    }
    let bits = (stored_len - HUFFMAN_TABLE as u64).saturating_mul(8);
    if raw_len > bits {
        return Err(format!("{raw_len} symbols cannot fit in {bits} bits"));
    }
    Ok(())
}

/// Code lengths from `huffman-compress`'s tree, limited to [`HUFFMAN_MAX_LEN`]
/// by halving the counts (rarely needed: it takes a very skewed blob of
/// millions of bytes to exceed 24 bits).
fn huffman_lengths(raw: &[u8]) -> [u8; 256] {
    let mut counts = [0u64; 256];
    for &b in raw {
        counts[b as usize] += 1;
    }
    let mut lens = [0u8; 256];
    let used: Vec<u8> = (0..=255u8).filter(|&s| counts[s as usize] > 0).collect();
    match used.len() {
        0 => return lens,
        1 => {
            lens[used[0] as usize] = 1;
            return lens;
        }
        _ => {}
    }
    loop {
        let weights: Vec<(u8, u64)> = used.iter().map(|&s| (s, counts[s as usize])).collect();
        let (book, _tree) = huffman_compress::CodeBuilder::from_iter(weights).finish();
        let mut max = 0;
        for (&s, code) in book.iter() {
            lens[s as usize] = code.len() as u8;
            max = max.max(code.len());
        }
        if max <= HUFFMAN_MAX_LEN as usize {
            return lens;
        }
        for &s in &used {
            let c = &mut counts[s as usize];
            *c = (*c / 2).max(1);
        }
    }
}

/// Canonical codes (RFC 1951 3.2.2) for the given lengths: `codes[s]`.
fn canonical_codes(lens: &[u8; 256]) -> [u32; 256] {
    let mut order: Vec<u8> = (0..=255u8).filter(|&s| lens[s as usize] > 0).collect();
    order.sort_by_key(|&s| (lens[s as usize], s));
    let mut codes = [0u32; 256];
    let mut code: u32 = 0;
    let mut prev_len = 0u8;
    for (i, &s) in order.iter().enumerate() {
        let l = lens[s as usize];
        if i > 0 {
            code = (code + 1) << (l - prev_len);
        }
        codes[s as usize] = code;
        prev_len = l;
    }
    codes
}

fn huffman_encode(raw: &[u8]) -> Vec<u8> {
    let lens = huffman_lengths(raw);
    let codes = canonical_codes(&lens);
    let mut out = Vec::with_capacity(HUFFMAN_TABLE + raw.len() / 2);
    out.extend_from_slice(&lens);
    let mut acc: u64 = 0;
    let mut nbits: u32 = 0;
    for &b in raw {
        let l = lens[b as usize] as u32;
        acc = (acc << l) | codes[b as usize] as u64;
        nbits += l;
        while nbits >= 8 {
            nbits -= 8;
            out.push((acc >> nbits) as u8);
        }
        acc &= (1u64 << nbits) - 1;
    }
    if nbits > 0 {
        out.push((acc << (8 - nbits)) as u8);
    }
    out
}

/// Decodes a whole Huffman blob into `out`. The hot loop does one 8-byte
/// load per two symbols (a load leaves >= 57 fresh bits, two codes need at
/// most 48), so it never bounds-checks the stream per symbol; the last few
/// bytes go through the careful per-symbol path.
fn huffman_decode_into(stored: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut d = HuffmanDecoder::new(stored, out.len() as u64)?;
    let bits = d.bits;
    let mut i = 0;
    if bits.len() >= 8 {
        let last_load = bits.len() - 8;
        while i + 2 <= out.len() {
            let byte = (d.pos / 8) as usize;
            if byte > last_load {
                break;
            }
            let Ok(b) = <[u8; 8]>::try_from(&bits[byte..byte + 8]) else {
                break;
            };
            let mut w = u64::from_be_bytes(b) << (d.pos % 8);
            for _ in 0..2 {
                let (sym, len) = d.lut[(w >> (64 - LUT_BITS)) as usize];
                let (sym, len) = if len > 0 {
                    (sym, len as u32)
                } else {
                    d.slow((w >> (64 - HUFFMAN_MAX_LEN as u32)) as u32)?
                };
                out[i] = sym;
                i += 1;
                d.pos += len as u64;
                w <<= len;
            }
        }
    }
    for o in &mut out[i..] {
        *o = d.next()?;
    }
    d.finish()
}

/// Streaming canonical-Huffman decoder over one stored blob.
struct HuffmanDecoder<'a> {
    bits: &'a [u8],
    /// Next unread bit position in `bits`.
    pos: u64,
    total_bits: u64,
    /// `count[l]`: number of codes of length `l`.
    count: [u32; HUFFMAN_MAX_LEN as usize + 1],
    /// Symbols sorted by (length, value).
    sorted: Vec<u8>,
    /// For the next LUT_BITS bits: (symbol, length), length 0 = take the slow path.
    lut: Vec<(u8, u8)>,
}

impl<'a> HuffmanDecoder<'a> {
    fn new(stored: &'a [u8], raw_len: u64) -> Result<Self, String> {
        huffman_bound(stored, raw_len)?;
        let mut lens = [0u8; 256];
        lens.copy_from_slice(&stored[..HUFFMAN_TABLE]);
        let mut count = [0u32; HUFFMAN_MAX_LEN as usize + 1];
        let mut kraft: u64 = 0;
        for (s, &l) in lens.iter().enumerate() {
            if l > HUFFMAN_MAX_LEN {
                return Err(format!(
                    "code length {l} of byte {s} exceeds {HUFFMAN_MAX_LEN}"
                ));
            }
            if l > 0 {
                count[l as usize] += 1;
                kraft += 1u64 << (HUFFMAN_MAX_LEN - l);
            }
        }
        if kraft > 1u64 << HUFFMAN_MAX_LEN {
            return Err("over-subscribed code table (Kraft sum > 1)".into());
        }
        if kraft == 0 && raw_len > 0 {
            return Err(format!("empty code table for {raw_len} symbols"));
        }
        let mut sorted: Vec<u8> = (0..=255u8).filter(|&s| lens[s as usize] > 0).collect();
        sorted.sort_by_key(|&s| (lens[s as usize], s));
        let codes = canonical_codes(&lens);
        let mut lut = vec![(0u8, 0u8); 1 << LUT_BITS];
        for &s in &sorted {
            let l = lens[s as usize] as u32;
            if l <= LUT_BITS {
                let base = (codes[s as usize] << (LUT_BITS - l)) as usize;
                for e in &mut lut[base..base + (1 << (LUT_BITS - l))] {
                    *e = (s, l as u8);
                }
            }
        }
        let bits = &stored[HUFFMAN_TABLE..];
        Ok(HuffmanDecoder {
            bits,
            pos: 0,
            total_bits: bits.len() as u64 * 8,
            count,
            sorted,
            lut,
        })
    }

    /// The next `HUFFMAN_MAX_LEN` bits, MSB first, zero past the end.
    #[inline]
    fn peek(&self) -> u32 {
        let byte = (self.pos / 8) as usize;
        // Fast path: one big-endian load of 8 bytes holds the (at most 7)
        // already-consumed bits of this byte plus the 24 we want.
        let w = match self
            .bits
            .get(byte..byte + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
        {
            Some(b) => u64::from_be_bytes(b),
            None => {
                let mut w: u64 = 0;
                for k in 0..8 {
                    w = (w << 8) | *self.bits.get(byte + k).unwrap_or(&0) as u64;
                }
                w
            }
        };
        ((w << (self.pos % 8)) >> (64 - HUFFMAN_MAX_LEN as u32)) as u32
    }

    #[inline]
    fn next(&mut self) -> Result<u8, String> {
        let w = self.peek();
        let (sym, len) = self.lut[(w >> (HUFFMAN_MAX_LEN as u32 - LUT_BITS)) as usize];
        let (sym, len) = if len > 0 {
            (sym, len as u32)
        } else {
            self.slow(w)?
        };
        if self.pos + len as u64 > self.total_bits {
            return Err(format!("bit stream ends early at bit {}", self.pos));
        }
        self.pos += len as u64;
        Ok(sym)
    }

    /// Canonical decode one bit at a time (zlib's puff.c algorithm).
    fn slow(&self, w: u32) -> Result<(u8, u32), String> {
        let (mut code, mut first, mut index): (i64, i64, i64) = (0, 0, 0);
        for len in 1..=HUFFMAN_MAX_LEN as u32 {
            code |= ((w >> (HUFFMAN_MAX_LEN as u32 - len)) & 1) as i64;
            let count = self.count[len as usize] as i64;
            if code - count < first {
                let i = (index + code - first) as usize;
                return Ok((self.sorted[i], len));
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        Err(format!("invalid code at bit {}", self.pos))
    }

    /// The stream must end in the byte holding the last code, padded with zeros.
    fn finish(&self) -> Result<(), String> {
        let used_bytes = self.pos.div_ceil(8);
        if used_bytes != self.bits.len() as u64 {
            return Err(format!(
                "{} bytes after the last symbol",
                self.bits.len() as u64 - used_bytes
            ));
        }
        if !self.pos.is_multiple_of(8) {
            let last = self.bits[self.bits.len() - 1];
            if last & (0xffu8 >> (self.pos % 8)) != 0 {
                return Err("non-zero padding bits after the last symbol".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn skewed(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (x >> 33) as u32;
                // Roughly geometric: small values dominate, like low-bit codes.
                (r.trailing_zeros().min(14) as u8) * 17 + (r >> 28) as u8 % 3
            })
            .collect()
    }

    #[test]
    fn every_codec_roundtrips() {
        for data in [
            vec![],
            vec![7u8],
            vec![9u8; 1000],
            skewed(50_000, 1),
            (0..=255u8).cycle().take(4096).collect(),
        ] {
            for c in [Codec::None, Codec::Zstd, Codec::Huffman] {
                let enc = c.encode(&data);
                assert_eq!(
                    c.decode(&enc, data.len()).unwrap(),
                    data,
                    "{c:?} len {}",
                    data.len()
                );
                c.check(&enc, data.len() as u64).unwrap();
                assert_eq!(enc, c.encode(&data), "deterministic");
            }
        }
    }

    #[test]
    fn huffman_compresses_skewed_bytes_and_matches_entropy() {
        let data = skewed(100_000, 2);
        let enc = huffman_encode(&data);
        let mut counts = [0f64; 256];
        for &b in &data {
            counts[b as usize] += 1.0;
        }
        let n = data.len() as f64;
        let entropy_bytes: f64 = counts
            .iter()
            .filter(|&&c| c > 0.0)
            .map(|&c| -c * (c / n).log2())
            .sum::<f64>()
            / 8.0;
        let payload = (enc.len() - 256) as f64;
        // Huffman is within 1 bit/symbol of the entropy, and in practice far closer.
        assert!(
            payload >= entropy_bytes && payload < entropy_bytes * 1.1 + 16.0,
            "{payload} vs {entropy_bytes}"
        );
    }

    #[test]
    fn huffman_table_is_canonical_and_kraft_complete() {
        let lens = huffman_lengths(&skewed(10_000, 3));
        let kraft: f64 = lens
            .iter()
            .filter(|&&l| l > 0)
            .map(|&l| 0.5f64.powi(l as i32))
            .sum();
        assert!((kraft - 1.0).abs() < 1e-12);
        // Canonical: codes of equal length increase with the symbol value.
        let codes = canonical_codes(&lens);
        for a in 0..256 {
            for b in a + 1..256 {
                if lens[a] > 0 && lens[a] == lens[b] {
                    assert!(codes[a] < codes[b]);
                }
            }
        }
    }

    #[test]
    fn long_codes_are_limited() {
        // Fibonacci-like counts force a maximally deep tree without limiting.
        let mut data = Vec::new();
        let (mut a, mut b) = (1usize, 1usize);
        for s in 0..30u8 {
            data.extend(std::iter::repeat_n(s, a));
            (a, b) = (b, a + b);
        }
        let lens = huffman_lengths(&data);
        assert!(lens.iter().all(|&l| l <= HUFFMAN_MAX_LEN));
        assert!(
            lens.iter().any(|&l| l == HUFFMAN_MAX_LEN || l > 20),
            "the tree was deep: {:?}",
            &lens[..30]
        );
        let enc = huffman_encode(&data);
        assert_eq!(Codec::Huffman.decode(&enc, data.len()).unwrap(), data);
    }

    #[test]
    fn hostile_huffman_blobs_are_rejected() {
        let data = skewed(1000, 4);
        let enc = huffman_encode(&data);
        let err = |e: FormatError| e.to_string();
        // Too short for the table.
        assert!(err(Codec::Huffman.decode(&enc[..100], 10).unwrap_err()).contains("code table"));
        // Over-subscribed: three codes of length 1.
        let mut bad = enc.clone();
        bad[..256].fill(0);
        bad[0] = 1;
        bad[1] = 1;
        bad[2] = 1;
        assert!(err(Codec::Huffman.decode(&bad, 10).unwrap_err()).contains("over-subscribed"));
        // Length beyond the cap.
        let mut bad = enc.clone();
        bad[0] = 30;
        assert!(err(Codec::Huffman.decode(&bad, 10).unwrap_err()).contains("exceeds"));
        // Claims more symbols than bits.
        assert!(err(Codec::Huffman.decode(&enc, 1_000_000).unwrap_err()).contains("cannot fit"));
        // One symbol too many: stream ends early (or runs into padding that is
        // no valid code); one too few: bytes left over.
        assert!(Codec::Huffman.decode(&enc, data.len() + 8).is_err());
        assert!(
            err(Codec::Huffman.decode(&enc, data.len() - 8).unwrap_err())
                .contains("after the last symbol")
        );
        // Zstd: garbage and wrong sizes.
        let z = Codec::Zstd.encode(&data);
        assert!(Codec::Zstd.decode(&z, data.len() - 1).is_err());
        assert!(Codec::Zstd.check(&z, data.len() as u64 + 1).is_err());
        assert!(Codec::Zstd.decode(&data, 10).is_err());
        // Regression (cargo-fuzz crash-7afe1150): no frame at all, or a second
        // frame after the first, must fail in decode and check alike.
        assert!(Codec::Zstd.decode(&[], 0).is_err());
        assert!(Codec::Zstd.check(&[], 0).is_err());
        let mut two = z.clone();
        two.extend_from_slice(&z);
        assert!(
            err(Codec::Zstd.decode(&two, data.len()).unwrap_err()).contains("after the zstd frame")
        );
        assert!(Codec::Zstd.check(&two, data.len() as u64).is_err());
    }
}
