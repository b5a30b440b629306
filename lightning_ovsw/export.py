"""A shippable packed model: ``torch.export`` of a ``pack_model`` result (issue 6).

``export_packed`` traces the packed model with ``torch.export`` into a self-contained program (graph +
packed weights + folded constants) whose binary layers are calls to the ``ovsw`` custom ops. A fresh
process needs only torch and ``lightning_ovsw.kernels.ops`` (which registers the ops and their C++ CPU
kernels) to run it: no training code, no Lightning, no model class::

    import torch, lightning_ovsw.kernels.ops
    program = torch.export.load("resnet18_1w1a.pt2").module()
    logits = program(images)

or ``load_exported(path)``, which does the same.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from lightning_ovsw.packed_layers import PackedConv2d, PackedLinear


def export_packed(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
) -> int:
    """Export a packed model (from ``pack_model``) to ``path`` (``.pt2``); return the file size in bytes.

    Args:
        example_input: an input of the shape and dtype the program will be called with.
        dynamic_batch: let the batch dimension vary (otherwise the program accepts only
            ``example_input``'s shape).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_packed expects an nn.Module, got {type(model).__name__}.")
    if not any(isinstance(m, (PackedConv2d, PackedLinear)) for m in model.modules()):
        raise ValueError(
            "export_packed expects a packed model; call lightning_ovsw.packing.pack_model(model) first."
        )
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a Tensor, got {type(example_input).__name__}.")
    model = model.eval()
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
        if example_input.shape[0] == 1:  # torch.export specializes size-1 dims: trace with a batch of 2
            example_input = torch.cat([example_input, example_input])
    with torch.no_grad():
        program = torch.export.export(model, (example_input,), dynamic_shapes=dynamic_shapes)
    program.example_inputs = None  # not shipped: they would add a full input tensor to the file
    torch.export.save(program, path)
    return os.path.getsize(path)


def load_exported(path: str | os.PathLike) -> nn.Module:
    """Load a program written by ``export_packed`` and return it as a callable module.

    Only load files you trust: like any program, an exported one can run code
    (``torch.export.load`` may fall back to unpickling); ``load_packed`` is the safe format for weights.
    """
    import lightning_ovsw.kernels.ops  # noqa: F401  (registers the ovsw ops the program calls)

    return torch.export.load(path).module()
