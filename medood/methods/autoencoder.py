"""Convolutional autoencoder: the reconstruction baseline (2D and 3D).

The reference every method from the papers must beat, and seed 001's "no masking" ablation
(Georgescu, Table 2a: an autoencoder that sees the whole image). Trained with the mean squared
reconstruction error on normal images; the anomaly score is the reconstruction error of a test
image, by MSE, MAE or 1 - SSIM (``score``), and the map is the per-pixel / per-voxel error.
The network is MONAI's ``AutoEncoder`` (strided convolutions down, transposed convolutions up).

``map_reference`` (our addition, not a paper setting; ``paper`` keeps ``none``): the raw error map of
a small, blurry autoencoder is dominated by edges and anatomy that it never reconstructs, normal or
not. With ``error`` or ``residual``, ``fit_reference`` fits the per-pixel / per-voxel mean and
standard deviation of the reconstruction error (``error``: the ``score``'s error, e.g. the squared
error) or of the signed residual ``image - reconstruction`` (``residual``) over the normal training
cases; the map is then that error standardised, ``(e - mean) / max(std, floor)``, and the sample
score the mean of the map's top ``top_fraction`` (the robust maximum of the voxel z-score floor).
``floor`` is ``reference_std_floor`` times the mean standard deviation over the image: the error's
scale depends on the score (squared errors are small), so the floor is relative. ``error`` clips the
map at 0 (an error below the normal one is not anomalous); ``residual`` takes the absolute value (a
residual too dark or too bright both are).

Two more options of ours, off in ``paper``, together the ``denoising3d`` preset:

- ``noise_std`` > 0 makes it a denoising autoencoder in the manner of Kascenas et al., "Denoising
  autoencoders for unsupervised anomaly detection in brain MRI" (MIDL 2022): each training input gets
  coarse Gaussian noise, drawn on a grid ``noise_downsample`` times coarser than the image and
  upsampled (their setting: std 0.2 on a 16 x 16 grid for 128 x 128 slices, i.e. 8 times coarser),
  and the target stays the clean image. Learning to remove blob-sized corruptions teaches the network
  to put normal anatomy where something else is, instead of copying its input: on the demo's 48^3
  brains the plain autoencoder's voxel AP falls as it trains longer, the denoising one's does not.
  In eval mode (the platform's ``val_loss``) the noise comes from a generator seeded with
  ``config.seed`` and made for the call, so validation leaves torch's global RNG as it was.
- ``map_median`` > 1 median-filters the anomaly map with that window (MONAI's ``median_filter``)
  before the sample score is taken from it: the residual post-processing of the brain-MRI autoencoder
  comparison of Baur et al. (Medical Image Analysis 69, 2021), which removes the isolated voxels where
  a small network's reconstruction is merely noisy while a lesion-sized region survives.

``benchmarks/ae3d_maps_experiment.py`` and ``benchmarks/accuracy.py`` have the figures (the voxel
z-score floor is measured with the same median filter there too).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from monai.networks.nets import AutoEncoder as MonaiAutoEncoder
from torch import Tensor

from medood.methods.base import AnomalyMethod, BaseConfig, Batch, Scores, Stage, register
from medood.methods.components.reconstruction_scores import (
    RECONSTRUCTION_SCORES,
    reconstruction_error,
    reconstruction_scores,
)
from medood.methods.components.voxel_reference import (
    check_median_size,
    median_smooth,
    top_fraction_mean,
    voxel_moments,
)

MAP_REFERENCES = ("none", "error", "residual")


@dataclass
class Config(BaseConfig):
    spatial_dims: int = 2
    image_size: int = 128
    batch_size: int = 32
    epochs: int = 50
    channels: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-5
    score: str = "mse"
    # Reference-standardised map (module docstring); "none" = the raw error map (the paper's).
    map_reference: str = "none"
    reference_std_floor: float = 1.0  # times the mean per-voxel std of the reference
    top_fraction: float = 0.01  # sample score with a map reference: mean of the map's top 1%
    # Denoising autoencoder (module docstring): std of the coarse training noise (0 = plain autoencoder)
    # and how many times coarser than the image its grid is.
    noise_std: float = 0.0
    noise_downsample: int = 8
    map_median: int = 0  # median filter window side for the map (0 = off)

    def validate(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.score not in RECONSTRUCTION_SCORES:
            raise ValueError(f"score must be one of {', '.join(RECONSTRUCTION_SCORES)}, got {self.score!r}")
        if self.map_reference not in MAP_REFERENCES:
            raise ValueError(f"map_reference must be one of {', '.join(MAP_REFERENCES)}, got {self.map_reference!r}")
        if self.reference_std_floor <= 0:
            raise ValueError(f"reference_std_floor must be > 0, got {self.reference_std_floor}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0 (0 = no denoising), got {self.noise_std}")
        if not 1 <= self.noise_downsample <= self.image_size:
            raise ValueError(f"noise_downsample must be in [1, image_size={self.image_size}], got {self.noise_downsample}")
        check_median_size(self.map_median)
        if len(self.channels) != len(self.strides):
            raise ValueError(f"channels {self.channels} and strides {self.strides} must have the same length")
        factor = 1
        for s in self.strides:
            factor *= s
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by the total stride {factor}")


@register("autoencoder")
class Autoencoder(AnomalyMethod):
    Config = Config
    presets = {
        "paper": {},
        "tiny": {"image_size": 64, "batch_size": 16, "epochs": 8, "channels": (8, 16, 32), "strides": (2, 2, 2), "num_res_units": 0},
        "tiny3d": {
            "spatial_dims": 3, "image_size": 32, "batch_size": 4, "epochs": 4,
            "channels": (4, 8, 16), "strides": (2, 2, 2), "num_res_units": 0,
        },
        # The demo's 3D detector (module docstring): a 4-level network trained as a denoising
        # autoencoder, its residual standardised per voxel by the normal training cases and
        # median-filtered. About 20 s of training on 40 volumes of 48^3 on one CPU core.
        "denoising3d": {
            "spatial_dims": 3, "image_size": 48, "batch_size": 4, "epochs": 30,
            "channels": (8, 16, 32, 64), "strides": (2, 2, 2, 2), "num_res_units": 0,
            "noise_std": 0.2, "noise_downsample": 8, "map_reference": "residual", "map_median": 5,
        },
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.net = MonaiAutoEncoder(
            spatial_dims=config.spatial_dims,
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            channels=config.channels,
            strides=config.strides,
            num_res_units=config.num_res_units,
            norm="BATCH",
        )
        if config.map_reference != "none":
            # fit_reference's statistics; in the state dict so a checkpoint scores alone. Only with a
            # reference, so checkpoints of the raw-map autoencoder keep their keys.
            shape = (1, config.in_channels) + (config.image_size,) * config.spatial_dims
            self.register_buffer("reference_mean", torch.zeros(shape))
            self.register_buffer("reference_std", torch.ones(shape))
            self.register_buffer("reference_fitted", torch.tensor(False))

    def stages(self) -> list[Stage]:
        return [Stage("train", self.config.epochs)]

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        return {"main": torch.optim.Adam(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)}

    def reconstruct(self, image: Tensor) -> Tensor:
        return torch.sigmoid(self.net(image))

    def training_step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        image = batch["image"]
        noisy = image + self.coarse_noise(image) if self.config.noise_std > 0 else image
        return {"loss": torch.nn.functional.mse_loss(self.reconstruct(noisy), image)}

    def coarse_noise(self, image: Tensor) -> Tensor:
        """Gaussian noise of std ``noise_std`` on a grid ``noise_downsample`` times coarser than ``image``,
        upsampled (bi/trilinear) to its size. From torch's RNG in train mode, from a generator seeded with
        ``config.seed`` in eval mode (validation changes no RNG state)."""
        c = self.config
        grid = tuple(max(1, s // c.noise_downsample) for s in image.shape[2:])
        generator = None if self.training else torch.Generator(device=image.device).manual_seed(c.seed)
        noise = torch.randn(image.shape[:2] + grid, generator=generator, device=image.device, dtype=image.dtype)
        mode = "bilinear" if image.dim() == 4 else "trilinear"
        return c.noise_std * torch.nn.functional.interpolate(noise, size=image.shape[2:], mode=mode, align_corners=False)

    def _error(self, image: Tensor) -> Tensor:
        """The per-channel error that ``map_reference`` standardises (B, C, *spatial)."""
        reconstruction = self.reconstruct(image)
        if self.config.map_reference == "residual":
            return image - reconstruction
        return reconstruction_error(image, reconstruction, self.config.score)

    @torch.no_grad()
    def fit_reference(self, batches: Iterable[Batch]) -> None:
        """With a ``map_reference``: the per-voxel mean and std of the error over the normal training cases."""
        if self.config.map_reference == "none":
            return
        was_training = self.training
        self.eval()  # frozen BatchNorm statistics, whoever calls
        try:
            mean, std, n = voxel_moments(self._error(b["image"]) for b in batches)
        finally:
            self.train(was_training)
        if not n:
            raise ValueError("autoencoder: fit_reference got no normal training images")
        self.reference_mean.copy_(mean.to(self.reference_mean.dtype))
        self.reference_std.copy_(std.to(self.reference_std.dtype))
        self.reference_fitted.fill_(True)

    @torch.no_grad()
    def score(self, batch: Batch) -> Scores:
        image = batch["image"]
        if self.config.map_reference == "none":
            sample, error_map = reconstruction_scores(image, self.reconstruct(image), self.config.score)
            return Scores(sample=sample, map=median_smooth(error_map, self.config.map_median))
        if not bool(self.reference_fitted):
            raise RuntimeError("autoencoder: map_reference needs fit_reference on normal training images before score")
        floor = self.config.reference_std_floor * self.reference_std.mean()
        z = (self._error(image) - self.reference_mean) / self.reference_std.clamp_min(floor)
        z = z.abs() if self.config.map_reference == "residual" else z.clamp_min(0)
        amap = median_smooth(z.mean(dim=1, keepdim=True), self.config.map_median)
        return Scores(sample=top_fraction_mean(amap, self.config.top_fraction), map=amap)
