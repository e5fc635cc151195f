"""Joint embedding of 2D and 3D networks (seed 000: Kang & Park), scored the MOOD way.

A 3D U-Net with a classification head on its bottleneck segments and classifies copy-paste
pseudo-anomalies. It is first trained on a self-supervised pretask (scattered reconstruction, the
paper's choice, Sec. 3.2 and Table 1). During anomaly-detection training a 2D ResNet sees the slices
of the same volume at twice the resolution and classifies them (weighted BCE with label smoothing,
Sec. 3.3.1); its stacked slice feature maps are max-reduced to the shape of the 3D bottleneck and a
similarity loss aligns the two latents (Sec. 3.1, Fig. 4-5). Only the 3D network scores: sample score
= its classification probability, voxel map = its segmentation output, resized to the input.

The paper cites, but does not give, the 3D network, its losses and the training pseudo-anomalies
(its ref. [3], BrainNet); those follow the authors' published training code, as recorded in
``shared/specs/000_joint_embedding.md`` (called "[code]" in the comments below). Each choice that is
neither in the paper nor in [code] is marked "our choice".

Stages: ``pretext`` (3D network only; ``pretext="none"`` drops it) and ``joint``. Two optimizers in
``joint``: ``main`` (3D network) minimises ``loss`` = L_seg + L_cls + L_fpfn + lambda1 L_sim and
``2d`` (2D network) minimises ``loss_2d`` = L_2dcls + lambda1 L_sim (the Sec. 3.3 equation).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from monai.networks.nets import ResNet, resnet50
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from monai.transforms import Rand3DElastic
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from medood.methods.base import AnomalyMethod, BaseConfig, Batch, Scores, Stage, read_state_dict, register
from medood.methods.components.hard_augmentations import (
    MIN_ANOMALY_VOXELS,
    CopyPaste,
    RotatedCopyPaste,
    changed_voxels,
)

PRETEXTS = ("scatter", "box", "rotation", "jigsaw", "none")
REDUCTIONS = ("max", "mean")
SIM_LOSSES = ("infonce", "cosine")
SIM_PAIRS = ("paper", "code")
BACKBONES_2D = ("resnet50", "tiny")
PRETRAINED_2D = ("imagenet_gray", "none")
TRAIN_ANOMALIES = ("copy_paste", "copy_paste_rot")
LS_MODES = ("fraction", "count")
SAMPLE_SCORES = ("cls", "seg_max", "seg_mean")
#: Table 1's jigsaw pretask shuffles the 8 octants ("8! cases"); we classify among a fixed set of
#: this many permutations (our choice: the paper does not say how the 8! cases are handled).
JIGSAW_PERMUTATIONS = 100
#: Seed 000 Sec. 4: "we perform the OOD synthesis process again when ... less than 20 voxels".
_MAX_SYNTHESIS_DRAWS = 10


@dataclass
class Config(BaseConfig):
    spatial_dims: int = 3
    image_size: int = 128  # the 2D network's slice resolution; the 3D network gets image_size / slice_scale
    batch_size: int = 8  # Sec. 4: 8 for brain
    slice_scale: int = 2  # Sec. 3.4: the 2D network sees "twice as much resolution"
    unet_features: tuple[int, ...] = (64, 128, 256, 512, 512, 64)  # [code] Unet_brain(num_channels=64)
    cls_to_decoder: bool = True  # [code]: the class probability is one more channel of the last conv
    backbone_2d: str = "resnet50"  # Sec. 3.3.1
    pretrained_2d: str = "imagenet_gray"  # Sec. 3.3.1: grayscale ImageNet-1k; loaded from pretrained_2d_path
    pretrained_2d_path: str = ""
    n_slices: int = 0  # 0: every slice (our reading of "multiple slices", Sec. 3.1)
    # 0: the 2D network sees all 2B x S slices in one pass. > 0: it runs over chunks of this many slices
    # (volumes ordered normal 0, twin 0, normal 1, twin 1, ...), each chunk gradient-checkpointed in
    # training (spec ambiguity 11), so only one chunk's activations are alive at a time; BatchNorm then
    # normalises over each chunk rather than over the whole batch.
    slice_chunk: int = 0
    # Stage 1: pretask (Sec. 3.2, 4.1)
    pretext: str = "scatter"
    scatter_ratio: float = 0.3  # Table 1: 30% is the best
    recon_loss: str = "mse"  # Sec. 3.2 says L2 ([code] uses BCE)
    pretext_epochs: int = 100
    pretext_lr: float = 1e-3  # Sec. 4.1: one cycle "from 1e-3 to 1e-2"
    pretext_max_lr: float = 1e-2
    # Stage 2: anomaly detection with joint embedding (Sec. 3.1, 3.3, 4)
    joint_epochs: int = 200
    lr: float = 1e-4  # Sec. 4: one cycle "from 1e-4 to 1e-3"
    max_lr: float = 1e-3
    joint_embedding: bool = True
    reduction: str = "max"  # Table 2: max > mean
    sim_loss: str = "infonce"
    sim_pairs: str = "paper"
    sim_temperature: float = 0.5  # [code]: NT-Xent, tau 0.5
    sim_weight: float = 0.0125  # lambda1, not in the paper: [code] decays 0.0125 -> 0.0025
    sim_weight_final: float = 0.0025
    wbce: bool = True  # Sec. 3.3.1, Table 3
    label_smoothing: bool = True  # Sec. 3.3.1, Fig. 8, Table 3
    ls_mode: str = "fraction"
    ls_thresholds: tuple[float, ...] = (0.03, 0.06)  # Sec. 3.3.1: 3% and 6% of the slice's pixels
    ls_value: float = 0.75
    axis_free: bool = True  # Sec. 3.1: slices along any axis
    elastic_prob: float = 0.5  # Sec. 4; [code]: alpha 20, sigma 5
    elastic_alpha: float = 20.0
    elastic_sigma: float = 5.0
    train_anomalies: tuple[str, ...] = TRAIN_ANOMALIES  # [3]: copy-paste only, plain and rotated ([code])
    anomaly_min_size: int = 20  # Sec. 4: 10 voxels at 64^3, i.e. 20 at the 2D resolution of 128
    anomaly_max_fraction: float = 0.5  # Sec. 4: "to half of the input size"
    jitter_prob: float = 0.5  # [code]
    jitter: float = 0.2
    fpfn_term: bool = True  # [code]: "avoid the trivial solution"
    fpfn_beta0: float = 100.0
    fpfn_floor: float = 0.05
    fpfn_decay: float = 0.3
    # Sample score: "cls" = the 3D network's class probability ([code] inference, the paper's); "seg_max" =
    # the maximum of its segmentation map, "seg_mean" = its mean, the expected abnormal share of the volume
    # (our extensions; see the presets' figures).
    sample_score: str = "cls"

    @property
    def volume_size(self) -> int:
        return self.image_size // self.slice_scale

    @property
    def latent_depth(self) -> int:
        """D3: side of the 3D bottleneck (four poolings of the 3D input)."""
        return self.volume_size // 16

    def validate(self) -> None:
        choices = {
            "pretext": (self.pretext, PRETEXTS), "reduction": (self.reduction, REDUCTIONS),
            "sim_loss": (self.sim_loss, SIM_LOSSES), "sim_pairs": (self.sim_pairs, SIM_PAIRS),
            "backbone_2d": (self.backbone_2d, BACKBONES_2D), "pretrained_2d": (self.pretrained_2d, PRETRAINED_2D),
            "recon_loss": (self.recon_loss, ("mse", "bce")), "ls_mode": (self.ls_mode, LS_MODES),
            "sample_score": (self.sample_score, SAMPLE_SCORES),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        if self.spatial_dims != 3:
            raise ValueError(f"joint_embedding is a 3D method: spatial_dims must be 3, got {self.spatial_dims}")
        if self.in_channels != 1:
            raise ValueError(f"joint_embedding takes single-channel volumes, got in_channels={self.in_channels}")
        if len(self.unet_features) != 6:
            raise ValueError(f"unet_features needs 6 values (BasicUNet), got {self.unet_features}")
        unknown = set(self.train_anomalies) - set(TRAIN_ANOMALIES)
        if unknown or not self.train_anomalies:
            raise ValueError(f"train_anomalies must be a non-empty subset of {TRAIN_ANOMALIES}, got {self.train_anomalies}")
        if self.slice_scale < 1 or self.image_size % (16 * self.slice_scale):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 16 x slice_scale ({16 * self.slice_scale}): "
                "the 3D network pools four times"
            )
        # Grid consistency (spec Sec. 1): the 2D feature map (stride 32) has the 3D bottleneck's side.
        if self.image_size % 32 or self.image_size // 32 != self.latent_depth:
            raise ValueError(
                f"image_size {self.image_size} and slice_scale {self.slice_scale} give a 2D feature map of "
                f"{self.image_size // 32} but a 3D bottleneck of {self.latent_depth}; use slice_scale 2"
            )
        slices = self.n_slices or self.image_size
        if slices % self.latent_depth:
            raise ValueError(f"n_slices {slices} must be a multiple of the bottleneck depth {self.latent_depth}")
        if self.slice_chunk < 0:
            raise ValueError(
                f"slice_chunk must be >= 0 (0 = all slices in one pass of the 2D network), got {self.slice_chunk}"
            )
        if not 0.0 < self.scatter_ratio < 1.0:
            raise ValueError(f"scatter_ratio must be in (0, 1), got {self.scatter_ratio}")
        if len(self.ls_thresholds) != 2 or not 0 < self.ls_thresholds[0] <= self.ls_thresholds[1]:
            raise ValueError(f"ls_thresholds must be two increasing positive values, got {self.ls_thresholds}")


# -- networks ---------------------------------------------------------------------------------------


class UNet3D(nn.Module):
    """[code] ``Unet_brain``: MONAI BasicUNet blocks, the bottleneck exposed, a classification head.

    ``forward`` returns the segmentation logits (B, 1, n, n, n), the classification logit (B,) and the
    bottleneck z3 (B, C3, D3, D3, D3).
    """

    def __init__(self, features: tuple[int, ...], cls_to_decoder: bool, depth: int) -> None:
        super().__init__()
        f = features
        act, norm = "relu", ("instance", {"affine": False})  # [code]: ReLU, InstanceNorm3d(affine=False)
        self.conv_0 = TwoConv(3, 1, f[0], act, norm, True)
        self.down_1 = Down(3, f[0], f[1], act, norm, True)
        self.down_2 = Down(3, f[1], f[2], act, norm, True)
        self.down_3 = Down(3, f[2], f[3], act, norm, True)
        self.down_4 = Down(3, f[3], f[4], act, norm, True)
        self.upcat_4 = UpCat(3, f[4], f[3], f[3], act, norm, True, upsample="deconv")
        self.upcat_3 = UpCat(3, f[3], f[2], f[2], act, norm, True, upsample="deconv")
        self.upcat_2 = UpCat(3, f[2], f[1], f[1], act, norm, True, upsample="deconv")
        self.upcat_1 = UpCat(3, f[1], f[0], f[5], act, norm, True, upsample="deconv", halves=False)
        self.cls_to_decoder = cls_to_decoder
        # [code]: Conv3d(65 -> 1, k3) after the class probability is appended as a channel.
        self.final_conv = nn.Conv3d(f[5] + int(cls_to_decoder), 1, kernel_size=3 if cls_to_decoder else 1,
                                    padding=1 if cls_to_decoder else 0)
        # [code] head: DC(512->256)@4^3, pool, DC(256->128)@2^3, pool, Linear(128, 1). One conv block per
        # halving of the bottleneck (our generalisation, so that the tiny 2^3 bottleneck never meets
        # instance norm over a single voxel).
        levels = max(1, int(math.log2(depth)))
        blocks: list[nn.Module] = []
        channels = f[4]
        for i in range(levels):
            blocks.append(TwoConv(3, channels, channels // 2, act, norm, True))
            blocks.append(nn.MaxPool3d(2) if i < levels - 1 else nn.AdaptiveMaxPool3d(1))
            channels //= 2
        self.cls_head = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels, 1))

    def encode(self, x: Tensor) -> list[Tensor]:
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        x3 = self.down_3(x2)
        return [x0, x1, x2, x3, self.down_4(x3)]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x0, x1, x2, x3, z3 = self.encode(x)
        cls_logit = self.cls_head(z3).squeeze(1)
        u = self.upcat_1(self.upcat_2(self.upcat_3(self.upcat_4(z3, x3), x2), x1), x0)
        if self.cls_to_decoder:
            prob = torch.sigmoid(cls_logit).view(-1, 1, 1, 1, 1).expand(-1, 1, *u.shape[2:])
            u = torch.cat([u, prob], dim=1)
        return self.final_conv(u), cls_logit, z3


class SliceNet(nn.Module):
    """The 2D network: a MONAI ResNet with a stride-2 first convolution (spec Sec. 1: MONAI's default
    stride 1 would break the 32x stride), returning the layer-4 map and one logit per slice."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        if backbone == "resnet50":
            self.net = resnet50(spatial_dims=2, n_input_channels=1, num_classes=1, conv1_t_stride=2,
                                bias_downsample=False)
        else:  # spec Sec. 7 tiny: 0.31 M parameters
            self.net = ResNet("basic", [1, 1, 1, 1], [16, 32, 64, 128], spatial_dims=2, n_input_channels=1,
                              conv1_t_stride=2, num_classes=1)

    @property
    def channels(self) -> int:
        return self.net.fc.in_features

    def forward(self, slices: Tensor) -> tuple[Tensor, Tensor]:
        n = self.net
        x = n.act(n.bn1(n.conv1(slices)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        features = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        logits = n.fc(n.avgpool(features).flatten(1)).squeeze(1)
        return features, logits


def load_pretrained_2d(net: SliceNet, path: str) -> list[str]:
    """Load torchvision-style ResNet weights (e.g. grayscale-ImageNet ResNet-50) from a local file.

    torchvision and MONAI name the layers alike (``conv1``, ``bn1``, ``layerN.M.*``, ``downsample.0/1``);
    an RGB first convolution is summed over its input channels, and the classifier (``fc``), whose
    shape differs, is left as initialised. Returns the names of the weights that were not loaded.
    """
    state = read_state_dict(path, "pretrained_2d_path")
    own = net.net.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key == "conv1.weight" and value.ndim == 4 and value.shape[1] == 3:
            value = value.sum(dim=1, keepdim=True)
        if key in own and own[key].shape == value.shape:
            loaded[key] = value
        else:
            skipped.append(key)
    if not loaded:
        raise ValueError(f"{path}: no weight matches the 2D network (expected torchvision-style ResNet keys)")
    net.net.load_state_dict(loaded, strict=False)
    return sorted(set(own) - set(loaded))


# -- pure functions (unit-tested) -------------------------------------------------------------------


def reduce_slices(features: Tensor, channels: int, depth: int, reduction: str = "max") -> Tensor:
    """Sec. 3.1, Fig. 5: stacked slice maps (B, S, C2, h, w) -> (B, C3, D3, h, w).

    Blocks of C2/C3 consecutive channels and S/D3 consecutive slices are reduced by their maximum
    (``mean`` for the Table 2 ablation); the slice axis becomes the first spatial axis.
    """
    b, s, c2, h, w = features.shape
    if c2 % channels or s % depth:
        raise ValueError(
            f"cannot reduce {s} slices x {c2} channels to depth {depth} x {channels} channels: not multiples"
        )
    blocks = features.reshape(b, depth, s // depth, channels, c2 // channels, h, w)
    if reduction == "max":
        return blocks.amax(dim=(2, 4)).permute(0, 2, 1, 3, 4).contiguous()
    if reduction == "mean":
        return blocks.mean(dim=(2, 4)).permute(0, 2, 1, 3, 4).contiguous()
    raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def slice_labels(abnormal_pixels: Tensor, pixels: int, *, smoothing: bool = True, mode: str = "fraction",
                 thresholds: tuple[float, ...] = (0.03, 0.06), value: float = 0.75) -> Tensor:
    """Sec. 3.3.1, Fig. 8: soft slice labels from the count of abnormal pixels per slice.

    With smoothing: 0 up to the first threshold, ``value`` up to the second, 1 above (thresholds are
    fractions of the slice's pixels, or absolute counts with ``mode="count"``, the fork's variant with
    6 and 12 pixels). Without: 1 for any abnormal pixel.
    """
    counts = abnormal_pixels.float()
    if not smoothing:
        return (counts > 0).float()
    measure = counts / pixels if mode == "fraction" else counts
    low, high = (thresholds if mode == "fraction" else (6.0, 12.0))
    labels = torch.where(measure > high, torch.ones_like(measure), torch.zeros_like(measure))
    return torch.where((measure > low) & (measure <= high), torch.full_like(measure, value), labels)


def weighted_slice_bce(logits: Tensor, targets: Tensor, weighted: bool = True) -> Tensor:
    """Sec. 3.3.1 weighted BCE: positives weighted by W = #normal / #abnormal slices ([code]: per batch,
    "abnormal" meaning a target above 0); W = 1 without positives or with ``weighted=False``."""
    positives = int((targets > 0).sum())
    weight = (targets.numel() - positives) / positives if weighted and positives else 1.0
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(weight, dtype=logits.dtype, device=logits.device))


def similarity_loss(u: Tensor, v: Tensor, *, kind: str = "infonce", pairs: str = "paper",
                    temperature: float = 0.5) -> Tensor:
    """Sec. 3.1, Fig. 4: align the 2D latents ``u`` with the 3D latents ``v``.

    Rows are ``[normals; abnormal twins]`` (2B rows each). ``infonce``: NT-Xent (MONAI
    ``ContrastiveLoss``) with each row's positive its cross-network twin and every other row a negative,
    the paper's pairing; ``pairs="code"`` appends the cross pairs (u_n, v_a), (u_a, v_n) as positives, as
    the authors' code does (against the paper; a fidelity switch). ``cosine``: mean(1 - cos) over the
    positive pairs plus mean(max(0, cos)) over the negative pairs (normal vs its twin).
    """
    u, v = u.flatten(1), v.flatten(1)
    if kind == "cosine":
        half = u.shape[0] // 2
        positive = F.cosine_similarity(u, v, dim=1)
        negative = torch.cat([F.cosine_similarity(u[:half], v[half:], dim=1),
                              F.cosine_similarity(u[half:], v[:half], dim=1)])
        return (1.0 - positive).mean() + negative.clamp(min=0.0).mean()
    if pairs == "code":
        half = u.shape[0] // 2
        u = torch.cat([u, u])
        v = torch.cat([v, v[half:], v[:half]])
    return ContrastiveLoss(temperature=temperature)(u, v)


def fpfn_weight(progress: float, beta0: float = 100.0, floor: float = 0.05, decay: float = 0.3) -> float:
    """[code]: beta(t) = max(floor, beta0 (1 - t / (decay T))), with ``progress`` = t / T."""
    return max(floor, beta0 * (1.0 - progress / decay))


def sim_weight(progress: float, start: float, end: float) -> float:
    """lambda1, linear from ``start`` to ``end`` over the stage ([code]), clamped at 0."""
    return max(0.0, start + (end - start) * min(max(progress, 0.0), 1.0))


def scattered_mask(shape: tuple[int, ...], ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Sec. 3.2: i.i.d. Bernoulli(``ratio``) voxels to zero (1 = zeroed)."""
    return (torch.rand(shape, generator=generator) < ratio).float()


def _cube_rotations() -> list[tuple[tuple[int, tuple[int, int]], ...]]:
    """The 24 rotations of a cube, each as a sequence of ``np.rot90`` steps (k, axes)."""
    probe = np.arange(27).reshape(3, 3, 3)
    found = {probe.tobytes(): ()}
    frontier: list[tuple[tuple[int, tuple[int, int]], ...]] = [()]
    while frontier:
        nxt = []
        for ops in frontier:
            for axes in ((0, 1), (0, 2), (1, 2)):
                seq = (*ops, (1, axes))
                key = apply_rotation(probe, seq).tobytes()
                if key not in found:
                    found[key] = seq
                    nxt.append(seq)
        frontier = nxt
    return list(found.values())


def apply_rotation(volume: np.ndarray, ops: tuple[tuple[int, tuple[int, int]], ...]) -> np.ndarray:
    """Apply a rotation from ``CUBE_ROTATIONS`` to the last three axes of ``volume``."""
    offset = volume.ndim - 3
    for k, (a, b) in ops:
        volume = np.rot90(volume, k=k, axes=(a + offset, b + offset))
    return np.ascontiguousarray(volume)


def invert_rotation(ops: tuple[tuple[int, tuple[int, int]], ...]) -> tuple[tuple[int, tuple[int, int]], ...]:
    return tuple((-k, axes) for k, axes in reversed(ops))


#: Sec. 3.1 "axis-free" slicing: the 24 rotations of the cube (each axis is the slice axis for 8).
CUBE_ROTATIONS = _cube_rotations()


def _jigsaw_permutations(count: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    perms = {tuple(range(8))}
    while len(perms) < count + 1:
        perms.add(tuple(int(i) for i in rng.permutation(8)))
    perms.discard(tuple(range(8)))
    return np.array(sorted(perms))[:count]


# -- the method ---------------------------------------------------------------------------------------


@register("joint_embedding")
class JointEmbedding(AnomalyMethod):
    Config = Config
    presets = {
        # slice_chunk 256 (spec ambiguity 11: batch 8 is 2 x 8 x 128 = 2048 ResNet-50 passes per step,
        # which does not fit a GPU in one pass; benchmarks/joint_embedding_memory.py). [code] defaults to
        # batch 1, i.e. one pass over a normal volume's 128 slices and its twin's, so its BatchNorm
        # normalises over those 256 slices; chunks of 256 in our normal/twin-interleaved order are exactly
        # those passes, one per pair, and keep [code]'s BatchNorm statistics at the paper's batch 8.
        # CPU estimate at batch 8 with bf16 (benchmarks/joint_embedding_memory.py): 16.7 GiB with chunks of
        # 256 (one chunk's recompute 6.7 GiB fp32), 44.4 GiB in one pass.
        "paper": {"slice_chunk": 256},
        # Spec Sec. 7: about 5 min on 2 CPUs on synthetic-brain at 64^3 (3D network at 32^3, 16 slices of
        # 64^2, 0.87 M + 0.31 M parameters). No pretrained 2D weights offline.
        "tiny": {
            "image_size": 64, "batch_size": 2, "n_slices": 16, "unet_features": (8, 16, 32, 64, 64, 8),
            "backbone_2d": "tiny", "pretrained_2d": "none", "pretext_epochs": 4, "joint_epochs": 16,
            "lr": 3e-4, "max_lr": 3e-3, "anomaly_min_size": 10,
            # joint_epochs 16, not the spec's 6: measured on synthetic-brain (benchmarks/joint_embedding_experiment.py),
            # 6 joint epochs leave the segmentation at voxel AP 0.03 (seed 0); 16 reach 0.23 (mean of seeds 0-2).
            # The sample score stays the paper's class probability: at this 2^3 bottleneck it learns slowly
            # (test AUROC 0.49 / 0.72 / 0.68 on seeds 0-2), but the map's maximum (sample_score="seg_max") was
            # no better (0.70 / 0.30 / 0.75), so there is no case for leaving the paper here.
            # Where the CPU time goes (1 thread, idle machine, 48^3 data): a joint step 0.9 s, of which the 3D
            # U-Net's forward/backward ~85% (its full-resolution convolutions: 24->8 and the 9->1 final conv
            # are slow in oneDNN), the 2D network ~10%, the pseudo-anomaly synthesis ~2%; a pretext step 0.36 s.
            # So 80 pretext + 320 joint steps, ~6 min; the 2D network and the pretask are not the cost.
            # Seed 0 at 48^3 (curves in benchmarks/joint_embedding_experiment.py's notes): the classification
            # BCE stays at 2 ln 2 (the head never separates in 320 steps); [code]'s FP/FN term (beta 100 for
            # the first 30% of the stage) holds the map near 0 for ~5 epochs (voxel AP 0.04 at epoch 4 vs
            # 0.13-0.23 without it).
        },
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        self.net3d = UNet3D(tuple(c.unet_features), c.cls_to_decoder, c.latent_depth)
        self.net2d: SliceNet | None = None
        if c.joint_embedding:
            self.net2d = SliceNet(c.backbone_2d)
            if c.pretrained_2d != "none":
                if c.pretrained_2d_path:
                    load_pretrained_2d(self.net2d, c.pretrained_2d_path)
                else:
                    warnings.warn(
                        f"joint_embedding: pretrained_2d={c.pretrained_2d!r} but no pretrained_2d_path was given; "
                        "the 2D network starts from scratch (the paper pretrains it on grayscale ImageNet, "
                        "Sec. 3.3.1). Pass --set pretrained_2d_path=FILE, or pretrained_2d=none to silence this.",
                        stacklevel=2,
                    )
            if self.net2d.channels % c.unet_features[4]:
                raise ValueError(
                    f"2D feature channels {self.net2d.channels} must be a multiple of the 3D bottleneck's "
                    f"{c.unet_features[4]}"
                )
        self.pretext_head: nn.Module | None = None
        if c.pretext == "rotation":
            self.pretext_head = nn.Linear(c.unet_features[4], len(CUBE_ROTATIONS))
        elif c.pretext == "jigsaw":
            self.pretext_head = nn.Linear(c.unet_features[4], JIGSAW_PERMUTATIONS)
            self.register_buffer("jigsaw", torch.from_numpy(_jigsaw_permutations(JIGSAW_PERMUTATIONS)), persistent=False)
        self._stage_scheduler: dict[str, Any] = {}
        self._stage_epochs: dict[str, int] = {s.name: s.epochs for s in self.stages()}

    # -- stages and optimisers -------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        c = self.config
        stages = [Stage("pretext", c.pretext_epochs)] if c.pretext != "none" and c.pretext_epochs > 0 else []
        return [*stages, Stage("joint", c.joint_epochs)]

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        if stage == "pretext":
            params = list(self.net3d.parameters()) + (list(self.pretext_head.parameters()) if self.pretext_head else [])
            return {"main": torch.optim.Adam(params, lr=c.pretext_lr)}
        optimizers = {"main": torch.optim.Adam(self.net3d.parameters(), lr=c.lr)}
        if self.net2d is not None:  # [code]: the 2D network has its own Adam with the same schedule
            optimizers["2d"] = torch.optim.Adam(self.net2d.parameters(), lr=c.lr)
        return optimizers

    def configure_schedulers(self, stage: str, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
        """Sec. 4.1 / 4: one cycle from lr to 10 lr, stepped per epoch (the platform's contract; [code]
        steps it per iteration). Its epoch counter also drives beta(t) and lambda1 (per epoch, our choice)."""
        c = self.config
        low, high = (c.pretext_lr, c.pretext_max_lr) if stage == "pretext" else (c.lr, c.max_lr)
        total = max(2, self._stage_epochs[stage])
        schedulers = {
            name: torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=high, total_steps=total, pct_start=0.3, anneal_strategy="linear",
                div_factor=high / low, cycle_momentum=False,
            )
            for name, opt in optimizers.items()
        }
        self._stage_scheduler[stage] = schedulers["main"]
        return schedulers

    def _progress(self, stage: str) -> float:
        """Fraction of the stage done (epochs), from the stage's scheduler; 0 outside the platform."""
        scheduler = self._stage_scheduler.get(stage)
        return 0.0 if scheduler is None else scheduler.last_epoch / max(1, self._stage_epochs[stage])

    # -- data ----------------------------------------------------------------------------------------

    def _rng(self) -> np.random.Generator:
        # Training draws from torch's global RNG (so torch.manual_seed fixes a step); eval mode (the
        # platform's val_loss) from a generator made for the call, so validation changes no RNG state.
        if self.training:
            return np.random.default_rng(int(torch.randint(2**31 - 1, ()).item()))
        return np.random.default_rng(self.config.seed)

    def to_volume(self, image: Tensor) -> Tensor:
        """The 3D network's input: the volume resized to image_size / slice_scale.

        A direct resize (measured: routing test volumes through image_size first, as training volumes
        go, to remove a sharpness gap, did not help: 48^3 seed 0 voxel AP 0.13 vs 0.21 direct).
        """
        size = self.config.volume_size
        if tuple(image.shape[2:]) == (size,) * 3:
            return image
        return F.interpolate(image, size=(size,) * 3, mode="trilinear", align_corners=False)

    def make_pairs(self, image: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Normal volumes, their copy-paste twins and the twins' masks, all at the 2D resolution.

        Per volume ([code], spec Sec. 2): elastic deformation with ``elastic_prob`` (before synthesis, so
        both twins share it), a copy-paste twin (plain and rotated alternate by index) centred on a
        non-zero voxel (our choice, so that air-to-air pastes are rare), a uniform jitter of the pasted
        area with ``jitter_prob``, redrawn when fewer than 20 voxels change (Sec. 4), then one of the 24
        cube rotations applied to all three (axis-free slicing, Sec. 3.1).
        """
        c = self.config
        size = c.image_size
        volumes = image[:, 0].detach().cpu().numpy()
        if volumes.shape[1:] != (size,) * 3:
            volumes = F.interpolate(image.detach().cpu(), size=(size,) * 3, mode="trilinear")[:, 0].numpy()
        elastic = Rand3DElastic(sigma_range=(c.elastic_sigma,) * 2, magnitude_range=(c.elastic_alpha,) * 2,
                                prob=1.0, padding_mode="zeros")
        kinds = {"copy_paste": CopyPaste, "copy_paste_rot": RotatedCopyPaste}
        normals, twins, masks = [], [], []
        for i, volume in enumerate(volumes):
            volume = np.clip(volume, 0.0, 1.0).astype(np.float32)
            if rng.random() < c.elastic_prob:
                elastic.set_random_state(int(rng.integers(2**31 - 1)))
                volume = np.asarray(elastic(volume[None]))[0].astype(np.float32)
            kind = kinds[c.train_anomalies[i % len(c.train_anomalies)]](c.anomaly_min_size, c.anomaly_max_fraction)
            inside = np.argwhere(volume > 0)
            for _ in range(_MAX_SYNTHESIS_DRAWS):
                centre = inside[int(rng.integers(len(inside)))] if len(inside) else None
                corruption = kind.apply(volume, rng, centre)
                twin = corruption.image
                if rng.random() < c.jitter_prob:
                    twin = twin.copy()
                    twin[corruption.region] = np.clip(twin[corruption.region] + rng.uniform(-c.jitter, c.jitter), 0, 1)
                mask = changed_voxels(volume, twin, corruption.region)
                if mask.sum() >= MIN_ANOMALY_VOXELS:
                    break
            if c.axis_free:
                ops = CUBE_ROTATIONS[int(rng.integers(len(CUBE_ROTATIONS)))]
                volume, twin, mask = (apply_rotation(a, ops) for a in (volume, twin, mask))
            normals.append(volume)
            twins.append(twin.astype(np.float32))
            masks.append(mask.astype(np.float32))
        to = {"device": image.device, "dtype": image.dtype}
        return (torch.from_numpy(np.stack(normals))[:, None].to(**to), torch.from_numpy(np.stack(twins))[:, None].to(**to),
                torch.from_numpy(np.stack(masks))[:, None].to(**to))

    def slice_indices(self) -> Tensor:
        c = self.config
        if not c.n_slices:
            return torch.arange(c.image_size)
        return torch.linspace(0, c.image_size - 1, c.n_slices).round().long()

    def _run_2d(self, slices: Tensor) -> tuple[Tensor, Tensor]:
        """The 2D network over ``(2B, S, n, n)`` slices -> features ``(2B, S, C2, h, w)``, logits ``(2B, S)``.

        With ``slice_chunk`` > 0 and more slices than one chunk, the volumes are interleaved (normal i,
        then its twin) and the network runs over consecutive chunks of ``slice_chunk`` slices; with grad
        enabled each chunk is checkpointed (non-reentrant): of the chunk only its input stays saved (and
        what the rest of the step saves of its outputs), and its activations are recomputed in backward
        under :func:`_frozen_batchnorm_stats`, so the BatchNorm running statistics are updated once per
        chunk, in the forward pass.
        """
        c = self.config
        assert self.net2d is not None
        two_b, s = slices.shape[:2]
        flat = slices.reshape(-1, 1, *slices.shape[2:])
        if not c.slice_chunk or flat.shape[0] <= c.slice_chunk:
            features, logits = self.net2d(flat)
            return features.view(two_b, s, *features.shape[1:]), logits.view(two_b, s)
        b = two_b // 2
        order = torch.arange(two_b, device=slices.device).view(2, b).t().reshape(-1)  # n0, t0, n1, t1, ...
        chunks = slices[order].reshape(-1, 1, *slices.shape[2:]).split(c.slice_chunk)
        net = self.net2d
        if torch.is_grad_enabled():
            def contexts() -> tuple[Any, Any]:  # (forward, recompute)
                return nullcontext(), _frozen_batchnorm_stats(net)

            outs = [checkpoint(net, chunk, use_reentrant=False, context_fn=contexts) for chunk in chunks]
        else:
            outs = [net(chunk) for chunk in chunks]
        features = torch.cat([f for f, _ in outs])
        logits = torch.cat([lg for _, lg in outs])
        inverse = torch.argsort(order)
        return features.view(two_b, s, *features.shape[1:])[inverse], logits.view(two_b, s)[inverse]

    # -- training ------------------------------------------------------------------------------------

    def training_step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        if stage == "pretext":
            return self._pretext_step(batch["image"])
        return self._joint_step(batch["image"])

    def _pretext_step(self, image: Tensor) -> dict[str, Tensor]:
        c = self.config
        x = self.to_volume(image).clamp(0, 1)
        generator = torch.Generator().manual_seed(int(self._rng().integers(2**31 - 1)))
        if c.pretext in ("scatter", "box"):
            if c.pretext == "scatter":
                hole = scattered_mask(tuple(x.shape), c.scatter_ratio, generator).to(x.device)
            else:  # one box zeroed, sides from the hard-augmentation range at the 3D resolution (spec)
                hole = torch.zeros_like(x)
                n = x.shape[-1]
                lo, hi = max(1, c.anomaly_min_size // c.slice_scale), max(1, int(n * c.anomaly_max_fraction))
                for b in range(x.shape[0]):
                    sides = torch.randint(min(lo, hi), hi + 1, (3,), generator=generator)
                    starts = [int(torch.randint(0, n - int(s) + 1, (), generator=generator)) for s in sides]
                    hole[b, :, starts[0]:starts[0] + sides[0], starts[1]:starts[1] + sides[1],
                         starts[2]:starts[2] + sides[2]] = 1.0
            seg_logits, _, _ = self.net3d(x * (1.0 - hole))
            if c.recon_loss == "mse":
                loss = F.mse_loss(torch.sigmoid(seg_logits), x)
            else:
                loss = F.binary_cross_entropy_with_logits(seg_logits, x)
            return {"loss": loss, "recon": loss.detach()}
        # Classification pretasks over GAP(z3): 24 cube rotations, or a fixed set of octant permutations.
        if c.pretext == "rotation":
            targets = torch.randint(len(CUBE_ROTATIONS), (x.shape[0],), generator=generator)
            arrays = x.detach().cpu().numpy()
            moved = np.stack([apply_rotation(a, CUBE_ROTATIONS[int(t)]) for a, t in zip(arrays, targets, strict=True)])
        else:
            targets = torch.randint(JIGSAW_PERMUTATIONS, (x.shape[0],), generator=generator)
            moved = np.stack([_shuffle_octants(a, self.jigsaw[int(t)].tolist()) for a, t in
                              zip(x.detach().cpu().numpy(), targets, strict=True)])
        z3 = self.net3d.encode(torch.from_numpy(moved).to(x))[-1]
        logits = self.pretext_head(z3.mean(dim=(2, 3, 4)))
        loss = F.cross_entropy(logits, targets.to(x.device))
        return {"loss": loss, "pretext_accuracy": (logits.argmax(1).cpu() == targets).float().mean()}

    def _joint_step(self, image: Tensor) -> dict[str, Tensor]:
        c = self.config
        normal, twin, mask = self.make_pairs(image, self._rng())
        b = normal.shape[0]
        volumes = self.to_volume(torch.cat([normal, twin]))
        target = torch.cat([torch.zeros_like(mask), mask])
        target3d = F.interpolate(target, size=volumes.shape[2:], mode="area")  # soft labels (our choice)
        seg_logits, cls_logits, z3 = self.net3d(volumes)
        seg_loss = (F.binary_cross_entropy_with_logits(seg_logits[:b], target3d[:b])
                    + F.binary_cross_entropy_with_logits(seg_logits[b:], target3d[b:]))
        cls_target = torch.cat([torch.zeros(b), torch.ones(b)]).to(cls_logits)
        cls_loss = (F.binary_cross_entropy_with_logits(cls_logits[:b], cls_target[:b])
                    + F.binary_cross_entropy_with_logits(cls_logits[b:], cls_target[b:]))
        progress = self._progress("joint")
        loss = seg_loss + cls_loss
        out: dict[str, Tensor] = {"seg": seg_loss.detach(), "cls": cls_loss.detach()}
        if c.fpfn_term:
            seg = torch.sigmoid(seg_logits[b:])
            y = target3d[b:]
            fp = ((1.0 - y) * seg).mean()
            fn = ((1.0 - seg) * y).mean()
            loss = loss + fpfn_weight(progress, c.fpfn_beta0, c.fpfn_floor, c.fpfn_decay) * (fp + fn)
        if self.net2d is None:
            out["loss"] = loss
            return out
        index = self.slice_indices().to(image.device)
        slices = torch.cat([normal, twin])[:, 0, index]  # (2B, S, n, n): slices along the first axis
        features, logits = self._run_2d(slices)
        abnormal_pixels = mask[:, 0, index].flatten(2).sum(-1)  # (B, S)
        targets = slice_labels(abnormal_pixels, c.image_size**2, smoothing=c.label_smoothing, mode=c.ls_mode,
                               thresholds=tuple(c.ls_thresholds), value=c.ls_value)
        # Sec. 3.3.1 / [code]: the weighted BCE runs over the slices of the abnormal volumes only.
        cls2d = weighted_slice_bce(logits[b:].reshape(-1), targets.reshape(-1).to(logits), c.wbce)
        z2 = reduce_slices(features, c.unet_features[4], c.latent_depth, c.reduction)
        sim = similarity_loss(z2, z3, kind=c.sim_loss, pairs=c.sim_pairs, temperature=c.sim_temperature)
        weight = sim_weight(progress, c.sim_weight, c.sim_weight_final)
        out.update({"loss": loss + weight * sim, "loss_2d": cls2d + weight * sim, "sim": sim.detach(),
                    "cls_2d": cls2d.detach()})
        return out

    # -- scoring -------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, batch: Batch) -> Scores:
        """[code] inference: only the 3D network; sample = its class probability (or, with
        ``sample_score="seg_max"`` / ``"seg_mean"``, the map's maximum / mean), map = its segmentation,
        resized (trilinear) to the input's grid."""
        image = batch["image"]
        seg_logits, cls_logits, _ = self.net3d(self.to_volume(image))
        seg = torch.sigmoid(seg_logits)
        if seg.shape[2:] != image.shape[2:]:
            seg = F.interpolate(seg, size=image.shape[2:], mode="trilinear", align_corners=False)
        if self.config.sample_score == "seg_max":
            return Scores(sample=seg.flatten(1).amax(dim=1), map=seg)
        if self.config.sample_score == "seg_mean":
            return Scores(sample=seg.flatten(1).mean(dim=1), map=seg)
        return Scores(sample=torch.sigmoid(cls_logits), map=seg)

    def to_checkpoint(self) -> dict[str, Any]:
        payload = super().to_checkpoint()
        # The pretrained 2D weights are in the state dict: loading a checkpoint needs no weight file (the
        # run's own record keeps the original pretrained_2d settings).
        payload["config"].update({"pretrained_2d": "none", "pretrained_2d_path": ""})
        return payload


@contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Recompute context of a checkpointed chunk: its BatchNorm layers still normalise by the chunk's
    statistics (as in the forward pass) but leave the running statistics as they are.

    ``momentum`` 0 keeps ``running_mean`` / ``running_var`` (new = (1 - 0) old + 0 batch); a train-mode
    forward still adds 1 to ``num_batches_tracked`` whatever the momentum (torch ``_BatchNorm.forward``),
    so that counter is saved and put back.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _shuffle_octants(volume: np.ndarray, order: list[int]) -> np.ndarray:
    """Jigsaw pretask: the 8 octants of a (C, n, n, n) volume moved to the places ``order`` gives."""
    half = volume.shape[-1] // 2
    corners = list(itertools.product((0, 1), repeat=3))
    out = np.empty_like(volume)
    for dst, src in zip(corners, order, strict=True):
        s = corners[src]
        out[(..., *[slice(c * half, (c + 1) * half) for c in dst])] = volume[
            (..., *[slice(c * half, (c + 1) * half) for c in s])
        ]
    return out


__all__ = ["Config", "JointEmbedding"]
