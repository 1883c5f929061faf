"""Builds `.gpu/`, what a lent GPU machine needs beside the repository to run
benchmarks/gpu/check.sh (issue 22, goal 5; docs/benchmarks.md, "On a GPU"):

- `.gpu/wheels/`: the packages pixgen needs that the machine's image lacks, at the versions of the
  environment running this script (the ones the tests passed with), for the machine's Python;
  pyautoattack without its 45 MB example model, which pixgen never loads;
- `.gpu/data/`: the raw files of MNIST and of its OOD set, Fashion-MNIST, from the data root,
  gzipped (110 MB → 41 MB).

The machine reaches no registry, and the tree that travels is at most 64 MiB, so everything is
built here. Run from the repository root, where pip reaches the registry:
`.venv/bin/python benchmarks/gpu/prepare.py [--python 3.12]`.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging import tags
from packaging.utils import parse_wheel_filename

from pixgen import data

# pixgen's dependencies (and theirs) missing from the machine's image, whose package list the device
# tool's KINDS.md gives (read 17 November 2026): torch, numpy, numba, scipy, scikit-learn,
# scikit-image, matplotlib, click, tqdm, PyYAML, Pillow, xarray, msgpack, psutil, jinja2, toolz,
# cloudpickle, fsspec and sortedcontainers are there.
MISSING = (
    "zarr", "numcodecs", "donfig", "google-crc32c",
    "dask", "partd", "locket", "distributed", "tblib", "zict", "tornado",
    "torchattacks", "pyautoattack", "convex-adversarial", "adamod",
)  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
BUDGET = 64 * 2**20  # the device tool's limit on what travels, the repository included
TRIMMED = {"pyautoattack": "pyautoattack/examples/"}


def fetch(requirement: str, python: str, folder: Path) -> None:
    """A wheel for the machine's Python, else one built here from the sdist (convex-adversarial
    has no wheel); `check` then refuses any wheel that the machine's Python cannot install."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip = [sys.executable, "-m", "pip", "-q"]
    binary = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp", *platforms, "-d", str(folder), requirement]
    found = subprocess.run(binary, capture_output=True, text=True)
    if found.returncode != 0:
        print(f"{requirement}: no wheel for Python {python} ({(found.stderr.strip().splitlines() or ['pip said nothing'])[-1]}); building one from its sdist", flush=True)
        subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder), requirement], check=True)


def check(wheel: Path, python: str) -> None:
    """Exits unless one of the wheel's tags installs on that CPython on x86-64 Linux."""
    version = tuple(int(p) for p in python.split("."))
    accepted = {*tags.cpython_tags(version, platforms=PLATFORMS), *tags.compatible_tags(version, platforms=PLATFORMS)}
    if not parse_wheel_filename(wheel.name)[3] & accepted:
        sys.exit(f"{wheel.name} does not install on CPython {python} (x86-64 Linux): find a wheel for it, or drop the package")


def trim(wheel: Path, prefix: str) -> None:
    """Rewrites the wheel without the files under `prefix`, RECORD included."""
    trimmed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if item.filename.startswith(prefix):
                continue
            content = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                content = b"".join(line for line in content.splitlines(keepends=True) if not line.startswith(prefix.encode()))
            target.writestr(item, content)
    trimmed.replace(wheel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (KINDS.md: 3.12)")
    parser.add_argument("--out", default=".gpu", type=Path)
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    wheels = args.out / "wheels"
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in MISSING:
            fetch(f"{name}=={importlib.metadata.version(name)}", args.python, Path(tmp))
        for wheel in Path(tmp).glob("*.whl"):
            check(wheel, args.python)
            prefix = next((p for n, p in TRIMMED.items() if wheel.name.startswith(n + "-")), None)
            if prefix:
                trim(wheel, prefix)
            shutil.move(wheel, wheels / wheel.name)

    for dataset in ("mnist", data.spec("mnist").ood):  # evaluation reads the OOD set's raw files too
        raw = data.data_root() / data.spec(dataset).torchvision / "raw"
        target = args.out / "data" / raw.relative_to(data.data_root())
        target.mkdir(parents=True)
        for name in data.RAW_FILES:
            with open(raw / name, "rb") as source, gzip.open(target / f"{name}.gz", "wb", compresslevel=9) as sink:
                shutil.copyfileobj(source, sink)

    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    # what the device tool sends beside the carried folder: tracked files and untracked ones not ignored
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True).stdout.split(b"\0")
    repository = sum(Path(p.decode()).stat().st_size for p in listed if p and Path(p.decode()).is_file())
    print(f"{args.out}: {len(list(wheels.glob('*.whl')))} wheels for Python {args.python}, the data; {size / 2**20:.1f} MiB, "
          f"with the repository's files {(size + repository) / 2**20:.1f} of the 64 MiB that may travel")
    if size + repository > BUDGET:
        sys.exit(f"{args.out} and the repository are over the device tool's 64 MiB: trim more")


if __name__ == "__main__":
    main()
