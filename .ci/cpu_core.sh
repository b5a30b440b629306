#!/usr/bin/env bash
# CI: the torch-free CPU kernel core (kernels/cpu/core) against its scalar reference (core/test_core.cpp),
# bit for bit on random shapes. First natively: on x86 every ISA the compiler can target is built, and the
# ones this CPU lacks are skipped at run time (the driver says so). Then for aarch64: Debian's
# g++-aarch64-linux-gnu and qemu-user (apt-get; skipped with a message where there is no apt-get), a static
# cross build, and the NEON path run under qemu-aarch64 (the driver fails unless NEON ran and matched).
# Same optimization and FP flags as the extension build in kernels/cpu/__init__.py.
set -euo pipefail
cd "$(dirname "$0")/.."
CORE=kernels/cpu/core
CASES=${OVSW_CORE_CASES:-240}
FLAGS=(-std=c++17 -O3 -ffp-contract=off -fno-math-errno -pthread)
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
start=$SECONDS

# build CXX OUTPUT FLAGS...: the core and its driver, the sources compiled in parallel, then linked.
build() {
  local cxx=$1 out=$2 src obj pid
  shift 2
  local objs=() pids=()
  for src in "$CORE"/*.cpp; do
    obj="$out-$(basename "$src" .cpp).o"
    objs+=("$obj")
    "$cxx" "$@" -c "$src" -o "$obj" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  "$cxx" "$@" "${objs[@]}" -o "$out"
}

# --- native
CXX=${CXX:-c++}
native=()
if [ "$(uname -m)" = x86_64 ] &&
   ! echo 'int main() { return 0; }' | "$CXX" -mavx512vpopcntdq -x c++ - -o "$BUILD/probe" 2>/dev/null; then
  echo "cpu_core: $CXX cannot target AVX-512 VPOPCNTDQ; building without the avx512 kernels"
  native+=(-DOVSW_CORE_NO_AVX512)
fi
echo "cpu_core: native $(uname -m) build ($CXX)"
build "$CXX" "$BUILD/test_core" "${FLAGS[@]}" "${native[@]}"
echo "cpu_core: built in $((SECONDS - start)) s"
"$BUILD/test_core" --cases "$CASES"

# --- aarch64 under emulation
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    echo "cpu_core: SKIP aarch64: no apt-get to install g++-aarch64-linux-gnu and qemu-user; NEON NOT tested"
    exit 0
  fi
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null; then
      echo "cpu_core: SKIP aarch64: not root and no sudo, cannot apt-get install the cross tools; NEON NOT tested"
      exit 0
    fi
    sudo=(sudo)
  fi
  echo "cpu_core: installing g++-aarch64-linux-gnu qemu-user (apt-get)"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    g++-aarch64-linux-gnu qemu-user >/dev/null
fi
echo "cpu_core: aarch64 cross build (static), run under qemu-aarch64"
build aarch64-linux-gnu-g++ "$BUILD/test_core_aarch64" "${FLAGS[@]}" -static
echo "cpu_core: at $((SECONDS - start)) s"
qemu-aarch64 "$BUILD/test_core_aarch64" --cases "$CASES" --require neon
echo "cpu_core: done in $((SECONDS - start)) s"
