"""The report's config: the one place its defaults live (the CLI's options default to them)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import PixgenError


@dataclass(frozen=True)
class ReportConfig:
    """table_eps: the ε of the FGSM/PGD columns of the summary table and of the paired tests (an
    ε an evaluation did not run is shown as missing, never interpolated); dent_standard: also draw
    DENT under the standard attack, beside its worst case; grid_count: mixing pictures shown per
    set; columns: digits per row of the shard, MNIST-C and mixing grids; adv_eps: the ε of the
    adversarial grids' rows (each evaluation's stored adversarial digits)."""

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
