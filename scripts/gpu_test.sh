#!/usr/bin/env bash
# GPU kernel spike (gpu/, issue 24): parity tests on whatever Vulkan adapter is
# present (Mesa's lavapipe on a machine without a GPU) plus the Metal (MSL)
# translation check. Not part of scripts/test.sh yet: the crate is its own
# workspace and its cold build (wgpu + naga) is several minutes; see docs/GPU.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p | grep -q libvulkan.so.1 || ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  echo "installing lavapipe (mesa-vulkan-drivers, libvulkan1) for the GPU parity tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1
fi
cd gpu
cargo test --release --locked
