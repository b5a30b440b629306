"""Packed model files (issue 10): save and load speed of ``.ovsw`` files beside torch.save and safetensors.

For each model, the same packed ``state_dict`` is written and read by:

- ``save_packed`` / ``read_packed`` (file -> verified tensors) / ``load_packed`` (into a packed model, in place),
- ``torch.save`` / ``torch.load(weights_only=True)``,
- ``safetensors.torch.save_file`` / ``load_file`` (memory-mapped: its tensors are not read until used).

Repeats are interleaved (every method once per round, in a shuffled order), files live in a temporary
directory on the local disk, nothing is fsynced and the page cache is warm, so these are the CPU costs of
each format (disk speed with a warm cache), reported as min and median and as ratios to torch. Also
the peak resident memory of ``read_packed`` and ``load_packed`` on the largest file (Linux: VmHWM after
resetting it through ``/proc/self/clear_refs``; each reader in a fresh process, every tensor byte
touched; torch.load and load_file for comparison), relative to the file size,
and whether the model loaded from the file computes exactly what the saved one does.

    python benchmarks/packed_file_io.py [--repeats 7] [--threads 1] [--models resnet20 resnet18 vgg16]

The done-when of issue 10: ``save_packed`` within 3x of ``torch.save``. Prints a table and writes
``benchmarks/results/packed_file_io_<date>.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import torch
import torchvision
from _machine import cpu_name
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_ovsw
from lightning_ovsw.io import load_packed, read_packed, save_packed
from lightning_ovsw.packing import pack_model

RESULTS = Path(__file__).parent / "results"
SAVES = ("save_packed", "torch.save", "safetensors.save_file")
LOADS = ("read_packed", "load_packed", "torch.load", "safetensors.load_file")


def build(name: str) -> tuple[nn.Module, str]:
    """A binarized model and its description; the packed file of ``vgg16`` is the issue's 61 MiB case."""
    if name == "resnet20":
        from lightning_ovsw.models import resnet20_1w1a

        return resnet20_1w1a(), "zoo resnet20_1w1a (CIFAR-10)"
    if name == "resnet18":
        from lightning_ovsw.models import resnet18_1w1a

        return resnet18_1w1a(), "zoo resnet18_1w1a (ImageNet)"
    from lightning_ovsw.convert import binarize_model

    # 2,872 classes make the packed file 61 MiB, the example (the float classifier is 45 MiB of it)
    return binarize_model(torchvision.models.vgg16(num_classes=2872)), "binarize_model(torchvision vgg16, 2872 classes)"


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak_rss_mib(fn: Callable[[], Any]) -> float | None:
    """Peak resident memory added while ``fn`` runs (its result kept alive), in MiB; None off Linux."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = status_mib("VmRSS")
    except OSError:
        return None
    result = fn()
    peak = status_mib("VmHWM") - base
    del result
    return peak


def read_all(method: str, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` read by ``method``, every byte touched (``load_file`` maps them lazily)."""
    if method == "read_packed":
        tensors = read_packed(path)[0]
    elif method == "torch.load":
        tensors = torch.load(path, weights_only=True)
    else:
        tensors = load_file(path)
    for t in tensors.values():  # a CRC over the bytes in place: no temporary, unlike a promoting sum
        zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())
    return tensors


def peak_in_child(method: str, path: Path) -> float | None:
    """``peak_rss_mib`` of ``read_all`` in a fresh interpreter, where no freed memory can be reused."""
    done = subprocess.run([sys.executable, __file__, "--peak", method, str(path)], capture_output=True, text=True,
                          check=True)
    value = done.stdout.split()[-1]
    return None if value == "None" else float(value)


def bench_model(name: str, repeats: int, tmp: Path, rng: random.Random) -> dict[str, Any]:
    """Time every save and load method on one model's packed state, interleaved; peak memory; exactness."""
    model, description = build(name)
    packed = pack_model(model.eval())
    target = copy.deepcopy(packed)  # load_packed fills it in place; zeroed, so the final check means something
    with torch.no_grad():
        for t in target.state_dict().values():
            t.zero_()
    state = {k: t.contiguous() for k, t in packed.state_dict().items()}
    paths = {"save_packed": tmp / f"{name}.ovsw", "torch.save": tmp / f"{name}.pt",
             "safetensors.save_file": tmp / f"{name}.safetensors"}
    saves: dict[str, Callable[[], Any]] = {
        "save_packed": lambda: save_packed(packed, paths["save_packed"]),
        "torch.save": lambda: torch.save(state, paths["torch.save"]),
        "safetensors.save_file": lambda: save_file(state, paths["safetensors.save_file"]),
    }
    loads: dict[str, Callable[[], Any]] = {
        "read_packed": lambda: read_packed(paths["save_packed"]),
        "load_packed": lambda: load_packed(paths["save_packed"], target),
        "torch.load": lambda: torch.load(paths["torch.save"], weights_only=True),
        "safetensors.load_file": lambda: load_file(paths["safetensors.save_file"]),
    }
    times: dict[str, list[float]] = {k: [] for k in (*SAVES, *LOADS)}
    for _ in range(repeats):
        for group in (saves, loads):
            order = list(group)
            rng.shuffle(order)
            for key in order:
                start = time.perf_counter()
                group[key]()
                times[key].append(time.perf_counter() - start)
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224) if name != "resnet20" else torch.randn(1, 3, 32, 32)
        exact = bool(torch.equal(target(x), packed(x)))
    peaks = {
        "read_packed": peak_in_child("read_packed", paths["save_packed"]),
        "load_packed": peak_rss_mib(lambda: load_packed(paths["save_packed"], target)),  # its file map is new
        "torch.load": peak_in_child("torch.load", paths["torch.save"]),
        "safetensors.load_file": peak_in_child("safetensors.load_file", paths["safetensors.save_file"]),
    }
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    size_of = {"save_packed": sizes["save_packed"], "read_packed": sizes["save_packed"],
               "load_packed": sizes["save_packed"], "torch.save": sizes["torch.save"],
               "torch.load": sizes["torch.save"], "safetensors.save_file": sizes["safetensors.save_file"],
               "safetensors.load_file": sizes["safetensors.save_file"]}
    rows = {}
    for key, ts in times.items():
        baseline = times["torch.save" if key in SAVES else "torch.load"]
        rows[key] = {
            "min_s": min(ts), "median_s": statistics.median(ts),
            "mb_per_s_at_min": size_of[key] / min(ts) / 1e6,
            "min_vs_torch": min(ts) / min(baseline), "median_vs_torch": statistics.median(ts) / statistics.median(baseline),
        }
    return {"model": description, "file_bytes": sizes, "tensors": len(state), "round_trip_exact": exact,
            "times": rows, "peak_rss_mib": peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: a busy 2-core machine makes copy_'s OpenMP team wait)")
    parser.add_argument("--peak", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", choices=["resnet20", "resnet18", "vgg16"],
                        default=["resnet20", "resnet18", "vgg16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak:  # the child of peak_in_child
        print(peak_rss_mib(lambda: read_all(args.peak[0], Path(args.peak[1]))))
        return
    torch.manual_seed(0)
    rng = random.Random(0)
    load_start = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:  # the repository's disk, not tmpfs
        for name in args.models:
            results[name] = bench_model(name, args.repeats, Path(tmp), rng)

    print(f"{'model':<48} {'method':<22} {'MB':>7} {'min s':>8} {'median s':>9} {'MB/s':>8} {'min/torch':>9} {'med/torch':>9}")
    for r in results.values():
        for key, row in r["times"].items():
            mb = r["file_bytes"]["save_packed" if key in ("read_packed", "load_packed") else
                                 "torch.save" if key.startswith("torch") else "safetensors.save_file"] / 1e6
            print(f"{r['model']:<48} {key:<22} {mb:7.2f} {row['min_s']:8.4f} {row['median_s']:9.4f} "
                  f"{row['mb_per_s_at_min']:8.0f} {row['min_vs_torch']:9.2f} {row['median_vs_torch']:9.2f}")
    for r in results.values():
        mib = r["file_bytes"]["save_packed"] / 2**20
        print(f"peak RSS added, {r['model']} ({mib:.2f} MiB .ovsw): " + ", ".join(
            f"{k} {v:.1f} MiB ({v / mib:.2f}x)" if v is not None else f"{k} n/a" for k, v in r["peak_rss_mib"].items()))
        print(f"  loaded model equals the saved one bit for bit: {r['round_trip_exact']}")
    worst = max(r["times"]["save_packed"]["min_vs_torch"] for r in results.values())
    print(f"done-when (save_packed within 3x of torch.save, min times): worst {worst:.2f}x -> "
          f"{'met' if worst <= 3 else 'NOT met'}")
    print(f"1-min load average at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f}")

    now = datetime.datetime.now(datetime.timezone.utc)
    out = {
        "benchmark": "packed_file_io",
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": {"cpu": cpu_name(), "machine": platform.machine(), "logical_cpus": os.cpu_count()},
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "safetensors": safetensors.__version__, "lightning_ovsw": lightning_ovsw.__version__},
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "conditions": "interleaved rounds, shuffled order; warm page cache, no fsync; local disk",
        "results": results,
        "save_packed_worst_min_vs_torch_save": worst,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"packed_file_io_{now:%Y%m%d_%H%M}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
