"""The stages: one registry, `STAGES` (name → its command and the kind of output it writes), read
by the CLI (which adds every command to `pixgen`) and by the pipeline (which checks a pipeline
file's options against the commands' parameters and runs each stage as that command).

Each command is thin: it parses options into the stage's config, whose dataclass holds the
defaults, and calls the stage's `run`. User errors (PixgenError) become one line and exit code 1
(pixgen.cli).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click

from . import models
from .augment import AugmentConfig
from .certify import METHODS as CERTIFY_METHODS
from .certify import STEPS as DUAL_OPT_STEPS
from .certify import CertifyConfig
from .corruptions import CorruptConfig
from .data import DATASETS
from .featvis import FeatvisConfig
from .fractals import FractalConfig
from .methods import KAPPA, METHODS, PGD_ATTACKS, TRAIN_EPS_FACTOR, TrainConfig, default_text


@dataclass(frozen=True)
class Stage:
    command: click.Command
    output: str  # "zarr": a Zarr asset (its path ends in .zarr); "folder": a folder of files


STAGES: dict[str, Stage] = {}


def stage(name: str, output: str):
    """Register a click command as the stage `name`."""

    def register(function) -> click.Command:
        command = click.command(name)(function)
        STAGES[name] = Stage(command, output)
        return command

    return register


def home() -> Path:
    """The asset root: $PIXGEN_HOME, else ./data (the group's --root sets it)."""
    return Path(os.environ.get("PIXGEN_HOME") or "data")


dataset_option = click.option(
    "--dataset", type=click.Choice(list(DATASETS)), default="mnist", help="Raw dataset whose images the stage reads (pixgen.data.DATASETS)."
)
data_root_option = click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Raw datasets root, torchvision layout (MNIST/raw/...). Default: $PIXGEN_DATA_ROOT, else ./data/raw.",
)


@stage("train", output="folder")
@click.option("--method", type=click.Choice(list(METHODS)), default=TrainConfig.method, help="Training method: plain cross-entropy; the same on PixMix shards; adversarial training (primal); Wong & Kolter's dual bound; interval bounds (Gowal et al.).")
@click.option("--arch", type=click.Choice(list(models.ARCHS)), default=TrainConfig.arch, help="Network architecture (dual: wk-small only; ibp: not wk-small-bn).")
@dataset_option
@click.option("--epochs", type=click.IntRange(1), default=None, help=f"Passes over the training split. Default: {default_text('epochs')}.")
@click.option("--seed", type=int, default=TrainConfig.seed, help="Seed of the initial weights, the batch order and the attacks' / projections' randomness.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help=f"Training batch size. Default: {default_text('batch_size')}.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help=f"Peak Adam learning rate (one cycle: {TrainConfig.warmup:.0%} linear warm-up, cosine decay to 0). Default: {default_text('lr')}.")
@click.option("--shards", type=click.Path(), default=None, help="pixmix: the PixMix shards asset (pixgen augment) of the training digits; epoch e reads shard epoch e % E.")
@click.option("--eps", type=click.FloatRange(0, 1), default=None, help=f"pgd/dual/ibp: L∞ budget in pixel units [0, 1] (ibp trains at {TRAIN_EPS_FACTOR} × it and certifies at it). Default: {default_text('eps')}.")
@click.option("--eps-start", type=click.FloatRange(0, 1), default=None, help=f"pgd/dual/ibp: ε at the first step, ramped linearly to --eps. Default: {default_text('eps_start')}.")
@click.option("--ramp-epochs", type=click.FloatRange(0), default=None, help=f"pgd/dual/ibp: epochs over which ε ramps up (ibp: and the clean-loss weight falls from 1 to {KAPPA}). Default: {default_text('ramp_epochs')} (at most half the epochs).")
@click.option("--attack", type=click.Choice(list(PGD_ATTACKS)), default=None, help=f"pgd: attack solving the inner maximum: PGD from a random start, or one FGSM step from a random start (fast, can overfit catastrophically at ε 0.3; watch pgd40_accuracy). Default: {default_text('attack')}.")
@click.option("--attack-steps", type=click.IntRange(1), default=None, help=f"pgd: PGD steps (Madry et al.: 40). Default: {default_text('attack_steps')}.")
@click.option("--step-size", type=click.FloatRange(0, min_open=True), default=None, help="pgd: attack step as a multiple of the current ε. Default: PGD 2.5 / steps; fgsm-rs 1.0 (the paper's 1.25).")
@click.option("--projections", type=click.IntRange(0), default=None, help=f"dual: random projections estimating the bound in training (0: exact; Wong & Kolter: 50). Default: {default_text('projections')}.")
@click.option("--certify-size", type=click.IntRange(1), default=None, help=f"dual/ibp: class-balanced test digits given the method's certificate at the end. Default: {default_text('certify_size')}.")
@click.option("--train-size", type=click.IntRange(1), default=None, help="Train on a fixed class-balanced subset of this many digits. Default: all of the training split.")
@click.option("--test-size", type=click.IntRange(1), default=None, help="Test on a fixed class-balanced subset of this many digits. Default: all of the test split.")
@data_root_option
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Model folder to write. Default: <root>/models/<method>-<arch>.")
@click.option("--force", is_flag=True, help="Replace a model folder trained with another config.")
def train(shards, data_root, out, force, **options):
    """Train a network on MNIST into a model folder (weights + meta.json); resumes a killed run."""
    from .train import run

    config = TrainConfig(**options)
    click.echo(f"output: {run(config, out or home() / 'models' / f'{config.method}-{config.arch}', data_root, force, shards)}")


@stage("corrupt", output="zarr")
@click.option("--out", type=click.Path(), default=None, help="Asset to write. Default: <root>/eval/<dataset>_c.zarr (mnist_c.zarr).")
@click.option("--seed", type=int, default=CorruptConfig.seed, help="Seed of every corruption's randomness (and of the --count subset).")
@click.option("--count", type=click.IntRange(1), default=CorruptConfig.count, help="Size of a fixed class-balanced subset of the test split. Default: all of it.")
@dataset_option
@click.option("--preview", type=click.Path(dir_okay=False), default=None, help="Also save a PNG grid: clean digits, then a row per corruption.")
@data_root_option
@click.option("--force", is_flag=True, help="Replace an asset at --out made with another config.")
def corrupt(out, seed, count, dataset, preview, data_root, force):
    """Generate <dataset>-C (MNIST-C's 15 corruptions at the benchmark's severity) from the test split."""
    from . import corruptions

    config = CorruptConfig(seed=seed, count=count, dataset=dataset)
    path = corruptions.run(config, out or home() / "eval" / f"{dataset.replace('-', '_')}_c.zarr", data_root, force)
    click.echo(f"output: {path}")
    if preview:
        click.echo(f"wrote {corruptions.preview(path, preview, data_root)}")


@stage("fractals", output="zarr")
@click.option("--out", type=click.Path(), default=None, help="Asset to write. Default: <root>/mixing/fractals.zarr.")
@click.option("--count", type=click.IntRange(1), default=FractalConfig.count, help="Number of fractal images.")
@click.option("--size", type=click.IntRange(8, 256), default=FractalConfig.size, help="Image side in pixels (MNIST: 28).")
@click.option("--seed", type=click.IntRange(0), default=FractalConfig.seed, help="Seed of every IFS code (each chunk: SeedSequence([seed, chunk])).")
@click.option("--points", type=click.IntRange(1000), default=FractalConfig.points, help="Chaos-game points per image.")
@click.option("--oversample", type=click.IntRange(1, 8), default=FractalConfig.oversample, help="Render at size × this, then area-average down (antialiasing).")
@click.option("--chunk", type=click.IntRange(1), default=FractalConfig.chunk, help="Images per chunk, the unit of work and of resume.")
@click.option("--workers", type=click.IntRange(1), default=os.cpu_count() or 1, help="Numba threads (the bytes do not depend on it).")
@click.option("--force", is_flag=True, help="Replace an asset at --out made with another config.")
def fractals(out, count, size, seed, points, oversample, chunk, workers, force):
    """Generate the fractal mixing set: random IFS codes rendered by the chaos game (resumable)."""
    from . import fractals as stage

    config = stage.FractalConfig(count=count, size=size, seed=seed, points=points, oversample=oversample, chunk=chunk)
    click.echo(f"output: {stage.run(config, out or home() / 'mixing' / 'fractals.zarr', workers=workers, force=force)}")


@stage("augment", output="zarr")
@click.option("--mixing", multiple=True, required=True, type=click.Path(), help="Mixing asset (`images` (N, 28, 28) uint8, e.g. from `pixgen fractals`); repeat to pool several.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Shards asset to write. Default: <root>/shards/pixmix.zarr.")
@click.option("--epochs", type=click.IntRange(1), default=AugmentConfig.epochs, help="Augmented copies of the training set (one per training epoch).")
@click.option("--seed", type=int, default=AugmentConfig.seed, help="Seed of every PixMix choice (with the epoch and chunk index).")
@click.option("--k", type=click.IntRange(0), default=AugmentConfig.k, help="Most mixing rounds per digit (rounds ~ U{0..k}).")
@click.option("--beta", type=click.FloatRange(0, min_open=True), default=AugmentConfig.beta, help="Mixing strength: weights ~ Beta(beta, 1) / Beta(1, beta).")
@click.option("--severity", type=click.FloatRange(0.1, 10, min_open=True), default=AugmentConfig.severity, help="Augmentation severity (level ~ U(0.1, severity) / 10).")
@click.option("--ops", default=None, help="Comma-separated augmentation ops, each drawn uniformly. Default: the reference's nine: autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x, translate_y.")
@click.option("--chunk", type=click.IntRange(1), default=AugmentConfig.chunk, help="Digits per chunk (one Zarr chunk, one Dask task).")
@click.option("--train-size", type=click.IntRange(1), default=AugmentConfig.train_size, help="Augment a fixed class-balanced subset of this many images. Default: the whole training split.")
@dataset_option
@click.option("--workers", type=click.IntRange(1, os.cpu_count() or 1), default=os.cpu_count(), help="Threads of the local Dask scheduler (at most the number of cores).")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler (e.g. tcp://10.0.0.1:8786) to use instead of local threads.")
@click.option("--preview", type=click.Path(dir_okay=False), default=None, help="Also save a PNG grid: rows of digits, each above its PixMix version.")
@data_root_option
@click.option("--force", is_flag=True, help="Replace an asset at --out made with another config or inputs.")
@click.pass_context
def augment(ctx, mixing, out, epochs, seed, k, beta, severity, ops, chunk, train_size, dataset, workers, scheduler, preview, data_root, force):
    """PixMix the MNIST training split into shards (epochs, N, 28, 28) with Dask; resumes a killed run."""
    from . import augment as stage

    if scheduler and ctx.get_parameter_source("workers") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--workers and --scheduler exclude each other: a cluster has its own workers")
    op_list = tuple(op.strip() for op in ops.split(",")) if ops else stage.pixmix.OPS
    config = stage.AugmentConfig(epochs=epochs, seed=seed, k=k, beta=beta, severity=severity, ops=op_list, chunk=chunk, train_size=train_size, dataset=dataset)
    path = stage.run(config, mixing, out or home() / "shards" / "pixmix.zarr", workers, scheduler, force, data_root)
    click.echo(f"output: {path}")
    if preview:
        click.echo(f"wrote {stage.save_preview(path, preview, data_root)}")


@stage("featvis", output="zarr")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None, help="Trained model folder (pixgen train). Default: <root>/models/featvis-wk-small.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Asset to write. Default: <root>/mixing/featvis.zarr.")
@click.option("--count", type=click.IntRange(1), default=FeatvisConfig.count, help="Number of images; targets cycle over the conv layers' channels.")
@click.option("--seed", type=int, default=FeatvisConfig.seed, help="Seed of the initial images and of the random transforms.")
@click.option("--size", type=click.IntRange(8), default=FeatvisConfig.size, help="Side of the stored images, in pixels.")
@click.option("--steps", type=click.IntRange(1), default=FeatvisConfig.steps, help="Gradient-ascent steps per image.")
@click.option("--min-ratio", type=click.FloatRange(0), default=FeatvisConfig.min_ratio, help="Least objective per image, in multiples of its channel's mean over the MNIST test digits; images below are redrawn.")
@data_root_option
@click.option("--force", is_flag=True, help="Replace an asset made with another config or model.")
def featvis(model_dir, out, count, seed, size, steps, min_ratio, data_root, force):
    """Feature visualisations of a trained network, as PixMix mixing pictures."""
    from .featvis import run

    config = FeatvisConfig(count=count, seed=seed, size=size, steps=steps, min_ratio=min_ratio)
    click.echo(f"output: {run(config, model_dir or home() / 'models' / 'featvis-wk-small', out or home() / 'mixing' / 'featvis.zarr', data_root, force)}")


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


@stage("evaluate", output="folder")
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


@stage("report", output="folder")
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


@stage("certify", output="zarr")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), required=True, help="Trained model folder (pixgen train).")
@click.option("--eps", type=click.FloatRange(0, 1), required=True, help="L∞ budget in pixel units [0, 1]; the ball is intersected with the pixel box [0, 1].")
@click.option("--method", type=click.Choice(CERTIFY_METHODS), default=CertifyConfig.method, help="Bound: Wong & Kolter's dual network; the same with optimised ReLU slopes; the primal LP of that relaxation (HiGHS); interval bounds.")
@click.option("--count", type=click.IntRange(1), default=CertifyConfig.count, help="Size of the fixed class-balanced sample of test digits.")
@click.option("--seed", type=int, default=CertifyConfig.seed, help="Seed of the test sample.")
@click.option("--steps", type=click.IntRange(1), default=None, help=f"dual-opt: projected-gradient ascent steps on the slopes. Default: {DUAL_OPT_STEPS}.")
@click.option("--chunk", type=click.IntRange(1), default=CertifyConfig.chunk, help="Digits per batch and per resumable unit.")
@data_root_option
@click.option("--out", type=click.Path(), required=True, help="Certify asset to write (Zarr).")
@click.option("--force", is_flag=True, help="Replace an asset at --out made with another config or model.")
def certify(model_dir, eps, method, count, seed, steps, chunk, data_root, out, force):
    """Certify test digits: per wrong class, a lower bound on the margin over the ε-ball ∩ [0, 1] (resumable)."""
    from .certify import run

    config = CertifyConfig(eps=eps, method=method, count=count, seed=seed, steps=steps, chunk=chunk)
    click.echo(f"output: {run(config, model_dir, out, data_root, force)}")
