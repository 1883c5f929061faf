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
from .dent import DEFENSES as DENT_DEFENSES
from .dent import LOSSES as DENT_LOSSES
from .dent import OPTIMIZERS as DENT_OPTIMIZERS
from .dent import DentConfig
from .attacks import ATTACKS
from .attacks import LOSSES as PGD_LOSSES
from .evaluate import ATTACK_SIZE, SUITES, EvalConfig
from .featvis import FeatvisConfig
from .fractals import FractalConfig
from .report import ReportConfig
from .methods import KAPPA, METHODS, PGD_ATTACKS, TRAIN_EPS_FACTOR, TrainConfig, default_text, normalize_pair


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


class Normalization(click.ParamType):
    """MEAN,STD: two comma-separated numbers (or, from a pipeline file, a list of two), checked as
    TrainConfig checks them."""

    name = "mean,std"

    def convert(self, value, param, ctx):
        try:
            return normalize_pair(float(v) for v in (value if isinstance(value, (tuple, list)) else str(value).split(",")))
        except (TypeError, ValueError):
            self.fail(f"expected MEAN,STD, two numbers such as 0.5,0.5; got {value!r}", param, ctx)


@stage("train", output="folder")
@click.option("--method", type=click.Choice(list(METHODS)), default=TrainConfig.method, help="Training method: plain cross-entropy; the same on PixMix shards; adversarial training (primal); Wong & Kolter's dual bound; interval bounds (Gowal et al.).")
@click.option("--arch", type=click.Choice(list(models.ARCHS)), default=TrainConfig.arch, help="Network architecture (dual: wk-small only; ibp: not wk-small-bn).")
@dataset_option
@click.option("--normalize", type=Normalization(), default=TrainConfig.normalize, help="MEAN,STD: make the network's first layer (x − MEAN)/STD, inside the network, so attacks and bounds still take pixels in [0, 1] and every ε stays in pixel units (MNIST's usual 0.1307,0.3081; PixMix's 0.5,0.5, which maps pixels to [−1, 1]). Default: no normalisation.")
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
@click.option("--certify-size", type=click.IntRange(1), default=None, help=f"dual/ibp: class-balanced validation digits given the method's certificate at the end. Default: {default_text('certify_size')}.")
@click.option("--train-size", type=click.IntRange(1), default=None, help="Train on a fixed class-balanced subset of this many digits. Default: all of the training split (55,000 for MNIST: 60,000 less the validation digits).")
@click.option("--val-size", type=click.IntRange(1), default=None, help="Check each epoch on a fixed class-balanced subset of this many validation digits (the last 5,000 of the training split, never trained on). Default: all of them.")
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
@click.option("--workers", type=click.IntRange(1, os.cpu_count() or 1), default=os.cpu_count(), help="Worker processes of the local Dask scheduler (at most the number of cores).")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler (e.g. tcp://10.0.0.1:8786) to use instead of local processes.")
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
@click.option("--min-ratio", type=click.FloatRange(0), default=FeatvisConfig.min_ratio, help="Least objective per image, in multiples of its channel's mean over the validation digits; images below are redrawn.")
@data_root_option
@click.option("--force", is_flag=True, help="Replace an asset made with another config or model.")
def featvis(model_dir, out, count, seed, size, steps, min_ratio, data_root, force):
    """Feature visualisations of a trained network, as PixMix mixing pictures."""
    from .featvis import run

    config = FeatvisConfig(count=count, seed=seed, size=size, steps=steps, min_ratio=min_ratio)
    click.echo(f"output: {run(config, model_dir or home() / 'models' / 'featvis-wk-small', out or home() / 'mixing' / 'featvis.zarr', data_root, force)}")


class EpsGrid(click.ParamType):
    """ε budgets: "0.1,0.3", or START:STOP:STEP for START, START + STEP, … STOP; increasing, at
    least 0 and, in pixel units, at most 1 (`pixel=False`: an evaluation's grid, whose units
    --eps-units says, is bounded by EvalConfig)."""

    name = "grid"

    def __init__(self, pixel: bool = True):
        self.pixel = pixel

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        text = str(value)
        try:
            parts = tuple(float(v) for v in text.replace(":", ",").split(",") if v.strip())
        except ValueError:
            self.fail(f"expected comma-separated numbers or START:STOP:STEP, got {text!r}", param, ctx)
        if ":" in text:
            if len(parts) != 3 or not parts[2] > 0 or parts[1] < parts[0]:
                self.fail(f"expected START:STOP:STEP with START <= STOP and STEP > 0, got {text!r}", param, ctx)
            start, stop, step = parts
            parts = tuple(round(start + step * i, 6) for i in range(int(round((stop - start) / step)) + 1))
        if not parts:
            self.fail(f"no ε given in {text!r}", param, ctx)
        if any(not 0 <= e <= (1 if self.pixel else float("inf")) for e in parts) or list(parts) != sorted(set(parts)):
            self.fail(f"ε must be increasing budgets {'in [0, 1] (pixel units)' if self.pixel else '≥ 0 (in [0, 1] in pixel units)'}, got {text!r}", param, ctx)
        return parts


def _grid_text(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


class AttackGrid(click.ParamType):
    """NAME=GRID: an attack of pixgen.attacks.ATTACKS and its ε budgets (as EpsGrid); "none": no attack."""

    name = "name=grid"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name, sep, grid = str(value).partition("=")
        if name == "none" and not sep:
            return ("none", ())
        if not sep or name not in ATTACKS:
            self.fail(f"expected NAME=GRID with NAME one of {', '.join(ATTACKS)} (e.g. pgd=0:0.5:0.1), or none; got {value!r}", param, ctx)
        return (name, EpsGrid(pixel=False).convert(grid, param, ctx))


@stage("evaluate", output="zarr")
@click.option("--model", "model_dir", type=click.Path(), required=True, help="Trained model folder (pixgen train).")
@click.option("--defense", "defenses", default=",".join(EvalConfig.defenses), help=f"Comma-separated defences evaluated around the network: none, {', '.join(DENT_DEFENSES)} (DENT adapting the model only, as published; or the model and the input).")
@click.option("--suite", "suites", default=",".join(EvalConfig.suites), help=f"Comma-separated suites without attacks, from: {', '.join(SUITES)} (corruptions needs --corrupt; certify acts on dual networks only); none for no suite.")
@click.option("--attack", "attack_grids", type=AttackGrid(), multiple=True, default=EvalConfig.attacks, help=f"An attack and its ε budgets, NAME=GRID (GRID comma-separated or START:STOP:STEP, increasing, in the units of --eps-units: in [0, 1] for pixels); repeat for several; NAME from: {', '.join(ATTACKS)}; none for no attack. Default: {' '.join(f'{n}={_grid_text(g)}' for n, g in EvalConfig.attacks)}.", show_default=False)
@click.option("--eps-units", type=click.Choice(models.EPS_UNITS), default=EvalConfig.eps_units, help="Units of the --attack grids: pixel (images in [0, 1]), or input, the units of a network trained with --normalize MEAN,STD after its normalisation, run at ε × STD in pixels (PixMix's 0.5,0.5: input ε 0.3 is pixel ε 0.15); the same as pixel for a network without one.")
@click.option("--corrupt", type=click.Path(), default=None, help="Corrupted test set (pixgen corrupt, of the model's dataset) for the corruptions suite.")
@click.option("--test-size", type=click.IntRange(1), default=EvalConfig.test_size, help="Digits of the suites without attacks: a fixed class-balanced subset of the test split. Default: all of it.")
@click.option("--attack-size", type=click.IntRange(1), default=EvalConfig.attack_size, help=f"Digits attacked: a fixed class-balanced subset of the test digits. Default: {ATTACK_SIZE}, or all the test digits if fewer.")
@click.option("--pgd-restarts", type=click.IntRange(1), default=EvalConfig.pgd_restarts, help="PGD random starts (40 steps of ε/4, best iterate per digit); later ones attack only the digits still correct.")
@click.option("--pgd-loss", "pgd_losses", default=",".join(EvalConfig.pgd_losses), help=f"Comma-separated PGD losses, each run for --pgd-restarts starts in turn: {', '.join(PGD_LOSSES)} (cross-entropy; Croce & Hein's difference-of-logits-ratio margin loss).")
@click.option("--dent-steps", type=click.IntRange(1), default=DentConfig.steps, help="DENT adaptation steps per batch.")
@click.option("--dent-lr", type=click.FloatRange(0, min_open=True), default=DentConfig.lr, help="DENT learning rate.")
@click.option("--dent-optimizer", type=click.Choice(DENT_OPTIMIZERS), default=DentConfig.optimizer, help="DENT optimiser.")
@click.option("--dent-loss", type=click.Choice(DENT_LOSSES), default=DentConfig.loss, help="DENT loss: entropy + diversity (shot), or entropy alone.")
@click.option("--dent-batch-size", type=click.IntRange(1), default=DentConfig.batch_size, help="DENT's batch: it adapts to each batch, so its predictions depend on it.")
@click.option("--adaptive-steps", type=click.IntRange(1), default=EvalConfig.adaptive_steps, help="Steps of the fixed-point and EOT attacks on DENT, and of the PGD that gives the adaptive attack its transfer start.")
@click.option("--adaptive-apgd-steps", type=click.IntRange(1), default=EvalConfig.adaptive_apgd_steps, help="Steps of the adaptive APGD through DENT's adaptation; the default is AutoAttack's (at 20 it was weaker than AutoAttack by transfer on PixMix-BN).")
@click.option("--batch-size", type=click.IntRange(1), default=EvalConfig.batch_size, help="The static network's evaluation batch.")
@click.option("--certify-size", type=click.IntRange(1), default=EvalConfig.certify_size, help="Attack digits (the first) given the exact dual certificate, dual networks only.")
@click.option("--seed", type=int, default=EvalConfig.seed, help="Seed of the attacks' randomness and of the noise OOD sets.")
@data_root_option
@click.option("--out", type=click.Path(), default=None, help="Evaluation asset to write. Default: <root>/eval/<model folder name>.zarr.")
@click.option("--force", is_flag=True, help="Replace an evaluation made with another config or inputs.")
@click.pass_context
def evaluate(ctx, model_dir, defenses, suites, attack_grids, pgd_losses, corrupt, dent_steps, dent_lr, dent_optimizer, dent_loss, dent_batch_size, data_root, out, force, **options):
    """Evaluate a network: clean, FGSM/PGD/AutoAttack, corruptions, calibration, OOD detection, consistency, certificate; ± DENT."""
    from .evaluate import run

    if corrupt is None and ctx.get_parameter_source("suites") == click.core.ParameterSource.DEFAULT:
        suites = ",".join(s for s in _names(suites) if s != "corruptions")  # the default takes what it is given
    dent = DentConfig(steps=dent_steps, lr=dent_lr, optimizer=dent_optimizer, loss=dent_loss, batch_size=dent_batch_size)
    config = EvalConfig(
        suites=tuple(s for s in _names(suites) if s != "none"), attacks=tuple(a for a in attack_grids if a[0] != "none"),
        defenses=_names(defenses), dent=dent, pgd_losses=_names(pgd_losses), **options,
    )  # fmt: skip
    click.echo(f"output: {run(config, model_dir, out or home() / 'eval' / f'{Path(model_dir).name}.zarr', corrupt, data_root, force)}")


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@stage("report", output="folder")
@click.option("--eval", "evals", multiple=True, type=click.Path(), help="Evaluation asset (pixgen evaluate); repeat for several.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Report folder to write (replaces a previous report there, nothing else). Default: <root>/eval/report.")
@click.option("--fractals", type=click.Path(), default=None, help="Fractal mixing set to show as a grid.")
@click.option("--featvis", type=click.Path(), default=None, help="Feature-visualisation mixing set to show as a grid.")
@click.option("--shards", type=click.Path(), default=None, help="PixMix shards (pixgen augment) to show beside their original images.")
@click.option("--mnist-c", type=click.Path(), default=None, help="Corrupted test set (pixgen corrupt) to show, a row per corruption.")
@click.option("--certify", "certify_assets", multiple=True, type=click.Path(), help="Certify asset (pixgen certify) for the certified-accuracy table and the LP-against-dual bounds figure; repeat for several.")
@click.option("--table-eps", type=EpsGrid(), default=_grid_text(ReportConfig.table_eps), help="ε (pixel units) of the summary table's attack columns; an evaluation stated in input units is matched by the pixel ε it ran at.")
@click.option("--adv-eps", type=EpsGrid(), default=_grid_text(ReportConfig.adv_eps), help="ε (pixel units) of the rows of each evaluation's adversarial-digit grid (those it ran).")
@click.option("--grid-count", type=click.IntRange(1), default=ReportConfig.grid_count, help="Mixing pictures shown per mixing set.")
@click.option("--columns", type=click.IntRange(1), default=ReportConfig.columns, help="Images per row of the shard, MNIST-C and mixing grids.")
@data_root_option
def report(evals, out, fractals, featvis, shards, mnist_c, certify_assets, table_eps, adv_eps, grid_count, columns, data_root):
    """One self-contained HTML page (and summary.md) comparing evaluated models, with figures and image grids."""
    from .report import run

    config = ReportConfig(table_eps=table_eps, adv_eps=adv_eps, grid_count=grid_count, columns=columns)
    path = run(config, evals, out or home() / "eval" / "report", fractals=fractals, featvis=featvis, shards=shards, mnist_c=mnist_c, certify=certify_assets, data_root=data_root)
    click.echo(f"output: {path}")


@stage("certify", output="zarr")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), required=True, help="Trained model folder (pixgen train).")
@click.option("--eps", type=click.FloatRange(0), required=True, help="L∞ budget, in the units of --eps-units (pixels: at most 1); the ball is intersected with the pixel box [0, 1].")
@click.option("--eps-units", type=click.Choice(models.EPS_UNITS), default=CertifyConfig.eps_units, help="Units of --eps: pixel (images in [0, 1]), or input, after the network's --normalize MEAN,STD layer, certified at ε × STD in pixels (as pixgen evaluate --eps-units).")
@click.option("--method", type=click.Choice(CERTIFY_METHODS), default=CertifyConfig.method, help="Bound: Wong & Kolter's dual network; the same with optimised ReLU slopes; the primal LP of that relaxation (HiGHS); interval bounds.")
@click.option("--count", type=click.IntRange(1), default=CertifyConfig.count, help="Size of the fixed class-balanced sample of test digits.")
@click.option("--seed", type=int, default=CertifyConfig.seed, help="Seed of the test sample.")
@click.option("--steps", type=click.IntRange(1), default=None, help=f"dual-opt: projected-gradient ascent steps on the slopes. Default: {DUAL_OPT_STEPS}.")
@click.option("--chunk", type=click.IntRange(1), default=CertifyConfig.chunk, help="Digits per batch and per resumable unit.")
@data_root_option
@click.option("--out", type=click.Path(), required=True, help="Certify asset to write (Zarr).")
@click.option("--force", is_flag=True, help="Replace an asset at --out made with another config or model.")
def certify(model_dir, eps, eps_units, method, count, seed, steps, chunk, data_root, out, force):
    """Certify test digits: per wrong class, a lower bound on the margin over the ε-ball ∩ [0, 1] (resumable)."""
    from .certify import run

    config = CertifyConfig(eps=eps, method=method, count=count, seed=seed, steps=steps, chunk=chunk, eps_units=eps_units)
    click.echo(f"output: {run(config, model_dir, out, data_root, force)}")
