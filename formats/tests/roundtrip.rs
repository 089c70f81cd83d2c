//! Write/read roundtrips: property-based over random tables, plus the
//! determinism and atomic-write promises of the writer.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use mfx_formats::codec::Codec;
use mfx_formats::pack::{Pack, PackWriter, PartData, TensorLayout, FLAG_MXFP4};
use mfx_formats::quant::Scheme;
use mfx_formats::testing;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct TensorSpec {
    scheme: Scheme,
    shape: Vec<u64>,
    seed: u64,
}

#[derive(Debug, Clone)]
struct ExpertSpec {
    layer: u32,
    expert: u32,
    codec: Codec,
    parts: Vec<TensorSpec>,
}

fn scheme_strategy() -> impl Strategy<Value = Scheme> {
    prop_oneof![
        Just(Scheme::F32),
        Just(Scheme::F16),
        Just(Scheme::Bf16),
        (
            prop::sample::select(vec![2u8, 3, 4, 6, 8]),
            prop::sample::select(vec![32u32, 64, 128])
        )
            .prop_map(|(b, g)| Scheme::affine(b, g).unwrap()),
        Just(Scheme::Mxfp4),
    ]
}

fn tensor_strategy() -> impl Strategy<Value = TensorSpec> {
    (
        scheme_strategy(),
        prop::collection::vec(1u64..5, 0..4),
        1u64..3,
        any::<u64>(),
    )
        .prop_map(|(scheme, mut shape, k, seed)| {
            if let Scheme::Affine { group_size, .. } = scheme {
                // Affine needs >= 1 dim and a last dim that is a multiple of the group.
                shape.push(group_size as u64 * k);
            }
            if scheme == Scheme::Mxfp4 {
                // Whole 32-element blocks.
                shape.push(32 * k);
            }
            TensorSpec {
                scheme,
                shape,
                seed,
            }
        })
}

fn expert_strategy() -> impl Strategy<Value = (Codec, Vec<TensorSpec>)> {
    (
        prop::sample::select(vec![Codec::None, Codec::Zstd, Codec::Huffman]),
        prop::collection::vec(tensor_strategy(), 1..4),
    )
}

/// Deterministic bytes for each stored part of a tensor spec.
fn part_bytes(t: &TensorSpec) -> Vec<Vec<u8>> {
    let l = TensorLayout::of(t.scheme, &t.shape).unwrap();
    l.parts()
        .iter()
        .enumerate()
        .map(|(k, &(_, len))| {
            // Low-entropy bytes so the entropy coders have something to do.
            testing::floats(len as usize, t.seed ^ k as u64)
                .iter()
                .map(|f| ((f * 3.0) as i8) as u8)
                .collect()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn write_then_read_gives_back_every_byte(
        tensors in prop::collection::btree_map("[a-z]{1,6}(\\.[a-z0-9]{1,4}){0,2}", tensor_strategy(), 0..6),
        experts in prop::collection::btree_map((0u32..3, 0u32..6), expert_strategy(), 0..6),
        merge in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.mfx");
        let mut w = PackWriter::create(&path, testing::tiny_meta(), 4096).unwrap();
        let tensor_data: Vec<(String, TensorSpec, Vec<Vec<u8>>)> =
            tensors.into_iter().map(|(n, t)| { let b = part_bytes(&t); (n, t, b) }).collect();
        for (name, t, b) in &tensor_data {
            let slices: Vec<&[u8]> = b.iter().map(|v| v.as_slice()).collect();
            w.add_tensor(name, t.scheme, &t.shape, &slices).unwrap();
        }
        let mut expert_data = Vec::new();
        for ((layer, expert), (codec, parts)) in experts {
            let spec = ExpertSpec { layer, expert, codec, parts };
            let bytes: Vec<Vec<Vec<u8>>> = spec.parts.iter().map(part_bytes).collect();
            expert_data.push((spec, bytes));
        }
        // Optionally merge a fresh expert id into the first expert of its layer.
        let merged = if merge { expert_data.first().map(|(s, _)| (s.layer, 1000u32, s.expert)) } else { None };
        for (spec, bytes) in &expert_data {
            let parts: Vec<PartData> = spec.parts.iter().zip(bytes).enumerate().map(|(k, (t, b))| PartData {
                name: format!("p{k}"), scheme: t.scheme, shape: t.shape.clone(), bytes: b.iter().map(|v| v.as_slice()).collect(),
            }).collect();
            w.add_expert(spec.layer, spec.expert, spec.codec, &parts).unwrap();
            // Id 1000 sorts after every id of its layer: add it right after the
            // layer's last expert to keep (layer, expert) order.
            if let Some((ml, mid, into)) = merged {
                let last_of_layer = expert_data.iter().rev().find(|(s, _)| s.layer == ml).map(|(s, _)| s.expert);
                if spec.layer == ml && Some(spec.expert) == last_of_layer {
                    w.add_merged_expert(ml, mid, into).unwrap();
                }
            }
        }
        let summary = w.finish().unwrap();
        prop_assert_eq!(summary.file_length, std::fs::metadata(&path).unwrap().len());
        let any_mxfp4 = tensor_data.iter().any(|(_, t, _)| t.scheme == Scheme::Mxfp4)
            || expert_data.iter().any(|(s, _)| s.parts.iter().any(|p| p.scheme == Scheme::Mxfp4));

        let pack = Pack::open(&path).unwrap();
        let report = pack.verify().unwrap();
        prop_assert_eq!(report.tensors, tensor_data.len());
        prop_assert_eq!(report.expert_blobs, expert_data.len());
        prop_assert_eq!(pack.manifest().config.clone(), testing::tiny_meta().config);
        prop_assert_eq!(pack.header().data_offset % 4096, 0);
        // The feature bit is set exactly when an mxfp4 tensor or part exists.
        prop_assert_eq!(pack.header().flags & FLAG_MXFP4 != 0, any_mxfp4);

        for (name, t, b) in &tensor_data {
            let v = pack.tensor(name).unwrap();
            prop_assert_eq!(v.shape, t.shape.as_slice());
            prop_assert_eq!(v.bytes().as_ptr() as usize % 4096, 0, "blob is page aligned in memory");
            for (&(off, len), want) in v.layout.parts().iter().zip(b) {
                prop_assert_eq!(&v.bytes()[off as usize..(off + len) as usize], want.as_slice());
            }
            match t.scheme {
                Scheme::Bf16 => prop_assert_eq!(v.as_bf16().unwrap().len() * 2, b[0].len()),
                Scheme::F32 => prop_assert_eq!(v.as_f32().unwrap().len() * 4, b[0].len()),
                Scheme::F16 => prop_assert_eq!(v.as_f16().unwrap().len() * 2, b[0].len()),
                Scheme::Affine { .. } => {
                    let a = v.affine().unwrap();
                    prop_assert_eq!(a.packed, b[0].as_slice());
                    prop_assert_eq!(bytemuck::cast_slice::<_, u8>(a.scales), b[1].as_slice());
                    prop_assert_eq!(bytemuck::cast_slice::<_, u8>(a.biases), b[2].as_slice());
                }
                Scheme::Mxfp4 => {
                    let m = v.mxfp4().unwrap();
                    prop_assert_eq!(m.blocks, b[0].as_slice());
                    prop_assert_eq!(m.scales, b[1].as_slice());
                }
            }
        }
        for (spec, bytes) in &expert_data {
            let e = pack.expert(spec.layer, spec.expert).unwrap();
            prop_assert_eq!(e.codec, spec.codec);
            let mut stored = vec![0u8; e.length as usize];
            pack.read_expert_into(e, &mut stored).unwrap();
            prop_assert_eq!(stored.as_slice(), pack.expert_bytes_mapped(e));
            let mut raw = vec![0u8; e.raw_length as usize];
            e.decode_into(&stored, &mut raw).unwrap();
            for (k, want) in bytes.iter().enumerate() {
                let v = e.part(&raw, k).unwrap();
                for (&(off, len), w) in v.layout.parts().iter().zip(want) {
                    prop_assert_eq!(&v.bytes()[off as usize..(off + len) as usize], w.as_slice());
                }
            }
        }
        if let Some((ml, mid, into)) = merged {
            let m = pack.expert(ml, mid).unwrap();
            let r = pack.expert(ml, into).unwrap();
            prop_assert_eq!(m.merged_into, Some(into));
            prop_assert_eq!((m.offset, m.length, m.checksum), (r.offset, r.length, r.checksum));
        }
    }
}

#[test]
fn same_inputs_give_byte_identical_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.mfx");
    let b = dir.path().join("b.mfx");
    testing::write_tiny_pack(&a).unwrap();
    testing::write_tiny_pack(&b).unwrap();
    let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(ba.len() > 4096 * 10);
    assert!(ba == bb, "two writes of the same pack differ");
}

#[test]
fn tiny_pack_verifies_and_serves_every_codec() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.mfx");
    let s = testing::write_tiny_pack(&path).unwrap();
    assert_eq!((s.tensors, s.experts, s.merged_experts), (6, 8, 1));
    // The temp file was renamed away.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("t.mfx")]);

    let pack = Pack::open(&path).unwrap();
    let r = pack.verify().unwrap();
    assert_eq!((r.tensors, r.expert_blobs, r.merged_experts), (6, 7, 1));
    let codecs: Vec<Codec> = (0..4).map(|e| pack.expert(0, e).unwrap().codec).collect();
    assert_eq!(
        codecs,
        [Codec::None, Codec::Zstd, Codec::Huffman, Codec::None]
    );
    // Compressed blobs really are smaller than the raw ones.
    for e in [1, 2] {
        let x = pack.expert(0, e).unwrap();
        assert!(
            x.length < x.raw_length,
            "{:?} did not compress: {} vs {}",
            x.codec,
            x.length,
            x.raw_length
        );
    }
    // The expert parts dequantize to what was quantized (the writer kept layout).
    let e = pack.expert(0, 2).unwrap();
    let mut raw = vec![0u8; e.raw_length as usize];
    e.decode_into(pack.expert_bytes_mapped(e), &mut raw)
        .unwrap();
    let down = e
        .part(&raw, e.part_index("down_proj").unwrap())
        .unwrap()
        .affine()
        .unwrap();
    let (p, s, b) = testing::affine_bytes(64, 32, 2, 32, 100 + 2 * 3 + 2);
    assert_eq!(down.packed, p.as_slice());
    assert_eq!(bytemuck::cast_slice::<_, u8>(down.scales), s.as_slice());
    assert_eq!(bytemuck::cast_slice::<_, u8>(down.biases), b.as_slice());
    // Merged expert L1 E3 points at L1 E0's blob.
    let m = pack.expert(1, 3).unwrap();
    assert_eq!(m.merged_into, Some(0));
    assert_eq!(m.offset, pack.expert(1, 0).unwrap().offset);
    // Metadata survives.
    assert_eq!(
        pack.manifest().chat_template.as_deref(),
        testing::tiny_meta().chat_template.as_deref()
    );
    assert_eq!(pack.manifest().writer.name, "mfx");
    assert!(pack.tensor("nope").is_none());
    assert!(pack
        .tensor("model.norm.weight")
        .unwrap()
        .as_bf16()
        .unwrap_err()
        .to_string()
        .contains("f16"));
}

#[test]
fn writer_rejects_out_of_order_and_bad_sizes_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.mfx");
    let mut w = PackWriter::create(&path, testing::tiny_meta(), 4096).unwrap();
    let d = vec![0u8; 8];
    w.add_tensor("b", Scheme::Bf16, &[4], &[&d]).unwrap();
    let e = w
        .add_tensor("a", Scheme::Bf16, &[4], &[&d])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("canonical order") && e.contains("a after b"),
        "{e}"
    );
    let e = w
        .add_tensor("c", Scheme::Bf16, &[5], &[&d])
        .unwrap_err()
        .to_string();
    assert!(e.contains("tensor c") && e.contains("expected 10"), "{e}");
    let q = Scheme::affine(4, 64).unwrap();
    let e = w
        .add_tensor("c", q, &[2, 64], &[&d])
        .unwrap_err()
        .to_string();
    assert!(e.contains("packed, scales, biases"), "{e}");
    let part = |n: &str| PartData {
        name: n.into(),
        scheme: Scheme::Bf16,
        shape: vec![4],
        bytes: vec![&d[..]],
    };
    w.add_expert(0, 5, Codec::None, &[part("gate_proj")])
        .unwrap();
    let e = w
        .add_expert(0, 5, Codec::None, &[part("gate_proj")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("expert L0 E5 after expert L0 E5"), "{e}");
    let e = w
        .add_tensor("z", Scheme::Bf16, &[4], &[&d])
        .unwrap_err()
        .to_string();
    assert!(e.contains("before the experts"), "{e}");
    w.add_merged_expert(0, 7, 6).unwrap();
    let e = w.finish().unwrap_err().to_string();
    assert!(
        e.contains("expert L0 E7") && e.contains("never added"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temp file left behind"
    );
}
