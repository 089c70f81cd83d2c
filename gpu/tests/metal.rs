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
