"""Fractal rendering: the one-pass kernel against the usual two-pass chaos game, same process.

The baseline is the common Numba approach (as in Anderson & Farrell's code): iterate into a
coordinate array with np.random per point and a float64 search of the cumulative probabilities,
then a second loop finds the bounding box and bins the points. Both render the same systems at
the same fine size and point count and finish with the same log tone mapping and downsampling, so
the ratio compares whole images. Points per second count the rendered points only.

    .venv/bin/python benchmarks/bench_fractals.py [--images 256] [--points 100000]
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit

from pixgen import fractals


@njit(cache=True)
def _iterate(maps, nmaps, points):
    cumulative = np.zeros(nmaps)
    total = 0.0
    for k in range(nmaps):
        total += abs(maps[k, 0, 0] * maps[k, 1, 1] - maps[k, 0, 1] * maps[k, 1, 0])
        cumulative[k] = total
    cumulative /= total
    coords = np.empty((points, 2))
    x, y = fractals._fixed_point(maps)
    for i in range(points):
        r = np.random.random()
        k = 0
        while k < nmaps - 1 and r >= cumulative[k]:
            k += 1
        x, y = maps[k, 0, 0] * x + maps[k, 0, 1] * y + maps[k, 0, 2], maps[k, 1, 0] * x + maps[k, 1, 1] * y + maps[k, 1, 2]
        coords[i, 0] = x
        coords[i, 1] = y
    return coords


@njit(cache=True)
def _bin(coords, fine):
    xmin, ymin = coords[0, 0], coords[0, 1]
    xmax, ymax = xmin, ymin
    for i in range(len(coords)):
        xmin, xmax = min(xmin, coords[i, 0]), max(xmax, coords[i, 0])
        ymin, ymax = min(ymin, coords[i, 1]), max(ymax, coords[i, 1])
    span = max(xmax - xmin, ymax - ymin, 1e-6)
    scale = (fine - 1) / span
    hits = np.zeros((fine, fine), np.int32)
    for i in range(len(coords)):
        hits[int((coords[i, 1] - ymin) * scale), int((coords[i, 0] - xmin) * scale)] += 1
    return hits


def baseline(maps, nmaps, config):
    _seed_numba(0)  # Numba's generator is seeded only from compiled code
    out = np.empty((len(maps), config.size, config.size), np.uint8)
    fine = config.size * config.oversample
    for i in range(len(maps)):
        hits = _bin(_iterate(maps[i], int(nmaps[i]), config.points), fine)
        fractals._tone_and_downsample(hits, config.size, config.oversample, out[i])
    return out


@njit(cache=True)
def _seed_numba(seed):
    np.random.seed(seed)


def best_times(repeats, **runs):
    """Best (wall, cpu) seconds of each run, the runs interleaved so that load from other processes
    on a shared machine hits them alike; cpu / wall tells how many cores a run really got."""
    best = dict.fromkeys(runs, (float("inf"), 0.0))
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            best[name] = min(best[name], (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def _with_threads(threads, fn, *args):
    def run():
        numba.set_num_threads(threads)
        fn(*args)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = fractals.FractalConfig(points=args.points)
    maps, nmaps = fractals.sample_systems(np.random.default_rng(0), args.images)
    mpts = args.images * args.points / 1e6

    fractals.render(maps[:2], nmaps[:2], config)  # compile (or load) both before timing
    baseline(maps[:2], nmaps[:2], config)
    runs = {"ours": _with_threads(1, fractals.render, maps, nmaps, config), "baseline": _with_threads(1, baseline, maps, nmaps, config)}
    two_workers = numba.config.NUMBA_NUM_THREADS >= 2
    if two_workers:
        runs["ours2"] = _with_threads(2, fractals.render, maps, nmaps, config)
    best = best_times(args.repeats, **runs)
    rate = {name: mpts / wall for name, (wall, _) in best.items()}
    print(f"fractals: ours {rate['ours']:.1f} Mpts/s/core, baseline {rate['baseline']:.1f} Mpts/s/core, ratio {rate['ours'] / rate['baseline']:.1f}×")
    if two_workers:
        wall, cpu = best["ours2"]
        print(
            f"fractals 2 workers: {rate['ours2']:.1f} Mpts/s, 1 worker {rate['ours']:.1f} Mpts/s, "
            f"ratio {rate['ours2'] / rate['ours']:.2f}× (the 2-worker run got {cpu / wall:.2f} cores)"
        )


if __name__ == "__main__":
    main()
