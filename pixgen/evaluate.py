"""The evaluation suite: every safety axis of the PixMix paper for each model, with and without DENT.

`run(config, model_dirs, out, defense, mnist_c, data_root)` writes one JSON per model,
`<out>/<model folder name>.json` (schema in docs/commands.md, "pixgen evaluate"). The adversarial suites
loop uniformly over (ε × batch × defence × threat): a threat is (what is attacked, what is then
evaluated), all attacks built and called the torchattacks way (pixgen.attacks):

    none:  standard = attack the static network, evaluate it
    dent:  standard = attack DENT (gradients of its final prediction only), evaluate DENT
           transfer = attack the static network, evaluate DENT on those images
           adaptive = attack DENT through its unrolled adaptation, evaluate DENT
           worst    = per sample: correct only if correct under every threat above

Every other suite evaluates the defended network on fixed inputs, batch by batch in the order
given (DENT adapts to each batch, so its predictions depend on the batches; the batch size is
part of the config).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import PixgenError, __version__, assets, attacks, bounds, data, metrics, models
from .config import config_hash, to_dict
from .corruptions import AFFINE
from .dent import Dent, DentConfig
from .progress import bar

SUITES = ("clean", "fgsm", "pgd", "corruptions", "calibration", "ood", "consistency", "certify")
DEFENSES = ("none", "dent")
SUBSET_SEED = 0  # the same --test-size digits as pixgen train's test subset


def _grid(stop: float, step: float) -> tuple[float, ...]:
    return tuple(round(step * i, 6) for i in range(round(stop / step) + 1))


@dataclass(frozen=True)
class EvalConfig:
    """suites: which parts to run (corruptions needs an MNIST-C asset; certify applies to dual
    networks only); autoattack_eps: also run AutoAttack at this ε (None: not at all);
    test_size: a fixed class-balanced subset of the MNIST test split (None: all 10,000), also
    the size of each OOD set; certify_size: the first this many of those digits get the (slow)
    exact certificate; max_shift: the consistency suite's largest translation in pixels."""

    suites: tuple[str, ...] = SUITES
    fgsm_eps: tuple[float, ...] = _grid(0.5, 0.02)
    pgd_eps: tuple[float, ...] = _grid(0.5, 0.1)
    autoattack_eps: float | None = None
    test_size: int | None = None
    batch_size: int = 250
    seed: int = 0
    dent: DentConfig = field(default_factory=DentConfig)
    max_shift: int = 2
    certify_size: int = 1000

    def __post_init__(self):
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown or not self.suites:
            raise PixgenError(f"unknown suite {', '.join(unknown) or '(none given)'}; choose from {', '.join(SUITES)}")
        budgets = [*self.fgsm_eps, *self.pgd_eps, *([self.autoattack_eps] if self.autoattack_eps is not None else [])]
        if any(not e >= 0 for e in budgets):
            raise PixgenError(f"attack budgets ε must be ≥ 0, got {min(budgets)}")
        for name in ("batch_size", "certify_size", "max_shift"):
            if getattr(self, name) < 1:
                raise PixgenError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.test_size is not None and self.test_size < 1:
            raise PixgenError(f"test size must be at least 1, got {self.test_size}")


# ---------------------------------------------------------------- predictions


def to_tensor(images: np.ndarray, device) -> torch.Tensor:
    """uint8 (N, 28, 28) or float (N, 1, 28, 28) in [0, 1] → float32 (N, 1, 28, 28) on device."""
    x = torch.tensor(np.asarray(images))  # a copy: dataset arrays are read-only
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    return (x.unsqueeze(1) if x.dim() == 3 else x).to(device)


def batches(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def probabilities(model: nn.Module, images, batch_size: int, device) -> np.ndarray:
    """Softmax probabilities (N, 10), batch by batch in order."""
    x = to_tensor(images, device)
    return np.concatenate([model(x[s]).softmax(1).cpu().numpy() for s in batches(len(x), batch_size)])


# ---------------------------------------------------------------- defences and threats


def defenses(static: nn.Module, names: list[str], dent_config: DentConfig) -> dict[str, dict]:
    """Per defence: the network that predicts and its threats {name: (attacked, evaluated)}."""
    out = {}
    if "none" in names:
        out["none"] = {"model": static, "threats": {"standard": (static, static)}}
    if "dent" in names:
        dent = Dent(static, dent_config).eval()
        adaptive = Dent(static, dent_config, differentiable=True).eval()
        out["dent"] = {"model": dent, "threats": {"standard": (dent, dent), "transfer": (static, dent), "adaptive": (adaptive, dent)}}
    return out


def adversarial_accuracy(defs: dict, attack: str, eps_list, x: torch.Tensor, y: torch.Tensor, config: EvalConfig, progress) -> dict:
    """{defence: {"eps": [...], threat: [accuracy per ε], ..., "worst": [...]}}."""
    correct = {d: {t: np.zeros((len(eps_list), len(y)), bool) for t in spec["threats"]} for d, spec in defs.items()}
    for i, eps in enumerate(eps_list):
        for b, s in enumerate(batches(len(y), config.batch_size)):
            made = {}  # adversarial images by attacked network: transfer reuses the static ones
            for d, spec in defs.items():
                for threat, (attacked, evaluated) in spec["threats"].items():
                    if id(attacked) not in made:
                        made[id(attacked)] = perturb(attacked, attack, eps, x[s], y[s], config.seed, b)
                    with torch.no_grad():
                        correct[d][threat][i, s] = (evaluated(made[id(attacked)]).argmax(1) == y[s]).cpu().numpy()
            progress.update(1)
    result = {}
    for d, by_threat in correct.items():
        worst = np.logical_and.reduce(list(by_threat.values()))
        entry = {"eps": list(eps_list)}
        entry.update({t: c.mean(axis=1).tolist() for t, c in by_threat.items()})
        entry["worst"] = worst.mean(axis=1).tolist()
        result[d] = entry
    return result


def perturb(model: nn.Module, attack: str, eps: float, x, y, seed: int, batch: int = 0) -> torch.Tensor:
    """Adversarial images, their randomness keyed by (seed, attack, ε, batch)."""
    return attacks.build(attack, model, eps, seed=seed, batch=batch)(x, y)


# ---------------------------------------------------------------- the other suites


def ood_sets(n: int, seed: int, data_root, dataset: str = "mnist") -> dict[str, np.ndarray]:
    """Out-of-distribution inputs, n each: the dataset's natural OOD set (MNIST's is Fashion-MNIST
    and the other way round; a fixed class-balanced subset of its test split), uniform noise
    U(0, 1) and Gaussian noise N(0.5, 0.5²) clipped to [0, 1] (float pixels, seeded)."""
    spec = data.spec(dataset)
    natural, labels = data.load(spec.ood, "test", data_root)
    uniform = np.random.default_rng(np.random.SeedSequence([seed, 1])).random((n, *spec.shape[1:]), dtype=np.float32)
    gaussian = np.random.default_rng(np.random.SeedSequence([seed, 2])).normal(0.5, 0.5, (n, *spec.shape[1:])).astype(np.float32)
    return {
        spec.ood: natural[data.balanced_subset(labels, n, SUBSET_SEED)],
        "uniform": uniform[:, None],
        "gaussian": np.clip(gaussian, 0, 1)[:, None],
    }


def corruption_accuracy(model, path, config: EvalConfig, device, data_root, dataset: str) -> dict:
    group = assets.open_asset(path, stage="corrupt")
    made_from = group.attrs["config"].get("dataset", "mnist")
    if made_from != dataset:
        raise PixgenError(f"{path} corrupts {made_from} images, but the model was trained on {dataset}; pass a `pixgen corrupt --dataset {dataset}` asset")
    names = list(group.attrs["corruptions"])
    images, labels, indices = group["images"], group["labels"][:], group["indices"][:]
    clean, _ = data.load(dataset, "test", data_root)
    per = {name: metrics.accuracy(probabilities(model, images[c], config.batch_size, device), labels) for c, name in enumerate(names)}
    kept = [name for name in names if name not in AFFINE]
    return {
        "count": int(len(labels)),
        "identity_accuracy": metrics.accuracy(probabilities(model, clean[indices], config.batch_size, device), labels),
        "accuracy": per,
        "mean": float(np.mean(list(per.values()))),
        "mean_without_affine": float(np.mean([per[n] for n in kept])) if kept else None,
    }


def translation_consistency(model, images: np.ndarray, config: EvalConfig, device) -> dict:
    """Consistency: the fraction of (digit, axis) pairs whose predicted class is the same at every
    shift −max_shift … +max_shift px along that axis (zero fill); flip rate: the probability that
    the prediction changes between consecutive shifts."""
    frames = metrics.translation_sequences(images, config.max_shift)
    classes = np.stack([[probabilities(model, f, config.batch_size, device).argmax(1) for f in seq] for seq in frames])
    return {"max_shift": config.max_shift, "consistency": metrics.consistency(classes), "flip_rate": metrics.flip_rate(classes)}


def certified_accuracy(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """Fraction of digits whose every L∞ perturbation of size eps (inside [0, 1]) keeps the label,
    by Wong & Kolter's exact dual bound."""
    return int(bounds.dual_certified(model, x, y, eps).sum()) / len(y)


def training_eps(meta: dict) -> float:
    """The ε a robust network was trained for: in its metadata, or in its training config."""
    eps = meta.get("eps", meta.get("config", {}).get("eps"))
    if eps is None:
        raise PixgenError(f"dual model {meta.get('arch')} records no training ε in its meta.json; retrain it with pixgen train")
    return float(eps)


# ---------------------------------------------------------------- one model


def evaluate_model(folder, config: EvalConfig, defense_names: list[str], mnist_c, data_root, device) -> dict:
    start = time.perf_counter()
    static, meta = models.load(folder, map_location=device)
    static.requires_grad_(False)
    dataset = meta.get("dataset", "mnist")
    images, labels = data.load(dataset, "test", data_root)
    index = data.balanced_subset(labels, config.test_size, SUBSET_SEED)
    images, labels = images[index], labels[index]
    x, y = to_tensor(images, device), torch.as_tensor(labels, device=device)
    defs = defenses(static, defense_names, config.dent)
    suites = config.suites
    eps_lists = {"fgsm": config.fgsm_eps, "pgd": config.pgd_eps, "autoattack": (config.autoattack_eps,)}
    adversarial = [a for a in ("fgsm", "pgd") if a in suites] + (["autoattack"] if config.autoattack_eps is not None else [])
    units = sum(len(eps_lists[a]) for a in adversarial) * len(batches(len(y), config.batch_size))
    results = {d: {} for d in defs}
    with bar(total=units, desc=f"evaluate {Path(folder).name}", unit="batch") as progress:
        for attack in adversarial:
            for d, entry in adversarial_accuracy(defs, attack, eps_lists[attack], x, y, config, progress).items():
                results[d][attack] = entry
    for d, spec in defs.items():
        model, out = spec["model"], results[d]
        if {"clean", "calibration", "ood"} & set(suites):
            clean = probabilities(model, images, config.batch_size, device)
        if "clean" in suites:
            out["clean"] = {"accuracy": metrics.accuracy(clean, labels)}
        if "calibration" in suites:
            out["calibration"] = {
                "rms": metrics.rms_calibration_error(clean, labels),
                "ece": metrics.expected_calibration_error(clean, labels),
                "bins": metrics.reliability_bins(clean, labels),
            }
        if "ood" in suites:
            sets = ood_sets(len(labels), config.seed, data_root, dataset)
            out["ood"] = {name: metrics.anomaly_detection(clean, probabilities(model, s, config.batch_size, device)) for name, s in sets.items()}
        if "consistency" in suites:
            out["consistency"] = translation_consistency(model, images, config, device)
        if "corruptions" in suites:
            out["corruptions"] = corruption_accuracy(model, mnist_c, config, device, data_root, dataset)
        if "certify" in suites and d == "none" and meta.get("method") == "dual":
            n = min(config.certify_size, len(y))
            eps = training_eps(meta)
            out["certify"] = {"eps": eps, "count": n, "accuracy": certified_accuracy(static, x[:n], y[:n], eps)}
    return {
        "pixgen_version": __version__,
        "stage": "evaluate",
        "model": {"path": str(folder), "arch": meta["arch"], "method": meta.get("method"), "config_hash": meta.get("config_hash"), "weights_hash": models.weights_hash(static)},
        "config": to_dict(config),
        "config_hash": config_hash(config),
        "data": {"dataset": dataset, "test_count": int(len(labels)), "test_identity": data.identity(images, labels), "mnist_c": str(mnist_c) if mnist_c else None},
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 2),
        "defenses": results,
    }


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def run(config: EvalConfig, model_dirs, out, defense: str = "none", mnist_c=None, data_root=None) -> list[Path]:
    """Evaluate each model folder; write <out>/<folder name>.json for each; return the paths."""
    names = {"none": ["none"], "dent": ["dent"], "both": ["none", "dent"]}.get(defense)
    if names is None:
        raise PixgenError(f"unknown defense {defense!r}; choose none, dent or both")
    if "corruptions" in config.suites and mnist_c is None:
        raise PixgenError("the corruptions suite needs an MNIST-C asset: pass --mnist-c PATH (make one with pixgen corrupt)")
    if mnist_c is not None:
        assets.open_asset(mnist_c, stage="corrupt")  # fail before the long work, not after
    folders = [Path(f) for f in model_dirs]
    if not folders:
        raise PixgenError("give at least one --model folder")
    stems = [f.resolve().name for f in folders]
    if len(set(stems)) != len(stems):
        raise PixgenError(f"model folders must have distinct names (each gives <out>/<name>.json), got {', '.join(stems)}")
    for folder in folders:
        models.read_meta(folder)  # every folder is checked before any is evaluated
    device = models.device()
    written = []
    for folder, stem in zip(folders, stems):
        path = Path(out) / f"{stem}.json"
        write_json(path, evaluate_model(folder, config, names, mnist_c, data_root, device))
        written.append(path)
    return written
