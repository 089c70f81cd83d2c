//! Writes the seed corpus for `pack_reader` (run without sanitizers):
//! `cargo run --release --bin make_seeds -- corpus/pack_reader`.

use mfx_formats::codec::Codec;

fn main() {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "corpus/pack_reader".into()),
    );
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    let tmp = dir.join("micro.mfx.src");
    mfx_formats::testing::write_micro_pack(&tmp).expect("write micro pack");
    let pack = std::fs::read(&tmp).expect("read micro pack");
    std::fs::remove_file(&tmp).expect("remove temp");
    for mode in [0u8, 1] {
        let mut seed = vec![mode];
        seed.extend_from_slice(&pack);
        std::fs::write(dir.join(format!("pack-mode{mode}")), seed).expect("write seed");
    }
    let raw: Vec<u8> = (0..600u32).map(|i| ((i * i) % 7) as u8 * 3).collect();
    for (mode, codec) in [(2u8, Codec::Huffman), (3, Codec::Zstd)] {
        let mut seed = vec![mode];
        seed.extend_from_slice(&(raw.len() as u16).to_le_bytes());
        seed.extend_from_slice(&codec.encode(&raw));
        std::fs::write(dir.join(format!("blob-{}", codec.name())), seed).expect("write seed");
    }
    println!("seeds written to {}", dir.display());
}
