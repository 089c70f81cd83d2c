//! Fuzzes everything that reads untrusted pack bytes.
//!
//! The first input byte picks a mode, so one target covers all of it:
//! - 0: the bytes as a whole pack (parse + verify), as `Pack::open` sees them;
//! - 1: the same after resealing the header and manifest checksums, so
//!   mutations reach manifest validation and blob decoding instead of dying
//!   at the checksum;
//! - 2/3: the rest as a Huffman / zstd expert blob, decoded with a raw length
//!   taken from the next two bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mfx_formats::codec::Codec;
use mfx_formats::pack::parse_and_verify_bytes;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let _ = parse_and_verify_bytes(rest);
        }
        1 => {
            let mut b = rest.to_vec();
            mfx_formats::testing::fix_checksums(&mut b);
            let _ = parse_and_verify_bytes(&b);
        }
        m => {
            if rest.len() < 2 {
                return;
            }
            let raw_len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
            let blob = &rest[2..];
            let codec = if m == 2 { Codec::Huffman } else { Codec::Zstd };
            let decoded = codec.decode(blob, raw_len);
            let checked = codec.check(blob, raw_len as u64);
            // decode and check must agree on validity.
            assert_eq!(
                decoded.is_ok(),
                checked.is_ok(),
                "decode {decoded:?} vs check {checked:?}"
            );
            if let Ok(d) = decoded {
                assert_eq!(d.len(), raw_len);
            }
        }
    }
});
