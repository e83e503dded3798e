#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server` once, from the llama.cpp sources vendored in the
# llama-cpp-python sdist, and cache it outside the repository. Prints the binary's path.
#
#   bash benchmarks/build_llama_server.sh            # -> $QUADRANT_HOME/peers/llama-server-<ver>-<isa>/bin/llama-server
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 bash benchmarks/build_llama_server.sh
#
# A native build (-march=native) dies with SIGILL on virtual machines whose CPU reports AVX-512 or
# AMX the hypervisor does not enable, so GGML_NATIVE is off and every x86 ISA flag is named from
# what /proc/cpuinfo says. Needs cmake and a C++ compiler; a benchmark-only peer, never a runtime
# or CI dependency of quadrant.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
home="${QUADRANT_HOME:-$HOME/.cache/quadrant}"

flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
isa_flags=(
  -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)
  -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512_vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni)
  -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX_VNNI=$(has avx_vnni)
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
isa_tag=$(printf '%s' "${isa_flags[*]}" | sha256sum | cut -c1-8)
prefix="$home/peers/llama-server-$version-$isa_tag"
binary="$prefix/bin/llama-server"
if [[ -x "$binary" ]]; then
  echo "$binary"
  exit 0
fi

for tool in cmake c++; do
  command -v "$tool" >/dev/null || { echo "build_llama_server: '$tool' not found; install it first" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "build_llama_server: downloading llama-cpp-python $version sources" >&2
python -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"

echo "build_llama_server: building with ${isa_flags[*]}" >&2
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF "${isa_flags[@]}" \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DBUILD_SHARED_LIBS=OFF -DCMAKE_INSTALL_PREFIX="$prefix" >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$prefix/bin"
cp "$work/build/bin/llama-server" "$binary"
echo "$binary"
