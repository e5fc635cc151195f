"""Anomaly-detection metrics: one function per metric, computed with scikit-learn where it has one.

Sample level: AUROC, AP, and accuracy / F1 / sensitivity / specificity at a threshold chosen on the
validation split (``THRESHOLD_RULES``), with percentile-bootstrap 95% intervals. Pixel / voxel level: AP over all
pixels, and the best Dice over thresholds (the MOOD / BraTS convention for anomaly maps).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_recall_curve,
    recall_score,
    roc_auc_score,
    roc_curve,
)


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels ({labels.shape[0]}) and scores ({scores.shape[0]}) differ in length")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are not finite")
    return labels, scores


def has_both_classes(labels: np.ndarray) -> bool:
    labels = np.asarray(labels).reshape(-1)
    return bool((labels == 0).any() and (labels == 1).any())


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels, scores = _check(labels, scores)
    return float(roc_auc_score(labels, scores))


def label_free_sensitivity(train_held_out_scores: np.ndarray, test_normal_scores: np.ndarray) -> float:
    """Rafiee's sensitivity score (thesis Sec. 6.1.5; ICANN 2022 Sec. 3.4): model selection without anomaly labels.

    AUROC(D_train^sens -> 0, D_test^in -> 1), both scored against the remaining training cases
    D_train^ref only: how strongly a model rejects unseen normal cases compared with normal cases it
    was trained on. Not the clinical ``sensitivity`` (recall) below. Higher is better (I Sec. 5).
    """
    held = np.asarray(train_held_out_scores, dtype=np.float64).reshape(-1)
    test = np.asarray(test_normal_scores, dtype=np.float64).reshape(-1)
    if not len(held) or not len(test):
        raise ValueError(f"the sensitivity score needs both sides; got {len(held)} held-out and {len(test)} test cases")
    labels = np.concatenate([np.zeros(len(held), dtype=np.int64), np.ones(len(test), dtype=np.int64)])
    return auroc(labels, np.concatenate([held, test]))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    labels, scores = _check(labels, scores)
    return float(average_precision_score(labels, scores))


THRESHOLD_RULES = ("youden", "specificity", "f1")
#: Target specificity of the ``specificity`` rule (on normal validation cases).
TARGET_SPECIFICITY = 0.95


def choose_threshold(
    labels: np.ndarray, scores: np.ndarray, rule: str = "youden", *, target_specificity: float = TARGET_SPECIFICITY
) -> tuple[float, str]:
    """A decision threshold chosen on (validation) data, and a sentence saying how; score >= threshold = abnormal.

    - ``youden`` (default): the ROC point that maximises Youden's J = sensitivity + specificity - 1
      (Youden 1950; the usual operating point when both classes are labelled).
    - ``specificity``: the lowest threshold that keeps ``target_specificity`` of the normal cases below
      it (a false-alarm budget; the only rule that needs no abnormal cases, so it is used whenever
      ``labels`` hold a single class).
    - ``f1``: the F1-optimal threshold; when that calls every case abnormal (F1 is maximised by
      predicting the positive class whenever the classes barely separate) it falls back to Youden.
    """
    labels, scores = _check(labels, scores)
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; known: {', '.join(THRESHOLD_RULES)}")
    if not len(scores):
        raise ValueError("cannot choose a threshold on an empty set of scores")
    if rule == "specificity" or not has_both_classes(labels):
        normal = scores[labels != 1] if (labels != 1).any() else scores
        # The smallest score above the target share of normals, so that share scores below it.
        threshold = float(np.nextafter(np.quantile(normal, target_specificity, method="higher"), np.inf))
        return threshold, f"{target_specificity:.0%} specificity on {len(normal)} normal cases"
    if rule == "f1":
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        f1_values = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        threshold = float(thresholds[int(np.argmax(f1_values))])
        if threshold > scores.min():
            return threshold, "max F1"
        rule_note = "Youden's J (max F1 called every case abnormal)"
    else:
        rule_note = "Youden's J"
    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = int(np.argmax(tpr - fpr))
    # roc_curve's first threshold is +inf (nothing called abnormal); J there is 0, never the argmax
    # unless the scores do not separate at all, in which case the largest finite threshold is used.
    threshold = float(thresholds[best]) if np.isfinite(thresholds[best]) else float(thresholds[min(best + 1, len(thresholds) - 1)])
    return threshold, rule_note


def accuracy(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    labels, scores = _check(labels, scores)
    return float(accuracy_score(labels, scores >= threshold))


def f1(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    labels, scores = _check(labels, scores)
    return float(f1_score(labels, scores >= threshold, zero_division=0))


def sensitivity(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    labels, scores = _check(labels, scores)
    return float(recall_score(labels, scores >= threshold, pos_label=1, zero_division=0))


def specificity(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    labels, scores = _check(labels, scores)
    return float(recall_score(labels, scores >= threshold, pos_label=0, zero_division=0))


def bootstrap_interval(
    metric: Callable[[np.ndarray, np.ndarray], float],
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric``, resampling cases; resamples with one class are skipped."""
    labels, scores = _check(labels, scores)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        index = rng.integers(0, len(labels), len(labels))
        if not has_both_classes(labels[index]):
            continue
        values.append(metric(labels[index], scores[index]))
    if not values:
        return (float("nan"), float("nan"))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def pixel_average_precision(masks: np.ndarray, maps: np.ndarray) -> float:
    """AP over every pixel / voxel of every case (MOOD's pixel-level metric)."""
    return average_precision(np.asarray(masks).reshape(-1) > 0, np.asarray(maps).reshape(-1))


def best_dice(masks: np.ndarray, maps: np.ndarray, n_thresholds: int = 100) -> tuple[float, float]:
    """(best Dice over thresholds, the threshold) of the binarised maps against the masks, all cases pooled."""
    truth = np.asarray(masks).reshape(-1) > 0
    values = np.asarray(maps, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no pixels to score")
    # Dice at every candidate threshold from the sorted scores (one pass, exact at quantile thresholds).
    candidates = np.unique(np.quantile(values, np.linspace(0.0, 1.0, n_thresholds + 1)))
    order = np.argsort(values)
    sorted_values = values[order]
    sorted_truth = truth[order]
    # positives with score >= t: suffix sums
    true_suffix = np.concatenate([np.cumsum(sorted_truth[::-1])[::-1], [0]])
    positives_total = truth.sum()
    best, best_t = 0.0, float(candidates[-1])
    for t in candidates:
        start = int(np.searchsorted(sorted_values, t, side="left"))
        predicted = len(values) - start
        tp = int(true_suffix[start])
        denom = predicted + positives_total
        dice = 2 * tp / denom if denom else 0.0
        if dice > best:
            best, best_t = dice, float(t)
    return float(best), best_t
