"""Metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from pixgen import metrics


def two_class(confidences, correct) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose maximum is each confidence (≥ 0.5), and labels that make it right or wrong."""
    c = np.asarray(confidences, dtype=np.float64)
    probs = np.stack([c, 1 - c], axis=1)
    labels = np.where(np.asarray(correct, bool), 0, 1)
    return probs, labels


def test_accuracy_from_probabilities_and_classes():
    probs, labels = two_class([0.9, 0.6, 0.7, 0.8], [1, 0, 1, 1])
    assert metrics.accuracy(probs, labels) == 0.75
    assert metrics.accuracy(np.array([0, 0, 0, 1]), labels) == 0.5


def test_rms_calibration_error_hand_computed():
    probs, labels = two_class([0.6, 0.7, 0.8, 0.9, 1.0], [1, 0, 1, 1, 1])
    # Bins of 2 → [0.6, 0.7] (gap 0.65 − 0.5) and, with the remainder, [0.8, 0.9, 1.0] (gap 0.9 − 1).
    full = np.sqrt(2 / 5 * 0.15**2 + 3 / 5 * 0.1**2)
    assert metrics.rms_calibration_error(probs, labels, bin_size=2) == pytest.approx(full)
    assert metrics.rms_calibration_error(probs, labels, bin_size=2, drop_last_bin=True) == pytest.approx(np.sqrt(2 / 5 * 0.15**2))
    # Fewer samples than a bin: one bin, |mean confidence − accuracy|.
    assert metrics.rms_calibration_error(probs, labels) == pytest.approx(abs(0.8 - 0.8))
    shuffled = np.random.default_rng(0).permutation(5)
    assert metrics.rms_calibration_error(probs[shuffled], labels[shuffled], bin_size=2) == pytest.approx(full)


def test_rms_calibration_error_of_a_perfectly_calibrated_set_is_zero():
    # 100 samples at each confidence, exactly that fraction of them right.
    confidences = np.repeat([0.6, 0.8, 1.0], 100)
    correct = np.concatenate([np.arange(100) < 60, np.arange(100) < 80, np.ones(100, bool)])
    probs, labels = two_class(confidences, correct)
    assert metrics.rms_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_expected_calibration_error_hand_computed():
    probs, labels = two_class([0.62, 0.64, 0.95, 0.97], [1, 0, 1, 1])
    # Bins (0.6, 0.667]: gap 0.63 − 0.5; (0.933, 1]: gap 0.96 − 1; each holds half the samples.
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.13 + 0.5 * 0.04)
    # Bin edges are (lo, hi]: confidence 1.0 falls in the last bin with 0.97.
    probs, labels = two_class([0.97, 1.0], [1, 1])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.015)


def test_reliability_bins_hand_computed():
    probs, labels = two_class([0.62, 0.64, 0.95, 0.97, 1.0], [1, 0, 1, 0, 1])
    bins = metrics.reliability_bins(probs, labels, n_bins=3)
    assert bins["edges"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert bins["count"] == [0, 2, 3]
    assert bins["confidence"][0] is None and bins["accuracy"][0] is None  # an empty bin has no mean
    assert bins["confidence"][1:] == pytest.approx([0.63, 2.92 / 3]) and bins["accuracy"][1:] == pytest.approx([0.5, 2 / 3])
    # ECE is the count-weighted gap of these bins.
    ece = (2 * abs(0.63 - 0.5) + 3 * abs(2.92 / 3 - 2 / 3)) / 5
    assert metrics.expected_calibration_error(probs, labels, n_bins=3) == pytest.approx(ece)


def test_anomaly_detection_with_ties():
    in_probs, _ = two_class([0.9, 0.6, 0.6], [1, 1, 1])
    out_probs, _ = two_class([0.6, 0.5], [1, 1])
    result = metrics.anomaly_detection(in_probs, out_probs)
    # Scores −MSP: in −0.9, −0.6, −0.6; out −0.6, −0.5. Out-vs-in pairs won: −0.6 beats −0.9 and
    # ties twice (1 + ½ + ½), −0.5 beats all three: 5 of 6.
    assert result["auroc"] == pytest.approx(5 / 6)
    # Thresholds −0.5 (precision 1, recall ½), −0.6 (precision ½, recall 1): AP = ½·1 + ½·½.
    assert result["aupr"] == pytest.approx(0.75)
    # 95% TPR needs threshold −0.6, which also flags both tied in-distribution samples.
    assert result["fpr95"] == pytest.approx(2 / 3)
    # ROC corners: nothing flagged, then −0.5 (TPR ½, FPR 0), then −0.6 (all out, 2 of 3 in), then all.
    assert result["roc"]["tpr"] == pytest.approx([0, 0.5, 1, 1]) and result["roc"]["fpr"] == pytest.approx([0, 0, 2 / 3, 1])


def test_fpr_at_95_tpr_exact_operating_point():
    positives = np.arange(10, 30, dtype=float)  # 20: a threshold of 11 flags 19 = 95%
    negatives = np.append(np.arange(10, dtype=float), 18.5)
    is_pos = np.r_[np.ones(20, bool), np.zeros(11, bool)]
    assert metrics.fpr_at_tpr(is_pos, np.r_[positives, negatives], 0.95) == pytest.approx(1 / 11)


def test_fpr_at_tpr_does_not_skip_collinear_points():
    # ROC points (0, .5), (.25, .75), (.5, 1) are collinear; the first reaching 75% TPR is the middle one.
    is_pos = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
    scores = np.array([8, 7, 5, 5, 3, 3, 1, 1], float)
    assert metrics.fpr_at_tpr(is_pos, scores, 0.75) == pytest.approx(0.25)


def test_consistency_and_flip_rate():
    preds = np.array([[0, 1, 2, 3], [0, 1, 2, 0], [0, 2, 2, 3]])  # (T=3, N=4)
    assert metrics.consistency(preds) == 0.5  # samples 0 and 2 never change
    assert metrics.flip_rate(preds) == pytest.approx(3 / 8)  # sample 3 once per step, sample 1 once
    probs = np.eye(4)[np.stack([preds, preds])]  # (2 sequences, T, N, K)
    assert metrics.consistency(probs) == 0.5 and metrics.flip_rate(probs) == pytest.approx(3 / 8)


def test_translation_sequences():
    images = np.zeros((3, 28, 28), np.uint8)
    images[:, 10, 12] = 255
    seqs = metrics.translation_sequences(images, max_shift=2)
    assert seqs.shape == (2, 5, 3, 28, 28)
    assert np.array_equal(seqs[0, 2], images) and np.array_equal(seqs[1, 2], images)
    assert seqs[0, 3, :, 10, 13].all() and seqs[0, 0, :, 10, 10].all()  # x: +1 px right, −2 px left
    assert seqs[1, 4, :, 12, 12].all() and seqs[0, 4].sum() == images.sum()


def test_wilson_interval_matches_known_values():
    # 81 of 263 (Wilson 1927's style of example; statsmodels' proportion_confint method="wilson"
    # gives 0.2553, 0.3662), and the edges: 0 of 500 is not the empty interval [0, 0].
    lo, hi = metrics.wilson_interval(81, 263)
    assert abs(lo - 0.2553) < 5e-4 and abs(hi - 0.3662) < 5e-4
    lo, hi = metrics.wilson_interval(np.array([0, 500]), 500)
    assert lo[0] == 0 and 0.005 < hi[0] < 0.01 and 0.99 < lo[1] < 0.995 and hi[1] == 1


def test_mcnemar_counts_the_discordant_digits_and_tests_them_exactly():
    # A right on digits 0-3, B on 2-7: A alone on 0-1 (2), B alone on 4-7 (4); 8-9 both wrong.
    a = np.arange(10) < 4
    b = (np.arange(10) >= 2) & (np.arange(10) < 8)
    # Two-sided exact test of 2 of 6 at 1/2: 2 · P(X ≤ 2) = 2 · (1 + 6 + 15) / 64.
    assert metrics.mcnemar(a, b) == (2, 4, pytest.approx(44 / 64))
    assert metrics.mcnemar(b, a) == (4, 2, pytest.approx(44 / 64))  # symmetric
    # 0 of 5 discordant for A: 2 · 1/32; concordant digits (both right) change nothing.
    assert metrics.mcnemar(np.r_[np.zeros(5, bool), np.ones(50, bool)], np.ones(55, bool)) == (0, 5, pytest.approx(2 / 32))
    assert metrics.mcnemar(a, a) == (0, 0, 1.0)  # no discordant digit: no evidence either way
    with pytest.raises(ValueError, match="same samples"):
        metrics.mcnemar(a, a[:5])


def test_aupr_at_one_to_five_uses_the_first_fifth_of_the_outliers():
    # 10 in-distribution samples (MSP 0.9 … 0.81) and 10 outliers; 1:5 keeps the first 2 outliers.
    # Outliers 0, 1 score above every inlier: AP 1 at 1:5; outliers 2 … 9 score below: at 1:1,
    # AP = 2/10·1 + 8/10·(10/20) = 0.6.
    in_probs, _ = two_class(list(np.linspace(0.9, 0.81, 10)), [1] * 10)
    out_probs, _ = two_class([0.55, 0.56] + [0.99] * 8, [1] * 10)
    result = metrics.anomaly_detection(in_probs, out_probs)
    assert result["aupr_1to5"] == pytest.approx(1.0)
    assert result["aupr"] == pytest.approx(0.6)
