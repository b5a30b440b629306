"""``lightning-ovsw``: the LightningCLI entry point (``fit``, ``validate``, ``test``, ``predict``).

Recipes are YAML files (``configs/``): model, data module (any ``LightningDataModule`` subclass via
``class_path``), trainer, logger and callbacks (AGS, SAD, FlipMonitor), nothing hard-coded here::

    lightning-ovsw fit -c configs/cifar10_resnet20.yaml --data.init_args.data_dir /path/to/cifar10
"""

from __future__ import annotations

from lightning import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from lightning_ovsw.module import ClassificationModule


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse ``args`` (``sys.argv[1:]`` when ``None``) and, if ``run``, run the subcommand."""
    return LightningCLI(
        ClassificationModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console script ``lightning-ovsw``: ``lightning-ovsw fit|validate|test|predict -c recipe.yaml``."""
    build_cli(args)


if __name__ == "__main__":
    main()
