"""The report: one self-contained HTML page (and summary.md) comparing evaluated models.

It computes nothing: it runs no model and no attack, but reads what `pixgen evaluate` stored
(results with 95% intervals, sanity warnings, per-digit outcomes, adversarial digits) and what
`pixgen certify` stored (bounds), and lays them out. Modules, in reading order:

- `settings`: `ReportConfig`;
- `load`: opening and checking the evaluation and certify assets, and naming their rows;
- `tables`: the summary and certified-accuracy tables (Markdown and HTML) and their notes;
- `paired`: "Who is ahead", exact McNemar tests on the stored per-digit outcomes;
- `figures`: matplotlib figures and image grids;
- `page`: index.html, summary.md and `run`, which writes the report folder.
"""

from .page import run
from .settings import ReportConfig

__all__ = ["ReportConfig", "run"]
