"""Contrastive representation + Mahalanobis score (Rafiee thesis ch. 5; Gholamipoor, Rafiee, Kollmann, ISBI 2022).

Training (one stage, ``contrastive``, normal images only): two random views of each image
(RandomResizedCrop(scale 0.08-1), rotation U(-20, 20) degrees, horizontal flip 0.5, brightness /
contrast jitter 0.4; P Tab. 2) go through a query encoder f_q (ResNet50) with a 2-layer projection
head to 128-d, and the NT-Xent loss (Eq. 5.1) with tau = 0.07 pulls the two views together and
pushes other images away. The negatives are kept MoCo-style (P Sec. 2.1): a key encoder f_k, the
momentum moving average of f_q, encodes the second view, and a FIFO queue of past keys are the
negatives (``negatives="queue"``); ``negatives="batch"`` is Eq. 5.1 literally (SimCLR: the other
2N - 2 views of the batch through f_q).

Score (Eq. 5.2, Sec. 5.1.3): h(x) = the L2-normalised output of f_q after average pooling, before
the head; mu and Sigma over all normal training features (``fit_reference``), s(x) = (h - mu)^T
Sigma^-1 (h - mu). The covariance estimator is not stated; ``empirical`` + pseudo-inverse follows
the SSD code the thesis cites ([15]), with Ledoit-Wolf when there are no more images than
dimensions (``medood.methods.components.feature_reference``).

Choices the thesis leaves open (spec 002-A): queue 4096 (thesis Sec. 4.5.1 quotes M = 4,096),
key momentum 0.999, lr = 0.03 * B / 256 (P Sec. 5.2: "linearly with the batch size"), SGD momentum
0.9, weight decay 1e-4, cosine schedule (MoCo v2 defaults); shuffle-BN emulated on one device by
running f_k on ``bn_splits`` chunks of a permuted batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import Tensor, nn

from medood.methods.base import AnomalyMethod, BaseConfig, Batch, Stage, read_state_dict, register
from medood.methods.components.feature_reference import COVARIANCES, FeatureReference, ReferenceScoring
from medood.methods.components.views import color_jitter, imagenet_normalise, random_resized_crop

ENCODERS = {
    # name: (block, layers, widths); "resnet50" matches torchvision's resnet50 without fc (P Sec. 3.2).
    "resnet50": (ResNetBottleneck, (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet18": (ResNetBlock, (2, 2, 2, 2), (64, 128, 256, 512)),
    "tiny": (ResNetBlock, (1, 1, 1, 1), (16, 32, 64, 128)),
}
FEATURE_LAYERS = ("avgpool", "layer3", "projection")
NEGATIVES = ("queue", "batch")


@dataclass
class Config(BaseConfig):
    image_size: int = 224  # P Sec. 3.2: 224 x 224 crops
    in_channels: int = 3  # ImageNet-initialised ResNet50; the platform repeats grey images
    batch_size: int = 128  # P Sec. 3.2, Tab. 3
    epochs: int = 100  # P Sec. 3.2
    encoder: str = "resnet50"
    proj_hidden: int = 2048  # "two fully connected layers" (P Sec. 3.2); hidden width not stated (MoCo v2)
    proj_dim: int = 128  # P Sec. 3.2
    negatives: str = "queue"  # P Sec. 2.1 (MoCo); "batch" = Eq. 5.1 literally
    tau: float = 0.07  # P Sec. 3.2
    key_momentum: float = 0.999  # not stated (MoCo)
    queue_size: int = 4096  # not stated (thesis Sec. 4.5.1: M = 4,096)
    shuffle_bn: bool = True
    bn_splits: int = 4
    base_lr: float = 0.03  # not stated; lr = base_lr * batch_size / 256 (P Sec. 5.2, Goyal et al.)
    scale_lr: bool = True
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    crop_min_scale: float = 0.08  # P Tab. 2 / Tab. 4
    rotation_degrees: float = 20.0  # P Tab. 2 / Tab. 4
    hflip_prob: float = 0.5  # P Tab. 2 (set 0 where flips are anomalies, e.g. DigitAnatomy)
    color_jitter: float = 0.4  # brightness = contrast (P Tab. 2 / Tab. 4)
    normalise: bool = True  # ImageNet mean / std (the initialisation is ImageNet)
    covariance: str = "empirical"
    covariance_eps: float = 1e-6
    feature_layer: str = "avgpool"  # P Sec. 4.1: best from the average-pooled last layer
    init_weights: str = ""  # local file of a torchvision-layout ResNet state dict (P Sec. 3.2); "" = random init
    sensitivity_fraction: float = 0.1

    def validate(self) -> None:
        if self.spatial_dims != 2:
            raise ValueError(f"contrastive_mahalanobis is 2D (spatial_dims=2), got {self.spatial_dims}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; known: {', '.join(ENCODERS)}")
        if self.negatives not in NEGATIVES:
            raise ValueError(f"unknown negatives {self.negatives!r}; known: {', '.join(NEGATIVES)}")
        if self.covariance not in COVARIANCES:
            raise ValueError(f"unknown covariance {self.covariance!r}; known: {', '.join(COVARIANCES)}")
        if self.feature_layer not in FEATURE_LAYERS:
            raise ValueError(f"unknown feature_layer {self.feature_layer!r}; known: {', '.join(FEATURE_LAYERS)}")
        if not 0 < self.crop_min_scale <= 1:
            raise ValueError(f"crop_min_scale must be in (0, 1], got {self.crop_min_scale}")
        if not 0 <= self.key_momentum <= 1:
            raise ValueError(f"key_momentum must be in [0, 1], got {self.key_momentum}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")


def build_encoder(config: Config) -> ResNet:
    block, layers, widths = ENCODERS[config.encoder]
    # conv1 stride 2 and no bias in the downsample path: torchvision's layout (MONAI's defaults differ).
    return ResNet(block, list(layers), list(widths), spatial_dims=2, n_input_channels=config.in_channels,
                  conv1_t_stride=2, feed_forward=False, bias_downsample=False)


def _out_channels(layer: nn.Module) -> int:
    return [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


@register("contrastive_mahalanobis")
class ContrastiveMahalanobis(ReferenceScoring, AnomalyMethod):
    Config = Config
    reference_dtype = torch.float64  # the Gaussian of Eq. 5.2 is fitted in double precision
    presets = {
        "paper": {},
        "tiny": {
            # CPU tests and the demo: a 4-block ResNet, in-batch negatives (spec 002-A Sec. 8: with 4
            # near-identical images a fresh random queue first gives a loss near 0 that then rises).
            "image_size": 64, "in_channels": 1, "batch_size": 32, "epochs": 30, "encoder": "tiny",
            "proj_hidden": 128, "proj_dim": 64, "negatives": "batch", "key_momentum": 0.99, "queue_size": 256,
            "base_lr": 0.06, "scale_lr": False, "covariance": "ledoit_wolf",
        },
        "digitanatomy": {
            # tiny at the DigitAnatomy size; flips are one of its anomaly types, so no flip invariance.
            "image_size": 96, "in_channels": 1, "batch_size": 32, "epochs": 30, "encoder": "tiny",
            "proj_hidden": 128, "proj_dim": 64, "negatives": "batch", "base_lr": 0.06, "scale_lr": False,
            "covariance": "ledoit_wolf", "hflip_prob": 0.0,
        },
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.encoder_q = build_encoder(config)
        width = _out_channels(self.encoder_q.layer4)
        self.head_q = nn.Sequential(nn.Linear(width, config.proj_hidden), nn.ReLU(inplace=True),
                                    nn.Linear(config.proj_hidden, config.proj_dim))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.head_k = copy.deepcopy(self.head_q).requires_grad_(False)
        if config.init_weights:  # P Sec. 3.2: start from ImageNet (self-)supervised weights, a file the user names
            self.load_init_weights(read_state_dict(config.init_weights, "init_weights"))
        queue = F.normalize(torch.randn(config.queue_size, config.proj_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        dim = {"avgpool": width, "layer3": _out_channels(self.encoder_q.layer3), "projection": config.proj_dim}
        self.reference = FeatureReference(dim[config.feature_layer], "mahalanobis", config.covariance,
                                          config.covariance_eps, sensitivity_fraction=config.sensitivity_fraction)

    # -- training -----------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        return [Stage("contrastive", self.config.epochs)]

    def learning_rate(self) -> float:
        c = self.config
        return c.base_lr * c.batch_size / 256 if c.scale_lr else c.base_lr

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        params = list(self.encoder_q.parameters()) + list(self.head_q.parameters())
        return {"main": torch.optim.SGD(params, lr=self.learning_rate(), momentum=c.sgd_momentum, weight_decay=c.weight_decay)}

    def configure_schedulers(self, stage, optimizers):
        epochs = max(self.config.epochs, 1)  # cosine to 0 over the run (MoCo v2 --cos), stepped per epoch
        return {"main": torch.optim.lr_scheduler.LambdaLR(optimizers["main"], lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs)))}

    def augment(self, image: Tensor) -> Tensor:
        """One random view T(x) per image (P Tab. 2), normalised."""
        c = self.config
        view = random_resized_crop(image, c.image_size, (c.crop_min_scale, 1.0), rotation_degrees=c.rotation_degrees,
                                   hflip_prob=c.hflip_prob)
        view = color_jitter(view, c.color_jitter, c.color_jitter)
        return self._normalise(view)

    def _normalise(self, image: Tensor) -> Tensor:
        return imagenet_normalise(image.float()) if self.config.normalise else image.float()

    def training_step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        image = batch["image"].float()
        x_q, x_k = self.augment(image), self.augment(image)
        q = F.normalize(self.head_q(self.encoder_q(x_q)).float(), dim=1)
        updates = self.training and torch.is_grad_enabled()  # validation (no_grad or eval) changes nothing
        if self.config.negatives == "batch":
            k = F.normalize(self.head_q(self.encoder_q(x_k)).float(), dim=1)
            loss = nt_xent(q, k, self.config.tau)
            return {"loss": loss}
        if updates:
            self._momentum_update()
        with torch.no_grad():
            k = F.normalize(self._keys(x_k).float(), dim=1)
        loss = queue_nt_xent(q, k, self.queue.clone().detach(), self.config.tau)
        if updates:
            self._enqueue(k)
        return {"loss": loss}

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.config.key_momentum  # theta_k <- m theta_k + (1 - m) theta_q (MoCo; at the step's start)
        for source, target in ((self.encoder_q, self.encoder_k), (self.head_q, self.head_k)):
            for p_q, p_k in zip(source.parameters(), target.parameters(), strict=True):
                p_k.mul_(m).add_(p_q.detach(), alpha=1 - m)

    @torch.no_grad()
    def _keys(self, x_k: Tensor) -> Tensor:
        """f_k on the key views; with ``shuffle_bn`` on a permuted batch in ``bn_splits`` chunks (shuffle-BN)."""
        if not (self.config.shuffle_bn and self.training) or x_k.shape[0] < 2:
            return self.head_k(self.encoder_k(x_k))
        order = torch.randperm(x_k.shape[0], device=x_k.device)
        chunks = torch.chunk(x_k[order], min(self.config.bn_splits, x_k.shape[0] // 2))
        keys = torch.cat([self.head_k(self.encoder_k(chunk)) for chunk in chunks])
        return keys[torch.argsort(order)]

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [torch.empty_like(keys) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, keys)
            keys = torch.cat(gathered)
        size = self.queue.shape[0]
        keys = keys[-size:]
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size  # FIFO with wrap-around
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    @torch.no_grad()
    def load_init_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Load a torchvision-layout ResNet state dict (e.g. MoCo v2's ``module.encoder_q.*``) into f_q and f_k.

        The thesis initialises from ImageNet self-supervised weights (P Sec. 3.2); which ones is not
        stated. A classifier ``fc.*`` is skipped; the constructor reads the file named by ``init_weights``.
        """
        prefixes = ("module.encoder_q.", "encoder_q.", "module.", "backbone.")
        cleaned = {}
        for key, value in state_dict.items():
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    break
            if not key.startswith("fc."):
                cleaned[key] = value
        self.encoder_q.load_state_dict(cleaned, strict=True)
        self.encoder_k.load_state_dict(cleaned, strict=True)

    def to_checkpoint(self) -> dict[str, Any]:
        payload = super().to_checkpoint()
        # The initial weights are in the state dict: loading a checkpoint needs no weight file.
        payload["config"]["init_weights"] = ""
        return payload

    # -- scoring ------------------------------------------------------------------------------

    def features(self, image: Tensor) -> Tensor:
        """h(x): the L2-normalised query-encoder feature at ``feature_layer`` of the whole image (no crop)."""
        x = self._normalise(image)
        if x.shape[-1] != self.config.image_size:
            x = F.interpolate(x, size=(self.config.image_size,) * 2, mode="bilinear", align_corners=False)
        e = self.encoder_q
        x = e.act(e.bn1(e.conv1(x)))
        if not e.no_max_pool:
            x = e.maxpool(x)
        x = e.layer3(e.layer2(e.layer1(x)))
        if self.config.feature_layer == "layer3":
            return F.normalize(x.mean(dim=(2, 3)).float(), dim=1)
        x = e.avgpool(e.layer4(x)).flatten(1)
        if self.config.feature_layer == "projection":
            x = self.head_q(x)
        return F.normalize(x.float(), dim=1)



def nt_xent(z1: Tensor, z2: Tensor, tau: float) -> Tensor:
    """Eq. 5.1 averaged over all 2N views: each view's positive is its pair, its negatives the other 2N - 2."""
    z = torch.cat([F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)])
    n = z1.shape[0]
    logits = (z @ z.T) / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -math.inf)  # 1[k != i]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def queue_nt_xent(q: Tensor, k: Tensor, queue: Tensor, tau: float) -> Tensor:
    """MoCo's form of Eq. 5.1: positive q.k+, negatives q.queue; fp32 (logits reach 1 / tau)."""
    q, k, queue = q.float(), k.float(), queue.float()
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.T
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
