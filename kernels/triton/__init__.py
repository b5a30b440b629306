"""Triton GPU kernels for the packed binary ops (design §3); entry points in ``ops``.

Modules: ``pack`` (sign-and-pack), ``gemm`` (packed GEMM, in-register popcount / int8 / fp8 inner
products), ``conv`` (implicit-GEMM packed conv2d), ``dense`` (two-pass: unpack to bytes, dense tl.dot),
``_common`` (popcount, unpacking, epilogue), ``aot_check`` (compile every config without a GPU).
"""
