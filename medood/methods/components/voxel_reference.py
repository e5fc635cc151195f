"""Per-pixel / per-voxel reference statistics of normal images, and the robust maximum of a map.

Shared by the voxel z-score floor (statistics of the intensities) and the autoencoder's
reference-standardised error map (statistics of its reconstruction residual or error), so both
standardise and pool their maps the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from monai.networks.layers import median_filter
from torch import Tensor


def voxel_moments(maps: Iterable[Tensor]) -> tuple[Tensor, Tensor, int]:
    """Per-position mean and (population) standard deviation over every sample of ``maps``.

    ``maps`` yields (B, C, *spatial) tensors; returns ``(mean, std)`` of shape (1, C, *spatial) in
    float64 (sums of squares in float32 lose the small variances) and the number of samples.
    """
    total, total_sq, n = None, None, 0
    for m in maps:
        x = m.double()
        s, sq = x.sum(0, keepdim=True), (x**2).sum(0, keepdim=True)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        n += x.shape[0]
    if not n:
        return torch.zeros(()), torch.zeros(()), 0
    mean = total / n
    return mean, (total_sq / n - mean**2).clamp_min(0).sqrt(), n


def top_fraction_mean(amap: Tensor, fraction: float) -> Tensor:
    """(B, ...) map -> (B,): the mean of each sample's top ``fraction`` of values (a robust maximum)."""
    flat = amap.flatten(1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


def median_smooth(amap: Tensor, size: int) -> Tensor:
    """(B, C, *spatial) map -> the same map median-filtered with a ``size``-sided window (MONAI's
    ``median_filter``, replicate padding); ``size`` 0 or 1 returns ``amap`` as it is."""
    if size <= 1:
        return amap
    return median_filter(amap, size, spatial_dims=amap.dim() - 2)


def check_median_size(size: int) -> None:
    """``map_median`` must be 0 (off) or an odd window side (the median needs a centre voxel)."""
    if size < 0 or (size > 1 and size % 2 == 0):
        raise ValueError(f"map_median must be 0 (off) or an odd window side >= 1, got {size}")
