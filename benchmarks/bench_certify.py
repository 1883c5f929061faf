"""Certificate throughput per method, and IBP training against dual training.

1. `certify METHOD: ours X digits/s, baseline Y digits/s (dual), ratio R×`: each of ibp, dual-opt
   (100 ascent steps) and lp against Wong & Kolter's dual bound (convex-adversarial, exact), all
   in float64 on the same class-balanced MNIST test digits at ε 0.1, batches of 10 (lp: a few
   digits, 9 HiGHS solves each). The cost depends on how many ReLUs are ambiguous, so the network
   is a trained one: the model folder given as the first argument, else wk-small IBP-trained
   here for 2 epochs on 2,000 digits (a few seconds).
2. `ibp training`: images per second of an IBP training step at its defaults (batch 100) against
   a dual step at its defaults (batch 32, 10 projections), untrained wk-small, at ε 0.1.
Run from the repository root: `.venv/bin/python benchmarks/bench_certify.py [MODEL]` (or `make bench`).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from pixgen import certify, methods, models, train

EPS, DIGITS, LP_DIGITS, CHUNK = 0.1, 20, 3, 10


def trained_model(tmp: Path) -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    config = methods.TrainConfig(method="ibp", epochs=2, batch_size=50, lr=5e-3, eps=EPS, ramp_epochs=1, train_size=2000, val_size=200, certify_size=200)
    return train.run(config, tmp / "ibp")


def rate(model, x, y, method: str) -> float:
    """Digits per second of `method` over the digits, in chunks as pixgen certify runs them."""
    config = certify.resolve(certify.CertifyConfig(eps=EPS, method=method))
    start = time.perf_counter()
    for s in range(0, len(y), CHUNK):
        certify.bound_chunk(model, x[s : s + CHUNK], y[s : s + CHUNK], config)
    return len(y) / (time.perf_counter() - start)


def certify_throughput(folder: Path) -> None:
    model, meta = models.load(folder)
    model = model.double().requires_grad_(False)
    x, y = train.to_tensors(*train.load_split("test", DIGITS, None), torch.device("cpu"))
    x = x.double()
    base = rate(model, x, y, "dual")
    for method in ("ibp", "dual-opt", "lp"):
        n = LP_DIGITS if method == "lp" else DIGITS
        ours = rate(model, x[:n], y[:n], method)
        print(f"certify {method} ({meta['arch']} {meta['method']}, ε {EPS}, {n} digits): ours {ours:.2f} digits/s, baseline {base:.2f} digits/s (dual), ratio {ours / base:.2f}×")


def training_throughput() -> None:
    def images_per_second(method: str, batch: int, steps: int = 5) -> float:
        config = methods.TrainConfig(method=method, epochs=2, batch_size=batch)
        torch.manual_seed(0)
        model = models.build("wk-small")
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        x, y = torch.rand(batch, 1, 28, 28), torch.arange(batch) % 10
        step = methods.Step(config, epoch=1, index=99, total=100)  # past the ramp: ε is the final one
        start = time.perf_counter()
        for _ in range(steps):
            loss, _ = methods.METHODS[method].loss(model, x, y, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return steps * batch / (time.perf_counter() - start)

    ibp = images_per_second("ibp", methods.METHODS["ibp"].defaults["batch_size"])
    dual = images_per_second("dual", methods.METHODS["dual"].defaults["batch_size"])
    print(f"ibp training (wk-small, ε 0.1, defaults): ours {ibp:.0f} img/s, baseline {dual:.0f} img/s (dual, 10 projections), ratio {ibp / dual:.1f}×")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        certify_throughput(trained_model(Path(tmp)))
    training_throughput()
