"""``binarize_model`` (float model -> binary training model) and ``binarization_summary``.

A binary layer needs a sign-symmetric input (design §2): after a ReLU every input is >= 0, ``sign(x) = +1``
everywhere and the layer outputs a constant. ``binarize_model`` therefore traces the model with
``torch.fx`` and finds, for every layer it binarizes, the activations whose output can never be negative and
reaches the layer's input unchanged in sign: through pooling (max, average, adaptive), flatten, reshapes,
dropout, identity, concatenation, chunk/split, and sums or products of such values. ``activation=`` says
what to do with them (``"hardtanh"``: replace them by ``nn.Hardtanh``, the paper's choice).
"""

from __future__ import annotations

import copy
import logging
import operator
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from lightning_ovsw.layer_roles import (
    max_pooled_inputs,
    residual_branch_norms,
    shortcut_candidates,
    shortcut_projections,
    unnormalized_layers,
)
from lightning_ovsw.layers import BinaryConv2d, BinaryLayer, BinaryLinear, BinaryOptions
from lightning_ovsw.registry import binary_layers, full_precision_layers, packed_layers
from lightning_ovsw.shortcuts import RealShortcut

FilterFn = Callable[[nn.Module, str], bool]
ActivationPolicy = Literal["hardtanh", "keep", "error"]
ACTIVATION_POLICIES: tuple[str, ...] = ("hardtanh", "keep", "error")
UnnormalizedPolicy = Literal["mean", "learnable", "batchnorm", "float", "keep"]
UNNORMALIZED_POLICIES: tuple[str, ...] = ("mean", "learnable", "batchnorm", "float", "keep")
# The weight a norm added by unnormalized="batchnorm" starts at: its conv's binary branch starts small beside
# the real-valued shortcut (squeezenet1_0, 48 Adam steps, benchmarks/architectures_train.py: loss ratio 0.87-0.89
# for 0.1-0.3, 0.94 at 0, where the branch hardly grows in at lr 1e-3, 0.99 at 1, chaotic as without shortcuts)
ADDED_NORM_WEIGHT = 0.2
PooledPolicy = Literal["center", "keep"]
POOLED_POLICIES: tuple[str, ...] = ("center", "keep")
_UNNORMALIZED_REASON = "output not normalized (no BatchNorm/LayerNorm after it)"
_SHORTCUT_REASON = "residual shortcut projection: kept real-valued as in Bi-Real Net / ReActNet (shortcuts=)"

_log = logging.getLogger(__name__)

# Activations that never output a negative value. The ReLU family is replaced (Hardtanh keeps their role of
# a nonlinearity that clips); the others (gates, probabilities) have no sign-symmetric twin and are reported.
_RELU_FUNCTIONS = (F.relu, torch.relu, F.relu_, torch.relu_, F.relu6)
_RELU_METHODS = ("relu", "relu_")
_NON_NEGATIVE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softplus)
_NON_NEGATIVE_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax, torch.softmax, F.softplus, torch.abs)
_NON_NEGATIVE_METHODS = ("sigmoid", "abs", "softmax")
# Ops whose output is >= 0 wherever all their tensor inputs are (a subset of the inputs, reordered, pooled).
_SIGN_KEEPING_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.ZeroPad2d, nn.ChannelShuffle, nn.Upsample, nn.PixelShuffle,
    nn.modules.dropout._DropoutNd, nn.Hardtanh, nn.Tanh, nn.LeakyReLU, nn.ELU,  # f(x) >= 0 iff x >= 0
)
_SIGN_KEEPING_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.chunk,
    torch.split, torch.cat, torch.concat, torch.stack, operator.getitem, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout, F.dropout2d, F.interpolate,
    F.hardtanh, torch.tanh, F.leaky_relu, torch.mean, operator.add, operator.iadd, torch.add, operator.mul, operator.imul,
    torch.mul,
)
_SIGN_KEEPING_METHODS = (
    "view", "reshape", "flatten", "transpose", "permute", "contiguous", "chunk", "split", "squeeze",
    "unsqueeze", "expand", "clone", "mean", "add", "add_", "mul", "mul_", "to", "float",
)


def _replaceable_module(m: nn.Module) -> bool:
    """ReLU, ReLU6 and any Hardtanh clipped at a non-negative minimum."""
    return isinstance(m, nn.ReLU) or (isinstance(m, nn.Hardtanh) and m.min_val >= 0)


def _non_negative_module(m: nn.Module) -> bool:
    return _replaceable_module(m) or isinstance(m, _NON_NEGATIVE_MODULES)


def _is_source(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is an activation that never outputs a negative value."""
    if node.op == "call_module":
        return _non_negative_module(modules[node.target])
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS or node.target in _NON_NEGATIVE_FUNCTIONS
    return node.op == "call_method" and (node.target in _RELU_METHODS or node.target in _NON_NEGATIVE_METHODS)


def _is_replaceable(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return _replaceable_module(modules[node.target])
    return (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or (
        node.op == "call_method" and node.target in _RELU_METHODS)


def _keeps_sign(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _SIGN_KEEPING_MODULES)
    if node.op == "call_function":
        return node.target in _SIGN_KEEPING_FUNCTIONS
    return node.op == "call_method" and node.target in _SIGN_KEEPING_METHODS


def _tensor_inputs(node: fx.Node) -> list[fx.Node] | None:
    """The nodes a sign-keeping op reads as data, or None if it also reads a negative constant (``x + -1``).

    The data is the first argument (a tensor, or the list of ``cat`` / ``stack``); for sums and products
    every argument is data.
    """
    arithmetic = node.target in (operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul,
                                 "add", "add_", "mul", "mul_")
    data = list(node.args) if arithmetic else node.args[:1]
    nodes: list[fx.Node] = []
    for arg in data:
        for a in arg if isinstance(arg, (list, tuple)) else [arg]:
            if isinstance(a, fx.Node):
                nodes.append(a)
            elif arithmetic and not (isinstance(a, (int, float)) and a >= 0):
                return None
    return nodes


class _NonNegativeAnalysis:
    """For a node of the traced graph: the set of never-negative activation nodes its value comes from, if
    it can never be negative (else None). Nodes for which ``replaced`` is true count as the Hardtanh that
    will replace them: sign-keeping, not sources."""

    def __init__(self, modules: dict[str, nn.Module], replaced: Callable[[fx.Node], bool]) -> None:
        self.modules = modules
        self.replaced = replaced
        self.memo: dict[fx.Node, frozenset[fx.Node] | None] = {}

    def sources(self, node: fx.Node) -> frozenset[fx.Node] | None:
        if node not in self.memo:
            self.memo[node] = self._sources(node)
        return self.memo[node]

    def _sources(self, node: fx.Node) -> frozenset[fx.Node] | None:
        if self.replaced(node):
            inputs = [a for a in node.args[:1] if isinstance(a, fx.Node)]
        elif _is_source(node, self.modules):
            return frozenset([node])
        elif _keeps_sign(node, self.modules):
            inputs = _tensor_inputs(node)
        else:
            return None
        if not inputs:
            return None
        found: set[fx.Node] = set()
        for arg in inputs:
            s = self.sources(arg)
            if s is None:
                return None
            found |= s
        return frozenset(found)


class _Tracer(fx.Tracer):
    """Keeps the modules in ``leaves`` (the layers to binarize), binary layers and real-valued shortcuts
    (from an earlier ``binarize_model``) as single ``call_module`` nodes."""

    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (id(m) in self.leaves or isinstance(m, (BinaryLayer, RealShortcut))
                or super().is_leaf_module(m, module_qualified_name))


def _owner(node: fx.Node) -> str:
    """Qualified name of the innermost module whose ``forward`` made the call ``node`` ("" for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _describe(node: fx.Node) -> str:
    """A readable name of an activation node: its module name, or ``F.relu in <owner>``."""
    if node.op == "call_module":
        return node.target
    name = getattr(node.target, "__name__", str(node.target))
    owner = _owner(node)
    return f"{name}() in {owner or 'the model forward'}"


@dataclass
class ConversionReport:
    """What ``binarize_model`` did: ``model.binarization_report``, also shown by ``binarization_summary``.

    ``non_negative_inputs`` maps each binary layer whose float input could never be negative to the
    activations that made it so; ``replaced_activations`` maps each replaced activation (a module name, or
    a functional call and the module whose forward makes it) to its replacement; ``unresolved`` lists the
    binary layers whose input stays non-negative (``activation="keep"``, or a sigmoid-like source);
    ``rescaled`` maps the binary layers whose output no normalization follows to the scale they got
    instead of the standardized one (``unnormalized="mean"`` or ``"learnable"``); ``centered`` lists the binary
    layers that read a max-pooled input and threshold it at its running channel mean (``pooled="center"``);
    ``zero_initialized`` the residual-branch norms whose weight was set to 0 (``zero_init_residual``);
    ``real_shortcuts`` the binary convs that got a real-valued shortcut around them and their norm
    (``layer_shortcuts``); ``added_norms`` the binary convs that got a new norm after them
    (``unnormalized="batchnorm"``).
    """

    binarized: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)
    non_negative_inputs: dict[str, list[str]] = field(default_factory=dict)
    replaced_activations: dict[str, str] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)
    rescaled: dict[str, str] = field(default_factory=dict)
    centered: list[str] = field(default_factory=list)
    zero_initialized: list[str] = field(default_factory=list)
    real_shortcuts: list[str] = field(default_factory=list)
    added_norms: list[str] = field(default_factory=list)
    traced: bool = True
    fast_path_disabled: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        lines = []
        if self.kept_float:
            lines.append("kept in full precision: " + "; ".join(f"{n} ({r})" for n, r in self.kept_float.items()))
        if self.replaced_activations:
            lines.append("activations replaced (a binary layer needs a sign-symmetric input): "
                         + ", ".join(f"{n} -> {r}" for n, r in self.replaced_activations.items()))
        if self.unresolved:
            lines.append("binary layers reading a never-negative input (they output a constant): "
                         + ", ".join(self.unresolved))
        if self.rescaled:
            lines.append("no normalization after these binary layers, so alpha = mean|W| keeps the float layer's "
                         "output magnitude: " + ", ".join(f"{n} (scale={s!r})" for n, s in self.rescaled.items()))
        if self.added_norms:
            lines.append(f"BatchNorm2d added after (weight {ADDED_NORM_WEIGHT}; new state-dict keys <conv>_norm.*): "
                         + ", ".join(self.added_norms))
        if self.centered:
            lines.append("max-pooled (mostly >= 0) inputs thresholded at their running channel mean: "
                         + ", ".join(self.centered))
        if self.real_shortcuts:
            lines.append("real-valued shortcuts added around the binary convs (norm(conv(x)) + x): "
                         + ", ".join(self.real_shortcuts))
        if self.zero_initialized:
            lines.append("norms initialised to 0 (residual branches and real-valued shortcuts start as the identity): "
                         + ", ".join(self.zero_initialized))
        if not self.traced:
            lines.append("the model does not trace with torch.fx: activations were not analysed per layer")
        if self.fast_path_disabled:
            lines.append("transformer fast path disabled (it reads the float weights): "
                         + ", ".join(self.fast_path_disabled))
        return lines


def _unsupported_reason(module: nn.Module, parent: nn.Module | None) -> str | None:
    """Why a conv / linear module cannot become a binary layer, or None."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "uninitialised lazy module: run one forward pass before binarize_model"
    if parametrize.is_parametrized(module, "weight"):
        return "parametrized weight (e.g. weight_norm / spectral_norm): remove the parametrization first"
    if not isinstance(module.weight, nn.Parameter):
        return "weight is computed by a hook (e.g. the legacy weight_norm / spectral_norm): remove it first"
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear) or isinstance(
            parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads this projection's weight directly, the layer's forward never runs"
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides {base.__name__}.forward, which a binary layer would replace"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"groups={module.groups}"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    return None


def _replace_by_id(model: nn.Module, swaps: dict[int, nn.Module]) -> None:
    """Set every child attribute that holds a module in ``swaps`` (shared modules: every place)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in swaps:
                setattr(parent, child_name, swaps[id(child)])


def _hardtanh_for(m: nn.Module) -> nn.Hardtanh:
    return nn.Hardtanh(inplace=bool(getattr(m, "inplace", False)))


def _retrace_without_relu(owner: nn.Module, leaves: set[int], owners: set[int]) -> fx.GraphModule:
    """``owner`` as a GraphModule in which the ReLU calls (``F.relu``, ``x.relu()``...) made by the forward of
    a module in ``owners`` (by id: ``owner`` itself or submodules the trace inlines) are ``F.hardtanh``."""
    graph = _Tracer(leaves).trace(owner)
    for node in list(graph.nodes):
        if node.op == "call_module" or not _is_replaceable(node, {}):
            continue
        if id(owner.get_submodule(_owner(node))) not in owners:
            continue
        inplace = node.target in (F.relu_, torch.relu_, "relu_") or bool(node.kwargs.get("inplace", False)) or (
            node.target in (F.relu, F.relu6) and len(node.args) > 1 and bool(node.args[1]))
        with graph.inserting_before(node):
            call = graph.call_function(F.hardtanh, (node.args[0],), {"inplace": inplace})
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    return fx.GraphModule(owner, graph, class_name=type(owner).__name__)


def _analyse_graph(graph: fx.Graph, model: nn.Module, selected: dict[str, nn.Module]) -> tuple[
        dict[str, frozenset[fx.Node]], dict[str, frozenset[fx.Node]], list[fx.Node], dict[str, nn.Module]]:
    """On ``model``'s trace ``graph``, return for each selected layer with a never-negative input, its sources; the
    activation nodes to replace (a module as a whole, a functional call in every call of its module's
    forward), grown until no replaceable source is left (Hardtanh keeps the sign of what it reads, so a
    ReLU before a replaced one may show up); and the sources left then."""
    modules = dict(model.named_modules())
    names = {id(m): name for name, m in selected.items()}
    chosen: set[int] = set()  # ids of replaced activation modules and of modules whose F.relu calls are

    def key(node: fx.Node) -> int:
        return id(modules[node.target]) if node.op == "call_module" else id(modules[_owner(node)])

    def replaced(node: fx.Node) -> bool:
        return _is_replaceable(node, modules) and key(node) in chosen

    first: dict[str, frozenset[fx.Node]] | None = None
    while True:
        analysis = _NonNegativeAnalysis(modules, replaced)
        found: dict[str, frozenset[fx.Node]] = {}
        for node in graph.nodes:
            if node.op == "call_module" and id(modules[node.target]) in names and isinstance(node.args[0], fx.Node):
                src = analysis.sources(node.args[0])
                if src:
                    name = names[id(modules[node.target])]
                    found[name] = found.get(name, frozenset()) | src
        first = found if first is None else first
        new = {key(n) for s in found.values() for n in s if _is_replaceable(n, modules)}
        if not new:
            break
        chosen |= new
    to_replace = [n for n in graph.nodes if replaced(n)]
    return first, found, to_replace, modules


def _transformer_sources(model: nn.Module, selected: dict[str, nn.Module]) -> dict[str, str]:
    """``{linear2 name: activation name}`` where a Transformer layer's ReLU feeds a selected ``linear2``
    (torch's Transformer layers are leaves of the trace: ``linear2(dropout(activation(linear1(x))))``)."""
    chosen = {id(m) for m in selected.values()}
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and id(m.linear2) in chosen:
            act = m.activation
            if act in _RELU_FUNCTIONS or (isinstance(act, nn.Module) and _replaceable_module(act)):
                found[f"{name}.linear2" if name else "linear2"] = f"{name}.activation" if name else "activation"
    return found


def _disable_transformer_fast_path(model: nn.Module, binary: set[int]) -> list[str]:
    """Turn off the eval/no-grad fast path of Transformer layers that hold binary layers: it calls
    ``torch._transformer_encoder_layer_fwd`` on ``linear1.weight`` / ``linear2.weight``, i.e. in float.
    The switches are the ones the fast path checks: ``activation_relu_or_gelu`` of each layer and
    ``use_nested_tensor`` of the encoder."""
    names = []
    for name, m in model.named_modules():
        holds = any(id(c) in binary for c in m.modules())
        if isinstance(m, nn.TransformerEncoderLayer) and holds:
            m.activation_relu_or_gelu = 0
            names.append(name)
        elif isinstance(m, nn.TransformerEncoder) and holds:
            m.use_nested_tensor = False
    return names


def binarize_model(
    model: nn.Module,
    *,
    filter_fn: FilterFn | None = None,
    skip_first: bool = True,
    skip_last: bool = True,
    inplace: bool = False,
    activation: ActivationPolicy = "hardtanh",
    unnormalized: UnnormalizedPolicy = "mean",
    shortcuts: Literal["float", "binary"] = "float",
    pooled: PooledPolicy = "center",
    zero_init_residual: bool = True,
    layer_shortcuts: bool = True,
    **layer_options,
) -> nn.Module:
    """Swap eligible ``nn.Conv2d`` / ``nn.Linear`` modules for ``BinaryConv2d`` / ``BinaryLinear``.

    Candidates are the float conv and linear modules in ``model.named_modules()`` order; the first and
    the last of them stay full precision (``skip_first`` / ``skip_last``, as in the paper), and
    ``filter_fn(module, qualified_name)`` must return True for the rest to be swapped. The binary layers
    hold the *same* Parameters, so state-dict keys are unchanged (with ``scale="learnable"`` an ``alpha``
    is added), float checkpoints warm-start and, with ``inplace=True``, optimizer references survive.
    ``layer_options`` build the one ``BinaryOptions`` every binary layer gets.

    Kept in full precision, with the reason in ``model.binarization_report`` and a warning: grouped or
    non-zero-padded convs, parametrized weights (``weight_norm``, ``spectral_norm``), subclasses that
    override ``forward``, uninitialised lazy modules, and ``nn.MultiheadAttention.out_proj`` (its parent
    reads the weight directly). A ``filter_fn`` that selects one of them raises.

    ``activation``: what to do with activations that can never be negative (ReLU, ReLU6, ``F.relu``...)
    and reach a binary layer's input (a binary layer reading them outputs a constant):

    - ``"hardtanh"`` (default, the paper's choice): replace them by ``nn.Hardtanh()`` (range [-1, 1]). A
      module is replaced as a whole, so its other uses change too (torchvision's ``BasicBlock`` calls one
      ``self.relu`` twice). A functional call is replaced in the forward of the module that makes it: that
      module becomes a ``torch.fx.GraphModule`` of itself (same submodules and state-dict keys), and if the
      call is in the root's forward, the returned model is one. Sigmoid-like sources (no sign-symmetric
      twin) are left and warned about.
    - ``"keep"``: change nothing and warn once, naming every affected layer.
    - ``"error"``: raise, naming every affected layer.

    ``unnormalized``: what to do with selected layers whose output reaches no BatchNorm / GroupNorm /
    LayerNorm (through pooling, reshapes, dropout and concatenation only), e.g. VGG's classifier, squeeze-
    excitation convs, MobileNetV3's head. With the standardized ``alpha`` their output grows with
    ``sqrt(fan_in)`` (``lightning_ovsw.layer_roles``):

    - ``"mean"`` (default): they get ``scale="mean"``, XNOR-Net's ``alpha = mean|W|`` per output channel
      (the float layer's output magnitude; listed in ``binarization_report.rescaled``). Only when the options
      ask for the standardized scale;
    - ``"learnable"``: the same ``alpha`` as a trained parameter (XNOR-Net++; less stable at large lr);
    - ``"batchnorm"``: a new ``BatchNorm2d`` after each such conv (a child ``<conv>_norm`` of the module that
      calls it, weight ``ADDED_NORM_WEIGHT``; new state-dict keys; listed in ``binarization_report.added_norms``),
      which also gets a real-valued shortcut (``layer_shortcuts``); linear layers get ``"mean"``. For networks
      with no normalization at all: binarized squeezenet1_0 learns only with it;
    - ``"float"``: keep them in full precision (with the reason);
    - ``"keep"``: give them the options as they are.

    ``shortcuts``: the convs that project a residual shortcut (torchvision's ``downsample``, RegNet's
    ``proj``; ``lightning_ovsw.layer_roles``) stay in full precision (``"float"``, default, as in Bi-Real Net
    and ReActNet: binarized, torchvision's resnet18 hardly learns) or are binarized (``"binary"``). A
    ``filter_fn`` decides for itself.

    ``pooled``: what to do with binary layers whose input is a max-pool output (through pooling, dropout,
    reshapes and concatenation; ``lightning_ovsw.layer_roles``). The maximum of a window of sign-symmetric
    values is almost always positive, so ``sign(x)`` is nearly constant there (92-100 % of +1 in googlenet,
    squeezenet1_0, vgg11_bn and the ResNet stems at initialisation):

    - ``"center"`` (default): threshold the input at its running channel mean, ``sign(x - m)``
      (``BinaryLayer.center_input``; a buffer ``input_mean`` the packed layer keeps; listed in
      ``binarization_report.centered``);
    - ``"keep"``: ``sign(x)`` as for every other layer.

    ``zero_init_residual``: set to 0 the weight of each normalization layer that ends a residual branch
    holding binary layers (``x + bn(conv(...))``), so every block starts as the identity (Goyal et al. 2017,
    torchvision's ``zero_init_residual``; torchvision's resnet50 and regnet_y_400mf, binarized, diverge
    without it). Only norms still at PyTorch's initialisation (weight 1, bias 0) are changed: a trained
    model keeps its weights. Listed in ``binarization_report.zero_initialized``.

    ``layer_shortcuts``: give every binary conv whose output goes straight into a ``BatchNorm2d`` (both
    children of one module) a real-valued shortcut, ``bn(conv(x)) + RealShortcut(x)`` (Bi-Real Net, ReActNet;
    ``lightning_ovsw.shortcuts``: the input pooled by the stride, its channels tiled or averaged), the
    module whose forward calls them becoming a ``torch.fx.GraphModule`` of itself (same submodules and
    state-dict keys). With ``zero_init_residual`` that norm starts at 0, so the path starts real-valued.
    Not for the last conv of a residual branch (the block's shortcut is its path, and a second one would
    make the branch start non-zero: resnet50 then diverges), and for a centered conv (``pooled``) only when
    its norm is one ``unnormalized="batchnorm"`` added; that shortcut carries the centered input ``x - m``
    (squeezenet1_0 does not learn without). Around a centered conv with a norm of its own, an uncentered
    shortcut carried the max-pool's positive mean past the conv (vgg11_bn stayed at chance), and a centered
    one, with that norm at 0, left vgg11_bn's features the same for every input (the max-pools shrink
    ``x - m`` layer by layer); with the norm at 1, resnet18, vgg11_bn and googlenet learnt less (48-step
    loss ratios 0.09, 0.09, 0.56 against 0.07, 0.07, 0.39 without). Listed in
    ``binarization_report.real_shortcuts``. Without it, networks with chains of binary convs and no identity
    path (mobilenet_v2, googlenet, inception_v3, shufflenet_v2, efficientnet_b0) are chaotic at
    initialisation and do not learn in the 48-step benchmark; with it they do.

    The analysis runs on a ``torch.fx`` trace. A model that does not trace gets one warning and, with
    ``"hardtanh"``, every ReLU / ReLU6 module replaced (functional calls cannot be found), with ``"error"`` a
    ``ValueError``. The torch Transformer layers holding binary layers get their float fast path turned off
    (it would read the float weights under ``torch.no_grad``), and their ReLU activation feeding a binary
    ``linear2`` is handled like the others.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"binarize_model expects an nn.Module, got {type(model).__name__}.")
    if activation not in ACTIVATION_POLICIES:
        raise ValueError(f"activation={activation!r} is not supported; choose one of {ACTIVATION_POLICIES}.")
    if shortcuts not in ("float", "binary"):
        raise ValueError(f"shortcuts={shortcuts!r} is not supported; choose 'float' or 'binary'.")
    if unnormalized not in UNNORMALIZED_POLICIES:
        raise ValueError(
            f"unnormalized={unnormalized!r} is not supported; choose one of {UNNORMALIZED_POLICIES}.")
    if pooled not in POOLED_POLICIES:
        raise ValueError(f"pooled={pooled!r} is not supported; choose one of {POOLED_POLICIES}.")
    options = BinaryOptions(**layer_options)  # validate once, with a clear error
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    already = {id(m) for _, m in binary_layers(model)}
    modules = dict(model.named_modules())
    candidates = [
        (name, m) for name, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in already
    ]
    skipped = set()
    if candidates and skip_first:
        skipped.add(candidates[0][0])
    if candidates and skip_last:
        skipped.add(candidates[-1][0])
    selected: dict[str, nn.Module] = {}
    for name, module in candidates:
        if name in skipped:
            continue
        chosen = filter_fn is None or filter_fn(module, name)
        parent = modules[name.rpartition(".")[0]] if "." in name else model
        reason = _unsupported_reason(module, parent) if chosen else None
        if reason and filter_fn is not None:
            raise ValueError(f"filter_fn selected {name!r} ({reason}), which binary layers do not support.")
        if reason:
            report.kept_float[name] = reason
        elif chosen:
            selected[name] = module
    if report.kept_float:  # unsupported layers; the deliberate choices below are in the report and the log
        warnings.warn("binarize_model kept these layers in full precision: "
                      + ", ".join(f"{n} ({r})" for n, r in report.kept_float.items()) + ".", stacklevel=2)
    graph, trace_error = _trace(model, selected)
    if shortcuts == "float" and filter_fn is None and graph is not None:
        for name in shortcut_projections(graph, modules, selected):
            report.kept_float[name] = _SHORTCUT_REASON
            del selected[name]
    not_normalized = (unnormalized_layers(graph, modules, selected)
                      if unnormalized != "keep" and graph is not None else [])
    if unnormalized == "float":
        for name in not_normalized:
            report.kept_float[name] = _UNNORMALIZED_REASON + ": a binary layer's output would grow with sqrt(fan_in)"
            del selected[name]
        not_normalized = []
    elif options.scale != "standardized":
        not_normalized = []
    elif unnormalized in ("mean", "learnable") and _all_convs_unnormalized(selected, not_normalized):
        warnings.warn(
            f"binarize_model: no binary conv of {type(model).__name__} has a normalization after it, so none gets a "
            "real-valued shortcut and a chain of them is chaotic at initialisation (binarized squeezenet1_0 does not "
            "learn); pass unnormalized='batchnorm' to add a BatchNorm2d (and a shortcut) after each.", stacklevel=2)
    elif unnormalized == "batchnorm" and graph is not None:
        convs = [name for name in not_normalized if isinstance(selected[name], nn.Conv2d)]
        model, report.added_norms = _rewrite_calls(model, convs, _insert_norm)
        not_normalized = [name for name in not_normalized if name not in report.added_norms]
        modules = dict(model.named_modules())
        graph, trace_error = _trace(model, selected)
    if not selected:
        raise ValueError(
            f"binarize_model found nothing to binarize in {type(model).__name__}: {len(candidates)} conv/linear "
            f"layers, of which {len(skipped)} skipped by skip_first/skip_last and the rest rejected by filter_fn "
            "or unsupported. Pass skip_first=False / skip_last=False or a different filter_fn."
        )
    pooled_inputs = set(max_pooled_inputs(graph, modules, selected)) if pooled == "center" and graph is not None else set()
    residual_norms = residual_branch_norms(graph, modules, selected) if graph is not None else []
    # a residual branch's last conv has one already (the block's shortcut); a centered conv only with a new norm
    pairs = shortcut_candidates(graph, modules, selected) if layer_shortcuts and graph is not None else {}
    shortcut_norms = {conv: norm for conv, norm in pairs.items() if norm not in residual_norms
                      and (conv not in pooled_inputs or conv in report.added_norms)}
    if zero_init_residual and graph is not None:
        report.zero_initialized = _zero_init_untrained(modules, residual_norms + list(shortcut_norms.values()))
    model = _handle_activations(model, selected, activation, report, graph, trace_error)
    swaps = {}
    scale = "mean" if unnormalized == "batchnorm" else unnormalized  # for the layers left unnormalized
    for name, module in selected.items():
        cls = BinaryConv2d if isinstance(module, nn.Conv2d) else BinaryLinear
        swaps[id(module)] = cls.from_float(module, replace(options, scale=scale) if name in not_normalized else options)
        report.binarized.append(name)
        if name in not_normalized:
            report.rescaled[name] = scale
        if name in pooled_inputs:
            swaps[id(module)].center_input()
            report.centered.append(name)
    _replace_by_id(model, swaps)
    model, report.real_shortcuts = _rewrite_calls(model, shortcut_norms, _add_real_shortcut)
    report.fast_path_disabled = _disable_transformer_fast_path(model, {id(m) for m in swaps.values()})
    model.binarization_report = report
    _log.info("binarize_model: %d binary layers; %s", len(report.binarized), "; ".join(report.notes()) or "-")
    return model


def _all_convs_unnormalized(selected: dict[str, nn.Module], not_normalized: list[str]) -> bool:
    """Whether the selection holds a chain of convs (three or more) and no normalization follows any of them."""
    convs = [name for name, m in selected.items() if isinstance(m, nn.Conv2d)]
    return len(convs) >= 3 and set(convs) <= set(not_normalized)


def _rewrite_calls(model: nn.Module, layers: Iterable[str],
                   rewrite: Callable[[nn.Module, fx.Graph, list[fx.Node]], bool]) -> tuple[nn.Module, list[str]]:
    """Retrace the parent of each named layer with its children as leaves and ``rewrite(parent, graph, calls)``
    with the nodes that call the layer; a parent rewritten becomes a ``torch.fx.GraphModule`` of itself (same
    submodules and state-dict keys). Returns the model (a GraphModule if the root was rewritten) and the
    layers rewritten, in the order given."""
    layers = list(layers)
    by_owner: dict[str, set[str]] = {}
    for layer in layers:
        owner, _, child = layer.rpartition(".")
        by_owner.setdefault(owner, set()).add(child)
    done = set()
    for owner_name, children in by_owner.items():
        owner = model.get_submodule(owner_name)
        graph = _Tracer({id(m) for m in owner.children()}).trace(owner)
        calls: dict[str, list[fx.Node]] = {}
        for node in graph.nodes:
            if node.op == "call_module" and node.target in children:
                calls.setdefault(node.target, []).append(node)
        changed = {child for child, nodes in calls.items() if rewrite(owner, graph, nodes)}
        if not changed:
            continue
        done |= {f"{owner_name}.{child}" if owner_name else child for child in changed}
        rewritten = fx.GraphModule(owner, graph, class_name=type(owner).__name__)
        if owner_name:
            _replace_by_id(model, {id(owner): rewritten})
        else:
            model = rewritten
    return model, [layer for layer in layers if layer in done]


def _add_real_shortcut(owner: nn.Module, graph: fx.Graph, calls: list[fx.Node]) -> bool:
    """``norm(conv(x))`` -> ``norm(conv(x)) + RealShortcut(x)`` at each call of a conv whose only user is its
    norm; a centered conv's shortcut also gets the conv's running ``input_mean``."""
    added = False
    for node in calls:
        if len(node.users) != 1:
            continue
        norm = next(iter(node.users))
        name = f"{node.target}_shortcut"
        shortcut = RealShortcut.for_conv(owner.get_submodule(node.target))
        owner.add_module(name, shortcut)
        with graph.inserting_after(norm):
            mean = graph.get_attr(f"{node.target}.input_mean") if shortcut.centered else None
        with graph.inserting_after(mean or norm):
            path = graph.call_module(name, (node.args[0],) + ((mean,) if mean else ()))
        with graph.inserting_after(path):
            total = graph.call_function(operator.add, (norm, path))
        norm.replace_all_uses_with(total, delete_user_cb=lambda user, total=total: user is not total)
        added = True
    return added


def _insert_norm(owner: nn.Module, graph: fx.Graph, calls: list[fx.Node]) -> bool:
    """``conv(x)`` -> ``norm(conv(x))`` with a new ``BatchNorm2d`` child ``<conv>_norm`` whose weight starts at
    ``ADDED_NORM_WEIGHT``; only for a conv called once (a norm shared by two calls would mix their statistics)."""
    if len(calls) != 1:
        return False
    node = calls[0]
    conv = owner.get_submodule(node.target)
    name = f"{node.target}_norm"
    norm = nn.BatchNorm2d(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
    nn.init.constant_(norm.weight, ADDED_NORM_WEIGHT)
    owner.add_module(name, norm)
    with graph.inserting_after(node):
        call = graph.call_module(name, (node,))
    node.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
    return True


def _zero_init_untrained(modules: dict[str, nn.Module], names: list[str]) -> list[str]:
    """Set to 0 the weight of each named norm that is still at PyTorch's init (weight 1, bias 0); returns
    the names changed."""
    changed = []
    for name in names:
        norm = modules[name]
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if weight is None or not bool((weight == 1).all()) or (bias is not None and bool(bias.any())):
            continue
        with torch.no_grad():
            weight.zero_()
        changed.append(name)
    return changed


def _trace(model: nn.Module, selected: dict[str, nn.Module]) -> tuple[fx.Graph | None, Exception | None]:
    """The ``torch.fx`` graph with the ``selected`` layers as leaves (traced once, for every analysis), or
    None and the error if the model does not trace."""
    try:
        return _Tracer({id(m) for m in selected.values()}).trace(model), None
    except Exception as err:  # fx cannot trace data-dependent control flow and the like
        return None, err


def _handle_activations(model: nn.Module, selected: dict[str, nn.Module], policy: str, report: ConversionReport,
                        graph: fx.Graph | None, trace_error: Exception | None) -> nn.Module:
    """Find the never-negative inputs of the ``selected`` layers on ``graph`` (None: the model did not trace,
    with ``trace_error``) and apply ``policy``; returns the model (a GraphModule if a root-level functional
    ReLU was replaced)."""
    leaves = {id(m) for m in selected.values()}
    transformer = _transformer_sources(model, selected)
    if graph is None:
        report.traced = False
        relus = [n for n, m in model.named_modules() if _replaceable_module(m)]
        what = {"hardtanh": f"every ReLU/ReLU6 module is replaced by nn.Hardtanh ({len(relus)}); functional "
                            "calls (F.relu) cannot be found and stay",
                "keep": "binary layers may read never-negative inputs (ReLU outputs) and output constants",
                "error": ""}[policy]
        message = (f"binarize_model: the model does not trace with torch.fx ({type(trace_error).__name__}: "
                   f"{trace_error}), so "
                   "the activations that feed each binary layer cannot be checked")
        if policy == "error":
            raise ValueError(message + "; pass activation='hardtanh' (replaces every ReLU module) or 'keep', or "
                             "make the model traceable.") from trace_error
        warnings.warn(f"{message}: {what}.", stacklevel=3)
        if policy == "hardtanh":
            for n in relus:
                report.replaced_activations[n] = "Hardtanh"
            _replace_by_id(model, {id(m): _hardtanh_for(m) for m in model.modules() if _replaceable_module(m)})
            _replace_transformer_activations(model, transformer, report)
        return model
    found, remaining, to_replace, modules = _analyse_graph(graph, model, selected)
    for layer, sources in found.items():
        report.non_negative_inputs[layer] = sorted(_describe(n) for n in sources)
    for layer, act in transformer.items():
        report.non_negative_inputs[layer] = [act]
    affected = sorted(report.non_negative_inputs)
    if policy == "keep" and affected:
        report.unresolved = affected
        warnings.warn("binarize_model (activation='keep'): these binary layers read an input that is never "
                      "negative, so sign(x) = +1 everywhere and they output a constant: "
                      + "; ".join(f"{n} <- {', '.join(s)}" for n, s in report.non_negative_inputs.items())
                      + ". Use activation='hardtanh' or a sign-symmetric activation.", stacklevel=3)
        return model
    if policy == "error" and affected:
        raise ValueError("binarize_model: these binary layers would read an input that is never negative "
                         "(they would output a constant): "
                         + "; ".join(f"{n} <- {', '.join(s)}" for n, s in report.non_negative_inputs.items())
                         + ". Pass activation='hardtanh' to replace those activations, or change the model.")
    module_swaps = {}
    owners: dict[int, nn.Module] = {}
    for node in to_replace:
        if node.op == "call_module":
            m = modules[node.target]
            module_swaps[id(m)] = _hardtanh_for(m)
            report.replaced_activations[node.target] = "Hardtanh"
        else:
            owner = _owner(node)
            owner = modules[owner] if owner else model
            owners[id(owner)] = owner
            report.replaced_activations[_describe(node)] = "F.hardtanh"
    if id(model) in owners:  # the root's trace inlines every other owner: one GraphModule for all
        model = _retrace_without_relu(model, leaves, set(owners))
    else:
        for owner in owners.values():
            module_swaps[id(owner)] = _retrace_without_relu(owner, leaves, {id(owner)})
    _replace_by_id(model, module_swaps)
    _replace_transformer_activations(model, transformer, report)
    report.unresolved = sorted(remaining)
    if remaining:
        warnings.warn("binarize_model: these binary layers read a never-negative input that has no sign-symmetric "
                      "replacement (sigmoid-like): "
                      + "; ".join(f"{n} <- {', '.join(sorted(_describe(s) for s in src))}"
                                  for n, src in remaining.items()) + ".", stacklevel=3)
    return model


def _replace_transformer_activations(model: nn.Module, transformer: dict[str, str], report: ConversionReport) -> None:
    for act_name in transformer.values():
        layer = model.get_submodule(act_name.rpartition(".")[0])
        layer.activation = nn.Hardtanh()
        report.replaced_activations[act_name] = "Hardtanh"


@dataclass
class LayerRow:
    name: str
    kind: str
    precision: str
    params: int
    packed_bytes: int
    macs: int | None
    note: str = ""  # why a conv / linear layer stayed in full precision


@dataclass
class BinarizationSummary:
    """Per-layer precision, parameters, packed memory and MACs, with totals (like ``larq.models.summary``)."""

    rows: list[LayerRow]
    latent_bytes: int
    packed_bytes: int
    binary_macs: int = 0
    total_macs: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def compression(self) -> float:
        return self.latent_bytes / max(self.packed_bytes, 1)

    @property
    def binary_mac_fraction(self) -> float:
        return self.binary_macs / self.total_macs if self.total_macs else 0.0

    def __str__(self) -> str:
        head = f"{'layer':<32} {'kind':<14} {'precision':<9} {'params':>11} {'packed KiB':>11} {'MACs':>13}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            macs = "-" if r.macs is None else f"{r.macs:,}"
            lines.append(
                f"{r.name:<32} {r.kind:<14} {r.precision:<9} {r.params:>11,} {r.packed_bytes / 1024:>11.1f} {macs:>13}"
                + (f"  ({r.note})" if r.note else "")
            )
        lines += [
            "-" * len(head),
            f"latent size {self.latent_bytes / 2**20:.2f} MiB, packed size {self.packed_bytes / 2**20:.2f} MiB, "
            f"compression {self.compression:.1f}x",
        ]
        if self.total_macs:
            lines.append(f"binary MACs {self.binary_macs:,} of {self.total_macs:,} ({100 * self.binary_mac_fraction:.1f}%)")
        return "\n".join(lines + self.notes)


def _numel(t: torch.Tensor) -> int:
    """Elements of ``t``; 0 for the uninitialised parameters of a lazy module."""
    return 0 if isinstance(t, nn.parameter.UninitializedTensorMixin) else t.numel()


def _nbytes(t: torch.Tensor) -> int:
    return 0 if isinstance(t, nn.parameter.UninitializedTensorMixin) else t.numel() * t.element_size()


def _binary_packed_bytes(layer: nn.Module) -> int:
    """1 bit per weight in 32-bit words along the reduction axis, plus float32 alpha and bias."""
    out_ch, k = layer.weight.shape[0], layer.weight[0].numel()
    words = out_ch * ((k + 31) // 32) * 4
    return words + 4 * out_ch * (1 + (layer.bias is not None))


def binarization_summary(model: nn.Module, example_input: torch.Tensor | tuple[int, ...] | None = None) -> BinarizationSummary:
    """Summarize a binarized (or packed) model. MACs of convolutions need ``example_input`` (a tensor or
    an input shape); they are counted with forward hooks on one eval-mode forward."""
    from lightning_ovsw.packed_layers import PackedLinear, packed_nbytes

    packed_ids = {id(m) for _, m in packed_layers(model)}
    binary_ids = {id(m) for _, m in binary_layers(model)}
    float_ids = {id(m) for _, m in full_precision_layers(model)}
    layer_ids = packed_ids | binary_ids | float_ids
    macs: dict[str, int] = {}
    if example_input is not None:
        x = torch.zeros(example_input) if isinstance(example_input, tuple) else example_input
        hooks = []
        for name, m in model.named_modules():
            if id(m) in layer_ids:
                def hook(mod, inp, out, name=name):
                    k = (mod.weight[0].numel() if hasattr(mod, "weight") and mod.weight is not None
                         else mod.in_features if isinstance(mod, PackedLinear)
                         else mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1])
                    macs[name] = out[0].numel() * k  # per sample: every output element costs k MACs
                hooks.append(m.register_forward_hook(hook))
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(x)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
    report = getattr(model, "binarization_report", None) or ConversionReport()
    rows, binary_macs, total_macs = [], 0, 0
    for name, m in model.named_modules():
        if id(m) in packed_ids:
            kind, precision, size = type(m).__name__, "1-bit", packed_nbytes(m)
            params = sum(b.numel() for b in m.buffers())
        elif id(m) in binary_ids:
            kind, precision, size = type(m).__name__, "1-bit", _binary_packed_bytes(m)
            params = sum(p.numel() for p in m.parameters(recurse=False))
        elif id(m) in float_ids:
            kind, precision = type(m).__name__, str(m.weight.dtype).replace("torch.", "")
            params = sum(_numel(p) for p in m.parameters(recurse=False))
            size = sum(_nbytes(p) for p in m.parameters(recurse=False))
        else:
            continue
        mac = macs.get(name)
        if mac is not None:
            total_macs += mac
            binary_macs += mac if precision == "1-bit" else 0
        rows.append(LayerRow(name, kind, precision, params, size, mac, report.kept_float.get(name, "")))
    latent = sum(_numel(t) * 4 for t in model.parameters()) + sum(
        _nbytes(b) for n, b in model.named_buffers() if "running" in n
    )
    layer_tensors = {id(t) for _, m in model.named_modules() if id(m) in layer_ids
                     for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    others = sum(_nbytes(t) for t in [*model.parameters(), *model.buffers()] if id(t) not in layer_tensors)
    packed = sum(r.packed_bytes for r in rows) + others
    return BinarizationSummary(rows, latent, packed, binary_macs, total_macs, report.notes())
