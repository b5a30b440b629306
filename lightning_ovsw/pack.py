"""``pack_model``: a trained binarized model -> an eval-mode model of packed inference modules (design §3).

Every binary layer becomes a ``PackedConv2d`` / ``PackedLinear``. A BatchNorm that consumes a binary
layer's output, and is the only consumer of it, is folded into the packed layer's per-channel
``scale`` / ``bias`` and replaced by ``nn.Identity`` (a BatchNorm after a full-precision conv is folded
into that conv). Residual adds ``packed_conv(x) + r`` move into the conv's epilogue. Both patterns are
found on a ``torch.fx`` trace of the model (binary layers and BatchNorms kept as leaves); a model that
does not trace is packed without either, with one warning.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lightning_ovsw.layers import BinaryConv2d, BinaryLayer, BinaryLinear
from lightning_ovsw.packed import PackedConv2d, PackedLinear

_FOLDABLE = {BinaryConv2d: nn.BatchNorm2d, BinaryLinear: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d}
_ADDS = (operator.add, operator.iadd, torch.add)


class _LeafTracer(fx.Tracer):
    """Keeps binary and packed layers and BatchNorms as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaves = (BinaryLayer, PackedConv2d, PackedLinear, nn.modules.batchnorm._BatchNorm)
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


def _fuse_residual_adds(model: nn.Module) -> nn.Module:
    """Move ``packed_conv(x) + r`` into the conv's epilogue (design §3: fuse the residual add).

    Applies where the conv's output (through ``nn.Identity`` left by folding) feeds only the add; returns
    a ``GraphModule`` with the same submodules, or ``model`` itself when there is nothing to fuse.
    """
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    for node in list(graph.nodes):  # drop the Identity calls (folded BatchNorms)
        if node.op == "call_module" and isinstance(modules[node.target], nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    fused = 0
    for node in list(graph.nodes):
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
    return fx.GraphModule(model, graph, class_name=type(model).__name__) if fused else model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def pack_model(
    model: nn.Module, *, fold_batchnorm: bool = True, fuse_residual: bool = True, inplace: bool = False
) -> nn.Module:
    """Replace every binary layer of ``model`` by its packed inference module; return it in eval mode.

    Args:
        model: a model holding ``BinaryConv2d`` / ``BinaryLinear`` layers (e.g. from ``binarize_model``).
        fold_batchnorm: fold a BatchNorm that alone consumes a binary layer's output into the packed
            layer's per-channel constants (its running statistics, i.e. eval-mode semantics); one that
            follows a full-precision ``nn.Conv2d`` is folded into that conv's weight and bias.
        fuse_residual: when the model traces, add residuals inside the packed conv's epilogue; the
            result is then a ``torch.fx.GraphModule`` (same submodules and state, ``forward`` only).
        inplace: modify ``model`` itself instead of a deep copy.

    The result equals ``model.eval()`` up to the rounding of the float epilogue: the integer
    accumulations are exact.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pack_model expects an nn.Module, got {type(model).__name__}.")
    binary = [name for name, m in model.named_modules() if isinstance(m, BinaryLayer)]
    if not binary:
        raise ValueError(
            "pack_model found no binary layer in the model; binarize it first with "
            "lightning_ovsw.convert.binarize_model (and train it) before packing."
        )
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if isinstance(model, BinaryConv2d):
        return PackedConv2d.from_binary(model)
    if isinstance(model, BinaryLinear):
        return PackedLinear.from_binary(model)
    pairs: dict[str, str] = {}
    traceable = True
    if fold_batchnorm or fuse_residual:
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
    return _fuse_residual_adds(model) if fuse_residual and traceable else model
