"""The evaluation suite: attacks' sanity (FGSM at ε = 0, PGD ≥ FGSM), the certificate, the JSON
of a tiny run with and without DENT, determinism, and bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from conftest import pixgen
from pixgen import PixgenError, attacks, corruptions, data, evaluate, models
from pixgen.cli import cli
from pixgen.dent import DentConfig
from test_dent import trained

SMALL = dict(test_size=50, batch_size=50, fgsm_eps=(0.0, 0.1), pgd_eps=(0.1,))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    net = trained("wk-small", tmp_path_factory)
    out = tmp_path_factory.mktemp("models") / "standard-wk-small"
    models.save(out, net, {"arch": "wk-small", "method": "standard", "complete": True})
    return out


@pytest.fixture(scope="module")
def digits():
    images, labels = data.load("mnist", "test")
    index = data.balanced_subset(labels, 200, seed=0)
    return evaluate.to_tensor(images[index], "cpu"), torch.from_numpy(labels[index])


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum()) / len(y)


def test_fgsm_at_zero_is_clean(folder, digits):
    net, _ = models.load(folder)
    x, y = digits
    adv = attacks.build("fgsm", net, 0.0)(x, y)
    assert torch.equal(adv, x)
    assert accuracy(net, adv, y) == accuracy(net, x, y)


def test_pgd_at_least_as_strong_as_fgsm(folder, digits):
    net, _ = models.load(folder)
    x, y = digits[0][:100], digits[1][:100]
    pgd = accuracy(net, attacks.build("pgd", net, 0.1)(x, y), y)
    fgsm = accuracy(net, attacks.build("fgsm", net, 0.1)(x, y), y)
    assert pgd <= fgsm, (pgd, fgsm)


def test_certificate_is_exact_at_zero_and_sound(folder, digits):
    net, _ = models.load(folder)
    x, y = digits[0][:10], digits[1][:10]
    assert evaluate.certified_accuracy(net, x, y, 1e-6) == accuracy(net, x, y)
    certified = evaluate.certified_accuracy(net, x, y, 0.01)
    attacked = accuracy(net, attacks.build("pgd", net, 0.01)(x, y), y)
    assert 0 <= certified <= attacked


def test_json_of_a_tiny_run(folder, tmp_path):
    mnist_c = corruptions.run(corruptions.CorruptConfig(count=10), tmp_path / "mnist_c.zarr")
    dual = tmp_path / "dual-wk-small"  # the certify suite acts on dual networks: pose as one
    shutil.copytree(folder, dual)
    meta = json.loads((dual / models.META).read_text())
    (dual / models.META).write_text(json.dumps({**meta, "method": "dual", "eps": 0.01}))
    # PGD on DENT costs 40 unrolled adaptations per batch; its code path is FGSM's, tested here
    suites = tuple(s for s in evaluate.SUITES if s != "pgd")
    config = evaluate.EvalConfig(suites=suites, certify_size=5, dent=DentConfig(steps=2), **SMALL)
    (path,) = evaluate.run(config, [dual], tmp_path / "out", "both", mnist_c)
    result = json.loads(path.read_text())
    assert path.name == "dual-wk-small.json" and result["stage"] == "evaluate"
    none, dent = result["defenses"]["none"], result["defenses"]["dent"]
    assert none["fgsm"]["eps"] == [0.0, 0.1] and set(none["fgsm"]) == {"eps", "standard", "worst"}
    assert set(dent["fgsm"]) == {"eps", "standard", "transfer", "adaptive", "worst"} and "pgd" not in dent
    assert none["fgsm"]["standard"][0] == none["clean"]["accuracy"]
    entry = dent["fgsm"]
    for i in range(len(entry["eps"])):
        assert entry["worst"][i] <= min(entry[t][i] for t in ("standard", "transfer", "adaptive"))
    for defense in (none, dent):
        assert set(defense["ood"]) == {"fashion-mnist", "uniform", "gaussian"}
        assert set(defense["ood"]["uniform"]) == {"auroc", "aupr", "fpr95", "roc"}
        roc = defense["ood"]["uniform"]["roc"]
        assert roc["fpr"][0] == roc["tpr"][0] == 0 and roc["fpr"][-1] == roc["tpr"][-1] == 1
        assert set(defense["calibration"]) == {"rms", "ece", "bins"}
        assert sum(defense["calibration"]["bins"]["count"]) == SMALL["test_size"]
        assert 0 <= defense["consistency"]["consistency"] <= 1
        assert set(defense["corruptions"]["accuracy"]) == set(corruptions.NAMES)
        assert defense["corruptions"]["count"] == 10
    assert none["certify"]["eps"] == 0.01 and none["certify"]["count"] == 5
    assert "certify" not in dent


def test_deterministic(folder, tmp_path):
    config = evaluate.EvalConfig(suites=("fgsm", "pgd"), **SMALL)
    first, second = (json.loads(evaluate.run(config, [folder], tmp_path / name)[0].read_text()) for name in ("a", "b"))
    assert first["defenses"] == second["defenses"]


def test_bad_config_values():
    with pytest.raises(PixgenError, match="unknown suite"):
        evaluate.EvalConfig(suites=("clean", "fgsn"))
    with pytest.raises(PixgenError, match="≥ 0"):
        evaluate.EvalConfig(fgsm_eps=(0.1, -0.1))
    with pytest.raises(PixgenError, match="MNIST-C"):
        evaluate.run(evaluate.EvalConfig(suites=("corruptions",)), ["x"], "out")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suite", "clean,robustness"], "unknown suite robustness"),
        (["--pgd-eps", "0.1,-0.2"], "must be ≥ 0"),
        (["--defense", "dent", "--dent-steps", "0"], "at least 1 adaptation step"),
    ],
)
def test_cli_bad_inputs(folder, args, message):
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(folder), *args])
    assert result.exit_code != 0 and message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(result.output.strip().splitlines()) == 1


def test_cli_not_a_model(tmp_path):
    """Through a real process: the user sees one line on stderr, no traceback."""
    (tmp_path / "notes").mkdir()
    proc = pixgen("evaluate", "--model", tmp_path / "notes", check=False)
    assert proc.returncode != 0 and "not a pixgen model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
