"""Prints the machine that `make bench` measures on: its figures are ratios against baselines run in
the same process, but their absolute rates move with the host CPU. This VM's 2 cores have been
placed on different host CPUs (AVX-512 with BF16 on the night of 1 December, an AVX2-only AMD EPYC
that evening, where `bench_dual.py 1` ran 2.7× slower), so every recorded run names its machine."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} on {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}")
