"""Training: one loop for every method (pixgen.methods: how a method turns a batch into a loss).

Methods that need randomness draw it from torch's global RNG, whose state is checkpointed, so a
resumed run draws what an uninterrupted one would.

Batches come from `mnist_batches` (a seeded permutation per epoch); a method that reads batches
elsewhere (PixMix shards) passes another `batches(epoch)` to `fit`.

The model asset is a folder (see models.py). While training it also holds `checkpoint.pt`
(weights, optimizer, finished epochs, history, RNG state), replaced atomically after every epoch
and removed once the final weights and `complete: true` are written.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import PixgenError, assets, data, heap, models, progress
from .config import config_hash, to_dict
from .methods import METHODS, Step, TrainConfig

CHECKPOINT = "checkpoint.pt"
SUBSET_SEED = 0  # the --train-size/--val-size subsets are fixed, whatever the training seed


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """One cycle: linear warm-up to `lr`, then cosine decay to 0; a pure function of the step so
    that resuming needs no scheduler state."""
    warm = max(1, round(config.warmup * total))
    if step < warm:
        return config.lr * (step + 1) / warm
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def mnist_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, epoch: int) -> Iterator:
    """Shuffled batches; the order depends only on (seed, epoch), so a resumed epoch repeats it."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    order = order.to(images.device)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield images[index], labels[index]


def to_tensors(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)
    return x.to(device), torch.tensor(labels, dtype=torch.int64, device=device)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum()) for i in range(0, len(labels), batch_size))
    return correct / len(labels)


def load_split(split: str, size: int | None, data_root, dataset: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    images, labels = data.load(dataset, split, data_root)
    index = data.balanced_subset(labels, size, SUBSET_SEED)
    return images[index], labels[index]


def _prepare_folder(out: Path, identity: dict, force: bool) -> str:
    """'fresh', 'resume' or 'done' for the folder `out`, replacing it only with `force`."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "fresh"
    meta = models.read_meta(out)  # raises for a folder that is not a pixgen model
    if all(meta.get(k) == v for k, v in identity.items()):
        return "done" if meta.get("complete") else "resume"
    if not force:
        raise PixgenError(
            f"{out} holds a model trained with another config or data (hash {meta.get('config_hash')}, "
            f"now {identity['config_hash']}); pass --force to replace it or choose another --out"
        )
    return "fresh"  # assets.install replaces it once the new folder exists


def _save_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, history: list) -> None:
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    assets.fault("checkpoint")
    os.replace(tmp, out / CHECKPOINT)


def _load_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list]:
    path = out / CHECKPOINT
    if not path.is_file():  # killed before its first epoch ended
        return 0, []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise PixgenError(f"{path} is damaged ({type(exc).__name__}); rerun with --force to train from scratch, or remove it") from None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["epoch"], state["history"]


def train_epoch(model, optimizer, batches, config: TrainConfig, epoch: int, steps_per_epoch: int) -> dict:
    model.train()
    total = steps_per_epoch * config.epochs
    loss_sum = correct = seen = 0
    start = time.perf_counter()
    for i, (images, labels) in enumerate(progress.bar(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch")):
        index = epoch * steps_per_epoch + i
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, index, total)
        loss, logits = METHODS[config.method].loss(model, images, labels, Step(config, epoch, index, total))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((logits.detach().argmax(1) == labels).sum())
        seen += len(labels)
    return {"epoch": epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen, "seconds": time.perf_counter() - start}


def fit(
    model: nn.Module,
    out: Path,
    config: TrainConfig,
    meta: dict,
    batches: Callable[[int], Iterator],
    steps_per_epoch: int,
    val: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Train from the last finished epoch in `out` to the end, checkpointing after every epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    first, history = _load_checkpoint(out, model, optimizer)
    if first:
        log(f"resuming {out} after epoch {first}/{config.epochs}")
    for epoch in range(first, config.epochs):
        record = train_epoch(model, optimizer, batches(epoch), config, epoch, steps_per_epoch)
        record["val_accuracy"] = accuracy(model, *val)
        extra = METHODS[config.method].epoch_metrics(model, val, config)
        record.update(extra)
        history.append(record)
        shown = "".join(f", {k} {v:.4f}" for k, v in extra.items() if isinstance(v, float))
        log(f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f}, train {record['train_accuracy']:.4f}, validation {record['val_accuracy']:.4f}{shown}, {record['seconds']:.1f} s")
        _save_checkpoint(out, model, optimizer, epoch + 1, history)
        models.save(out, model, {**meta, "epochs_done": epoch + 1, "history": history, "complete": False})
    final = METHODS[config.method].final_metrics(model, val, config)
    if final:
        log(f"{config.method}: {final}")
    models.save(out, model, {**meta, "epochs_done": config.epochs, "history": history, "val_accuracy": history[-1]["val_accuracy"], **final, "complete": True})
    (out / CHECKPOINT).unlink(missing_ok=True)


def run(config: TrainConfig, out: str | Path, data_root=None, force: bool = False, shards=None) -> Path:
    """Train `config` into the model folder `out` (resuming it, or doing nothing if it is done).
    Method pixmix trains on the PixMix `shards` asset (from pixgen augment) of the training digits."""
    if METHODS[config.method].reads_shards != (shards is not None):
        raise PixgenError("method pixmix needs --shards PATH (a pixgen augment asset), and only pixmix reads shards")
    out = Path(out)
    train_images, train_labels = load_split("train", config.train_size, data_root, config.dataset)
    val_images, val_labels = load_split("validation", config.val_size, data_root, config.dataset)
    identity = {
        "config_hash": config_hash(config),
        "data": {"train": data.identity(train_images, train_labels), "validation": data.identity(val_images, val_labels)},
    }
    if shards is not None:
        identity["shards"] = data.open_shards(shards, config.dataset, identity["data"]["train"], len(train_labels))
    try:
        with assets.lock(out):
            assets.recover(out)
            return _train(config, out, identity, force, (train_images, train_labels), (val_images, val_labels), shards)
    except OSError as exc:
        if exc.errno is None:
            raise
        raise PixgenError(f"cannot write {exc.filename or out}: {exc.strerror}; choose a writable --out with free space") from None


def _train(config: TrainConfig, out: Path, identity: dict, force: bool, train_split, val_split, shards) -> Path:
    state = _prepare_folder(out, identity, force)
    if state == "done":
        log(f"{out} is already trained with this config; nothing to do")
        return out
    (train_images, train_labels), (val_images, val_labels) = train_split, val_split
    dev = models.device()
    torch.manual_seed(config.seed)
    model = models.build(config.arch, config.dataset, config.normalize).to(dev)
    meta = {
        "arch": config.arch,
        "dataset": config.dataset,
        "normalize": config.normalize,  # models.load rebuilds the network's first layer from it
        "method": config.method,
        "config": to_dict(config),
        **identity,
        "train_count": len(train_labels),
        "val_count": len(val_labels),
        "device": str(dev),
        "eps": config.eps,
    }
    if state == "fresh":  # the folder appears whole, with its untrained weights and meta.json
        models.save(assets.staging(out), model, {**meta, "epochs_done": 0, "history": [], "complete": False})
        assets.fault("layout")
        assets.install(out)
    heap.keep_freed_memory()
    x, y = to_tensors(train_images, train_labels, dev)
    steps = math.ceil(len(y) / config.batch_size)
    if shards is None:
        batches = lambda epoch: mnist_batches(x, y, config.batch_size, config.seed, epoch)  # noqa: E731
    else:
        batches = data.shard_epochs(shards, config.epochs, config.batch_size, config.seed, dev, log)
    with models.deterministic(dev):
        fit(model, out, config, meta, batches, steps, to_tensors(val_images, val_labels, dev))
    return out
