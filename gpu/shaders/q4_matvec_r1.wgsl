// y = W x for mfx's q4 layout (formats/src/quant.rs): MLX-style group-wise
// affine 4-bit, group 64. W is [rows, cols] row-major; each row is a
// little-endian nibble stream (element i in bits [4i, 4i+4) of the row), so
// one vec4<u32> holds 32 consecutive elements = half a group. Scales and
// biases are bf16, two per u32 word (element g in the low half when g is even),
// one per (row, group). Accumulation is f32, as on the CPU.
//
// One workgroup = ROWS rows x 32 lanes; a lane strides over the row's 16-byte
// chunks so the 32 lanes of a row read 512 contiguous bytes per step
// (coalesced), then the row's 32 partial sums meet in workgroup memory. No
// subgroup operations: lavapipe, Metal and every Vulkan driver run this as is.

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
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

const ROWS: u32 = 8u;
const LANES: u32 = 32u;
var<workgroup> partial: array<f32, 256>;

fn bf16_at(buf_is_scale: bool, g: u32) -> f32 {
    var word: u32;
    if (buf_is_scale) { word = scales[g >> 1u]; } else { word = biases[g >> 1u]; }
    let bits = select(word << 16u, word & 0xffff0000u, (g & 1u) == 1u);
    return bitcast<f32>(bits);
}

// dot(8 nibbles of word q, x[0..8]) where xa = x[0..4], xb = x[4..8].
fn dot8(q: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let v = vec4<u32>(q);
    let even = vec4<f32>((v >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u));  // elements 0,2,4,6
    let odd = vec4<f32>((v >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(15u));  // elements 1,3,5,7
    return dot(even, vec4<f32>(xa.x, xa.z, xb.x, xb.z)) + dot(odd, vec4<f32>(xa.y, xa.w, xb.y, xb.w));
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
        let chunks = p.cols / 32u;            // vec4<u32> per row
        let gpr = p.cols / 64u;               // groups per row
        let wrow = p.w_off + row * chunks;
        let grow = p.sb_off + row * gpr;
        for (var c = lane; c < chunks; c += LANES) {
            let q = w[wrow + c];
            let xb = c * 8u;                  // x in vec4<f32>: 32 elements = 8 vec4
            let x0 = x[xb]; let x1 = x[xb + 1u]; let x2 = x[xb + 2u]; let x3 = x[xb + 3u];
            let x4 = x[xb + 4u]; let x5 = x[xb + 5u]; let x6 = x[xb + 6u]; let x7 = x[xb + 7u];
            let qd = dot8(q.x, x0, x1) + dot8(q.y, x2, x3) + dot8(q.z, x4, x5) + dot8(q.w, x6, x7);
            let s = (x0 + x1) + (x2 + x3) + (x4 + x5) + (x6 + x7);
            let xs = s.x + s.y + s.z + s.w;
            let g = grow + c / 2u;
            acc += bf16_at(true, g) * qd + bf16_at(false, g) * xs;
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
