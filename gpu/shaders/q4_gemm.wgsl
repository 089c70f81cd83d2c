// Y = X W^T for mfx's q4 layout (see q4_matvec.wgsl for the layout):
// X is [n, cols] f32 (n tokens, prefill), W is [rows, cols] q4 g64, Y is
// [n, rows] f32. Classic shared-memory tiling with f32 FMA: a workgroup makes a
// 64-token x 64-row tile, each of its 256 threads a 4x4 block, stepping
// through K 32 columns at a time (half a group); the weight tile is
// dequantized once into workgroup memory and reused by all 64 tokens.
// Plain WGSL has no access to tensor cores (no cooperative-matrix type in
// core WGSL), so this is the portable ceiling, not the fast one.

struct Params {
    n: u32,
    rows: u32,
    cols: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> scales: array<u32>;
@group(0) @binding(2) var<storage, read> biases: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

const BM: u32 = 64u;  // tokens per tile
const BN: u32 = 64u;  // weight rows per tile
const BK: u32 = 32u;  // K step
// Transposed tiles, [k][m] and [k][n]: a thread's 4 consecutive m (or n)
// are one 16-byte read, and threads of a row read consecutive words.
var<workgroup> xs: array<vec4<f32>, 512>;  // BK * BM / 4
var<workgroup> ws: array<vec4<f32>, 512>;  // BK * BN / 4

fn bf16_word(word: u32, g: u32) -> f32 {
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (g & 1u) == 1u));
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n0 = wg.x * BN;     // weight-row tile
    let m0 = wg.y * BM;     // token tile
    let tx = li % 16u;      // 4 rows: n0 + tx*4 ..
    let ty = li / 16u;      // 4 tokens: m0 + ty*4 ..
    let cols4 = p.cols / 4u;
    let words_per_row = p.cols / 8u;
    let gpr = p.cols / 64u;

    var acc: array<vec4<f32>, 4>;  // acc[i] = token ty*4+i, rows tx*4..+4
    for (var i = 0u; i < 4u; i++) { acc[i] = vec4<f32>(0.0); }

    for (var k0 = 0u; k0 < p.cols; k0 += BK) {
        // X tile: 64 tokens x 32 k = 512 vec4 (along k); 2 per thread.
        for (var t = 0u; t < 2u; t++) {
            let idx = li + t * 256u;
            let m = idx / 8u;       // token within tile
            let kq = idx % 8u;      // vec4 within the 32-wide k step
            var v = vec4<f32>(0.0);
            if (m0 + m < p.n) { v = x[(m0 + m) * cols4 + k0 / 4u + kq]; }
            // Transpose into xs[k][m]: component m%4 of vec4 (k*16 + m/4).
            let k = kq * 4u;
            xs[(k + 0u) * 16u + m / 4u][m % 4u] = v.x;
            xs[(k + 1u) * 16u + m / 4u][m % 4u] = v.y;
            xs[(k + 2u) * 16u + m / 4u][m % 4u] = v.z;
            xs[(k + 3u) * 16u + m / 4u][m % 4u] = v.w;
        }
        // W tile: 64 rows x 32 k = 64 rows x 4 words; 1 word (8 nibbles) per thread.
        {
            let nn = li / 4u;
            let wq = li % 4u;
            let row = n0 + nn;
            var q = 0u; var s = 0.0; var b = 0.0;
            if (row < p.rows) {
                q = w[row * words_per_row + k0 / 8u + wq];
                let g = row * gpr + k0 / 64u;
                s = bf16_word(scales[g >> 1u], g);
                b = bf16_word(biases[g >> 1u], g);
            }
            for (var j = 0u; j < 8u; j++) {
                let k = wq * 8u + j;
                ws[k * 16u + nn / 4u][nn % 4u] = s * f32((q >> (4u * j)) & 15u) + b;
            }
        }
        workgroupBarrier();
        for (var k = 0u; k < BK; k++) {
            let a = xs[k * 16u + ty];
            let bv = ws[k * 16u + tx];
            acc[0] += a.x * bv;
            acc[1] += a.y * bv;
            acc[2] += a.z * bv;
            acc[3] += a.w * bv;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + ty * 4u + i;
        if (m < p.n) {
            for (var j = 0u; j < 4u; j++) {
                let r = n0 + tx * 4u + j;
                if (r < p.rows) { y[m * p.rows + r] = acc[i][j]; }
            }
        }
    }
}
