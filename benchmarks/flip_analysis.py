"""Silent weights, vanilla BNN vs OvSW: which weights of the last binary conv never flipped sign?

Reads FlipMonitor's per-weight flip counts from two Lightning checkpoints (the monitor saves its state
in the checkpoint) and the final latent weights ``W`` next to them, then reports for the last-stage
binary conv (e.g. ``layer3.2.conv2`` of ResNet-20; ``--layer`` picks another one):

* the share of weights that never flipped (paper: more than half in a vanilla BNN, few under OvSW);
* a picture of flip count (y, up) against ``|W|`` (x, right), one panel per run (vanilla left, OvSW
  right), log-scaled density, white = empty; saved as PNG with torchvision (no matplotlib needed).

Usage::

    python benchmarks/flip_analysis.py --vanilla runs/vanilla/.../last.ckpt --ovsw runs/ovsw/.../last.ckpt

writes ``benchmarks/results/flip_analysis.{json,png}`` (``--out`` changes the stem) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor


def _tensors(obj: object, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside nested dicts/lists, with its dotted path."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}.{i}" if path else str(i))


def load_flips(checkpoint: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """``layer -> (flip counts, final latent weight)`` for every layer FlipMonitor tracked.

    The checkpoint is read with ``weights_only=True`` (nothing is unpickled). A FlipMonitor state
    tensor belongs to the layer whose weight has the same shape and whose name is in its key.
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "state_dict" not in ckpt or "callbacks" not in ckpt:
        raise ValueError(f"{checkpoint}: not a Lightning checkpoint with callback states.")
    monitors = {k: v for k, v in ckpt["callbacks"].items() if k.startswith("FlipMonitor")}
    if not monitors:
        raise ValueError(f"{checkpoint}: no FlipMonitor state; train with lightning_ovsw.FlipMonitor.")
    weights = {k.removeprefix("model.").removesuffix(".weight"): v for k, v in ckpt["state_dict"].items()
               if k.endswith(".weight") and v.ndim >= 2}
    found: dict[str, tuple[Tensor, Tensor]] = {}
    for key, tensor in _tensors(monitors):
        if "flip" not in key.lower() or tensor.is_floating_point() and "count" not in key.lower():
            continue
        for layer, w in weights.items():
            if tensor.shape == w.shape and f".{layer}." in f".{key}.":
                found[layer] = (tensor.long(), w.float())
    if not found:
        raise ValueError(f"{checkpoint}: FlipMonitor state holds no per-weight flip counts.")
    return found


def never_flipped_share(flips: Tensor) -> float:
    """Share of weights whose sign never changed during training (flip count 0)."""
    return float((flips == 0).double().mean())


def histogram2d(x: Tensor, y: Tensor, bins: int, x_max: float, y_max: float) -> Tensor:
    """Counts ``[bins (y), bins (x)]`` of the points ``(x, y)`` in ``[0, x_max] x [0, y_max]`` (clamped)."""
    xi = (x.double().flatten() / x_max * bins).long().clamp_(0, bins - 1)
    yi = (y.double().flatten() / y_max * bins).long().clamp_(0, bins - 1)
    return torch.bincount(yi * bins + xi, minlength=bins * bins).view(bins, bins)


def heatmap(counts: Tensor, scale: int = 3) -> Tensor:
    """uint8 RGB ``[3, H, W]`` of ``log1p(counts)``, y axis up; empty bins white; ``scale`` px per bin."""
    v = torch.log1p(counts.double())
    v = (v / v.max().clamp(min=1e-12)).flip(0)
    rgb = torch.stack([v, v.sqrt() * 0.8, 1 - v]) * 255  # blue (sparse) -> yellow (dense)
    rgb[:, counts.flip(0) == 0] = 255
    img = rgb.round().to(torch.uint8)
    return img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def analyse(runs: dict[str, Path], layer: str | None, bins: int, out: Path) -> dict:
    """Statistics per run and the side-by-side picture; returns the JSON-ready result."""
    data = {}
    for name, ckpt in runs.items():
        flips = load_flips(ckpt)
        chosen = layer or list(flips)[-1]
        if chosen not in flips:
            raise ValueError(f"{ckpt}: layer {chosen!r} not tracked; tracked: {sorted(flips)}")
        data[name] = (chosen, *flips[chosen])
    x_max = max(float(w.abs().max()) for _, _, w in data.values()) or 1.0
    y_max = max(float(f.max()) for _, f, _ in data.values()) + 1.0
    panels, rows = [], {}
    for name, (chosen, flips, w) in data.items():
        rows[name] = {
            "checkpoint": str(runs[name]), "layer": chosen, "weights": flips.numel(),
            "never_flipped_share": never_flipped_share(flips),
            "median_flips": float(flips.double().median()), "mean_flips": float(flips.double().mean()),
            "mean_abs_w_never_flipped": float(w.abs()[flips == 0].mean()) if (flips == 0).any() else None,
            "mean_abs_w_flipped": float(w.abs()[flips > 0].mean()) if (flips > 0).any() else None,
        }
        panels.append(heatmap(histogram2d(w.abs(), flips, bins, x_max, y_max)))
        panels.append(torch.zeros(3, panels[-1].shape[1], 4, dtype=torch.uint8))  # black separator
    from torchvision.io import write_png

    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(torch.cat(panels[:-1], dim=2), str(out.with_suffix(".png")))
    picture = {"file": out.with_suffix(".png").name, "x": f"|W| in [0, {x_max:.4g}]",
               "y": f"flip count in [0, {y_max:.0f}]", "panels": list(runs), "bins": bins}
    return {"runs": rows, "picture": picture}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vanilla", required=True, type=Path, help="checkpoint of the vanilla BNN run")
    parser.add_argument("--ovsw", required=True, type=Path, help="checkpoint of the OvSW (AGS+SAD) run")
    parser.add_argument("--layer", help="tracked layer name (default: the last binary layer)")
    parser.add_argument("--bins", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flip_analysis")
    args = parser.parse_args(argv)
    result = analyse({"vanilla": args.vanilla, "ovsw": args.ovsw}, args.layer, args.bins, args.out)
    import torchvision

    result["meta"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": "cpu (analysis only)", "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(f"{'run':8} {'layer':18} {'weights':>8} {'never flipped':>14} {'median flips':>13}")
    for name, r in result["runs"].items():
        share, median = r["never_flipped_share"], r["median_flips"]
        print(f"{name:8} {r['layer']:18} {r['weights']:8d} {share:13.1%} {median:13.1f}")
    return result


if __name__ == "__main__":
    main()
