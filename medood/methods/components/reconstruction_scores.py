"""Anomaly scores from a reconstruction: MSE, MAE and SSIM (per sample and per pixel / voxel).

Used by the autoencoder baseline and by the MAE-only scores of seed 001 (Table 2a).
"""

from __future__ import annotations

import torch
from monai.metrics.regression import compute_ssim_and_cs
from torch import Tensor

RECONSTRUCTION_SCORES = ("mse", "mae", "ssim")


def reconstruction_scores(image: Tensor, reconstruction: Tensor, kind: str = "mse") -> tuple[Tensor, Tensor]:
    """(sample score (B,), map (B, 1, *spatial)); higher = more anomalous.

    ``ssim`` scores 1 - SSIM with MONAI's Gaussian-window SSIM (11 px window, sigma 1.5, data range 1);
    its map is 1 - the local SSIM, zero-padded back to the input size.
    """
    error_map = reconstruction_error(image, reconstruction, kind).mean(dim=1, keepdim=True)
    return error_map.flatten(1).mean(dim=1), error_map


def reconstruction_error(image: Tensor, reconstruction: Tensor, kind: str = "mse") -> Tensor:
    """The per-channel error (B, C, *spatial) that ``reconstruction_scores`` averages over channels."""
    if kind == "mse":
        error = (image - reconstruction) ** 2
    elif kind == "mae":
        error = (image - reconstruction).abs()
    elif kind == "ssim":
        error = _ssim_error_map(image, reconstruction)
    else:
        raise ValueError(f"unknown reconstruction score {kind!r}; known: {', '.join(RECONSTRUCTION_SCORES)}")
    return error


def _ssim_error_map(image: Tensor, reconstruction: Tensor) -> Tensor:
    spatial_dims = image.ndim - 2
    window = min(11, *image.shape[2:])
    window -= 1 - window % 2  # odd window that fits the image
    ssim_map, _ = compute_ssim_and_cs(
        reconstruction.float(),
        image.float(),
        spatial_dims=spatial_dims,
        kernel_size=[window] * spatial_dims,
        kernel_sigma=[1.5] * spatial_dims,
        data_range=1.0,
    )
    # compute_ssim_and_cs uses a 'valid' convolution: pad the map back to the input's size.
    pad: list[int] = []
    for size_in, size_out in zip(reversed(image.shape[2:]), reversed(ssim_map.shape[2:])):
        missing = size_in - size_out
        pad += [missing // 2, missing - missing // 2]
    error = 1.0 - ssim_map
    return torch.nn.functional.pad(error, pad, mode="replicate") if any(pad) else error
