"""DINO self-distillation with negative views (Rafiee thesis ch. 6-7; Rafiee et al., ICANN 2022 and ISBI 2023).

Training (one stage, ``dino``): a student g_s and an EMA teacher g_t (ViT backbone + DINO head to K
soft-classes). Positive views: 2 global + N local crops of each normal training image (multi-crop);
the teacher sees the global views only, centred and sharpened, p_t = softmax((g_t - c) / tau_t),
and the student matches it from every other view (Eq. 3, L_pos). Negative views x- = T(R(x)): a
shifting transformation R (``shift``: rot, rot360, perm4, perm16, pixperm, identity) applied to
in-distribution training images or auxiliary images (``neg_source``), then the positive
augmentation T; 1 global + N local negative views go through the student only, whose softmax is
pushed towards uniform (Eq. 4, L_neg = -(1/K) sum_k log p_s^k). L_total = L_pos + lambda L_neg (Eq. 5).

Score: the teacher's normalised backbone output f (CLS token), against the normal training set
(``fit_reference``): ``mahalanobis`` (Eq. 7.1, ch. 7's S_md), ``cos_max`` (Eq. 7.2, S_cs) or
``cos_avg`` (Eq. 6.1, ch. 6, with ``score_temperature``). Cosine banks exclude each case's own row.

Sensitivity (Sec. 6.1.5): ``sensitivity_scores`` / ``sensitivity_reference`` (see
``medood.methods.components.feature_reference``).

Schedules run per epoch (the platform steps schedulers once per epoch; no iteration index reaches
a method): learning rate (linear warm-up, then cosine to ``min_lr``), weight decay (cosine
``weight_decay`` -> ``weight_decay_end``), teacher momentum (cosine ``momentum_start`` -> 1) and the
teacher temperature (linear ``teacher_temp_start`` -> ``teacher_temp_end``, thesis I Sec. 4 / M Sec. 3.3).

Collapse guards: centring (c <- 0.9 c + 0.1 mean teacher output) against one dominant soft-class,
sharpening (tau_t < tau_s) against the uniform solution; c starts at the first batch's teacher mean
instead of 0 (spec 002-B Sec. 2: with c = 0 a short run flattens p_t). Every step returns the
monitors: the teacher's mean entropy ``teacher_entropy`` (-> log K: uniform collapse), the entropy of
its mean ``teacher_mean_entropy`` (-> 0: one-class collapse) and ``occupied_classes``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medood.methods.base import AnomalyMethod, BaseConfig, Batch, Stage, register
from medood.methods.components.feature_reference import (
    COVARIANCES,
    FEATURE_SCORES,
    FeatureReference,
    ReferenceScoring,
)
from medood.methods.components.multicrop_vit import DINOHead, MultiCropViT
from medood.methods.components.views import (
    SHIFTS,
    color_jitter,
    gaussian_blur,
    imagenet_normalise,
    random_resized_crop,
    rotate90,
    shift,
    solarize,
)

NEG_SOURCES = ("in_dist", "aux", "both")


@dataclass
class Config(BaseConfig):
    # Ch. 7 (RSNA) defaults; ch. 6 differs in local_size, lr_base, teacher_temp_start, epochs, score.
    image_size: int = 256  # global views and scoring (I Sec. 4, M Sec. 3.3)
    local_size: int = 96  # M Sec. 3.3 (128 in ch. 6)
    in_channels: int = 3  # grey repeated, so RGB auxiliary images fit
    patch_size: int = 16  # ViT-S/16
    embed_dim: int = 384
    depth: int = 12
    heads: int = 6
    out_dim: int = 4096  # K soft-classes (I Sec. 4)
    head_layers: int = 3  # DINOHead (spec 002-B ambiguity 1); 1 = the literal "two FC layers"
    head_hidden: int = 2048
    head_bottleneck: int = 256
    norm_last_layer: bool = True
    n_local: int = 8  # N = 8 local views (I Sec. 4)
    n_neg_global: int = 1  # one global negative view (I Sec. 4)
    n_neg_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)  # I Sec. 3.1: ">= 40%"
    local_scale: tuple[float, float] = (0.05, 0.4)
    hflip_prob: float = 0.5
    jitter: float = 0.4  # brightness = contrast, applied with p = 0.8 (DINO)
    positive_rotation: bool = False  # Hyper-Kvasir only (M Sec. 3.3)
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04  # ch. 7 (0.055 / 0.050 in ch. 6)
    teacher_temp_end: float = 0.01
    momentum_start: float = 0.996  # DINO default; not stated in the thesis
    center_momentum: float = 0.9
    lam: float = 1.0  # Eq. 5, chosen with the sensitivity score (I Sec. 4)
    shift: str = "rot"  # Tab. 7.3: Rot is best on RSNA and LAG
    neg_source: str = "in_dist"  # "aux" / "both" need batch["aux_image"]
    loss_reduction: str = "mean"  # L_neg over negative views: mean (as L_pos over pairs) or sum (Eq. 4 literally)
    batch_size: int = 256
    lr_base: float = 0.002  # RSNA (M Sec. 3.3); lr = lr_base * batch_size / 256
    warmup_epochs: int = 10
    min_lr: float = 1e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    epochs: int = 700  # M Sec. 3.3 (500 in ch. 6)
    score: str = "mahalanobis"  # S_md (ch. 7)
    score_temperature: float = 0.04  # Eq. 6.1 (I Sec. 4.2)
    covariance: str = "empirical"
    covariance_eps: float = 1e-6
    sensitivity_fraction: float = 0.1

    def validate(self) -> None:
        if self.spatial_dims != 2:
            raise ValueError(f"dino_negatives is 2D (spatial_dims=2), got {self.spatial_dims}")
        if self.shift not in SHIFTS:
            raise ValueError(f"unknown shift {self.shift!r}; known: {', '.join(SHIFTS)}")
        if self.neg_source not in NEG_SOURCES:
            raise ValueError(f"unknown neg_source {self.neg_source!r}; known: {', '.join(NEG_SOURCES)}")
        if self.score not in FEATURE_SCORES:
            raise ValueError(f"unknown score {self.score!r}; known: {', '.join(FEATURE_SCORES)}")
        if self.covariance not in COVARIANCES:
            raise ValueError(f"unknown covariance {self.covariance!r}; known: {', '.join(COVARIANCES)}")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        for name in ("image_size", "local_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(f"{name} {getattr(self, name)} must be divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by heads {self.heads}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if not 0 < self.teacher_temp_end <= self.teacher_temp_start or self.student_temp <= 0:
            raise ValueError("temperatures must be > 0 with teacher_temp_end <= teacher_temp_start")


@register("dino_negatives")
class DinoNegatives(ReferenceScoring, AnomalyMethod):
    Config = Config
    presets = {
        "paper": {},
        "paper_ch6": {  # ICANN 2022 (CIFAR): spec 002-B Sec. 8
            "local_size": 128, "lr_base": 0.004, "teacher_temp_start": 0.055, "epochs": 500, "score": "cos_avg",
            "neg_source": "aux",
        },
        "tiny": {
            "image_size": 64, "local_size": 32, "in_channels": 1, "patch_size": 8, "embed_dim": 64, "depth": 3,
            "heads": 4, "out_dim": 256, "head_layers": 2, "head_hidden": 256, "head_bottleneck": 64,
            "n_local": 2, "n_neg_global": 1, "n_neg_local": 2, "local_scale": (0.1, 0.4), "hflip_prob": 0.0,
            # a 12-step run needs a faster teacher (spec 002-B Sec. 9: 0.99 passes, 0.996 barely)
            "momentum_start": 0.99, "batch_size": 32, "lr_base": 1e-3, "warmup_epochs": 2, "epochs": 20,
            "freeze_last_layer": 0, "covariance": "ledoit_wolf",
        },
        "brain-slices": {
            # synthetic-brain axial slices at 64 px (issue 11: slices at different depths are distinct normal
            # modes, where DigitAnatomy is one mode): tiny networks sized for a shared 2-core CPU (16-px patches:
            # 4 x 4 tokens per global view, 2 x 2 per local view), a softer teacher schedule for a short run.
            "image_size": 64, "local_size": 32, "in_channels": 1, "patch_size": 16, "embed_dim": 64, "depth": 3,
            "heads": 4, "out_dim": 256, "head_layers": 2, "head_hidden": 256, "head_bottleneck": 64,
            "n_local": 2, "n_neg_global": 1, "n_neg_local": 2, "local_scale": (0.1, 0.4), "hflip_prob": 0.5,
            "momentum_start": 0.99, "teacher_temp_start": 0.04, "teacher_temp_end": 0.02, "batch_size": 64,
            "lr_base": 2e-3, "warmup_epochs": 2, "epochs": 15, "freeze_last_layer": 0, "covariance": "ledoit_wolf",
        },
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        self.student = nn.ModuleDict({
            "backbone": MultiCropViT(c.in_channels, c.image_size, c.patch_size, c.embed_dim, c.depth, c.heads),
            "head": DINOHead(c.embed_dim, c.out_dim, c.head_layers, c.head_hidden, c.head_bottleneck, c.norm_last_layer),
        })
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, c.out_dim))
        self.register_buffer("center_initialized", torch.tensor(False))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.reference = FeatureReference(c.embed_dim, c.score, c.covariance, c.covariance_eps,
                                          c.score_temperature, c.sensitivity_fraction)

    # -- schedules (per epoch) --------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        return [Stage("dino", self.config.epochs)]

    def _progress(self) -> float:
        return min(float(self.epoch) / max(self.config.epochs - 1, 1), 1.0)

    def teacher_temperature(self) -> float:
        c = self.config  # linear per epoch from start to end (I Sec. 4, M Sec. 3.3)
        return c.teacher_temp_start + (c.teacher_temp_end - c.teacher_temp_start) * self._progress()

    def teacher_momentum(self) -> float:
        c = self.config  # cosine from momentum_start to 1 (DINO)
        return 1 - (1 - c.momentum_start) * (math.cos(math.pi * self._progress()) + 1) / 2

    def lr_factor(self, epoch: int) -> float:
        c = self.config
        if epoch < c.warmup_epochs:
            return (epoch + 1) / c.warmup_epochs
        base = c.lr_base * c.batch_size / 256
        t = (epoch - c.warmup_epochs) / max(c.epochs - c.warmup_epochs, 1)
        lr = c.min_lr + (base - c.min_lr) * (1 + math.cos(math.pi * min(t, 1.0))) / 2
        return lr / base

    def weight_decay_at(self, epoch: int) -> float:
        c = self.config
        t = min(epoch / max(c.epochs - 1, 1), 1.0)
        return c.weight_decay_end + (c.weight_decay - c.weight_decay_end) * (1 + math.cos(math.pi * t)) / 2

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
        groups = [{"params": decay, "weight_decay": c.weight_decay, "apply_decay": True},
                  {"params": no_decay, "weight_decay": 0.0, "apply_decay": False}]
        return {"main": ClippedAdamW(groups, lr=c.lr_base * c.batch_size / 256, clip_grad=c.clip_grad)}

    def configure_schedulers(self, stage, optimizers):
        return {"main": DinoSchedules(optimizers["main"], self)}

    # -- views --------------------------------------------------------------------------------------

    def _normalise(self, image: Tensor) -> Tensor:
        return imagenet_normalise(image.float())

    def _view(self, image: Tensor, size: int, scale: tuple[float, float], blur: float, solar: float) -> Tensor:
        c = self.config
        v = random_resized_crop(image, size, tuple(scale), hflip_prob=c.hflip_prob)
        v = color_jitter(v, c.jitter, c.jitter, prob=0.8)
        # DINO's blur sigma (0.1, 2) is in pixels of 224-px views: scale it to this view's size.
        v = gaussian_blur(v, blur, (0.1 * size / 224, 2.0 * size / 224))
        return self._normalise(solarize(v, solar))

    def positive_views(self, image: Tensor) -> list[Tensor]:
        """2 global views (blur p 1.0 / 0.1, solarize on the second) and ``n_local`` local views (DINO)."""
        c = self.config
        if c.positive_rotation:  # M Sec. 3.3: all positive views of an image share one random right angle
            image = rotate90(image, torch.randint(1, 4, (image.shape[0],), device=image.device))
        views = [self._view(image, c.image_size, c.global_scale, 1.0, 0.0),
                 self._view(image, c.image_size, c.global_scale, 0.1, 0.2)]
        views += [self._view(image, c.local_size, c.local_scale, 0.5, 0.0) for _ in range(c.n_local)]
        return views

    @classmethod
    def uses_auxiliary_images(cls, config: Config) -> bool:
        return config.lam > 0 and config.shift != "none" and config.neg_source in ("aux", "both")

    def negative_sources(self, batch: Batch) -> Tensor:
        c = self.config
        image = batch["image"].float()
        if c.neg_source == "in_dist":
            return image
        aux = batch.get("aux_image")
        if aux is None:
            raise ValueError(f"neg_source={c.neg_source!r} needs auxiliary images in batch['aux_image']; "
                             "use neg_source='in_dist' or name an auxiliary shard folder (medood train --aux-data SHARDS)")
        aux = aux.float()
        if aux.shape[-2:] != image.shape[-2:]:  # resized to the in-distribution size before T (I Sec. 4.1)
            aux = F.interpolate(aux, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if aux.shape[1] != image.shape[1]:
            aux = aux.mean(1, keepdim=True).expand(-1, image.shape[1], -1, -1)
        if c.neg_source == "aux":
            return aux[: image.shape[0]]
        half = image.shape[0] // 2  # "both": half in-distribution, half auxiliary
        return torch.cat([image[:half], aux[: image.shape[0] - half]])

    def negative_views(self, batch: Batch) -> list[Tensor]:
        c = self.config
        source = shift(self.negative_sources(batch), c.shift)  # R before T (Fig. 6.1)
        views = [self._view(source, c.image_size, c.global_scale, 1.0, 0.0) for _ in range(c.n_neg_global)]
        views += [self._view(source, c.local_size, c.local_scale, 0.5, 0.0) for _ in range(c.n_neg_local)]
        return views

    # -- networks -----------------------------------------------------------------------------------

    def _logits(self, network: nn.ModuleDict, views: list[Tensor], freeze_last: bool = False) -> list[Tensor]:
        """Views grouped by resolution through the backbone (DINO's MultiCropWrapper), then the head."""
        out: list[Tensor | None] = [None] * len(views)
        for size in sorted({v.shape[-1] for v in views}, reverse=True):
            idx = [i for i, v in enumerate(views) if v.shape[-1] == size]
            feats = network["backbone"](torch.cat([views[i] for i in idx]))
            logits = network["head"](feats, freeze_last)
            for j, chunk in zip(idx, logits.chunk(len(idx)), strict=True):
                out[j] = chunk
        return out  # type: ignore[return-value]

    # -- training -----------------------------------------------------------------------------------

    def training_step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        c = self.config
        updates = self.training and torch.is_grad_enabled()  # validation changes nothing (contract)
        if updates:
            self._ema_update()
        image = batch["image"].float()
        views = self.positive_views(image)
        freeze_last = self.training and int(self.epoch) < c.freeze_last_layer
        student = self._logits(self.student, views, freeze_last)
        with torch.no_grad():
            teacher = torch.stack(self._logits(self.teacher, views[:2])).float()  # (2, B, K): global views only
            batch_center = teacher.mean(dim=(0, 1)).unsqueeze(0)
            center = self.center if bool(self.center_initialized) else batch_center
            tau_t = self.teacher_temperature()
            p_t = F.softmax((teacher - center) / tau_t, dim=-1)
        loss_pos = dino_positive_loss(student, p_t, c.student_temp)
        out = {"loss_pos": loss_pos.detach()}
        loss = loss_pos
        if c.lam > 0 and c.shift != "none":
            neg = self._logits(self.student, self.negative_views(batch), freeze_last)
            loss_neg = uniform_negative_loss(neg, c.student_temp, c.loss_reduction)
            loss = loss + c.lam * loss_neg
            per_view = loss_neg if c.loss_reduction == "mean" else loss_neg / len(neg)
            out["loss_neg"] = loss_neg.detach()
            out["neg_excess"] = (per_view - math.log(c.out_dim)).detach()
        if updates:
            self._update_center(batch_center)
        out.update(collapse_monitors(p_t))
        out["teacher_temp"] = torch.tensor(tau_t)
        out["loss"] = loss
        return out

    @torch.no_grad()
    def _ema_update(self) -> None:
        m = self.teacher_momentum()  # Eq. 2, applied at the start of the next step (DINO: after the step)
        for p_s, p_t in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
            p_t.mul_(m).add_(p_s.detach(), alpha=1 - m)

    @torch.no_grad()
    def _update_center(self, batch_center: Tensor) -> None:
        if not bool(self.center_initialized):
            self.center.copy_(batch_center)
            self.center_initialized.fill_(True)
        else:
            m = self.config.center_momentum
            self.center.mul_(m).add_(batch_center, alpha=1 - m)

    # -- scoring ------------------------------------------------------------------------------------

    def features(self, image: Tensor) -> Tensor:
        """f(x): the teacher's L2-normalised CLS token of the whole image (the head is dropped)."""
        x = self._normalise(image)
        if x.shape[-1] != self.config.image_size:
            x = F.interpolate(x, size=(self.config.image_size,) * 2, mode="bilinear", align_corners=False)
        return F.normalize(self.teacher["backbone"](x).float(), dim=1)



def dino_positive_loss(student: list[Tensor], teacher_probs: Tensor, student_temp: float) -> Tensor:
    """Eq. 3: cross-entropy of each student view to each teacher global view, same-view pairs skipped.

    ``student``: one (B, K) logit tensor per view, the 2 global views first; ``teacher_probs``:
    (n_global, B, K). Averaged over the pairs and the batch (DINO's reduction).
    """
    total, pairs = 0.0, 0
    log_p = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    for iq in range(teacher_probs.shape[0]):
        for v, lp in enumerate(log_p):
            if v == iq:
                continue
            total = total + (-(teacher_probs[iq] * lp).sum(-1)).mean()
            pairs += 1
    return total / pairs


def uniform_negative_loss(student: list[Tensor], student_temp: float, reduction: str = "mean") -> Tensor:
    """Eq. 4: -(1/K) sum_k log p_s^k per negative view (cross-entropy to the uniform; >= log K), batch-mean."""
    per_view = torch.stack([(-F.log_softmax(s.float() / student_temp, dim=-1).mean(-1)).mean() for s in student])
    return per_view.mean() if reduction == "mean" else per_view.sum()


def collapse_monitors(teacher_probs: Tensor) -> dict[str, Tensor]:
    """Mean entropy of p_t (-> log K: uniform collapse), entropy of mean p_t (-> 0: one-class collapse),
    and the soft-classes whose mean probability exceeds 1/K (I Sec. 5, Fig. 2)."""
    p = teacher_probs.reshape(-1, teacher_probs.shape[-1]).float()
    k = p.shape[-1]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    mean = p.mean(0)
    mean_entropy = -(mean * mean.clamp_min(1e-12).log()).sum()
    return {"teacher_entropy": entropy.detach(), "teacher_mean_entropy": mean_entropy.detach(),
            "occupied_classes": (mean > 1.0 / k).sum().float()}


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that first clips each parameter's gradient norm to ``clip_grad`` (DINO's ``clip_gradients``).

    The platform runs backward and ``step``; clipping inside ``step`` keeps it within the method.
    """

    def __init__(self, params, clip_grad: float = 0.0, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.clip_grad = clip_grad

    @torch.no_grad()
    def step(self, closure=None):
        if self.clip_grad > 0:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        norm = p.grad.norm()
                        if norm > self.clip_grad:
                            p.grad.mul_(self.clip_grad / (norm + 1e-6))
        return super().step(closure)


class DinoSchedules(torch.optim.lr_scheduler.LambdaLR):
    """Per-epoch LR (warm-up + cosine), cosine weight decay, and the ``epoch`` the EMA and tau_t read."""

    def __init__(self, optimizer: torch.optim.Optimizer, method: DinoNegatives) -> None:
        self._method = method
        super().__init__(optimizer, method.lr_factor)

    def step(self, epoch: int | None = None) -> None:  # noqa: D102
        super().step()
        for group in self.optimizer.param_groups:
            if group.get("apply_decay", False):
                group["weight_decay"] = self._method.weight_decay_at(self.last_epoch)
        self._method.epoch.fill_(self.last_epoch)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("_method", None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._method.epoch.fill_(self.last_epoch)  # a resumed run continues the EMA / tau_t schedules
