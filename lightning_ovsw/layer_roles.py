"""Roles of the layers of a traced model that decide how ``binarize_model`` treats them.

**Normalized output** (what a binary layer's scale depends on).

A binary layer's output ``op(sign(x), sign(W)) * alpha`` has a magnitude of about ``alpha * sqrt(fan_in)``
whatever the float weights were, and the standardized ``alpha`` (design §2, about 0.8) leaves that growth
to the BatchNorm that follows every binary conv in the paper's networks. Where no normalization follows
(VGG's 4096-wide classifier, squeeze-excitation gates, MobileNetV3's head), the output is about
``0.8 * sqrt(fan_in)`` (127 for VGG's first classifier layer): logits explode and gates saturate.
``binarize_model`` gives those layers XNOR-Net's ``alpha = mean|W|`` instead (``scale="mean"``), which
keeps the float layer's output magnitude, or keeps them float (``unnormalized=``).

**Shortcut projections**: the 1x1 conv (+ BatchNorm) on a residual shortcut, e.g. torchvision's
``downsample``. Bi-Real Net and ReActNet keep them real-valued: the shortcut is what carries the block
input's magnitudes past the binary convs. Binarized, torchvision's resnet18 stays near chance in a 48-step
run where the same network with float shortcuts learns (``benchmarks/architectures_train.py``).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

NORMALIZATION_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_NORMALIZATION_FUNCTIONS = (F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm)
# Ops that move, pool or drop values but mix no channels and change no scale: normalization after them
# still normalizes the layer's output.
_PASS_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten, nn.Identity,
    nn.modules.dropout._DropoutNd,
)
_PASS_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.cat,
    torch.concat, operator.getitem, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    F.dropout,
)
_PASS_METHODS = ("view", "reshape", "flatten", "transpose", "permute", "contiguous", "squeeze", "unsqueeze")


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """``"norm"``, ``"pass"`` or ``"other"`` for a node that reads a layer's output."""
    if node.op == "call_module":
        m = modules[node.target]
        return "norm" if isinstance(m, NORMALIZATION_MODULES) else "pass" if isinstance(m, _PASS_MODULES) else "other"
    if node.op == "call_function":
        if node.target in _NORMALIZATION_FUNCTIONS:
            return "norm"
        return "pass" if node.target in _PASS_FUNCTIONS else "other"
    return "pass" if node.op == "call_method" and node.target in _PASS_METHODS else "other"


def _layer_nodes(graph: fx.Graph, modules: dict[str, nn.Module], layers: dict[str, nn.Module]) -> Iterator[tuple[str, fx.Node]]:
    """``(name, node)`` of every call of one of ``layers`` in ``graph``."""
    names = {id(m): name for name, m in layers.items()}
    for node in graph.nodes:
        if node.op == "call_module" and id(modules[node.target]) in names:
            yield names[id(modules[node.target])], node


def unnormalized_layers(graph: fx.Graph, modules: dict[str, nn.Module], layers: dict[str, nn.Module]) -> list[str]:
    """Names of the ``layers`` (leaf ``call_module`` nodes of ``graph``) whose output reaches anything but a
    normalization layer (BatchNorm, GroupNorm, LayerNorm, InstanceNorm), through pass-through ops only
    (pooling, flatten, reshapes, dropout, identity, concatenation). Layers that do not appear in the graph
    (inside a module the trace keeps whole) are not listed."""
    found = []
    for name, node in _layer_nodes(graph, modules, layers):
        frontier, seen, normalized = list(node.users), set(), True
        while frontier and normalized:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            kind = _kind(user, modules)
            if kind == "pass":
                frontier.extend(user.users)
            normalized = kind != "other"
        if not normalized or not node.users:
            found.append(name)
    return found


def _through(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The first other op after ``node`` along a single chain of normalization / pass-through users (the
    last node of the chain where it branches or ends)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if _kind(user, modules) == "other":
            return user
        node = user
    return node


_ADDS = (operator.add, operator.iadd, torch.add, "add", "add_")


def shortcut_projections(graph: fx.Graph, modules: dict[str, nn.Module], layers: dict[str, nn.Module]) -> list[str]:
    """Names of the ``layers`` that project a residual shortcut: the layer reads a value that other layers
    also read (the block input, where the branches split), and its output reaches a residual add through
    normalization and pass-through ops only (the other branch has its activation before the add)."""
    found = []
    for name, node in _layer_nodes(graph, modules, layers):
        source, after = node.args[0] if node.args else None, _through(node, modules)
        branches = isinstance(source, fx.Node) and len(source.users) > 1
        if branches and after.op in ("call_function", "call_method") and after.target in _ADDS:
            found.append(name)
    return found
