"""The report's page and folder: `run` reads the inputs (pixgen.report.load), draws the figures,
and writes `index.html` (every table and figure embedded, so the page is one file), `summary.md`
(the same tables in Markdown), the figures as PNG and SVG, and `report.json` (the config and the
inputs read). The folder is built under pixgen.assets' lock and staging and installed by one
rename, so a folder named `out` is always a whole report.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .. import PixgenError, __version__, assets
from ..config import config_hash, to_dict
from .claim import claim_html, claim_markdown
from .claim import rows as claim_rows
from .families import seeds_html, seeds_markdown
from .figures import accuracy_figure, claim_figure, adversarial_grid, bounds_figure, calibration_figure, corruption_figure, mixing_grid, mnist_c_grid, ood_figure, shards_grid
from .load import ATTACKS, Certificate, Evaluation, bound_panels, load_certificates, load_evaluations, mixed_test_sets, sanity_warnings
from .paired import Comparison, comparisons, paired_html, paired_markdown
from .settings import ReportConfig
from .tables import Column, certified_columns, certified_html, certified_markdown, columns, summary_html, summary_markdown, table_notes

MARKER = "report.json"

CAPTIONS = {
    "fgsm": "One colour per model. Solid: no defence; dashed: DENT's worst case, a digit counted only if correct under "
    "every threat its evaluation ran (listed in the legend); bands: the 95% Wilson interval of each worst case; "
    "dash-dot: DENT under the standard attack alone; dotted vertical: a robust model's training ε.",
    "mnist_c": "Shear, scale, rotate and translate are the affine corruptions that PixMix's own ops overlap.",
    "calibration": "Each point is one confidence bin of the clean test digits: its accuracy against its mean confidence; "
    "points under the diagonal are overconfident. Bins with few digits (below) are noisy.",
    "certify_bounds": "Each point is one (digit, wrong class) pair of the test digits that the LP asset and the dual or dual-opt "
    "asset both hold: its LP bound on the margin f_y − f_j (x) against the dual network's bound with fixed slopes (circles) and "
    "with optimised slopes (crosses), all over the same relaxation; below, the gap LP − bound. Weak duality puts every point on "
    "or below the diagonal; optimised slopes reach it (strong duality). Points right of 0 are classes the LP rules out.",
    "claim": "A panel per PixMix network: its seeds faint, their mean bold, with the mean of every robust network it is "
    "compared with; FGSM, no defence, at the ε each evaluation states (the units in the panel's title). Dotted: 20%; shaded: "
    "ε above 0.24, where the claim puts PixMix ahead.",
    "ood": "Anomaly score: −max softmax probability; out-of-distribution is the positive class, so the true-positive rate "
    "is the share of out-of-distribution images flagged and the false-positive rate that of MNIST test digits.",
}

WARNINGS_HEAD = "Sanity warnings (pixgen evaluate's checks on its stored outcomes: accuracy must not rise with ε, no certified digit broken, DENT's worst case no better than its standard attack)"
NO_WARNINGS = "Sanity checks (pixgen evaluate): no warning."


# ---------------------------------------------------------------- summary.md


def markdown(evals: list[Evaluation], cols: list[Column], found: list[Comparison], certs: list[Certificate] = (), cert_notes: list[str] = (), claim=()) -> str:
    """summary.md: the summary table and its notes, the families, the warnings, the paired tests,
    the claim and the certified table."""
    notes = table_notes(evals, cols) + ([w] if (w := mixed_test_sets(evals)) else [])
    warnings = sanity_warnings(evals)
    checks = f"**{WARNINGS_HEAD}:**\n\n" + "".join(f"- {row}: {text}\n" for row, text in warnings) if warnings else NO_WARNINGS + "\n"
    seeds = seeds_markdown(evals, cols)
    text = summary_markdown(evals, cols) + "\n" + "\n\n".join(notes) + "\n\n" + (seeds + "\n" if seeds else "") + checks + "\n" + paired_markdown(found)
    text += "\n" + claim_markdown(claim) if claim else ""
    return text + ("\n" + certified_markdown(certs, evals, cert_notes) if certs else "")


# ---------------------------------------------------------------- index.html


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
.ci { color: #777; font-size: 11px; }
.warnings { color: #8a4b00; }
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


def _warnings_html(evals: list[Evaluation]) -> str:
    warnings = sanity_warnings(evals)
    if not warnings:
        return f'<p class="note" id="warnings">{html.escape(NO_WARNINGS)}</p>'
    items = "".join(f"<li><b>{html.escape(row)}</b>: {html.escape(text)}</li>" for row, text in warnings)
    return f'<div class="note warnings" id="warnings"><p><b>{html.escape(WARNINGS_HEAD)}:</b></p><ul>{items}</ul></div>'


def _figure(title: str, png: Path, caption: str) -> str:
    return (
        f'<figure id="{png.stem}"><h3>{html.escape(title)}</h3><img src="{_data_uri(png)}" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def page(evals: list[Evaluation], cols: list[Column], figures: list[tuple[str, Path, str]], found: list[Comparison], certs: list[Certificate] = (), cert_notes: list[str] = (), claim=(), claim_png: Path | None = None) -> str:
    inputs = "".join(
        f"<tr><th>{html.escape(ev.label)}</th><td>{html.escape(str(ev.doc['model'].get('arch')))}</td>"
        f"<td>{html.escape(', '.join(ev.doc['defenses']))}</td><td>{ev.doc.get('data', {}).get('test_count')}</td>"
        f"<td>{html.escape(str(ev.doc.get('device')))}</td><td>{ev.doc.get('seconds')}</td>"
        f"<td style='text-align:left'>{html.escape(str(ev.path))}</td></tr>"
        for ev in evals
    )
    warning = mixed_test_sets(evals)
    notes = "".join(f'<p class="note">{html.escape(n)}</p>\n' for n in table_notes(evals, cols))
    sections = "".join(_figure(title, png, caption) for title, png, caption in figures)
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
{summary_html(evals, cols)}
{notes}{seeds_html(evals, cols)}
{_warnings_html(evals)}
{paired_html(found)}
{claim_html(claim, _figure("The claim's conditions: PixMix against the robust networks under FGSM", claim_png, CAPTIONS["claim"]) if claim_png else "")}
{certified_html(certs, evals, cert_notes) if certs else ''}
<h2>Figures</h2>
{sections}
<script>{CHECK_SCRIPT}</script>
</body></html>
"""


# ---------------------------------------------------------------- the folder


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
    """Write the report of the evaluation assets `evals` into `out`, with the certify assets
    `certify` (a table and the bounds figure) and the image assets given as grids; return index.html."""
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
        found = comparisons(evaluations, config)
        figures = []
        for attack, name in ATTACKS.items():
            if png := accuracy_figure(evaluations, attack, config, tmp):
                figures.append((f"{name} accuracy against ε", png, CAPTIONS["fgsm"]))
        if png := corruption_figure(evaluations, tmp):
            figures.append(("MNIST-C accuracy per corruption", png, CAPTIONS["mnist_c"]))
        if png := calibration_figure(evaluations, tmp):
            figures.append(("Calibration: reliability diagrams", png, CAPTIONS["calibration"]))
        if png := ood_figure(evaluations, tmp):
            figures.append(("Out-of-distribution detection: ROC curves", png, CAPTIONS["ood"]))
        panels, cert_notes = bound_panels(certs)
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
        claim = claim_rows(evaluations)
        claim_png = claim_figure(claim, tmp)
        (tmp / "summary.md").write_text(markdown(evaluations, cols, found, certs, cert_notes, claim))
        (tmp / "index.html").write_text(page(evaluations, cols, figures, found, certs, cert_notes, claim, claim_png))
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
