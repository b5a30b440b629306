"""Ship a binary network: pack it, export it, and run it in a process that has none of the training code.

    python examples/export_and_run.py export resnet18_1w1a.pt2   # training side: pack + torch.export
    python examples/export_and_run.py run resnet18_1w1a.pt2      # deployment side: torch + the ovsw ops only
    python examples/export_and_run.py                            # both, the run step in a fresh process

The export side stands in for your trained model (here: freshly initialised weights); the run side
imports nothing but torch and ``lightning_ovsw.kernels.ops``, the module that registers the packed
ops and their C++ CPU kernels the exported program calls.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def export(path: str) -> None:
    """Training side: binarized model -> pack_model -> torch.export file (and a save_packed weights file)."""
    import torch
    import torchvision

    from lightning_ovsw.export import export_packed
    from lightning_ovsw.io import save_packed
    from lightning_ovsw.packing import pack_model

    try:
        from lightning_ovsw.models import resnet18_1w1a

        model = resnet18_1w1a()
    except ImportError:  # the zoo is optional here: any binarized model works the same way
        from lightning_ovsw.convert import binarize_model

        model = binarize_model(torchvision.models.resnet18())
    # ... train it with the Lightning Trainer and the OvSW callbacks, then:
    packed = pack_model(model.eval())
    example = torch.randn(1, 3, 224, 224).to(memory_format=torch.channels_last)
    size = export_packed(packed, example, path)
    meta = {"arch": type(model).__name__}
    weights = save_packed(packed, path.removesuffix(".pt2") + ".ovsw", metadata=meta)
    print(f"exported {path}: {size / 1e6:.2f} MB (weights-only packed file: {weights / 1e6:.2f} MB)")


def run(path: str) -> None:
    """Deployment side: no model class, no Lightning, no training code."""
    import lightning_ovsw.kernels.ops  # noqa: F401  (registers torch.ops.ovsw.*)
    import torch

    program = torch.export.load(path).module()
    images = torch.randn(4, 3, 224, 224).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        program(images)
        start = time.perf_counter()
        logits = program(images)
    ms = (time.perf_counter() - start) * 1e3
    print(f"ran {path} on {tuple(images.shape)}: logits {tuple(logits.shape)}, {ms:.1f} ms; "
          f"top-1 classes {logits.argmax(1).tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", nargs="?", choices=["export", "run", "both"], default="both")
    parser.add_argument("path", nargs="?", default="resnet18_1w1a.pt2")
    args = parser.parse_args()
    if args.step in ("export", "both"):
        export(args.path)
    if args.step == "run":
        run(args.path)
    elif args.step == "both":  # a fresh interpreter, as on the deployment machine
        subprocess.run([sys.executable, __file__, "run", args.path], check=True)


if __name__ == "__main__":
    main()
