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

/// The tensor-core GEMM is outside `SHADERS`: it needs two optional
/// capabilities (f16 and wgpu's experimental cooperative matrices), and its
/// 16x16 fragments have no Metal counterpart (`simdgroup_matrix` is 8x8;
/// naga would write a `simdgroup_half16x16` that Metal lacks, and wgpu's
/// Metal backend offers the feature for 8x8 f32 only). What is checked:
/// naga parses and validates it with exactly those capabilities, and writes
/// SPIR-V with the KHR cooperative-matrix instructions the NVIDIA Vulkan
/// driver runs.
#[test]
fn coop_gemm_validates_and_translates_to_spirv() {
    use naga::valid::{Capabilities, ValidationFlags, Validator};
    const OP_TYPE_COOP: u32 = 4456;
    const OP_COOP_LOAD: u32 = 4457;
    const OP_COOP_STORE: u32 = 4458;
    const OP_COOP_MULADD: u32 = 4459;
    let src = mfx_gpu::GEMM_COOP_WGSL;
    let module =
        naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
    assert!(
        Validator::new(ValidationFlags::all(), Capabilities::SHADER_FLOAT16)
            .validate(&module)
            .is_err(),
        "cooperative matrices need their capability"
    );
    let caps = Capabilities::COOPERATIVE_MATRIX | Capabilities::SHADER_FLOAT16;
    let info = Validator::new(ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
    // wgpu's Vulkan backend: Restrict on indices, and on buffers unless the
    // device has robustBufferAccess2 (then Unchecked); the unchecked
    // shaders are Unchecked throughout. ReadZeroSkipWrite for good measure.
    use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy as B};
    for (index, buffer) in [
        (B::Unchecked, B::Unchecked),
        (B::Restrict, B::Unchecked),
        (B::Restrict, B::Restrict),
        (B::ReadZeroSkipWrite, B::ReadZeroSkipWrite),
    ] {
        // The capabilities and options wgpu-hal 30's Vulkan backend passes
        // naga on a device with f16, cooperative matrices and integer dot
        // products (an H100), so a capability naga would need beyond them
        // shows up here rather than on the card.
        use naga::back::spv::Capability as C;
        let options = naga::back::spv::Options {
            lang_version: (1, 6),
            capabilities: Some(
                [
                    C::Shader,
                    C::Matrix,
                    C::Sampled1D,
                    C::Image1D,
                    C::ImageQuery,
                    C::DerivativeControl,
                    C::StorageImageExtendedFormats,
                    C::Float16,
                    C::CooperativeMatrixKHR,
                    C::VulkanMemoryModel,
                    C::DotProduct,
                    C::DotProductInput4x8BitPacked,
                    C::DotProductInputAll,
                    C::DotProductInput4x8Bit,
                    C::Int8,
                ]
                .into_iter()
                .collect(),
            ),
            bounds_check_policies: BoundsCheckPolicies {
                index,
                buffer,
                ..Default::default()
            },
            zero_initialize_workgroup_memory:
                naga::back::spv::ZeroInitializeWorkgroupMemoryMode::Native,
            force_loop_bounding: true,
            ..Default::default()
        };
        let pipeline = naga::back::spv::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: "main".into(),
        };
        let words = naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline))
            .unwrap_or_else(|e| panic!("{index:?}/{buffer:?}: {e}"));
        let ops = opcodes(&words);
        let count = |op: u32| ops.iter().filter(|&&o| o == op).count();
        assert!(count(OP_TYPE_COOP) >= 3, "A, B and C fragment types");
        assert_eq!(
            count(OP_COOP_LOAD),
            4,
            "two A and two B loads per 16-deep step"
        );
        assert_eq!(count(OP_COOP_MULADD), 4);
        assert_eq!(
            count(OP_COOP_STORE),
            5,
            "four to Y, one (in store_edge) to staging"
        );
    }
}
