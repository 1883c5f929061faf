"""Safety metrics on predictions: accuracy, calibration, anomaly detection and consistency.

Every function takes numpy arrays, never a model: `probs` are softmax probabilities (N, K) and
`labels` integer classes (N,). Where a function also accepts predicted classes it says so.
"""

from __future__ import annotations

import numpy as np

# sklearn (0.7 s to import, with scipy.stats and pandas) is imported by the functions that use it:
# every pixgen process imports this module through the CLI, most never need it.


def _predictions(probs_or_classes: np.ndarray) -> np.ndarray:
    values = np.asarray(probs_or_classes)
    return values.argmax(axis=-1) if values.ndim == 2 else values


def _confidence_and_correct(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels) or len(probs) == 0:
        raise ValueError(f"need probabilities (N, K) for N > 0 labels, got {probs.shape} for {len(labels)} labels")
    return probs.max(axis=1), (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)


def accuracy(probs_or_classes: np.ndarray, labels: np.ndarray) -> float:
    """Fraction correct; takes probabilities (N, K) or predicted classes (N,)."""
    return float(np.mean(_predictions(probs_or_classes) == np.asarray(labels)))


def rms_calibration_error(probs: np.ndarray, labels: np.ndarray, bin_size: int = 100, drop_last_bin: bool = False) -> float:
    """RMS calibration error with adaptive bins, as the PixMix / outlier-exposure code computes it.

    Samples are sorted by confidence (maximum probability) and cut into consecutive bins of
    `bin_size`; the last bin also takes the remainder (fewer than `bin_size` samples make one
    bin). The error is sqrt(Σ_b (n_b / N) · (mean confidence_b − accuracy_b)²).

    The published `calib_err` loops over all bins but the last (an off-by-one), while still
    dividing by all N samples. By default this function keeps the last bin, so every sample counts;
    `drop_last_bin=True` reproduces the published number for comparison with the paper.
    """
    confidence, correct = _confidence_and_correct(probs, labels)
    # A stable sort, so tied confidences keep their order and the bins are well defined.
    order = np.argsort(confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    n = len(confidence)
    starts = np.arange(max(n // bin_size, 1)) * bin_size
    sizes = np.diff(np.append(starts, n))
    gaps = np.add.reduceat(confidence - correct, starts) / sizes
    kept = slice(0, len(starts) - 1) if drop_last_bin else slice(None)
    return float(np.sqrt(np.sum(sizes[kept] / n * gaps[kept] ** 2)))


def _equal_width_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin (lo, hi] (a confidence of 0 joins the first): the sample
    count, the sum of confidences and the number correct."""
    confidence, correct = _confidence_and_correct(probs, labels)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    return (
        np.bincount(bins, minlength=n_bins),
        np.bincount(bins, weights=confidence, minlength=n_bins),
        np.bincount(bins, weights=correct, minlength=n_bins),
    )


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE over `n_bins` equal-width confidence bins (lo, hi]:
    Σ_b (n_b / N) · |mean confidence_b − accuracy_b|."""
    sizes, confidence_sums, correct_sums = _equal_width_bins(probs, labels, n_bins)
    # Σ_b (n_b / N) |(conf_sum_b − correct_b) / n_b| = Σ_b |conf_sum_b − correct_b| / N; empty bins add 0.
    return float(np.abs(confidence_sums - correct_sums).sum() / sizes.sum())


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, list]:
    """The reliability diagram behind `expected_calibration_error`: per equal-width bin its
    `count`, mean `confidence` and `accuracy` (None for an empty bin), and the bin `edges`."""
    sizes, confidence_sums, correct_sums = _equal_width_bins(probs, labels, n_bins)

    def mean(sums):
        return [float(s / n) if n else None for s, n in zip(sums, sizes)]

    return {"edges": np.linspace(0, 1, n_bins + 1).tolist(), "count": sizes.tolist(), "confidence": mean(confidence_sums), "accuracy": mean(correct_sums)}


def anomaly_scores(probs: np.ndarray) -> np.ndarray:
    """Maximum-softmax-probability anomaly score: −max_k p_k (higher = more anomalous)."""
    return -np.asarray(probs, dtype=np.float64).max(axis=1)


def fpr_at_tpr(is_positive: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold whose true-positive rate reaches `tpr`.

    Ties are never split: a threshold flags every sample whose score is at least it. (Hendrycks'
    code takes the operating point whose recall is nearest to `tpr`, possibly below it; the two
    agree whenever an operating point reaches `tpr` exactly.)
    """
    from sklearn import metrics as skm

    # Every threshold is kept: dropping collinear ones could skip the first that reaches `tpr`.
    fprs, tprs, _ = skm.roc_curve(is_positive, scores, drop_intermediate=False)
    return float(fprs[np.argmax(tprs >= tpr - 1e-12)])


def anomaly_detection(in_probs: np.ndarray, out_probs: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR (average precision), FPR at 95% TPR and the ROC curve (`roc`: `fpr`, `tpr`) of
    telling out-of-distribution samples (the positive class) from in-distribution ones by the MSP
    score; probabilities (N, K) each. `aupr` uses every sample given (1:1 for equal sets);
    `aupr_1to5` the first N_in // 5 out-of-distribution samples against all N_in, the 1:5 out:in
    ratio of the outlier-exposure protocol PixMix's code follows (AUPR depends on the ratio;
    AUROC and FPR95 do not)."""
    from sklearn import metrics as skm

    scores = np.concatenate([anomaly_scores(in_probs), anomaly_scores(out_probs)])
    is_out = np.concatenate([np.zeros(len(in_probs), bool), np.ones(len(out_probs), bool)])
    fifth = len(in_probs) + max(1, len(in_probs) // 5)
    # The ROC's corners only (collinear points dropped): enough to draw the curve, a few hundred points.
    fprs, tprs, _ = skm.roc_curve(is_out, scores)
    return {
        "auroc": float(skm.roc_auc_score(is_out, scores)),
        "aupr": float(skm.average_precision_score(is_out, scores)),
        "aupr_1to5": float(skm.average_precision_score(is_out[:fifth], scores[:fifth])),
        "fpr95": fpr_at_tpr(is_out, scores, 0.95),
        "roc": {"fpr": fprs.tolist(), "tpr": tprs.tolist()},
    }


def translation_sequences(images: np.ndarray, max_shift: int = 2) -> np.ndarray:
    """Perturbation sequences for `consistency`: (2, 2·max_shift + 1, N, H, W), the images shifted
    −max_shift … +max_shift px in 1-px steps, along x (sequence 0) and along y (sequence 1),
    zero-filled. MNIST digits mostly lie in the central 20 × 20 pixels, so small shifts rarely cut them."""
    images = np.asarray(images)
    shifts = range(-max_shift, max_shift + 1)
    return np.stack([np.stack([_shift(images, s, axis) for s in shifts]) for axis in (2, 1)])


def _shift(images: np.ndarray, by: int, axis: int) -> np.ndarray:
    out = np.zeros_like(images)
    size = images.shape[axis]
    src = [slice(None)] * images.ndim
    dst = [slice(None)] * images.ndim
    src[axis] = slice(max(0, -by), size - max(0, by))
    dst[axis] = slice(max(0, by), size - max(0, -by))
    out[tuple(dst)] = images[tuple(src)]
    return out


def _frames(predictions: np.ndarray) -> np.ndarray:
    """Predicted classes as (sequences, T, N) from classes (..., T, N) or probabilities (..., T, N, K)."""
    preds = np.asarray(predictions)
    if np.issubdtype(preds.dtype, np.floating):
        preds = preds.argmax(axis=-1)
    return preds.reshape((-1,) + preds.shape[-2:])


def consistency(predictions: np.ndarray) -> float:
    """Fraction of (sequence, sample) pairs whose predicted class is the same in every frame.

    `predictions` holds predicted classes (..., T, N) or probabilities (..., T, N, K) for each frame
    of perturbation sequences such as `translation_sequences` gives; leading axes are sequences.
    """
    frames = _frames(predictions)
    return float(np.mean(np.all(frames == frames[:, :1], axis=1)))


def flip_rate(predictions: np.ndarray) -> float:
    """Mean probability that the predicted class changes between consecutive frames (the flip
    probability of Hendrycks & Dietterich's -P benchmarks); same input as `consistency`."""
    frames = _frames(predictions)
    return float(np.mean(frames[:, 1:] != frames[:, :-1]))


def wilson_interval(correct, total, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval (lower, upper) of a proportion correct / total; elementwise.
    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or total."""
    k, n = np.asarray(correct, dtype=np.float64), np.asarray(total, dtype=np.float64)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 (or all) correct the bound is exactly 0 (or 1); the formula leaves a rounding residue.
    return np.where(k == 0, 0.0, np.clip(centre - half, 0, 1)), np.where(k == n, 1.0, np.clip(centre + half, 0, 1))


def mcnemar(a_correct, b_correct) -> tuple[int, int, float]:
    """Exact McNemar test of two classifiers on the same samples (bool arrays, one per sample):
    (a_only, b_only, p) where a_only counts samples only A gets right, b_only those only B gets
    right, and p is the two-sided binomial test of a_only among the a_only + b_only discordant
    samples at 1/2. Samples both get right, or both wrong, say nothing about which is better, so
    only the discordant ones count; with none, p is 1."""
    from scipy.stats import binomtest

    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    if a.shape != b.shape:
        raise ValueError(f"need outcomes on the same samples, got shapes {a.shape} and {b.shape}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    if a_only + b_only == 0:
        return 0, 0, 1.0
    return a_only, b_only, float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
