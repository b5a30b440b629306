"""``lightning-ovsw``: the LightningCLI entry point (``fit``, ``validate``, ``test``, ``predict``).

Recipes are YAML files (``configs/``): model, data module (any ``LightningDataModule`` subclass via
``class_path``), trainer, logger and callbacks (AGS, SAD, FlipMonitor), nothing hard-coded here::

    lightning-ovsw fit -c configs/cifar10_resnet20.yaml --data.init_args.data_dir /path/to/cifar10

``--ckpt_path .../version_N/checkpoints/last.ckpt`` resumes into the same run directory (``version_N``):
the TensorBoard curves continue and ``last.ckpt`` is overwritten in place, instead of a new ``version_N+1``.
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning import LightningDataModule
from lightning.pytorch.cli import LightningCLI

import lightning_ovsw.data  # noqa: F401  (registers the project's data modules as --data choices)
from lightning_ovsw.module import ClassificationModule

RECIPES = Path(__file__).resolve().parent.parent / "configs"
_VERSION_DIR = re.compile(r"version_(\d+)")


def _description() -> str:
    recipes = sorted(RECIPES.glob("*.yaml")) if RECIPES.is_dir() else []
    lines = [
        "Train binary neural networks (1-bit weights and activations) with OvSW (AGS + SAD, ECCV 2024) and "
        "monitor weight sign flipping (FlipMonitor). Run `lightning-ovsw fit -c RECIPE.yaml`; "
        "`lightning-ovsw fit --help` lists every option, `--data` the data modules "
        "(lightning_ovsw.data.CIFAR10DataModule, ImageFolderDataModule, SyntheticDataModule).",
    ]
    if recipes:
        lines.append("Recipes (the paper's, in " + str(RECIPES) + "): " + ", ".join(r.stem for r in recipes) + ".")
    return " ".join(lines)


def resumed_version(ckpt_path: str | None) -> int | None:
    """``N`` when ``ckpt_path`` lies in a logger's ``version_N/checkpoints/`` folder, else None."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return None
    parts = Path(ckpt_path).parts
    if len(parts) >= 3 and parts[-2] == "checkpoints" and (m := _VERSION_DIR.fullmatch(parts[-3])):
        return int(m.group(1))
    return None


class OvSWCLI(LightningCLI):
    """LightningCLI with the project's description, and ``fit --ckpt_path`` continuing the same run folder."""

    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            return
        config = self.config["fit"]
        version = resumed_version(config.get("ckpt_path"))
        logger = config.trainer.get("logger")
        init_args = getattr(logger, "init_args", None)
        if version is not None and init_args is not None and "version" in init_args and init_args.version is None:
            init_args.version = version


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse ``args`` (``sys.argv[1:]`` when ``None``) and, if ``run``, run the subcommand."""
    return OvSWCLI(
        ClassificationModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": _description()},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console script ``lightning-ovsw``: ``lightning-ovsw fit|validate|test|predict -c recipe.yaml``."""
    build_cli(args)


if __name__ == "__main__":
    main()
