// y = W x for mfx's q4 layout, 4 rows per 32 lanes (see q4_matvec_r1.wgsl
// for the layout and the one-row variant). Each lane loads one 16-byte chunk
// of x's 32 elements once and uses it for 4 rows, so x is read from cache a
// quarter as often, the per-chunk sum of x is shared, and each lane has 4
// independent 16-byte weight loads in flight instead of 1.

struct Params {
    rows: u32,
    cols: u32,
    w_off: u32,
    sb_off: u32,
}

@group(0) @binding(0) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> scales: array<u32>;
@group(0) @binding(2) var<storage, read> biases: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

const LANES: u32 = 32u;
const GROUPS: u32 = 8u;   // lane groups per workgroup
const RPG: u32 = 4u;      // rows per lane group
var<workgroup> partial: array<vec4<f32>, 256>;

fn dot8(q: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let v = vec4<u32>(q);
    let even = vec4<f32>((v >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u));
    let odd = vec4<f32>((v >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(15u));
    return dot(even, vec4<f32>(xa.x, xa.z, xb.x, xb.z)) + dot(odd, vec4<f32>(xa.y, xa.w, xb.y, xb.w));
}

fn dot32(q: vec4<u32>, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>,
         x4: vec4<f32>, x5: vec4<f32>, x6: vec4<f32>, x7: vec4<f32>) -> f32 {
    return dot8(q.x, x0, x1) + dot8(q.y, x2, x3) + dot8(q.z, x4, x5) + dot8(q.w, x6, x7);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let lane = li % LANES;
    let grp = li / LANES;
    let row0 = ((wg.y * nwg.x + wg.x) * GROUPS + grp) * RPG;
    let chunks = p.cols / 32u;
    let gpr = p.cols / 64u;
    // Rows past the end read row0 (in bounds) and are never stored.
    var r: array<u32, 4>;
    for (var i = 0u; i < RPG; i++) { r[i] = select(0u, row0 + i, row0 + i < p.rows); }
    let r0 = r[0]; let r1 = r[1]; let r2 = r[2]; let r3 = r[3];
    var acc = vec4<f32>(0.0);
    if (row0 < p.rows) {
        for (var c = lane; c < chunks; c += LANES) {
            let q0 = w[p.w_off + r0 * chunks + c];
            let q1 = w[p.w_off + r1 * chunks + c];
            let q2 = w[p.w_off + r2 * chunks + c];
            let q3 = w[p.w_off + r3 * chunks + c];
            let xb = c * 8u;
            let x0 = x[xb]; let x1 = x[xb + 1u]; let x2 = x[xb + 2u]; let x3 = x[xb + 3u];
            let x4 = x[xb + 4u]; let x5 = x[xb + 5u]; let x6 = x[xb + 6u]; let x7 = x[xb + 7u];
            let s = (x0 + x1) + (x2 + x3) + (x4 + x5) + (x6 + x7);
            let xs = s.x + s.y + s.z + s.w;
            let qd = vec4<f32>(dot32(q0, x0, x1, x2, x3, x4, x5, x6, x7), dot32(q1, x0, x1, x2, x3, x4, x5, x6, x7),
                               dot32(q2, x0, x1, x2, x3, x4, x5, x6, x7), dot32(q3, x0, x1, x2, x3, x4, x5, x6, x7));
            let gc = c / 2u;
            let g = p.sb_off + vec4<u32>(r0, r1, r2, r3) * gpr + gc;
            let sw = vec4<u32>(scales[g.x >> 1u], scales[g.y >> 1u], scales[g.z >> 1u], scales[g.w >> 1u]);
            let bw = vec4<u32>(biases[g.x >> 1u], biases[g.y >> 1u], biases[g.z >> 1u], biases[g.w >> 1u]);
            let odd = (g & vec4<u32>(1u)) == vec4<u32>(1u);
            let sc = bitcast<vec4<f32>>(select(sw << vec4<u32>(16u), sw & vec4<u32>(0xffff0000u), odd));
            let bi = bitcast<vec4<f32>>(select(bw << vec4<u32>(16u), bw & vec4<u32>(0xffff0000u), odd));
            acc += sc * qd + bi * xs;
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
    if (lane == 0u) {
        let v = partial[li];
        if (row0 < p.rows) { y[row0] = v.x; }
        if (row0 + 1u < p.rows) { y[row0 + 1u] = v.y; }
        if (row0 + 2u < p.rows) { y[row0 + 2u] = v.z; }
        if (row0 + 3u < p.rows) { y[row0 + 3u] = v.w; }
    }
}
