#!/usr/bin/env bash
# Build the llama.cpp peer (CPU only) from the llama-cpp-python sdist on PyPI.
#
# Why the sdist: PyPI is the only source registry reachable from our machines,
# and llama-cpp-python vendors a pinned llama.cpp tree (vendor/llama.cpp) with
# convert_hf_to_gguf.py and gguf-py, so one download gives us the binaries and
# the converter at a matching version.
#
# Why -DGGML_NATIVE=ON: the peer should run in its best configuration on the
# benchmark machine (AVX-512/VNNI/BF16 here). mfx ships without target-cpu=native
# and picks SIMD at run time, so this flatters the peer slightly; PERF.md says so.
#
# Idempotent: re-running skips download/unpack/configure steps that are done and
# lets cmake rebuild only what changed.
#
# Env:
#   MFX_PEERS_DIR          cache dir outside the repo (default /work/.peers)
#   LLAMA_CPP_PY_VERSION   llama-cpp-python sdist version (default 0.3.36)
#   JOBS                   parallel build jobs (default 2)
#   WITH_CLI=1             also build the interactive llama-cli (in this llama.cpp
#                          it is a client of llama-server, so it needs the whole server
#                          built: much longer on 2 cores; llama-completion is the old
#                          non-interactive llama-cli and is what the bench scripts use)
# Output: $MFX_PEERS_DIR/llama.cpp/bin/{llama-completion,llama-bench,llama-quantize,
#         llama-perplexity[,llama-cli]}, $MFX_PEERS_DIR/llama.cpp/src -> vendored tree,
#         $MFX_PEERS_DIR/venv (python venv with gguf-py, numpy, safetensors, cmake, ninja).
set -euo pipefail

PEERS="${MFX_PEERS_DIR:-/work/.peers}"
VER="${LLAMA_CPP_PY_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
SRC_DIR="$PEERS/src"
SDIST="$SRC_DIR/llama_cpp_python-$VER.tar.gz"
TREE="$SRC_DIR/llama_cpp_python-$VER/vendor/llama.cpp"
OUT="$PEERS/llama.cpp"
BUILD="$OUT/build"

log() { printf '[build_llamacpp] %s\n' "$*" >&2; }

mkdir -p "$SRC_DIR" "$OUT/bin"

# shellcheck source=scripts/peers_env.sh
source "$(dirname "$0")/peers_env.sh"
ensure_venv

if [[ ! -f "$SDIST" ]]; then
    log "downloading llama-cpp-python==$VER sdist"
    # --no-binary only for this package: its build deps (cmake, ninja,
    # scikit-build-core) may come as wheels; building cmake from source takes ages.
    "$PEERS/venv/bin/pip" download --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VER" -d "$SRC_DIR"
fi
if [[ ! -f "$TREE/CMakeLists.txt" ]]; then
    log "unpacking $SDIST"
    tar -xzf "$SDIST" -C "$SRC_DIR"
fi
ln -sfn "$TREE" "$OUT/src"

# gguf-py from the vendored tree, so the converter and the binaries agree.
if ! "$PEERS/venv/bin/python" -c 'import gguf, sys; sys.exit(0 if gguf.__file__.startswith(sys.argv[1]) else 1)' "$TREE" 2>/dev/null; then
    log "installing vendored gguf-py into the venv"
    "$PEERS/venv/bin/pip" install -q -e "$TREE/gguf-py"
fi

if [[ ! -f "$BUILD/CMakeCache.txt" ]]; then
    log "configuring (Release, CPU only, GGML_NATIVE=ON)"
    "$PEERS/venv/bin/cmake" -S "$TREE" -B "$BUILD" -G Ninja \
        -DCMAKE_MAKE_PROGRAM="$PEERS/venv/bin/ninja" \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON \
        -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER="$([[ "${WITH_CLI:-0}" == 1 ]] && echo ON || echo OFF)" \
        -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF
fi

TARGETS=(llama-completion llama-bench llama-quantize llama-perplexity)
if [[ "${WITH_CLI:-0}" == 1 ]]; then
    "$PEERS/venv/bin/cmake" "$BUILD" -DLLAMA_BUILD_SERVER=ON >/dev/null
    TARGETS+=(llama-cli)
fi
log "building ${TARGETS[*]} with -j$JOBS (nice)"
nice -n 10 "$PEERS/venv/bin/cmake" --build "$BUILD" --config Release -j "$JOBS" \
    --target "${TARGETS[@]}"

for t in "${TARGETS[@]}"; do
    ln -sfn "$BUILD/bin/$t" "$OUT/bin/$t"
done
log "done: $OUT/bin"
"$OUT/bin/llama-bench" --help >/dev/null 2>&1 || { log "llama-bench does not run"; exit 1; }
