"""TensorBoard views of weight sign flipping: a flip-count-vs-``|W|`` figure, the paper's Tab. 1(a)
summary and a custom-scalars layout.

Pure functions (no logger, no trainer) so that ``FlipMonitor`` and offline analysis share them.
The figure is built on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so it
neither needs nor changes the user's matplotlib backend.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

X_LABEL = "|W| (latent weight magnitude)"
Y_LABEL = "sign flips during training so far"
COLORBAR_LABEL = "weights per bin"


def _checked(magnitude: Tensor, flips: Tensor) -> tuple[Tensor, Tensor]:
    """Both inputs flattened to float64 on the CPU, after checking they describe the same weights."""
    m = magnitude.detach().flatten().to("cpu", torch.float64)
    f = flips.detach().flatten().to("cpu", torch.float64)
    if m.numel() != f.numel():
        raise ValueError(f"magnitude has {m.numel()} elements but flips has {f.numel()}; need one flip count per weight.")
    if m.numel() == 0:
        raise ValueError("no weights: magnitude and flips are empty.")
    for name, t in (("magnitude", m), ("flips", f)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf (diverged weights?); cannot summarise sign flips.")
        if (t < 0).any():
            raise ValueError(f"{name} contains negative values; expected |W| and flip counts (>= 0).")
    return m, f


def _edges(x_hi: float, f_max: float, bins: int) -> tuple[Tensor, Tensor]:
    """Bin edges (float64): ``bins`` equal bins of ``|W|`` over ``[0, x_hi]`` and, for the integer flip
    counts ``0 .. f_max``, at most ``bins`` bins of the same whole number of counts each, centred on the
    integers."""
    x_edges = torch.linspace(0.0, x_hi if x_hi > 0 else 1.0, bins + 1, dtype=torch.float64)
    span = math.floor(f_max) + 1  # counts 0 .. max
    width = math.ceil(span / bins)
    y_edges = torch.arange(math.ceil(span / width) + 1, dtype=torch.float64) * width - 0.5
    return x_edges, y_edges


def flip_count_figure(magnitude: Tensor, flips: Tensor, bins: int, title: str) -> Figure:
    """2-D histogram of per-weight flip count (y) against ``|W|`` (x), log colour scale, empty bins blank.

    Shows the paper's observation at a glance: small-``|W|`` weights flip often, large ones stay silent.
    For ``SummaryWriter.add_figure``; raises ``ValueError`` on NaN/inf, negative or mismatched input.
    """
    return flip_count_panels({title: (magnitude, flips)}, bins)


def flip_count_panels(panels: dict[str, tuple[Tensor, Tensor]], bins: int) -> Figure:
    """:func:`flip_count_figure` for several runs side by side (title -> ``(|W|, flips)``), on the same bin
    edges and one colour scale, so that e.g. a vanilla BNN and OvSW can be compared panel to panel."""
    if bins < 1:
        raise ValueError(f"bins={bins}: need at least 1 bin.")
    if not panels:
        raise ValueError("no panels: pass at least one title -> (magnitude, flips).")
    data = {title: _checked(m, f) for title, (m, f) in panels.items()}
    x_edges, y_edges = _edges(max(m.max().item() for m, _ in data.values()),
                              max(f.max().item() for _, f in data.values()), bins)
    counts = {}
    for title, (m, f) in data.items():
        hist, _ = torch.histogramdd(torch.stack([m, f], dim=1), bins=[x_edges, y_edges])
        counts[title] = np.ma.masked_equal(hist.T.numpy(), 0.0)  # rows = flip-count bins (y), masked = blank
    norm = LogNorm(vmin=1.0, vmax=max(max(float(c.max()) for c in counts.values()), 2.0))

    fig = Figure(figsize=(1 + 4 * len(panels), 4), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, c) in zip(axes, counts.items(), strict=True):
        mesh = ax.pcolormesh(x_edges.numpy(), y_edges.numpy(), c, norm=norm, cmap="viridis")
        ax.set_xlabel(X_LABEL)
        ax.set_title(title, fontsize="medium")
    axes[0].set_ylabel(Y_LABEL)
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(mesh, ax=list(axes), label=COLORBAR_LABEL)
    return fig


def never_flipped_by_magnitude(magnitude: Tensor, flips: Tensor, bins: int = 5) -> list[dict[str, Any]]:
    """The paper's Tab. 1(a): weights split by ``|W|`` into ``bins`` equal-count bins (sorted order, ties
    kept in input order; fewer bins when there are fewer weights), per bin its ``|W|`` range
    (``abs_w_min``, ``abs_w_max``), ``weights`` and ``never_flipped`` (share with flip count 0)."""
    if bins < 1:
        raise ValueError(f"bins={bins}: need at least 1 bin.")
    m, f = _checked(magnitude, flips)
    order = torch.sort(m, stable=True).indices
    rows = []
    for i, idx in enumerate(torch.tensor_split(order, min(bins, m.numel()))):
        rows.append({
            "bin": i,
            "abs_w_min": m[idx].min().item(),
            "abs_w_max": m[idx].max().item(),
            "weights": idx.numel(),
            "never_flipped": (f[idx] == 0).double().mean().item(),
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`never_flipped_by_magnitude` rows for ``SummaryWriter.add_text``
    (TensorBoard renders Markdown tables; the ``|`` of ``|W|`` is escaped so the columns stay intact)."""
    lines = [
        r"| \|W\| bin | \|W\| range | weights | never flipped |",
        "|---:|:---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bin'] + 1} | {r['abs_w_min']:.3g} – {r['abs_w_max']:.3g} | {r['weights']} "
            f"| {100 * r['never_flipped']:.1f} % |"
        )
    return "\n".join(lines)


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """``SummaryWriter.add_custom_scalars`` layout of the OvSW scalars, by tag regex, not tag list.

    Written identically by every run, it stays one set of charts however many runs share a log dir
    (TensorBoard merges layouts and skips charts equal to one already shown), and it does not depend
    on the layer names. The overall ``.../all`` series get their own charts; AGS's two ratios (about
    0.7-1.0 and about 0.02) get one chart each so neither is flattened.

    How TensorBoard matches (tensorboard 2.21, ``plugins/custom_scalar``): the frontend
    (``tf-custom-scalar-multi-line-chart-card``) sends a chart's single tag as is, or several as
    ``(r1)|(r2)|...``, to ``/scalars``, where ``custom_scalars_plugin.scalars_impl`` keeps every tag
    with ``re.compile(regex).match(tag)``: Python ``re``, anchored at the start only. Hence the ``$``.
    """
    series = (
        ("flips/rate", "flip rate per step"),
        ("flips/silent_run", "silent (never flipped) share, run so far"),
        ("flips/silent_epoch", "silent (not flipped) share, this epoch"),
    )
    flips = {f"{what} (all layers)": ["Multiline", [f"{prefix}/all$"]] for prefix, what in series}
    flips.update({f"{what}, per layer": ["Multiline", [f"{prefix}/(?!all$).+"]] for prefix, what in series})
    return {
        "OvSW flips": flips,
        "OvSW gradients": {
            "AGS: share of filters scaled up": ["Multiline", ["ags/scaled_fraction$"]],
            "AGS: mean ||G|| / ||W|| per filter": ["Multiline", ["ags/mean_grad_weight_ratio$"]],
            "SAD: share of weights penalized": ["Multiline", ["sad/penalized_fraction$"]],
        },
    }
