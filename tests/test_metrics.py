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
    t = M.choose_threshold(y, s)
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
