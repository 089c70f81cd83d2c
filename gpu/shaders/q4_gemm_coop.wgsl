// Y = X W^T for mfx's q4 layout (see q4_matvec.wgsl for the layout) on
// cooperative matrices (tensor cores): X is [n, cols] f32 (n tokens), W is
// [rows, cols] q4 g64, Y is [n, rows] f32, as q4_gemm.wgsl.
//
// wgpu's experimental cooperative-matrix extension (naga 30): the types
// coop_mat16x16<f16, A> (M x K), coop_mat16x16<f16, B> (K x N) and
// coop_mat16x16<f32, C> (M x N), `coopLoad` (column-major memory) /
// `coopLoadT` (row-major), `coopMultiplyAdd(a, b, c)` = a * b + c and
// `coopStore` / `coopStoreT`; the pointer is to the first element (a
// scalar) and the stride is in elements. The host builds this pipeline
// only where the adapter offers 16x16x16 f16 -> f32 and 32-wide subgroups.
//
// A workgroup makes a 64-token x 128-row tile of Y with 256 threads = 8
// subgroups of 32 (the cooperative matrices are subgroup-scoped: each
// 32-thread group must be one subgroup, true on NVIDIA). Subgroup `sg`
// owns a 32-token x 32-row block (2 x 2 accumulators): tokens
// (sg % 2) * 32, rows (sg / 2) * 32. K steps by 32 (half a q4 group): X's
// slice is converted to f16 and W's slice dequantized (in f32, rounded once
// to f16) into workgroup memory, then two 16-deep MMA steps per block.
// f16 inputs: |x| and |w| must stay under 65504; accumulation is f32.

enable f16;
enable wgpu_cooperative_matrix;

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

const BM: u32 = 64u;   // tokens per tile
const BN: u32 = 128u;  // weight rows per tile
const BK: u32 = 32u;   // K step
// Row strides of the staged tiles in f16 elements: BK plus 8 (16 bytes) of
// padding, so that the 16 rows of a fragment start in different banks and
// every fragment starts 16-byte aligned (40 * 2 = 80 bytes a row).
const LDA: u32 = 40u;
const LDB: u32 = 40u;
// xs: X slice, row-major [token][k] (an A fragment is `coopLoadT`).
var<workgroup> xs: array<f16, 2560>;  // BM * LDA
// ws: W slice, [row][k]: W^T's K x N block in column-major order (a B
// fragment is `coopLoad`).
var<workgroup> ws: array<f16, 5120>;  // BN * LDB
// Per-subgroup 16 x 16 f32 staging for edge tiles of Y.
var<workgroup> stage: array<f32, 2048>;  // 8 * 256

fn bf16_word(word: u32, g: u32) -> f32 {
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (g & 1u) == 1u));
}

// Writes accumulator `c` (tokens m.., rows r..) to Y through the
// subgroup's staging slot, skipping what lies outside Y. Called by all
// threads of the workgroup (it has barriers).
fn store_edge(c: coop_mat16x16<f32, C>, m: u32, r: u32, sg: u32, lane: u32) {
    let so = sg * 256u;  // a `let`: see the note in main
    coopStoreT(c, &stage[so], 16u);
    workgroupBarrier();
    for (var e = lane; e < 256u; e += 32u) {
        let mm = m + e / 16u;
        let rr = r + e % 16u;
        if (mm < p.n && rr < p.rows) {
            y[mm * p.rows + rr] = stage[sg * 256u + e];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n0 = wg.x * BN;  // weight-row tile
    let m0 = wg.y * BM;  // token tile
    let sg = li / 32u;
    let lane = li % 32u;
    let sm = (sg % 2u) * 32u;  // subgroup's tokens within the tile
    let sn = (sg / 2u) * 32u;  // subgroup's rows within the tile
    let cols4 = p.cols / 4u;
    let words_per_row = p.cols / 8u;
    let gpr = p.cols / 64u;

    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();

    for (var k0 = 0u; k0 < p.cols; k0 += BK) {
        // X slice: 64 tokens x 32 k = 512 vec4; 2 per thread, 8 threads a token.
        for (var t = 0u; t < 2u; t++) {
            let idx = li + t * 256u;
            let m = idx / 8u;
            let kq = idx % 8u;
            var v = vec4<f32>(0.0);
            if (m0 + m < p.n) { v = x[(m0 + m) * cols4 + k0 / 4u + kq]; }
            let h = vec4<f16>(v);
            let o = m * LDA + kq * 4u;
            xs[o] = h.x;
            xs[o + 1u] = h.y;
            xs[o + 2u] = h.z;
            xs[o + 3u] = h.w;
        }
        // W slice: 128 rows x 32 k = 512 words of 8 nibbles; 2 per thread.
        for (var t = 0u; t < 2u; t++) {
            let idx = li + t * 256u;
            let nn = idx / 4u;
            let wq = idx % 4u;
            let row = n0 + nn;
            var q = 0u; var s = 0.0; var b = 0.0;
            if (row < p.rows) {
                q = w[row * words_per_row + k0 / 8u + wq];
                let g = row * gpr + k0 / 64u;
                s = bf16_word(scales[g >> 1u], g);
                b = bf16_word(biases[g >> 1u], g);
            }
            let o = nn * LDB + wq * 8u;
            for (var j = 0u; j < 8u; j++) {
                ws[o + j] = f16(s * f32((q >> (4u * j)) & 15u) + b);
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += 16u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&xs[sm * LDA + kk], LDA);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&xs[(sm + 16u) * LDA + kk], LDA);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&ws[sn * LDB + kk], LDB);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&ws[(sn + 16u) * LDB + kk], LDB);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
        }
        workgroupBarrier();
    }

    let m = m0 + sm;
    let r = n0 + sn;
    // Vulkan wants a fragment's pointer and stride 16-byte aligned (rows of
    // 16 f32): with rows % 4 == 0 every fragment of a whole tile is.
    if (m0 + BM <= p.n && n0 + BN <= p.rows && (p.rows & 3u) == 0u) {
        // Whole tile inside Y: straight to storage, row-major, stride rows.
        // Every operand of a coopStore is a `let`: naga 30's WGSL front end
        // pushes the store before the expressions built inside its argument
        // list are emitted, and its SPIR-V writer then panics ("Expression
        // is not cached"); a `let`'s expressions are emitted at the `let`.
        let ldy = p.rows;
        let i00 = m * ldy + r;
        let i01 = i00 + 16u;
        let i10 = i00 + 16u * ldy;
        let i11 = i10 + 16u;
        let t00 = c00;
        let t01 = c01;
        let t10 = c10;
        let t11 = c11;
        coopStoreT(t00, &y[i00], ldy);
        coopStoreT(t01, &y[i01], ldy);
        coopStoreT(t10, &y[i10], ldy);
        coopStoreT(t11, &y[i11], ldy);
    } else {
        store_edge(c00, m, r, sg, lane);
        store_edge(c01, m, r + 16u, sg, lane);
        store_edge(c10, m + 16u, r, sg, lane);
        store_edge(c11, m + 16u, r + 16u, sg, lane);
    }
}
