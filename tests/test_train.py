"""Standard training: it learns, it resumes a killed run bit for bit, it refuses what it should."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import pixgen
from pixgen import PixgenError, methods, train

SMALL = ["--train-size", "4000", "--val-size", "1000", "--batch-size", "32"]


def test_loss_decreases_and_one_short_epoch_reaches_90_percent(tmp_path):
    config = methods.TrainConfig(epochs=2, batch_size=32, train_size=5000, val_size=1000)
    out = train.run(config, tmp_path / "model")
    meta = json.loads((out / "meta.json").read_text())
    first, second = meta["history"]
    assert first["loss"] < math.log(10)  # below an untrained network's loss
    assert second["loss"] < first["loss"]
    assert first["val_accuracy"] > 0.9
    assert meta["complete"] and meta["val_accuracy"] == second["val_accuracy"]
    assert (meta["train_count"], meta["val_count"]) == (5000, 1000)
    assert not (out / train.CHECKPOINT).exists()


def _weights(folder):
    return torch.load(folder / "state_dict.pt", weights_only=True)


def _kill_after_first_epoch(args):
    proc = subprocess.Popen([sys.executable, "-m", "pixgen", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = args[args.index("--out") + 1] / train.CHECKPOINT
    while not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    args = ["train", "--epochs", "3", "--seed", "3", *SMALL]
    _kill_after_first_epoch([*args, "--out", killed])
    meta = json.loads((killed / "meta.json").read_text())
    assert not meta["complete"] and meta["epochs_done"] < 3, "the run ended before it was killed"

    assert "resuming" in pixgen(*args, "--out", killed).stderr
    pixgen(*args, "--out", whole)  # same process setup as the killed run: same thread count
    a, b = _weights(killed), _weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    history = [json.loads((f / "meta.json").read_text())["history"] for f in (killed, whole)]
    assert strip(history[0]) == strip(history[1])


def test_finished_run_is_a_no_op_and_another_config_needs_force(tmp_path, capsys):
    out = tmp_path / "model"
    config = methods.TrainConfig(epochs=1, train_size=500, val_size=200)
    train.run(config, out)
    before = (out / "state_dict.pt").stat().st_mtime_ns
    train.run(config, out)
    assert "nothing to do" in capsys.readouterr().err
    assert (out / "state_dict.pt").stat().st_mtime_ns == before

    other = pixgen("train", "--epochs", "1", "--train-size", "500", "--val-size", "200", "--seed", "1", "--out", out, check=False)
    assert other.returncode == 1 and "--force" in other.stderr and "Traceback" not in other.stderr
    train.run(dataclasses.replace(config, seed=1), out, force=True)
    assert json.loads((out / "meta.json").read_text())["config"]["seed"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--arch", "resnet"], "Invalid value for '--arch'"),
        (["--epochs", "0"], "Invalid value for '--epochs'"),
        (["--train-size", "0"], "Invalid value for '--train-size'"),
    ],
)
def test_bad_options_are_one_clear_line(tmp_path, extra, message):
    proc = pixgen("train", "--out", tmp_path / "m", *extra, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_refuses_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PixgenError, match="not a pixgen model"):
        train.run(methods.TrainConfig(train_size=100), tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


_FAULTS = """
import resource, sys
import torch
import torch.nn.functional as F
from pixgen import data, dual, heap, models, train
if sys.argv[1] == "keep" and not heap.keep_freed_memory():
    sys.exit("mallopt refused")
torch.set_num_threads(1)
torch.manual_seed(0)
images, labels = data.load("mnist", "train")
x, y = train.to_tensors(images[:416], labels[:416], torch.device("cpu"))
model = models.build("wk-small")
optimizer = torch.optim.Adam(model.parameters(), lr=1.5e-3)
def steps(batches):
    for b in batches:
        xs, ys = x[b * 32 : (b + 1) * 32], y[b * 32 : (b + 1) * 32]
        loss = F.cross_entropy(dual.bounds(model, xs, ys, 0.1, 10), ys)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
batches = list(range(13)) * 2
steps(batches)  # until the heap has grown to the steps' peak
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(batches)  # by default some steps fault thousands of pages and some none: 5 steps averaged 113–6,234
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / len(batches))
"""


def test_keeping_freed_memory_spares_a_dual_step_its_page_faults():
    """`heap.keep_freed_memory`: dual training steps on MNIST digits reuse the memory they free
    instead of faulting fresh pages in at every step."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
    runs = {how: subprocess.run([sys.executable, "-c", _FAULTS, how], capture_output=True, text=True, env=env) for how in ("default", "keep")}
    if "mallopt refused" in runs["keep"].stderr:
        pytest.skip("this C library has no mallopt or refuses its settings")
    per_step = {how: float(run.stdout) for how, run in runs.items()}
    assert per_step["default"] > 100, per_step  # 26-step means of 812–8,680 in 12 runs here
    assert per_step["keep"] < per_step["default"] / 10, per_step  # 0.23–6.6 in 4 runs


def test_the_training_loop_keeps_freed_memory(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train.heap, "keep_freed_memory", lambda: calls.append(1))
    train.run(methods.TrainConfig(epochs=1, batch_size=50, train_size=100, val_size=100), tmp_path / "model")
    assert calls == [1]
