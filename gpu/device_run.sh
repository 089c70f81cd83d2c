#!/bin/bash
# Issue 24 spike, one device call: card facts, native CUDA q4 mat-vec + copy
# bandwidth, the WGSL kernels through wgpu on the NVIDIA Vulkan driver, and
# llama.cpp's CUDA MUL_MAT (built here from the vendored source, in the background).
set -u
G=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
T0=$(date +%s)
el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
for f in "$G"/gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done; ldconfig
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv 2>&1 | tee "$OUT/smi.txt"
nvcc --version | tail -2
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
ls /usr/share/vulkan/icd.d/ /etc/vulkan/icd.d/ 2>/dev/null
[ -f $icd ] && export VK_DRIVER_FILES=$icd && echo "VK_DRIVER_FILES=$icd"
# llama.cpp: configure + build test-backend-ops in the background, niced, 14 jobs.
if [ "${SKIP_LLAMA:-0}" != 1 ]; then
  mkdir -p /tmp/ll && tar xzf "$G/llsrc.tar.gz" -C /tmp/ll
  ( cd /tmp/ll/llsrc && nice -n 19 cmake -S . -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      -DGGML_NATIVE=OFF -DCMAKE_BUILD_TYPE=Release > "$OUT/llama_build.log" 2>&1 \
    && nice -n 19 cmake --build build --target test-backend-ops -j 14 >> "$OUT/llama_build.log" 2>&1; echo "llama build rc=$?" >> "$OUT/llama_build.log" ) &
  LLPID=$!
fi
el "cuda ref"
nvcc -O3 -arch=sm_90 -o /tmp/q4cuda "$G/q4_matvec.cu" && /tmp/q4cuda 2>&1 | tee "$OUT/cuda.txt"
if [ -x "$G/q4bench" ]; then
  el "wgpu checked"
  "$G/q4bench" 2>&1 | tee "$OUT/wgpu_checked.txt"
  el "wgpu unchecked"
  "$G/q4bench" --unchecked 2>&1 | tee "$OUT/wgpu_unchecked.txt"
else
  el "no q4bench built: wgpu legs skipped"
fi
el "waiting for llama build"
if [ "${SKIP_LLAMA:-0}" != 1 ]; then
  while kill -0 $LLPID 2>/dev/null; do
    [ $(( $(date +%s) - T0 )) -gt ${LL_DEADLINE:-540} ] && { el "llama build not done in time"; tail -5 "$OUT/llama_build.log"; break; }
    sleep 5
  done
  tail -3 "$OUT/llama_build.log"
  B=/tmp/ll/llsrc/build/bin/test-backend-ops
  if [ -x $B ]; then
    el "llama perf"
    $B perf -b CUDA0 -o MUL_MAT -p 'type_a=q4_[01],type_b=f32,m=(4096|2048|768|151936),n=(1|2048),k=(4096|768|2048),' 2>&1 | tee "$OUT/llama_mulmat.txt" | grep -E "MUL_MAT|Backend|Device"
    $B perf -b CUDA0 -o MUL_MAT_ID -p 'type_a=q4_0' 2>&1 | tee "$OUT/llama_mulmat_id.txt" | grep -E "MUL_MAT_ID"
  fi
fi
el done
