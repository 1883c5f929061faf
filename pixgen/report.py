"""The report: one self-contained HTML page (and a Markdown table) comparing evaluated models.

`run(config, evals, out, ...)` reads `pixgen evaluate` JSONs (files or folders of them) and, when
given, image assets and one model folder, and writes to `out`: accuracy-against-ε figures for
FGSM and PGD, MNIST-C bars, reliability diagrams, ROC curves per OOD set, image grids (each as
PNG and SVG), `summary.md` (the table of every scalar metric per model and defence), `index.html` (the table and
every figure embedded as data URIs, so the page is one file) and `report.json` (inputs and config).
Certify assets (`certify=`) add a certified-accuracy table (network × bound and ε, matched to the
evaluations by weights hash) and `certify_bounds`, the dual and dual-opt bounds against the LP's.

The report is written into a temporary folder beside `out` and renamed into place at the end, so
a folder named `out` is always a whole report.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import PixgenError, __version__, assets, data
from .config import config_hash, to_dict

MARKER = "report.json"
ATTACKS = {"fgsm": "FGSM", "pgd": "PGD-40"}
ROBUST_METHODS = ("pgd", "dual", "ibp")
LINES = ("--s", ":^", "-.v")  # one style per DENT defence, in the order an evaluation lists them
EPS_TOL = 1e-9


@dataclass(frozen=True)
class ReportConfig:
    """table_eps: the ε of the FGSM/PGD columns of the summary table (an ε an evaluation did not
    run is shown as missing, never interpolated); dent_standard: also draw DENT under the standard
    attack, beside its worst case; grid_count: mixing pictures shown per set; columns: digits per
    row of the shard, MNIST-C and mixing grids; adv_eps: the ε of the adversarial grids' rows
    (each evaluation's stored adversarial digits)."""

    table_eps: tuple[float, ...] = (0.1, 0.2, 0.3)
    dent_standard: bool = True
    grid_count: int = 48
    columns: int = 12
    adv_eps: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)

    def __post_init__(self):
        if any(not e >= 0 for e in (*self.table_eps, *self.adv_eps)):
            raise PixgenError(f"report ε must be ≥ 0, got {min((*self.table_eps, *self.adv_eps))}")
        for name in ("grid_count", "columns"):
            if getattr(self, name) < 1:
                raise PixgenError(f"{name} must be at least 1, got {getattr(self, name)}")


# ---------------------------------------------------------------- inputs


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
        for attack in ("fgsm", "pgd", "autoattack"):
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
        seen[label] = seen.get(label, 0) + 1
        # The same model evaluated twice (other configs, other test sets) stays two lines.
        evals.append(Evaluation(path, label if seen[label] == 1 else f"{label} #{seen[label]}", doc))
    return evals


def _rows(evals: list[Evaluation]) -> list[tuple[Evaluation, str]]:
    """(evaluation, defence) pairs, the rows of the table and the series of the bar charts."""
    return [(ev, d) for ev in evals for d in ev.doc["defenses"]]


def _row_label(ev: Evaluation, defense: str) -> str:
    return ev.label if defense == "none" else f"{ev.label} + {defense.upper()}"


# ---------------------------------------------------------------- the summary table


@dataclass(frozen=True)
class Column:
    header: str
    better: str  # "max" or "min"
    decimals: int
    values: tuple  # one per row, in %, None where the evaluation lacks it


def _at_eps(entry: dict | None, eps: float) -> float | None:
    if not entry:
        return None
    for e, v in zip(entry["eps"], entry["worst"]):
        if abs(e - eps) < EPS_TOL:
            return v
    return None


def _get(results: dict, *keys):
    for key in keys:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def columns(evals: list[Evaluation], config: ReportConfig) -> list[Column]:
    """Every scalar metric that at least one row has, as percentages."""
    rows = [ev.doc["defenses"][d] for ev, d in _rows(evals)]
    specs = [("clean acc.", "max", 1, lambda r: _get(r, "clean", "accuracy"))]
    for attack, name in ATTACKS.items():
        specs += [(f"{name} ε={e:g}", "max", 1, lambda r, a=attack, e=e: _at_eps(r.get(a), e)) for e in config.table_eps]
    for e in sorted({e for r in rows for e in (_get(r, "autoattack", "eps") or [])}):
        specs.append((f"AutoAttack ε={e:g}", "max", 1, lambda r, e=e: _at_eps(r.get("autoattack"), e)))
    specs += [
        ("MNIST-C mean", "max", 1, lambda r: _get(r, "corruptions", "mean")),
        ("MNIST-C mean w/o affine", "max", 1, lambda r: _get(r, "corruptions", "mean_without_affine")),
        ("RMS calib. error", "min", 2, lambda r: _get(r, "calibration", "rms")),
        ("ECE", "min", 2, lambda r: _get(r, "calibration", "ece")),
    ]
    for ood in dict.fromkeys(name for r in rows for name in (r.get("ood") or {})):
        specs += [
            (f"{ood} AUROC", "max", 1, lambda r, o=ood: _get(r, "ood", o, "auroc")),
            (f"{ood} AUPR", "max", 1, lambda r, o=ood: _get(r, "ood", o, "aupr")),
            (f"{ood} FPR95", "min", 1, lambda r, o=ood: _get(r, "ood", o, "fpr95")),
        ]
    specs += [
        ("consistency", "max", 1, lambda r: _get(r, "consistency", "consistency")),
        ("flip rate", "min", 2, lambda r: _get(r, "consistency", "flip_rate")),
    ]
    for e in sorted({_get(r, "certify", "eps") for r in rows} - {None}):
        specs.append((f"certified ε={e:g}", "max", 1, lambda r, e=e: _get(r, "certify", "accuracy") if _get(r, "certify", "eps") == e else None))
    out = []
    for header, better, decimals, get in specs:
        values = tuple(None if (v := get(r)) is None else 100 * float(v) for r in rows)
        if any(v is not None for v in values):
            out.append(Column(f"{header} (%)", better, decimals, values))
    return out


def best_rows(column: Column) -> set[int]:
    """Rows holding the column's best value as displayed (ties all count); none if fewer than two
    rows have a value, where "best" would mean nothing."""
    shown = {i: round(v, column.decimals) for i, v in enumerate(column.values) if v is not None}
    if len(shown) < 2:
        return set()
    best = (max if column.better == "max" else min)(shown.values())
    return {i for i, v in shown.items() if v == best}


def _arrow(column: Column) -> str:
    return "↑" if column.better == "max" else "↓"


def _test_sets(evals: list[Evaluation]) -> str | None:
    """A warning when the evaluations did not all use the same test digits."""
    by_set = {}
    for ev in evals:
        test = ev.doc.get("data", {})
        by_set.setdefault((test.get("test_count"), test.get("test_identity")), []).append(ev.label)
    if len(by_set) < 2:
        return None
    listed = "; ".join(f"{count} digits ({identity}): {', '.join(labels)}" for (count, identity), labels in by_set.items())
    return f"The evaluations used different test digits ({listed}), so their numbers are not strictly comparable."


TABLE_NOTE = (
    "All values in %. ↑: higher is better, ↓: lower is better; bold: best in its column. "
    "Attack columns give, for DENT, the worst case of its standard, transfer and adaptive attacks "
    "(a digit counts only if correct under all three); — : not evaluated."
)


def markdown(evals: list[Evaluation], cols: list[Column], certs: list[Certificate] = (), cert_notes: list[str] = ()) -> str:
    rows = _rows(evals)
    best = [best_rows(c) for c in cols]
    lines = [
        "| model | defence | " + " | ".join(f"{c.header} {_arrow(c)}" for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for i, (ev, d) in enumerate(rows):
        cells = []
        for c, b in zip(cols, best):
            v = c.values[i]
            text = "—" if v is None else f"{v:.{c.decimals}f}"
            cells.append(f"**{text}**" if i in b else text)
        lines.append(f"| {ev.label} | {d} | " + " | ".join(cells) + " |")
    notes = [TABLE_NOTE] + ([CERTIFIED_COLUMNS_NOTE] if _asset_columns(cols) else []) + ([w] if (w := _test_sets(evals)) else [])
    text = "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"
    return text + ("\n" + certified_markdown(certs, evals, cert_notes) if certs else "")


def _html_table(evals: list[Evaluation], cols: list[Column]) -> str:
    rows = _rows(evals)
    best = [best_rows(c) for c in cols]
    direction = {"max": "higher is better", "min": "lower is better"}
    head = "".join(f'<th title="{direction[c.better]}">{html.escape(c.header)} {_arrow(c)}</th>' for c in cols)
    body = []
    for i, (ev, d) in enumerate(rows):
        cells = []
        for c, b in zip(cols, best):
            v = c.values[i]
            text = "—" if v is None else f"{v:.{c.decimals}f}"
            cells.append(f'<td class="best"><b>{text}</b></td>' if i in b else f"<td>{text}</td>")
        body.append(f"<tr><th>{html.escape(ev.label)}</th><td>{d}</td>{''.join(cells)}</tr>")
    return f"<table><thead><tr><th>model</th><th>defence</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


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


def _certify_key(config: dict) -> str:
    from .certify import STEPS

    method = str(config.get("method"))
    steps = config.get("steps")
    name = f"{method} ({steps} steps)" if method == "dual-opt" and steps not in (None, STEPS) else method
    return f"{name} ε={float(config['eps']):g}"


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
        out.append(Certificate(path, network, weights, str(config.get("method")), float(config["eps"]), _certify_key(config), int(attrs.get("count", group["bounds"].shape[0])), float(attrs["certified_accuracy"]), assets.asset_id(attrs)))
    return out


def _chosen(certs: list[Certificate]) -> dict[tuple[str, str], Certificate]:
    """One asset per (network, column): the one with the most digits (the first of equals)."""
    chosen = {}
    for c in certs:
        old = chosen.get((c.network, c.key))
        if old is None or c.count > old.count:
            chosen[(c.network, c.key)] = c
    return chosen


def _networks(certs: list[Certificate], evals: list[Evaluation]) -> list[str]:
    """Rows of the certified table: the evaluated networks in report order, then the others."""
    named = {c.network for c in certs}
    return [ev.label for ev in evals if ev.label in named] + list(dict.fromkeys(c.network for c in certs if c.network not in {ev.label for ev in evals}))


def _keys(certs: list[Certificate]) -> list[str]:
    order = {m: i for i, m in enumerate(CERTIFY_METHODS)}
    firsts = {}
    for c in certs:
        firsts.setdefault(c.key, c)
    return sorted(firsts, key=lambda k: (firsts[k].eps, order.get(firsts[k].method, len(order)), k))


def certified_table(certs: list[Certificate], evals: list[Evaluation]) -> tuple[list[str], list[str], list[list[Certificate | None]], list[set[int]]]:
    """(networks, column keys, cells [network][column], bold rows per column)."""
    chosen, networks, keys = _chosen(certs), _networks(certs, evals), _keys(certs)
    cells = [[chosen.get((n, k)) for k in keys] for n in networks]
    best = [best_rows(Column(k, "max", 1, tuple(None if row[j] is None else 100 * row[j].accuracy for row in cells))) for j, k in enumerate(keys)]
    return networks, keys, cells, best


def _cert_text(c: Certificate | None) -> str:
    return "—" if c is None else f"{100 * c.accuracy:.1f} (n={c.count})"


CERTIFY_NOTE = (
    "Certified accuracy in %: the fraction of a class-balanced sample of n MNIST test digits (pixgen certify) "
    "whose nine margin lower bounds over the L∞ ball of radius ε (intersected with [0, 1]) are all > 0. "
    "Columns: the bound (dual ≤ dual-opt ≤ lp, the LP tightest; ibp is the loosest on networks not trained for it, "
    "but can beat dual on IBP-trained ones) and ε; bold: best in its column; — : no asset. "
    "A network is named by the evaluation whose weights hash matches the asset's, else by its arch and weights hash."
)

CERTIFIED_COLUMNS_NOTE = (
    "certified <bound> ε: the --certify assets of the network (on its row without DENT; digit counts in the certified-accuracy "
    "table); certified ε without a bound: pixgen evaluate's own dual certificate."
)


def _asset_columns(cols: list[Column]) -> bool:
    """Whether the summary table has columns from certify assets."""
    return any(c.header.startswith(tuple(f"certified {m} " for m in CERTIFY_METHODS)) for c in cols)


def certified_markdown(certs: list[Certificate], evals: list[Evaluation], notes: list[str] = ()) -> str:
    networks, keys, cells, best = certified_table(certs, evals)
    lines = ["## Certified accuracy", "", "| network | " + " | ".join(f"{k} (%) ↑" for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for i, (network, row) in enumerate(zip(networks, cells)):
        lines.append(f"| {network} | " + " | ".join(f"**{_cert_text(c)}**" if i in b else _cert_text(c) for c, b in zip(row, best)) + " |")
    return "\n".join(lines) + "\n\n" + "\n\n".join([CERTIFY_NOTE, *notes]) + "\n"


def _certified_html(certs: list[Certificate], evals: list[Evaluation], notes: list[str] = ()) -> str:
    networks, keys, cells, best = certified_table(certs, evals)
    head = "".join(f'<th title="higher is better">{html.escape(k)} (%) ↑</th>' for k in keys)
    body = []
    for i, (network, row) in enumerate(zip(networks, cells)):
        tds = "".join(f'<td class="best"><b>{_cert_text(c)}</b></td>' if i in b else f"<td>{_cert_text(c)}</td>" for c, b in zip(row, best))
        body.append(f"<tr><th>{html.escape(network)}</th>{tds}</tr>")
    read = "".join(
        f"<tr><th>{html.escape(c.network)}</th><td>{html.escape(c.key)}</td><td>{c.count}</td><td>{100 * c.accuracy:.1f}</td>"
        f"<td>{c.weights}</td><td style='text-align:left'>{html.escape(str(c.path))}</td></tr>"
        for c in certs
    )
    return (
        f'<h2 id="certified">Certified accuracy</h2>\n<table><thead><tr><th>network</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>\n'
        f'<p class="note">{html.escape(CERTIFY_NOTE)}</p>\n'
        + "".join(f'<p class="note"><b>Note:</b> {html.escape(n)}</p>\n' for n in notes)
        + "<h3>Certify assets read</h3>\n"
        f"<table><thead><tr><th>network</th><th>bound</th><th>digits</th><th>certified (%)</th><th>weights hash</th><th>certify asset</th></tr></thead><tbody>{read}</tbody></table>"
    )


def certified_columns(certs: list[Certificate], evals: list[Evaluation]) -> list[Column]:
    """The certificates of evaluated networks as columns of the summary table, on the rows
    without DENT (a certificate is of the static network)."""
    chosen, keys = _chosen(certs), _keys(certs)
    rows = _rows(evals)
    out = []
    for key in keys:
        values = tuple(100 * chosen[(ev.label, key)].accuracy if d == "none" and (ev.label, key) in chosen else None for ev, d in rows)
        if any(v is not None for v in values):
            out.append(Column(f"certified {key} (%)", "max", 1, values))
    return out


def _pairs(lp, other) -> tuple[np.ndarray, np.ndarray]:
    """LP and other bounds over the (digit, wrong class) pairs of the digits both assets hold."""
    lp_index, other_index = lp["indices"][:], other["indices"][:]
    _, at_lp, at_other = np.intersect1d(lp_index, other_index, return_indices=True)
    a, b = lp["bounds"][:][at_lp], other["bounds"][:][at_other]
    wrong = np.isfinite(a) & np.isfinite(b)
    return a[wrong], b[wrong]


def _bound_panels(certs: list[Certificate]) -> tuple[list, list[str]]:
    """The panels of the bounds figure, (network, lp asset, [(asset, lp bounds, its bounds)]): per
    network and ε, the lp asset with the most digits and, per dual/dual-opt column, the asset
    sharing the most digits with it; and a note for every pairing without a common digit (the
    certify sample depends on --count and --seed, so assets made with other counts share none)."""
    panels, notes = [], []
    for (network, _), lp in _chosen(certs).items():
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
        for key in _keys([c for c, *_ in candidates.values()]):
            c, other, common = candidates[key]
            if common:
                series.append((c, *_pairs(group, other)))
            else:
                notes.append(f"{network}: the {key} asset {c.path} shares no test digit with the lp asset {lp.path}; "
                             "make both with the same --count and --seed to compare their bounds.")  # fmt: skip
        if series:
            panels.append((network, lp, series))
    return panels, notes


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
        top.set_title(f"{network}, ε={lp.eps:g}: margin lower bounds against the LP\nover the (digit, wrong class) pairs of the digits in both assets", fontsize=10)
        top.legend(fontsize=8, loc="upper left")
    return _save(fig, folder, "certify_bounds")


# ---------------------------------------------------------------- figures


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
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(evals) <= 10 else "tab20"]
    return {ev.label: cmap(i % cmap.N) for i, ev in enumerate(evals)}


def accuracy_figure(evals: list[Evaluation], attack: str, config: ReportConfig, folder: Path) -> Path | None:
    """Accuracy against ε, one colour per model: solid without defence, dashed DENT's worst case
    (dash-dot its standard attack), a dotted vertical line at a robust model's training ε."""
    from matplotlib.lines import Line2D

    if not any(attack in results for ev in evals for results in ev.doc["defenses"].values()):
        return None
    colors = _colors(evals)
    fig = _new_figure(11, 5.5)
    ax = fig.add_subplot()
    styles = {}
    trained = {}  # training ε → colours of the robust models trained at it
    for ev in evals:
        color = colors[ev.label]
        defended = [d for d in ev.doc["defenses"] if d != "none"]
        for defence, results in ev.doc["defenses"].items():
            entry = results.get(attack)
            if not entry:
                continue
            eps, worst = np.asarray(entry["eps"]), 100 * np.asarray(entry["worst"])
            style = "-o" if defence == "none" else LINES[defended.index(defence) % len(LINES)]
            ax.plot(eps, worst, style, color=color, ms=4, lw=1.8)
            if "worst_interval" in entry:
                band = 100 * np.asarray(entry["worst_interval"])
                ax.fill_between(eps, band[:, 0], band[:, 1], color=color, alpha=0.12, lw=0)
            label = "no defence" if defence == "none" else f"{defence.upper()}, worst of its {len([k for k in entry if k not in ('eps', 'count', 'worst') and not k.endswith('_interval')])} attacks"
            styles.setdefault(defence, Line2D([], [], color="k", ls=style[:-1] if len(style) > 2 else style[0], marker=style[-1], ms=4, label=label))
            if defence != "none" and config.dent_standard and "standard" in entry:
                ax.plot(eps, 100 * np.asarray(entry["standard"]), "-.", color=color, lw=1.0, alpha=0.6)
                styles["standard"] = Line2D([], [], color="k", ls="-.", lw=1.0, alpha=0.6, label="DENT, standard attack only")
        eps = ev.doc["model"].get("eps") if ev.doc["model"].get("method") in ROBUST_METHODS else None
        if eps is not None:
            trained.setdefault(eps, []).append(color)
    for eps, shared in trained.items():
        # Models trained at the same ε share the line, in segments of their colours, so none hides another.
        for k, color in enumerate(shared):
            ax.axvline(eps, k / len(shared), (k + 1) / len(shared), color=color, ls=":", lw=1.6)
        styles["train"] = Line2D([], [], color="k", ls=":", lw=1.6, label="training ε (robust models)")
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, 101)
    ax.set_xticks(np.linspace(0, 0.5, 6))
    ax.set_xlabel("L∞ budget ε (pixel units, images in [0, 1])")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"MNIST test accuracy under {ATTACKS[attack]} against ε")
    ax.grid(alpha=0.3)
    # Outside the axes: inside, they would hide the curves' tails, where the robust models differ.
    fig.legend(handles=[Line2D([], [], color=colors[ev.label], lw=2.5, label=ev.label) for ev in evals], title="model", loc="outside right upper", fontsize=9)
    fig.legend(handles=list(styles.values()), title="line", loc="outside right lower", fontsize=9)
    return _save(fig, folder, f"{attack}_accuracy")


def _series(evals: list[Evaluation]) -> list[tuple[Evaluation, str, dict]]:
    return [(ev, d, ev.doc["defenses"][d]) for ev, d in _rows(evals)]


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
        bars.append((_row_label(ev, d), colors[ev.label], d != "none", [None if v is None else 100 * v for v in values]))
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
            ax.plot([bins["confidence"][k] for k in kept], [100 * bins["accuracy"][k] for k in kept], style, marker="o", ms=3, color=colors[ev.label], label=f"{'DENT' if d == 'dent' else 'no defence'} (ECE {100 * c['ece']:.2f}%)")
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
                    ax.plot(100 * np.asarray(roc["fpr"]), 100 * np.asarray(roc["tpr"]), style, color=colors[ev.label], lw=1.5, label=f"{_row_label(ev, d)}: AUROC {100 * o[name]['auroc']:.1f}")
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


def grid_figure(rows: list[np.ndarray], labels: list[str] | None, title: str, ncol: int, folder: Path, name: str, wrong=None, predicted=None) -> Path:
    """Rows of uint8 images (k ≤ ncol, 28, 28) tiled by pixgen.grids.tile, with a label per row;
    `wrong`/`predicted` (per row, per image) frame misclassified digits in red with their class."""
    from matplotlib.patches import Rectangle

    from .grids import tile

    h, w = rows[0].shape[1:]
    padded = [np.concatenate([r, np.full((ncol - len(r), h, w), 128, np.uint8)]) for r in rows]
    picture = tile(np.concatenate(padded), ncol=ncol, scale=1)
    label_width = 0 if labels is None else 0.075 * max(len(s) for s in labels) + 0.3
    px = 0.022  # inches per image pixel: a 28-pixel digit is 0.62 in
    fig = _new_figure(picture.shape[1] * px + label_width + 0.3, picture.shape[0] * px + 0.6)
    ax = fig.add_subplot()
    ax.imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    centres = [1 + r * (h + 1) + h / 2 for r in range(len(rows))]
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
        for eps, row, guess in zip(evaluation.doc["defenses"]["none"][attack]["eps"], images, guesses):
            if not any(abs(eps - e) < EPS_TOL for e in shown_eps):
                continue
            bad = guess != truth
            rows.append(row)
            row_labels.append(f"{title} ε={eps:g}: {int((~bad).sum())}/{len(truth)} correct")
            wrong.append(bad.tolist())
            predicted.append(guess.tolist())
    if not rows:
        return None
    heading = f"Adversarial digits for {evaluation.label}; red frame: misclassified, as the class in its corner"
    return grid_figure(rows, row_labels, heading, len(rows[0]), folder, name, wrong, predicted)


# ---------------------------------------------------------------- the page


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
thead th { background: #f3f3f3; white-space: normal; min-width: 4em; vertical-align: bottom; }
tbody th { text-align: left; }
td.best { background: #e6f4e6; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 14px; color: #444; max-width: 70em; }
.note { font-size: 13px; color: #555; }
"""

# Lets a headless browser confirm that every embedded image decoded (read back from the DOM).
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", decoded + "/" + images.length);
});
"""


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def page(evals: list[Evaluation], cols: list[Column], figures: list[tuple[str, Path, str]], certs: list[Certificate] = (), cert_notes: list[str] = ()) -> str:
    inputs = "".join(
        f"<tr><th>{html.escape(ev.label)}</th><td>{html.escape(str(ev.doc['model'].get('arch')))}</td>"
        f"<td>{', '.join(ev.doc['defenses'])}</td><td>{ev.doc.get('data', {}).get('test_count')}</td>"
        f"<td>{html.escape(str(ev.doc.get('device')))}</td><td>{ev.doc.get('seconds')}</td>"
        f"<td style='text-align:left'>{html.escape(str(ev.path))}</td></tr>"
        for ev in evals
    )
    warning = _test_sets(evals)
    sections = "".join(
        f'<figure id="{png.stem}"><h3>{html.escape(title)}</h3><img src="{_data_uri(png)}" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for title, png, caption in figures
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pixgen report</title>
<style>{CSS}</style></head>
<body>
<h1>pixgen report</h1>
<p class="note">pixgen {__version__}. Self-contained page: every figure is embedded; each also lies beside
this page as PNG and SVG.</p>
<h2>Evaluations</h2>
<table><thead><tr><th>model</th><th>arch</th><th>defences</th><th>test digits</th><th>device</th><th>seconds</th><th>file</th></tr></thead>
<tbody>{inputs}</tbody></table>
{f'<p class="note"><b>Warning:</b> {html.escape(warning)}</p>' if warning else ''}
<h2>Summary</h2>
{_html_table(evals, cols)}
<p class="note">{html.escape(TABLE_NOTE)}</p>
{f'<p class="note">{html.escape(CERTIFIED_COLUMNS_NOTE)}</p>' if _asset_columns(cols) else ''}
{_certified_html(certs, evals, cert_notes) if certs else ''}
<h2>Figures</h2>
{sections}
<script>{CHECK_SCRIPT}</script>
</body></html>
"""


CAPTIONS = {
    "fgsm": "One colour per model. Solid: no defence; dashed: DENT, a digit counted only if correct under its standard, "
    "transfer and adaptive attacks; dash-dot: DENT under the standard attack alone; dotted vertical: a robust model's training ε.",
    "calibration": "Each point is one confidence bin of the clean test digits: its accuracy against its mean confidence; "
    "points under the diagonal are overconfident. Bins with few digits (below) are noisy.",
    "certify_bounds": "Each point is one (digit, wrong class) pair of the test digits that the LP asset and the dual or dual-opt "
    "asset both hold: its LP bound on the margin f_y − f_j (x) against the dual network's bound with fixed slopes (circles) and "
    "with optimised slopes (crosses), all over the same relaxation; below, the gap LP − bound. Weak duality puts every point on "
    "or below the diagonal; optimised slopes reach it (strong duality). Points right of 0 are classes the LP rules out.",
    "ood": "Anomaly score: −max softmax probability; out-of-distribution is the positive class, so the true-positive rate "
    "is the share of out-of-distribution images flagged and the false-positive rate that of MNIST test digits.",
}


# ---------------------------------------------------------------- writing


def _is_report(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()).get("stage") == "report"
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PixgenError(f"{out} is a file; --out must be a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_report(out):
        raise PixgenError(f"{out} is not empty and holds no pixgen report ({MARKER}); choose another --out or empty it")


def _asset_input(path) -> dict | None:
    if path is None:
        return None
    return {"path": str(path), "id": assets.asset_id(dict(assets.open_asset(path).attrs))}


def run(config: ReportConfig, evals, out, *, fractals=None, featvis=None, shards=None, mnist_c=None, certify=(), data_root=None) -> Path:
    """Write the report of the evaluation JSONs `evals` (files or folders) into `out`, with the
    certify assets `certify` (a table and the bounds figure); return index.html."""
    out = Path(out)
    evaluations = load_evaluations(evals)
    certs = load_certificates(certify, evaluations)
    _check_out(out)
    # Opening the assets checks them before any drawing starts.
    inputs = {"fractals": _asset_input(fractals), "featvis": _asset_input(featvis), "shards": _asset_input(shards), "mnist_c": _asset_input(mnist_c)}
    with assets.lock(out):
        assets.recover(out)  # a report folder half-written by a killed run goes
        tmp = assets.staging(out)
        tmp.mkdir()
        cols = columns(evaluations, config) + certified_columns(certs, evaluations)
        figures = []
        for attack, name in ATTACKS.items():
            if png := accuracy_figure(evaluations, attack, config, tmp):
                figures.append((f"{name} accuracy against ε", png, CAPTIONS["fgsm"]))
        if png := corruption_figure(evaluations, tmp):
            figures.append(("MNIST-C accuracy per corruption", png, "Shear, scale, rotate and translate are the affine corruptions that PixMix's own ops overlap."))
        if png := calibration_figure(evaluations, tmp):
            figures.append(("Calibration: reliability diagrams", png, CAPTIONS["calibration"]))
        if png := ood_figure(evaluations, tmp):
            figures.append(("Out-of-distribution detection: ROC curves", png, CAPTIONS["ood"]))
        panels, cert_notes = _bound_panels(certs)
        if png := bounds_figure(panels, tmp):
            figures.append(("Certificates: dual bounds against the LP", png, CAPTIONS["certify_bounds"]))
        for kind, path in (("fractals", fractals), ("featvis", featvis)):
            if path is not None:
                figures.append((f"{kind} mixing set", mixing_grid(path, kind, config, tmp), str(path)))
        if shards is not None:
            figures.append(("PixMix shards", shards_grid(shards, config, tmp, data_root), str(shards)))
        if mnist_c is not None:
            figures.append(("MNIST-C", mnist_c_grid(mnist_c, config, tmp, data_root), str(mnist_c)))
        for i, ev in enumerate(evaluations):
            if "none" in ev.doc["defenses"] and (png := adversarial_grid(ev, config.adv_eps, tmp, f"adversarial_{i}")):
                figures.append((f"Adversarial digits: {ev.label}", png, f"{ev.path}: the static network's adversarial digits as the evaluation stored them."))
        (tmp / "summary.md").write_text(markdown(evaluations, cols, certs, cert_notes))
        (tmp / "index.html").write_text(page(evaluations, cols, figures, certs, cert_notes))
        marker = {
            "pixgen_version": __version__,
            "stage": "report",
            "config": to_dict(config),
            "config_hash": config_hash(config),
            "inputs": {
                "evals": [{"path": str(ev.path), "model": ev.doc["model"], "config_hash": ev.doc.get("config_hash")} for ev in evaluations],
                **inputs,
                "certify": [{"path": str(c.path), "id": c.asset_id, "network": c.network, "weights_hash": c.weights, "method": c.method, "eps": c.eps} for c in certs],
            },
            "files": sorted(p.name for p in tmp.iterdir()) + [MARKER],
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        _check_out(out)  # again: something may have appeared there while the figures were drawn
        assets.install(out)
    return out / "index.html"
