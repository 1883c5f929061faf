"""The evaluation stage: one asset per network, every safety axis of the PixMix paper, each
defence (none, DENT), with per-digit outcomes stored so that worst cases, paired tests and
certified-against-attacked checks are computed per digit, never from means.

The asset is a Zarr group (pixgen.assets) whose units are tasks: a suite under one defence or an
attack under one defence. Each unit writes per-digit arrays (predicted probabilities, correct or
not per threat and ε); when every unit is in, the results (accuracies with 95% Wilson intervals,
calibration, detection, sanity warnings) are computed from those arrays into the group's
attributes (`defenses`, `warnings`), which is all the report reads.

Suites without attacks (`SUITES`, a registry by name, on the test digits: all of the test split
by default): clean, calibration, ood, consistency, corruptions, certify (dual networks: the exact
dual bound). Attacks (`EvalConfig.attacks`: any name of pixgen.attacks.ATTACKS with its ε grid, on
a fixed class-balanced subset of the test digits, 1,000 by default): FGSM and PGD by default.

Threats: an attack under defence `none` attacks the static network ("standard"). Under a
DENT defence (pixgen.dent.DEFENSES) each attack is run three ways: "standard" (the attack sees
DENT's final prediction, adaptation detached: the DENT paper's evaluation), "transfer" (the static
network's adversarial digits shown to DENT) and, for pgd, the attacks that use DENT's internals
(pixgen.adaptive: "adaptive" APGD through the unrolled adaptation with CE and DLR, the
"fixed-point" attack, and "eot" over batch composition). "worst" is the per-digit AND over the
threats: DENT's number. DENT sees the attack digits in batches of its own batch size, in order.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation computes; its hash (defences included) is the asset's identity.

    suites: the suites without attacks (SUITES); attacks: (attack name, its ε grid) pairs, any
    name of pixgen.attacks.ATTACKS, run on the attack digits; test_size: digits of the suites, a
    fixed class-balanced subset of the test split (None: all); attack_size: the attack digits, a
    fixed class-balanced subset of those (None: ATTACK_SIZE, or all of them if fewer);
    certify_size: the first this many attack digits get the exact certificate (dual networks);
    eps_units: what the attack grids are in: "pixel" (images in [0, 1]) or "input", the units the
    network's first layer sees after its normalisation (models.Normalize), converted to pixels by
    × its std (1 without one) before any attack runs."""

    suites: tuple[str, ...] = ("clean", "calibration", "ood", "consistency", "corruptions", "certify")
    attacks: tuple[tuple[str, tuple[float, ...]], ...] = (("fgsm", grid(0.5, 0.02)), ("pgd", grid(0.5, 0.1)))
    defenses: tuple[str, ...] = ("none",)
    pgd_restarts: int = 5
    pgd_losses: tuple[str, ...] = ("ce", "dlr")  # each run for pgd_restarts restarts, in turn
    test_size: int | None = None
    attack_size: int | None = None
    batch_size: int = 250  # the static network's batches; DENT uses its own
    seed: int = 0
    dent: DentConfig = field(default_factory=DentConfig)
    adaptive_steps: int = 20  # steps of the fixed-point and EOT attacks on DENT
    adaptive_apgd_steps: int = adaptive.APGD_STEPS
    max_shift: int = 2
    certify_size: int = 1000
    eps_units: str = "pixel"

    def __post_init__(self):
        # JSON gives lists back; the config must stay hashable and compare equal to the one made.
        object.__setattr__(self, "attacks", tuple((name, tuple(eps)) for name, eps in self.attacks))
        object.__setattr__(self, "pgd_losses", tuple(self.pgd_losses))
        if not self.pgd_losses or any(n not in attacks.LOSSES for n in self.pgd_losses) or len(set(self.pgd_losses)) != len(self.pgd_losses):
            raise PixgenError(f"PGD losses must be distinct names from {', '.join(attacks.LOSSES)}, got {', '.join(self.pgd_losses) or '(none)'}")
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown:
            raise PixgenError(f"unknown suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
        names = [name for name, _ in self.attacks]
        if any(n not in attacks.ATTACKS for n in names) or len(set(names)) != len(names):
            raise PixgenError(f"attacks must be distinct names from {', '.join(attacks.ATTACKS)}, got {', '.join(names)}")
        if not self.suites and not self.attacks:
            raise PixgenError("nothing to evaluate: give at least one suite or attack")
        known = ("none", *DENT_DEFENSES)
        if not self.defenses or any(d not in known for d in self.defenses) or len(set(self.defenses)) != len(self.defenses):
            raise PixgenError(f"defences must be distinct names from {', '.join(known)}, got {', '.join(self.defenses) or '(none)'}")
        if self.eps_units not in models.EPS_UNITS:
            raise PixgenError(f"unknown ε units {self.eps_units!r}; choose one of {', '.join(models.EPS_UNITS)}")
        # An input-unit ε's upper limit depends on the model's std, so evaluate.run checks it.
        top, allowed = (1, "in [0, 1] (pixel units)") if self.eps_units == "pixel" else (float("inf"), "≥ 0 (input units)")
        for name, eps in self.attacks:
            if not eps or any(not 0 <= e <= top for e in eps) or list(eps) != sorted(set(eps)):
                raise PixgenError(f"{name}'s ε must be increasing budgets {allowed}, got {', '.join(map(str, eps)) or '(none)'}")
        for name in ("batch_size", "certify_size", "max_shift", "pgd_restarts", "adaptive_steps", "adaptive_apgd_steps"):
            if getattr(self, name) < 1:
                raise PixgenError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("test_size", "attack_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PixgenError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def eps(self, attack: str) -> tuple[float, ...]:
        return dict(self.attacks)[attack]


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


def threats(setup: "Setup", defence: str, attack: str) -> dict[str, Callable]:
    """{threat: make(x, y, eps_list, batch) -> the adversarial x at each ε of eps_list} for one
    defence and attack."""
    static, seed = setup.static, setup.config.seed

    def at_each(make):
        return lambda x, y, eps_list, b: (x if eps == 0 else make(x, y, eps, b) for eps in eps_list)

    def on(model, **params):
        if attack == "fgsm":
            # FGSM's gradient is taken at the clean batch, which no ε changes (DENT's adaptation
            # included): one gradient gives every ε of the grid, the same bytes as one per ε.
            return lambda x, y, eps_list, b: attacks.fgsm_grid(model, x, y, eps_list)
        return at_each(lambda x, y, eps, b: attacks.build(attack, model, eps, seed=seed, batch=b, **params)(x, y))

    # PGD's restarts and losses are the attack parameters an evaluation sets (the study reports
    # ≥ 5 restarts, with cross-entropy and a margin loss).
    params = {"restarts": setup.config.pgd_restarts, "loss": setup.config.pgd_losses} if attack == "pgd" else {}
    if defence == "none":
        return {"standard": on(static, **params)}
    dent = setup.networks[defence]
    if attack == "autoattack":
        # Shown to DENT from the static network: through DENT its gradient attacks are the adaptive
        # ones' business (below) and its score-based one is `square`, on the defended whole.
        return {"transfer": on(static)}
    if attack == "square":
        return {"standard": on(dent)}
    out = {"standard": on(dent, **params), "transfer": on(static, **params)}
    if attack == "pgd":
        steps = setup.config.adaptive_steps
        apgd_steps = setup.config.adaptive_apgd_steps
        out["adaptive"] = at_each(lambda x, y, eps, b: adaptive.adaptive_apgd(dent, x, y, eps, attacks.stream_seed(seed, "adaptive", eps, b), steps=apgd_steps, transfer_steps=steps))
        out["fixed-point"] = at_each(lambda x, y, eps, b: adaptive.fixed_point(dent, x, y, eps, attacks.stream_seed(seed, "fixed-point", eps, b), steps=steps))
        out["eot"] = at_each(lambda x, y, eps, b: adaptive.eot_batches(dent, x, y, eps, attacks.stream_seed(seed, "eot", eps, b), pool=setup.pool, steps=steps))
    return out


def attack_unit(setup: "Setup", defence: str, attack: str) -> assets.Writes:
    """Per threat, (E, M) correct-or-not of the attack digits; under `none` also the adversarial
    versions of the first EXAMPLES digits, for the report."""
    x, y, _ = setup.attack
    eps_list = setup.pixel_eps(attack)
    network = setup.networks[defence]
    made = threats(setup, defence, attack)
    correct = {t: np.zeros((len(eps_list), len(y)), bool) for t in made}
    shown = min(EXAMPLES, len(y))
    examples = np.zeros((len(eps_list), shown, *x.shape[2:]), np.uint8)
    predicted = np.zeros((len(eps_list), shown), np.int16)
    for b, s in enumerate(setup.batches(defence)):
        for threat, make in made.items():
            for i, adversarial in enumerate(make(x[s], y[s], eps_list, b)):
                with torch.no_grad():
                    guess = network(adversarial).argmax(1)
                correct[threat][i, s] = (guess == y[s]).cpu().numpy()
                if defence == "none" and s.start < shown:
                    k = min(shown, s.stop) - s.start
                    examples[i, s.start : s.start + k] = (adversarial[:k, 0] * 255).round().byte().cpu().numpy()
                    predicted[i, s.start : s.start + k] = guess[:k].cpu().numpy()
    writes = {f"{defence}_{attack}_{t}": (slice(None), c) for t, c in correct.items()}
    if defence == "none":
        writes |= {f"examples_{attack}": (slice(None), examples), f"examples_{attack}_predicted": (slice(None), predicted)}
    return writes


# ---------------------------------------------------------------- the suites without attacks
#
# A suite: the arrays a defence's unit writes (`arrays`), the unit (`unit`, None for a suite that
# reads another's arrays, as calibration reads clean's) and the results computed from the arrays
# (`summarize`). Adding a suite is three functions and an entry in SUITES.


@dataclass(frozen=True)
class Suite:
    arrays: Callable[["Setup", str], dict[str, tuple[tuple[int, ...], str, tuple[str, ...]]]]
    unit: Callable[["Setup", str], assets.Writes] | None
    summarize: Callable[[object, "Setup", str], dict]
    needs: str | None = None  # the suite whose arrays it reads, when it has no unit of its own


def clean_arrays(setup, d):
    return {f"{d}_probs": ((len(setup.test[1]), setup.classes), "float32", ("sample", "class"))}


def clean_unit(setup, d):
    return {f"{d}_probs": (slice(None), probabilities(setup.networks[d], setup.test[0], setup.config.batch_size, setup.device))}


def clean_summary(group, setup, d):
    return interval(group[f"{d}_probs"][:].argmax(1) == setup.test[1])


def calibration_summary(group, setup, d):
    probs, labels = group[f"{d}_probs"][:], setup.test[1]
    return {
        "rms": metrics.rms_calibration_error(probs, labels),
        "ece": metrics.expected_calibration_error(probs, labels),
        "bins": metrics.reliability_bins(probs, labels),
        "count": int(len(labels)),
    }


def ood_arrays(setup, d):
    return {f"{d}_ood_{name}": ((len(setup.test[1]), setup.classes), "float32", ("sample", "class")) for name in ood_names(setup.dataset)}


def ood_unit(setup, d):
    sets = ood_sets(len(setup.test[1]), setup.config.seed, setup.data_root, setup.dataset)
    return {f"{d}_ood_{name}": (slice(None), probabilities(setup.networks[d], s, setup.config.batch_size, setup.device)) for name, s in sets.items()}


def ood_summary(group, setup, d):
    clean = group[f"{d}_probs"][:]
    return {name: metrics.anomaly_detection(clean, group[f"{d}_ood_{name}"][:]) for name in ood_names(setup.dataset)}


def consistency_arrays(setup, d):
    return {f"{d}_shifted": ((2, 2 * setup.config.max_shift + 1, len(setup.test[1])), "int16", ("axis", "shift", "sample"))}


def consistency_unit(setup, d):
    frames = metrics.translation_sequences(setup.test[0], setup.config.max_shift)
    classes = np.stack([[probabilities(setup.networks[d], f, setup.config.batch_size, setup.device).argmax(1) for f in seq] for seq in frames])
    return {f"{d}_shifted": (slice(None), classes.astype(np.int16))}


def consistency_summary(group, setup, d):
    classes = group[f"{d}_shifted"][:]
    return {"max_shift": setup.config.max_shift, "consistency": metrics.consistency(classes), "flip_rate": metrics.flip_rate(classes)}


def corruptions_arrays(setup, d):
    count, kinds = len(setup.corrupt_labels), len(setup.corruptions)
    return {
        f"{d}_corrupted": ((kinds, count), "int16", ("corruption", "corrupt_sample")),
        f"{d}_uncorrupted": ((count,), "int16", ("corrupt_sample",)),
    }


def corruptions_unit(setup, d):
    group = assets.open_asset(setup.corrupt, stage="corrupt")
    clean, _ = data.load(setup.dataset, "test", setup.data_root)
    network, size, device = setup.networks[d], setup.config.batch_size, setup.device
    shown = [probabilities(network, assets.read(group, "images", c), size, device).argmax(1) for c in range(len(setup.corruptions))]
    identity = probabilities(network, clean[assets.read(group, "indices")], size, device).argmax(1)
    return {f"{d}_corrupted": (slice(None), np.stack(shown).astype(np.int16)), f"{d}_uncorrupted": (slice(None), identity.astype(np.int16))}


def corruptions_summary(group, setup, d):
    shown, truth = group[f"{d}_corrupted"][:], setup.corrupt_labels
    per = {name: float(np.mean(shown[c] == truth)) for c, name in enumerate(setup.corruptions)}
    kept = [name for name in setup.corruptions if name not in AFFINE]
    return {
        "count": int(len(truth)),
        "identity_accuracy": float(np.mean(group[f"{d}_uncorrupted"][:] == truth)),
        "accuracy": per,
        "mean": float(np.mean(list(per.values()))),
        "mean_without_affine": float(np.mean([per[n] for n in kept])) if kept else None,
    }


def certify_arrays(setup, d):
    return {"certified": ((setup.certified_count,), "bool", ("certify_sample",))}


def certify_unit(setup, d):
    x, y, _ = setup.attack
    n = setup.certified_count
    return {"certified": (slice(None), bounds.dual_certified(setup.static, x[:n], y[:n], training_eps(setup.meta)).cpu().numpy())}


def certify_summary(group, setup, d):
    return {"eps": training_eps(setup.meta), **interval(group["certified"][:])}


SUITES: dict[str, Suite] = {
    "clean": Suite(clean_arrays, clean_unit, clean_summary),
    "calibration": Suite(clean_arrays, None, calibration_summary, needs="clean"),
    "ood": Suite(ood_arrays, ood_unit, ood_summary),
    "consistency": Suite(consistency_arrays, consistency_unit, consistency_summary),
    "corruptions": Suite(corruptions_arrays, corruptions_unit, corruptions_summary),
    "certify": Suite(certify_arrays, certify_unit, certify_summary),
}
ONLY_STATIC = ("certify",)  # a certificate means nothing for a network that changes per batch


def ood_names(dataset: str) -> tuple[str, ...]:
    return (data.spec(dataset).ood, "uniform", "gaussian", "bernoulli", "blobs", "inverted", "blended")


def ood_sets(n: int, seed: int, data_root, dataset: str = "mnist") -> dict[str, np.ndarray]:
    """Out-of-distribution inputs, n each (float pixels in [0, 1], seeded), the sets Hendrycks'
    outlier-exposure code uses for MNIST that can be made offline: the dataset's natural OOD set
    (MNIST's is Fashion-MNIST and the other way round; a fixed class-balanced subset of its test
    split); uniform noise U(0, 1); Gaussian N(0.5, 0.5²) clipped; Bernoulli(0.5) pixels (0 or 1);
    blobs (Bernoulli(0.7) blurred with σ 1.5 px, below 0.75 set to 0); the dataset's own test images
    inverted (1 − x) and blended (the mean of two test images of different classes)."""
    from scipy.ndimage import gaussian_filter

    spec = data.spec(dataset)
    shape = (n, *spec.shape)
    rng = {name: np.random.default_rng(np.random.SeedSequence([seed, k])) for k, name in enumerate(ood_names(dataset)) if k}
    natural, natural_labels = data.load(spec.ood, "test", data_root)
    own, own_labels = data.load(dataset, "test", data_root)
    own = own.astype(np.float32)[:, None] / 255
    blobs = gaussian_filter(rng["blobs"].binomial(1, 0.7, shape).astype(np.float32), sigma=(0, 0, 1.5, 1.5))
    first = rng["blended"].integers(0, len(own_labels), n)
    second = rng["blended"].integers(0, len(own_labels), n)
    # A blend of one class with itself is that class: redraw the partner until the classes differ.
    while (same := own_labels[first] == own_labels[second]).any():
        second[same] = rng["blended"].integers(0, len(own_labels), int(same.sum()))
    return {
        spec.ood: natural[data.balanced_subset(natural_labels, min(n, len(natural_labels)), SUBSET_SEED)],
        "uniform": rng["uniform"].random(shape, dtype=np.float32),
        "gaussian": np.clip(rng["gaussian"].normal(0.5, 0.5, shape), 0, 1).astype(np.float32),
        "bernoulli": rng["bernoulli"].binomial(1, 0.5, shape).astype(np.float32),
        "blobs": np.where(blobs < 0.75, 0, blobs).astype(np.float32),
        "inverted": 1 - own[rng["inverted"].permutation(len(own))[:n]],
        "blended": (own[first] + own[second]) / 2,
    }


def training_eps(meta: dict) -> float:
    """The ε a robust network was trained for: in its metadata, or in its training config."""
    eps = meta.get("eps", meta.get("config", {}).get("eps"))
    if eps is None:
        raise PixgenError(f"model {meta.get('arch')} records no training ε in its meta.json, so it has no certificate to check; drop the certify suite or retrain it")
    return float(eps)


def interval(correct: np.ndarray) -> dict:
    """Accuracy of a (…, N) bool array with its 95% Wilson interval, over the last axis."""
    k, n = correct.sum(-1), correct.shape[-1]
    lo, hi = metrics.wilson_interval(k, n)
    return {"accuracy": (k / n).tolist(), "interval": np.stack([lo, hi], -1).tolist(), "count": int(n)}


def outcomes(group, d: str, attack: str) -> dict[str, np.ndarray]:
    """{threat: (E, M) correct-or-not} of one attack under one defence, as stored."""
    prefix = f"{d}_{attack}_"
    return {k.removeprefix(prefix): group[k][:] for k in sorted(group.array_keys()) if k.startswith(prefix)}


def worst_outcomes(group, d: str, attack: str) -> np.ndarray:
    """(E, M): per ε and attack digit, correct under every threat of the attack (their AND)."""
    return np.logical_and.reduce(list(outcomes(group, d, attack).values()))


def attack_summary(group, setup: "Setup", d: str, attack: str) -> dict:
    """Per threat and its per-digit AND (`worst`): accuracy and interval per ε."""
    correct = outcomes(group, d, attack)
    entry = {"eps": list(setup.pixel_eps(attack)), "stated_eps": list(setup.config.eps(attack)), "count": int(len(setup.attack[1]))}
    for threat, c in {**correct, "worst": np.logical_and.reduce(list(correct.values()))}.items():
        stats = interval(c)
        entry[threat], entry[f"{threat}_interval"] = stats["accuracy"], stats["interval"]
    return entry


ADAPTIVE_FROM = 0.1  # from this ε the adaptive attack on DENT must be at least as strong as transfer
ALL_ATTACKS = "all-attacks"  # results key: the per-digit worst case over every attack run at an ε


def all_attacks_summary(group, setup: "Setup", d: str) -> dict:
    """Per pixel ε that any attack ran at, the per-digit AND over the attacks run there (each the
    AND over its threats): the defence's robust accuracy, the number to report; `attacks` names
    which attacks each ε's worst case covers."""
    by_eps: dict[float, list[tuple[str, np.ndarray]]] = {}
    for attack, _ in setup.config.attacks:
        for e, row in zip(setup.pixel_eps(attack), worst_outcomes(group, d, attack)):
            by_eps.setdefault(round(e, 9), []).append((attack, row))
    eps = sorted(by_eps)
    stats = interval(np.stack([np.logical_and.reduce([row for _, row in by_eps[e]]) for e in eps]))
    return {"eps": eps, "attacks": [[a for a, _ in by_eps[e]] for e in eps], "count": int(len(setup.attack[1])), "worst": stats["accuracy"], "worst_interval": stats["interval"]}


def adaptive_warnings(entry: dict) -> list[str]:
    """A DENT PGD entry's ε (from ADAPTIVE_FROM) where the adaptive attack leaves more digits than
    transfer: after Croce et al. 2022, an adaptive attack weaker than transfer is a broken one."""
    if "adaptive" not in entry:
        return []
    return [
        f"the adaptive attack leaves {entry['adaptive'][i]:.1%} at ε {e:g}, more than transfer's {entry['transfer'][i]:.1%}; the adaptive attack is failing"
        for i, e in enumerate(entry["eps"]) if e >= ADAPTIVE_FROM and entry["adaptive"][i] > entry["transfer"][i]
    ]  # fmt: skip


def strength(defence: str) -> tuple[str, ...]:
    """The attacks whose per-digit outcomes must be nested, weakest first, under `defence`: under
    DENT, AutoAttack is shown by transfer (threats()), weaker than PGD through DENT by design."""
    return attacks.STRENGTH if defence == "none" else tuple(a for a in attacks.STRENGTH if a != "autoattack")


def sanity(group, setup: "Setup", results: dict) -> list[str]:
    """Carlini et al. 2019's checks on the stored outcomes: accuracy must not rise with ε (per
    attack and defence); no digit certified at ε is broken by an attack at ε (both in pixels)."""
    warnings = []
    grids = {a: setup.pixel_eps(a) for a, _ in setup.config.attacks}
    for d, suites in results.items():
        worst = {a: dict(zip(grid_, worst_outcomes(group, d, a))) for a, grid_ in grids.items() if a in suites}
        warnings += [f"{d}: {w}" for w in attacks.sanity_warnings(worst, strength(d))]
        warnings += [f"{d}: {w}" for w in adaptive_warnings(suites.get("pgd", {}))]
    if "certified" in group:
        proved, eps = group["certified"][:], training_eps(setup.meta)
        for attack, grid_ in grids.items():
            if "none" in results and attack in results["none"] and eps in grid_:
                broken = ~group[f"none_{attack}_standard"][grid_.index(eps)][: len(proved)]
                if (broken & proved).any():
                    warnings.append(f"none: {int((broken & proved).sum())} digits certified at ε {eps} are broken by {attack} at ε {eps}: the certificate or the attack is wrong")
    return warnings


# ---------------------------------------------------------------- the stage


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
    corruptions: list[str]
    corrupt_labels: np.ndarray | None
    data_root: object
    device: torch.device
    eps_to_pixel: float  # pixel ε per ε of the config's grids: 1, or the network's std (eps_units "input")

    @functools.cached_property
    def pool(self) -> torch.Tensor:
        """The clean batch-mates EOT places each adversarial digit among (the test digits), made
        once, when an EOT attack first needs them, not each time the threats are listed."""
        return to_tensor(self.test[0], self.device)

    def pixel_eps(self, attack: str) -> tuple[float, ...]:
        """The attack's ε grid in pixels, the budgets its attacks run at."""
        return tuple(e * self.eps_to_pixel for e in self.config.eps(attack))

    @property
    def classes(self) -> int:
        return data.spec(self.dataset).classes

    @property
    def certified_count(self) -> int:
        return min(self.config.certify_size, len(self.attack[1]))

    def batches(self, defence: str) -> list[slice]:
        size = self.networks[defence].config.batch_size if defence != "none" else self.config.batch_size
        n = len(self.attack[1])
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def tasks_of(config: EvalConfig, meta: dict, corrupt) -> list[tuple[str, str]]:
    """(defence, suite or attack) pairs with a unit of work, in order."""
    tasks = []
    for defence in config.defenses:
        for suite in config.suites:
            static_only = suite in ONLY_STATIC and (defence != "none" or meta.get("method") != "dual")
            if SUITES[suite].unit is None or static_only or (suite == "corruptions" and corrupt is None):
                continue
            tasks.append((defence, suite))
        tasks += [(defence, attack) for attack, _ in config.attacks]
    return tasks


def results_of(group, setup: Setup, tasks: list[tuple[str, str]]) -> dict:
    """The results of every task (and of the suites that read a task's arrays), from the arrays."""
    results: dict[str, dict] = {}
    done = set(tasks)
    for defence in setup.config.defenses:
        out = results.setdefault(defence, {})
        for suite in setup.config.suites:
            if (defence, SUITES[suite].needs or suite) in done:
                out[suite] = SUITES[suite].summarize(group, setup, defence)
        for attack, _ in setup.config.attacks:
            out[attack] = attack_summary(group, setup, defence, attack)
        if len(setup.config.attacks) > 1:
            out[ALL_ATTACKS] = all_attacks_summary(group, setup, defence)
    return results


def arrays_of(setup: Setup, tasks: list[tuple[str, str]]) -> dict[str, assets.ArraySpec]:
    """Every array the tasks write, whole arrays as single chunks (each is written by one unit)."""
    n, m = len(setup.test[1]), len(setup.attack[1])
    shapes = {
        "labels": ((n,), "int64", ("sample",)),
        "indices": ((n,), "int64", ("sample",)),
        "attack_labels": ((m,), "int64", ("attack_sample",)),
        "attack_indices": ((m,), "int64", ("attack_sample",)),
    }
    if setup.corrupt is not None:
        shapes["corrupt_labels"] = ((len(setup.corrupt_labels),), "int64", ("corrupt_sample",))
    for defence, name in tasks:
        if name in SUITES:
            shapes |= SUITES[name].arrays(setup, defence)
            continue
        eps = len(setup.config.eps(name))
        shapes |= {f"{defence}_{name}_{threat}": ((eps, m), "bool", (f"{name}_eps", "attack_sample")) for threat in threats(setup, defence, name)}
        if defence == "none":
            shown = min(EXAMPLES, m)
            shapes[f"examples_{name}"] = ((eps, shown, *setup.attack[0].shape[2:]), "uint8", (f"{name}_eps", "example", "y", "x"))
            shapes[f"examples_{name}_predicted"] = ((eps, shown), "int16", (f"{name}_eps", "example"))
    return {name: assets.ArraySpec(shape, tuple(max(1, s) for s in shape), dtype, dims) for name, (shape, dtype, dims) in shapes.items()}


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
    corruptions, corrupt_labels = [], None
    if corrupt is not None:
        group = assets.open_asset(corrupt, stage="corrupt")
        made_from = group.attrs["config"].get("dataset", "mnist")
        if made_from != dataset:
            raise PixgenError(f"{corrupt} corrupts {made_from} images, but the model was trained on {dataset}; pass a `pixgen corrupt --dataset {dataset}` asset")
        inputs["corrupt"] = assets.asset_id(dict(group.attrs))
        corruptions, corrupt_labels = list(group.attrs["corruptions"]), assets.read(group, "labels")
    test_index = data.balanced_subset(labels, config.test_size, SUBSET_SEED)
    # The attack digits are a subset of the test digits, so clean and attacked outcomes pair up.
    attack_size = config.attack_size or min(ATTACK_SIZE, len(test_index))
    if attack_size > len(test_index):
        raise PixgenError(f"--attack-size {attack_size} exceeds the {len(test_index)} test digits (--test-size); lower it or raise --test-size")
    attack_index = test_index[data.balanced_subset(labels[test_index], attack_size, SUBSET_SEED)]
    test = (images[test_index], labels[test_index], test_index)
    attack = (to_tensor(images[attack_index], device), torch.as_tensor(labels[attack_index], device=device), attack_index)
    eps_to_pixel = models.eps_to_pixel(static, config.eps_units)
    too_large = [(a, e) for a, grid_ in config.attacks for e in grid_ if e * eps_to_pixel > 1]
    if too_large:
        attack, e = too_large[0]
        raise PixgenError(f"{attack}'s ε {e:g} in input units is {e * eps_to_pixel:g} in pixels (× the network's std {eps_to_pixel:g}), beyond the pixel range's 1; lower it")
    networks = {"none": static, **{d: Dent(static, replace(config.dent, adapt_input=DENT_DEFENSES[d].adapt_input)).eval() for d in config.defenses if d != "none"}}
    setup = Setup(config, static, meta, networks, dataset, test, attack, corrupt, corruptions, corrupt_labels, data_root, device, eps_to_pixel)
    tasks = tasks_of(config, meta, corrupt)
    if any(suite == "certify" for _, suite in tasks):
        bounds.check_layers(static, "dual")
    model_entry = {
        "path": str(model_dir), "arch": meta["arch"], "method": meta.get("method"), "dataset": dataset, "config_hash": meta.get("config_hash"),
        "weights_hash": inputs["model"], "eps": meta.get("eps"), "normalize": meta.get("normalize"),
        "dent_variants": {d: networks[d].variant for d in networks if d != "none"},
    }  # fmt: skip
    # Each attack entry has `eps` (pixels, what ran) and `stated_eps` (the grid as given, in eps_units).
    attrs = {"model": model_entry, "eps_units": config.eps_units, "eps_to_pixel": eps_to_pixel, **({"corruptions": corruptions} if corrupt is not None else {})}
    plan = assets.Plan("evaluate", config, arrays_of(setup, tasks), units=len(tasks), inputs=inputs, attrs=attrs)
    shared = {"labels": test[1], "indices": test_index, "attack_labels": attack[1].cpu().numpy(), "attack_indices": attack_index}
    if corrupt is not None:
        shared["corrupt_labels"] = corrupt_labels

    def work(unit: int) -> assets.Writes:
        defence, name = tasks[unit]
        with torch.no_grad() if name in SUITES else torch.enable_grad():
            writes = SUITES[name].unit(setup, defence) if name in SUITES else attack_unit(setup, defence, name)
        # The arrays every task shares go with the first unit.
        return writes | ({k: (slice(None), v) for k, v in shared.items()} if unit == 0 else {})

    def finish(group) -> dict:
        results = results_of(group, setup, tasks)
        return {
            "defenses": results,
            "warnings": sanity(group, setup, results),
            "data": {"dataset": dataset, "test_count": len(test_index), "attack_count": len(attack_index), "test_identity": data.identity(*test[:2])},
            "device": str(device),
            "seconds": round(time.perf_counter() - start, 2),
        }

    return assets.build(out, plan, work, force=force, summary=finish, unit_name="task")
