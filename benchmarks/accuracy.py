"""CIFAR-10 accuracy of the paper's ablation (vanilla, AGS, SAD, AGS+SAD) at one equal schedule, several seeds.

Each (variant, seed) is one ``lightning-ovsw fit`` run (started as ``python -m lightning_ovsw.cli fit``) of
the recipe YAML in ``configs/``, several at once (they share one GPU well: small networks leave it idle
between kernels). ``--epochs`` stops every run early on the full ``--schedule-epochs`` cosine schedule, so a
later invocation with ``--resume`` and a larger ``--epochs`` continues each run from its ``last.ckpt`` on the
same schedule. Then it reads the final and best ``val/acc1`` from the TensorBoard logs, runs
``flip_analysis.py`` on the vanilla and AGS+SAD runs of the first seed, and writes
``benchmarks/results/accuracy.{md,json}``. Run folders are not kept between machine sessions, so an
ablation longer than one session finishes in parts: ``--carry benchmarks/results/accuracy.json`` takes the
variants that have no run here from the earlier record, marked with the invocation that trained them.

    python benchmarks/accuracy.py --data ../shared/data/cifar10-jpeg.tar.xz --epochs 30 --parallel 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"vanilla": "_vanilla", "AGS": "_ags", "SAD": "_sad", "AGS+SAD": ""}
# Paper, CIFAR-10 at 600 epochs (top-1 %): OvSW (AGS+SAD) only; the paper's ablation is on CIFAR-100.
PAPER = {"resnet20": {"AGS+SAD": 87.7}, "resnet18": {"AGS+SAD": 93.2}, "vgg_small": {"AGS+SAD": 92.8}}


def run_dir(out: Path, model: str, variant: str, seed: int) -> Path:
    return out / f"{model}_{variant.replace('+', '_')}_seed{seed}"


def command(args: argparse.Namespace, variant: str, seed: int) -> list[str]:
    directory = run_dir(args.runs, args.model, variant, seed)
    config = ROOT / "configs" / f"cifar10_{args.model}{VARIANTS[variant]}.yaml"
    cmd = [
        sys.executable, "-m", "lightning_ovsw.cli", "fit", "-c", str(config),
        f"--seed_everything={seed}", f"--data.init_args.seed={seed}", f"--trainer.max_epochs={args.epochs}",
        f"--model.schedule_epochs={args.schedule_epochs}", f"--model.warmup_epochs={args.warmup_epochs}",
        f"--data.init_args.data_dir={args.data}", "--data.init_args.download=false",
        f"--trainer.default_root_dir={directory}", f"--trainer.logger.init_args.save_dir={directory}",
        "--trainer.logger.init_args.name=tb", "--trainer.logger.init_args.version=0", "--trainer.enable_progress_bar=false",
        *args.extra,
    ]
    last = next(directory.glob("**/last.ckpt"), None)
    if args.resume and last is not None:
        cmd.append(f"--ckpt_path={last}")
    return cmd


def completed_epochs(directory: Path) -> int:
    """Epochs this run has validated so far (its ``val/acc1`` points); 0 when it has no log yet."""
    if not (directory / "tb" / "version_0").is_dir():
        return 0
    try:
        return len(read_accuracy(directory)["per_epoch"])
    except KeyError:  # started, but stopped before its first validation
        return 0


def pending_jobs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The (variant, seed) runs to start, seed-major (every variant's first seed finishes before any second
    seed starts); with ``--resume`` a run that already reached ``--epochs`` is not started again."""
    later = args.variants if args.later_seeds_variants is None else args.later_seeds_variants
    jobs = []
    for i, seed in enumerate(args.seeds):
        for variant in args.variants:
            if i and variant not in later:
                continue
            done = completed_epochs(run_dir(args.runs, args.model, variant, seed))
            if args.resume and done >= args.epochs:
                print(f"{variant} seed {seed}: already at {done} epochs, not started again")
                continue
            jobs.append((variant, seed))
    return jobs


def record_invocation(directory: Path, cmd: list[str], wall_s: float, returncode: int) -> None:
    """Append this invocation (command, wall time, exit code) to the run's ``invocations.json``."""
    path = directory / "invocations.json"
    history = json.loads(path.read_text()) if path.exists() else []
    history.append({"command": " ".join(cmd), "wall_s": round(wall_s, 1), "returncode": returncode,
                    "ended": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    path.write_text(json.dumps(history, indent=2))


def read_accuracy(directory: Path) -> dict[str, float | int]:
    events = EventAccumulator(str(directory / "tb" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    accs = events.Scalars("val/acc1")
    epochs = events.Scalars("epoch") if "epoch" in events.Tags()["scalars"] else []
    curve = [round(100 * a.value, 2) for a in accs]  # one validation per epoch: top-1 after epoch 1, 2, ...
    path = directory / "invocations.json"
    invocations = json.loads(path.read_text()) if path.exists() else []
    return {"final": curve[-1], "best": max(curve), "per_epoch": curve,
            "epochs": int(max(e.value for e in epochs)) + 1 if epochs else len(accs),
            "wall_s": sum(i["wall_s"] for i in invocations) or None, "invocations": len(invocations)}


def read_carry(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The earlier record ``--carry`` names, refused unless it is an accuracy record of this model and schedule."""
    if not args.carry.is_file():
        parser.error(f"--carry {args.carry}: no such file (pass an earlier benchmarks/results/accuracy.json)")
    try:
        earlier = json.loads(args.carry.read_text())
    except json.JSONDecodeError as err:
        parser.error(f"--carry {args.carry}: not JSON ({err})")
    mismatch = [f"{k}={earlier.get(k)!r} (here {v!r})" for k, v in
                (("benchmark", "accuracy"), ("model", args.model), ("schedule_epochs", args.schedule_epochs))
                if earlier.get(k) != v]
    if mismatch:
        parser.error(f"--carry {args.carry} is another experiment: " + ", ".join(mismatch))
    return earlier


def carry_rows(rows: dict, earlier: dict, variants: list[str]) -> dict:
    """``rows`` with each variant that has no run here taken from ``earlier``, marked with its date and command
    (in ``variants`` order)."""
    merged = {}
    for variant in variants:
        if variant in rows:
            merged[variant] = rows[variant]
        elif variant in earlier["results"]:
            old = earlier["results"][variant]
            merged[variant] = old | {"carried_from": old.get("carried_from") or
                                     {"date": earlier["date"], "command": earlier["command"]}}
    return merged


def plot_curves(rows: dict, out: Path, title: str) -> str:
    """Top-1 after every epoch, one line per (variant, seed); returns the PNG's file name."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for variant, r in rows.items():
        for seed, run in r["per_seed"].items():
            curve = run["per_epoch"]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=f"{variant} (seed {seed})")
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out.with_name(out.name + "_curves.png")
    fig.savefig(path)
    return path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10 ImageFolder root, its .tar.xz, or a torchvision root")
    parser.add_argument("--model", default="resnet20", choices=sorted(PAPER))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--later-seeds-variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="variants that also run the seeds after the first (default: all)")
    parser.add_argument("--epochs", type=int, required=True, help="stop every run after this many epochs")
    parser.add_argument("--schedule-epochs", type=float, default=600, help="cosine schedule length (recipe: 600)")
    parser.add_argument("--warmup-epochs", type=float, default=5)
    parser.add_argument("--parallel", type=int, default=4, help="runs at once")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "accuracy")
    parser.add_argument("--resume", action="store_true", help="continue runs from their last.ckpt")
    parser.add_argument("--report-only", action="store_true", help="train nothing; tabulate the runs already in --runs")
    parser.add_argument("--carry", type=Path, default=None,
                        help="an earlier accuracy .json (same model and schedule): variants with no run in --runs are "
                             "taken from it, marked as carried, so an ablation longer than one machine session can "
                             "finish in parts (the flip analysis too, when vanilla or AGS+SAD is carried)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy")
    parser.add_argument("extra", nargs="*", help="more CLI overrides after --, e.g. -- --trainer.precision=32-true")
    args = parser.parse_args()
    if args.schedule_epochs < args.epochs:
        parser.error("--schedule-epochs must be >= --epochs")
    earlier = read_carry(parser, args) if args.carry else None

    jobs = [] if args.report_only else pending_jobs(args)
    start, running, failed = time.time(), [], []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            variant, seed = jobs.pop(0)
            directory = run_dir(args.runs, args.model, variant, seed)
            directory.mkdir(parents=True, exist_ok=True)
            log = open(directory / "fit.log", "a")  # noqa: SIM115  (closed when the run ends)
            cmd = command(args, variant, seed)
            running.append((variant, seed, log, subprocess.Popen(cmd, stdout=log, stderr=log), time.time(), cmd))
        time.sleep(2)
        for item in [r for r in running if r[3].poll() is not None]:
            running.remove(item)
            item[2].close()
            directory = run_dir(args.runs, args.model, item[0], item[1])
            record_invocation(directory, item[5], time.time() - item[4], item[3].returncode)
            if item[3].returncode:
                log_path = run_dir(args.runs, args.model, item[0], item[1]) / "fit.log"
                failed.append(f"{item[0]} seed {item[1]} (exit {item[3].returncode}, see {log_path})")
    if failed:
        sys.exit("runs failed: " + "; ".join(failed))
    wall = None if args.report_only else time.time() - start

    rows = {}
    for variant in args.variants:
        per_seed = {s: read_accuracy(run_dir(args.runs, args.model, variant, s)) for s in args.seeds
                    if (run_dir(args.runs, args.model, variant, s) / "tb" / "version_0").is_dir()}
        if not per_seed:
            continue
        finals = [r["final"] for r in per_seed.values()]
        rows[variant] = {
            "per_seed": per_seed, "mean": statistics.mean(finals),
            "std": statistics.stdev(finals) if len(finals) > 1 else None,
            "epochs": min(r["epochs"] for r in per_seed.values()),
            "paper_600_epochs": PAPER[args.model].get(variant),
        }
    if earlier:
        rows = carry_rows(rows, earlier, args.variants)
    carried_pair = earlier and any("carried_from" in rows.get(v, {}) for v in ("vanilla", "AGS+SAD"))
    flips = earlier["flip_analysis"] if carried_pair else None  # computed from the checkpoints that are here
    if flips is None and {"vanilla", "AGS+SAD"} <= set(rows):
        sys.path.insert(0, str(Path(__file__).parent))
        import flip_analysis

        first = args.seeds[0]
        vanilla, ovsw = (next(run_dir(args.runs, args.model, v, first).glob("**/last.ckpt")) for v in ("vanilla", "AGS+SAD"))
        flips = flip_analysis.main(["--vanilla", str(vanilla), "--ovsw", str(ovsw), "--out", f"{args.out}_flips"])
        loaded = {"vanilla": flip_analysis.load_flips(vanilla), "ovsw": flip_analysis.load_flips(ovsw)}
        flips["all_layers"] = {  # never-flipped share of every binary layer, both runs
            name: {run: flip_analysis.never_flipped_share(data[name][0]) for run, data in loaded.items()}
            for name in loaded["vanilla"]
        }
    curves = plot_curves(rows, args.out, f"CIFAR-10 {args.model} 1W1A, {args.epochs} of {args.schedule_epochs:g} epochs")

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    record = {
        "benchmark": "accuracy", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join(["python", *sys.argv]), "device": device, "torch": torch.__version__,
        "model": args.model, "epochs": args.epochs, "schedule_epochs": args.schedule_epochs,
        "wall_s": wall, "results": rows, "flip_analysis": flips, "curves_png": curves,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = [
        f"# CIFAR-10 {args.model} 1W1A: OvSW ablation ({args.epochs} of {args.schedule_epochs:g} scheduled epochs)",
        "",
        f"{record['date'][:10]}, {device}, torch {torch.__version__}, {len(args.seeds)} seed(s)"
        + (f", wall {wall / 60:.1f} min." if wall else " (table from earlier runs)."),
        f"Command: `{record['command']}`",
        "",
        "| variant | epochs | top-1 final, mean ± std (%) | per seed (final / best) | wall, all invocations (min) "
        "| paper, 600 epochs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for variant, r in rows.items():
        seeds = ", ".join(f"{v['final']:.2f} / {v['best']:.2f}" for v in r["per_seed"].values())
        paper = f"{r['paper_600_epochs']:.1f}" if r["paper_600_epochs"] else "—"
        spread = f" ± {r['std']:.2f}" if r["std"] is not None else " (one seed)"
        walls = ", ".join(f"{v['wall_s'] / 60:.0f}" if v["wall_s"] else "—" for v in r["per_seed"].values())
        name = f"{variant} (carried, {r['carried_from']['date'][:10]})" if "carried_from" in r else variant
        lines.append(f"| {name} | {r['epochs']} | {r['mean']:.2f}{spread} | {seeds} | {walls} | {paper} |")
    carried = [(v, r["carried_from"]) for v, r in rows.items() if "carried_from" in r]
    if carried:
        lines += [""] + [f"{v}: carried from the invocation of {c['date'][:16]}, `{c['command']}`." for v, c in carried]
    epochs_done = max(len(v["per_epoch"]) for r in rows.values() for v in r["per_seed"].values())
    lines += ["", f"Top-1 after each epoch (`{curves}`):", "",
              "| variant | seed | " + " | ".join(str(e) for e in range(1, epochs_done + 1)) + " |",
              "| --- | --- |" + " --- |" * epochs_done]
    for variant, r in rows.items():
        for seed, v in r["per_seed"].items():
            lines.append(f"| {variant} | {seed} | " + " | ".join(f"{a:.2f}" for a in v["per_epoch"]) + " |")
    if flips:
        shares = ", ".join(f"{k} {100 * v['never_flipped_share']:.1f}%" for k, v in flips["runs"].items())
        lines += ["", f"Never-flipped share of `{flips['runs']['vanilla']['layer']}` (seed {args.seeds[0]}): {shares}; "
                  f"flip count vs |W|: `{flips['picture']['file']}` (left vanilla, right OvSW).", "",
                  "| binary layer | never flipped, vanilla | never flipped, AGS+SAD |", "| --- | --- | --- |"]
        lines += [f"| {name} | {100 * v['vanilla']:.1f}% | {100 * v['ovsw']:.1f}% |" for name, v in flips["all_layers"].items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
