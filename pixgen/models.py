"""Network definitions by name, device choice, and the model asset (a folder: weights + metadata).

Networks take pixels in [0, 1], so attack budgets are in pixel units; an input normalisation
(x − mean)/std, when a network has one (`pixgen train --normalize`), is its first layer
(`Normalize`), inside the network, so attacks, DENT and the bounds still see pixels. Their input
shape and number of classes come from the dataset (pixgen.data.DATASETS).
All are nn.Sequential of Conv2d/Linear/ReLU/Flatten (and BatchNorm2d, MaxPool2d, Normalize), the
form the convex-adversarial library can bound (pixgen.bounds hands it Normalize as the equal 1×1
convolution).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from . import PixgenError, __version__, data
from .assets import fault

WEIGHTS = "state_dict.pt"
META = "meta.json"


class Normalize(nn.Module):
    """(x − mean) / std, the same scalar pair for every channel: the input normalisation some
    reference code (PixMix: mean 0.5, std 0.5, images in [−1, 1]) applies before the network. The
    pair is held in buffers, so it travels with the weights (state_dict, .double(), .to(device))
    and no optimiser or DENT adapts it."""

    def __init__(self, mean: float, std: float, channels: int):
        super().__init__()
        self.channels = channels
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def as_conv(self) -> nn.Conv2d:
        """The same map as a 1×1 convolution (weights I/std, bias −mean/std) without padding, a
        layer every bound already handles exactly. Dense over channels rather than grouped,
        because convex-adversarial ignores `groups`. Made without the default initialisation, which
        would draw from torch's global RNG, the one training checkpoints, at every bound."""
        like = {"dtype": self.mean.dtype, "device": self.mean.device}
        conv = nn.utils.skip_init(nn.Conv2d, self.channels, self.channels, 1, **like).requires_grad_(False)
        eye = torch.eye(self.channels, **like)
        conv.weight.copy_((eye / self.std)[:, :, None, None])
        conv.bias.copy_((-self.mean / self.std).expand(self.channels))
        return conv

    def extra_repr(self) -> str:
        return f"mean={float(self.mean):g}, std={float(self.std):g}"


def _wk_small(shape: tuple[int, int, int], classes: int, bn: bool) -> nn.Sequential:
    def block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 4, stride=2, padding=1)]
        return layers + ([nn.BatchNorm2d(cout)] if bn else []) + [nn.ReLU()]

    channels, size, _ = shape
    return nn.Sequential(*block(channels, 16), *block(16, 32), nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, 100), nn.ReLU(), nn.Linear(100, classes))


def _madry_cnn(shape: tuple[int, int, int], classes: int) -> nn.Sequential:
    channels, size, _ = shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 1024), nn.ReLU(), nn.Linear(1024, classes),
    )  # fmt: skip


ARCHS = {
    "wk-small": lambda shape, classes: _wk_small(shape, classes, bn=False),
    "wk-small-bn": lambda shape, classes: _wk_small(shape, classes, bn=True),
    "madry-cnn": _madry_cnn,
}


def build(arch: str, dataset: str = "mnist", normalize: tuple[float, float] | None = None) -> nn.Sequential:
    """The network `arch` for images and classes of `dataset` (pixgen.data.DATASETS), preceded by
    Normalize(mean, std) when `normalize` is that pair."""
    if arch not in ARCHS:
        raise PixgenError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    spec = data.spec(dataset)
    network = ARCHS[arch](spec.shape, spec.classes)
    if normalize is None:
        return network
    return nn.Sequential(Normalize(*normalize, channels=spec.shape[0]), *network)


# Units an ε can be stated in: pixels (images in [0, 1]), or the network's input units, those its
# layers after its normalisation see (pixgen evaluate / certify --eps-units).
EPS_UNITS = ("pixel", "input")


def eps_to_pixel(model: nn.Sequential, units: str) -> float:
    """The factor that turns an ε in `units` into pixels: for "input", the network's
    normalisation's std (1 without one); for "pixel", 1."""
    return float(model[0].std) if units == "input" and isinstance(model[0], Normalize) else 1.0


def device() -> torch.device:
    """CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def deterministic(dev: torch.device):
    """Deterministic kernels on the CPU while the block runs, so that resumed and fresh runs give the
    same bytes (CUDA's kernels are not all deterministic). The switch is process-wide and slows
    other work (DENT about 2x), so it is put back afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(dev.type == "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(folder: str | Path, model: nn.Module, meta: dict) -> None:
    """Write weights, then metadata: a folder whose meta.json says complete has its final weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / WEIGHTS, lambda p: torch.save(model.state_dict(), p))
    fault("weights")
    meta = {"pixgen_version": __version__, "stage": "train", **meta}
    _atomic_write(folder / META, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    if folder.is_file():
        raise PixgenError(f"model {folder} is a file, not a model folder; pass the folder pixgen train wrote")
    if not folder.is_dir():
        raise PixgenError(f"model {folder} does not exist; train it first (pixgen train) or check the path")
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        raise PixgenError(f"{folder} is not a pixgen model (no readable {META}); pass a folder made by pixgen train") from None
    if meta.get("stage") != "train" or "arch" not in meta:
        raise PixgenError(f"{folder} is not a pixgen model ({META} has no train stage); pass a folder made by pixgen train")
    return meta


def load(folder: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Sequential, dict]:
    """A complete model asset as (network in eval mode, metadata)."""
    meta = read_meta(folder)
    if not meta.get("complete"):
        raise PixgenError(f"model {folder} is not finished training; rerun its pixgen train command")
    model = build(meta["arch"], meta.get("dataset", "mnist"), meta.get("normalize"))
    try:
        model.load_state_dict(torch.load(Path(folder) / WEIGHTS, map_location=map_location, weights_only=True))
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise PixgenError(f"model {folder} is damaged: its {WEIGHTS} cannot be loaded ({type(exc).__name__}); retrain it with pixgen train --force") from None
    return model.eval(), meta


def weights_hash(model: nn.Module) -> str:
    """Content hash of a network's weights, recorded in the inputs of assets made with it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
