"""Reference floors: training-free detectors that every learned method must beat.

Neither learns a representation; both only fit statistics of the normal training images in
``fit_reference``. A learned method that does not beat them on a data set has learned nothing about
that data set's anomalies that raw intensities do not already show (issue 9, "reference floors").

- ``pixel_mahalanobis`` (2D): the image, average-pooled to ``feature_size`` x ``feature_size``, as a
  raw feature vector; a Gaussian with the Ledoit-Wolf shrunk covariance (scikit-learn's
  ``LedoitWolf``; the sample covariance is singular with fewer images than pixels) fitted on the
  normal training images; the score is the Mahalanobis distance. The map: each pooled pixel's share
  of the squared distance, ``max(0, d_i * (P d)_i)`` with ``d = x - mu``, upsampled to the image.
- ``voxel_zscore`` (3D, and 2D): the per-voxel mean and standard deviation of the normal training
  volumes; the map is ``|x - mean| / max(std, std_floor)``; the score is the mean of the top
  ``top_fraction`` of the map (a robust maximum). ``map_median`` (off by default: the floor is the
  voxel-wise z-score) median-filters the map before the score, the post-processing the denoising
  autoencoder applies (``autoencoder.py``), so the benchmark can hold both to the same smoothing.

Both have ``trainable = False`` and no training stages: the platform fits, validates and
checkpoints them in one step (``medood.platform.train``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medood.methods.base import AnomalyMethod, BaseConfig, Batch, Scores, Stage, register
from medood.methods.components.voxel_reference import (
    check_median_size,
    median_smooth,
    top_fraction_mean,
    voxel_moments,
)


class _TrainingFree(AnomalyMethod):
    """No stages, no optimizers: everything is fitted in ``fit_reference``."""

    trainable = False

    def stages(self) -> list[Stage]:
        return []

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        raise RuntimeError(f"{self.name} is training-free (fit in fit_reference); it has no optimizers")

    def training_step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        raise RuntimeError(f"{self.name} is training-free (fit in fit_reference); it has no training step")

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError(f"{self.name}: fit_reference on normal training images must run before score")


@dataclass
class MahalanobisConfig(BaseConfig):
    spatial_dims: int = 2
    image_size: int = 64
    batch_size: int = 64
    feature_size: int = 16  # pooled side: 16 x 16 = 256 features per channel

    def validate(self) -> None:
        if self.spatial_dims != 2:
            raise ValueError("pixel_mahalanobis is a 2D floor (spatial_dims=2); use voxel_zscore for volumes")
        if not 0 < self.feature_size <= self.image_size:
            raise ValueError(f"feature_size must be in 1..image_size ({self.image_size}), got {self.feature_size}")


@register("pixel_mahalanobis")
class PixelMahalanobis(_TrainingFree):
    Config = MahalanobisConfig
    presets = {"paper": {}, "tiny": {"image_size": 64, "feature_size": 8}}

    def __init__(self, config: MahalanobisConfig) -> None:
        super().__init__(config)
        dim = config.in_channels * config.feature_size**2
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("precision", torch.eye(dim))
        self.register_buffer("fitted", torch.tensor(False))

    def features(self, image: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(image.float(), self.config.feature_size).flatten(1)

    @torch.no_grad()
    def fit_reference(self, batches: Iterable[Batch]) -> None:
        from sklearn.covariance import LedoitWolf

        feats = [self.features(b["image"]).cpu().double().numpy() for b in batches]
        if not feats:
            raise ValueError("pixel_mahalanobis: fit_reference got no normal training images")
        x = np.concatenate(feats)
        estimator = LedoitWolf().fit(x)
        self.mean.copy_(torch.as_tensor(estimator.location_, dtype=self.mean.dtype))
        self.precision.copy_(torch.as_tensor(estimator.precision_, dtype=self.precision.dtype))
        self.fitted.fill_(True)

    @torch.no_grad()
    def score(self, batch: Batch) -> Scores:
        self._check_fitted()
        image = batch["image"]
        d = self.features(image) - self.mean
        shares = d * (d @ self.precision)  # sums to the squared Mahalanobis distance
        sample = shares.sum(1).clamp_min(0).sqrt()
        c, k = self.config.in_channels, self.config.feature_size
        grid = shares.clamp_min(0).view(-1, c, k, k).sum(1, keepdim=True)
        amap = F.interpolate(grid, size=image.shape[2:], mode="bilinear", align_corners=False)
        return Scores(sample=sample, map=amap)


@dataclass
class ZScoreConfig(BaseConfig):
    spatial_dims: int = 3
    image_size: int = 64
    batch_size: int = 8
    std_floor: float = 0.05  # intensities are in [0, 1]; voxels that never vary would divide by ~0
    top_fraction: float = 0.01  # the score averages the top 1% of the z-map
    map_median: int = 0  # median filter window side for the map (0 = off: the voxel-wise floor)

    def validate(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        check_median_size(self.map_median)
        if self.std_floor <= 0:
            raise ValueError(f"std_floor must be > 0, got {self.std_floor}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")


@register("voxel_zscore")
class VoxelZScore(_TrainingFree):
    Config = ZScoreConfig
    presets = {"paper": {}, "tiny": {"image_size": 32}}

    def __init__(self, config: ZScoreConfig) -> None:
        super().__init__(config)
        shape = (1, config.in_channels) + (config.image_size,) * config.spatial_dims
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit_reference(self, batches: Iterable[Batch]) -> None:
        mean, std, n = voxel_moments(b["image"] for b in batches)
        if not n:
            raise ValueError("voxel_zscore: fit_reference got no normal training volumes")
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))
        self.fitted.fill_(True)

    @torch.no_grad()
    def score(self, batch: Batch) -> Scores:
        self._check_fitted()
        image = batch["image"].float()
        z = (image - self.mean).abs() / self.std.clamp_min(self.config.std_floor)
        amap = median_smooth(z.sum(1, keepdim=True), self.config.map_median)
        return Scores(sample=top_fraction_mean(amap, self.config.top_fraction), map=amap)
