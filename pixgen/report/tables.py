"""The report's tables: the summary table (every scalar metric per model and defence, each
accuracy with its 95% interval where the evaluation stored one) and the certified-accuracy table,
each as Markdown and as HTML, with the notes that say how to read them."""

from __future__ import annotations

import html
from dataclasses import dataclass

from ..metrics import wilson_interval
from .load import ALL_ATTACKS, ATTACKS, CERTIFY_METHODS, POINT_ATTACKS, Certificate, Evaluation, chosen, defence_label, eps_index, eps_text, keys, networks, rows, threats
from .settings import ReportConfig


@dataclass(frozen=True)
class Column:
    header: str
    better: str  # "max" or "min"
    decimals: int
    values: tuple  # one per row, in %, None where the evaluation lacks it
    intervals: tuple = ()  # one (lo, hi) per row, in %, None where there is none; () for a column without any


def _get(results: dict, *path):
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def _at_eps(entry: dict | None, eps: float, key: str = "worst"):
    """The entry's `key` list at ε (its worst case by default; `worst_interval` for its interval)."""
    if not entry or key not in entry:
        return None
    i = eps_index(entry["eps"], eps)
    return None if i is None else entry[key][i]


def columns(evals: list[Evaluation], config: ReportConfig) -> list[Column]:
    """Every scalar metric that at least one row has, as percentages, with the 95% interval of
    each accuracy that the evaluation stored (each spec reads a row's (value, interval or None))."""
    results = [ev.doc["defenses"][d] for ev, d in rows(evals)]
    specs = [("clean acc.", "max", 1, lambda r: (_get(r, "clean", "accuracy"), _get(r, "clean", "interval")))]
    for attack, name in ATTACKS.items():
        specs += [(f"{name} {eps_text(e)}", "max", 1, lambda r, a=attack, e=e: (_at_eps(r.get(a), e), _at_eps(r.get(a), e, "worst_interval"))) for e in config.table_eps]
    for attack, name in POINT_ATTACKS.items():
        for e in sorted({e for r in results for e in (_get(r, attack, "eps") or [])}):
            specs.append((f"{name} {eps_text(e)}", "max", 1, lambda r, a=attack, e=e: (_at_eps(r.get(a), e), _at_eps(r.get(a), e, "worst_interval"))))
    if any(ALL_ATTACKS in r for r in results):
        specs += [(f"all attacks {eps_text(e)}", "max", 1, lambda r, e=e: (_at_eps(r.get(ALL_ATTACKS), e), _at_eps(r.get(ALL_ATTACKS), e, "worst_interval"))) for e in config.table_eps]
    specs += [
        ("MNIST-C mean", "max", 1, lambda r: (_get(r, "corruptions", "mean"), None)),
        ("MNIST-C mean w/o affine", "max", 1, lambda r: (_get(r, "corruptions", "mean_without_affine"), None)),
        ("RMS calib. error", "min", 2, lambda r: (_get(r, "calibration", "rms"), None)),
        ("ECE", "min", 2, lambda r: (_get(r, "calibration", "ece"), None)),
    ]
    # Every OOD set's AUROC; AUPR (at the outlier-exposure protocol's 1:5 out:in) and FPR95 for the
    # first set, the natural one, to keep the table readable.
    for k, ood in enumerate(dict.fromkeys(name for r in results for name in (r.get("ood") or {}))):
        specs.append((f"{ood} AUROC", "max", 1, lambda r, o=ood: (_get(r, "ood", o, "auroc"), None)))
        if k == 0:
            specs += [
                (f"{ood} AUPR 1:5", "max", 1, lambda r, o=ood: (_get(r, "ood", o, "aupr_1to5"), None)),
                (f"{ood} FPR95", "min", 1, lambda r, o=ood: (_get(r, "ood", o, "fpr95"), None)),
            ]
    specs += [
        ("consistency", "max", 1, lambda r: (_get(r, "consistency", "consistency"), None)),
        ("flip rate", "min", 2, lambda r: (_get(r, "consistency", "flip_rate"), None)),
    ]
    for e in sorted({_get(r, "certify", "eps") for r in results} - {None}):
        specs.append((f"certified {eps_text(e)}", "max", 1, lambda r, e=e: (_get(r, "certify", "accuracy"), _get(r, "certify", "interval")) if _get(r, "certify", "eps") == e else (None, None)))
    out = []
    for header, better, decimals, get in specs:
        got = [get(r) for r in results]
        values = tuple(None if v is None else 100 * float(v) for v, _ in got)
        intervals = tuple(None if v is None or i is None else (100 * float(i[0]), 100 * float(i[1])) for v, i in got)
        if any(v is not None for v in values):
            out.append(Column(f"{header} (%)", better, decimals, values, intervals if any(intervals) else ()))
    return out


def certified_columns(certs: list[Certificate], evals: list[Evaluation]) -> list[Column]:
    """The certificates of evaluated networks as columns of the summary table, on the rows
    without DENT (a certificate is of the static network)."""
    picked = chosen(certs)
    out = []
    for key in keys(certs):
        values = tuple(100 * picked[(ev.label, key)].accuracy if d == "none" and (ev.label, key) in picked else None for ev, d in rows(evals))
        if any(v is not None for v in values):
            out.append(Column(f"certified {key} (%)", "max", 1, values))
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


def _cells(column: Column, i: int) -> tuple[str, str]:
    """(value, interval) as shown: the interval in brackets, or '' when the row has none. Wilson
    intervals are not symmetric (near 0% and 100% most of all), so both ends are given rather
    than a ± half-width."""
    v = column.values[i]
    if v is None:
        return "—", ""
    ci = column.intervals[i] if column.intervals else None
    return f"{v:.{column.decimals}f}", "" if ci is None else f"[{ci[0]:.{column.decimals}f}, {ci[1]:.{column.decimals}f}]"


# ---------------------------------------------------------------- the notes


def table_notes(evals: list[Evaluation], cols: list[Column]) -> list[str]:
    """How to read the summary table: units, arrows, intervals, what a DENT row's attack column
    takes the worst of (read from the evaluations' entries) and what DENT adapted."""
    notes = [
        "All values in %. ↑: higher is better, ↓: lower is better; bold: best in its column; — : not evaluated. "
        "[lo, hi]: the 95% Wilson interval of an accuracy over the digits evaluated (attack digits for the attack columns); "
        "two rows whose intervals overlap may still differ: the paired tests below say where they do."
    ]
    dent = [(ev, d) for ev, d in rows(evals) if d != "none"]
    if dent:
        covered = []
        for attack, name in {**ATTACKS, **POINT_ATTACKS}.items():
            names = list(dict.fromkeys(t for ev, d in dent for t in threats(ev.doc["defenses"][d].get(attack) or {})))
            if names:
                covered.append(f"{name}: {', '.join(names)}")
        notes.append(
            "Attack columns give, for DENT, the worst case over its threats (a digit counts only if correct under every one): "
            + "; ".join(covered) + ". "
            "A DENT defence names what it adapted: BN, the network's BatchNorm scales and shifts, as published; "
            "channel-affine, no BN: the BN-free generalisation, a channel-wise scale and shift after each convolution."
        )  # fmt: skip
    if any(c.header.startswith("all attacks ") for c in cols):
        notes.append("all attacks ε: a digit counts only if correct under every attack run at that ε (and, for DENT, every threat of each), the robust accuracy to report.")
    stated = [f"{ev.label} (× std {ev.doc.get('eps_to_pixel'):g})" for ev in evals if ev.doc.get("eps_units") == "input"]
    if stated:
        notes.append("Every ε is in pixel units (images in [0, 1]). Attack grids given in input units (pixgen evaluate --eps-units input), shown at the pixel ε they ran at: " + "; ".join(stated) + ".")
    if any(c.header.startswith(tuple(f"certified {m} " for m in CERTIFY_METHODS)) for c in cols):
        notes.append(
            "certified <bound> ε: the --certify assets of the network (on its row without DENT; digit counts in the "
            "certified-accuracy table); certified ε without a bound: pixgen evaluate's own dual certificate."
        )
    return notes


# ---------------------------------------------------------------- the summary table


def summary_markdown(evals: list[Evaluation], cols: list[Column]) -> str:
    best = [best_rows(c) for c in cols]
    lines = [
        "| model | defence | " + " | ".join(f"{c.header} {_arrow(c)}" for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for i, (ev, d) in enumerate(rows(evals)):
        cells = []
        for c, b in zip(cols, best):
            value, ci = _cells(c, i)
            cells.append(" ".join(filter(None, [f"**{value}**" if i in b else value, ci])))
        lines.append(f"| {ev.label} | {defence_label(ev, d)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_html(evals: list[Evaluation], cols: list[Column]) -> str:
    best = [best_rows(c) for c in cols]
    direction = {"max": "higher is better", "min": "lower is better"}
    head = "".join(f'<th title="{direction[c.better]}">{html.escape(c.header)} {_arrow(c)}</th>' for c in cols)
    body = []
    for i, (ev, d) in enumerate(rows(evals)):
        cells = []
        for c, b in zip(cols, best):
            value, ci = _cells(c, i)
            shown = (f"<b>{value}</b>" if i in b else value) + (f' <span class="ci">{ci}</span>' if ci else "")
            cells.append(f'<td class="best">{shown}</td>' if i in b else f"<td>{shown}</td>")
        body.append(f"<tr><th>{html.escape(ev.label)}</th><td>{html.escape(defence_label(ev, d))}</td>{''.join(cells)}</tr>")
    return f"<table><thead><tr><th>model</th><th>defence</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# ---------------------------------------------------------------- the certified-accuracy table


CERTIFY_NOTE = (
    "Certified accuracy in %: the fraction of a class-balanced sample of n MNIST test digits (pixgen certify) "
    "whose nine margin lower bounds over the L∞ ball of radius ε (intersected with [0, 1]) are all > 0, "
    "with its 95% Wilson interval over the n digits. "
    "Columns: the bound (dual ≤ dual-opt ≤ lp, the LP tightest; ibp is the loosest on networks not trained for it, "
    "but can beat dual on IBP-trained ones) and ε; bold: best in its column; — : no asset. "
    "A network is named by the evaluation whose weights hash matches the asset's, else by its arch and weights hash."
)


def certified_table(certs: list[Certificate], evals: list[Evaluation]) -> tuple[list[str], list[str], list[list[Certificate | None]], list[set[int]]]:
    """(networks, column keys, cells [network][column], bold rows per column)."""
    picked, names, columns_ = chosen(certs), networks(certs, evals), keys(certs)
    cells = [[picked.get((n, k)) for k in columns_] for n in names]
    best = [best_rows(Column(k, "max", 1, tuple(None if row[j] is None else 100 * row[j].accuracy for row in cells))) for j, k in enumerate(columns_)]
    return names, columns_, cells, best


def _cert_text(c: Certificate | None) -> str:
    if c is None:
        return "—"
    lo, hi = wilson_interval(round(c.accuracy * c.count), c.count)
    return f"{100 * c.accuracy:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={c.count})"


def certified_markdown(certs: list[Certificate], evals: list[Evaluation], notes: list[str] = ()) -> str:
    names, columns_, cells, best = certified_table(certs, evals)
    lines = ["## Certified accuracy", "", "| network | " + " | ".join(f"{k} (%) ↑" for k in columns_) + " |", "|---|" + "---:|" * len(columns_)]
    for i, (network, row) in enumerate(zip(names, cells)):
        lines.append(f"| {network} | " + " | ".join(f"**{_cert_text(c)}**" if i in b else _cert_text(c) for c, b in zip(row, best)) + " |")
    return "\n".join(lines) + "\n\n" + "\n\n".join([CERTIFY_NOTE, *notes]) + "\n"


def certified_html(certs: list[Certificate], evals: list[Evaluation], notes: list[str] = ()) -> str:
    names, columns_, cells, best = certified_table(certs, evals)
    head = "".join(f'<th title="higher is better">{html.escape(k)} (%) ↑</th>' for k in columns_)
    body = []
    for i, (network, row) in enumerate(zip(names, cells)):
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
