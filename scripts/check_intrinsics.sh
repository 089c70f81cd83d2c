#!/usr/bin/env bash
# Fails if a release binary holds an x86 SIMD intrinsic as an out-of-line
# function. Every `_mm*` intrinsic is `#[inline]` with a `#[target_feature]`;
# it stays a call only where the code around it was compiled without that
# feature, e.g. a closure inside an `#[inline(always)]` kernel body (closures
# do not get the features of the wrapper the body is inlined into). Each call
# then passes vectors through memory: stop 28's avx512 tier shipped so, and
# its int8 decode ran 5-6x slower than the inlined code. scripts/test.sh runs
# this on target/release/mfx; `nm` comes with binutils, which linking needs.
set -euo pipefail
bin=${1:?usage: check_intrinsics.sh BINARY}
command -v nm >/dev/null || { echo "check_intrinsics: nm not found (binutils)" >&2; exit 1; }
# Demangled (legacy mangling), or raw (v0 mangling that an older nm cannot
# demangle keeps both names as substrings).
syms=$({ nm -C "$bin" | grep -E ' [tT] core::core_arch::x86(_64)?::[a-z0-9_]+::_mm'
  nm "$bin" | grep -E ' [tT] _R.*core_arch.*_mm' || true; } || true)
if [ -n "$syms" ]; then
  echo "check_intrinsics: $bin calls SIMD intrinsics out of line (compiled without their target feature):" >&2
  echo "$syms" >&2
  exit 1
fi
n=$(nm "$bin" | wc -l)
echo "check_intrinsics: no out-of-line x86 intrinsics in $bin ($n symbols checked)"
