"""The training-free reference floors: their statistics equal scikit-learn's / NumPy's, and they find
what raw intensities show (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from medood import methods


def normal_images(n: int, size: int, dims: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1) + (size,) * dims
    image = 0.3 + 0.05 * torch.randn(shape, generator=g)
    centre = tuple(slice(size // 4, 3 * size // 4) for _ in range(dims))
    image[(slice(None), slice(None), *centre)] += 0.4
    return image.clamp(0, 1)


def test_pixel_mahalanobis_equals_sklearn_ledoit_wolf():
    floor = methods.get("pixel_mahalanobis").build("tiny")
    train = normal_images(40, 64, 2)
    floor.fit_reference([{"image": train[:25]}, {"image": train[25:]}])
    feats = floor.features(train).double().numpy()
    reference = LedoitWolf().fit(feats)
    test = normal_images(5, 64, 2, seed=1)
    expected = np.sqrt(reference.mahalanobis(floor.features(test).double().numpy()))
    scores = floor.score({"image": test})
    np.testing.assert_allclose(scores.sample.numpy(), expected, rtol=1e-4)
    assert scores.map.shape == test.shape


def test_floors_score_an_inserted_anomaly_higher_and_locate_it():
    for name, dims in (("pixel_mahalanobis", 2), ("voxel_zscore", 3), ("voxel_zscore", 2)):
        cls = methods.get(name)
        floor = cls.build("tiny", spatial_dims=dims, image_size=32) if name == "voxel_zscore" else cls.build("tiny")
        size = floor.config.image_size
        floor.fit_reference([{"image": normal_images(30, size, dims)}])
        test = normal_images(4, size, dims, seed=2)
        blob = (slice(2, 3), slice(None)) + (slice(2, 2 + size // 8),) * dims
        test[blob] = 1.0
        scores = floor.score({"image": test})
        assert int(scores.sample.argmax()) == 2, name
        amap = scores.map[2, 0]
        inside = amap[(slice(2, 2 + size // 8),) * dims].mean()
        assert inside > 3 * amap.mean(), name


def test_voxel_zscore_statistics_equal_numpy():
    floor = methods.get("voxel_zscore").build("tiny")
    train = normal_images(12, 32, 3)
    floor.fit_reference([{"image": train[:5]}, {"image": train[5:]}])
    np.testing.assert_allclose(floor.mean[0].numpy(), train.numpy().mean(0), atol=1e-6)
    np.testing.assert_allclose(floor.std[0].numpy(), train.numpy().std(0), atol=1e-5)


def test_floors_refuse_to_score_before_fitting_and_have_no_training():
    for name in ("pixel_mahalanobis", "voxel_zscore"):
        floor = methods.get(name).build("tiny")
        assert floor.stages() == [] and not floor.trainable
        size = floor.config.image_size
        with pytest.raises(RuntimeError, match="fit_reference on normal training images must run before score"):
            floor.score({"image": normal_images(1, size, floor.config.spatial_dims)})
        with pytest.raises(RuntimeError, match="training-free"):
            floor.configure_optimizers("train")
    with pytest.raises(ValueError, match="2D floor"):
        methods.get("pixel_mahalanobis").build("tiny", spatial_dims=3)
