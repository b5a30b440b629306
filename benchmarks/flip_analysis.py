"""Silent weights, vanilla BNN vs OvSW: which weights of the last binary conv never flipped sign?

Reads FlipMonitor's per-weight flip counts from two Lightning checkpoints (the monitor saves its state
in the checkpoint) and the final latent weights ``W`` next to them, then reports for the last-stage
binary conv (e.g. ``layer3.2.conv2`` of ResNet-20; ``--layer`` picks another one):

* the share of weights that never flipped (paper: more than half in a vanilla BNN, few under OvSW);
* a picture of flip count (y) against ``|W|`` (x), one panel per run (vanilla left, OvSW right) on the
  same bins and colour scale: FlipMonitor's TensorBoard figure (``callbacks.dashboard``), saved as PNG.

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

from lightning_ovsw.callbacks.dashboard import flip_count_panels


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


def analyse(runs: dict[str, Path], layer: str | None, bins: int, out: Path) -> dict:
    """Statistics per run and the side-by-side picture; returns the JSON-ready result."""
    data = {}
    for name, ckpt in runs.items():
        flips = load_flips(ckpt)
        chosen = layer or list(flips)[-1]
        if chosen not in flips:
            raise ValueError(f"{ckpt}: layer {chosen!r} not tracked; tracked: {sorted(flips)}")
        data[name] = (chosen, *flips[chosen])
    rows = {}
    for name, (chosen, flips, w) in data.items():
        rows[name] = {
            "checkpoint": str(runs[name]), "layer": chosen, "weights": flips.numel(),
            "never_flipped_share": never_flipped_share(flips),
            "median_flips": float(flips.double().median()), "mean_flips": float(flips.double().mean()),
            "mean_abs_w_never_flipped": float(w.abs()[flips == 0].mean()) if (flips == 0).any() else None,
            "mean_abs_w_flipped": float(w.abs()[flips > 0].mean()) if (flips > 0).any() else None,
        }
    label = {"vanilla": "vanilla BNN", "ovsw": "OvSW (AGS+SAD)"}
    figure = flip_count_panels({f"{label[name]}: {chosen}\n{100 * rows[name]['never_flipped_share']:.1f} % never flipped":
                                (w.abs(), flips) for name, (chosen, flips, w) in data.items()}, bins)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out.with_suffix(".png"))
    return {"runs": rows, "picture": {"file": out.with_suffix(".png").name, "panels": list(runs), "bins": bins}}


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
