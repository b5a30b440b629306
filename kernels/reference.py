"""Plain PyTorch reference of every packed op: the oracle for the kernels, and the fallback path.

Bit layout (design §3): signs are packed along the reduction axis (the last dim; input channels of
NHWC activations and of ``[Cout, KH, KW, C]`` weights) into int32 words, least significant bit first;
bit 1 means -1, i.e. the bit is ``x < 0`` (so ``-0.0`` and ``0`` are +1, as in training). Padding bits
of the last word are 0 in both operands, so ``dot(a, b) = K - 2 * popcount(a XOR b)`` over the words.

The references unpack to +-1 and use float matmul / ``F.conv2d``, which is exact for ``K < 2**24``:
an oracle independent of the popcount arithmetic the kernels use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WORD_BITS = 32
_BIT_WEIGHTS = (1 << torch.arange(WORD_BITS, dtype=torch.int64))


def num_words(k: int) -> int:
    """Number of 32-bit words that hold ``k`` sign bits."""
    return (k + WORD_BITS - 1) // WORD_BITS


def sign_pack(x: Tensor) -> Tensor:
    """Pack ``x < 0`` along the last dim: ``[..., K]`` float -> ``[..., ceil(K/32)]`` int32."""
    k = x.shape[-1]
    bits = (x < 0).to(torch.int64)
    bits = F.pad(bits, (0, num_words(k) * WORD_BITS - k))
    words = (bits.unflatten(-1, (-1, WORD_BITS)) * _BIT_WEIGHTS.to(x.device)).sum(-1)
    # two's complement: bit 31 set means a negative int32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_signs(words: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of ``sign_pack``: ``[..., W]`` int32 -> ``[..., k]`` of +-1 in ``dtype``."""
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    bits = bits.flatten(-2)[..., :k]
    return (1 - 2 * bits).to(dtype)


def epilogue(
    acc: Tensor,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``acc * scale + bias + residual`` in float32 over the last (channel) dim, cast to ``out_dtype``.

    With no scale, bias, residual and ``out_dtype`` the integer accumulator is returned unchanged.
    """
    if scale is None and bias is None and residual is None and out_dtype is None:
        return acc
    out = acc.to(torch.float32)
    if scale is not None:
        out = out * scale.to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    if residual is not None:
        out = out + residual.to(torch.float32)
    return out.to(out_dtype or torch.float32)


def packed_gemm(a_bits: Tensor, b_bits: Tensor, k: int) -> Tensor:
    """``[M, W] x [N, W] -> [M, N]`` int32: the +-1 dot products over the first ``k`` bits."""
    a = unpack_signs(a_bits, k, torch.float64 if k >= 2**24 else torch.float32)
    b = unpack_signs(b_bits, k, a.dtype)
    return (a @ b.T).round().to(torch.int32)


def packed_linear(
    x_bits: Tensor,
    w_bits: Tensor,
    k: int,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``packed_gemm`` followed by the fused epilogue."""
    return epilogue(packed_gemm(x_bits, w_bits, k), scale, bias, residual, out_dtype)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def packed_conv2d(
    x_bits: Tensor,
    w_bits: Tensor,
    in_channels: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    pad_value: int = 0,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Binary convolution on packed NHWC signs.

    ``x_bits [N, H, W, ceil(C/32)]``, ``w_bits [Cout, KH, KW, ceil(C/32)]`` -> ``[N, Ho, Wo, Cout]``
    (int32, or the epilogue's dtype). ``pad_value=0`` pads the *binarized* input with 0 (padded taps
    contribute nothing, as ``F.conv2d`` on ``sign(x)`` does); ``pad_value=1`` pads it with +1.
    ``residual`` is NHWC ``[N, Ho, Wo, Cout]``.
    """
    x = unpack_signs(x_bits, in_channels).permute(0, 3, 1, 2)
    w = unpack_signs(w_bits, in_channels).permute(0, 3, 1, 2)
    if pad_value == 1 and any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), value=1.0)
        padding = (0, 0)
    acc = F.conv2d(x, w, None, stride, padding, dilation).round().to(torch.int32)
    return epilogue(acc.permute(0, 2, 3, 1), scale, bias, residual, out_dtype)


def packed_conv2d_act(
    x_bits: Tensor,
    w_bits: Tensor,
    in_channels: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    pad_value: int = 0,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    min_val: float = -1.0,
    max_val: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``y = hardtanh(packed_conv2d(..., out_dtype), min_val, max_val)`` (float32 if ``out_dtype`` is None)
    and ``sign_pack(y)``: a block's activation for the float shortcut and the next binary conv's input."""
    y = packed_conv2d(x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale, bias, residual,
                      out_dtype or torch.float32)
    y = F.hardtanh(y, min_val, max_val)
    return y, sign_pack(y)
