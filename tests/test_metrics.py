"""Every metric agrees with scikit-learn (or a direct count) on the same arrays."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from medood.platform import metrics as M
from medood.platform.checkpoint import Calibration


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + 1.2 * labels
    return labels, scores


def test_ranking_metrics_match_sklearn(data):
    y, s = data
    assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert M.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s))


def test_threshold_metrics_match_sklearn(data):
    y, s = data
    t, rule = M.choose_threshold(y, s, "f1")
    assert rule == "max F1"
    predicted = s >= t
    assert M.accuracy(y, s, t) == pytest.approx(skm.accuracy_score(y, predicted))
    assert M.f1(y, s, t) == pytest.approx(skm.f1_score(y, predicted))
    tn, fp, fn, tp = skm.confusion_matrix(y, predicted).ravel()
    assert M.sensitivity(y, s, t) == pytest.approx(tp / (tp + fn))
    assert M.specificity(y, s, t) == pytest.approx(tn / (tn + fp))
    # the chosen threshold maximises F1 over every candidate threshold
    best = max(skm.f1_score(y, s >= c) for c in np.unique(s))
    assert M.f1(y, s, t) == pytest.approx(best)


def test_bootstrap_interval_brackets_the_estimate(data):
    y, s = data
    low, high = M.bootstrap_interval(M.auroc, y, s, n_resamples=300)
    assert low < M.auroc(y, s) < high
    assert 0.0 < high - low < 0.3


def test_pixel_metrics():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 16, 16), np.uint8)
    masks[:, 4:8, 4:8] = 1
    maps = rng.random(masks.shape) * 0.5 + masks * 0.4
    assert M.pixel_average_precision(masks, maps) == pytest.approx(
        skm.average_precision_score(masks.reshape(-1), maps.reshape(-1))
    )
    dice, threshold = M.best_dice(masks, maps, n_thresholds=200)
    direct = 2 * np.logical_and(maps >= threshold, masks).sum() / ((maps >= threshold).sum() + masks.sum())
    assert dice == pytest.approx(direct)
    perfect, _ = M.best_dice(masks, masks.astype(float))
    assert perfect == pytest.approx(1.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="differ in length"):
        M.auroc([0, 1], [0.5])
    with pytest.raises(ValueError, match="not finite"):
        M.auroc([0, 1], [0.5, np.nan])


def test_calibration_is_monotone_into_unit_interval(data):
    _, s = data
    cal = Calibration.fit(s)
    mapped = cal.sample(np.sort(s))
    assert (mapped >= 0).all() and (mapped <= 1).all()
    assert (np.diff(mapped) >= 0).all()
    # monotone => ranking metrics are unchanged
    y, _ = data
    assert M.auroc(y, cal.sample(s)) == pytest.approx(M.auroc(y, s))


def test_youden_threshold_maximises_sensitivity_plus_specificity(data):
    y, s = data
    t, rule = M.choose_threshold(y, s)
    assert rule == "Youden's J"
    j = M.sensitivity(y, s, t) + M.specificity(y, s, t) - 1
    best = max(M.sensitivity(y, s, c) + M.specificity(y, s, c) - 1 for c in np.unique(s))
    assert j == pytest.approx(best)
    assert 0.0 < M.specificity(y, s, t) < 1.0


def test_specificity_rule_keeps_the_target_share_of_normals_below():
    rng = np.random.default_rng(3)
    normals = rng.normal(size=400)
    t, rule = M.choose_threshold(np.zeros(400), normals, "specificity")
    assert "95% specificity on 400 normal cases" == rule
    assert M.specificity(np.zeros(400), normals, t) >= 0.95
    assert (normals >= t).sum() <= 20
    # a single class in the labels (no anomalies on val) always uses this rule
    assert M.choose_threshold(np.zeros(400), normals, "youden") == (t, rule)


def test_f1_rule_never_calls_every_case_abnormal():
    # Barely separated classes with many anomalies: max F1 sits at "everything abnormal".
    rng = np.random.default_rng(4)
    y = np.r_[np.zeros(30), np.ones(170)].astype(int)
    s = rng.normal(size=200) + 0.05 * y
    precision, recall, thresholds = skm.precision_recall_curve(y, s)
    f1_all = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    assert thresholds[np.argmax(f1_all)] == s.min()  # the trap the fallback avoids
    t, rule = M.choose_threshold(y, s, "f1")
    assert rule.startswith("Youden")
    assert M.specificity(y, s, t) > 0.0
    with pytest.raises(ValueError, match="unknown threshold rule 'best'; known: youden, specificity, f1"):
        M.choose_threshold(y, s, "best")


def test_calibration_keeps_far_tail_order():
    # Anomalies scoring 50-1000 standard deviations above the normals stay distinct and ordered.
    cal = Calibration.fit(np.random.default_rng(0).normal(size=100))
    far = np.array([50.0, 100.0, 400.0, 1000.0])
    mapped = cal.sample(far)
    assert (np.diff(mapped) > 0).all() and (mapped < 1.0).all()
    assert cal.sample(np.array([cal.sample_mean]))[0] == pytest.approx(0.5)
