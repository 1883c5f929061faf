"""The `pixgen` command line: the stages' commands (pixgen.stages) and the tools around them
(info, grid, run). User errors (PixgenError) become one line and exit code 1."""

from __future__ import annotations

import os
from pathlib import Path

import click

from . import PixgenError, __version__, assets
from .stages import STAGES, data_root_option, home


class _Group(click.Group):
    """Every user error is one line: pixgen's own (exit 1) and click's usage errors (exit 2),
    which click would otherwise print with the command's usage above them."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PixgenError as exc:
            raise click.ClickException(str(exc)) from None
        except click.UsageError as exc:
            error = click.ClickException(exc.format_message())
            error.exit_code = exc.exit_code
            raise error from None
        except OSError as exc:  # an output that cannot be written, a disk that is full
            if exc.errno is None:
                raise
            raise click.ClickException(f"cannot use {exc.filename or 'a file'}: {exc.strerror}; check the path, its permissions and the free space") from None


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
    ndim = group[array].ndim
    images = assets.read(group, array, (0, slice(count)) if ndim == 4 else slice(count))
    click.echo(f"wrote {save_grid(images, out, ncol)}")


@cli.command("run")
@click.argument("pipeline_file", metavar="PIPELINE", type=click.Path(dir_okay=False))
@click.option("--root", "run_root", type=click.Path(file_okay=False), default=None, help="Folder for the stages' outputs and pipeline.json. Default: <root>/<pipeline file name>.")
@click.option("--dry-run", is_flag=True, help="Print the command of every stage that would run; run nothing.")
@click.option("--jobs", type=click.IntRange(1), default=None, help="Stages run at once, each as soon as its inputs are done (each a process with its own threads: on 2 cores, --jobs 2 with OMP_NUM_THREADS=1). Default: 1, or the cluster's threads with --scheduler.")
@click.option("--scheduler", metavar="ADDRESS", default=None, help="Run each stage on a worker of this Dask distributed cluster (e.g. tcp://10.0.0.5:8786); the workers must see the same paths (a shared filesystem).")
@data_root_option
def run_pipeline(pipeline_file, run_root, dry_run, jobs, scheduler, data_root):
    """Run a pipeline file's stages, each cached: a second run does nothing."""
    from . import pipeline

    click.echo(f"output: {pipeline.run(pipeline_file, run_root or home() / Path(pipeline_file).stem, main, data_root, dry_run, jobs, scheduler)}")


for spec in STAGES.values():
    cli.add_command(spec.command)


def main(args: list[str] | None = None):
    """The CLI on `args`, else on the command line; exits with the command's code."""
    cli(args, prog_name="pixgen")
