"""`pixgen augment` end to end: layout and labels, identical bytes for any workers or scheduler,
resume after SIGKILL, bad inputs, the preview and the training reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from conftest import done_units, pixgen
from pixgen import assets, augment, data, pixmix
from pixgen.cli import cli

# 600 digits in chunks of 10 over 2 epochs: 120 small units, enough for a kill to land mid-run.
CONFIG = augment.AugmentConfig(epochs=2, seed=3, chunk=10, train_size=600)
CLI_CONFIG = ["--epochs", "2", "--seed", "3", "--chunk", "10", "--train-size", "600"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("augment")


@pytest.fixture(scope="module")
def fractals(tmp) -> Path:
    path = tmp / "fractals.zarr"
    pixgen("fractals", "--out", path, "--count", "64", "--seed", "0", "--points", "20000")
    return path


@pytest.fixture(scope="module")
def shards(tmp, fractals) -> Path:
    """The reference asset: one local worker."""
    return augment.run(CONFIG, [fractals], tmp / "one.zarr", workers=1)


def _images(path: Path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["images"][:]


def test_layout_labels_and_inputs(shards, fractals):
    group = assets.open_asset(shards, stage="augment")
    images, labels, indices = group["images"], group["labels"][:], group["indices"][:]
    assert images.shape == (2, 600, 28, 28) and images.dtype == np.uint8 and images.chunks == (1, 10, 28, 28)
    assert [c.to_dict() for c in zarr.open_array(str(shards / "images"), mode="r").compressors] == [augment.COMPRESSOR.to_dict()]
    mnist_images, mnist_labels = data.load("mnist", "train")
    assert np.array_equal(indices, data.balanced_subset(mnist_labels, 600))
    assert np.array_equal(labels, mnist_labels[indices]), "PixMix must not change labels"
    inputs = dict(group.attrs)["inputs"]
    assert inputs["mixing0"] == assets.asset_id(dict(assets.open_asset(fractals).attrs))
    assert inputs["mnist-train"] == data.identity(mnist_images[indices], labels)
    epochs = images[:]
    assert not np.array_equal(epochs[0], epochs[1]), "each epoch draws afresh"
    assert (epochs[0] != mnist_images[indices]).any(axis=(1, 2)).mean() > 0.5


def test_a_chunk_is_pixmix_seeded_by_seed_epoch_chunk(shards, fractals):
    """The determinism contract: chunk c of epoch e depends on SeedSequence([seed, e, c]) only."""
    epoch, chunk = 1, 7
    digits = data.load("mnist", "train")[0][assets.open_asset(shards)["indices"][70:80]]
    mixing = assets.open_asset(fractals)["images"][:]
    rng = np.random.default_rng(np.random.SeedSequence([CONFIG.seed, epoch, chunk]))
    expected = pixmix.apply(digits, mixing, pixmix.draw(rng, 10, len(mixing), k=4, beta=3.0, severity=3.0))
    assert np.array_equal(_images(shards)[epoch, 70:80], expected)


_KERNEL = """
import sys, numba, numpy as np
from pixgen import pixmix
rng = np.random.default_rng(0)
digits = rng.integers(0, 256, (8, 28, 28)).astype(np.uint8)
pixmix.apply(digits, digits, pixmix.draw(rng, 8, 8), parallel=sys.argv[1] == "parallel")
try:
    print(numba.threading_layer())
except ValueError:  # no parallel region ran
    print("serial")
"""


def test_tasks_run_the_serial_kernel_whatever_numba_cached():
    """Each task's PixMix stays on its thread, also when the parallel kernel was compiled and
    cached first (Numba's cache once served one kernel's code for the other)."""

    def layer(kind: str) -> str:
        return subprocess.run([sys.executable, "-c", _KERNEL, kind], capture_output=True, text=True, check=True).stdout.strip()

    assert layer("parallel") != "serial"
    assert layer("serial") == "serial"


def test_same_bytes_with_two_workers(shards, fractals, tmp):
    two = augment.run(CONFIG, [fractals], tmp / "two.zarr", workers=2)
    assert np.array_equal(_images(two), _images(shards))


@pytest.mark.slow
def test_same_bytes_on_a_distributed_cluster(shards, fractals, tmp, cluster_address):
    out = tmp / "cluster.zarr"
    pixgen("augment", "--mixing", fractals, "--out", out, *CLI_CONFIG, "--scheduler", cluster_address)
    assert np.array_equal(_images(out), _images(shards))


def _started(fractals: Path, out: Path, workers: int) -> subprocess.Popen:
    """`pixgen augment` running in the background, once it has flagged 5 units done."""
    args = [sys.executable, "-m", "pixgen", "augment", "--mixing", str(fractals), "--out", str(out), *CLI_CONFIG, "--workers", str(workers)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while done_units(out) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_bytes(shards, fractals, tmp):
    out = tmp / "killed.zarr"
    proc = _started(fractals, out, workers=1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = done_units(out)
    assert 5 <= done < 120, f"the kill should land mid-run ({done} of 120 units done)"
    assert not zarr.open_group(str(out), mode="r").attrs["complete"]
    pixgen("augment", "--mixing", fractals, "--out", out, *CLI_CONFIG, "--workers", "2")
    assert np.array_equal(_images(out), _images(shards))
    assert assets.open_asset(out).attrs["complete"]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_killed_run_leaves_no_worker_process_holding_its_lock(shards, fractals, tmp):
    out = tmp / "orphans.zarr"
    proc = _started(fractals, out, workers=2)
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(workers) == 2 and done_units(out) < 120, "the kill should land while the workers run"
    deadline = time.monotonic() + 10
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(map(_alive, workers)), "the workers outlived the killed run"
    pixgen("augment", "--mixing", fractals, "--out", out, *CLI_CONFIG, "--workers", "2")  # the lock is free
    assert np.array_equal(_images(out), _images(shards))


def _mixing_like(path: Path, shape, dtype="uint8", finish=True) -> Path:
    assets.save_arrays(path, "fractals", {"shape": list(shape), "dtype": dtype}, {"images": np.zeros(shape, dtype)})
    if not finish:
        zarr.open_group(str(path), mode="r+").attrs["complete"] = False
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _mixing_like(p, (8, 32, 32)), "must be (N, 28, 28) uint8"),
        (lambda p: _mixing_like(p, (8, 28, 28), "float32"), "must be (N, 28, 28) uint8"),
        (lambda p: _mixing_like(p, (0, 28, 28)), "holds no mixing images"),
        (lambda p: _mixing_like(p, (8, 28, 28), finish=False), "incomplete"),
        (lambda p: p / "missing.zarr", "does not exist"),
    ],
    ids=["shape", "dtype", "empty", "incomplete", "missing"],
)
def test_bad_mixing_asset_is_one_line_error(tmp_path, make, message):
    mixing = make(tmp_path / "mixing.zarr")
    result = CliRunner().invoke(cli, ["augment", "--mixing", str(mixing), "--out", str(tmp_path / "never.zarr")])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
    assert not (tmp_path / "never.zarr").exists()


def test_unreachable_scheduler_is_one_line_error_fast(fractals, tmp):
    start = time.monotonic()
    proc = pixgen("augment", "--mixing", fractals, "--out", tmp / "never.zarr", "--scheduler", "tcp://127.0.0.1:1", check=False)
    assert proc.returncode != 0
    assert time.monotonic() - start < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach a Dask scheduler at tcp://127.0.0.1:1" in lines[0], proc.stderr


def test_rerun_is_a_no_op_and_another_config_needs_force(shards, fractals):
    before = (shards / "zarr.json").stat().st_mtime_ns
    augment.run(CONFIG, [fractals], shards)
    assert (shards / "zarr.json").stat().st_mtime_ns == before
    result = CliRunner().invoke(cli, ["augment", "--mixing", str(fractals), "--out", str(shards), "--epochs", "1"])
    assert result.exit_code != 0 and "--force" in result.output


def test_preview_pairs_digits_with_their_pixmix(shards, tmp):
    png = augment.save_preview(shards, tmp / "preview.png", count=32, ncol=16)
    picture = np.asarray(Image.open(png))
    assert picture.shape == ((4 * 29 + 1) * 3, (16 * 29 + 1) * 3)


def test_reader_yields_every_sample_once_shuffled_across_chunks(shards):
    group = assets.open_asset(shards)
    shard_images, labels = group["images"][:], group["labels"][:]
    row_of = {img.tobytes(): i for i, img in enumerate(shard_images[1])}
    batches = list(data.shard_batches(shards, epoch=1, batch_size=64, seed=5))
    assert all(x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28) for x, _ in batches)
    assert all(len(y) == 64 for _, y in batches[:-1])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches]).numpy()
    assert 0 <= x.min() and x.max() <= 1
    rows = [row_of[img.tobytes()] for img in (x[:, 0] * 255).round().to(torch.uint8).numpy()]
    assert sorted(rows) == list(range(600)), "every sample of shard epoch 1 exactly once"
    assert np.array_equal(y, labels[rows])
    first = rows[:64]
    assert len({r // CONFIG.chunk for r in first}) > 3, "a batch mixes several chunks"
    again = torch.cat([b[1] for b in data.shard_batches(shards, epoch=1, batch_size=64, seed=5)]).numpy()
    assert np.array_equal(again, y), "same (seed, epoch), same order"
    wrapped = torch.cat([b[0] for b in data.shard_batches(shards, epoch=3, batch_size=64, seed=5)])
    assert not torch.equal(wrapped, x) and torch.allclose(wrapped.sum(0), x.sum(0)), "epoch 3 rereads shard epoch 1, reshuffled"
