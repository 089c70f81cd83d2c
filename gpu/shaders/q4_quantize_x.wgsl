// Activations for q4_matvec_dp4a.wgsl: x (f32, cols a multiple of 32) to
// int8 blocks of 32, once per token, as cuda/q4_matvec.cu's quantize_x (and
// llama.cpp's q8_1, mfx's AVX2 int8 tier). Per block b:
//   d = max|x| / 127, code = round-half-even(x * (1/d)) in [-127, 127]
//   (0 when d = 0), and the block's f32 sum of x (the bias term needs the
//   sum of the unrounded x; rounding it would add error for nothing).
// Codes are stored 4 per u32 (byte k = bits [8k, 8k+8)), each 8 values
// de-interleaved as 0,2,4,6 | 1,3,5,7: a q4 weight word holds elements
// 0..7 as nibbles, so its low nibbles (q & 0x0F0F0F0F) are elements 0,2,4,6
// and its high nibbles ((q >> 4) & 0x0F0F0F0F) are 1,3,5,7, and each meets
// its activations in one dot4I8Packed without any shuffling.
//
// One workgroup = 8 blocks x 32 lanes, one value per lane; max and sum meet
// in workgroup memory (no subgroup operations, as the mat-vec shaders).

requires packed_4x8_integer_dot_product;

struct Params {
    blocks: u32,  // cols / 32
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> xq: array<u32>;         // 8 words per block
@group(0) @binding(2) var<storage, read_write> xds: array<vec2<f32>>;  // (d, sum) per block
@group(0) @binding(3) var<uniform> p: Params;

const BLOCKS: u32 = 8u;
const LANES: u32 = 32u;
var<workgroup> amax: array<f32, 256>;
var<workgroup> total: array<f32, 256>;
var<workgroup> codes: array<i32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let lane = li % LANES;
    let first = li - lane;  // this block's lane 0 in workgroup memory
    // 2-D grid, as the mat-vecs, though no real x needs it.
    let b = (wg.y * nwg.x + wg.x) * BLOCKS + (li / LANES);
    let live = b < p.blocks;
    var v = 0.0;
    if (live) {
        v = x[b * LANES + lane];
    }
    amax[li] = abs(v);
    total[li] = v;
    workgroupBarrier();
    // Tree order (16, 8, 4, 2, 1): the sum the host emulation in the parity
    // test reproduces bit for bit.
    for (var step = LANES / 2u; step > 0u; step = step >> 1u) {
        if (lane < step) {
            amax[li] = max(amax[li], amax[li + step]);
            total[li] += total[li + step];
        }
        workgroupBarrier();
    }
    let d = amax[first] / 127.0;
    let id = select(0.0, 1.0 / d, d > 0.0);
    // WGSL's round() is round-half-to-even (__float2int_rn); |v * id| <= 127
    // up to rounding, so the code fits a signed byte.
    codes[li] = i32(round(v * id));
    workgroupBarrier();
    if (live && lane < 8u) {
        // Word `lane` of the block: values 8j + odd + {0, 2, 4, 6}.
        let base = first + (lane >> 1u) * 8u + (lane & 1u);
        xq[b * 8u + lane] = pack4xI8(vec4<i32>(codes[base], codes[base + 2u], codes[base + 4u], codes[base + 6u]));
    }
    if (live && lane == 0u) {
        xds[b] = vec2<f32>(d, total[li]);
    }
}
