"""Reading the report's inputs, checked as they are opened: evaluation assets (pixgen evaluate)
and certify assets (pixgen certify), and the names the report gives what it read.

Nothing here runs a model or an attack: numbers come from the assets' attributes, and the paired
tests read the per-digit outcomes that pixgen evaluate stored (`<defence>_<attack>_<threat>`,
one bool per ε and attack digit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import PixgenError, assets

ATTACKS = {"fgsm": "FGSM", "pgd": "PGD-40"}  # drawn against ε
POINT_ATTACKS = {"autoattack": "AutoAttack", "square": "Square-5000"}  # run at a few ε: table columns at each
ALL_ATTACKS = "all-attacks"  # pixgen.evaluate's per-digit worst case over every attack run at an ε
ATTACK_LABELS = {**ATTACKS, **POINT_ATTACKS, ALL_ATTACKS: "all attacks"}
EPS_TOL = 1e-9
# Keys of an attack entry that are not a threat's accuracies (each threat also has `<threat>_interval`).
NOT_THREATS = ("eps", "stated_eps", "count", "worst")
# The order threats are listed in: the DENT paper's attack first, then the stronger ones. pixgen
# evaluate stores them by name, so its order says nothing; a threat not named here goes last.
THREAT_ORDER = ("standard", "transfer", "adaptive", "fixed-point", "eot")


# ---------------------------------------------------------------- evaluations


@dataclass(frozen=True)
class Evaluation:
    path: Path
    label: str  # model folder name and method: the name of the model everywhere in the report
    doc: dict


def _fail(path, why: str):
    raise PixgenError(f"{path} is not a pixgen evaluation ({why}); pass assets written by pixgen evaluate")


def _check(path: Path, doc) -> None:
    if not isinstance(doc.get("model"), dict) or not isinstance(doc["model"].get("path"), str):
        _fail(path, "no model.path")
    defenses = doc.get("defenses")
    if not isinstance(defenses, dict) or not defenses or not all(isinstance(d, dict) for d in defenses.values()):
        _fail(path, "no defenses")
    for name, results in defenses.items():
        for attack in (*ATTACKS, *POINT_ATTACKS, ALL_ATTACKS):
            entry = results.get(attack)
            if entry is None:
                continue
            eps = entry.get("eps") if isinstance(entry, dict) else None
            worst = entry.get("worst") if isinstance(entry, dict) else None
            if not isinstance(eps, list) or not isinstance(worst, list) or len(worst) != len(eps):
                _fail(path, f"defenses.{name}.{attack} has no accuracy per ε")


def load_evaluations(paths) -> list[Evaluation]:
    """Every evaluation asset named, in order, each once."""
    if not paths:
        raise PixgenError("no evaluation given: pass --eval PATH (an asset written by pixgen evaluate)")
    evals, seen = [], {}
    for path in dict.fromkeys(Path(p).resolve() for p in paths):
        doc = dict(assets.open_asset(path, stage="evaluate").attrs)
        _check(path, doc)
        label = f"{Path(doc['model']['path']).name} ({doc['model'].get('method')})"
        if doc.get("eps_units", "pixel") != "pixel":  # the same network attacked at other budgets: another line
            label += f" [ε in {doc['eps_units']} units]"
        seen[label] = seen.get(label, 0) + 1
        # The same model evaluated twice (other configs, other test sets) stays two lines.
        evals.append(Evaluation(path, label if seen[label] == 1 else f"{label} #{seen[label]}", doc))
    return evals


def rows(evals: list[Evaluation]) -> list[tuple[Evaluation, str]]:
    """(evaluation, defence) pairs, the rows of the table and the series of the bar charts."""
    return [(ev, d) for ev in evals for d in ev.doc["defenses"]]


def defence_label(ev: Evaluation, defence: str) -> str:
    """The defence's name and, for DENT, what it adapted in this network (model.dent_variants):
    the network's BatchNorm ("BN", as published), or for a network without BatchNorm the
    channel-wise scale and shift of the BN-free generalisation. The two are different defences,
    so a DENT number is never shown without saying which."""
    variant = (ev.doc["model"].get("dent_variants") or {}).get(defence)
    if defence == "none" or variant is None:
        return defence
    short = "BN" if variant == "bn" else "channel-affine, no BN" if variant.startswith("channel-affine") else variant
    return f"{defence} ({short})"


def row_label(ev: Evaluation, defence: str) -> str:
    return ev.label if defence == "none" else f"{ev.label} + {defence_label(ev, defence)}"


def threats(entry: dict) -> list[str]:
    """The threats of an attack entry, in THREAT_ORDER."""
    found = [k for k in entry if k not in NOT_THREATS and not k.endswith("_interval")]
    return sorted(found, key=lambda t: THREAT_ORDER.index(t) if t in THREAT_ORDER else len(THREAT_ORDER))


def eps_text(eps: float | None = None, stated: float | None = None, factor: float = 1.0) -> str:
    """ε as the report writes it, units included. The report compares and plots pixel ε, the
    budgets the attacks ran at (an attack entry's `eps`, whatever units its grid was stated in);
    `stated` and `factor`: the ε as given in input units and the std that made it pixels."""
    if eps is None:
        return "ε (pixel units)"
    if stated is None or factor == 1.0:
        return f"ε={eps:g} (pixel units)"
    return f"ε={eps:g} (pixel units; {stated:g} in input units × std {factor:g})"


def eps_index(eps_list, eps: float) -> int | None:
    """Where ε is in an evaluation's grid; None when it did not run it (never interpolated)."""
    return next((i for i, e in enumerate(eps_list) if abs(e - eps) < EPS_TOL), None)


def mixed_test_sets(evals: list[Evaluation]) -> str | None:
    """A warning when the evaluations did not all use the same test digits."""
    by_set = {}
    for ev in evals:
        test = ev.doc.get("data", {})
        by_set.setdefault((test.get("test_count"), test.get("test_identity")), []).append(ev.label)
    if len(by_set) < 2:
        return None
    listed = "; ".join(f"{count} digits ({identity}): {', '.join(labels)}" for (count, identity), labels in by_set.items())
    return f"The evaluations used different test digits ({listed}), so their numbers are not strictly comparable."


def sanity_warnings(evals: list[Evaluation]) -> list[tuple[str, str]]:
    """(row, warning) for each sanity warning the evaluations recorded. pixgen evaluate prefixes
    each with its defence ("dent: …"), so a warning is named by the row it concerns."""
    out = []
    for ev in evals:
        for warning in ev.doc.get("warnings") or []:
            defence, _, text = str(warning).partition(": ")
            if defence in ev.doc["defenses"] and text:
                out.append((row_label(ev, defence), text))
            else:
                out.append((ev.label, str(warning)))
    return out


def attack_digits(ev: Evaluation) -> np.ndarray | None:
    """The test-split indices of the evaluation's attack digits, which pair its outcomes with another's."""
    group = assets.open_asset(ev.path, stage="evaluate")
    return assets.read(group, "attack_indices") if "attack_indices" in group else None


def worst_outcomes(ev: Evaluation, defence: str, attack: str) -> np.ndarray | None:
    """Per ε and attack digit (E, M), whether the defence got the digit right under every one of
    its threats: the per-digit AND behind the entry's `worst`, read from the stored outcomes;
    None when the evaluation stored none."""
    entry = ev.doc["defenses"][defence].get(attack)
    if attack == ALL_ATTACKS:
        return _all_attacks_outcomes(ev, defence, entry)
    group = assets.open_asset(ev.path, stage="evaluate")
    names = [f"{defence}_{attack}_{t}" for t in threats(entry or {})]
    if not names or not all(n in group for n in names):
        return None
    return np.logical_and.reduce([assets.read(group, n).astype(bool) for n in names])


def _all_attacks_outcomes(ev: Evaluation, defence: str, entry: dict | None) -> np.ndarray | None:
    """(E, M) per ε of the all-attacks entry: the AND of the worst outcomes of the attacks it lists there."""
    if not entry:
        return None
    # each attack's outcomes read once, not once per ε
    read = {name: worst_outcomes(ev, defence, name) for name in dict.fromkeys(n for names in entry["attacks"] for n in names)}
    rows = []
    for eps, names in zip(entry["eps"], entry["attacks"]):
        parts = []
        for name in names:
            outcome, at = read[name], eps_index(ev.doc["defenses"][defence][name]["eps"], eps)
            if outcome is None or at is None:
                return None
            parts.append(outcome[at])
        rows.append(np.logical_and.reduce(parts))
    return np.stack(rows)


# ---------------------------------------------------------------- certificates


CERTIFY_METHODS = ("ibp", "dual", "dual-opt", "lp")  # the order of the columns: roughly loosest to tightest


@dataclass(frozen=True)
class Certificate:
    """One `pixgen certify` asset. network: the label of the network it certifies (an evaluation's
    label when the weights hashes match, else the model's arch and weights hash); key: its column,
    the method (with dual-opt's steps when not the default) and ε."""

    path: Path
    network: str
    weights: str
    method: str
    eps: float
    key: str
    count: int
    accuracy: float
    asset_id: str


def _certify_key(config: dict, eps: float) -> str:
    from ..certify import STEPS

    method = str(config.get("method"))
    steps = config.get("steps")
    name = f"{method} ({steps} steps)" if method == "dual-opt" and steps not in (None, STEPS) else method
    return f"{name} {eps_text(eps)}"


def load_certificates(paths, evals: list[Evaluation]) -> list[Certificate]:
    """Every certify asset named, each once, labelled by the network it certifies: the evaluation
    whose model.weights_hash equals the asset's inputs.model, else '<arch> <hash>' (one label per
    distinct weights hash, so assets of one network share a row)."""
    by_hash = {}
    for ev in evals:
        by_hash.setdefault(ev.doc["model"].get("weights_hash"), ev.label)
    out = []
    for path in dict.fromkeys(Path(p) for p in paths or ()):
        group = assets.open_asset(path, stage="certify")
        attrs = dict(group.attrs)
        config, weights = attrs.get("config") or {}, (attrs.get("inputs") or {}).get("model")
        if not {"bounds", "indices"} <= set(group.array_keys()) or "eps" not in config or "certified_accuracy" not in attrs or not weights:
            raise PixgenError(f"{path} is a certify asset without its bounds, ε, certified accuracy or model hash; remake it with pixgen certify")
        network = by_hash.get(weights) or f"{attrs.get('model_arch', 'network')} {weights[:8]}"
        # pixel_eps: the ε certified, in pixels, whatever units --eps was given in (older assets: pixels).
        eps = float(attrs.get("pixel_eps", config["eps"]))
        out.append(Certificate(path, network, weights, str(config.get("method")), eps, _certify_key(config, eps), int(attrs.get("count", group["bounds"].shape[0])), float(attrs["certified_accuracy"]), assets.asset_id(attrs)))
    return out


def chosen(certs: list[Certificate]) -> dict[tuple[str, str], Certificate]:
    """One asset per (network, column): the one with the most digits (the first of equals)."""
    out = {}
    for c in certs:
        old = out.get((c.network, c.key))
        if old is None or c.count > old.count:
            out[(c.network, c.key)] = c
    return out


def networks(certs: list[Certificate], evals: list[Evaluation]) -> list[str]:
    """Rows of the certified table: the evaluated networks in report order, then the others."""
    named = {c.network for c in certs}
    return [ev.label for ev in evals if ev.label in named] + list(dict.fromkeys(c.network for c in certs if c.network not in {ev.label for ev in evals}))


def keys(certs: list[Certificate]) -> list[str]:
    """Columns of the certified table: by ε, then from the loosest bound to the tightest."""
    order = {m: i for i, m in enumerate(CERTIFY_METHODS)}
    firsts = {}
    for c in certs:
        firsts.setdefault(c.key, c)
    return sorted(firsts, key=lambda k: (firsts[k].eps, order.get(firsts[k].method, len(order)), k))


def pairs(lp, other) -> tuple[np.ndarray, np.ndarray]:
    """LP and other bounds over the (digit, wrong class) pairs of the digits both assets hold."""
    lp_index, other_index = lp["indices"][:], other["indices"][:]
    _, at_lp, at_other = np.intersect1d(lp_index, other_index, return_indices=True)
    a, b = lp["bounds"][:][at_lp], other["bounds"][:][at_other]
    wrong = np.isfinite(a) & np.isfinite(b)
    return a[wrong], b[wrong]


def bound_panels(certs: list[Certificate]) -> tuple[list, list[str]]:
    """The panels of the bounds figure, (network, lp asset, [(asset, lp bounds, its bounds)]): per
    network and ε, the lp asset with the most digits and, per dual/dual-opt column, the asset
    sharing the most digits with it; and a note for every pairing without a common digit (the
    certify sample depends on --count and --seed, so assets made with other counts share none)."""
    panels, notes = [], []
    for (network, _), lp in chosen(certs).items():
        if lp.method != "lp":
            continue
        group = assets.open_asset(lp.path, stage="certify")
        lp_digits = group["indices"][:]
        candidates = {}  # column → (asset, its group, digits shared with the lp asset)
        for c in certs:
            if c.network == network and c.method in ("dual", "dual-opt") and abs(c.eps - lp.eps) < EPS_TOL:
                other = assets.open_asset(c.path, stage="certify")
                common = len(np.intersect1d(lp_digits, other["indices"][:]))
                if c.key not in candidates or common > candidates[c.key][2]:
                    candidates[c.key] = (c, other, common)
        series = []
        for key in keys([c for c, *_ in candidates.values()]):
            c, other, common = candidates[key]
            if common:
                series.append((c, *pairs(group, other)))
            else:
                notes.append(f"{network}: the {key} asset {c.path} shares no test digit with the lp asset {lp.path}; "
                             "make both with the same --count and --seed to compare their bounds.")  # fmt: skip
        if series:
            panels.append((network, lp, series))
    return panels, notes
