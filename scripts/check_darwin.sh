#!/usr/bin/env bash
# macOS leg of the test suite (scripts/test.sh runs it; issue 20): compiles the
# workspace for aarch64-apple-darwin so that code under
# cfg(target_os = "macos") (F_NOCACHE reads, sysctl memory queries) cannot
# break unnoticed. Nothing here RUNS on macOS: no Mac is available to CI.
#
# It builds the macOS arm64 wheel as the README does (maturin --zig) and
# checks the Mach-O inside. zig (the `ziglang` wheel) is the cross C compiler
# and linker; cargo-zigbuild (a wheel as well) drives the MFX_DARWIN=full
# type-check of the test targets. Where a piece cannot be installed, the step prints a loud
# SKIPPED banner and exits 0 (MFX_DARWIN=require fails instead, =off skips).
set -euo pipefail
cd "$(dirname "$0")/.."

TRIPLE=aarch64-apple-darwin
mode=${MFX_DARWIN:-auto}
skip() {
  echo "################################################################" >&2
  echo "## macOS (aarch64-apple-darwin) compile check SKIPPED: $*" >&2
  echo "## The macOS-specific code was NOT compiled on this run." >&2
  echo "################################################################" >&2
  [ "$mode" = require ] && exit 1
  exit 0
}
[ "$mode" = off ] && skip "MFX_DARWIN=off"

if ! rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE"; then
  rustup target add "$TRIPLE" || skip "rustup target add $TRIPLE failed"
fi
# shellcheck source=scripts/pytools.sh
. scripts/pytools.sh
pytools_env || skip "pip install -r scripts/requirements-tools.txt (ziglang, cargo-zigbuild) failed"
export CARGO_TERM_COLOR=never

# 1. The macOS arm64 wheel, built the README's way (maturin --zig: zig is the C
#    cross compiler for zstd-sys and onig_sys and links mfx against its bundled
#    libSystem stubs), which compiles every crate's library and binary code for
#    darwin, cfg(target_os = "macos") included, and catches missing symbols
#    that checking cannot. With the `linkcheck` profile (no optimisation, no
#    debug info): this proves it builds and links; nothing runs it.
t0=$(date +%s)
version=$(mfx_version)
whl_dir=target/wheels-darwin
rm -rf "$whl_dir"
maturin build --locked --zig --target "$TRIPLE" --profile linkcheck --out "$whl_dir"
whl=$(ls "$whl_dir"/mfx-"$version"-py3-none-macosx_*_arm64.whl) ||
  { echo "darwin: no macosx arm64 wheel in $whl_dir: $(ls "$whl_dir")" >&2; exit 1; }
file_out=$(python3 - "$whl" <<'PY'
import struct, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.endswith(".data/scripts/mfx")]
    if len(names) != 1:
        print(f"wheel holds {names!r}, expected one .data/scripts/mfx")
        sys.exit()
    head = z.read(names[0])[:8]
magic, cputype = struct.unpack("<II", head)
# MH_MAGIC_64 and CPU_TYPE_ARM64: a 64-bit arm64 Mach-O executable.
print("ok" if (magic, cputype) == (0xFEEDFACF, 0x0100000C) else f"magic={magic:#x} cputype={cputype:#x}")
PY
)
[ "$file_out" = ok ] || { echo "darwin: the mfx in $(basename "$whl") is not an arm64 Mach-O ($file_out)" >&2; exit 1; }
echo "darwin: built $(basename "$whl") ($(du -h "$whl" | cut -f1)); its mfx is an arm64 Mach-O ($(($(date +%s) - t0)) s); not run: no Mac in CI"

# 2. MFX_DARWIN=full: every crate with its tests, type-checked for macOS too.
if [ "$mode" = full ]; then
  t1=$(date +%s)
  cargo-zigbuild check --locked --target "$TRIPLE" --workspace --all-targets
  echo "darwin: cargo check of the workspace's tests for $TRIPLE OK ($(($(date +%s) - t1)) s)"
fi
