"""CPU latency of a packed binary ResNet-18 vs its fp32 float twin (issue 6), batch 1, 224x224.

Measured in one run on the same cores, at 1 and 2 threads: the packed model (``pack_model``), the same
program after ``torch.export`` round trip, its fp32 float twin (the same architecture with every binary
layer swapped back to ``nn.Conv2d`` / ``nn.Linear``) and torchvision's fp32 ResNet-18, all channels_last.
Also per-layer time shares and GEMM rates of the packed model (forward hooks), each as a share of this
CPU's XNOR-popcount instruction limit (``popcount_peak.py``); every packed conv op alone (profiler) on each
thread count, next to OpenVINO's BinaryConvolution + FakeQuantize time for the same layer, and what the
whole model would take with every binary conv at that peak; the model file sizes, the packed model on an
NCHW-contiguous input (what transforms produce), and the binary models again while a spinning process keeps
one core busy (``--no-busy`` skips that).
With ``openvino`` installed (``pip install -e '.[bench]'``), the baseline a user would otherwise run joins
the same interleaved loop: the model as an OpenVINO graph (``openvino_baseline.py``: FakeQuantize +
BinaryConvolution per binary conv, checked against the packed model first) and its fp32 float twin, each
compiled for latency on the same thread count, plus OpenVINO's per-layer-type times (PERF_COUNT).

    python benchmarks/cpu_inference.py [--repeats 30] [--arch resnet18_1w1a|torchvision]

Prints a table and writes ``benchmarks/results/cpu_inference_<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import popcount_peak
import torch
import torchvision
from _machine import cpu_name, cpu_times, steal_share
from torch import nn
from torch.fx.experimental import optimization as fx_optimization

try:
    import openvino_baseline as ovb
except ImportError:  # openvino not installed: its rows are skipped
    ovb = None

import lightning_ovsw
from lightning_ovsw.convert import binarize_model
from lightning_ovsw.export import export_packed, load_exported
from lightning_ovsw.io import save_packed
from lightning_ovsw.layers import BinaryConv2d, BinaryLinear
from lightning_ovsw.models import resnet18_1w1a
from lightning_ovsw.packed_layers import PackedConv2d, PackedLinear, packed_nbytes
from lightning_ovsw.packing import pack_model

RESULTS = Path(__file__).parent / "results"
OPENVINO_ROWS = {
    "openvino_binary": "OpenVINO binary (BinaryConvolution + FakeQuantize)",
    "openvino_fp32_twin": "OpenVINO fp32 (float twin)",
}


def binary_model(arch: str) -> tuple[nn.Module, str]:
    """The paper's ImageNet ResNet-18 (zoo), or torchvision's ResNet-18 through ``binarize_model`` (without
    the real-valued shortcuts, which ``openvino_baseline.to_openvino`` does not translate)."""
    if arch == "resnet18_1w1a":
        return resnet18_1w1a(), "lightning_ovsw.models.resnet18_1w1a"
    return (binarize_model(torchvision.models.resnet18(), layer_shortcuts=False),
            "binarize_model(torchvision resnet18, layer_shortcuts=False)")


def float_twin(model: nn.Module) -> nn.Module:
    """The same architecture and weights with every binary layer back to a plain float layer."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, BinaryConv2d):
            plain = nn.Conv2d(
                m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.bias is not None,
            )
        elif isinstance(m, BinaryLinear):
            plain = nn.Linear(m.in_features, m.out_features, m.bias is not None)
        else:
            continue
        plain.load_state_dict(m.state_dict(), strict=False)
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, attr, plain)
    return twin.eval()


def calibrate(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm parameters and statistics (a few train-mode batches at low resolution)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64))
    return model.eval()


def latencies_ms(fns: dict[str, object], x: torch.Tensor, repeats: int, warmup: int = 5) -> dict[str, dict]:
    """Median and minimum latency of each callable, measured interleaved so drift and other processes
    on the machine hit all of them alike (the minimum is the least disturbed run). The order is shuffled
    every round: a model that always ran right after the largest one would always start with the caches
    full of the other's weights."""
    times: dict[str, list[float]] = defaultdict(list)
    order = random.Random(0)
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        for _ in range(repeats):
            for name, fn in order.sample(list(fns.items()), len(fns)):
                t0 = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median": statistics.median(ts), "min": min(ts)} for name, ts in times.items()}


@contextlib.contextmanager
def spinning_process() -> Iterator[None]:
    """A second Python process spinning on the CPU for the duration (one core's worth of other load)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let the scheduler place it
        yield
    finally:
        spinner.kill()
        spinner.wait()


def layer_profile(model: nn.Module, x: torch.Tensor, repeats: int) -> list[dict]:
    """Median time of every leaf module (forward hooks), its share of the sum, and packed GEMM rates."""
    times: dict[str, list[float]] = defaultdict(list)
    shapes: dict[str, tuple] = {}
    starts: dict[str, float] = {}
    handles = []
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue

        def pre(mod, args, name=name):
            starts[name] = time.perf_counter()

        def post(mod, args, out, name=name):
            times[name].append((time.perf_counter() - starts[name]) * 1e3)
            shapes[name] = tuple((out[0] if isinstance(out, tuple) else out).shape)  # (y, y_bits) of act

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    with torch.inference_mode():
        for _ in range(repeats):
            model(x)
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    rows = [
        {"layer": n, "type": type(modules[n]).__name__, "ms": statistics.median(t)} for n, t in times.items()
    ]
    total = sum(r["ms"] for r in rows)
    for r in rows:
        r["share"] = r["ms"] / total
        m = modules[r["layer"]]
        if isinstance(m, PackedConv2d):
            n, _, ho, wo = shapes[r["layer"]]
            ops = 2 * n * ho * wo * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * m.in_channels
            r["binary_ops"] = ops
            r["binary_gops"] = ops / (r["ms"] * 1e6)
            r["shape"] = f"{m.in_channels}->{m.out_channels} k{m.kernel_size[0]} s{m.stride[0]} out {ho}x{wo}"
        elif isinstance(m, PackedLinear):
            r["binary_gops"] = 2 * m.in_features * m.out_features * x.shape[0] / (r["ms"] * 1e6)
    return rows


def packed_conv_times(model: nn.Module, x: torch.Tensor, repeats: int) -> list[dict[str, float]]:
    """Per packed conv op of one forward, in call order: median and minimum ms of the op alone
    (``torch.profiler``, the kernels' own ``ovsw_cpu::`` ranges), without the module-call and hook overhead
    that ``layer_profile``'s forward hooks include."""
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(x)
    events = [e for e in prof.events() if e.name.startswith("ovsw_cpu::packed_conv2d")]
    per = len(events) // repeats
    return [{"median": statistics.median(events[r * per + i].cpu_time_total for r in range(repeats)) / 1e3,
             "min": min(events[r * per + i].cpu_time_total for r in range(repeats)) / 1e3} for i in range(per)]


def conv_comparison(layers: list[dict], ours: list[dict], theirs: list[dict] | None, peak: dict | None) -> list[dict]:
    """One row per packed conv (order of ``layer_profile``, which is call order): our op time, OpenVINO's
    BinaryConvolution + FakeQuantize time, and our rate as a share of the popcount peak on these threads."""
    convs = [r for r in layers if "shape" in r]
    rows = []
    for i, (r, t) in enumerate(zip(convs, ours, strict=True)):
        row = {"layer": r["layer"], "shape": r["shape"], "binary_ops": r["binary_ops"], "ours_ms": t}
        row["ours_binary_gops"] = r["binary_ops"] / (t["min"] * 1e6)
        if peak:
            row["ours_share_of_peak"] = row["ours_binary_gops"] / peak["binary_gops"]
        if theirs:
            row["openvino_ms"] = theirs[i]
            row["openvino_over_ours"] = {k: theirs[i][k] / t[k] for k in ("median", "min")}
        rows.append(row)
    return rows


def peak_bound_ms(packed_ms: dict, rows: list[dict], peak: dict | None) -> dict | None:
    """The packed model's latency if every binary conv ran at the popcount peak and nothing else changed:
    its measured time minus the convs' op times plus their binary ops / peak (median and minimum)."""
    if not peak:
        return None
    at_peak = sum(r["binary_ops"] for r in rows) / (peak["binary_gops"] * 1e6)
    return {k: packed_ms[k] - sum(r["ours_ms"][k] for r in rows) + at_peak for k in ("median", "min")}


def openvino_setup(model: nn.Module, packed: nn.Module, twin: nn.Module, x: torch.Tensor) -> dict:
    """The binarized model and its float twin as OpenVINO models, and how exactly they match ours (on ``x``
    and two more inputs): the binary one against the packed model, the fp32 one against the torch twin."""
    models = {"openvino_binary": ovb.to_openvino(model, x.shape), "openvino_fp32_twin": ovb.to_openvino(twin, x.shape)}
    inputs = [x, torch.randn(x.shape), torch.randn(x.shape)]
    run_twin = ovb.runner(ovb.compile_cpu(models["openvino_fp32_twin"], 1))
    with torch.inference_mode():
        twin_diff = max(((torch.from_numpy(run_twin(i)) - twin(i)).abs().max() / twin(i).abs().max()).item()
                        for i in inputs)
    return {
        "version": ovb.ov.__version__,
        "rows": OPENVINO_ROWS,
        "compile_config": {"INFERENCE_NUM_THREADS": "the row's thread count", "PERFORMANCE_HINT": "LATENCY",
                           "INFERENCE_PRECISION_HINT": "f32"},
        "binary_vs_packed": ovb.compare(model, inputs, packed=packed),
        "fp32_twin_vs_torch_max_abs_diff_rel": twin_diff,
        "models": models,
    }


def kernel_info() -> str:
    """What the ovsw ops run on here: the C++ microkernel family, or the reference and why."""
    from lightning_ovsw.kernels import cpu

    if cpu.load_extension() is None:
        return f"reference ({cpu.build_error()})"
    return f"C++ {cpu.get_isa()} (available: {', '.join(cpu.available_isas())})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--arch", choices=["resnet18_1w1a", "torchvision"], default="resnet18_1w1a")
    parser.add_argument("--busy", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the binary models while a spinning process of this benchmark keeps one "
                             "core busy (what a shared machine does to the 2-thread latency)")
    args = parser.parse_args()
    torch.manual_seed(0)
    load_start, times_start = os.getloadavg()[0], cpu_times()

    model, arch = binary_model(args.arch)
    model = calibrate(model)
    packed = pack_model(model)  # channels-last by itself
    # the previous default: hardtanh run separately and its output sign-packed again by the next conv
    packed_unfused_act = pack_model(model, fuse_activation=False)
    twin = float_twin(model).to(memory_format=torch.channels_last)
    twin_folded = fx_optimization.fuse(twin)  # the twin with BatchNorm folded into its convs, as packed has
    tv = torchvision.models.resnet18().eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 224, 224).to(memory_format=torch.channels_last)
    x_nchw = x.contiguous()  # what torchvision.transforms and most user code pass
    with torch.inference_mode():
        same_class = bool((packed(x).argmax(1) == model(x).argmax(1)).all())
        max_diff = (packed(x) - model(x)).abs().max().item()

    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "save_packed_fp32": save_packed(packed, Path(tmp) / "m.ovsw"),
            "save_packed_fp16_float_layers": save_packed(
                packed, Path(tmp) / "h.ovsw", float_dtype=torch.float16
            ),
            "torch_export_pt2": export_packed(packed, x, Path(tmp) / "m.pt2", dynamic_batch=False),
        }
        exported = load_exported(Path(tmp) / "m.pt2")
    openvino = openvino_setup(model, packed, twin, x) if ovb is not None else None
    if openvino is None:
        print("OpenVINO rows skipped: pip install -e '.[bench]'")
    sizes = {
        "files_bytes": files,
        "packed_in_memory_bytes": packed_nbytes(packed),
        "float_twin_fp32_param_bytes": sum(p.numel() * 4 for p in twin.parameters()),
        "torchvision_fp32_param_bytes": sum(p.numel() * 4 for p in tv.parameters()),
    }

    latency, openvino_runners = {}, {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        fns = {
            "packed": packed, "packed_nchw_input": lambda _x: packed(x_nchw),
            "packed_exported": exported, "packed_unfused_act": packed_unfused_act,
            "float_twin_fp32": twin,
            "float_twin_fp32_bn_folded": twin_folded, "torchvision_fp32": tv,
        }
        if openvino is not None:  # compiled for this thread count (OpenVINO ignores torch.set_num_threads)
            openvino_runners[threads] = {k: ovb.runner(ovb.compile_cpu(m, threads)) for k, m in openvino["models"].items()}
            fns |= openvino_runners[threads]
        latency[threads] = latencies_ms(fns, x, args.repeats)
    conv_ms, openvino_conv_ms = {}, {}
    for threads in args.threads:  # per-conv times, ours and OpenVINO's, on each thread count
        torch.set_num_threads(threads)
        conv_ms[threads] = packed_conv_times(packed, x, max(5, args.repeats // 3))
        if openvino is not None:
            compiled = ovb.compile_cpu(openvino["models"]["openvino_binary"], threads, profiling=True)
            openvino_conv_ms[threads] = ovb.binary_conv_times(compiled, x, max(5, args.repeats // 3))
    busy = {}
    if args.busy:
        with spinning_process():
            for threads in args.threads:
                torch.set_num_threads(threads)
                fns = {"packed": packed}
                if openvino is not None:
                    fns["openvino_binary"] = openvino_runners[threads]["openvino_binary"]
                busy[threads] = latencies_ms(fns, x, args.repeats)
    torch.set_num_threads(max(args.threads))
    layers = layer_profile(packed, x, max(5, args.repeats // 3))
    peaks = {t: popcount_peak.measure(t) for t in args.threads}  # the XNOR-popcount instruction limit
    peak = peaks[max(args.threads)]
    for r in layers:
        if peak and "binary_gops" in r:
            r["share_of_popcount_peak"] = r["binary_gops"] / peak["binary_gops"]
    convs = {t: conv_comparison(layers, conv_ms[t], openvino_conv_ms.get(t), peaks[t]) for t in args.threads}
    bounds = {t: peak_bound_ms(latency[t]["packed"], convs[t], peaks[t]) for t in args.threads}
    if openvino is not None:
        openvino["layer_types_ms"] = {
            k: ovb.profile_by_type(ovb.compile_cpu(m, max(args.threads), profiling=True), x, max(5, args.repeats // 3))
            for k, m in openvino.pop("models").items()
        }
    speedups = {
        t: {
            c: {k: lat[c][k] / lat["packed"][k] for k in ("median", "min")}
            for c in ("packed_nchw_input", "packed_unfused_act", "float_twin_fp32", "float_twin_fp32_bn_folded",
                      "torchvision_fp32", *OPENVINO_ROWS)
            if c in lat
        }
        for t, lat in latency.items()
    }

    print(f"\n{arch}, 224x224, batch 1, channels_last; {cpu_name()}; kernels: {kernel_info()}")
    print(f"packed vs float binarized model: max |diff| {max_diff:.2e}, same argmax: {same_class}")
    if openvino is not None:
        check = openvino["binary_vs_packed"]
        print(f"OpenVINO {openvino['version']}: " + "; ".join(f"{k}: {v}" for k, v in OPENVINO_ROWS.items()))
        print(f"OpenVINO binary vs packed: max |diff| / max |logit| {check['max_abs_diff_rel']:.2e}, logits within "
              f"1e-3 of it {check['fraction_logits_agree_1e-3']:.1%}; OpenVINO fp32 twin vs torch twin: "
              f"{openvino['fp32_twin_vs_torch_max_abs_diff_rel']:.2e}")
    cols = list(next(iter(latency.values())))
    print("median (min) ms  | " + " | ".join(f"{c:>20}" for c in cols))
    for t, lat in latency.items():
        print(f"{t} thread(s)      | " + " | ".join(
            f"{lat[c]['median']:10.2f} ({lat[c]['min']:6.2f})" for c in cols))
    for t in latency:
        print(f"{t} thread(s): packed is " + ", ".join(
            f"{r['median']:.2f}x (min {r['min']:.2f}x) faster than {c}" for c, r in speedups[t].items()))
    for t, lat in busy.items():
        print(f"{t} thread(s), one core kept busy by a spinning process: " + ", ".join(
            f"{c} {r['median']:.2f} ({r['min']:.2f}) ms" for c, r in lat.items()))
    by_type: dict[str, float] = defaultdict(float)
    for r in layers:
        by_type[r["type"]] += r["share"]
    print("time share by layer type (packed, hooks): "
          + ", ".join(f"{k} {v:.0%}" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])))
    print(f"packed conv layers ({max(args.threads)} thread(s)); "
          + (f"popcount peak {peak['binary_gops']:.0f} binary GOP/s ({peak['loop']}, benchmarks/popcount_peak.py)"
             if peak else "popcount peak not measured (needs AVX-512 VPOPCNTDQ and a compiler)") + ":")
    for r in layers:
        if "shape" in r:
            of_peak = f" {r['share_of_popcount_peak']:6.1%} of peak" if peak else ""
            print(f"  {r['layer']:<24} {r['shape']:<30} {r['ms']:7.3f} ms {r['share']:6.1%} "
                  f"{r['binary_gops']:8.1f} binary GOP/s{of_peak}")
    for t, rows in convs.items():
        print(f"packed conv ops alone ({t} thread(s), profiler), median (min) ms"
              + (", against OpenVINO's BinaryConvolution + FakeQuantize" if openvino else "") + ":")
        for r in rows:
            line = (f"  {r['layer']:<18} {r['shape']:<28} {r['ours_ms']['median']:6.3f} ({r['ours_ms']['min']:6.3f})"
                    + (f" {r['ours_share_of_peak']:5.0%} of peak" if peak else ""))
            if "openvino_ms" in r:
                line += (f" | OpenVINO {r['openvino_ms']['median']:6.3f} ({r['openvino_ms']['min']:6.3f}): ours "
                         f"{r['openvino_over_ours']['median']:.2f}x ({r['openvino_over_ours']['min']:.2f}x) faster")
            print(line)
        if bounds[t]:
            ov_ms = latency[t].get("openvino_binary")
            print(f"  bound: with every binary conv at the popcount peak the packed model would take "
                  f"{bounds[t]['median']:.2f} ({bounds[t]['min']:.2f}) ms"
                  + (f", against OpenVINO's {ov_ms['median']:.2f} ({ov_ms['min']:.2f}) ms" if ov_ms else ""))
    for k, types in (openvino or {}).get("layer_types_ms", {}).items():
        print(f"{k} time by layer type (PERF_COUNT, {max(args.threads)} thread(s)): "
              + ", ".join(f"{t} {ms:.2f} ms" for t, ms in types.items()))
    print("sizes (bytes): " + json.dumps(sizes))
    steal = steal_share(times_start, cpu_times())
    print(f"1-min load average at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f} "
          "(above ~0.5 other processes share the cores: the 2-thread numbers suffer most)"
          + (f"; CPU time stolen by other guests of the hypervisor during the run: {steal:.1%}" if steal is not None
             else ""))

    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "benchmark": "cpu_inference",
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": {"cpu": cpu_name(), "machine": platform.machine(), "logical_cpus": os.cpu_count()},
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},  # other processes on the cores
        "cpu_steal_share": steal,  # other virtual machines on the cores (/proc/stat steal), None if unknown
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "lightning_ovsw": lightning_ovsw.__version__,
            "openvino": openvino["version"] if openvino else None,
        },
        "kernels": kernel_info(),
        "model": arch,
        "input": [1, 3, 224, 224],
        "repeats": args.repeats,
        "packed_vs_float_binarized": {"max_abs_diff": max_diff, "same_argmax": same_class},
        "latency_ms": {str(t): lat for t, lat in latency.items()},
        "speedup_of_packed": {str(t): v for t, v in speedups.items()},
        "latency_ms_one_core_busy": {str(t): lat for t, lat in busy.items()},
        "sizes": sizes,
        "layers": layers,
        "popcount_peak": peak,
        "popcount_peak_by_threads": {str(t): p for t, p in peaks.items()},
        "packed_convs": {str(t): rows for t, rows in convs.items()},
        "packed_ms_if_convs_at_popcount_peak": {str(t): b for t, b in bounds.items()},
        "openvino": openvino or "skipped: openvino not installed (pip install -e '.[bench]')",
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cpu_inference_{now:%Y%m%d_%H%M}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
