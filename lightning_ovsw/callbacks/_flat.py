"""Flat buffers: every binary weight of one optimizer step as one contiguous vector.

The OvSW update touches every element of every binary weight once per step. Doing it per layer costs a
few small kernels per layer (the authors' code: +35% step time). Here the weights and gradients of the
step are gathered into one flat vector each (float32, or float64 for float64 weights; one ``torch.cat``),
the state (SAD tracker, previous signs, flip counts) lives in flat buffers of the same layout, AGS and SAD run over the whole
vector at once, and the updated gradient goes back with one ``torch._foreach_copy_``.

Weights are ordered by row length ``K = numel / out_channels`` so that the rows of all weights with the
same ``K`` form one ``[rows, K]`` matrix: per-filter norms (Eq. 14) are one reduction per distinct ``K``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a flat bool tensor into uint8 (8 per byte, LSB first)."""
    pad = (-mask.numel()) % 8
    bits = torch.cat([mask.reshape(-1), mask.new_zeros(pad)]).view(-1, 8).to(torch.uint8)
    return (bits * _BIT_WEIGHTS.to(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of ``pack_bits``: a flat bool tensor of ``numel`` elements."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].bool()


class FlatLayout:
    """Where each binary weight of one optimizer step lives in the flat vectors.

    ``names[i]`` / ``shapes[i]`` / ``offsets[i]`` describe the i-th weight in flat order; ``groups`` lists
    ``(start, end, rows, K)`` spans of weights sharing the row length ``K``; ``row_starts`` / ``row_lengths``
    (int64, on the weights' device) give every filter row in flat order, for kernels that walk rows.
    """

    def __init__(self, weights: list[tuple[str, Tensor]]) -> None:
        ordered = sorted(weights, key=lambda nw: nw[1][0].numel() if nw[1].ndim else 1)
        self.names = [n for n, _ in ordered]
        self.key = tuple(self.names)
        self.shapes = [w.shape for _, w in ordered]
        self.numels = [w.numel() for _, w in ordered]
        self.offsets = [sum(self.numels[:i]) for i in range(len(ordered))]
        self.numel = sum(self.numels)
        self.device = ordered[0][1].device
        # float64 models keep float64 gradients; everything else is gathered in float32
        self.dtype = torch.float64 if any(w.dtype == torch.float64 for _, w in ordered) else torch.float32
        self.groups: list[tuple[int, int, int, int]] = []
        starts, lengths = [], []
        for (_, w), offset, numel in zip(ordered, self.offsets, self.numels, strict=True):
            rows = w.shape[0] if w.ndim else 1
            k = numel // rows
            if self.groups and self.groups[-1][3] == k:
                start, _, prev_rows, _ = self.groups[-1]
                self.groups[-1] = (start, offset + numel, prev_rows + rows, k)
            else:
                self.groups.append((offset, offset + numel, rows, k))
            starts.extend(range(offset, offset + numel, k))
            lengths.extend([k] * rows)
        self.rows = len(starts)
        self.row_starts = torch.tensor(starts, dtype=torch.int64, device=self.device)
        self.row_lengths = torch.tensor(lengths, dtype=torch.int64, device=self.device)

    def gather(self, tensors: dict[str, Tensor]) -> Tensor:
        """One flat vector (``dtype``) of ``tensors[name]`` in layout order (a copy)."""
        return torch.cat([tensors[n].detach().reshape(-1).to(self.dtype) for n in self.names])

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """Per-weight views of a flat vector (or of an element-aligned buffer), by name."""
        return {
            n: flat[o : o + k].view(s)
            for n, o, k, s in zip(self.names, self.offsets, self.numels, self.shapes, strict=True)
        }


class _PerLayout:
    """Per-weight state kept as one flat buffer per layout (one per optimizer), by weight name.

    A layout seen for the first time takes over the state of its weights from older layouts (which drop
    them) or from ``load``; ``by_name`` gives one tensor per weight for checkpoints.
    """

    def __init__(self) -> None:
        self.flats: dict[tuple[str, ...], tuple[FlatLayout, Tensor]] = {}
        self.saved: dict[str, Tensor] = {}

    def _flat(self, layout: FlatLayout, build) -> Tensor:
        """The buffer of ``layout``; ``build(state by name)`` makes it the first time."""
        if layout.key not in self.flats:
            current = self.by_name()
            flat = build(current)
            taken = set(layout.names)
            self.saved = {n: t.clone() for n, t in current.items() if n not in taken}
            self.flats = {key: v for key, v in self.flats.items() if not taken.intersection(key)}
            self.flats[layout.key] = (layout, flat)
        return self.flats[layout.key][1]

    def by_name(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def load(self, state: dict[str, Tensor]) -> None:
        self.saved, self.flats = dict(state), {}

    def drop(self, name: str) -> None:
        """Forget the saved state of ``name`` (a checkpointed layer the model no longer has)."""
        self.saved.pop(name, None)


class FlatState(_PerLayout):
    """One per-weight state tensor (SAD tracker, flip counts) of ``dtype``; new weights start at ``fill``."""

    def __init__(self, dtype: torch.dtype, fill: float) -> None:
        super().__init__()
        self.dtype, self.fill = dtype, fill

    def for_layout(self, layout: FlatLayout) -> Tensor:
        return self._flat(layout, lambda current: torch.cat([
            current[n].reshape(-1).to(layout.device, self.dtype)
            if n in current
            else torch.full((k,), self.fill, dtype=self.dtype, device=layout.device)
            for n, k in zip(layout.names, layout.numels, strict=True)
        ]))

    def by_name(self) -> dict[str, Tensor]:
        out = dict(self.saved)
        for layout, flat in self.flats.values():
            out.update(layout.split(flat))
        return out


class SignState(_PerLayout):
    """Signs of every binary weight one optimizer step ago, one bit per weight (``1`` = negative).

    Stored as one packed bit vector per layout. A weight seen for the first time takes its current sign
    (no flip is counted at its first step). ``by_name`` / ``load`` use one packed vector per weight.
    """

    def for_layout(self, layout: FlatLayout, weights: Tensor) -> Tensor:
        """The packed previous signs for ``layout``; ``weights`` is the step's flat weight vector."""
        def build(current: dict[str, Tensor]) -> Tensor:
            now = layout.split(weights)
            return pack_bits(torch.cat([
                unpack_bits(current[n].to(layout.device), k) if n in current else (now[n] < 0).reshape(-1)
                for n, k in zip(layout.names, layout.numels, strict=True)
            ]))

        return self._flat(layout, build)

    def by_name(self) -> dict[str, Tensor]:
        out = dict(self.saved)
        for layout, bits in self.flats.values():
            negative = unpack_bits(bits, layout.numel)
            out.update({n: pack_bits(t) for n, t in layout.split(negative).items()})
        return out
