"""The evaluation stage: one asset per network, every safety axis of the PixMix paper, each
defence (none, DENT), with per-digit outcomes stored so that worst cases, paired tests and
certified-against-attacked checks are computed per digit, never from means.

The asset is a Zarr group (pixgen.assets) whose units are tasks: a plain suite under one defence
(`<defence>/clean`, …) or one attack suite under one defence (`<defence>/pgd`, …). Each unit
writes per-digit arrays (predicted probabilities, correct-or-not per threat and ε); when every unit
is in, the summary (accuracies with 95% Wilson intervals, calibration, detection, sanity warnings)
is computed from those arrays into the group's attributes (`results`, in the same layout for every
network), which is all the report reads.

Suites (`SUITES`, by name): clean, calibration, ood, consistency, corruptions (digits of the
test subset: all of the test split by default), fgsm, pgd, autoattack (a fixed class-balanced
attack subset: 1,000 digits by default), certify (dual networks: the exact dual bound).

Threats: an attack suite under defence `none` attacks the static network ("standard"). Under a
DENT defence (pixgen.dent.DEFENSES) each attack is run three ways: "standard" (the attack sees
DENT's final prediction, adaptation detached: the DENT paper's evaluation), "transfer" (the static
network's adversarial digits shown to DENT) and, for pgd, the attacks that use DENT's internals
(pixgen.adaptive: "adaptive" PGD through the unrolled adaptation with CE and DLR, the
"fixed-point" attack, and "eot" over batch composition). "worst" is the per-digit AND over the
threats: DENT's number. DENT sees the attack digits in batches of its own batch size, in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import PixgenError, adaptive, assets, attacks, bounds, data, metrics, models
from .corruptions import AFFINE
from .dent import DEFENSES as DENT_DEFENSES
from .dent import Dent, DentConfig

SUBSET_SEED = 0  # the same --test-size digits as pixgen train's test subset
ATTACK_SIZE = 1000  # attack digits by default: ±3.1 points at 50%, and AutoAttack affordable on a CPU
EXAMPLES = 12  # attack digits whose adversarial versions (static network) are kept for the report


def grid(stop: float, step: float) -> tuple[float, ...]:
    return tuple(round(step * i, 6) for i in range(round(stop / step) + 1))


PLAIN = ("clean", "calibration", "ood", "consistency", "corruptions", "certify")
ATTACK_SUITES = ("fgsm", "pgd", "autoattack")
SUITES = PLAIN + ATTACK_SUITES


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation computes; its hash (defences included) is the asset's identity.

    test_size: digits of the plain suites, a fixed class-balanced subset of the test split (None:
    all); attack_size: the attack digits, a fixed class-balanced subset of those (None: ATTACK_SIZE,
    or all of them if fewer); certify_size: the first this many attack digits get the exact
    certificate (dual networks only)."""

    suites: tuple[str, ...] = ("clean", "calibration", "ood", "consistency", "corruptions", "fgsm", "pgd", "certify")
    defenses: tuple[str, ...] = ("none",)
    fgsm_eps: tuple[float, ...] = grid(0.5, 0.02)
    pgd_eps: tuple[float, ...] = grid(0.5, 0.1)
    pgd_restarts: int = 5
    autoattack_eps: tuple[float, ...] = ()
    test_size: int | None = None
    attack_size: int | None = None
    batch_size: int = 250  # the static network's batches; DENT uses its own
    seed: int = 0
    dent: DentConfig = field(default_factory=DentConfig)
    adaptive_steps: int = 20  # steps of each attack on DENT's internals
    max_shift: int = 2
    certify_size: int = 1000

    def __post_init__(self):
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown or not self.suites:
            raise PixgenError(f"unknown suite {', '.join(unknown) or '(none given)'}; choose from {', '.join(SUITES)}")
        known = ("none", *DENT_DEFENSES)
        if not self.defenses or any(d not in known for d in self.defenses) or len(set(self.defenses)) != len(self.defenses):
            raise PixgenError(f"defences must be distinct names from {', '.join(known)}, got {', '.join(self.defenses) or '(none)'}")
        for name in ("fgsm_eps", "pgd_eps", "autoattack_eps"):
            grid_ = getattr(self, name)
            if any(not 0 <= e <= 1 for e in grid_) or list(grid_) != sorted(set(grid_)):
                raise PixgenError(f"--{name.replace('_', '-')} must be increasing budgets in [0, 1] (pixel units), got {', '.join(map(str, grid_)) or '(none)'}")
            if not grid_ and name.split("_")[0] in self.suites:
                raise PixgenError(f"the {name.split('_')[0]} suite needs at least one ε (--{name.replace('_', '-')})")
        for name in ("batch_size", "certify_size", "max_shift", "pgd_restarts", "adaptive_steps"):
            if getattr(self, name) < 1:
                raise PixgenError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("test_size", "attack_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PixgenError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def eps(self, suite: str) -> tuple[float, ...]:
        return getattr(self, f"{suite}_eps")


# ---------------------------------------------------------------- predictions


def to_tensor(images: np.ndarray, device) -> torch.Tensor:
    """uint8 (N, H, W) or float (N, C, H, W) in [0, 1] → float32 (N, C, H, W) on device."""
    x = torch.tensor(np.asarray(images))  # a copy: dataset arrays are read-only
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    return (x.unsqueeze(1) if x.dim() == 3 else x).to(device)


@torch.no_grad()
def probabilities(model: nn.Module, images, batch_size: int, device) -> np.ndarray:
    """Softmax probabilities (N, K), batch by batch in order (DENT adapts to each batch)."""
    x = to_tensor(images, device)
    size = model.config.batch_size if isinstance(model, Dent) else batch_size
    return np.concatenate([model(x[i : i + size]).softmax(1).cpu().numpy() for i in range(0, len(x), size)])


# ---------------------------------------------------------------- the evaluation


@dataclass
class Setup:
    """Everything the units share: the networks, the digits, the other inputs."""

    config: EvalConfig
    static: nn.Module
    meta: dict
    networks: dict[str, nn.Module]  # defence → the network that predicts
    dataset: str
    test: tuple[np.ndarray, np.ndarray, np.ndarray]  # images, labels, indices into the test split
    attack: tuple[torch.Tensor, torch.Tensor, np.ndarray]  # x, y, indices into the test split
    corrupt: str | None
    data_root: object
    device: torch.device

    def batches(self, defence: str) -> list[slice]:
        size = self.networks[defence].config.batch_size if defence != "none" else self.config.batch_size
        n = len(self.attack[1])
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def threats(setup: Setup, defence: str, suite: str) -> dict[str, Callable]:
    """{threat: make(x, y, eps, batch) -> adversarial x} for one defence and attack suite."""
    static, seed = setup.static, setup.config.seed

    def on(model, **params):
        return lambda x, y, eps, batch: attacks.build(suite, model, eps, seed=seed, batch=batch, **params)(x, y)

    params = {"restarts": setup.config.pgd_restarts} if suite == "pgd" else {}
    if defence == "none":
        return {"standard": on(static, **params)}
    dent = setup.networks[defence]
    out = {"standard": on(dent, **params), "transfer": on(static, **params)}
    if suite == "pgd":
        steps = setup.config.adaptive_steps
        out["adaptive"] = lambda x, y, eps, b: adaptive.adaptive_pgd(dent, x, y, eps, attacks.stream_seed(seed, "adaptive", eps, b), steps=steps, restarts=setup.config.pgd_restarts)
        out["fixed-point"] = lambda x, y, eps, b: adaptive.fixed_point(dent, x, y, eps, attacks.stream_seed(seed, "fixed-point", eps, b), steps=steps)
        # The clean batch-mates EOT places each adversarial digit among: the plain suites' digits.
        pool = to_tensor(setup.test[0], setup.device)
        out["eot"] = lambda x, y, eps, b: adaptive.eot_batches(dent, x, y, eps, attacks.stream_seed(seed, "eot", eps, b), pool=pool, steps=steps)
    return out


def attack_unit(setup: Setup, defence: str, suite: str) -> assets.Writes:
    """Per threat, (E, M) correct-or-not of the attack digits; under `none` also the adversarial
    versions of the first EXAMPLES digits, for the report."""
    x, y, _ = setup.attack
    eps_list = setup.config.eps(suite)
    network = setup.networks[defence]
    made = threats(setup, defence, suite)
    correct = {t: np.zeros((len(eps_list), len(y)), bool) for t in made}
    shown = min(EXAMPLES, len(y))
    examples = np.zeros((len(eps_list), shown, *x.shape[2:]), np.uint8)
    predicted = np.zeros((len(eps_list), shown), np.int16)
    for i, eps in enumerate(eps_list):
        for b, s in enumerate(setup.batches(defence)):
            for threat, make in made.items():
                adversarial = make(x[s], y[s], eps, b) if eps > 0 else x[s]
                with torch.no_grad():
                    guess = network(adversarial).argmax(1)
                correct[threat][i, s] = (guess == y[s]).cpu().numpy()
                if defence == "none" and s.start < shown:
                    k = min(shown, s.stop) - s.start
                    examples[i, s.start : s.start + k] = (adversarial[:k, 0] * 255).round().byte().cpu().numpy()
                    predicted[i, s.start : s.start + k] = guess[:k].cpu().numpy()
    writes = {f"{defence}_{suite}_{t}": (slice(None), c) for t, c in correct.items()}
    if defence == "none":
        writes |= {f"examples_{suite}": (slice(None), examples), f"examples_{suite}_predicted": (slice(None), predicted)}
    return writes


def plain_unit(setup: Setup, defence: str, suite: str) -> assets.Writes:
    images, labels, _ = setup.test
    network, config = setup.networks[defence], setup.config
    if suite == "clean":
        return {f"{defence}_probs": (slice(None), probabilities(network, images, config.batch_size, setup.device))}
    if suite == "ood":
        sets = ood_sets(len(labels), config.seed, setup.data_root, setup.dataset)
        return {f"{defence}_ood_{name}": (slice(None), probabilities(network, s, config.batch_size, setup.device)) for name, s in sets.items()}
    if suite == "consistency":
        frames = metrics.translation_sequences(images, config.max_shift)
        classes = np.stack([[probabilities(network, f, config.batch_size, setup.device).argmax(1) for f in seq] for seq in frames])
        return {f"{defence}_shifted": (slice(None), classes.astype(np.int16))}
    if suite == "corruptions":
        group = assets.open_asset(setup.corrupt, stage="corrupt")
        clean, _ = data.load(setup.dataset, "test", setup.data_root)
        shown = [probabilities(network, assets.read(group, "images", c), config.batch_size, setup.device).argmax(1) for c in range(group["images"].shape[0])]
        identity = probabilities(network, clean[assets.read(group, "indices")], config.batch_size, setup.device).argmax(1)
        return {f"{defence}_corrupted": (slice(None), np.stack(shown).astype(np.int16)), f"{defence}_uncorrupted": (slice(None), identity.astype(np.int16))}
    if suite == "certify":
        x, y, _ = setup.attack
        n = min(config.certify_size, len(y))
        proved = bounds.dual_certified(setup.static, x[:n], y[:n], training_eps(setup.meta))
        return {"certified": (slice(None), proved.cpu().numpy())}
    raise AssertionError(suite)  # calibration has no unit: it is computed from clean's


def ood_sets(n: int, seed: int, data_root, dataset: str = "mnist") -> dict[str, np.ndarray]:
    """Out-of-distribution inputs, n each: the dataset's natural OOD set (MNIST's is Fashion-MNIST
    and the other way round; a fixed class-balanced subset of its test split), uniform noise
    U(0, 1) and Gaussian noise N(0.5, 0.5²) clipped to [0, 1] (float pixels, seeded)."""
    spec = data.spec(dataset)
    natural, labels = data.load(spec.ood, "test", data_root)
    uniform = np.random.default_rng(np.random.SeedSequence([seed, 1])).random((n, *spec.shape), dtype=np.float32)
    gaussian = np.random.default_rng(np.random.SeedSequence([seed, 2])).normal(0.5, 0.5, (n, *spec.shape)).astype(np.float32)
    return {spec.ood: natural[data.balanced_subset(labels, min(n, len(labels)), SUBSET_SEED)], "uniform": uniform, "gaussian": np.clip(gaussian, 0, 1)}


def training_eps(meta: dict) -> float:
    """The ε a robust network was trained for: in its metadata, or in its training config."""
    eps = meta.get("eps", meta.get("config", {}).get("eps"))
    if eps is None:
        raise PixgenError(f"model {meta.get('arch')} records no training ε in its meta.json, so it has no certificate to check; drop the certify suite or retrain it")
    return float(eps)


# ---------------------------------------------------------------- the summary


def interval(correct: np.ndarray) -> dict:
    """Accuracy of a (…, N) bool array with its 95% Wilson interval, over the last axis."""
    k, n = correct.sum(-1), correct.shape[-1]
    lo, hi = metrics.wilson_interval(k, n)
    return {"accuracy": (k / n).tolist(), "interval": np.stack([lo, hi], -1).tolist(), "count": int(n)}


def summary(group, setup_config: EvalConfig, tasks: list[tuple[str, str]], labels: np.ndarray, attack_labels: np.ndarray) -> dict:
    """The results of every task, computed from the stored per-digit arrays."""
    config = setup_config
    results: dict[str, dict] = {}
    for defence, suite in tasks:
        out = results.setdefault(defence, {})
        if suite in ATTACK_SUITES:
            names = [k for k in group.array_keys() if k.startswith(f"{defence}_{suite}_")]
            correct = {k.removeprefix(f"{defence}_{suite}_"): group[k][:] for k in sorted(names)}
            worst = np.logical_and.reduce(list(correct.values()))
            entry = {"eps": list(config.eps(suite))}
            for threat, c in {**correct, "worst": worst}.items():
                stats = interval(c)
                entry[threat], entry[f"{threat}_interval"] = stats["accuracy"], stats["interval"]
            entry["count"] = int(len(attack_labels))
            out[suite] = entry
        elif suite == "clean":
            probs = group[f"{defence}_probs"][:]
            stats = interval(probs.argmax(1) == labels)
            out["clean"] = {"accuracy": stats["accuracy"], "interval": stats["interval"], "count": stats["count"]}
            if "calibration" in config.suites:
                out["calibration"] = {
                    "rms": metrics.rms_calibration_error(probs, labels),
                    "ece": metrics.expected_calibration_error(probs, labels),
                    "bins": metrics.reliability_bins(probs, labels),
                    "count": int(len(labels)),
                }
        elif suite == "ood":
            clean = group[f"{defence}_probs"][:]
            sets = [k.removeprefix(f"{defence}_ood_") for k in group.array_keys() if k.startswith(f"{defence}_ood_")]
            out["ood"] = {name: metrics.anomaly_detection(clean, group[f"{defence}_ood_{name}"][:]) for name in sorted(sets)}
        elif suite == "consistency":
            classes = group[f"{defence}_shifted"][:]
            out["consistency"] = {"max_shift": config.max_shift, "consistency": metrics.consistency(classes), "flip_rate": metrics.flip_rate(classes)}
        elif suite == "corruptions":
            shown, names = group[f"{defence}_corrupted"][:], list(group.attrs["corruptions"])
            truth = group["corrupt_labels"][:]
            per = {name: float(np.mean(shown[c] == truth)) for c, name in enumerate(names)}
            kept = [name for name in names if name not in AFFINE]
            out["corruptions"] = {
                "count": int(len(truth)),
                "identity_accuracy": float(np.mean(group[f"{defence}_uncorrupted"][:] == truth)),
                "accuracy": per,
                "mean": float(np.mean(list(per.values()))),
                "mean_without_affine": float(np.mean([per[n] for n in kept])) if kept else None,
            }
        elif suite == "certify":
            proved = group["certified"][:]
            stats = interval(proved)
            out["certify"] = {"eps": group.attrs["model"]["eps"], "count": stats["count"], "accuracy": stats["accuracy"], "interval": stats["interval"]}
    return {"defenses": results, "warnings": sanity(group, results, config)}


def sanity(group, results: dict, config: EvalConfig) -> list[str]:
    """Carlini et al. 2019's checks on the stored outcomes: accuracy must not rise with ε; no digit
    certified at ε is broken by an attack at ε; DENT's worst case ≤ its standard attack's."""
    warnings = []
    for defence, suites in results.items():
        for suite in ATTACK_SUITES:
            if suite not in suites:
                continue
            outcomes = {suite: {eps: group[f"{defence}_{suite}_{t}"][i] for i, eps in enumerate(config.eps(suite))} for t in ("standard",)}
            warnings += [f"{defence}: {w}" for w in attacks.sanity_warnings(outcomes)]
    if "certified" in group and "none" in results and "pgd" in results["none"]:
        proved = group["certified"][:]
        eps = group.attrs["model"]["eps"]
        if eps in config.pgd_eps:
            broken = ~group["none_pgd_standard"][config.pgd_eps.index(eps)][: len(proved)]
            if (broken & proved).any():
                warnings.append(f"none: {int((broken & proved).sum())} digits certified at ε {eps} are broken by PGD at ε {eps}: the certificate or the attack is wrong")
    return warnings


# ---------------------------------------------------------------- the stage


def tasks_of(config: EvalConfig, meta: dict, corrupt) -> list[tuple[str, str]]:
    tasks = []
    for defence in config.defenses:
        for suite in config.suites:
            if suite == "calibration" or (suite == "certify" and (defence != "none" or meta.get("method") != "dual")):
                continue
            if suite == "corruptions" and corrupt is None:
                continue
            tasks.append((defence, suite))
    return tasks


def run(config: EvalConfig, model_dir, out, corrupt=None, data_root=None, force: bool = False) -> Path:
    """Evaluate the network in `model_dir` into the asset `out` (resuming it, or leaving it alone
    when complete with this config); `corrupt` is a `pixgen corrupt` asset of its dataset."""
    start = time.perf_counter()
    if "corruptions" in config.suites and corrupt is None:
        raise PixgenError("the corruptions suite needs a corrupted test set: pass --corrupt PATH (make one with pixgen corrupt), or leave the suite out")
    device = models.device()
    static, meta = models.load(model_dir, map_location=device)
    static.requires_grad_(False)
    dataset = meta.get("dataset", "mnist")
    inputs = {"model": models.weights_hash(static)}
    images, labels = data.load(dataset, "test", data_root)
    inputs[f"{dataset}-test"] = data.identity(images, labels)
    corrupt_attrs = {}
    if corrupt is not None:
        group = assets.open_asset(corrupt, stage="corrupt")
        made_from = group.attrs["config"].get("dataset", "mnist")
        if made_from != dataset:
            raise PixgenError(f"{corrupt} corrupts {made_from} images, but the model was trained on {dataset}; pass a `pixgen corrupt --dataset {dataset}` asset")
        inputs["corrupt"] = assets.asset_id(dict(group.attrs))
        corrupt_attrs = {"corruptions": list(group.attrs["corruptions"])}
        corrupt_labels = assets.read(group, "labels")
    test_index = data.balanced_subset(labels, config.test_size, SUBSET_SEED)
    # The attack digits are a subset of the test digits, so clean and attacked outcomes pair up.
    attack_size = config.attack_size or min(ATTACK_SIZE, len(test_index))
    if attack_size > len(test_index):
        raise PixgenError(f"--attack-size {attack_size} exceeds the {len(test_index)} test digits (--test-size); lower it or raise --test-size")
    attack_index = test_index[data.balanced_subset(labels[test_index], attack_size, SUBSET_SEED)]
    test = (images[test_index], labels[test_index], test_index)
    attack = (to_tensor(images[attack_index], device), torch.as_tensor(labels[attack_index], device=device), attack_index)
    networks = {"none": static, **{d: Dent(static, replace_dent(config.dent, DENT_DEFENSES[d])).eval() for d in config.defenses if d != "none"}}
    setup = Setup(config, static, meta, networks, dataset, test, attack, corrupt, data_root, device)
    tasks = tasks_of(config, meta, corrupt)
    if "certify" in config.suites and meta.get("method") == "dual":
        bounds.check_layers(static, "dual")
    model_entry = {
        "path": str(model_dir), "arch": meta["arch"], "method": meta.get("method"), "dataset": dataset, "config_hash": meta.get("config_hash"),
        "weights_hash": inputs["model"], "eps": meta.get("eps"), "dent_variants": {d: networks[d].variant for d in networks if d != "none"},
    }  # fmt: skip
    plan = assets.Plan("evaluate", config, arrays_of(setup, tasks, corrupt_attrs), units=len(tasks), inputs=inputs, attrs={"model": model_entry, **corrupt_attrs})

    def work(unit: int) -> assets.Writes:
        defence, suite = tasks[unit]
        with torch.no_grad() if suite in PLAIN else torch.enable_grad():
            return attack_unit(setup, defence, suite) if suite in ATTACK_SUITES else plain_unit(setup, defence, suite)

    def finish(group) -> dict:
        return {
            **summary(group, config, tasks, test[1], attack[1].cpu().numpy()),
            "data": {"dataset": dataset, "test_count": len(test_index), "attack_count": len(attack_index), "test_identity": data.identity(*test[:2])},
            "device": str(device),
            "seconds": round(time.perf_counter() - start, 2),
        }

    arrays_written = {"labels": test[1], "indices": test_index, "attack_labels": attack[1].cpu().numpy(), "attack_indices": attack_index}
    if corrupt is not None:
        arrays_written["corrupt_labels"] = corrupt_labels
    return assets.build(out, plan, with_fixed(work, arrays_written, tasks), force=force, summary=finish, unit_name="task")


def replace_dent(base: DentConfig, defence: DentConfig) -> DentConfig:
    """The evaluation's DENT settings with the defence's own choice of what adapts."""
    from dataclasses import replace

    return replace(base, adapt_input=defence.adapt_input)


def arrays_of(setup: Setup, tasks: list[tuple[str, str]], corrupt_attrs: dict) -> dict[str, assets.ArraySpec]:
    """Every array the tasks write, whole arrays as single chunks (each is written by one unit)."""
    n, m = len(setup.test[1]), len(setup.attack[1])
    classes, shape = data.spec(setup.dataset).classes, setup.attack[0].shape[2:]

    def spec(shape_, dtype, dims):
        return assets.ArraySpec(tuple(shape_), tuple(max(1, s) for s in shape_), dtype, dims)

    arrays = {
        "labels": spec((n,), "int64", ("sample",)),
        "indices": spec((n,), "int64", ("sample",)),
        "attack_labels": spec((m,), "int64", ("attack_sample",)),
        "attack_indices": spec((m,), "int64", ("attack_sample",)),
    }
    for defence, suite in tasks:
        if suite == "clean":
            arrays[f"{defence}_probs"] = spec((n, classes), "float32", ("sample", "class"))
        elif suite == "ood":
            for name in (data.spec(setup.dataset).ood, "uniform", "gaussian"):
                arrays[f"{defence}_ood_{name}"] = spec((n, classes), "float32", ("sample", "class"))
        elif suite == "consistency":
            arrays[f"{defence}_shifted"] = spec((2, 2 * setup.config.max_shift + 1, n), "int16", ("axis", "shift", "sample"))
        elif suite == "corruptions":
            count = len(assets.read(assets.open_asset(setup.corrupt, stage="corrupt"), "labels"))
            arrays[f"{defence}_corrupted"] = spec((len(corrupt_attrs["corruptions"]), count), "int16", ("corruption", "corrupt_sample"))
            arrays[f"{defence}_uncorrupted"] = spec((count,), "int16", ("corrupt_sample",))
            arrays["corrupt_labels"] = spec((count,), "int64", ("corrupt_sample",))
        elif suite == "certify":
            arrays["certified"] = spec((min(setup.config.certify_size, m),), "bool", ("certify_sample",))
        else:
            eps = len(setup.config.eps(suite))
            for threat in threats(setup, defence, suite):
                arrays[f"{defence}_{suite}_{threat}"] = spec((eps, m), "bool", (f"{suite}_eps", "attack_sample"))
            if defence == "none":
                shown = min(EXAMPLES, m)
                arrays[f"examples_{suite}"] = spec((eps, shown, *shape), "uint8", (f"{suite}_eps", "example", "y", "x"))
                arrays[f"examples_{suite}_predicted"] = spec((eps, shown), "int16", (f"{suite}_eps", "example"))
    return arrays


def with_fixed(work: Callable[[int], assets.Writes], fixed: dict[str, np.ndarray], tasks) -> Callable[[int], assets.Writes]:
    """`work`, with the arrays every task shares (labels, indices) written by the first unit."""

    def unit(i: int) -> assets.Writes:
        writes = work(i)
        if i == 0:
            writes |= {name: (slice(None), value) for name, value in fixed.items()}
        return writes

    return unit
