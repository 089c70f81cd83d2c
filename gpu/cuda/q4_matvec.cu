// Native CUDA reference point for issue 24's spike: mfx's q4 layout
// (formats/src/quant.rs: 4-bit affine, group 64, bf16 scale + bias, row-major
// nibble streams) as a hand-written CUDA mat-vec, the same algorithm as
// shaders/q4_matvec.wgsl (warp per row, 16-byte coalesced loads) plus warp
// shuffles. It answers "how much does the WGSL/Vulkan path leave on the
// table against CUDA for the same layout", and measures the card's copy
// bandwidth. Build: nvcc -O3 -arch=sm_90 -o q4cuda q4_matvec.cu
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <algorithm>
#include <random>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t ck_ = (x); if (ck_ != cudaSuccess) { \
  fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(ck_)); exit(1); } } while (0)

__device__ __forceinline__ float bf(const uint16_t* p, uint32_t g) {
  return __uint_as_float(((uint32_t)p[g]) << 16);
}

__device__ __forceinline__ float dot8(uint32_t q, float4 a, float4 b) {
  float s = 0.f;
  s += (float)((q >> 0) & 15) * a.x;  s += (float)((q >> 4) & 15) * a.y;
  s += (float)((q >> 8) & 15) * a.z;  s += (float)((q >> 12) & 15) * a.w;
  s += (float)((q >> 16) & 15) * b.x; s += (float)((q >> 20) & 15) * b.y;
  s += (float)((q >> 24) & 15) * b.z; s += (float)((q >> 28) & 15) * b.w;
  return s;
}

__global__ void __launch_bounds__(256) q4_matvec(const uint4* __restrict__ w, const uint16_t* __restrict__ sc,
    const uint16_t* __restrict__ bi, const float4* __restrict__ x, float* __restrict__ y, uint32_t rows, uint32_t cols) {
  uint32_t lane = threadIdx.x & 31, row = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (row >= rows) return;
  uint32_t chunks = cols / 32, gpr = cols / 64;
  const uint4* wr = w + (size_t)row * chunks;
  float acc = 0.f;
#pragma unroll 4
  for (uint32_t c = lane; c < chunks; c += 32) {
    uint4 q = __ldg(wr + c);
    const float4* xp = x + c * 8;
    float4 x0 = __ldg(xp), x1 = __ldg(xp + 1), x2 = __ldg(xp + 2), x3 = __ldg(xp + 3);
    float4 x4 = __ldg(xp + 4), x5 = __ldg(xp + 5), x6 = __ldg(xp + 6), x7 = __ldg(xp + 7);
    float qd = dot8(q.x, x0, x1) + dot8(q.y, x2, x3) + dot8(q.z, x4, x5) + dot8(q.w, x6, x7);
    float xs = x0.x + x0.y + x0.z + x0.w + x1.x + x1.y + x1.z + x1.w + x2.x + x2.y + x2.z + x2.w
             + x3.x + x3.y + x3.z + x3.w + x4.x + x4.y + x4.z + x4.w + x5.x + x5.y + x5.z + x5.w
             + x6.x + x6.y + x6.z + x6.w + x7.x + x7.y + x7.z + x7.w;
    size_t g = (size_t)row * gpr + c / 2;
    acc += bf(sc, g) * qd + bf(bi, g) * xs;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
  if (lane == 0) y[row] = acc;
}


// int8-activation variant (as llama.cpp's MMVQ and mfx's default AVX2 tier):
// x is quantized once per token to int8 blocks of 32 with an f32 scale d_b,
// stored with each 8 values de-interleaved (0,2,4,6,1,3,5,7) so that a weight
// word's low nibbles (q & 0x0F0F0F0F) and high nibbles ((q >> 4) & 0x0F0F0F0F)
// meet their activations in one __dp4a each: no per-nibble int->float
// conversion (I2F issues at 16/clk/SM on Hopper, which caps the f32 kernel
// above) and 32 bytes of x per 16 bytes of weights instead of 128.
// The bias term uses the exact f32 sum of each block of x.
__global__ void quantize_x(const float* __restrict__ x, int8_t* __restrict__ xq, float* __restrict__ xd,
    float* __restrict__ xs, uint32_t cols) {
  uint32_t b = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (b * 32 >= cols) return;
  float v = x[b * 32 + lane];
  float a = fabsf(v), s = v;
  for (int o = 16; o > 0; o >>= 1) { a = fmaxf(a, __shfl_xor_sync(0xffffffff, a, o)); s += __shfl_xor_sync(0xffffffff, s, o); }
  float d = a / 127.f, id = d > 0.f ? 1.f / d : 0.f;
  int q = __float2int_rn(v * id);
  uint32_t w = lane & 7, pos = (lane & ~7u) + ((w & 1) ? 4 + w / 2 : w / 2);
  xq[b * 32 + pos] = (int8_t)q;
  if (lane == 0) { xd[b] = d; xs[b] = s; }
}

template <int R>
__global__ void __launch_bounds__(256) q4_matvec_dp4a(const uint4* __restrict__ w, const uint16_t* __restrict__ sc,
    const uint16_t* __restrict__ bi, const int4* __restrict__ xq, const float* __restrict__ xd,
    const float* __restrict__ xs, float* __restrict__ y, uint32_t rows, uint32_t cols) {
  uint32_t lane = threadIdx.x & 31, row0 = (blockIdx.x * 8 + (threadIdx.x >> 5)) * R;
  if (row0 >= rows) return;
  uint32_t chunks = cols / 32, gpr = cols / 64;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; r++) acc[r] = 0.f;
  for (uint32_t c = lane; c < chunks; c += 32) {
    int4 a0 = __ldg(xq + 2 * c), a1 = __ldg(xq + 2 * c + 1);
    float d = __ldg(xd + c), s = __ldg(xs + c);
#pragma unroll
    for (int r = 0; r < R; r++) {
      uint32_t row = min(row0 + r, rows - 1);
      uint4 q = __ldg(w + (size_t)row * chunks + c);
      int dot = 0;
      dot = __dp4a((int)(q.x & 0x0F0F0F0F), a0.x, dot); dot = __dp4a((int)((q.x >> 4) & 0x0F0F0F0F), a0.y, dot);
      dot = __dp4a((int)(q.y & 0x0F0F0F0F), a0.z, dot); dot = __dp4a((int)((q.y >> 4) & 0x0F0F0F0F), a0.w, dot);
      dot = __dp4a((int)(q.z & 0x0F0F0F0F), a1.x, dot); dot = __dp4a((int)((q.z >> 4) & 0x0F0F0F0F), a1.y, dot);
      dot = __dp4a((int)(q.w & 0x0F0F0F0F), a1.z, dot); dot = __dp4a((int)((q.w >> 4) & 0x0F0F0F0F), a1.w, dot);
      size_t g = (size_t)row * gpr + c / 2;
      acc[r] += bf(sc, g) * d * (float)dot + bf(bi, g) * s;
    }
  }
#pragma unroll
  for (int r = 0; r < R; r++) {
    float v = acc[r];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (lane == 0 && row0 + r < rows) y[row0 + r] = v;
  }
}

static float bf_host(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }

int main() {
  cudaDeviceProp p; CK(cudaGetDeviceProperties(&p, 0));
  printf("device: %s, %d SMs, L2 %d MB\n", p.name, p.multiProcessorCount, p.l2CacheSize >> 20);
  // Copy bandwidth: 1 GiB device-to-device, bytes read + written.
  {
    size_t n = 1ull << 30; void *a, *b; CK(cudaMalloc(&a, n)); CK(cudaMalloc(&b, n));
    CK(cudaMemset(a, 1, n));
    cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
    std::vector<float> ts;
    for (int i = 0; i < 10; i++) {
      CK(cudaEventRecord(e0)); CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice)); CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    printf("copy D2D 1 GiB: median %.3f ms, %.0f GB/s (read+write)\n", ts[5], 2.0 * n / (ts[5] * 1e-3) / 1e9);
    CK(cudaFree(a)); CK(cudaFree(b));
  }
  struct S { const char* name; uint32_t rows, cols; } shapes[] = {
    {"4096x4096", 4096, 4096}, {"2048x768 expert down", 2048, 768},
    {"768x2048 expert up", 768, 2048}, {"151936x4096 lm_head", 151936, 4096}};
  std::mt19937_64 rng(42);
  printf("\n| kernel | shape | median | GB/s | rel err |\n|---|---|---|---|---|\n");
  for (auto& s : shapes) {
    size_t n = (size_t)s.rows * s.cols, pb = n / 2, groups = n / 64;
    std::vector<uint8_t> packed(pb); for (auto& v : packed) v = (uint8_t)rng();
    std::vector<uint16_t> sc(groups), bi(groups);
    std::uniform_real_distribution<float> us(0.002f, 0.015f), ub(-0.1f, 0.1f), ux(-1.f, 1.f);
    auto tobf = [](float f) { uint32_t u; memcpy(&u, &f, 4); return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16); };
    for (size_t g = 0; g < groups; g++) { sc[g] = tobf(us(rng) * ((rng() & 1) ? 1.f : -1.f)); bi[g] = tobf(ub(rng)); }
    std::vector<float> x(s.cols); for (auto& v : x) v = ux(rng);
    double bytes = pb + groups * 4.0;
    int copies = std::max(1, std::min(256, (int)((512.0 * (1 << 20)) / bytes)));
    std::vector<uint4*> dw(copies); std::vector<uint16_t*> ds(copies), db(copies);
    for (int c = 0; c < copies; c++) {
      CK(cudaMalloc(&dw[c], pb)); CK(cudaMemcpy(dw[c], packed.data(), pb, cudaMemcpyHostToDevice));
      CK(cudaMalloc(&ds[c], groups * 2)); CK(cudaMemcpy(ds[c], sc.data(), groups * 2, cudaMemcpyHostToDevice));
      CK(cudaMalloc(&db[c], groups * 2)); CK(cudaMemcpy(db[c], bi.data(), groups * 2, cudaMemcpyHostToDevice));
    }
    float4* dx; float* dy; CK(cudaMalloc(&dx, s.cols * 4)); CK(cudaMalloc(&dy, s.rows * 4));
    CK(cudaMemcpy(dx, x.data(), s.cols * 4, cudaMemcpyHostToDevice));
    CK(cudaMemset(dy, 0xff, s.rows * 4));  // NaN poison
    int8_t* dxq; float *dxd, *dxs; uint32_t nb = s.cols / 32;
    CK(cudaMalloc(&dxq, s.cols)); CK(cudaMalloc(&dxd, nb * 4)); CK(cudaMalloc(&dxs, nb * 4));
    const float* fx = (const float*)dx;
    auto quant = [&]() { quantize_x<<<(nb + 7) / 8, 256>>>(fx, dxq, dxd, dxs, s.cols); };
    quant(); CK(cudaGetLastError()); CK(cudaDeviceSynchronize());
    const char* names[] = {"cuda f32 R1", "cuda dp4a R1", "cuda dp4a R2", "cuda dp4a R4"};
    auto launch = [&](int k, int c) {
      switch (k) {
        case 0: q4_matvec<<<(s.rows + 7) / 8, 256>>>(dw[c], ds[c], db[c], dx, dy, s.rows, s.cols); break;
        case 1: q4_matvec_dp4a<1><<<(s.rows + 7) / 8, 256>>>(dw[c], ds[c], db[c], (const int4*)dxq, dxd, dxs, dy, s.rows, s.cols); break;
        case 2: q4_matvec_dp4a<2><<<(s.rows + 15) / 16, 256>>>(dw[c], ds[c], db[c], (const int4*)dxq, dxd, dxs, dy, s.rows, s.cols); break;
        case 3: q4_matvec_dp4a<4><<<(s.rows + 31) / 32, 256>>>(dw[c], ds[c], db[c], (const int4*)dxq, dxd, dxs, dy, s.rows, s.cols); break;
      }
    };
    for (int k = 0; k < 4; k++) {
    CK(cudaMemset(dy, 0xff, s.rows * 4));  // NaN poison
    for (int i = 0; i < 4; i++) launch(k, i % copies);
    CK(cudaGetLastError()); CK(cudaDeviceSynchronize());
    int iters = std::max(200, copies);
    std::vector<cudaEvent_t> ev(iters + 1); for (auto& e : ev) CK(cudaEventCreate(&e));
    CK(cudaEventRecord(ev[0]));
    for (int i = 0; i < iters; i++) {
      launch(k, i % copies);
      CK(cudaEventRecord(ev[i + 1]));
    }
    CK(cudaGetLastError()); CK(cudaDeviceSynchronize());
    std::vector<float> ts(iters);
    for (int i = 0; i < iters; i++) CK(cudaEventElapsedTime(&ts[i], ev[i], ev[i + 1]));
    float total; CK(cudaEventElapsedTime(&total, ev[0], ev[iters]));
    std::sort(ts.begin(), ts.end());
    double med = ts[iters / 2] * 1e-3;
    std::vector<float> y(s.rows); CK(cudaMemcpy(y.data(), dy, s.rows * 4, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (int kk = 0; kk <= 64; kk++) {
      size_t r = std::min<size_t>(s.rows - 1, (size_t)kk * s.rows / 64); double ref = 0;
      for (uint32_t c = 0; c < s.cols; c++) {
        uint32_t q = (packed[(r * s.cols + c) / 2] >> ((c & 1) * 4)) & 15; size_t g = (r * s.cols + c) / 64;
        ref += ((double)bf_host(sc[g]) * q + bf_host(bi[g])) * x[c];
      }
      num += (y[r] - ref) * (y[r] - ref); den += ref * ref;
    }
    double err = std::sqrt(num / den);
    // f32 must match f64 to rounding; int8 activations carry ~1/254 relative
    // error per element, as on the CPU's int8 tier.
    double tol = k == 0 ? 1e-4 : 2e-2;
    printf("| %s | %s | %.2f us (back-to-back mean %.2f us) | %.0f | %.1e%s |\n", names[k], s.name, med * 1e6,
           total * 1e3 / iters, bytes / med / 1e9, err, err < tol ? "" : " WRONG");
    for (auto& e : ev) CK(cudaEventDestroy(e));
    }
    {
      cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
      CK(cudaEventRecord(e0)); for (int i = 0; i < 100; i++) quant(); CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
      printf("| quantize_x | %u cols | %.2f us (mean of 100) | | |\n", s.cols, ms * 10);
    }
    CK(cudaFree(dxq)); CK(cudaFree(dxd)); CK(cudaFree(dxs));
    for (int c = 0; c < copies; c++) { CK(cudaFree(dw[c])); CK(cudaFree(ds[c])); CK(cudaFree(db[c])); }
    CK(cudaFree(dx)); CK(cudaFree(dy));
  }
  return 0;
}
