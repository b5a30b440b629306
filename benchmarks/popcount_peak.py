"""This CPU's binary-operation peak: the throughput of the smallest XNOR-popcount inner loop, measured.

A packed binary GEMM's inner loop needs, per 512 weight-activation bit pairs, one ``vpxorq``, one
``vpopcntq`` and one ``vpaddq`` (AVX-512 VPOPCNTDQ; loads not counted). Instruction tables disagree on
how many of these a core issues per cycle (Zen 4 splits 512-bit ops into two 256-bit halves), so instead of
quoting one this runs exactly that loop on register-resident data, 12 independent accumulator chains so
that latency never limits it, on each of ``threads`` threads at once, and counts

    binary ops/s = 2 * 512 * (vpopcntq executed) / seconds     (one XNOR + one popcount per bit, as GOP/s
                                                                  of the layers counts 2 ops per MAC)

That is an upper bound no kernel reaches (it also loads, packs and runs an epilogue); a layer's share of it
says how far the layer is from the instruction limit. Needs a C++ compiler and an AVX-512 VPOPCNTDQ CPU;
``measure`` returns ``None`` otherwise.

    python benchmarks/popcount_peak.py --threads 1 2
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from lightning_ovsw.kernels.cpu import _cpp_extension  # the quiet cpp_extension import

CHAINS = 12  # independent accumulators (OVSW_ALL in the C++): more than latency x throughput on any x86 core

_SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdint>

// Each thread: `iters` rounds of CHAINS x (x ^= k; acc += popcount(x)). Returns the wall seconds of the
// parallel region; `sink` keeps the result alive so nothing is optimised away.
double popcount_loop(int64_t iters, int64_t threads) {
  volatile int64_t sink = 0;
  auto start = std::chrono::steady_clock::now();
  #pragma omp parallel num_threads(threads)
  {
    __m512i k = _mm512_set1_epi64(0x5DEECE66DLL + omp_get_thread_num());
    // CHAINS named registers (an array would live in memory): x_c ^= k; acc_c += popcount(x_c)
#define OVSW_DECL(c) __m512i x##c = _mm512_set1_epi64(0x9E3779B97F4A7C15LL * (c + 1)), a##c = _mm512_setzero_si512();
#define OVSW_STEP(c) x##c = _mm512_xor_si512(x##c, k); __asm__ volatile("" : "+v"(x##c)); \
                     a##c = _mm512_add_epi64(a##c, _mm512_popcnt_epi64(x##c));
#define OVSW_SUM(c) total += _mm512_reduce_add_epi64(a##c);
#define OVSW_ALL(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
    OVSW_ALL(OVSW_DECL)
    for (int64_t i = 0; i < iters; ++i) {
      OVSW_ALL(OVSW_STEP)
    }
    int64_t total = 0;
    OVSW_ALL(OVSW_SUM)
    #pragma omp atomic
    sink += total;
  }
  std::chrono::duration<double> dt = std::chrono::steady_clock::now() - start;
  return dt.count() + 0.0 * sink;
}
"""


def _cpu_has_vpopcntdq() -> bool:
    try:
        return "avx512_vpopcntdq" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@functools.cache
def _module():
    """The compiled loop, or None where the CPU or the compiler cannot run it."""
    if not _cpu_has_vpopcntdq():
        return None
    cpp_extension = _cpp_extension()
    try:
        return cpp_extension.load_inline(
            name="ovsw_popcount_peak_v2", cpp_sources=_SOURCE,
            functions=["popcount_loop"], extra_cflags=["-O2", "-mavx512f", "-mavx512vpopcntdq", "-fopenmp"],
            extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # noqa: BLE001  (no compiler: the benchmark goes on without a peak)
        print(f"popcount peak not measured ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
              file=sys.stderr)
        return None


def measure(threads: int, iters: int = 20_000_000, repeats: int = 5) -> dict | None:
    """Binary GOP/s of the loop on ``threads`` threads (best of ``repeats``), and the clock it implies."""
    module = _module()
    if module is None:
        return None
    module.popcount_loop(iters // 10, threads)  # warm-up: wake the cores
    seconds = min(module.popcount_loop(iters, threads) for _ in range(repeats))
    popcounts = iters * CHAINS * threads
    return {"threads": threads, "binary_gops": 2 * 512 * popcounts / seconds / 1e9,
            "vpopcntq_per_ns_per_thread": iters * CHAINS / seconds / 1e9, "seconds": seconds,
            "loop": f"{CHAINS} chains of vpxorq + vpopcntq + vpaddq (zmm), register-resident"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    args = parser.parse_args()
    for t in args.threads:
        r = measure(t)
        if r is None:
            sys.exit("this CPU or compiler cannot run the AVX-512 VPOPCNTDQ loop")
        print(f"{t} thread(s): {r['binary_gops']:8.1f} binary GOP/s peak "
              f"({r['vpopcntq_per_ns_per_thread']:.2f} vpopcntq per ns per thread)")


if __name__ == "__main__":
    main()
