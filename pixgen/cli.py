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


@cli.command()
@click.option("--method", type=click.Choice(["standard", "pixmix", "pgd", "dual", "ibp"]), default="standard", help="Training method: plain cross-entropy; the same on PixMix shards; adversarial training (primal); Wong & Kolter's dual bound; interval bounds (Gowal et al.).")
@click.option("--arch", type=click.Choice(["wk-small", "wk-small-bn", "madry-cnn"]), default="wk-small", help="Network architecture (dual: wk-small only; ibp: not wk-small-bn).")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Passes over the training split. Default: 10; pgd 8; dual 10; ibp 50.")
@click.option("--seed", type=int, default=0, help="Seed of the initial weights, the batch order and the attacks' / projections' randomness.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Training batch size. Default: 128; pgd 100; dual 32; ibp 100.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="Peak Adam learning rate (one cycle: 10% linear warm-up, cosine decay to 0). Default: 2e-3; dual 1.5e-3; ibp 1e-3.")
@click.option("--shards", type=click.Path(), default=None, help="pixmix: the PixMix shards asset (pixgen augment) of the training digits; epoch e reads shard epoch e % E.")
@click.option("--eps", type=float, default=None, help="pgd/dual/ibp: L∞ budget in pixel units [0, 1] (ibp trains at 1.1 × it and certifies at it). Default: pgd 0.3, dual 0.1, ibp 0.1.")
@click.option("--eps-start", type=float, default=None, help="pgd/dual/ibp: ε at the first step, ramped linearly to --eps. Default: pgd 0, dual 0.01, ibp 0.")
@click.option("--ramp-epochs", type=float, default=None, help="pgd/dual/ibp: epochs over which ε ramps up (ibp: and the clean-loss weight falls from 1 to 0.5). Default: pgd 2, dual 3, ibp 20 (at most half the epochs).")
@click.option("--attack", type=click.Choice(["pgd", "fgsm-rs"]), default=None, help="pgd: attack solving the inner maximum: PGD from a random start, or one FGSM step from a random start (fast, can overfit catastrophically at ε 0.3; watch pgd40_accuracy). Default: pgd.")
@click.option("--attack-steps", type=click.IntRange(1), default=None, help="pgd: PGD steps (Madry et al.: 40). Default: 5.")
@click.option("--step-size", type=float, default=None, help="pgd: attack step as a multiple of the current ε. Default: PGD 2.5 / steps; fgsm-rs 1.0 (the paper's 1.25).")
@click.option("--projections", type=click.IntRange(0), default=None, help="dual: random projections estimating the bound in training (0: exact; Wong & Kolter: 50). Default: 10.")
@click.option("--certify-size", type=click.IntRange(1), default=None, help="dual/ibp: class-balanced test digits given the method's certificate at the end. Default: 1000.")
@click.option("--train-size", type=click.IntRange(1), default=None, help="Train on a fixed class-balanced subset of this many digits. Default: all 60,000.")
@click.option("--test-size", type=click.IntRange(1), default=None, help="Test on a fixed class-balanced subset of this many digits. Default: all 10,000.")
@data_root_option
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Model folder to write. Default: <root>/models/<method>-<arch>.")
@click.option("--force", is_flag=True, help="Replace a model folder trained with another config.")
def train(method, arch, epochs, seed, batch_size, lr, shards, train_size, test_size, data_root, out, force, **method_options):
    """Train a network on MNIST into a model folder (weights + meta.json); resumes a killed run."""
    from .robust import DEFAULTS
    from .train import TrainConfig, run

    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr}
    general = {k: DEFAULTS[method][k] if v is None else v for k, v in given.items()}
    config = TrainConfig(method=method, arch=arch, seed=seed, train_size=train_size, test_size=test_size, **general, **method_options)
    click.echo(f"output: {run(config, out or home() / 'models' / f'{method}-{arch}', data_root, force, shards)}")


@cli.command()
@click.option("--out", type=click.Path(), default=None, help="Asset to write. Default: <root>/eval/mnist_c.zarr.")
@click.option("--seed", type=int, default=0, help="Seed of every corruption's randomness (and of the --count subset).")
@click.option("--count", type=int, default=None, help="Size (≥ 1) of a fixed class-balanced subset of the MNIST test split. Default: all 10000.")
@click.option("--preview", type=click.Path(dir_okay=False), default=None, help="Also save a PNG grid: clean digits, then a row per corruption.")
@data_root_option
@click.option("--force", is_flag=True, help="Replace an asset at --out made with another config.")
def corrupt(out, seed, count, preview, data_root, force):
    """Generate MNIST-C (15 corruptions at the benchmark's severity) from the MNIST test split."""
    from . import corruptions

    path = corruptions.run(corruptions.CorruptConfig(seed=seed, count=count), out or home() / "eval" / "mnist_c.zarr", data_root, force)
    click.echo(f"output: {path}")
    if preview:
        click.echo(f"wrote {corruptions.preview(path, preview, data_root)}")


@cli.command()
@click.option("--out", type=click.Path(), default=None, help="Asset to write. Default: <root>/mixing/fractals.zarr.")
@click.option("--count", type=click.IntRange(1), default=10_000, help="Number of fractal images.")
@click.option("--size", type=click.IntRange(8, 256), default=28, help="Image side in pixels (MNIST: 28).")
@click.option("--seed", type=click.IntRange(0), default=0, help="Seed of every IFS code (each chunk: SeedSequence([seed, chunk])).")
@click.option("--points", type=click.IntRange(1000), default=100_000, help="Chaos-game points per image.")
@click.option("--oversample", type=click.IntRange(1, 8), default=4, help="Render at size × this, then area-average down (antialiasing).")
@click.option("--chunk", type=click.IntRange(1), default=256, help="Images per chunk, the unit of work and of resume.")
@click.option("--workers", type=click.IntRange(1), default=os.cpu_count() or 1, help="Numba threads (the bytes do not depend on it).")
@click.option("--force", is_flag=True, help="Replace an asset at --out made with another config.")
def fractals(out, count, size, seed, points, oversample, chunk, workers, force):
    """Generate the fractal mixing set: random IFS codes rendered by the chaos game (resumable)."""
    from . import fractals as stage

    config = stage.FractalConfig(count=count, size=size, seed=seed, points=points, oversample=oversample, chunk=chunk)
    stage.run(config, out or home() / "mixing" / "fractals.zarr", workers=workers, force=force)


@cli.command()
@click.option("--mixing", multiple=True, required=True, type=click.Path(), help="Mixing asset (`images` (N, 28, 28) uint8, e.g. from `pixgen fractals`); repeat to pool several.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Shards asset to write. Default: <root>/shards/pixmix.zarr.")
@click.option("--epochs", type=click.IntRange(1), default=1, help="Augmented copies of the training set (one per training epoch).")
@click.option("--seed", type=int, default=0, help="Seed of every PixMix choice (with the epoch and chunk index).")
@click.option("--k", type=click.IntRange(0), default=4, help="Most mixing rounds per digit (rounds ~ U{0..k}).")
@click.option("--beta", type=click.FloatRange(0, min_open=True), default=3.0, help="Mixing strength: weights ~ Beta(beta, 1) / Beta(1, beta).")
@click.option("--severity", type=click.FloatRange(0.1, 10, min_open=True), default=3.0, help="Augmentation severity (level ~ U(0.1, severity) / 10).")
@click.option("--ops", default=None, help="Comma-separated augmentation ops, each drawn uniformly. Default: the reference's nine: autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x, translate_y.")
@click.option("--chunk", type=click.IntRange(1), default=2000, help="Digits per chunk (one Zarr chunk, one Dask task).")
@click.option("--train-size", type=click.IntRange(1), default=None, help="Augment a fixed class-balanced subset of this many digits. Default: all 60,000.")
@click.option("--workers", type=click.IntRange(1), default=os.cpu_count(), help="Threads of the local Dask scheduler.")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler (e.g. tcp://10.0.0.1:8786) to use instead of local threads.")
@click.option("--preview", type=click.Path(dir_okay=False), default=None, help="Also save a PNG grid: rows of digits, each above its PixMix version.")
@data_root_option
@click.option("--force", is_flag=True, help="Replace an asset at --out made with another config or inputs.")
@click.pass_context
def augment(ctx, mixing, out, epochs, seed, k, beta, severity, ops, chunk, train_size, workers, scheduler, preview, data_root, force):
    """PixMix the MNIST training split into shards (epochs, N, 28, 28) with Dask; resumes a killed run."""
    from . import augment as stage

    if scheduler and ctx.get_parameter_source("workers") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--workers and --scheduler exclude each other: a cluster has its own workers")
    op_list = tuple(op.strip() for op in ops.split(",")) if ops else stage.pixmix.OPS
    config = stage.AugmentConfig(epochs=epochs, seed=seed, k=k, beta=beta, severity=severity, ops=op_list, chunk=chunk, train_size=train_size)
    path = stage.run(config, mixing, out or home() / "shards" / "pixmix.zarr", workers, scheduler, force, data_root)
    click.echo(f"output: {path}")
    if preview:
        click.echo(f"wrote {stage.save_preview(path, preview, data_root)}")


@cli.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None, help="Trained model folder (pixgen train). Default: <root>/models/featvis-wk-small.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Asset to write. Default: <root>/mixing/featvis.zarr.")
@click.option("--count", type=click.IntRange(1), default=1024, help="Number of images; targets cycle over the conv layers' channels.")
@click.option("--seed", type=int, default=0, help="Seed of the initial images and of the random transforms.")
@click.option("--size", type=click.IntRange(8), default=28, help="Side of the stored images, in pixels.")
@click.option("--steps", type=click.IntRange(1), default=256, help="Gradient-ascent steps per image.")
@click.option("--min-ratio", type=click.FloatRange(0), default=5.0, help="Least objective per image, in multiples of its channel's mean over the MNIST test digits; images below are redrawn.")
@data_root_option
@click.option("--force", is_flag=True, help="Replace an asset made with another config or model.")
def featvis(model_dir, out, count, seed, size, steps, min_ratio, data_root, force):
    """Feature visualisations of a trained network, as PixMix mixing pictures."""
    from .featvis import FeatvisConfig, run

    config = FeatvisConfig(count=count, seed=seed, size=size, steps=steps, min_ratio=min_ratio)
    click.echo(f"output: {run(config, model_dir or home() / 'models' / 'featvis-wk-small', out or home() / 'mixing' / 'featvis.zarr', data_root, force)}")


@cli.command("run")
@click.argument("pipeline_file", metavar="PIPELINE", type=click.Path(dir_okay=False))
@click.option("--root", "run_root", type=click.Path(file_okay=False), default=None, help="Folder for the stages' outputs and pipeline.json. Default: <root>/<pipeline file name>.")
@click.option("--dry-run", is_flag=True, help="Print the command of every stage that would run; run nothing.")
@data_root_option
def run_pipeline(pipeline_file, run_root, dry_run, data_root):
    """Run a pipeline file's stages in order, each cached: a second run does nothing."""
    from . import pipeline

    click.echo(f"output: {pipeline.run(pipeline_file, run_root or home() / Path(pipeline_file).stem, data_root, dry_run)}")


def _float_list(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def _eps_grid(value: str) -> tuple[float, ...]:
    """"0.1,0.3" → (0.1, 0.3); "START:STOP:STEP" → START, START + STEP, … STOP."""
    if ":" not in value:
        return _float_list(value)
    parts = _float_list(value.replace(":", ","))
    if len(parts) != 3:
        raise click.BadParameter(f"expected START:STOP:STEP, got {value!r}")
    start, stop, step = parts
    if not step > 0:
        raise click.BadParameter(f"ε grid step must be positive, got {value!r}")
    return tuple(round(start + step * i, 6) for i in range(int(round((stop - start) / step)) + 1))


@cli.command()
@click.option("--model", "model_dirs", multiple=True, required=True, type=click.Path(), help="Model folder (from pixgen train); repeat for several.")
@click.option("--defense", type=click.Choice(["none", "dent", "both"]), default="none", help="Evaluate the static network, DENT around it, or both.")
@click.option("--suite", default=None, help="Comma-separated suites: clean, fgsm, pgd, corruptions, calibration, ood, consistency, certify. Default: all (corruptions only with --mnist-c; certify acts on dual networks only).")
@click.option("--mnist-c", type=click.Path(), default=None, help="MNIST-C asset (from pixgen corrupt) for the corruptions suite.")
@click.option("--test-size", type=int, default=None, help="Evaluate a fixed class-balanced subset of this many test digits (also the size of each OOD set). Default: all 10,000.")
@click.option("--fgsm-eps", default="0:0.5:0.02", help="FGSM budgets: comma-separated, or START:STOP:STEP.")
@click.option("--pgd-eps", default="0:0.5:0.1", help="PGD-40 budgets (step ε/4, random start): comma-separated, or START:STOP:STEP.")
@click.option("--autoattack", "autoattack_eps", type=float, default=None, help="Also run AutoAttack (APGD-CE, APGD-T, FAB-T with 100 steps; Square 5,000 queries) at this ε.")
@click.option("--dent-steps", type=int, default=6, help="DENT adaptation steps per batch.")
@click.option("--dent-lr", type=float, default=6e-3, help="DENT learning rate.")
@click.option("--dent-optimizer", type=click.Choice(["adamod", "adam"]), default="adamod", help="DENT optimiser.")
@click.option("--dent-loss", type=click.Choice(["shot", "entropy"]), default="shot", help="DENT loss: entropy + diversity (shot), or entropy alone.")
@click.option("--batch-size", type=int, default=250, help="Evaluation batch size (DENT adapts to each batch).")
@click.option("--certify-size", type=int, default=1000, help="Digits (the first of the test subset) given the exact certificate, dual networks only.")
@click.option("--seed", type=int, default=0, help="Seed of the attacks' random starts and of the noise OOD sets.")
@data_root_option
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder for the results, one <model name>.json each. Default: <root>/eval/results.")
def evaluate(model_dirs, defense, suite, mnist_c, test_size, fgsm_eps, pgd_eps, autoattack_eps, dent_steps, dent_lr, dent_optimizer, dent_loss, batch_size, certify_size, seed, data_root, out):
    """Evaluate models: clean, FGSM/PGD/AutoAttack, MNIST-C, calibration, OOD detection, consistency, certificates; ± DENT."""
    from .dent import DentConfig
    from .evaluate import SUITES, EvalConfig, run

    if suite is None:
        suites = tuple(s for s in SUITES if s != "corruptions" or mnist_c)
    else:
        suites = tuple(s.strip() for s in suite.split(",") if s.strip())

    dent = DentConfig(steps=dent_steps, lr=dent_lr, optimizer=dent_optimizer, loss=dent_loss)
    config = EvalConfig(
        suites=suites, fgsm_eps=_eps_grid(fgsm_eps), pgd_eps=_eps_grid(pgd_eps), autoattack_eps=autoattack_eps, test_size=test_size,
        batch_size=batch_size, seed=seed, dent=dent, certify_size=certify_size,
    )  # fmt: skip
    for path in run(config, model_dirs, out or home() / "eval" / "results", defense, mnist_c, data_root):
        click.echo(f"wrote {path}")


@cli.command()
@click.option("--eval", "evals", multiple=True, type=click.Path(), help="Evaluation JSON (pixgen evaluate) or a folder of them; repeat for several.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Report folder to write (replaces a previous report there, nothing else). Default: <root>/eval/report.")
@click.option("--fractals", type=click.Path(), default=None, help="Fractal mixing set to show as a grid.")
@click.option("--featvis", type=click.Path(), default=None, help="Feature-visualisation mixing set to show as a grid.")
@click.option("--shards", type=click.Path(), default=None, help="PixMix shards (pixgen augment) to show beside their MNIST digits.")
@click.option("--mnist-c", type=click.Path(), default=None, help="MNIST-C asset (pixgen corrupt) to show, a row per corruption.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None, help="Model folder whose FGSM/PGD adversarial digits to show at each --adv-eps.")
@click.option("--certify", "certify_assets", multiple=True, type=click.Path(), help="Certify asset (pixgen certify) for the certified-accuracy table and the LP-against-dual bounds figure; repeat for several.")
@click.option("--table-eps", default="0.1,0.2,0.3", help="ε of the summary table's FGSM and PGD columns (comma-separated).")
@click.option("--adv-eps", default="0,0.1,0.2,0.3", help="ε of the adversarial-digit rows for --model (comma-separated).")
@click.option("--grid-count", type=click.IntRange(1), default=48, help="Mixing pictures shown per mixing set.")
@click.option("--columns", type=click.IntRange(1), default=12, help="Images per row of the shard, MNIST-C, mixing and adversarial grids.")
@click.option("--seed", type=int, default=0, help="Seed of PGD's random start in the adversarial grid.")
@data_root_option
def report(evals, out, fractals, featvis, shards, mnist_c, model_dir, certify_assets, table_eps, adv_eps, grid_count, columns, seed, data_root):
    """One self-contained HTML page (and summary.md) comparing evaluated models, with figures and image grids."""
    from .report import ReportConfig, run

    config = ReportConfig(table_eps=_float_list(table_eps), adv_eps=_float_list(adv_eps), grid_count=grid_count, columns=columns, seed=seed)
    path = run(config, evals, out or home() / "eval" / "report", fractals=fractals, featvis=featvis, shards=shards, mnist_c=mnist_c, model=model_dir, certify=certify_assets, data_root=data_root)
    click.echo(f"output: {path}")


@cli.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False), required=True, help="Trained model folder (pixgen train).")
@click.option("--eps", type=float, required=True, help="L∞ budget in pixel units [0, 1]; the ball is intersected with the pixel box [0, 1].")
@click.option("--method", type=click.Choice(["dual", "dual-opt", "lp", "ibp"]), default="dual", help="Bound: Wong & Kolter's dual network; the same with optimised ReLU slopes; the primal LP of that relaxation (HiGHS); interval bounds.")
@click.option("--count", type=click.IntRange(1), default=1000, help="Size of the fixed class-balanced sample of MNIST test digits.")
@click.option("--seed", type=int, default=0, help="Seed of the test sample.")
@click.option("--steps", type=int, default=None, help="dual-opt: projected-gradient ascent steps on the slopes. Default: 100.")
@click.option("--chunk", type=click.IntRange(1), default=10, help="Digits per batch and per resumable unit.")
@data_root_option
@click.option("--out", type=click.Path(), required=True, help="Certify asset to write (Zarr).")
@click.option("--force", is_flag=True, help="Replace an asset at --out made with another config or model.")
def certify(model_dir, eps, method, count, seed, steps, chunk, data_root, out, force):
    """Certify test digits: per wrong class, a lower bound on the margin over the ε-ball ∩ [0, 1] (resumable)."""
    from .certify import CertifyConfig, run

    config = CertifyConfig(eps=eps, method=method, count=count, seed=seed, steps=steps, chunk=chunk)
    click.echo(f"output: {run(config, model_dir, out, data_root, force)}")


def main():
    cli(prog_name="pixgen")
