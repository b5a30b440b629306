"""Binary training layers: ``BinaryConv2d`` and ``BinaryLinear`` (design §2, the authors' "xnor" mode).

Forward of both layers::

    x_hat = x / sqrt(var(x per sample, unbiased) + 1e-5)   (training only, detached: changes only the backward)
    y     = op(sign(x_hat), sign(W)) * alpha + bias

with ``sign(0) = +1``, the activation gradient of the chosen estimator (Bi-Real by default), the weight
gradient of the plain straight-through estimator by default, and ``alpha`` per output channel.
They subclass ``nn.Conv2d`` / ``nn.Linear`` so code that walks a model by type keeps working, and they
hold the very ``weight`` / ``bias`` Parameters of the float layer they replace.

Two equivalent paths compute ``sign(x_hat)``, ``sign(W)`` and ``alpha``: the plain PyTorch composition below
(the reference, and the CPU path) and the fused Triton ops of ``lightning_ovsw.kernels.train_ops`` (CUDA by
default; ``train_ops.FUSED`` / ``LIGHTNING_OVSW_FUSED`` force either). The fused path writes both signs
directly in the dtype the conv runs in (the autocast dtype under autocast) and keeps only ``x`` for the
backward (the plain path keeps ``x / std`` and ``sign(x)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ovsw.kernels import train_ops
from lightning_ovsw.quantizers import ACTIVATION_ESTIMATORS, WEIGHT_ESTIMATORS, apply_estimator

SCALES = ("standardized", "mean", "learnable", "none")
PAD_VALUES = (0, 1)
_EPS = 1e-5
CENTER_MOMENTUM = 0.1  # of the running input mean, as BatchNorm's default


@dataclass(frozen=True)
class BinaryOptions:
    """Options shared by every binary layer, validated once; one object travels from ``binarize_model`` and
    the zoo's layer factory to every layer (``pad_value`` has no effect on a linear layer, which has no
    padding, but is kept so that every layer of a model reports the same options)."""

    activation_estimator: str = "approx_sign"
    weight_estimator: str = "ste"
    scale: str = "standardized"
    pad_value: int = 0

    def __post_init__(self) -> None:
        for field, allowed in (
            ("activation_estimator", ACTIVATION_ESTIMATORS),
            ("weight_estimator", WEIGHT_ESTIMATORS),
            ("scale", SCALES),
        ):
            if not isinstance(getattr(self, field), str) or getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r} is not supported; choose one of {allowed}.")
        # exactly the ints 0 and 1 (the packed ops take an int): 1.0, True or "1" would pass ``in (0, 1)``
        if type(self.pad_value) is not int or self.pad_value not in PAD_VALUES:
            raise ValueError(
                f"pad_value={self.pad_value!r} is not supported; pass the int 0 (zero padding of the binarized "
                "input, as F.conv2d) or 1 (one padding)."
            )


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics (std, alpha) are computed in at least float32, also under half-precision weights."""
    return torch.promote_types(dtype, torch.float32)


def standardize_input(x: Tensor) -> Tensor:
    """Divide each sample by its (detached, unbiased) standard deviation over all non-batch dims.

    ``sign`` is scale invariant, so this changes only the activation gradient (the authors' code).
    """
    if x.ndim < 2 or x[0].numel() < 2:  # no per-sample spread to measure: leave x as it is
        return x
    dims = tuple(range(1, x.ndim))
    var = x.detach().to(_stat_dtype(x.dtype)).var(dim=dims, keepdim=True)
    return x / torch.sqrt(var + _EPS).to(x.dtype)


def standardized_scale(weight: Tensor) -> Tensor:
    """``alpha_i = mean(|standardize(W[i])|)`` with the unbiased row variance + 1e-5; detached.

    A one-element row (``BinaryLinear(1, n)``, ``BinaryConv2d(1, n, 1)``) has no variance (``torch.var`` of
    one value is NaN); its ``alpha`` is defined as 1, the scale-free choice (the standardized scale never
    depends on the magnitude of ``W``). The fused kernel and the packed layers use the same value.
    """
    w = weight.detach().flatten(1).to(_stat_dtype(weight.dtype))
    if w.shape[1] == 1:
        return torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    centered = w - w.mean(dim=1, keepdim=True)
    return (centered / torch.sqrt(w.var(dim=1, keepdim=True) + _EPS)).abs().mean(dim=1)


def mean_abs_scale(weight: Tensor) -> Tensor:
    """``alpha_i = mean(|W[i]|)``, detached: XNOR-Net's scale, the output magnitude of the float layer.

    For layers that no normalization follows (``binarize_model(unnormalized="mean")``): the standardized
    ``alpha`` is scale-free (about 0.8), so without a BatchNorm the output would grow with ``sqrt(fan_in)``.
    """
    return weight.detach().flatten(1).to(_stat_dtype(weight.dtype)).abs().mean(dim=1)


def subtract_per_channel(x: Tensor, mean: Tensor, channel_dim: int) -> Tensor:
    """``x - mean`` with ``mean`` (one value per channel) broadcast along ``channel_dim``, in ``x``'s dtype: the
    centered input of a binary layer (``BinaryLayer.center_input``), the same in eval and packed."""
    shape = [1] * x.ndim
    shape[channel_dim] = -1
    return x - mean.to(x.dtype).view(shape)


def centering_mean(x: Tensor, running: Tensor, channel_dim: int, training: bool) -> Tensor:
    """The per-channel threshold a centered layer subtracts (``BinaryLayer.center_input``): the detached batch
    mean in training, ``running`` in eval or for a lone unbatched vector (no batch to average). The real-valued
    shortcut around a centered conv subtracts the same (``lightning_ovsw.shortcuts``)."""
    dims = tuple(d for d in range(x.ndim) if d != channel_dim)
    return x.detach().to(running.dtype).mean(dim=dims) if training and dims else running


def _compute_dtype(x: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype an op on ``x`` runs in: autocast's for ``x``'s device when it is on, else ``dtype``."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype


class BinaryLayer:
    """Mixin for layers with a binarized ``weight`` (out channels first) and per-channel ``alpha``.

    It is what ``lightning_ovsw.registry`` looks for; the callbacks act on ``weight`` of every one.
    """

    weight: nn.Parameter
    options: BinaryOptions
    input_mean: Tensor | None

    def _init_binary(self, options: BinaryOptions) -> None:
        self.options = options
        self.register_buffer("input_mean", None)
        if options.scale == "learnable":
            init = self.weight.detach().flatten(1).abs().mean(dim=1)
            self.alpha = nn.Parameter(init.to(_stat_dtype(self.weight.dtype)))
        else:
            self.register_parameter("alpha", None)

    def center_input(self) -> None:
        """Threshold the input at its per-channel mean: ``sign(x - m)`` instead of ``sign(x)``.

        For sign-skewed inputs (a max-pool output is mostly >= 0, ``lightning_ovsw.layer_roles``), where
        ``sign(x)`` is +1 almost everywhere. ``m`` is a threshold like ReActNet's RSign, estimated the way
        BatchNorm estimates its mean instead of learned: the batch mean in training (detached, so the
        activation gradient is unchanged), the running mean (buffer ``input_mean``, momentum 0.1) in eval
        and in the packed layer.
        """
        self.input_mean = torch.zeros(self.weight.shape[1], dtype=_stat_dtype(self.weight.dtype),
                                      device=self.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """A float checkpoint has no ``input_mean``: keep the current one, so float weights warm-start."""
        if self.input_mean is not None and prefix + "input_mean" not in state_dict:
            state_dict[prefix + "input_mean"] = self.input_mean
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _centered(self, x: Tensor, channel_dim: int) -> Tensor:
        """``x - m`` per channel (``center_input``), or ``x`` itself for a layer that is not centered."""
        if self.input_mean is None:
            return x
        mean = centering_mean(x, self.input_mean, channel_dim, self.training)
        if mean is not self.input_mean:
            with torch.no_grad():
                self.input_mean.lerp_(mean, CENTER_MOMENTUM)
        return subtract_per_channel(x, mean, channel_dim)

    def binary_weight(self) -> Tensor:
        """``sign(W)`` with the configured weight estimator."""
        return apply_estimator(self.options.weight_estimator, self.weight)

    def binary_input(self, x: Tensor) -> Tensor:
        """``sign(x)`` (standardized first in training) with the configured activation estimator."""
        if self.training:
            x = standardize_input(x)
        return apply_estimator(self.options.activation_estimator, x)

    def scale_factor(self) -> Tensor | None:
        """Per-output-channel ``alpha`` (float32 or wider), or ``None`` for ``scale="none"``."""
        if self.options.scale == "standardized":
            return standardized_scale(self.weight)
        if self.options.scale == "mean":
            return mean_abs_scale(self.weight)
        if self.options.scale == "learnable":
            return self.alpha
        return None

    def _fused_weight(self, x: Tensor) -> Tensor:
        """``alpha * sign(W)`` (per output row) in the dtype the op on ``x`` runs in, from the fused weight
        op: the conv/linear applies the scale, so its output needs no extra pass (learnable ``alpha`` keeps its
        gradient through the product; the standardized one comes out of the fused op)."""
        o = self.options
        wb, _ = train_ops.fused_binary_weight(self.weight, o.weight_estimator, _compute_dtype(x, self.weight.dtype),
                                              scaled=o.scale == "standardized")
        if o.scale in ("mean", "learnable"):
            wb = wb * self.scale_factor().to(wb.dtype).view(-1, *[1] * (wb.dim() - 1))
        return wb

    def _scale_and_bias(self, out: Tensor, alpha: Tensor | None, channel_dim: int) -> Tensor:
        shape = [1] * out.ndim
        shape[channel_dim] = -1
        if alpha is not None:
            out = out * alpha.to(out.dtype).view(shape)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).view(shape)
        return out

    def _options_repr(self) -> str:
        centered = ", centered_input" if self.input_mean is not None else ""
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self.options).items()) + centered


def _validate_conv(conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise ValueError(
            f"BinaryConv2d supports groups=1 only (got groups={conv.groups}); keep grouped or depthwise "
            "convolutions in full precision (binarize_model skips them unless filter_fn selects them)."
        )
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"BinaryConv2d supports padding_mode='zeros' only (got {conv.padding_mode!r}); use "
            "pad_value=1 for one-padding of the binarized input."
        )


class BinaryConv2d(BinaryLayer, nn.Conv2d):
    """``conv(sign(x), sign(W)) * alpha (+ bias)`` with zero (default) or one padding of ``sign(x)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        activation_estimator: str = "approx_sign",
        weight_estimator: str = "ste",
        scale: str = "standardized",
        pad_value: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        options = BinaryOptions(activation_estimator, weight_estimator, scale, pad_value)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            device=device, dtype=dtype,
        )
        _validate_conv(self)
        self._init_binary(options)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, options: BinaryOptions | None = None) -> BinaryConv2d:
        """A binary twin of ``conv`` that holds the same ``weight`` and ``bias`` Parameters."""
        _validate_conv(conv)
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, device="meta", **asdict(options or BinaryOptions()),
        )
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._init_binary(layer.options)
        return layer.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # unbatched (C, H, W): one sample of the batched call
            return self.forward(x.unsqueeze(0)).squeeze(0)
        x = self._centered(x, channel_dim=1)
        if train_ops.use_fused(x, self.weight):
            out = train_ops.fused_binary_conv2d(
                x, self._fused_weight(x), self.training, self.options.activation_estimator, self.stride,
                self._reversed_padding_repeated_twice, self.dilation, self.options.pad_value)
            return self._scale_and_bias(out, None, channel_dim=1)
        xb = self.binary_input(x)
        padding = self.padding
        if self.options.pad_value == 1 and any(self._reversed_padding_repeated_twice):
            xb = F.pad(xb, self._reversed_padding_repeated_twice, value=1.0)
            padding = 0
        out = F.conv2d(xb, self.binary_weight(), None, self.stride, padding, self.dilation, self.groups)
        return self._scale_and_bias(out, self.scale_factor(), channel_dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._options_repr()}"


class BinaryLinear(BinaryLayer, nn.Linear):
    """``linear(sign(x), sign(W)) * alpha (+ bias)``; ``pad_value`` is accepted for one ``BinaryOptions`` per
    model and has no effect (a linear layer has no padding)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        activation_estimator: str = "approx_sign",
        weight_estimator: str = "ste",
        scale: str = "standardized",
        pad_value: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        options = BinaryOptions(activation_estimator, weight_estimator, scale, pad_value)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_binary(options)

    @classmethod
    def from_float(cls, linear: nn.Linear, options: BinaryOptions | None = None) -> BinaryLinear:
        """A binary twin of ``linear`` that holds the same Parameters."""
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta",
            **asdict(options or BinaryOptions()),
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_binary(layer.options)
        return layer.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        x = self._centered(x, channel_dim=x.ndim - 1)
        if x.dim() > 1 and train_ops.use_fused(x, self.weight):  # unbatched inputs: plain path
            out = train_ops.fused_binary_linear(x, self._fused_weight(x), self.training,
                                                self.options.activation_estimator)
            alpha = None
        else:
            out, alpha = F.linear(self.binary_input(x), self.binary_weight()), self.scale_factor()
        return self._scale_and_bias(out, alpha, channel_dim=out.ndim - 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._options_repr()}"
