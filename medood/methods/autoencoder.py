"""Convolutional autoencoder: the reconstruction baseline (2D and 3D).

The reference every method from the papers must beat, and seed 001's "no masking" ablation
(Georgescu, Table 2a: an autoencoder that sees the whole image). Trained with the mean squared
reconstruction error on normal images; the anomaly score is the reconstruction error of a test
image, by MSE, MAE or 1 - SSIM (``score``), and the map is the per-pixel / per-voxel error.
The network is MONAI's ``AutoEncoder`` (strided convolutions down, transposed convolutions up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.nets import AutoEncoder as MonaiAutoEncoder
from torch import Tensor

from medood.methods.base import AnomalyMethod, BaseConfig, Batch, Scores, Stage, register
from medood.methods.components.reconstruction_scores import RECONSTRUCTION_SCORES, reconstruction_scores


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

    def validate(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.score not in RECONSTRUCTION_SCORES:
            raise ValueError(f"score must be one of {', '.join(RECONSTRUCTION_SCORES)}, got {self.score!r}")
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

    def stages(self) -> list[Stage]:
        return [Stage("train", self.config.epochs)]

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        return {"main": torch.optim.Adam(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)}

    def reconstruct(self, image: Tensor) -> Tensor:
        return torch.sigmoid(self.net(image))

    def training_step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        image = batch["image"]
        return {"loss": torch.nn.functional.mse_loss(self.reconstruct(image), image)}

    @torch.no_grad()
    def score(self, batch: Batch) -> Scores:
        image = batch["image"]
        sample, error_map = reconstruction_scores(image, self.reconstruct(image), self.config.score)
        return Scores(sample=sample, map=error_map)
