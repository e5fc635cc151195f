"""Self-taught semi-supervised anomaly detection (Spahr, Bozorgtabar & Thiran; seed 004).

Two steps (§3.1, Alg. 1). (1) ``pretext``: an encoder psi (ResNet-18 up to the global pooling, every
convolution bias-free, every BatchNorm without affine parameters) with an MLP head g_C is trained with
InfoNCE (Eq. 1) on two heavily augmented views of every training image. (2) ``ad``: psi is kept
(Alg. 1 line 7, the transfer), a fresh head g_MAD is put on top, N_s hypersphere centres are
initialised by k-means on the embedded unlabelled / known-normal training images (line 8), and
phi_MAD = g_MAD o psi is fine-tuned with the multi-sphere Deep SAD loss (Eq. 2)

    l_i = d_i^2                         (unlabelled)
    l_i = eta * (d_i^2 + eps)^{y_i}     (labelled: y = +1 known normal, -1 known abnormal)

with d_i the distance to the nearest *active* centre; after every epoch a centre is pruned when fewer
than gamma * max_j n_j of the epoch's non-abnormal training samples were assigned to it (lines 15-20).
The score is the distance (not squared) to the nearest surviving centre (§3.2). ``score="knn"`` is
the paper's downstream ablation (T1 bottom): the mean distance to the k nearest normal training
images in the encoder's space R^d.

Platform hooks (``medood.methods.base``): ``stage_statistics``/``begin_stage`` gather psi features of
the whole training split (over all workers) for k-means; ``epoch_statistics``/``end_epoch`` sum the
assignment counts for pruning. Labels: platform label 1 (a known anomaly, ingested with
``--train-anomalies``) is y = -1; label 0 is y = +1 for a deterministic ``known_normal_fraction`` of the
ids (inert with eta = 1, spec 004 §6.6) and unknown otherwise; label -1 is unknown.

Choices where the paper is silent (spec 004 §6): tau = 0.5, the AD optimiser and epochs of the
authors' code; one ``batch_size`` for both stages (the platform has one; the paper uses 24 for the
pretext and 16 for the AD stage); the centres are fitted on un-augmented images (the code augments);
augmentations are batched affine / intensity operations in torch with centred crop semantics (the
code's crop and zoom are off-centre, §6.10); the grayscale image is not repeated to 3 channels (the
first convolution takes ``in_channels``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from monai.networks.nets import ResNet
from torch import Tensor, nn

from medood.methods.base import AnomalyMethod, BaseConfig, Batch, Scores, Stage, register

PRETEXTS = ("contrastive", "supcon", "autoencoder", "none")
SCORES = ("spheres", "knn")


@dataclass
class Config(BaseConfig):
    spatial_dims: int = 2
    image_size: int = 512  # §4.1: 512 px major axis
    in_channels: int = 1
    batch_size: int = 16  # AD stage (code); the paper's pretext uses 24 (see the module docstring)
    # Network (§4.2; code Encoder / MLPHead)
    widths: tuple[int, ...] = (64, 128, 256, 512)  # ResNet-18
    layers: tuple[int, ...] = (2, 2, 2, 2)
    head: tuple[int, ...] = (512, 256, 128)  # "2-hidden layers MLP (512 -> 256 -> 128)"
    head_bias: bool = True  # code keeps the MLP biases (spec §6.12)
    # Pretext (Eq. 1, §4.2, code)
    pretext: str = "contrastive"
    tau: float = 0.5  # code; not in the paper
    pretext_epochs: int = 100
    pretext_lr: float = 1e-3
    pretext_milestones: tuple[int, ...] = (70, 90)
    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    max_rotation_pretext: float = 45.0
    hflip: bool = True
    color_strength: float = 0.5
    color_prob: float = 0.8
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels at 512; scaled by image_size / 512
    # AD stage (Eq. 2, Alg. 1, code DMSAD)
    ad_epochs: int = 150
    lr: float = 1e-4
    milestones: tuple[int, ...] = (90, 140)
    weight_decay: float = 1e-6  # lambda of Eq. 2, as Adam's weight decay (§4.2)
    eta: float = 1.0
    eps: float = 1e-6
    gamma: float = 0.05
    n_spheres: int = 100
    center_eps: float = 0.1  # code: |c| < 0.1 snapped to +-0.1
    known_normal_fraction: float = 0.05
    known_abnormal_keep: float = 1.0  # < 1: drop that share of known anomalies from the loss (spec §6.7)
    transfer_head: bool = False  # Alg. 1 line 7 transfers psi only
    ad_hflip: bool = True
    ad_vflip: bool = True
    max_rotation_ad: float = 20.0
    brightness: tuple[float, float] = (0.8, 1.2)
    scale: tuple[float, float] = (0.8, 1.2)
    # Score (§3.2; T1 bottom)
    score: str = "spheres"
    knn_k: int = 100

    def validate(self) -> None:
        if self.spatial_dims != 2:
            raise ValueError(f"self_taught is 2D (ResNet-18 on radiographs); spatial_dims must be 2, got {self.spatial_dims}")
        if self.pretext not in PRETEXTS:
            raise ValueError(f"pretext must be one of {', '.join(PRETEXTS)}, got {self.pretext!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if len(self.widths) != len(self.layers):
            raise ValueError(f"widths {self.widths} and layers {self.layers} must have the same length")
        if len(self.head) < 2 or self.head[0] != self.widths[-1]:
            raise ValueError(f"head {self.head} must start at the encoder width {self.widths[-1]}")
        if self.image_size % 32:
            raise ValueError(f"image_size {self.image_size} must be divisible by 32 (the ResNet's total stride)")
        if self.ad_epochs == 0 and self.score != "knn":
            raise ValueError("ad_epochs=0 trains no spheres; use score='knn' (the paper's pretext + k-NN ablation)")
        if self.n_spheres < 1 or not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"n_spheres must be >= 1 and gamma in [0, 1), got {self.n_spheres}, {self.gamma}")
        if not 0.0 < self.known_abnormal_keep <= 1.0 or not 0.0 <= self.known_normal_fraction <= 1.0:
            raise ValueError("known_abnormal_keep must be in (0, 1] and known_normal_fraction in [0, 1]")


@register("self_taught")
class SelfTaught(AnomalyMethod):
    Config = Config
    presets = {
        "paper": {},
        # digitanatomy on CPU (spec §7): flips and large rotations change the label there (§6.14).
        "tiny": {
            "image_size": 64, "batch_size": 32, "widths": (32, 64, 128, 256), "layers": (1, 1, 1, 1),
            "head": (256, 128, 64), "pretext_epochs": 6, "pretext_milestones": (), "ad_epochs": 8,
            "lr": 3e-4, "milestones": (), "n_spheres": 20, "hflip": False, "ad_hflip": False,
            "ad_vflip": False, "max_rotation_pretext": 10.0, "max_rotation_ad": 10.0, "crop_scale": (0.6, 1.0),
        },
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        self.encoder = build_encoder(c)
        self.pretext_head = _mlp(c.head, c.head_bias)
        self.ad_head = _mlp(c.head, c.head_bias)
        self.decoder = _Decoder(c) if c.pretext == "autoencoder" else None
        self.register_buffer("centers", torch.zeros(c.n_spheres, c.head[-1]))
        self.register_buffer("active", torch.zeros(c.n_spheres, dtype=torch.bool))
        self.register_buffer("centers_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("bank", torch.zeros(0, c.widths[-1]))  # kNN score: psi of normal training images
        self.contrastive = ContrastiveLoss(temperature=c.tau)
        self._counts = torch.zeros(c.n_spheres, dtype=torch.int64)  # this epoch's assignments (not state)

    # -- stages ---------------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        c = self.config
        out = []
        if c.pretext != "none" and c.pretext_epochs > 0:
            out.append(Stage("pretext", c.pretext_epochs))
        if c.ad_epochs > 0:
            out.append(Stage("ad", c.ad_epochs))
        return out

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        if stage == "pretext":
            params = list(self.encoder.parameters()) + list(self.pretext_head.parameters())
            if self.decoder is not None:
                params += list(self.decoder.parameters())
            return {"main": torch.optim.Adam(params, lr=c.pretext_lr, weight_decay=c.weight_decay)}
        params = list(self.encoder.parameters()) + list(self.ad_head.parameters())
        return {"main": torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)}

    def configure_schedulers(self, stage, optimizers):
        milestones = self.config.pretext_milestones if stage == "pretext" else self.config.milestones
        if not milestones:
            return {}
        return {"main": torch.optim.lr_scheduler.MultiStepLR(optimizers["main"], list(milestones), gamma=0.1)}

    def training_step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        if stage == "pretext":
            return {"loss": self.pretext_loss(batch)}
        if stage == "ad":
            return self.ad_step(batch)
        raise ValueError(f"unknown stage {stage!r}; known: pretext, ad")

    # -- stage 1: pretext (Eq. 1) -----------------------------------------------------------------

    def pretext_loss(self, batch: Batch) -> Tensor:
        image = batch["image"]
        if self.config.pretext == "autoencoder":
            # The "Ruff et al." rows' AE pretraining: reconstruct the (unaugmented) image.
            return F.mse_loss(self.decoder(self.encoder(image)), image)
        views = torch.cat([pretext_view(image, self.config), pretext_view(image, self.config)])
        z = self.pretext_head(self.encoder(views))
        z1, z2 = z.chunk(2)
        if self.config.pretext == "supcon":
            return supcon_loss(z1, z2, semi_labels(batch, self.config), self.config.tau)
        return self.contrastive(z1, z2)

    # -- stage 2: centres (Alg. 1 lines 7-8), through the platform's stage hooks ------------------

    def stage_statistics(self, stage: str, batches: Iterable[Batch]) -> dict[str, Tensor]:
        if stage != "ad":
            return {}
        features = []
        for batch in batches:
            keep = semi_labels(batch, self.config) != -1  # k-means sees unlabelled and known-normal images
            if bool(keep.any()):
                features.append(self.encoder(batch["image"][keep]).float())
        width = self.config.widths[-1]
        device = self.centers.device
        return {"features": torch.cat(features) if features else torch.zeros(0, width, device=device)}

    def begin_stage(self, stage: str, statistics: dict[str, Tensor]) -> None:
        if stage != "ad":
            return
        if self.config.transfer_head:
            self.ad_head.load_state_dict(self.pretext_head.state_dict())
        if self.config.score != "knn":
            self.bank = self.bank[:0]  # the pretext's validation bank; the spheres score does not use it
        with torch.no_grad():
            self.init_centers(self.ad_head(statistics["features"].to(self.centers.device)))

    @torch.no_grad()
    def init_centers(self, embeddings: Tensor) -> None:
        """K-means (fixed seed) on the embeddings, near-zero coordinates snapped to +-center_eps (code)."""
        centers = kmeans_centers(embeddings.detach().float().cpu().numpy(), self.config.n_spheres, self.config.seed)
        centers = snap_centers(torch.from_numpy(centers).float(), self.config.center_eps)
        self.centers.zero_()
        self.active.zero_()
        self.centers[: len(centers)] = centers.to(self.centers.device)
        self.active[: len(centers)] = True
        self.centers_ready.fill_(True)
        self._counts.zero_()

    # -- stage 3: multi-sphere fine-tuning (Eq. 2) and pruning (Alg. 1 lines 9-21) ----------------

    def ad_step(self, batch: Batch) -> dict[str, Tensor]:
        image = batch["image"]
        y = semi_labels(batch, self.config)
        used = _kept(batch, y, self.config.known_abnormal_keep)
        if self.training:
            image = ad_view(image, self.config)
        embedding = self.ad_head(self.encoder(image))
        centers, active = self.centers, self.active
        if not bool(self.centers_ready):
            # Fallback for callers that skip the stage hook (the platform always calls it): centres from
            # this batch, stored only in training mode (eval mode changes no state).
            with torch.no_grad():
                normal = embedding[y != -1] if bool((y != -1).any()) else embedding
                if self.training:
                    self.init_centers(normal)
                else:
                    centers, active = normal.mean(0, keepdim=True), torch.ones(1, dtype=torch.bool, device=normal.device)
        sq, nearest = nearest_center(embedding, centers, active)
        loss = mad_loss(sq[used], y[used], self.config.eta, self.config.eps)
        if self.training:
            counted = used & (y != -1)  # Alg. 1 line 16: normal samples only
            self._counts = self._counts.to(nearest.device)
            self._counts += torch.bincount(nearest[counted], minlength=self.config.n_spheres)
        return {"loss": loss, "known_anomaly_share": (y[used] == -1).float().mean()}

    def epoch_statistics(self, stage: str) -> dict[str, Tensor]:
        return {"counts": self._counts.clone()} if stage == "ad" else {}

    def end_epoch(self, stage: str, epoch: int, statistics: dict[str, Tensor]) -> None:
        if stage != "ad" or "counts" not in statistics:
            return
        with torch.no_grad():
            self.active.copy_(prune_spheres(statistics["counts"].to(self.active.device), self.active, self.config.gamma))
        self._counts.zero_()

    # -- scoring (§3.2) ---------------------------------------------------------------------------

    def fit_reference(self, batches: Iterable[Batch]) -> None:
        if self.config.score != "knn" and bool(self.centers_ready):
            return
        features = [self.encoder(b["image"][b["label"] != 1] if "label" in b else b["image"]).float() for b in batches]
        self.bank = torch.cat(features) if features else self.bank[:0]

    @torch.no_grad()
    def score(self, batch: Batch) -> Scores:
        features = self.encoder(batch["image"])
        if self.config.score == "spheres" and bool(self.centers_ready):
            sq, _ = nearest_center(self.ad_head(features), self.centers, self.active)
            return Scores(sample=sq.clamp_min(0).sqrt())
        if len(self.bank):
            return Scores(sample=knn_score(features.float(), self.bank, self.config.knn_k))
        # Neither centres nor a bank yet (a score before any fit): distance of the embedding to 0.
        return Scores(sample=self.ad_head(features).norm(dim=1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        bank = state_dict.get(prefix + "bank")
        if bank is not None:  # the bank's size is the reference set's; take the checkpoint's shape
            self.bank = torch.empty_like(bank, device=self.centers.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# -- network --------------------------------------------------------------------------------------


def build_encoder(c: Config) -> nn.Module:
    """psi: ResNet (basic blocks) up to global average pooling -> (B, widths[-1]); bias-free
    convolutions and BatchNorm without affine parameters (code; against the trivial hypersphere)."""
    net = ResNet(
        block="basic", layers=list(c.layers), block_inplanes=list(c.widths), spatial_dims=2,
        n_input_channels=c.in_channels, conv1_t_stride=2, bias_downsample=False, feed_forward=False,
    )
    _strip_affine(net)
    return net


def _strip_affine(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.BatchNorm2d(child.num_features, affine=False))
        else:
            _strip_affine(child)


def _mlp(dims: tuple[int, ...], bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Decoder(nn.Module):
    """The AE pretext's decoder (T1 "Ruff et al." rows): the pooled vector to a 1/32 map, five
    x2 up-sampling conv blocks, a sigmoid (a light stand-in for the code's mirrored ResNet-18)."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.side = c.image_size // 32
        self.width = c.widths[-1]
        self.fc = nn.Linear(c.widths[-1], c.widths[-1] * self.side * self.side)
        widths = list(reversed(c.widths)) + [max(c.widths[0] // 2, 8)]
        blocks: list[nn.Module] = []
        for i in range(5):
            w_in, w_out = widths[min(i, len(widths) - 1)], widths[min(i + 1, len(widths) - 1)]
            blocks += [nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(w_in, w_out, 3, padding=1), nn.ReLU(inplace=True)]
        blocks += [nn.Conv2d(widths[-1], c.in_channels, 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.blocks(self.fc(h).view(-1, self.width, self.side, self.side)))


# -- losses, centres, scores ---------------------------------------------------------------------


def semi_labels(batch: Batch, c: Config) -> Tensor:
    """Platform labels to the paper's semi-labels: 1 -> -1 (known abnormal), 0 -> +1 for a
    deterministic ``known_normal_fraction`` of ids (else unknown, 0), -1 -> unknown (spec §2)."""
    image = batch["image"]
    label = batch.get("label")
    if label is None:
        return torch.zeros(len(image), dtype=torch.int64, device=image.device)
    y = torch.zeros_like(label)
    y[label == 1] = -1
    ids = batch.get("id")
    if ids is not None and c.known_normal_fraction > 0:
        known = torch.tensor([id_fraction(str(i)) < c.known_normal_fraction for i in ids], device=label.device)
        y[(label == 0) & known] = 1
    return y


def id_fraction(case_id: str, salt: str = "known-normal") -> float:
    """A number in [0, 1) fixed by the id (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(f"{salt}:{case_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _kept(batch: Batch, y: Tensor, keep: float) -> Tensor:
    used = torch.ones_like(y, dtype=torch.bool)
    if keep < 1.0 and batch.get("id") is not None:
        dropped = torch.tensor([id_fraction(str(i), "known-abnormal") >= keep for i in batch["id"]], device=y.device)
        used &= ~((y == -1) & dropped)
    return used


def nearest_center(embedding: Tensor, centers: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distance to the nearest active centre and its index (inactive centres are ignored)."""
    sq = torch.cdist(embedding.float(), centers.float()).pow(2)
    sq = sq.masked_fill(~active.unsqueeze(0), float("inf"))
    value, index = sq.min(dim=1)
    return value, index


def mad_loss(sq: Tensor, y: Tensor, eta: float, eps: float) -> Tensor:
    """Eq. 2 per sample, batch mean: d^2 unlabelled, eta * (d^2 + eps)^y labelled (y = +-1)."""
    if sq.numel() == 0:
        return sq.sum()
    labelled = eta * (sq + eps).pow(y.to(sq.dtype))
    return torch.where(y == 0, sq, labelled).mean()


def kmeans_centers(embeddings: np.ndarray, n_spheres: int, seed: int) -> np.ndarray:
    """N_s centres by k-means (sklearn, fixed ``random_state``); one sphere is the mean (Deep SAD)."""
    if len(embeddings) == 0:
        raise ValueError("no unlabelled or known-normal training samples to initialise the centres on")
    if n_spheres == 1:
        return embeddings.mean(0, keepdims=True)
    from sklearn.cluster import KMeans

    k = min(n_spheres, len(np.unique(embeddings.round(6), axis=0)))
    return KMeans(n_clusters=k, random_state=seed, n_init=10).fit(embeddings.astype(np.float64)).cluster_centers_


def snap_centers(centers: Tensor, eps: float) -> Tensor:
    """code: coordinates with |c| < eps move to -eps (negative) or +eps (positive); exact zeros stay."""
    out = centers.clone()
    small = out.abs() < eps
    out[small & (out < 0)] = -eps
    out[small & (out > 0)] = eps
    return out


def prune_spheres(counts: Tensor, active: Tensor, gamma: float) -> Tensor:
    """Alg. 1 lines 15-20: keep c_k iff n_k >= gamma * max_j n_j; the largest sphere always stays."""
    counts = counts.to(torch.float64).masked_fill(~active, 0)
    if float(counts.max()) <= 0:
        return active.clone()  # nothing counted this epoch: prune nothing
    keep = active & (counts >= gamma * counts.max())
    keep[int(counts.argmax())] = True
    return keep


def knn_score(features: Tensor, bank: Tensor, k: int) -> Tensor:
    """Mean distance to the k nearest bank rows (k clamped to the bank size)."""
    distance = torch.cdist(features, bank.to(features.dtype))
    return distance.topk(min(k, bank.shape[0]), dim=1, largest=False).values.mean(dim=1)


def supcon_loss(z1: Tensor, z2: Tensor, y: Tensor, tau: float) -> Tensor:
    """SupCon [36] with semi-labels (spec §6.8): positives are the other view plus the views of
    samples with the same *known* label; unknown samples only have their own other view."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    labels = torch.cat([y, y])
    index = torch.arange(2 * n, device=z.device)
    same = (labels.unsqueeze(0) == labels.unsqueeze(1)) & (labels != 0).unsqueeze(0)
    positive = same | (index.unsqueeze(0) == ((index + n) % (2 * n)).unsqueeze(1))
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    positive &= ~self_mask
    logits = (z @ z.T / tau).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1)).mean()


# -- augmentations (F5), batched, drawn from torch's global RNG -----------------------------------


def pretext_view(image: Tensor, c: Config) -> Tensor:
    """F5 blue boxes: flip, scale, rotation, random resized crop, colour distortion, blur, min-max."""
    n = len(image)
    crop_area = _uniform(n, c.crop_scale, image)
    log_ratio = _uniform(n, (math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1])), image)
    width = (crop_area * log_ratio.exp()).sqrt().clamp(max=1.0)
    height = (crop_area / log_ratio.exp()).sqrt().clamp(max=1.0)
    out = _affine(image, c.max_rotation_pretext, (0.8, 1.2), c.hflip, False, width, height)
    apply = torch.rand(n, device=image.device) < c.color_prob
    s = 0.8 * c.color_strength
    bright = torch.where(apply, _uniform(n, (1 - s, 1 + s), image), torch.ones_like(crop_area))
    contrast = torch.where(apply, _uniform(n, (1 - s, 1 + s), image), torch.ones_like(crop_area))
    out = out * bright.view(-1, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast.view(-1, 1, 1, 1) + mean
    sigma = _uniform(n, c.blur_sigma, image) * image.shape[-1] / 512
    blur = torch.rand(n, device=image.device) < c.blur_prob
    out = torch.where(blur.view(-1, 1, 1, 1), _gaussian_blur(out, sigma, c.blur_sigma[1] * image.shape[-1] / 512), out)
    return _min_max(out)


def ad_view(image: Tensor, c: Config) -> Tensor:
    """F5 red boxes: flips, brightness, scale, rotation, min-max."""
    n = len(image)
    ones = torch.ones(n, device=image.device)
    out = _affine(image, c.max_rotation_ad, c.scale, c.ad_hflip, c.ad_vflip, ones, ones)
    return _min_max(out * _uniform(n, c.brightness, image).view(-1, 1, 1, 1))


def _uniform(n: int, bounds: tuple[float, float], like: Tensor) -> Tensor:
    low, high = float(bounds[0]), float(bounds[1])
    return low + (high - low) * torch.rand(n, device=like.device)


def _affine(image: Tensor, max_degrees: float, scale: tuple[float, float], hflip: bool, vflip: bool, width: Tensor, height: Tensor) -> Tensor:
    """One resampling per image: rotation, zoom, flips and a centred-semantics crop of relative size
    (width, height) at a random position inside the image; outside is 0 (background)."""
    n = len(image)
    angle = _uniform(n, (-max_degrees, max_degrees), image) * math.pi / 180
    zoom = _uniform(n, scale, image)
    fx = torch.where(torch.rand(n, device=image.device) < 0.5, -1.0, 1.0) if hflip else torch.ones(n, device=image.device)
    fy = torch.where(torch.rand(n, device=image.device) < 0.5, -1.0, 1.0) if vflip else torch.ones(n, device=image.device)
    cx = (torch.rand(n, device=image.device) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, device=image.device) * 2 - 1) * (1 - height)
    sx, sy = fx * width / zoom, fy * height / zoom
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [torch.stack([cos * sx, -sin * sy, cx], 1), torch.stack([sin * sx, cos * sy, cy], 1)], 1
    ).to(image.dtype)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian_blur(image: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * max_sigma))
    x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-(x.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).to(image.dtype) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, K), one kernel per image
    n, ch, h, w = image.shape
    flat = image.reshape(1, n * ch, h, w)
    k = kernel.repeat_interleave(ch, 0)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), k.view(n * ch, 1, 1, -1), groups=n * ch)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), k.view(n * ch, 1, -1, 1), groups=n * ch)
    return flat.view(n, ch, h, w)


def _min_max(image: Tensor) -> Tensor:
    low = image.amin(dim=(1, 2, 3), keepdim=True)
    high = image.amax(dim=(1, 2, 3), keepdim=True)
    return (image - low) / (high - low).clamp_min(1e-6)
