#!/usr/bin/env bash
# GPU kernel spike (gpu/, issue 24): parity tests on whatever Vulkan adapter is
# present (Mesa's lavapipe on a machine without a GPU) plus the Metal (MSL)
# translation check. Leg 8 of scripts/test.sh: the crate is its own
# workspace (wgpu + naga, about 1.5 min cold on 2 cores); see docs/GPU.md.
set -euo pipefail
cd "$(dirname "$0")/.."
have_lavapipe() {
  ldconfig -p | grep -q libvulkan.so.1 && ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1
}
if ! have_lavapipe; then
  echo "installing lavapipe (mesa-vulkan-drivers, libvulkan1) for the GPU parity tests"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1; } >/dev/null 2>&1 || true
fi
if ! have_lavapipe; then
  if [ "${MFX_GPU:-on}" = require ]; then
    echo "lavapipe (mesa-vulkan-drivers) could not be installed and MFX_GPU=require" >&2
    exit 1
  fi
  echo "=== SKIPPED: GPU kernels on lavapipe (mesa-vulkan-drivers could not be installed) ===" >&2
  exit 0
fi
# wgpu warns about this on headless machines; lavapipe needs no display.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cd gpu
cargo test --release --locked
