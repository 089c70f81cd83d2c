// y = W x for mfx's q4 layout with int8 activations: the algorithm of
// cuda/q4_matvec.cu's q4_matvec_dp4a<1> (and llama.cpp's MMVQ). W as in
// q4_matvec_r1.wgsl (row-major little-endian nibble streams, bf16 scale and
// bias per group of 64); x comes from q4_quantize_x.wgsl as int8 blocks of
// 32 (block c = the 32 elements of weight chunk c) with a scale d and the
// f32 sum s of the unrounded block. Per chunk and row:
//   sum_i (scale q_i + bias) x_i ~= scale * d * sum_i q_i code_i + bias * s
// The integer dot runs on packed bytes (dot4I8Packed: SPIR-V OpSDot, dp4a on
// NVIDIA) instead of converting each nibble to f32, and x costs 40 bytes per
// 16 bytes of weights instead of 128. Nibbles are 0..15, so reading them as
// signed bytes changes nothing.
//
// Layout of work as R1: one workgroup = ROWS rows x 32 lanes, a lane strides
// over the row's 16-byte chunks (coalesced), partial sums meet in workgroup
// memory. No subgroup operations.

requires packed_4x8_integer_dot_product;

struct Params {
    rows: u32,
    cols: u32,
    // Offsets (in elements of each binding) so that one buffer can hold several
    // matrices (an expert cache slab); 0 for a lone matrix.
    w_off: u32,   // in vec4<u32>
    sb_off: u32,  // in groups (must be even: bf16 pairs share a word)
}

@group(0) @binding(0) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> scales: array<u32>;
@group(0) @binding(2) var<storage, read> biases: array<u32>;
@group(0) @binding(3) var<storage, read> xq: array<vec4<u32>>;   // 2 per block
@group(0) @binding(4) var<storage, read> xds: array<vec2<f32>>;  // (d, sum) per block
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<uniform> p: Params;

const ROWS: u32 = 8u;
const LANES: u32 = 32u;
const LOW: u32 = 0x0F0F0F0Fu;
var<workgroup> partial: array<f32, 256>;

fn bf16_at(buf_is_scale: bool, g: u32) -> f32 {
    var word: u32;
    if (buf_is_scale) { word = scales[g >> 1u]; } else { word = biases[g >> 1u]; }
    let bits = select(word << 16u, word & 0xffff0000u, (g & 1u) == 1u);
    return bitcast<f32>(bits);
}

// sum of the 8 nibbles of q times their codes: a = codes of elements
// 0,2,4,6 (the low nibbles), b = 1,3,5,7 (the high ones).
fn dot8(q: u32, a: u32, b: u32) -> i32 {
    return dot4I8Packed(q & LOW, a) + dot4I8Packed((q >> 4u) & LOW, b);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let lane = li % LANES;
    let sub = li / LANES;
    // 2-D grid: rows beyond 65535 workgroups (lm_head) spill into y.
    let row = (wg.y * nwg.x + wg.x) * ROWS + sub;
    var acc = 0.0;
    if (row < p.rows) {
        let chunks = p.cols / 32u;            // vec4<u32> per row = blocks of x
        let gpr = p.cols / 64u;               // groups per row
        let wrow = p.w_off + row * chunks;
        let grow = p.sb_off + row * gpr;
        for (var c = lane; c < chunks; c += LANES) {
            let q = w[wrow + c];
            let a0 = xq[2u * c];
            let a1 = xq[2u * c + 1u];
            let ds = xds[c];
            let idot = dot8(q.x, a0.x, a0.y) + dot8(q.y, a0.z, a0.w)
                    + dot8(q.z, a1.x, a1.y) + dot8(q.w, a1.z, a1.w);
            let g = grow + c / 2u;
            acc += bf16_at(true, g) * ds.x * f32(idot) + bf16_at(false, g) * ds.y;
        }
    }
    partial[li] = acc;
    workgroupBarrier();
    for (var step = LANES / 2u; step > 0u; step = step >> 1u) {
        if (lane < step) {
            partial[li] += partial[li + step];
        }
        workgroupBarrier();
    }
    if (lane == 0u && row < p.rows) {
        y[row] = partial[li];
    }
}
