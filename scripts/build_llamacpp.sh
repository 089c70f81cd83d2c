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
# Portable / device mode (PORTABLE=1, and --stage DIR / --device-build / --install DIR):
# on the shared 2-core dev machine the local build takes ~25 min of both cores,
# so we build on the lent 16-core device machine instead (~45 s) and bring back
# static binaries. That needs a build that does not depend on the build host:
#   * GGML_NATIVE=OFF with the ISA switches taken from THIS machine's
#     /proc/cpuinfo (the run target): -DGGML_AVX/AVX2/FMA/F16C/BMI2=ON and
#     GGML_AVX512/_VBMI/_VNNI/_BF16 and GGML_AVX_VNNI ON only where the flags
#     say so (the device is a Xeon with AVX-512 and AMX; the dev machine seen on
#     2026-12-01 is an AMD EPYC with AVX2 but no AVX-512, and a build with
#     AVX-512 dies there with SIGILL); AMX off.
#   * fully static (-DBUILD_SHARED_LIBS=OFF, -static, libgomp.a for OpenMP): the
#     device's glibc (2.39) is newer than the dev machine's (2.36).
#   scripts/build_llamacpp.sh --stage DIR     here: write DIR/llama.tar.xz (the
#        vendored tree without models/docs/examples, ~6 MB) + DIR/build.sh + DIR/isa.txt
#   bash DIR/build.sh                         there (cwd = the parent of DIR, $OUT set):
#        builds llama-bench llama-quantize llama-completion into $OUT/bin (stripped)
#   scripts/build_llamacpp.sh --install BINDIR   here: copy BINDIR/* into
#        $MFX_PEERS_DIR/llama.cpp/bin and check they run
# With the device tool: stage into the checkout that `run` sends (its
# .peerbuild/, listed in .git/info/exclude), run `bash .peerbuild/build.sh` with
# carry [".peerbuild"], then --install the returned bin folder.
#
# Env:
#   MFX_PEERS_DIR          cache dir outside the repo (default /work/.peers)
#   LLAMA_CPP_PY_VERSION   llama-cpp-python sdist version (default 0.3.36)
#   JOBS                   parallel build jobs (default 2)
#   PORTABLE=1             local build with the explicit ISA switches instead of GGML_NATIVE
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

# -DGGML_* ISA switches for the CPU this script runs on (the portable build's target).
isa_flags() {
    local f; f=" $(awk -F': ' '/^flags/ {print $2; exit}' /proc/cpuinfo) "
    on() { [[ "$f" == *" $1 "* ]] && echo ON || echo OFF; }
    echo "-DGGML_NATIVE=OFF -DGGML_AVX=$(on avx) -DGGML_AVX2=$(on avx2) -DGGML_FMA=$(on fma)" \
         "-DGGML_F16C=$(on f16c) -DGGML_BMI2=$(on bmi2) -DGGML_AVX512=$(on avx512f)" \
         "-DGGML_AVX512_VBMI=$(on avx512vbmi) -DGGML_AVX512_VNNI=$(on avx512_vnni)" \
         "-DGGML_AVX512_BF16=$(on avx512_bf16) -DGGML_AVX_VNNI=$(on avx_vnni)" \
         "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
}

fetch_sdist() {
    if [[ ! -f "$SDIST" ]]; then
        log "downloading llama-cpp-python==$VER sdist"
        # --no-binary only for this package: with ':all:' pip would build its
        # build deps (cmake, ninja) from source just to read its metadata.
        python3 -m pip download --no-deps --no-binary llama-cpp-python \
            "llama-cpp-python==$VER" -d "$SRC_DIR"
    fi
    if [[ ! -f "$TREE/CMakeLists.txt" ]]; then
        log "unpacking $SDIST"
        tar -xzf "$SDIST" -C "$SRC_DIR"
    fi
}

case "${1:-}" in
--stage)
    STAGE="${2:?--stage DIR}"
    mkdir -p "$STAGE"
    fetch_sdist
    log "staging the vendored tree (no models/docs/examples) into $STAGE/llama.tar.xz"
    tar -C "$(dirname "$TREE")" --exclude=llama.cpp/models --exclude=llama.cpp/docs \
        --exclude=llama.cpp/benches --exclude=llama.cpp/examples --exclude=llama.cpp/pocs \
        --exclude=llama.cpp/media --exclude=llama.cpp/tools/ui --exclude=llama.cpp/.git \
        -cJf "$STAGE/llama.tar.xz" llama.cpp
    isa_flags > "$STAGE/isa.txt"
    sed "s|@ISA@|$(cat "$STAGE/isa.txt")|; s|@STAGE@|$(basename "$STAGE")|" > "$STAGE/build.sh" <<'EOS'
#!/usr/bin/env bash
# Generated by scripts/build_llamacpp.sh --stage: portable static llama.cpp build.
set -uo pipefail
: "${OUT:?set OUT to the folder the binaries go to}"
SRC="$PWD/@STAGE@"; W=/tmp/llama-portable; mkdir -p "$W" "$OUT/bin"
tar -xJf "$SRC/llama.tar.xz" -C "$W" || exit 1
{ uname -a; nproc; lscpu | grep -i 'model name'; gcc --version | head -1; cmake --version | head -1; ldd --version | head -1; } > "$OUT/env.txt" 2>&1
FLAGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release @ISA@
  -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF -DCMAKE_EXE_LINKER_FLAGS=-static)
T=(llama-bench llama-quantize llama-completion)
# FindOpenMP picks libgomp.so, which cannot link into a static binary: point it at the archive.
GOMP_A="$(gcc -print-file-name=libgomp.a)"
b() { cmake -S "$W/llama.cpp" -B "$W/b" "${FLAGS[@]}" "$@" > "$OUT/cmake.log" 2>&1       && cmake --build "$W/b" -j "$(nproc)" --target "${T[@]}" > "$OUT/build.log" 2>&1; }
if ! b -DGGML_OPENMP=ON -DOpenMP_gomp_LIBRARY="$GOMP_A"; then
    echo "static OpenMP build failed; building without OpenMP"; rm -rf "$W/b"
    b -DGGML_OPENMP=OFF || { tail -n 40 "$OUT/build.log"; exit 1; }
fi
grep -E 'OpenMP|CPU backend variant' "$OUT/cmake.log"
for t in "${T[@]}"; do strip -o "$OUT/bin/$t" "$W/b/bin/$t"; done
ls -l "$OUT/bin"
EOS
    chmod +x "$STAGE/build.sh"
    log "staged: $(du -sh "$STAGE" | cut -f1) in $STAGE; ISA: $(cat "$STAGE/isa.txt")"
    exit 0 ;;
--install)
    BIN_IN="${2:?--install BINDIR}"
    for t in llama-bench llama-quantize llama-completion; do
        [[ -f "$BIN_IN/$t" ]] || { log "$BIN_IN/$t: missing"; exit 1; }
        rm -f "$OUT/bin/$t"; install -m 755 "$BIN_IN/$t" "$OUT/bin/$t"
    done
    fetch_sdist
    ln -sfn "$TREE" "$OUT/src"
    "$OUT/bin/llama-bench" --help > /dev/null 2>&1 || { log "llama-bench does not run here (rc $?: 132 = an instruction this CPU lacks)"; exit 1; }
    log "installed into $OUT/bin"
    exit 0 ;;
esac

# shellcheck source=scripts/peers_env.sh
source "$(dirname "$0")/peers_env.sh"
ensure_venv

fetch_sdist
ln -sfn "$TREE" "$OUT/src"

# gguf-py from the vendored tree, so the converter and the binaries agree.
if ! "$PEERS/venv/bin/python" -c 'import gguf, sys; sys.exit(0 if gguf.__file__.startswith(sys.argv[1]) else 1)' "$TREE" 2>/dev/null; then
    log "installing vendored gguf-py into the venv"
    "$PEERS/venv/bin/pip" install -q -e "$TREE/gguf-py"
fi

if [[ ! -f "$BUILD/CMakeCache.txt" ]]; then
    if [[ "${PORTABLE:-0}" == 1 ]]; then ISA="$(isa_flags)"; else ISA="-DGGML_NATIVE=ON"; fi
    log "configuring (Release, CPU only, $ISA)"
    "$PEERS/venv/bin/cmake" -S "$TREE" -B "$BUILD" -G Ninja \
        -DCMAKE_MAKE_PROGRAM="$PEERS/venv/bin/ninja" \
        -DCMAKE_BUILD_TYPE=Release \
        $ISA \
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
