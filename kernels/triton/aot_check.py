"""Compile every GPU kernel (each autotune config of the packed kernels; the training and OvSW update
kernels) for one CUDA architecture, without a GPU.

Triton compiles to PTX and (with its bundled ``ptxas``) to a cubin on any machine, so this catches
compile errors and reports register spills of each config before a GPU session runs them. Must run in
a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces the kernels):

    env -u TRITON_INTERPRET python -m lightning_ovsw.kernels.triton.aot_check [--arch 90]

Prints one line per kernel/config (registers, spill bytes, shared memory) and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..codes import Estimator, InnerProduct
from . import binarize, conv, dense, gemm, ovsw_update, pack

# int arguments that are multiples of 16 in the shapes that matter (Triton specializes those at launch)
_DIV16 = {"M", "N", "K", "KW", "KP", "COUT", "C", "CP", "R"}
_FLOAT_ARGS = {"delta", "momentum", "one_minus_momentum", "threshold", "penalty"}
_OUT = {"out_ptr": "*bf16", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "res_ptr": "*bf16"}


def _compile(kernel, pointers: dict[str, str], constants: dict, config: triton.Config, target: GPUTarget):
    signature, constexprs, attrs = {}, {}, {}
    values = {**constants, **config.kwargs}
    for i, name in enumerate(kernel.arg_names):
        if name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in values:
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in _DIV16 and not (kernel is conv.packed_conv_kernel and name == "KW"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=target, options=options)


def _resources(compiled) -> str:
    """Registers and spill bytes (cuobjdump on the cubin) and the kernel's shared memory."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    usage = "regs {} spill {} B".format(*found.groups()) if found else "registers unknown"
    return f"{usage}, shared memory {compiled.metadata.shared} B"


def jobs():
    """(label, kernel, pointer types, constexpr flags, config) for every kernel and GPU config."""
    words = {"a_ptr": "*i32", "b_ptr": "*i32", **_OUT}
    epi = dict(HAS_SCALE=True, HAS_BIAS=True, HAS_RES=True, RAW=False)
    for c in gemm.gemm_configs():
        yield "packed_gemm", gemm.packed_gemm_kernel, words, dict(epi, INTERPRET=False), c
    for c in conv.conv_configs():
        yield "packed_conv", conv.packed_conv_kernel, {"x_ptr": "*i32", "w_ptr": "*i32", **_OUT}, dict(
            epi, INTERPRET=False, PAD_ONE=False), c
    for c in dense.dense_configs():
        byte = "*u8" if c.kwargs["MODE"] == dense.DENSE_F8 else "*i8"
        yield "dense_gemm", dense.dense_gemm_kernel, {"a_ptr": byte, "b_ptr": byte, **_OUT}, epi, c
        yield "dense_conv", dense.dense_conv_kernel, {"x_ptr": byte, "w_ptr": byte, **_OUT}, dict(
            epi, PAD_ONE=True), c
    for mode, out in ((InnerProduct.DENSE_I8, "*i8"), (InnerProduct.DENSE_F8, "*fp8e4nv")):
        c = triton.Config({"MODE": int(mode.in_registers), "BLOCK_R": 32, "BLOCK_KW": 4}, num_warps=4, num_stages=1)
        yield "unpack_rows", dense.unpack_rows_kernel, {"bits_ptr": "*i32", "out_ptr": out}, {}, c
    c = triton.Config({"BLOCK_R": 16, "BLOCK_KW": 4}, num_warps=4, num_stages=1)
    yield "sign_pack_rows", pack.sign_pack_rows_kernel, {"x_ptr": "*bf16", "out_ptr": "*i32"}, {}, c
    c = triton.Config({"BLOCK_P": 64, "BLOCK_KW": 2}, num_warps=4, num_stages=1)
    yield "sign_pack_nchw", pack.sign_pack_nchw_kernel, {"x_ptr": "*bf16", "out_ptr": "*i32"}, {}, c
    yield from training_jobs()


def training_jobs():
    """The fused binary-layer training kernels (``binarize``) and the OvSW update kernels (``ovsw_update``)."""
    one = lambda warps: triton.Config({}, num_warps=warps, num_stages=1)  # noqa: E731
    for dt in ("fp32", "fp16", "bf16"):
        for moments in (True, False):
            yield "sign_moments", binarize.sign_moments_kernel, {
                "x_ptr": f"*{dt}", "sign_ptr": f"*{dt}", "mean_ptr": "*fp32", "m2_ptr": "*fp32"}, {
                "BLOCK": 4096, "MOMENTS": moments}, one(8)
        for scaled in (True, False):
            yield "weight", binarize.weight_kernel, {"w_ptr": "*fp32", "out_ptr": f"*{dt}", "alpha_ptr": "*fp32"}, {
                "BLOCK": 1024, "SCALED": scaled}, one(4)
        for estimator in Estimator:
            yield "sign_backward", binarize.sign_backward_kernel, {
                "grad_ptr": f"*{dt}", "x_ptr": f"*{dt}", "inv_std_ptr": "*fp32", "out_ptr": f"*{dt}"}, {
                "ESTIMATOR": int(estimator), "HAS_STD": True, "BLOCK": 2048}, one(8)
    yield "inv_std", binarize.inv_std_kernel, {"mean_ptr": "*fp32", "m2_ptr": "*fp32", "out_ptr": "*fp32"}, {
        "BLOCK": 4096, "NB_BLOCK": 256}, one(4)
    yield "ags_rows", ovsw_update.ags_rows_kernel, {
        "w_ptr": "*fp32", "g_ptr": "*fp32", "starts_ptr": "*i64", "lengths_ptr": "*i64", "ratio_ptr": "*fp32"}, {
        "BLOCK": 1024}, one(4)
    for full in (True, False):
        flags = dict(HAS_SKIP=full, HAS_TRACKER=full, HAS_GRAD=full, HAS_COUNTS=True)
        yield "sign_update", ovsw_update.sign_update_kernel, {
            "w_ptr": "*fp32", "bits_ptr": "*u8", "skip_ptr": "*i1", "g_ptr": "*fp32", "tracker_ptr": "*fp32",
            "counts_ptr": "*i32", "silent_ptr": "*i32"}, {**flags, "BYTES": 128}, one(4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = H100)")
    args = parser.parse_args(argv)
    if gemm.INTERPRET:
        print("TRITON_INTERPRET=1 is set: unset it to compile the kernels", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for label, kernel, pointers, constants, config in jobs():
        name = f"{label} {config.kwargs} warps={config.num_warps} stages={config.num_stages}"
        try:
            print(f"ok   {name}: {_resources(_compile(kernel, pointers, constants, config, target))}")
        except Exception as err:  # report every failing config, not just the first
            failed += 1
            print(f"FAIL {name}: {type(err).__name__}: {str(err)[:500]}")
    print(f"{failed} of the configs failed to compile for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
