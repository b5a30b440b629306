"""``pack_model``: a trained binarized model -> an eval-mode model of packed inference modules (design §3).

Every binary layer becomes a ``PackedConv2d`` / ``PackedLinear``. A BatchNorm that consumes a binary
layer's output, and is the only consumer of it, is folded into the packed layer's per-channel
``scale`` / ``bias`` and replaced by ``nn.Identity`` (a BatchNorm after a full-precision conv is folded
into that conv). Residual adds ``packed_conv(x) + r`` move into the conv's epilogue. Both patterns are
found on a ``torch.fx`` trace of the model (binary layers and BatchNorms kept as leaves); a model that
does not trace is packed without either, with one warning. A ``nn.Hardtanh`` that alone consumes a packed
conv's output moves into its epilogue too (``ovsw::packed_conv2d_act``), which also emits the sign bits of
the activation, so the packed convs that read it (e.g. the next conv of a ResNet block, whose float
shortcut still needs the activation itself) do not sign-and-pack it again. ``maxpool(hardtanh(x))`` and
``hardtanh(maxpool(x))`` (equal: hardtanh is monotone) whose result a packed conv reads become one
``ovsw::max_pool2d_act``, which pools, clamps and emits the sign bits for those convs in one pass (a ResNet
stem); read by no packed conv, the pool just moves before the clamp (4x fewer values to clamp).
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lightning_ovsw.kernels.ops import pair  # the import registers torch.ops.ovsw
from lightning_ovsw.layers import BinaryConv2d, BinaryLayer, BinaryLinear
from lightning_ovsw.packed_layers import PackedConv2d, PackedLinear
from lightning_ovsw.registry import binary_layers
from lightning_ovsw.shortcuts import RealShortcut

_FOLDABLE = {BinaryConv2d: nn.BatchNorm2d, BinaryLinear: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d}
_ADDS = (operator.add, operator.iadd, torch.add)


class _LeafTracer(fx.Tracer):
    """Keeps binary and packed layers, BatchNorms and real-valued shortcuts as single ``call_module`` nodes
    (a traced-through shortcut would be left in the packed model as a bare ``nn.Module``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaves = (BinaryLayer, PackedConv2d, PackedLinear, nn.modules.batchnorm._BatchNorm, RealShortcut)
        return isinstance(m, leaves) or super().is_leaf_module(m, module_qualified_name)


def _foldable_pairs(model: nn.Module) -> dict[str, str]:
    """``{layer name: BatchNorm name}`` for each BN that alone consumes a binary layer's (or a plain
    ``nn.Conv2d``'s) output.

    Both modules must be called exactly once in the traced graph, and the BN must have running stats.
    """
    graph = _LeafTracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in _FOLDABLE:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or len(users[0].args) != 1 or users[0].kwargs:
            continue
        layer, bn = modules[node.target], modules[users[0].target]
        bn_type = _FOLDABLE.get(type(layer))
        if (
            bn_type is not None
            and type(bn) is bn_type
            and bn.track_running_stats
            and bn.num_features == layer.weight.shape[0]
            and calls[node.target] == 1
            and calls[users[0].target] == 1
        ):
            pairs[node.target] = users[0].target
    return pairs


def _fuse_epilogues(model: nn.Module, residual: bool, activation: bool) -> nn.Module:
    """Move ``packed_conv(x) + r`` into the conv's epilogue (design §3: fuse the residual add), then a
    following hardtanh (``_fuse_activations``).

    A residual add fuses where the conv's output (through ``nn.Identity`` left by folding) feeds only the
    add; returns a ``GraphModule`` with the same submodules, or ``model`` itself when nothing fused.
    """
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    for node in list(graph.nodes):  # drop the Identity calls (folded BatchNorms)
        if node.op == "call_module" and isinstance(modules[node.target], nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    fused = 0
    for node in list(graph.nodes) if residual else []:
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
            continue
        for conv, other in (node.args, node.args[::-1]):
            if (
                isinstance(conv, fx.Node) and isinstance(other, fx.Node) and conv.op == "call_module"
                and isinstance(modules[conv.target], PackedConv2d) and len(conv.users) == 1
                and len(conv.args) == 1 and not conv.kwargs
            ):
                with graph.inserting_before(node):
                    call = graph.call_module(conv.target, conv.args, {"residual": other})
                node.replace_all_uses_with(call)
                graph.erase_node(node)
                graph.erase_node(conv)
                fused += 1
                break
    if activation:
        fused += _fuse_pool_activations(graph, modules) + _fuse_activations(graph, modules)
    return fx.GraphModule(model, graph, class_name=type(model).__name__) if fused else model


def _fuse_activations(graph: fx.Graph, modules: dict[str, nn.Module]) -> int:
    """``hardtanh(packed_conv(...))`` -> ``packed_conv(..., act=(min, max))`` returning ``(y, y_bits)``;
    every packed conv that reads ``y`` gets ``x_bits=y_bits``. Returns the number of fused activations."""
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) is not nn.Hardtanh or node.kwargs:
            continue
        conv = node.args[0] if len(node.args) == 1 else None
        if not (
            isinstance(conv, fx.Node) and conv.op == "call_module" and isinstance(modules[conv.target], PackedConv2d)
            and len(conv.users) == 1 and "act" not in conv.kwargs
        ):
            continue
        bounds = (float(modules[node.target].min_val), float(modules[node.target].max_val))
        _replace_by_pair(graph, modules, node, conv, "call_module", conv.target, conv.args,
                         {**conv.kwargs, "act": bounds})
        fused += 1
    return fused


def _replace_by_pair(graph: fx.Graph, modules: dict[str, nn.Module], node: fx.Node, inner: fx.Node, op: str,
                     target: object, args: tuple, kwargs: dict | None = None) -> None:
    """Replace ``node(inner(...))`` by one ``op`` node (``call_module`` / ``call_function`` of ``target``)
    that returns ``(y, y_bits)``: ``y`` takes ``node``'s uses, ``y_bits`` goes to the packed convs that read
    ``y``."""
    with graph.inserting_before(node):
        call = graph.create_node(op, target, args, kwargs)
        y = graph.call_function(operator.getitem, (call, 0))
        y_bits = graph.call_function(operator.getitem, (call, 1))
    node.replace_all_uses_with(y)
    graph.erase_node(node)
    graph.erase_node(inner)
    _feed_bits(graph, modules, y, y_bits)


def _bit_readers(modules: dict[str, nn.Module], y: fx.Node) -> list[fx.Node]:
    """The packed convs that read ``y`` as their input and can take its sign bits in place of packing it."""
    return [
        user for user in y.users
        if user.op == "call_module" and isinstance(modules[user.target], PackedConv2d)
        and not modules[user.target].centered and user.args[:1] == (y,) and "x_bits" not in user.kwargs
    ]


def _feed_bits(graph: fx.Graph, modules: dict[str, nn.Module], y: fx.Node, y_bits: fx.Node) -> None:
    """Give ``y_bits`` (the packed signs of ``y``) to the packed convs that read ``y``; drop it if none does."""
    for user in _bit_readers(modules, y):
        user.kwargs = {**user.kwargs, "x_bits": y_bits}
    if not y_bits.users:
        graph.erase_node(y_bits)


def _is_module(node: object, modules: dict[str, nn.Module], kind: type) -> bool:
    """``node`` calls a ``kind`` module (exactly) on one positional argument."""
    return (isinstance(node, fx.Node) and node.op == "call_module" and type(modules[node.target]) is kind
            and len(node.args) == 1 and not node.kwargs)


def _fuse_pool_activations(graph: fx.Graph, modules: dict[str, nn.Module]) -> int:
    """``maxpool(hardtanh(x))`` or ``hardtanh(maxpool(x))`` -> ``ovsw::max_pool2d_act(x)``, ``(y, y_bits)``,
    its bits fed to the packed convs that read ``y`` (equal: hardtanh is monotone, so it commutes with max).
    Where no packed conv reads the result, only ``maxpool(hardtanh(x))`` -> ``hardtanh(maxpool(x))``, the
    clamp on the pooled, smaller tensor. Returns the number of rewrites."""
    rewritten = 0
    for last in list(graph.nodes):
        if _is_module(last, modules, nn.MaxPool2d):
            first, pool, act = last.args[0], last, last.args[0]
            if not _is_module(first, modules, nn.Hardtanh):
                continue
        elif _is_module(last, modules, nn.Hardtanh):
            first, pool, act = last.args[0], last.args[0], last
            if not _is_module(first, modules, nn.MaxPool2d):
                continue
        else:
            continue
        if len(first.users) != 1 or modules[pool.target].return_indices:
            continue
        if not _bit_readers(modules, last):
            if pool is last:  # swap: hardtanh(maxpool(x))
                with graph.inserting_before(last):
                    clamped = graph.call_module(act.target, (graph.call_module(pool.target, first.args),))
                last.replace_all_uses_with(clamped)
                graph.erase_node(last)
                graph.erase_node(first)
                rewritten += 1
            continue
        m, hardtanh = modules[pool.target], modules[act.target]
        args = (first.args[0], *[list(pair(v, name, low)) for v, name, low in (
            (m.kernel_size, "kernel_size", 1), (m.stride, "stride", 1), (m.padding, "padding", 0),
            (m.dilation, "dilation", 1))], bool(m.ceil_mode), float(hardtanh.min_val), float(hardtanh.max_val))
        _replace_by_pair(graph, modules, last, first, "call_function", torch.ops.ovsw.max_pool2d_act, args)
        rewritten += 1
    return rewritten


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def pack_model(
    model: nn.Module,
    *,
    fold_batchnorm: bool = True,
    fuse_residual: bool = True,
    fuse_activation: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Replace every binary layer of ``model`` by its packed inference module; return it in eval mode.

    Args:
        model: a model holding ``BinaryConv2d`` / ``BinaryLinear`` layers (e.g. from ``binarize_model``).
        fold_batchnorm: fold a BatchNorm that alone consumes a binary layer's output into the packed
            layer's per-channel constants (its running statistics, i.e. eval-mode semantics); one that
            follows a full-precision ``nn.Conv2d`` is folded into that conv's weight and bias.
        fuse_residual: when the model traces, add residuals inside the packed conv's epilogue; the
            result is then a ``torch.fx.GraphModule`` (same submodules and state, ``forward`` only).
        fuse_activation: when the model traces, compute a ``nn.Hardtanh`` that alone consumes a packed
            conv in that conv's epilogue, together with the activation's sign bits for the packed convs
            that read it, and max-pool before a hardtanh rather than after (also a ``GraphModule``).
        inplace: modify ``model`` itself instead of a deep copy.

    The result equals ``model.eval()`` up to the rounding of the float epilogue: the integer
    accumulations are exact. Its 4-D float parameters are stored channels-last (values unchanged), so
    NCHW-contiguous and channels-last inputs run equally fast. It records the fold and fuse options in its
    ``pack_options`` dict, which ``save_packed`` stores so that ``load_packed`` packs a target the same way.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pack_model expects an nn.Module, got {type(model).__name__}.")
    binary = [name for name, _ in binary_layers(model)]
    if not binary:
        raise ValueError(
            "pack_model found no binary layer in the model; binarize it first with "
            "lightning_ovsw.convert.binarize_model (and train it) before packing."
        )
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    options = {"fold_batchnorm": fold_batchnorm, "fuse_residual": fuse_residual, "fuse_activation": fuse_activation}
    if isinstance(model, (BinaryConv2d, BinaryLinear)):
        packed = (PackedConv2d if isinstance(model, BinaryConv2d) else PackedLinear).from_binary(model)
        packed.pack_options = options
        return packed
    pairs: dict[str, str] = {}
    traceable = True
    if fold_batchnorm or fuse_residual or fuse_activation:
        try:
            pairs = _foldable_pairs(model) if fold_batchnorm else {}
        except Exception as err:  # fx cannot trace data-dependent control flow and the like
            traceable = False
            warnings.warn(
                f"pack_model: the model does not trace with torch.fx ({type(err).__name__}: {err}); "
                "BatchNorm layers are not folded nor residual adds fused (the packed model is still "
                "exact, only slower).",
                stacklevel=2,
            )
    modules = dict(model.named_modules())
    for name in binary:
        layer = modules[name]
        bn = modules[pairs[name]] if name in pairs else None
        if isinstance(layer, BinaryConv2d):
            packed = PackedConv2d.from_binary(layer, bn)
        elif isinstance(layer, BinaryLinear):
            packed = PackedLinear.from_binary(layer, bn)
        else:
            raise TypeError(f"pack_model does not know how to pack {type(layer).__name__} at {name!r}.")
        _set_submodule(model, name, packed)
        if bn is not None:
            _set_submodule(model, pairs.pop(name), nn.Identity())
    for name, bn_name in pairs.items():  # the rest: full-precision convs, folded as torch does
        _set_submodule(model, name, fuse_conv_bn_eval(modules[name], modules[bn_name]))
        _set_submodule(model, bn_name, nn.Identity())
    fuse = (fuse_residual or fuse_activation) and traceable
    packed = _fuse_epilogues(model, fuse_residual, fuse_activation) if fuse else model
    # the packed ops work in NHWC; full-precision conv weights stored channels-last make torch's convs emit
    # channels-last output for any input, so an NCHW input (what transforms produce) costs one stem copy
    packed = packed.to(memory_format=torch.channels_last)
    packed.pack_options = options
    if hasattr(model, "binarization_report"):  # a GraphModule keeps only the submodules: carry the report over
        packed.binarization_report = model.binarization_report
    return packed
