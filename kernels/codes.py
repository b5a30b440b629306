"""The integer codes the kernels take for a sign estimator and an inner-product mode, named once.

Python code uses the enums; inside ``@triton.jit`` functions (which read only ``tl.constexpr`` globals) the
same values are the ``tl.constexpr`` twins in ``kernels/triton/_common.py``.
"""

from __future__ import annotations

from enum import IntEnum


class Estimator(IntEnum):
    """Sign estimators (their gradients: ``lightning_ovsw.quantizers``)."""

    APPROX_SIGN = 0  # Bi-Real: max(0, 2 - 2|x|)
    STE = 1  # identity
    CLIPPED_STE = 2  # [|x| <= 1]


#: Estimator names accepted by the binary layers (``BinaryOptions``) and their codes.
ACTIVATION_ESTIMATORS: dict[str, Estimator] = {
    "approx_sign": Estimator.APPROX_SIGN, "ste": Estimator.STE, "clipped_ste": Estimator.CLIPPED_STE}
WEIGHT_ESTIMATORS: dict[str, Estimator] = {"ste": Estimator.STE, "clipped_ste": Estimator.CLIPPED_STE}


class InnerProduct(IntEnum):
    """How a packed GEMM / conv kernel computes its +-1 dot products (a constexpr of every config)."""

    POPC = 0  # XOR + popcount over 32-bit words
    DOT_I8 = 1  # unpack to int8 +-1 in registers, tl.dot with int32 accumulation
    DOT_F8 = 2  # unpack to fp8 e4m3 +-1 in registers, tl.dot with fp32 accumulation (sm >= 89)
    # Two-pass modes: unpack both operands to +-1 bytes in memory once, then a dense tl.dot kernel (for
    # large compute-bound shapes where unpacking in the main loop costs more than the extra memory pass).
    DENSE_I8 = 3
    DENSE_F8 = 4

    @property
    def in_registers(self) -> InnerProduct:
        """The in-register mode that unpacks to the same bytes (``DENSE_F8`` -> ``DOT_F8``)."""
        return {InnerProduct.DENSE_I8: InnerProduct.DOT_I8, InnerProduct.DENSE_F8: InnerProduct.DOT_F8}.get(self, self)
