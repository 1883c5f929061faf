"""Families: the evaluations of one network trained with several seeds, read as one line.

A pipeline's `matrix: {seed: [0, 1, 2]}` names its members `<stage>.seed-<n>` (and their
evaluations follow), so the report groups evaluations whose labels differ only in that part. A
family's number is the mean over its seeds, with the sample standard deviation and the range
beside it; its members' own numbers stay in the summary table, and the figures draw each seed
faintly behind the family's mean.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass

import numpy as np

from .load import Evaluation, defence_label, rows
from .tables import Column

SEED = re.compile(r"\.seed-(-?\d+)")


@dataclass(frozen=True)
class Family:
    label: str
    members: tuple[Evaluation, ...]

    @property
    def seeds(self) -> list[int | None]:
        return [seed_of(ev) for ev in self.members]


def family_label(label: str) -> str:
    return SEED.sub("", label)


def seed_of(ev: Evaluation) -> int | None:
    found = SEED.search(ev.label)
    return int(found.group(1)) if found else None


def families(evals: list[Evaluation]) -> list[Family]:
    """Every family in the order of its first member; a network without seeds is a family of one."""
    grouped: dict[str, list[Evaluation]] = {}
    for ev in evals:
        grouped.setdefault(family_label(ev.label), []).append(ev)
    return [Family(label, tuple(members)) for label, members in grouped.items()]


@dataclass(frozen=True)
class Spread:
    mean: float
    sd: float  # sample standard deviation (n - 1); nan for one value
    lo: float
    hi: float
    n: int

    def text(self, decimals: int) -> str:
        if self.n == 1:
            return f"{self.mean:.{decimals}f} (1 seed)"
        return f"{self.mean:.{decimals}f} ± {self.sd:.{decimals}f} [{self.lo:.{decimals}f}, {self.hi:.{decimals}f}]"


def spread(values) -> Spread | None:
    """Mean, sd and range of the values that are not None; None if there are none."""
    got = np.array([v for v in values if v is not None], dtype=float)
    if not len(got):
        return None
    return Spread(float(got.mean()), float(got.std(ddof=1)) if len(got) > 1 else math.nan, float(got.min()), float(got.max()), len(got))


def seed_rows(evals: list[Evaluation], cols: list[Column]) -> list[tuple[Family, str, list[Spread | None]]]:
    """(family, defence, a Spread per column) for every family of more than one seed and each of
    its defences, from the summary table's columns (so a family's numbers are its members' rows)."""
    index = {(ev.path, d): i for i, (ev, d) in enumerate(rows(evals))}
    out = []
    for family in families(evals):
        if len(family.members) < 2:
            continue
        for defence in dict.fromkeys(d for ev in family.members for d in ev.doc["defenses"]):
            at = [index[(ev.path, defence)] for ev in family.members if (ev.path, defence) in index]
            out.append((family, defence, [spread(c.values[i] for i in at) for c in cols]))
    return out


NOTE = (
    "Families: the networks of one pipeline stage trained with several seeds (members named <stage>.seed-<n>). "
    "Each cell is the mean over seeds ± the sample standard deviation [lowest, highest]; the seeds' own rows, "
    "with their intervals over digits, are in the summary table."
)


def _head(family: Family) -> str:
    return f"{family.label} (seeds {', '.join(str(s) for s in family.seeds)})"


def seeds_markdown(evals: list[Evaluation], cols: list[Column]) -> str:
    found = seed_rows(evals, cols)
    if not found:
        return ""
    lines = ["## Across seeds", "", "| family | defence | " + " | ".join(c.header for c in cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for family, defence, cells in found:
        shown = ["—" if s is None else s.text(c.decimals) for s, c in zip(cells, cols)]
        lines.append(f"| {_head(family)} | {defence_label(family.members[0], defence)} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n\n" + NOTE + "\n"


def seeds_html(evals: list[Evaluation], cols: list[Column]) -> str:
    found = seed_rows(evals, cols)
    if not found:
        return ""
    head = "".join(f"<th>{html.escape(c.header)}</th>" for c in cols)
    body = "".join(
        f"<tr><th>{html.escape(_head(family))}</th><td>{html.escape(defence_label(family.members[0], defence))}</td>"
        + "".join(f"<td>{'—' if s is None else html.escape(s.text(c.decimals))}</td>" for s, c in zip(cells, cols))
        + "</tr>"
        for family, defence, cells in found
    )
    return f'<h2 id="seeds">Across seeds</h2>\n<table><thead><tr><th>family</th><th>defence</th>{head}</tr></thead><tbody>{body}</tbody></table>\n<p class="note">{html.escape(NOTE)}</p>'
