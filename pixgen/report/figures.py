"""The report's figures, each written as PNG (embedded in the page) and SVG (for papers):
accuracy against ε with the worst case's 95% interval as a band, MNIST-C bars, reliability
diagrams, ROC curves, the certify bounds against the LP's, and image grids of stored digits.

Every number drawn is read from an asset; the adversarial digits are those pixgen evaluate stored
(`examples_<attack>`), so drawing them runs no model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import PixgenError, assets, data
from .families import families
from .load import ATTACKS, EPS_TOL, Evaluation, defence_label, eps_text, row_label, threats
from .load import rows as table_rows
from .settings import ReportConfig

ROBUST_METHODS = ("pgd", "dual", "ibp")
LINES = ("--s", ":^", "-.v")  # one style per DENT defence, in the order an evaluation lists them


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, folder: Path, name: str) -> Path:
    """PNG (embedded in the page) and SVG (for papers) of one figure; returns the PNG."""
    import matplotlib

    # A fixed salt and no date, so the same inputs give the same SVG bytes.
    with matplotlib.rc_context({"svg.hashsalt": "pixgen-report"}):
        fig.savefig(folder / f"{name}.svg", metadata={"Date": None})
    fig.savefig(folder / f"{name}.png", dpi=150)
    return folder / f"{name}.png"


def _colors(evals: list[Evaluation]) -> dict[str, tuple]:
    """One colour per family (the seeds of one network share it), keyed by each evaluation's label."""
    import matplotlib

    groups = families(evals)
    cmap = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    return {ev.label: cmap(i % cmap.N) for i, family in enumerate(groups) for ev in family.members}


def _mean_curve(members, defence: str, attack: str):
    """(ε, mean worst accuracy in %, (lowest, highest) over the members) when every member ran the
    same ε grid for this defence and attack; None otherwise."""
    entries = [ev.doc["defenses"].get(defence, {}).get(attack) for ev in members]
    if any(not e for e in entries) or any(len(e["eps"]) != len(entries[0]["eps"]) or not np.allclose(e["eps"], entries[0]["eps"], atol=EPS_TOL) for e in entries):
        return None
    worst = 100 * np.array([e["worst"] for e in entries], dtype=float)
    return np.asarray(entries[0]["eps"]), worst.mean(0), (worst.min(0), worst.max(0))


def _line_style(defended: list[str], defence: str) -> tuple[str, str]:
    """(line style, marker) of a defence's curves: solid with dots without one, LINES per DENT defence."""
    style = "-o" if defence == "none" else LINES[defended.index(defence) % len(LINES)]
    return style[:-1], style[-1]


def _defence_legend(defended: list[str], defence: str, entry: dict):
    from matplotlib.lines import Line2D

    ls, marker = _line_style(defended, defence)
    label = "no defence" if defence == "none" else f"{defence}, worst of {', '.join(threats(entry))}"
    return Line2D([], [], color="k", ls=ls, marker=marker, ms=4, label=label)


def accuracy_figure(evals: list[Evaluation], attack: str, config: ReportConfig, folder: Path) -> Path | None:
    """Accuracy against ε, one colour per model: solid without defence, dashed (dotted) the worst
    case of its first (second) DENT defence, dash-dot DENT's standard attack alone; each worst case
    with its 95% interval as a band; a dotted vertical line at a robust model's training ε. A
    network trained with several seeds is one colour: each seed drawn thin and faint, their mean
    bold, the range over seeds as its band. The model legend says what each DENT adapted, the line
    legend which threats a worst case covers."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not any(attack in results for ev in evals for results in ev.doc["defenses"].values()):
        return None
    colors = _colors(evals)
    groups = families(evals)
    fig = _new_figure(11, 5.5)
    ax = fig.add_subplot()
    styles = {}
    trained = {}  # training ε → colours of the robust models trained at it
    top = 0.5
    for family in groups:
        several = len(family.members) > 1
        for ev in family.members:
            color = colors[ev.label]
            defended = [d for d in ev.doc["defenses"] if d != "none"]
            for defence, results in ev.doc["defenses"].items():
                entry = results.get(attack)
                if not entry:
                    continue
                eps, worst = np.asarray(entry["eps"]), 100 * np.asarray(entry["worst"])
                top = max(top, float(eps.max()))
                ls, marker = _line_style(defended, defence)
                if several:
                    ax.plot(eps, worst, ls=ls, color=color, lw=0.8, alpha=0.35)
                    styles["seed"] = Line2D([], [], color="k", lw=0.8, alpha=0.35, label="one seed of a family")
                    continue
                ax.plot(eps, worst, ls=ls, marker=marker, color=color, ms=4, lw=1.8)
                if "worst_interval" in entry:
                    band = 100 * np.asarray(entry["worst_interval"])
                    ax.fill_between(eps, band[:, 0], band[:, 1], color=color, alpha=0.12, lw=0)
                    styles["band"] = Patch(color="k", alpha=0.12, lw=0, label="95% interval of the worst case")
                styles.setdefault(defence, _defence_legend(defended, defence, entry))
                if defence != "none" and config.dent_standard and "standard" in entry:
                    ax.plot(eps, 100 * np.asarray(entry["standard"]), "-.", color=color, lw=1.0, alpha=0.6)
                    styles["standard"] = Line2D([], [], color="k", ls="-.", lw=1.0, alpha=0.6, label="DENT, standard attack only")
        if several:
            first = family.members[0]
            defended = [d for d in first.doc["defenses"] if d != "none"]
            for defence in first.doc["defenses"]:
                curve = _mean_curve(family.members, defence, attack)
                if curve is None:
                    continue
                eps, mean, (lo, hi) = curve
                ls, marker = _line_style(defended, defence)
                ax.plot(eps, mean, ls=ls, marker=marker, color=colors[first.label], ms=4, lw=2.2)
                ax.fill_between(eps, lo, hi, color=colors[first.label], alpha=0.12, lw=0, hatch="..")
                styles["seeds"] = Patch(facecolor="none", edgecolor="k", hatch="..", lw=0, label="a family's mean (bold) and range over its seeds")
                styles.setdefault(defence, _defence_legend(defended, defence, first.doc["defenses"][defence][attack]))
        for ev in family.members[:1]:
            eps = ev.doc["model"].get("eps") if ev.doc["model"].get("method") in ROBUST_METHODS else None
            if eps is not None:
                trained.setdefault(eps, []).append(colors[ev.label])
    for eps, shared in trained.items():
        # Models trained at the same ε share the line, in segments of their colours, so none hides another.
        for k, color in enumerate(shared):
            ax.axvline(eps, k / len(shared), (k + 1) / len(shared), color=color, ls=":", lw=1.6)
        styles["train"] = Line2D([], [], color="k", ls=":", lw=1.6, label="training ε (robust models)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, 101)
    ax.set_xticks(np.linspace(0, top, int(round(top / 0.1)) + 1 if top <= 1 else 6))
    ax.set_xlabel(f"L∞ budget {eps_text()}, images in [0, 1]")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Test accuracy under {ATTACKS[attack]} against ε")
    ax.grid(alpha=0.3)
    # Outside the axes: inside, they would hide the curves' tails, where the robust models differ.
    models = []
    for family in groups:
        ev = family.members[0]
        name = ev.label if len(family.members) == 1 else f"{family.label}, {len(family.members)} seeds"
        models.append(Line2D([], [], color=colors[ev.label], lw=2.5, label="; ".join([name, *(defence_label(ev, d) for d in ev.doc["defenses"] if d != "none")])))
    fig.legend(handles=models, title="model; DENT (what it adapts)", loc="outside right upper", fontsize=9)
    fig.legend(handles=list(styles.values()), title="line", loc="outside right lower", fontsize=9)
    return _save(fig, folder, f"{attack}_accuracy")


def _series(evals: list[Evaluation]) -> list[tuple[Evaluation, str, dict]]:
    return [(ev, d, ev.doc["defenses"][d]) for ev, d in table_rows(evals)]


def _bars(ax, groups: list[str], series: list[tuple[str, tuple, bool, list]]) -> None:
    """Grouped bars: per group one bar per series (label, colour, hatched, values; None: no bar)."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for k, (label, color, hatched, values) in enumerate(series):
        shown = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.bar(x - 0.4 + width * (k + 0.5), shown, width, label=label, color=color, edgecolor="white" if not hatched else "black", hatch="///" if hatched else None, lw=0.5)
    ax.set_xticks(x, groups)
    ax.grid(axis="y", alpha=0.3)


def corruption_figure(evals: list[Evaluation], folder: Path) -> Path | None:
    series = [(ev, d, r["corruptions"]) for ev, d, r in _series(evals) if r.get("corruptions")]
    if not series:
        return None
    names = list(dict.fromkeys(n for _, _, c in series for n in c["accuracy"]))
    groups = ["clean (same digits)", *names, "mean", "mean w/o affine"]
    colors = _colors(evals)
    bars = []
    for ev, d, c in series:
        values = [c.get("identity_accuracy"), *(c["accuracy"].get(n) for n in names), c.get("mean"), c.get("mean_without_affine")]
        bars.append((row_label(ev, d), colors[ev.label], d != "none", [None if v is None else 100 * v for v in values]))
    fig = _new_figure(min(16, max(10, 0.12 * len(groups) * len(series) + 4)), 5.5)
    ax = fig.add_subplot()
    _bars(ax, groups, bars)
    ax.set_xticks(ax.get_xticks(), groups, rotation=40, ha="right")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.axvline(len(groups) - 2.5, color="gray", lw=0.8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("MNIST-C: accuracy per corruption (hatched: DENT)")
    fig.legend(*ax.get_legend_handles_labels(), fontsize=9, ncols=min(len(bars), 4), loc="outside lower center")
    return _save(fig, folder, "mnist_c")


def _defense_lines(ev: Evaluation, key: str) -> list[tuple[str, str, dict]]:
    """(defence, line style, entry) for each defence of `ev` whose results hold `key`."""
    return [(d, "-" if d == "none" else "--", r[key]) for d, r in ev.doc["defenses"].items() if r.get(key)]


def calibration_figure(evals: list[Evaluation], folder: Path) -> Path | None:
    """Reliability diagrams, one panel per model: accuracy against mean confidence per
    equal-width bin (solid: no defence, dashed: DENT), and below, the digits per bin."""
    shown = [ev for ev in evals if any("bins" in c for _, _, c in _defense_lines(ev, "calibration"))]
    if not shown:
        return None
    colors = _colors(evals)
    fig = _new_figure(min(18, 3.3 * len(shown) + 1), 6)
    axes = fig.subplots(2, len(shown), squeeze=False, sharex=True, height_ratios=[3, 1])
    for ev, ax, count_ax in zip(shown, axes[0], axes[1]):
        ax.plot([0, 1], [0, 100], color="gray", lw=0.8)
        for d, style, c in _defense_lines(ev, "calibration"):
            bins = c["bins"]
            kept = [k for k, n in enumerate(bins["count"]) if n]
            ax.plot([bins["confidence"][k] for k in kept], [100 * bins["accuracy"][k] for k in kept], style, marker="o", ms=3, color=colors[ev.label], label=f"{'no defence' if d == 'none' else defence_label(ev, d)} (ECE {100 * c['ece']:.2f}%)")
            edges = np.asarray(bins["edges"])
            count_ax.stairs(bins["count"], edges, ls=style, color=colors[ev.label])
        ax.set_title(ev.label, fontsize=9)
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        count_ax.set_yscale("log")
        count_ax.set_xlim(0, 1)
        count_ax.set_xlabel("confidence (max softmax)")
        count_ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy in bin (%)")
    axes[1][0].set_ylabel("digits per bin")
    fig.suptitle("Reliability on the clean test digits (15 equal-width bins; diagonal: perfect calibration)")
    return _save(fig, folder, "calibration")


def ood_figure(evals: list[Evaluation], folder: Path) -> Path | None:
    """ROC curves, one panel per out-of-distribution set, one colour per model (dashed: DENT)."""
    from matplotlib.ticker import FuncFormatter

    sets = list(dict.fromkeys(s for ev in evals for _, _, o in _defense_lines(ev, "ood") for s, v in o.items() if "roc" in v))
    if not sets:
        return None
    colors = _colors(evals)
    fig = _new_figure(min(18, 4.2 * len(sets) + 2.5), 4.8)
    axes = fig.subplots(1, len(sets), squeeze=False, sharey=True)[0]
    chance = np.logspace(-1, 2, 50)
    for ax, name in zip(axes, sets):
        ax.plot(chance, chance, color="gray", lw=0.8, ls=":")
        for ev in evals:
            for d, style, o in _defense_lines(ev, "ood"):
                if "roc" in o.get(name, {}):
                    roc = o[name]["roc"]
                    ax.plot(100 * np.asarray(roc["fpr"]), 100 * np.asarray(roc["tpr"]), style, color=colors[ev.label], lw=1.5, label=f"{row_label(ev, d)}: AUROC {100 * o[name]['auroc']:.1f}")
        ax.axhline(95, color="gray", lw=0.6, ls="--")
        ax.set_title(f"MNIST against {name}", fontsize=10)
        # Log FPR: every network flags most outliers at a few % FPR, where a linear axis crowds them.
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("false-positive rate (%, log scale)")
        ax.set_xlim(0.1, 100)
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower right")
    axes[0].set_ylabel("true-positive rate (%)")
    fig.suptitle("Out-of-distribution detection by max softmax: ROC curves (dashed: DENT; dotted: chance; grey dashed: 95% TPR)")
    return _save(fig, folder, "ood")


def grid_figure(image_rows: list[np.ndarray], labels: list[str] | None, title: str, ncol: int, folder: Path, name: str, wrong=None, predicted=None) -> Path:
    """Rows of uint8 images (k ≤ ncol, 28, 28) tiled by pixgen.grids.tile, with a label per row;
    `wrong`/`predicted` (per row, per image) frame misclassified digits in red with their class."""
    from matplotlib.patches import Rectangle

    from ..grids import tile

    h, w = image_rows[0].shape[1:]
    padded = [np.concatenate([r, np.full((ncol - len(r), h, w), 128, np.uint8)]) for r in image_rows]
    picture = tile(np.concatenate(padded), ncol=ncol, scale=1)
    label_width = 0 if labels is None else 0.075 * max(len(s) for s in labels) + 0.3
    px = 0.022  # inches per image pixel: a 28-pixel digit is 0.62 in
    fig = _new_figure(picture.shape[1] * px + label_width + 0.3, picture.shape[0] * px + 0.6)
    ax = fig.add_subplot()
    ax.imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    centres = [1 + r * (h + 1) + h / 2 for r in range(len(image_rows))]
    ax.set_yticks(centres if labels else [], labels or [])
    ax.tick_params(axis="y", length=0, labelsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    for r, row_wrong in enumerate(wrong or []):
        for c, bad in enumerate(row_wrong):
            if bad:
                x0, y0 = 1 + c * (w + 1) - 0.5, 1 + r * (h + 1) - 0.5
                ax.add_patch(Rectangle((x0, y0), w, h, fill=False, ec="red", lw=1.5))
                ax.text(x0 + w - 1, y0 + 1, str(predicted[r][c]), color="white", fontsize=7, ha="right", va="top", weight="bold", bbox={"facecolor": "red", "edgecolor": "none", "pad": 1})
    ax.set_title(title, fontsize=10)
    return _save(fig, folder, name)


def mixing_grid(path, kind: str, config: ReportConfig, folder: Path) -> Path:
    group = assets.open_asset(path)
    if "images" not in group or group["images"].ndim != 3:
        raise PixgenError(f"{path} is not a mixing set (needs an images array (N, H, W)); pass a pixgen {kind} asset")
    images = assets.read(group, "images", slice(config.grid_count))
    rows = [images[i : i + config.columns] for i in range(0, len(images), config.columns)]
    return grid_figure(rows, None, f"{kind} mixing pictures: the first {len(images)} of {group['images'].shape[0]:,}", config.columns, folder, f"{kind}_grid")


def shards_grid(path, config: ReportConfig, folder: Path, data_root) -> Path:
    group = assets.open_asset(path, stage="augment")
    images = group["images"]
    n = min(config.columns, images.shape[1])
    clean = data.load(group.attrs["config"].get("dataset", "mnist"), "train", data_root)[0][group["indices"][:n]]
    epochs = min(images.shape[0], 4)
    rows = [clean] + [assets.read(group, "images", (e, slice(n))) for e in range(epochs)]
    labels = ["original"] + [f"PixMix, epoch {e}" for e in range(epochs)]
    return grid_figure(rows, labels, f"PixMix shards: the first {n} training digits and their PixMix copies", config.columns, folder, "shards_grid")


def mnist_c_grid(path, config: ReportConfig, folder: Path, data_root) -> Path:
    group = assets.open_asset(path, stage="corrupt")
    n = min(config.columns, group["labels"].shape[0])
    clean = data.load(group.attrs["config"].get("dataset", "mnist"), "test", data_root)[0][group["indices"][:n]]
    names = list(group.attrs["corruptions"])
    rows = [clean] + [assets.read(group, "images", (c, slice(n))) for c in range(len(names))]
    return grid_figure(rows, ["clean", *names], "MNIST-C: the same test digits under each corruption", config.columns, folder, "mnist_c_grid")


def adversarial_grid(evaluation: Evaluation, shown_eps, folder: Path, name: str) -> Path | None:
    """The adversarial digits an evaluation stored (static network, first attack digits), a row
    per attack and ε of `shown_eps` that it ran, wrong predictions framed."""
    group = assets.open_asset(evaluation.path, stage="evaluate")
    labels = assets.read(group, "attack_labels")
    rows, row_labels, wrong, predicted = [], [], [], []
    for attack, title in ATTACKS.items():
        if f"examples_{attack}" not in group:
            continue
        images, guesses = assets.read(group, f"examples_{attack}"), assets.read(group, f"examples_{attack}_predicted")
        truth = labels[: images.shape[1]]
        entry = evaluation.doc["defenses"]["none"][attack]
        factor = evaluation.doc.get("eps_to_pixel", 1.0)
        for eps, stated, row, guess in zip(entry["eps"], entry.get("stated_eps", entry["eps"]), images, guesses):
            if not any(abs(eps - e) < EPS_TOL for e in shown_eps):
                continue
            bad = guess != truth
            rows.append(row)
            row_labels.append(f"{title} {eps_text(eps, stated, factor)}: {int((~bad).sum())}/{len(truth)} correct")
            wrong.append(bad.tolist())
            predicted.append(guess.tolist())
    if not rows:
        return None
    heading = f"Adversarial digits for {evaluation.label}; red frame: misclassified, as the class in its corner"
    return grid_figure(rows, row_labels, heading, len(rows[0]), folder, name, wrong, predicted)


def bounds_figure(panels: list, folder: Path) -> Path | None:
    """Per (network, ε) with an lp asset and a dual and/or dual-opt one: their bounds against the
    LP's over the common (digit, wrong class) pairs, the diagonal y = x, and below, LP − bound."""
    if not panels:
        return None
    ncol = min(len(panels), 3)
    nrow = -(-len(panels) // ncol)
    fig = _new_figure(5.6 * ncol, 7.2 * nrow)
    subfigs = np.atleast_1d(fig.subfigures(nrow, ncol, squeeze=False)).ravel()
    styles = {"dual": {"marker": "o", "s": 26, "facecolors": "none", "edgecolors": "tab:red", "linewidths": 1.0}, "dual-opt": {"marker": "x", "s": 18, "color": "tab:blue", "linewidths": 1.0}}
    for sub, (network, lp, series) in zip(subfigs, panels):
        top, bottom = sub.subplots(2, 1, height_ratios=(3, 1.3), sharex=True)
        values = np.concatenate([np.concatenate([x, y]) for _, x, y in series])
        lo, hi = float(values.min()), float(values.max())
        pad = 0.05 * (hi - lo or 1)
        top.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="gray", lw=1, ls="--", label="y = x (as tight as the LP)", zorder=1)
        for c, x, y in series:
            label = c.key.rsplit(" ε=", 1)[0]  # the method, and dual-opt's steps when not the default
            style = styles.get(label, {"marker": "+", "s": 26, "color": "tab:green", "linewidths": 1.0})
            top.scatter(x, y, label=f"{label} bound ({len(x)} pairs)", zorder=2, **style)
            bottom.scatter(x, x - y, zorder=2, **style)
        for ax in (top, bottom):
            ax.axvline(0, color="k", lw=0.6, alpha=0.5)
            ax.grid(alpha=0.3)
        top.axhline(0, color="k", lw=0.6, alpha=0.5)
        bottom.axhline(0, color="gray", lw=1, ls="--")
        top.set_xlim(lo - pad, hi + pad)
        top.set_ylim(lo - pad, hi + pad)
        top.set_ylabel("dual / dual-opt bound on the margin (logit units)")
        bottom.set_ylabel("LP − bound (logit units)")
        bottom.set_xlabel("LP bound on the margin (logit units)")
        top.set_title(f"{network}, {eps_text(lp.eps)}: margin lower bounds against the LP\nover the (digit, wrong class) pairs of the digits in both assets", fontsize=10)
        top.legend(fontsize=8, loc="upper left")
    return _save(fig, folder, "certify_bounds")


def claim_figure(found, folder: Path) -> Path | None:
    """The claim's conditions side by side, a panel per PixMix network (its seeds faint, their
    mean bold) with the robust networks it meets (their means), FGSM, no defence; a dotted
    horizontal line at 20% and a shaded band above ε 0.24, where the claim puts PixMix ahead."""
    from matplotlib.lines import Line2D

    from .claim import FLOOR, FROM, mean_curve, stated_curve, units

    if not found:
        return None
    panels = list({row.pixmix.label: row.pixmix for row in found}.values())
    fig = _new_figure(max(7.0, 4.2 * len(panels)), 5.2)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    robust = list({row.robust.label: row.robust for row in found}.values())
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colors = {f.label: cmap((i + 1) % cmap.N) for i, f in enumerate(robust)}
    for ax, pixmix in zip(axes, panels):
        shown = next(row.units for row in found if row.pixmix is pixmix)
        for ev in pixmix.members:
            eps, worst = stated_curve(ev)
            ax.plot(eps, 100 * worst, color=cmap(0), lw=0.8, alpha=0.35)
        top = 0.5
        for family, color in [(pixmix, cmap(0)), *((row.robust, colors[row.robust.label]) for row in found if row.pixmix is pixmix)]:
            eps, mean = mean_curve(family)
            top = max(top, float(eps.max()))
            ax.plot(eps, 100 * mean, "-o", color=color, ms=3, lw=2.0)
        ax.axhline(100 * FLOOR, color="k", ls=":", lw=1)
        ax.axvspan(FROM, top, color="k", alpha=0.05, lw=0)
        ax.set_xlim(0, top)
        ax.set_ylim(0, 101)
        ax.set_title(f"{pixmix.label}\n({len(pixmix.members)} seed(s), ε in {shown} units)", fontsize=9)
        ax.set_xlabel(f"FGSM ε ({shown} units)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    handles = [Line2D([], [], color=cmap(0), lw=2, label="PixMix: mean over seeds (each seed faint)")]
    handles += [Line2D([], [], color=colors[f.label], lw=2, label=f"{f.label}: mean of {len(f.members)} seed(s), ε in {units(f.members[0])} units") for f in robust]
    handles += [Line2D([], [], color="k", ls=":", lw=1, label=f"{FLOOR:.0%}; shaded: ε > {FROM:g}")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8)
    return _save(fig, folder, "claim")
