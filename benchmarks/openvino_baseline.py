"""OpenVINO's binary path as the CPU baseline (issue 13): our binarized model rebuilt as an OpenVINO graph.

``to_openvino(model, input_shape)`` traces an eval-mode model with ``torch.fx`` (binary layers as leaves)
and translates it node by node with ``openvino.opset1``: every ``BinaryConv2d`` becomes

    FakeQuantize(levels=2) -> BinaryConvolution("xnor-popcount") -> Multiply(alpha) -> Add(bias)

and the float layers stay float (Convolution, BatchNorm as Multiply/Add, Hardtanh as Clamp, pooling,
adds, MatMul). A model without binary layers (the float twin) gives its plain fp32 OpenVINO twin.
``compare`` checks the translation against our packed model (``pack_model``) on the same weights.

What OpenVINO's CPU plugin does (2026.4; read in its source, confirmed by tests/test_openvino_baseline.py):

* FakeQuantize with levels=2 and ``input_low == input_high = t`` maps ``x <= t`` to ``output_low``
  and ``x > t`` to ``output_high``: with ``t = 0``, ``0`` and ``-0.0`` binarize to -1, ours to +1
  (``sign(0) = +1``). We use ``t = -FLT_MIN``: 0 and -0.0 become +1; only negative subnormals, which
  we binarize to -1, still become +1.
* It binarizes (packs the bits BinaryConvolution reads) only for ``output_low, output_high`` in {0, 1}:
  we use (0, 1), bit 0 meaning -1. With ``output_low = -1`` the FakeQuantize stays float and the
  f32 -> u1 conversion in front of BinaryConvolution makes every nonzero value, -1 included, bit 1.
* BinaryConvolution ``pad_value = 0.0`` skips padded taps (the kernel's ``exclude_pad``): exactly our
  zero padding of ``sign(x)``; ``1.0`` pads with +1 (our ``pad_value=1``); any other value pads with -1.
* u1 weights: the plugin reads element ``i`` of a u1 constant from bit ``i % 8`` counted from the
  *least* significant bit (as OpenVINO's own ConvToBinaryConv pass packs them), although
  ``opset1.constant(values, dtype=u1)`` packs element 0 into the most significant bit: weights packed
  that way come out bit-reversed within each byte. Hence ``np.packbits(..., bitorder="little")``.
  The u1 constant is built on a Tensor that owns its memory: a Tensor made from a numpy array only
  views it, and a Constant made from that Tensor read freed memory once the array was gone (wrong
  results from about 1 KB of weights up, heap corruption).
* A bug: a binarization FakeQuantize fused into the BinaryConvolution in front of it *together with* that
  conv's residual Add (its "sum" post-op), as in ``hardtanh(binconv(x) + x)`` read by binary convs only
  (torchvision's BasicBlock before a downsampling block), gives wrong results (errors of the order of
  the logits). The plugin fuses such a FakeQuantize only if each of its constant inputs has one
  consumer, so one constant node serves as both ``input_low`` and ``input_high``: that FakeQuantize
  runs on its own. Where OpenVINO folds a Multiply/Add into the thresholds (no residual in between)
  it makes new constants and still fuses; resnet18_1w1a's graph is unchanged (its block outputs also
  feed float shortcuts, which keeps every FakeQuantize separate anyway).
* ``in_channels`` not a multiple of 8 gave wrong results (12, 36, 100) or did not compile (3) in a
  quick test, so ``to_openvino`` refuses them; every binary conv of the ResNets has 64..512.
"""

from __future__ import annotations

import operator
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import openvino as ov
import torch
import torch.nn.functional as F
from openvino import properties
from torch import fx, nn

try:
    import openvino.opset1 as ops
except ImportError:  # OpenVINO before 2025 has the opsets under openvino.runtime only
    import openvino.runtime.opset1 as ops

from lightning_ovsw.layers import BinaryConv2d, BinaryLayer
from lightning_ovsw.packing import pack_model

# FakeQuantize threshold: x > -FLT_MIN is bit 1 (+1) for 0 and -0.0, as our sign(0) = +1
THRESHOLD = -float(np.finfo(np.float32).tiny)
CHANNEL_MULTIPLE = 8  # in_channels of a binary conv must be a multiple of this (see the module docstring)


class _Tracer(fx.Tracer):
    """Binary layers (and torch.nn modules, fx's default) stay single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, BinaryLayer) or super().is_leaf_module(m, module_qualified_name)


def _f32(t: torch.Tensor | np.ndarray) -> ov.Node:
    return ops.constant(np.ascontiguousarray(np.asarray(t, dtype=np.float32)))


def _per_channel(values: torch.Tensor, ndim: int) -> ov.Node:
    """A ``[1, C, 1, ...]`` float32 constant broadcast over a rank-``ndim`` NC... tensor."""
    return _f32(values.detach().double().reshape(1, -1, *[1] * (ndim - 2)).numpy())


def u1_weights(weight: torch.Tensor, bitorder: str = "little") -> ov.Node:
    """``sign(W) >= 0`` as an OpenVINO u1 constant, element ``i`` in bit ``i % 8`` from the LSB (what the
    CPU plugin reads; ``bitorder`` is a parameter only so the test can check that the other order fails)."""
    bits = (weight.detach() >= 0).numpy().astype(np.uint8)  # bit 1 = +1 (sign(0) = +1, as BinaryConv2d)
    tensor = ov.Tensor(ov.Type.u1, ov.Shape(list(bits.shape)))  # owns its memory: a Tensor made from a numpy
    tensor.data[:] = np.packbits(bits.ravel(), bitorder=bitorder)  # array only views it, freed with the array
    return ov.op.Constant(tensor)


def _pair(v: int | Sequence[int]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def binary_conv(x: ov.Node, layer: BinaryConv2d, bitorder: str = "little") -> ov.Node:
    """FakeQuantize(levels=2) + BinaryConvolution + per-channel alpha and bias: ``layer`` in eval mode."""
    if layer.in_channels % CHANNEL_MULTIPLE or layer.groups != 1 or isinstance(layer.padding, str):
        raise ValueError(f"{layer!r}: only groups=1, explicit padding and in_channels % {CHANNEL_MULTIPLE} == 0 are translated.")
    c = layer.in_channels
    threshold = _f32(np.full((1, c, 1, 1), THRESHOLD))  # one node as input_low and input_high: see the docstring
    bits = ops.fake_quantize(x, threshold, threshold, _f32(np.zeros((1, c, 1, 1))), _f32(np.ones((1, c, 1, 1))), 2)
    pad = _pair(layer.padding)
    y = ops.binary_convolution(bits, u1_weights(layer.weight, bitorder), _pair(layer.stride), pad, pad,
                               _pair(layer.dilation), "xnor-popcount", float(layer.options.pad_value))
    alpha = layer.scale_factor()
    if alpha is not None:
        y = ops.multiply(y, _per_channel(alpha, 4))
    if layer.bias is not None:
        y = ops.add(y, _per_channel(layer.bias, 4))
    return y


def _batchnorm(x: ov.Node, bn: nn.modules.batchnorm._BatchNorm, ndim: int) -> ov.Node:
    """Eval-mode BatchNorm as ``x * g + (beta - mean * g)``, ``g = gamma / sqrt(var + eps)`` (float64)."""
    g = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        g = g * bn.weight.double()
    shift = -bn.running_mean.double() * g
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return ops.add(ops.multiply(x, _per_channel(g, ndim)), _per_channel(shift, ndim))


def _module(x: ov.Node, m: nn.Module, bitorder: str) -> ov.Node:
    """One leaf module of the trace."""
    ndim = x.get_output_partial_shape(0).rank.get_length()
    if isinstance(m, BinaryConv2d):
        return binary_conv(x, m, bitorder)
    if isinstance(m, BinaryLayer):
        raise NotImplementedError(f"{type(m).__name__} is not translated (the benchmark models have none).")
    if type(m) is nn.Conv2d:
        if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise ValueError(f"{m!r}: only groups=1 with explicit zero padding is translated.")
        pad = _pair(m.padding)
        y = ops.convolution(x, _f32(m.weight.detach()), _pair(m.stride), pad, pad, _pair(m.dilation))
        return y if m.bias is None else ops.add(y, _per_channel(m.bias, 4))
    if isinstance(m, nn.Linear):
        y = ops.matmul(x, _f32(m.weight.detach()), False, True)
        return y if m.bias is None else ops.add(y, _f32(m.bias.detach().reshape(1, -1)))
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _batchnorm(x, m, ndim)
    if isinstance(m, nn.Hardtanh):
        return ops.clamp(x, float(m.min_val), float(m.max_val))
    if isinstance(m, nn.ReLU):
        return ops.relu(x)
    if isinstance(m, nn.Identity):
        return x
    if isinstance(m, nn.Flatten) and m.end_dim == -1:
        return _flatten(x, m.start_dim)
    if isinstance(m, nn.MaxPool2d) and _pair(m.dilation) == [1, 1] and not m.return_indices:
        pad = _pair(m.padding)
        stride = _pair(m.stride or m.kernel_size)
        return ops.max_pool(x, stride, pad, pad, _pair(m.kernel_size), "ceil" if m.ceil_mode else "floor")
    if isinstance(m, nn.AvgPool2d) and m.divisor_override is None:
        pad = _pair(m.padding)
        stride = _pair(m.stride or m.kernel_size)
        return ops.avg_pool(x, stride, pad, pad, _pair(m.kernel_size), not m.count_include_pad,
                            "ceil" if m.ceil_mode else "floor")
    if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == [1, 1]:
        return ops.reduce_mean(x, _axes([2, 3]), True)
    raise NotImplementedError(f"to_openvino does not translate {m!r}.")


def _axes(axes: list[int]) -> ov.Node:
    return ops.constant(np.array(axes, dtype=np.int64))


def _flatten(x: ov.Node, start_dim: int = 0) -> ov.Node:
    if start_dim != 1:
        raise NotImplementedError(f"flatten(start_dim={start_dim}) is not translated.")
    return ops.reshape(x, _axes([0, -1]), True)


_ADDS = (operator.add, operator.iadd, torch.add)
_FUNCTIONS: dict[Callable, Callable] = {
    F.hardtanh: lambda x, min_val=-1.0, max_val=1.0, inplace=False: ops.clamp(x, float(min_val), float(max_val)),
    F.relu: lambda x, inplace=False: ops.relu(x),
    torch.flatten: _flatten,
}


def to_openvino(model: nn.Module, input_shape: Sequence[int], bitorder: str = "little") -> ov.Model:
    """``model`` (eval mode, float32 NCHW input of ``input_shape``) as an OpenVINO model, node by node."""
    model = model.eval()
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    env: dict[fx.Node, ov.Node] = {}
    params, results = [], []

    def arg(a):
        return env[a] if isinstance(a, fx.Node) else a

    for node in graph.nodes:
        args, kwargs = [arg(a) for a in node.args], {k: arg(v) for k, v in node.kwargs.items()}
        if node.op == "placeholder":
            if params:
                raise NotImplementedError("to_openvino translates models with one input.")
            params.append(ops.parameter(list(input_shape), np.float32, name=node.name))
            env[node] = params[-1]
        elif node.op == "call_module":
            env[node] = _module(args[0], modules[node.target], bitorder)
        elif node.op == "call_function" and node.target in _ADDS and len(args) == 2 and not kwargs:
            env[node] = ops.add(*args)
        elif node.op == "call_function" and node.target in _FUNCTIONS:
            env[node] = _FUNCTIONS[node.target](*args, **kwargs)
        elif node.op == "call_method" and node.target == "flatten":
            env[node] = _flatten(*args, **kwargs)
        elif node.op == "output":
            results.append(args[0])
        else:
            raise NotImplementedError(f"to_openvino does not translate {node.op} {node.target}.")
    return ov.Model(results, params, type(model).__name__)


def compile_cpu(model: ov.Model, threads: int, profiling: bool = False) -> ov.CompiledModel:
    """Compiled for latency on ``threads`` CPU threads in float32 (the default on CPUs without bf16; set
    so that a bf16-capable CPU does not run the float parts in bf16)."""
    config = {
        properties.inference_num_threads(): threads,
        properties.hint.performance_mode(): properties.hint.PerformanceMode.LATENCY,
        properties.hint.inference_precision(): ov.Type.f32,
        properties.enable_profiling(): profiling,
    }
    return ov.Core().compile_model(model, "CPU", config)


def runner(compiled: ov.CompiledModel) -> Callable[[torch.Tensor], np.ndarray]:
    """``x -> logits`` on one infer request (the input copied to a contiguous array, as a user would)."""
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> np.ndarray:
        return request.infer([np.ascontiguousarray(x.numpy())])[0]

    return run


def compare(model: nn.Module, inputs: Sequence[torch.Tensor], threads: int = 1, packed: nn.Module | None = None) -> dict:
    """OpenVINO's translation of ``model`` vs our ``pack_model(model)`` (or ``packed``) on each input: max
    |diff| relative to the max |logit|, and the fraction of all logits within 1e-3 of that max (binary
    networks amplify a rounding difference where a pre-activation is within rounding of 0, so a few may
    differ)."""
    packed = pack_model(model) if packed is None else packed
    run = runner(compile_cpu(to_openvino(model, inputs[0].shape), threads))
    rel, agree = [], []
    with torch.inference_mode():
        for x in inputs:
            ours = packed(x).float()
            diff = (torch.from_numpy(run(x)) - ours).abs()
            scale = ours.abs().max().clamp_min(1e-30)
            rel.append((diff.max() / scale).item())
            agree.append((diff <= 1e-3 * scale).float().mean().item())
    return {"max_abs_diff_rel": max(rel), "per_input_max_abs_diff_rel": rel,
            "fraction_logits_agree_1e-3": statistics.mean(agree), "per_input_fraction_agree": agree}


def profile_by_type(compiled: ov.CompiledModel, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms per OpenVINO layer type (``node_type`` of ``get_profiling_info``; ``compiled`` needs
    ``profiling=True``), each run's times summed per type."""
    request = compiled.create_infer_request()
    data = np.ascontiguousarray(x.numpy())
    runs: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        request.infer([data])
        per_type: dict[str, float] = defaultdict(float)
        for info in request.get_profiling_info():
            if info.status == ov.ProfilingInfo.Status.EXECUTED:
                per_type[info.node_type] += info.real_time.total_seconds() * 1e3
        for k, v in per_type.items():
            runs[k].append(v)
    return {k: statistics.median(v) for k, v in sorted(runs.items(), key=lambda kv: -statistics.median(kv[1]))}


def binary_conv_times(compiled: ov.CompiledModel, x: torch.Tensor, repeats: int) -> list[dict[str, float]]:
    """Per BinaryConvolution node in execution order: median and minimum ms of the conv plus the
    FakeQuantize that binarizes its input (the last one executed before it), over ``repeats`` runs
    (``compiled`` needs ``profiling=True``). Our packed conv does both: its epilogue writes the next layer's
    sign bits."""
    request = compiled.create_infer_request()
    data = np.ascontiguousarray(x.numpy())
    runs: list[list[float]] = []
    for _ in range(repeats):
        request.infer([data])
        per_conv, pending = [], 0.0
        for info in request.get_profiling_info():
            if info.status != ov.ProfilingInfo.Status.EXECUTED:
                continue
            ms = info.real_time.total_seconds() * 1e3
            if info.node_type == "FakeQuantize":
                pending = ms
            elif info.node_type == "BinaryConvolution":
                per_conv.append(ms + pending)
                pending = 0.0
        runs.append(per_conv)
    return [{"median": statistics.median(r[i] for r in runs), "min": min(r[i] for r in runs)}
            for i in range(len(runs[0]))]
