//! The Metal path, checked without a Mac: naga (wgpu's shader compiler)
//! parses and validates every WGSL shader and writes Metal Shading Language
//! and SPIR-V for it. This proves the shaders are inside what naga's MSL
//! backend supports; it does not run them on Apple hardware.

use mfx_gpu::{wgsl_to_msl, SHADERS};

#[test]
fn every_shader_translates_to_msl() {
    for (name, src) in SHADERS {
        let msl = wgsl_to_msl(src).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            msl.contains("kernel void"),
            "{name}: no compute entry point in\n{msl}"
        );
        assert!(
            msl.contains("threadgroup"),
            "{name}: workgroup memory missing in MSL"
        );
    }
}

#[test]
fn every_shader_translates_to_spirv() {
    for (name, src) in SHADERS {
        let module = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{name}: {e}"));
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name} needs no optional capability: {e}"));
        let words = naga::back::spv::write_vec(&module, &info, &Default::default(), None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(words[0], 0x0723_0203, "{name}: not a SPIR-V module");
    }
}

/// Opcodes of a SPIR-V module's instructions (after the 5-word header).
fn opcodes(words: &[u32]) -> Vec<u32> {
    let mut ops = Vec::new();
    let mut i = 5;
    while i < words.len() {
        ops.push(words[i] & 0xffff);
        i += (words[i] >> 16).max(1) as usize;
    }
    ops
}

#[test]
fn dot4i8packed_is_native_where_the_device_offers_it() {
    // wgpu-hal passes naga the DotProduct* capabilities when the Vulkan
    // device has VK_KHR_shader_integer_dot_product (core in Vulkan 1.3;
    // lavapipe from Mesa 22.3 and NVIDIA's driver have it): then the
    // mat-vec's dot4I8Packed is one OpSDot on packed 4x8-bit operands.
    // Without them naga writes a polyfill (four BitFieldSExtract pairs and
    // integer multiply-adds): correct, just slower.
    use naga::back::spv::{Capability as C, Options};
    const OP_SDOT: u32 = 4450;
    const OP_BITFIELD_SEXTRACT: u32 = 202;
    let src = mfx_gpu::MATVEC_DP4A_WGSL;
    let module = naga::front::wgsl::parse_str(src).unwrap();
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    )
    .validate(&module)
    .unwrap();
    let spirv = |caps: &[C]| {
        let options = Options {
            lang_version: (1, 6),
            capabilities: Some(caps.iter().copied().collect()),
            ..Default::default()
        };
        opcodes(&naga::back::spv::write_vec(&module, &info, &options, None).unwrap())
    };
    let base = [C::Shader];
    let dot = [
        C::Shader,
        C::DotProduct,
        C::DotProductInput4x8BitPacked,
        C::DotProductInputAll,
        C::DotProductInput4x8Bit,
    ];
    let native = spirv(&dot);
    // Two in dot8 (a function, called four times per chunk).
    assert_eq!(native.iter().filter(|&&o| o == OP_SDOT).count(), 2);
    let polyfill = spirv(&base);
    assert!(!polyfill.contains(&OP_SDOT));
    assert!(polyfill.contains(&OP_BITFIELD_SEXTRACT));
}
