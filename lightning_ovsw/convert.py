"""``binarize_model`` (float model -> binary training model) and ``binarization_summary``."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_ovsw.layers import BinaryConv2d, BinaryLayer, BinaryLinear, BinaryOptions

FilterFn = Callable[[nn.Module, str], bool]


def _unsupported_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"groups={module.groups}"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    return None


def binarize_model(
    model: nn.Module,
    *,
    filter_fn: FilterFn | None = None,
    skip_first: bool = True,
    skip_last: bool = True,
    inplace: bool = False,
    **layer_options,
) -> nn.Module:
    """Swap eligible ``nn.Conv2d`` / ``nn.Linear`` modules for ``BinaryConv2d`` / ``BinaryLinear``.

    Candidates are the float conv and linear modules in ``model.named_modules()`` order; the first and
    the last of them stay full precision (``skip_first`` / ``skip_last``, as in the paper), and
    ``filter_fn(module, qualified_name)`` must return True for the rest to be swapped. The binary layers
    hold the *same* Parameters, so state-dict keys are unchanged (with ``scale="learnable"`` an ``alpha``
    is added), float checkpoints warm-start and, with ``inplace=True``, optimizer references survive.
    Grouped convolutions are kept float (with a warning) unless ``filter_fn`` selects them, which raises.
    ``layer_options`` go to the binary layers (see ``BinaryOptions``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"binarize_model expects an nn.Module, got {type(model).__name__}.")
    BinaryOptions(**layer_options)  # validate once, with a clear error
    if not inplace:
        model = copy.deepcopy(model)
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, BinaryLayer)
    ]
    skipped = set()
    if candidates and skip_first:
        skipped.add(candidates[0][0])
    if candidates and skip_last:
        skipped.add(candidates[-1][0])
    swaps: dict[int, nn.Module] = {}
    kept_unsupported = []
    for name, module in candidates:
        if name in skipped or id(module) in swaps:
            continue
        selected = filter_fn is None or filter_fn(module, name)
        reason = _unsupported_reason(module)
        if reason and selected:
            if filter_fn is not None:
                raise ValueError(f"filter_fn selected {name!r} ({reason}), which binary layers do not support.")
            kept_unsupported.append(f"{name} ({reason})")
            continue
        if selected:
            cls = BinaryConv2d if isinstance(module, nn.Conv2d) else BinaryLinear
            swaps[id(module)] = cls.from_float(module, **layer_options)
    if kept_unsupported:
        warnings.warn(f"binarize_model kept these layers in full precision: {', '.join(kept_unsupported)}.", stacklevel=2)
    if not swaps:
        raise ValueError(
            f"binarize_model found nothing to binarize in {type(model).__name__}: {len(candidates)} conv/linear "
            f"layers, of which {len(skipped)} skipped by skip_first/skip_last and the rest rejected by filter_fn "
            "or unsupported. Pass skip_first=False / skip_last=False or a different filter_fn."
        )
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if id(child) in swaps:
                setattr(parent, child_name, swaps[id(child)])
    return model


@dataclass
class LayerRow:
    name: str
    kind: str
    precision: str
    params: int
    packed_bytes: int
    macs: int | None


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
            )
        lines += [
            "-" * len(head),
            f"latent size {self.latent_bytes / 2**20:.2f} MiB, packed size {self.packed_bytes / 2**20:.2f} MiB, "
            f"compression {self.compression:.1f}x",
        ]
        if self.total_macs:
            lines.append(f"binary MACs {self.binary_macs:,} of {self.total_macs:,} ({100 * self.binary_mac_fraction:.1f}%)")
        return "\n".join(lines + self.notes)


def _binary_packed_bytes(layer: nn.Module) -> int:
    """1 bit per weight in 32-bit words along the reduction axis, plus float32 alpha and bias."""
    out_ch, k = layer.weight.shape[0], layer.weight[0].numel()
    words = out_ch * ((k + 31) // 32) * 4
    return words + 4 * out_ch * (1 + (layer.bias is not None))


def binarization_summary(model: nn.Module, example_input: torch.Tensor | tuple[int, ...] | None = None) -> BinarizationSummary:
    """Summarize a binarized (or packed) model. MACs of convolutions need ``example_input`` (a tensor or
    an input shape); they are counted with forward hooks on one eval-mode forward."""
    from lightning_ovsw.packed import PackedConv2d, PackedLinear, packed_nbytes

    macs: dict[str, int] = {}
    if example_input is not None:
        x = torch.zeros(example_input) if isinstance(example_input, tuple) else example_input
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, PackedConv2d, PackedLinear)):
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
    rows, binary_macs, total_macs = [], 0, 0
    for name, m in model.named_modules():
        if isinstance(m, (PackedConv2d, PackedLinear)):
            kind, precision, size = type(m).__name__, "1-bit", packed_nbytes(m)
            params = sum(b.numel() for b in m.buffers())
        elif isinstance(m, BinaryLayer):
            kind, precision, size = type(m).__name__, "1-bit", _binary_packed_bytes(m)
            params = sum(p.numel() for p in m.parameters(recurse=False))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            kind, precision = type(m).__name__, str(m.weight.dtype).replace("torch.", "")
            params = sum(p.numel() for p in m.parameters(recurse=False))
            size = sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        else:
            continue
        mac = macs.get(name)
        if mac is not None:
            total_macs += mac
            binary_macs += mac if precision == "1-bit" else 0
        rows.append(LayerRow(name, kind, precision, params, size, mac))
    latent = sum(t.numel() * 4 for t in model.parameters()) + sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if "running" in n
    )
    layer_ids = {id(t) for _, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, BinaryLayer,
                 PackedConv2d, PackedLinear)) for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    others = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in layer_ids)
    packed = sum(r.packed_bytes for r in rows) + others
    return BinarizationSummary(rows, latent, packed, binary_macs, total_macs)
