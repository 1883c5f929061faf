"""What `pixgen evaluate` spends per attack digit, threat by threat, on a trained wk-small.

1. `<defence> <attack> <threat> ε E: X ms per digit`: CPU time of each threat exactly as the
   evaluation runs it (`pixgen.evaluate.threats`: the attack, then the defended network judging the
   result) on the same class-balanced MNIST test digits, one batch (DENT adapts to them as one
   batch). Static network: PGD-40 × 5 restarts, AutoAttack (standard), FGSM over the default grid
   (per ε); DENT (`dent`): the paper's "standard" PGD through its prediction, transfer, adaptive
   APGD through the unrolled adaptation (100 steps), the fixed-point attack and EOT over batches (20
   steps each), as evaluate runs them. Where this round changed the cost, the old path runs beside
   it in the same process and a line `name: ours X, baseline Y, ratio R×` follows: PGD with broken
   digits leaving the batch within a restart (`compact`) against keeping them; FGSM's ε grid from
   one shared gradient (`attacks.fgsm_sweep`, as evaluate runs it) against one gradient per ε.
2. `evaluate <defences>`: the wall and CPU time of a whole evaluation of the network (clean suite,
   the default FGSM and PGD grids) on the digits, and its CPU time scaled to 1,000 attack digits
   (the default attack set; the attack work is linear in the digits while DENT's batch, 128, is
   not full, and about linear beyond).
The network: wk-small trained by `pixgen train` for 5 epochs on 2,000 digits (a few seconds).
Run from the repository root with OMP_NUM_THREADS=1:
`.venv/bin/python benchmarks/bench_evaluate.py [DIGITS]` (default 64).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pixgen import attacks, data, evaluate, models
from pixgen.dent import DEFENSES, Dent
from pixgen.methods import TrainConfig
from pixgen.train import run as train

PGD_EPS = (0.1, 0.3)  # PGD and AutoAttack stop early on broken digits: cost falls as ε grows
DENT_EPS = 0.1  # the attacks on DENT attack every digit to the end: their cost barely depends on ε


def cpu_ms(fn) -> tuple[float, object]:
    """CPU time of fn() in ms (this process only: other jobs on the machine do not count) and its result."""
    start = time.process_time()
    out = fn()
    return 1000 * (time.process_time() - start), out


def setup(folder: Path, digits: int, defences: tuple[str, ...]) -> evaluate.Setup:
    """The evaluation's shared state for `digits` attack digits, as `evaluate.run` builds it."""
    config = evaluate.EvalConfig(suites=("clean",), defenses=defences, attack_size=digits, test_size=max(digits, 200))
    static, meta = models.load(folder)
    static.requires_grad_(False)
    images, labels = data.load("mnist", "test")
    test_index = data.balanced_subset(labels, config.test_size, evaluate.SUBSET_SEED)
    attack_index = test_index[data.balanced_subset(labels[test_index], digits, evaluate.SUBSET_SEED)]
    attack = (evaluate.to_tensor(images[attack_index], "cpu"), torch.as_tensor(labels[attack_index]), attack_index)
    networks = {"none": static, **{d: Dent(static, DEFENSES[d]).eval() for d in defences if d != "none"}}
    test = (images[test_index], labels[test_index], test_index)
    return evaluate.Setup(config, static, meta, networks, "mnist", test, attack, None, [], None, None, torch.device("cpu"), 1.0)


def threat_costs(s: evaluate.Setup) -> None:
    x, y, _ = s.attack
    n = len(y)
    for defence, attack, eps_list in (("none", "pgd", PGD_EPS), ("none", "autoattack", PGD_EPS), ("dent", "pgd", (DENT_EPS,))):
        network = s.networks[defence]
        for threat, make in evaluate.threats(s, defence, attack).items():
            for eps in eps_list:
                ms, [adversarial] = cpu_ms(lambda: list(make(x, y, (eps,), 0)))
                judge, _ = cpu_ms(lambda: network(adversarial))
                accuracy = float((network(adversarial).argmax(1) == y).float().mean())
                print(f"{defence} {attack} {threat} ε {eps}: {(ms + judge) / n:.1f} ms per digit (accuracy {accuracy:.0%}, {n} digits)")
    for eps in PGD_EPS:  # before/after: broken digits leaving the batch within a restart
        ours, fast = cpu_ms(lambda: attacks.build("pgd", s.static, eps, restarts=5)(x, y))
        base, whole = cpu_ms(lambda: attacks.build("pgd", s.static, eps, restarts=5, compact=False)(x, y))
        assert torch.equal(fast, whole)
        print(f"pgd-40x5 ε {eps} (broken digits leave the batch): ours {ours / n:.2f} ms/digit, baseline {base / n:.2f} ms/digit, ratio {base / ours:.2f}×")
    grid = s.config.eps("fgsm")
    ours, swept = cpu_ms(lambda: attacks.fgsm_sweep(s.static, x, y, grid, batch_size=n))
    base, each = cpu_ms(lambda: np.stack([(s.static(attacks.build("fgsm", s.static, e)(x, y)).argmax(1) == y).numpy() for e in grid]))
    assert np.array_equal(swept, each)
    per = n * len(grid)
    print(f"fgsm per ε ({len(grid)} ε, one shared gradient): ours {ours / per:.3f} ms/digit, baseline {base / per:.3f} ms/digit (a gradient per ε), ratio {base / ours:.2f}×")


def evaluation_time(folder: Path, digits: int, defences: tuple[str, ...], out: Path) -> None:
    config = evaluate.EvalConfig(suites=("clean",), defenses=defences, attack_size=digits, test_size=max(digits, 200))
    start, cpu = time.perf_counter(), time.process_time()
    evaluate.run(config, folder, out)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"evaluate {'+'.join(defences)} (clean, FGSM {len(config.eps('fgsm'))} ε, PGD {len(config.eps('pgd'))} ε, {digits} digits): "
          f"wall {seconds:.1f} s, CPU {cpu:.1f} s = {1000 * cpu / digits:.0f} ms per digit, CPU {cpu * 1000 / digits / 60:.1f} min for 1,000 digits")


if __name__ == "__main__":
    digits = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    with tempfile.TemporaryDirectory() as tmp:
        folder = train(TrainConfig(arch="wk-small", epochs=5, batch_size=32, train_size=2000, val_size=200), Path(tmp) / "wk-small")
        threat_costs(setup(folder, digits, ("none", "dent")))
        evaluation_time(folder, digits, ("none",), Path(tmp) / "none.zarr")
        evaluation_time(folder, digits, ("none", "dent"), Path(tmp) / "dent.zarr")
