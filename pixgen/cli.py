"""The `pixgen` command line: one thin command per stage; each parses options into the stage's
config and calls the stage's `run`. User errors (PixgenError) become one line and exit code 1."""

from __future__ import annotations

import os
from pathlib import Path

import click

from . import PixgenError, __version__, assets


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PixgenError as exc:
            raise click.ClickException(str(exc)) from None


def home() -> Path:
    """The asset root: $PIXGEN_HOME, else ./data (the group's --root sets it)."""
    return Path(os.environ.get("PIXGEN_HOME") or "data")


data_root_option = click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Raw datasets root, torchvision layout (MNIST/raw/...). Default: $PIXGEN_DATA_ROOT, else ./data/raw.",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="pixgen")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Asset root for default output paths. Default: $PIXGEN_HOME, else ./data.")
def cli(root):
    """pixgen: PixMix mixing sets, augmented shards, robust training and evaluation on MNIST."""
    if root:
        os.environ["PIXGEN_HOME"] = root


@cli.command()
@click.argument("path", type=click.Path())
def info(path):
    """Print an asset's stage, config, inputs, arrays and completeness."""
    click.echo(assets.describe(path))


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG file to write.")
@click.option("--array", default="images", help="Image array of the asset (first axis the sample; shards: epoch 0).")
@click.option("--count", type=click.IntRange(1), default=64, help="How many images, from the first.")
@click.option("--ncol", type=click.IntRange(1), default=16, help="Images per row.")
def grid(path, out, array, count, ncol):
    """Save a grid of an asset's first images as a PNG, to look at them."""
    from .grids import save_grid

    group = assets.open_asset(path)
    if array not in group:
        raise PixgenError(f"{path} has no array {array!r}; it has {', '.join(sorted(group.array_keys()))}")
    arr = group[array]
    images = arr[0, :count] if arr.ndim == 4 else arr[:count]
    click.echo(f"wrote {save_grid(images, out, ncol)}")


def main():
    cli(prog_name="pixgen")
