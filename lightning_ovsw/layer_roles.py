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

**Residual-branch norms**: the normalization layer that ends a residual branch holding binary layers
(``x + bn(conv(...))``). Initialised to zero (Goyal et al. 2017; torchvision's ``zero_init_residual``;
the design's ImageNet recipe initialises BN weights to 1e-8), every block starts as the identity and the
binary branches grow in: in 48 SGD steps torchvision's resnet50 and regnet_y_400mf, binarized, learn
(loss 1.86 -> 1.24 and 2.26 -> 1.55) instead of diverging (2.44 -> 5.80, 2.37 -> 2.85).

**Max-pooled inputs**: a binary layer whose input is a max-pool (possibly followed by average pooling,
dropout or reshapes) sees a sign-skewed input even after a sign-symmetric activation: the maximum of a 3x3
window of symmetric values is positive with probability 1 - 2^-9, and 92-100 % of the inputs of those layers
were >= 0 in googlenet, inception_v3, squeezenet1_0, vgg11_bn and the ResNet stems (random init, synthetic
images). ``binarize_model`` gives those layers an input threshold at the running channel mean
(``BinaryLayer.center_input``).

**Shortcut candidates**: a binary conv whose output goes straight into a BatchNorm2d of the same module, with
a geometry that an average-pooled copy of its input follows; ``binarize_model`` adds a real-valued shortcut
around the pair (``lightning_ovsw.shortcuts``).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import stochastic_depth

from lightning_ovsw.shortcuts import shortcut_fits

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
    F.dropout, stochastic_depth,
)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_MAX_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d)
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


def _branch_holds(node: fx.Node, binary: set[int], modules: dict[str, nn.Module]) -> bool:
    """Whether the chain that ends at ``node`` (first inputs, back to where the value branches off) calls
    one of the ``binary`` modules."""
    while isinstance(node, fx.Node) and node.op != "placeholder" and len(node.users) <= 1:
        if node.op == "call_module" and id(modules[node.target]) in binary:
            return True
        node = node.args[0] if node.args else None
    return False


def residual_branch_norms(graph: fx.Graph, modules: dict[str, nn.Module], layers: dict[str, nn.Module]) -> list[str]:
    """Names of the normalization modules whose output is added to a residual (directly, or through
    pass-through ops) at the end of a branch that holds one of ``layers``, other than a shortcut projection
    (zeroing that norm would cut the shortcut)."""
    projections = set(shortcut_projections(graph, modules, layers))
    binary, found = {id(m) for name, m in layers.items() if name not in projections}, []
    for add in graph.nodes:
        if add.op not in ("call_function", "call_method") or add.target not in _ADDS:
            continue
        for operand in add.args[:2]:
            norm = operand
            while isinstance(norm, fx.Node) and _kind(norm, modules) == "pass" and norm.args:
                norm = norm.args[0]
            if (
                isinstance(norm, fx.Node) and _kind(norm, modules) == "norm" and norm.op == "call_module"
                and len(norm.users) == 1 and _branch_holds(norm.args[0], binary, modules)
                and norm.target not in found
            ):
                found.append(norm.target)
    return found


def _max_pooled(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s value is a max-pool seen through pass-through ops only (a concatenation counts
    when one of its inputs is)."""
    if node.op == "call_module" and isinstance(modules[node.target], _MAX_POOLS):
        return True
    if node.op == "call_function" and node.target in _MAX_POOL_FUNCTIONS:
        return True
    if _kind(node, modules) != "pass":
        return False
    if node.op == "call_function" and node.target in (torch.cat, torch.concat):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return any(isinstance(t, fx.Node) and _max_pooled(t, modules) for t in tensors)
    source = node.args[0] if node.args else None
    return isinstance(source, fx.Node) and _max_pooled(source, modules)


def max_pooled_inputs(graph: fx.Graph, modules: dict[str, nn.Module], layers: dict[str, nn.Module]) -> list[str]:
    """Names of the ``layers`` whose input is a max-pool output (through pass-through ops): a sign-skewed
    input, mostly >= 0 whatever activation precedes the pool."""
    return [name for name, node in _layer_nodes(graph, modules, layers)
            if node.args and isinstance(node.args[0], fx.Node) and _max_pooled(node.args[0], modules)]


_ADDS = (operator.add, operator.iadd, torch.add, "add", "add_")


def shortcut_projections(graph: fx.Graph, modules: dict[str, nn.Module], layers: dict[str, nn.Module]) -> list[str]:
    """Names of the ``layers`` that project a residual shortcut: the layer reads a value that other layers
    also read (the block input, where the branches split), and its output reaches a residual add through
    normalization and pass-through ops only (the other branch has its activation before the add), and the
    add's other operand is not that block input itself (``x + bn(conv(x))`` is a residual branch with an
    identity shortcut, as in the paper's ResNet-20)."""
    found = []
    for name, node in _layer_nodes(graph, modules, layers):
        source, after = node.args[0] if node.args else None, _through(node, modules)
        branches = isinstance(source, fx.Node) and len(source.users) > 1
        if (branches and after.op in ("call_function", "call_method") and after.target in _ADDS
                and source not in after.args and name not in found):  # a shared layer: listed once
            found.append(name)
    return found


def shortcut_candidates(graph: fx.Graph, modules: dict[str, nn.Module], layers: dict[str, nn.Module]) -> dict[str, str]:
    """``{conv name: norm name}`` for each ``nn.Conv2d`` of ``layers`` whose output goes only into a
    ``BatchNorm2d``, both children of the same module (whose forward gets the real-valued shortcut,
    ``lightning_ovsw.shortcuts``), and whose geometry a pooled copy of the input can follow."""
    found = {}
    for name, node in _layer_nodes(graph, modules, layers):
        conv = layers[name]
        norm = next(iter(node.users)) if len(node.users) == 1 else None
        if (
            isinstance(conv, nn.Conv2d) and shortcut_fits(conv) and norm is not None and norm.op == "call_module"
            and isinstance(modules[norm.target], nn.BatchNorm2d) and norm.args == (node,)
            and node.target.rpartition(".")[0] == norm.target.rpartition(".")[0]
        ):
            found[name] = norm.target
    return found
