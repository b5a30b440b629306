"""Packed inference modules: ``PackedConv2d`` and ``PackedLinear`` (design §3).

A packed module holds its binary weight as sign bits (int32 words, K-contiguous: ``[Cout, KH, KW,
ceil(C/32)]`` for a convolution, ``[N, ceil(K/32)]`` for a linear layer) and one folded per-channel
``scale`` and ``bias`` (float32 buffers), so its forward is

    y = acc * scale + bias,   acc = sum(sign(x) * sign(W))   (an exact integer)

with ``scale = alpha`` and ``bias = b`` for a lone binary layer (``y = acc * alpha + b``, design §2), or
``scale = alpha * g``, ``bias = (b - mean) * g + beta`` with ``g = gamma / sqrt(var + eps)`` when the
BatchNorm that consumes the layer is folded in. The integer part runs in the ``ovsw`` packed ops
(``lightning_ovsw.kernels.ops``: C++ popcount kernels on CPU, Triton on GPU, the reference elsewhere).
Before capturing a packed model in a CUDA graph, run it once on the captured shapes (``warmup``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import lightning_ovsw.kernels.ops  # noqa: F401  (registers torch.ops.ovsw)
from lightning_ovsw.kernels.reference import conv_output_size, num_words
from lightning_ovsw.layers import BinaryConv2d, BinaryLayer, BinaryLinear, subtract_per_channel

_OPS = torch.ops.ovsw


def _folded_constants(
    layer: BinaryLayer, bn: nn.modules.batchnorm._BatchNorm | None
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, bias)`` in float32, computed in float64, with ``bn`` folded in if given."""
    out_channels = layer.weight.shape[0]
    device = layer.weight.device
    alpha = layer.scale_factor()
    scale = (
        alpha.detach().to(torch.float64)
        if alpha is not None
        else torch.ones(out_channels, dtype=torch.float64, device=device)
    )
    bias = (
        layer.bias.detach().to(torch.float64)
        if layer.bias is not None
        else torch.zeros(out_channels, dtype=torch.float64, device=device)
    )
    if bn is not None:
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"cannot fold {bn!r}: it has no running statistics (track_running_stats=False); "
                "pass fold_batchnorm=False."
            )
        g = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
        if bn.weight is not None:
            g = g * bn.weight.detach().to(torch.float64)
        bias = (bias - bn.running_mean.detach().to(torch.float64)) * g
        if bn.bias is not None:
            bias = bias + bn.bias.detach().to(torch.float64)
        scale = scale * g
    return scale.to(torch.float32), bias.to(torch.float32)


class _InputThreshold:
    """The input threshold a packed layer keeps from a centered binary layer (``BinaryLayer.center_input``):
    buffer ``input_mean`` (float32), or None."""

    input_mean: Tensor | None

    @property
    def centered(self) -> bool:
        return self.input_mean is not None

    def _init_input_mean(self, channels: int, centered: bool, device: torch.device | str | None) -> None:
        self.register_buffer("input_mean", torch.zeros(channels, dtype=torch.float32, device=device) if centered else None)

    def _copy_input_mean(self, layer: BinaryLayer) -> None:
        if layer.input_mean is not None:
            self.input_mean.copy_(layer.input_mean)

    def _centered(self, x: Tensor, channel_dim: int) -> Tensor:
        return x if self.input_mean is None else subtract_per_channel(x, self.input_mean, channel_dim)


def _check_float(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input, got {x.dtype}; convert it with x.float().")


class PackedConv2d(_InputThreshold, nn.Module):
    """Inference twin of ``BinaryConv2d``: packed sign bits, folded per-channel constants.

    Input: float ``[N, C, H, W]`` (any memory format; channels_last avoids a copy). Output: float
    ``[N, Cout, Ho, Wo]`` of the input dtype, stored channels_last (the ops work in NHWC).
    """

    weight_bits: Tensor
    scale: Tensor
    bias: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        pad_value: int = 0,
        centered: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.pad_value = pad_value
        shape = (out_channels, *self.kernel_size, num_words(in_channels))
        self.register_buffer("weight_bits", torch.zeros(shape, dtype=torch.int32, device=device))
        self.register_buffer("scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32, device=device))
        self._init_input_mean(in_channels, centered, device)

    @classmethod
    def from_binary(cls, layer: BinaryConv2d, bn: nn.BatchNorm2d | None = None) -> PackedConv2d:
        """Pack ``layer`` (``sign(W)`` as bits), folding ``alpha``, its bias and ``bn`` if given."""
        left, right, top, bottom = layer._reversed_padding_repeated_twice
        if left != right or top != bottom:
            raise ValueError(
                f"cannot pack {layer!r}: padding={layer.padding!r} is asymmetric here; use explicit "
                "symmetric padding (an int or a pair)."
            )
        packed = cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, (top, left),
            layer.dilation, layer.options.pad_value, layer.input_mean is not None, device=layer.weight.device,
        )
        with torch.no_grad():
            packed.weight_bits.copy_(_OPS.sign_pack(layer.weight.detach().permute(0, 2, 3, 1).contiguous()))
            packed.scale, packed.bias = _folded_constants(layer, bn)
            packed._copy_input_mean(layer)
        return packed

    def _apply(self, fn, recurse=True):
        """Keep the bits K-contiguous whatever ``.to(memory_format=...)`` asks of 4-D tensors."""
        super()._apply(fn, recurse)
        self.weight_bits = self.weight_bits.contiguous()
        return self

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None = None,
        x_bits: Tensor | None = None,
        act: tuple[float, float] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``y`` (NCHW shape, channels_last memory), plus ``residual`` if given (fused into the epilogue
        when it has ``y``'s shape and dtype, else added afterwards with broadcasting).

        ``x_bits``: the packed signs of ``x`` if already known (from a previous layer's ``act`` output), so
        ``x`` is not packed again. ``act=(min_val, max_val)``: return ``(hardtanh(y), its packed sign
        bits)`` from one fused epilogue (``ovsw::packed_conv2d_act``); ``pack_model`` sets both up. An unbatched
        ``(C, H, W)`` input (with no ``residual`` / ``x_bits`` / ``act``) gives the ``(Cout, Ho, Wo)`` output
        of the batched call, like ``BinaryConv2d``.
        """
        _check_float(x, type(self).__name__)
        if x.ndim == 3 and residual is None and x_bits is None and act is None:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input [N, {self.in_channels}, H, W], got {tuple(x.shape)}."
            )
        if self.centered and x_bits is not None:
            raise ValueError(f"{type(self).__name__} thresholds its input at input_mean, so x_bits (signs at 0) "
                             "cannot stand in for x; pass x alone.")
        x = self._centered(x, channel_dim=1)
        n, _, h, w = x.shape
        fuse = residual is not None and residual.dtype == x.dtype and residual.shape == (
            n, self.out_channels, *self._output_size(h, w))
        nhwc_residual = residual.permute(0, 2, 3, 1).contiguous() if fuse else None
        if x_bits is None:
            x_bits = _OPS.sign_pack_nchw(x)  # NCHW (any memory format) -> packed NHWC words, one pass
        elif tuple(x_bits.shape) != (n, h, w, num_words(self.in_channels)):
            raise ValueError(
                f"x_bits must be the packed signs of x, [N, H, W, ceil(C/32)] = {(n, h, w, num_words(x.shape[1]))}"
                f", got {tuple(x_bits.shape)}."
            )
        args = (x_bits, self.weight_bits, self.in_channels, self.stride, self.padding, self.dilation,
                self.pad_value, self.scale, self.bias, nhwc_residual)
        if act is not None and (fuse or residual is None):
            y, y_bits = _OPS.packed_conv2d_act(*args, float(act[0]), float(act[1]), x.dtype)
            return y.permute(0, 3, 1, 2), y_bits
        out = _OPS.packed_conv2d(*args, x.dtype).permute(0, 3, 1, 2)
        if residual is not None and not fuse:
            out = out + residual
        if act is None:
            return out
        out = torch.nn.functional.hardtanh(out, *act)
        return out, _OPS.sign_pack_nchw(out)

    def _output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, pad_value={self.pad_value}, centered={self.centered}"
        )


class PackedLinear(_InputThreshold, nn.Module):
    """Inference twin of ``BinaryLinear``: ``[..., K]`` float -> ``[..., N]`` of the input dtype.

    With a folded ``BatchNorm1d`` (which normalizes dim 1), the input must be 2-D ``[batch, K]``.
    """

    weight_bits: Tensor
    scale: Tensor
    bias: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bn_folded: bool = False,
        centered: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bn_folded = bn_folded
        self.register_buffer(
            "weight_bits", torch.zeros(out_features, num_words(in_features), dtype=torch.int32, device=device)
        )
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        self._init_input_mean(in_features, centered, device)

    @classmethod
    def from_binary(cls, layer: BinaryLinear, bn: nn.BatchNorm1d | None = None) -> PackedLinear:
        """Pack ``layer`` (``sign(W)`` as bits), folding ``alpha``, its bias and ``bn`` if given."""
        packed = cls(layer.in_features, layer.out_features, bn is not None, layer.input_mean is not None,
                     device=layer.weight.device)
        with torch.no_grad():
            packed.weight_bits.copy_(_OPS.sign_pack(layer.weight.detach().contiguous()))
            packed.scale, packed.bias = _folded_constants(layer, bn)
            packed._copy_input_mean(layer)
        return packed

    def forward(self, x: Tensor) -> Tensor:
        _check_float(x, type(self).__name__)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input [..., {self.in_features}], got {tuple(x.shape)}."
            )
        if self.bn_folded and x.ndim != 2:
            raise ValueError(
                f"{type(self).__name__} has a folded BatchNorm1d and needs 2-D input [batch, "
                f"{self.in_features}], got {tuple(x.shape)}; pack with fold_batchnorm=False for other shapes."
            )
        x = self._centered(x, channel_dim=x.ndim - 1)
        lead = x.shape[:-1]
        bits = _OPS.sign_pack(x.reshape(-1, self.in_features).contiguous())
        out = _OPS.packed_linear(
            bits, self.weight_bits, self.in_features, self.scale, self.bias, None, x.dtype
        )
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bn_folded={self.bn_folded}, "
                f"centered={self.centered}")


def packed_nbytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer of ``module``: what a packed model holds in memory.

    For a packed layer that is its bit-packed weight plus the folded ``scale`` and ``bias``; for a whole
    packed model it also counts the layers kept in full precision.
    """
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def warmup(model: nn.Module, *example_inputs: Tensor) -> Tensor:
    """Run ``model`` once without gradients so that every packed op tunes itself for these shapes; returns
    the output.

    On CUDA, the first call of a packed op on a new shape autotunes its Triton kernel and may time the
    two-pass path against it: timing is not allowed while a CUDA graph is captured. Call this with inputs
    of the shapes and dtypes to be captured, then capture (``torch.cuda.graph`` or
    ``torch.compile(mode="reduce-overhead")``); a packed op that meets an unseen shape during capture
    raises an error that says so. Harmless (one forward pass) on CPU.
    """
    if not example_inputs:
        raise ValueError("warmup needs at least one example input of the shape to be captured.")
    with torch.no_grad():
        out = model(*example_inputs)
    if any(isinstance(x, Tensor) and x.is_cuda for x in example_inputs):
        torch.cuda.synchronize()
    return out
