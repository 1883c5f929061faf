"""Shared fixtures: the real raw-data root (../shared/data beside the repo unless PIXGEN_DATA_ROOT
says otherwise) and the CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pixgen import assets

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def data_root() -> Path:
    """PIXGEN_DATA_ROOT, else ../shared/data if present, else ./data/raw (downloaded when online)."""
    from pixgen import PixgenError, data

    root = Path(os.environ.get("PIXGEN_DATA_ROOT") or (SHARED_DATA if SHARED_DATA.is_dir() else REPO / "data" / "raw"))
    try:
        for dataset in ("mnist", "fashion-mnist"):
            data.load(dataset, "test", root)
            data.load(dataset, "train", root)
    except PixgenError as exc:
        pytest.exit(str(exc), returncode=2)
    os.environ["PIXGEN_DATA_ROOT"] = str(root)
    return root


def pixgen(*args: str, check: bool = True, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (so kills, exit codes and stderr are the user's)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pixgen", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pixgen {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def done_units(asset: Path) -> int:
    """How many units an asset has flagged done, counted from the flag chunks on disk so that it can be
    polled while a run writes. Zarr writes a chunk as `<key>.<uuid>.partial` and renames it into
    place; a temporary seen before its rename is not yet a flag."""
    flags = asset / assets.DONE / "c"
    return sum(p.name.isdigit() for p in flags.iterdir()) if flags.is_dir() else 0


@pytest.fixture(scope="session")
def cluster_address():
    """The address of a local Dask cluster of 2 single-threaded worker processes (tests/_cluster.py),
    shut down at the end of the session."""
    cluster = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_cluster.py"))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        address = cluster.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), address
        yield address
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=60)
