"""Who is ahead: exact McNemar tests between two rows of the summary table on the same attack
digits, per attack and table ε.

Two accuracies with overlapping intervals may still differ, because both were measured on the
same digits: the digits both get right or both get wrong say nothing about which is better, and
the test looks only at the discordant ones (pixgen.metrics.mcnemar). A row's outcome on a digit
is its worst case, correct under every threat of its defence, as in the table.

Pairs compared: rows of the same defence in two evaluations (the models against each other), and
within one evaluation each DENT defence against no defence (what DENT buys), when their attack
digits are the same (equal `attack_indices`). Each p-value is of one test alone, uncorrected for
the number of tests shown.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

from .. import metrics
from .families import family_label, seed_of
from .load import ALL_ATTACKS, ATTACK_LABELS, ATTACKS, Evaluation, attack_digits, eps_index, eps_text, row_label, rows, worst_outcomes
from .settings import ReportConfig

LEVEL = 0.05  # "ahead" only below this p-value


@dataclass(frozen=True)
class Comparison:
    a: str  # row labels
    b: str
    attack: str
    eps: float
    a_only: int  # digits only A gets right
    b_only: int
    p: float

    @property
    def verdict(self) -> str:
        if self.p >= LEVEL:
            return "no significant difference"
        ahead, behind = (self.a, self.b) if self.a_only > self.b_only else (self.b, self.a)
        return f"{ahead} is ahead of {behind}"


def _compared(first: tuple[Evaluation, str], second: tuple[Evaluation, str]) -> bool:
    """Two networks under the same defence (seeds of one family are not compared with each other,
    and two families only seed by seed), or a network's DENT against its own undefended row."""
    (ev_a, d_a), (ev_b, d_b) = first, second
    if ev_a is ev_b:
        return d_a == "none" and d_b != "none"
    if family_label(ev_a.label) == family_label(ev_b.label):
        return False
    return d_a == d_b and seed_of(ev_a) == seed_of(ev_b)


def comparisons(evals: list[Evaluation], config: ReportConfig) -> list[Comparison]:
    """Every paired test, by pair (in table order), attack and ε."""
    digits = {ev.path: attack_digits(ev) for ev in evals}
    outcomes = {}  # (evaluation, defence, attack) → (E, M) bool; each read once

    def outcome(ev, d, attack):
        if (ev.path, d, attack) not in outcomes:
            outcomes[(ev.path, d, attack)] = worst_outcomes(ev, d, attack) if attack in ev.doc["defenses"][d] else None
        return outcomes[(ev.path, d, attack)]

    table = rows(evals)
    out = []
    for i, first in enumerate(table):
        for second in table[i + 1 :]:
            (ev_a, d_a), (ev_b, d_b) = first, second
            same = digits[ev_a.path] is not None and digits[ev_b.path] is not None and np.array_equal(digits[ev_a.path], digits[ev_b.path])
            if not (_compared(first, second) and same):
                continue
            for attack in (*ATTACKS, ALL_ATTACKS):
                a, b = outcome(ev_a, d_a, attack), outcome(ev_b, d_b, attack)
                if a is None or b is None:
                    continue
                for eps in config.table_eps:
                    at_a, at_b = eps_index(ev_a.doc["defenses"][d_a][attack]["eps"], eps), eps_index(ev_b.doc["defenses"][d_b][attack]["eps"], eps)
                    if at_a is None or at_b is None:
                        continue
                    out.append(Comparison(row_label(ev_a, d_a), row_label(ev_b, d_b), attack, eps, *metrics.mcnemar(a[at_a], b[at_b])))
    return out


NOTE = (
    "Exact McNemar test on the attack digits both rows were attacked on, per attack (and over all attacks run at the ε) and ε: A only / B only count "
    "the digits only A (only B) gets right under its worst case; p is the two-sided binomial test of those "
    f"discordant digits at 1/2. \"ahead\" only where p < {LEVEL:g}; each p is of its test alone, not corrected "
    "for the number of tests. Pairs: the same defence in two evaluations, and DENT against no defence in one."
)
EMPTY = "No paired test: no two rows of the table were attacked on the same digits at a table ε."


def _cells(c: Comparison) -> list[str]:
    return [c.a, c.b, ATTACK_LABELS[c.attack], f"{c.eps:g}", str(c.a_only), str(c.b_only), f"{c.p:.2g}", c.verdict]


HEADER = ["A", "B", "attack", eps_text(), "A only", "B only", "p", "verdict"]


def paired_markdown(found: list[Comparison]) -> str:
    if not found:
        return f"## Who is ahead\n\n{EMPTY}\n"
    lines = ["## Who is ahead", "", "| " + " | ".join(HEADER) + " |", "|---|---|---|---:|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(_cells(c)) + " |" for c in found]
    return "\n".join(lines) + "\n\n" + NOTE + "\n"


def paired_html(found: list[Comparison]) -> str:
    if not found:
        return f'<h2 id="paired">Who is ahead</h2>\n<p class="note">{html.escape(EMPTY)}</p>'
    head = "".join(f"<th>{h}</th>" for h in HEADER)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in _cells(c)[:-1]) + f'<td style="text-align:left">{"<b>" if c.p < LEVEL else ""}{html.escape(c.verdict)}{"</b>" if c.p < LEVEL else ""}</td></tr>'
        for c in found
    )
    return f'<h2 id="paired">Who is ahead</h2>\n<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n<p class="note">{html.escape(NOTE)}</p>'
