"""The evaluation stage: attacks' sanity (FGSM at ε = 0, PGD ≥ FGSM), the certificate, the asset of
a tiny run with and without DENT (per-digit outcomes, results computed from them, intervals),
resume and no-op, determinism, and bad inputs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from conftest import pixgen
from pixgen import PixgenError, assets, attacks, bounds, corruptions, data, evaluate, models
from pixgen.cli import cli
from pixgen.dent import DEFENSES as DENT_DEFENSES
from pixgen.dent import Dent, DentConfig
from test_dent import trained

SMALL = dict(test_size=60, attack_size=24, batch_size=50, attacks=(("fgsm", (0.0, 0.05, 0.1)), ("pgd", (0.1,))), pgd_restarts=2, adaptive_steps=2, adaptive_apgd_steps=10)


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
    return float(accuracy_mask(model, x, y).mean())


def accuracy_mask(model, x, y) -> np.ndarray:
    with torch.no_grad():
        return (model(x).argmax(1) == y).numpy()


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
    assert bounds.dual_certified(net, x, y, 1e-6).float().mean() == accuracy(net, x, y)
    certified = bounds.dual_certified(net, x, y, 0.01).float().mean()
    attacked = accuracy(net, attacks.build("pgd", net, 0.01)(x, y), y)
    assert 0 <= certified <= attacked


@pytest.fixture(scope="module")
def tiny(folder, tmp_path_factory):
    """A dual-posing network evaluated with every suite (AutoAttack aside), with and without DENT."""
    tmp = tmp_path_factory.mktemp("tiny")
    corrupt = corruptions.run(corruptions.CorruptConfig(count=10), tmp / "mnist_c.zarr")
    dual = tmp / "dual-wk-small"  # the certify suite acts on dual networks: pose as one
    shutil.copytree(folder, dual)
    meta = json.loads((dual / models.META).read_text())
    (dual / models.META).write_text(json.dumps({**meta, "method": "dual", "eps": 0.01}))
    # Square at ε 0.3, where it left 0 of these 24 digits and 1 through DENT: at 0.1 each digit it
    # cannot break costs it all 5,000 queries, through DENT each an adaptation (under cProfile,
    # 50 of the 77 s the evaluation took).
    small = SMALL | {"attacks": (*SMALL["attacks"], ("autoattack", (0.1,)), ("square", (0.3,)))}
    config = evaluate.EvalConfig(suites=tuple(evaluate.SUITES), defenses=("none", "dent"), certify_size=5, dent=DentConfig(steps=2, batch_size=12), **small)
    return config, dual, corrupt, evaluate.run(config, dual, tmp / "eval.zarr", corrupt)


def test_a_tiny_run_stores_per_digit_outcomes_and_results_computed_from_them(tiny):
    config, _, _, path = tiny
    group = assets.open_asset(path, stage="evaluate")
    result = group.attrs["defenses"]
    none, dent = result["none"], result["dent"]
    assert none["fgsm"]["eps"] == [0.0, 0.05, 0.1] and {"standard", "worst"} <= set(none["fgsm"])
    assert {"standard", "transfer", "worst"} <= set(dent["fgsm"])
    assert {"standard", "transfer", "adaptive", "fixed-point", "eot", "worst"} <= set(dent["pgd"])
    # AutoAttack is shown to DENT from the static network; Square attacks DENT as a whole.
    assert set(evaluate.outcomes(group, "dent", "autoattack")) == {"transfer"} and set(evaluate.outcomes(group, "dent", "square")) == {"standard"}
    # The worst case over attacks: per digit, the AND of every attack's worst case run at that ε.
    for name, defense in (("none", none), ("dent", dent)):
        every = defense[evaluate.ALL_ATTACKS]
        assert every["eps"] == [0.0, 0.05, 0.1, 0.3] and every["attacks"][2:] == [["fgsm", "pgd", "autoattack"], ["square"]]
        at = {a: np.logical_and.reduce(list(evaluate.outcomes(group, name, a).values())) for a in ("fgsm", "pgd", "autoattack", "square")}
        assert every["worst"][2] == np.mean(at["fgsm"][2] & at["pgd"][0] & at["autoattack"][0]) <= min(defense[a]["worst"][-1] for a in ("fgsm", "pgd", "autoattack"))
        assert every["worst"][1] == defense["fgsm"]["worst"][1] and every["worst"][3] == defense["square"]["worst"][0] == np.mean(at["square"][0])
    assert group.attrs["model"]["dent_variants"] == {"dent": "channel-affine (BN-free generalisation)"}
    # Per digit: the stored outcomes give the accuracies, and the worst case is their AND.
    threats = {t: group[f"dent_pgd_{t}"][:] for t in ("standard", "transfer", "adaptive", "fixed-point", "eot")}
    assert all(c.shape == (1, SMALL["attack_size"]) for c in threats.values())
    assert dent["pgd"]["worst"] == np.logical_and.reduce(list(threats.values())).mean(1).tolist()
    assert dent["pgd"]["worst"][0] <= min(dent["pgd"][t][0] for t in threats)
    # At ε = 0 an attack is the identity: FGSM's first row is the clean accuracy of the attack digits.
    attack_digits = group["attack_indices"][:]
    probs = group["none_probs"][:]
    by_index = dict(zip(group["indices"][:].tolist(), probs.argmax(1) == group["labels"][:]))
    assert none["fgsm"]["standard"][0] == np.mean([by_index[i] for i in attack_digits])
    lo, hi = none["fgsm"]["standard_interval"][2]
    assert lo <= none["fgsm"]["standard"][2] <= hi and 0 < hi - lo < 0.5
    for defense in (none, dent):
        assert set(defense["ood"]) == set(evaluate.ood_names("mnist"))
        assert 0 <= defense["ood"]["bernoulli"]["aupr_1to5"] <= 1
        roc = defense["ood"]["uniform"]["roc"]
        assert roc["fpr"][0] == roc["tpr"][0] == 0 and roc["fpr"][-1] == roc["tpr"][-1] == 1
        assert sum(defense["calibration"]["bins"]["count"]) == SMALL["test_size"]
        assert 0 <= defense["consistency"]["consistency"] <= 1
        assert set(defense["corruptions"]["accuracy"]) == set(corruptions.NAMES) and defense["corruptions"]["count"] == 10
    assert none["certify"]["eps"] == 0.01 and none["certify"]["count"] == 5 and "certify" not in dent
    assert group.attrs["warnings"] == []
    assert group["examples_pgd"].shape == (1, 12, 28, 28)


def test_fgsm_outcomes_from_the_shared_gradient_are_those_of_one_attack_per_eps(tiny):
    """evaluate takes FGSM's whole ε grid from one gradient per batch; each stored outcome must be
    what attacking at that ε alone gives, through DENT too (its gradient is the clean batch's)."""
    config, dual, _, path = tiny
    group = assets.open_asset(path, stage="evaluate")
    static, _ = models.load(dual)
    static.requires_grad_(False)
    dent = Dent(static, replace(config.dent, adapt_input=DENT_DEFENSES["dent"].adapt_input)).eval()
    images, labels = data.load("mnist", "test")
    index = group["attack_indices"][:]
    x, y = evaluate.to_tensor(images[index], "cpu"), torch.from_numpy(labels[index])
    grid = config.eps("fgsm")
    for stored, network, attacked, size in (("none_fgsm_standard", static, static, config.batch_size),
                                             ("dent_fgsm_standard", dent, dent, config.dent.batch_size),
                                             ("dent_fgsm_transfer", dent, static, config.dent.batch_size)):  # fmt: skip
        alone = np.zeros((len(grid), len(y)), bool)
        for i, eps in enumerate(grid):
            for s in range(0, len(y), size):
                xs, ys = x[s : s + size], y[s : s + size]
                alone[i, s : s + size] = accuracy_mask(network, attacks.build("fgsm", attacked, eps)(xs, ys), ys)
        np.testing.assert_array_equal(group[stored][:], alone, err_msg=stored)
    assert len(set(group["none_fgsm_standard"][:].sum(1).tolist())) > 1  # the grid's ε differ in effect


def test_an_adaptive_attack_weaker_than_transfer_is_warned_about(tiny):
    _, _, _, path = tiny
    pgd = dict(assets.open_asset(path, stage="evaluate").attrs["defenses"]["dent"]["pgd"])
    assert evaluate.adaptive_warnings(pgd) == [] and pgd["adaptive"][0] <= pgd["transfer"][0]
    weak = pgd | {"eps": [0.05, 0.1], "adaptive": [0.9, 0.6], "transfer": [0.5, 0.5]}
    assert evaluate.adaptive_warnings(weak) == ["the adaptive attack leaves 60.0% at ε 0.1, more than transfer's 50.0%; the adaptive attack is failing"]
    assert evaluate.adaptive_warnings(dict(assets.open_asset(path, stage="evaluate").attrs["defenses"]["none"]["pgd"])) == []


def test_autoattack_by_transfer_is_not_held_to_be_stronger_than_pgd_through_dent():
    outcomes = {"pgd": {0.1: np.array([False, False])}, "autoattack": {0.1: np.array([True, False])}}
    (warning,) = attacks.sanity_warnings(outcomes, evaluate.strength("none"))
    assert warning.startswith("autoattack at ε 0.1 leaves 1 digit(s) correct that pgd breaks")
    assert attacks.sanity_warnings(outcomes, evaluate.strength("dent")) == []


def test_a_rerun_is_a_no_op_and_another_config_needs_force(tiny):
    config, dual, corrupt, path = tiny
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    evaluate.run(config, dual, path, corrupt)
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before
    with pytest.raises(PixgenError, match="--force"):
        evaluate.run(evaluate.EvalConfig(suites=("clean",), attacks=(), defenses=("none", "dent"), test_size=60), dual, path)


def test_killed_after_some_tasks_resumes_to_the_same_outcomes(folder, tmp_path):
    """Both runs in their own processes, as a user's are (the same process can take other
    floating-point paths after earlier work, which would blur what this test checks)."""
    args = ["evaluate", "--model", folder, "--suite", "clean", "--test-size", "60", "--attack-size", "24", "--batch-size", "50",
            "--attack", "fgsm=0,0.1", "--attack", "pgd=0.1", "--pgd-restarts", "2", "--adaptive-steps", "2"]  # fmt: skip
    pixgen(*args, "--out", tmp_path / "reference.zarr")
    killed = pixgen(*args, "--out", tmp_path / "e.zarr", env={"PIXGEN_FAULT": "unit1"}, check=False)
    assert killed.returncode == -9
    assert "resuming" in pixgen(*args, "--out", tmp_path / "e.zarr").stderr
    a, b = zarr.open_group(str(tmp_path / "reference.zarr"), mode="r"), zarr.open_group(str(tmp_path / "e.zarr"), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        assert np.array_equal(a[name][:], b[name][:]), name
    assert a.attrs["defenses"] == b.attrs["defenses"]


def test_ood_sets_are_what_they_are_named():
    sets = evaluate.ood_sets(40, 0, None, "mnist")
    assert list(sets) == list(evaluate.ood_names("mnist")) and all(len(s) == 40 and s.shape[-2:] == (28, 28) for s in sets.values())
    assert set(np.unique(sets["bernoulli"])) == {0.0, 1.0}
    blobs = sets["blobs"]
    assert (blobs == 0).mean() > 0.3 and blobs.max() >= 0.75 and not ((blobs > 0) & (blobs < 0.75)).any()
    digits = data.load("mnist", "test")[0].astype(np.float32) / 255
    inverted = 1 - sets["inverted"][:, 0]
    assert all(np.abs(digits - img).max((1, 2)).min() < 1e-6 for img in inverted[:5])  # each is 1 − a test digit
    assert sets["fashion-mnist"].dtype == np.uint8 and sets["blended"].max() <= 1
    assert np.array_equal(evaluate.ood_sets(40, 0, None, "mnist")["blended"], sets["blended"])  # seeded


def test_bad_config_values():
    with pytest.raises(PixgenError, match="unknown suite"):
        evaluate.EvalConfig(suites=("clean", "fgsn"))
    with pytest.raises(PixgenError, match="increasing budgets in"):
        evaluate.EvalConfig(attacks=(("fgsm", (0.1, 0.05)),))
    with pytest.raises(PixgenError, match="attacks must be distinct names from fgsm, pgd, autoattack"):
        evaluate.EvalConfig(attacks=(("cw", (0.1,)),))
    with pytest.raises(PixgenError, match="nothing to evaluate"):
        evaluate.EvalConfig(suites=(), attacks=())
    with pytest.raises(PixgenError, match="defences must be distinct names"):
        evaluate.EvalConfig(defenses=("none", "tent"))
    with pytest.raises(PixgenError, match="needs a corrupted test set"):
        evaluate.run(evaluate.EvalConfig(suites=("corruptions",)), "x", "out")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suite", "clean,robustness"], "unknown suite robustness"),
        (["--attack", "pgd=0.1,-0.2"], "increasing budgets ≥ 0"),
        (["--attack", "fgsm=0.5:0:0.1"], "START <= STOP"),
        (["--attack", "fgsm=,"], "no ε given"),
        (["--attack", "autoattack=2"], "increasing budgets in [0, 1]"),
        (["--attack", "cw=0.1"], "expected NAME=GRID with NAME one of fgsm, pgd, autoattack"),
        (["--dent-steps", "0"], "0 is not in the range x>=1"),
        (["--attack-size", "1000000"], "exceeds the 10000 test digits"),
    ],
)
def test_cli_bad_inputs(folder, args, message, tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(folder), "--out", str(tmp_path / "e.zarr"), *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "e.zarr").exists()


def test_cli_not_a_model(tmp_path):
    """Through a real process: the user sees one line on stderr, no traceback."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "file").write_text("x")
    for model, message in ((tmp_path / "notes", "not a pixgen model"), (tmp_path / "file", "is a file, not a model folder")):
        proc = pixgen("evaluate", "--model", model, "--out", tmp_path / "e.zarr", check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
