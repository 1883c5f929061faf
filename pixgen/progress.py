"""Progress bars: shown on a terminal, silent in CI logs and pipes."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def bar(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it"):
    quiet = os.environ.get("CI") == "true" or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True)
