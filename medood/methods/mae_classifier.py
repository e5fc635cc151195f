"""MAE + anomaly classifier on pseudo-abnormal reconstructions (seed 001).

Paper: M.-I. Georgescu, "Masked Autoencoders for Unsupervised Anomaly Detection in Medical Images",
KES 2023 (Procedia Computer Science). Code released by the author:
github.com/lilygeorgescu/MAE-medical-anomaly-detection.

Two stages, both on normal images only:

1. ``mae``: a masked autoencoder (Sec. 3.2, ``components/mae.py``)::

       P = P~ + pos,  V = mask(P, alpha),  E = encoder(V),  Z = Z_bar + pos_d,  P^ = decoder(Z)
       L(X~, P^) = 1 / (alpha n) * sum_{i in M} ||x~_i - p^_i||^2                       (Eq. 1)

   The reconstruction ``X^`` keeps the original visible patches and averages ``n_reconstructions``
   passes with different random masks (Sec. 4.3).
2. ``classifier``: the MAE frozen; each normal image ``X`` gives a negative ``X^`` and a positive
   ``X^'`` = the pseudo-abnormal module applied to ``X^`` (``k ~ U[k1, k2]`` boxes, each multiplied
   by one ``beta ~ U(0, 1)``; Sec. 3.3, ``components/pseudo_abnormal.py``). A ViT classifies
   ``X.. = |X^ - X|`` (or ``|X^' - X|``) with the cross-entropy (Sec. 3.4)::

       L(y, y^) = -[y log y^ + (1 - y) log(1 - y^)]                                   (Eq. 2)

   written as the two-class softmax cross-entropy, ``y^`` = the softmax probability of class 1.

Anomaly score (Sec. 3.4): the classifier's probability of "abnormal" for ``|X^ - X|``. Table 2a's
MAE-only scores are ``score = mse | mae | ssim`` (1 - SSIM, MONAI's SSIM); then the classifier is not
trained. The map is ``|X - X^|`` averaged over channels. Ablation switches: ``mask_ratio = 0``
(autoencoder, Fig. 5), ``loss_on_all_tokens`` (Sec. 4.5), ``classifier_input`` (Table 2b),
``k_range`` (Table 2c), ``beta_per_pixel`` (Sec. 4.5).

Scoring is deterministic: masks come from a generator seeded with ``config.seed`` and are shared by
the whole batch, so an image's score depends neither on the call nor on the rest of its batch.
Validation is side-effect free: in eval mode ``training_step`` draws its masks and pseudo-abnormal
boxes from a generator made for the call (seeded with ``config.seed``), never from torch's global
RNG, and the pseudo-abnormal module is a new instance per step, so no sampler is shared.

Presets: ``paper`` (Sec. 4.3), ``tiny`` (unit tests), ``brain-slices`` (64 x 64 slices of 64^3
volumes on a CPU in a few minutes; see ``benchmarks/mae_experiment.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from torch import Tensor, nn

from medood.methods.base import AnomalyMethod, BaseConfig, Batch, Scores, Stage, register
from medood.methods.components.mae import MaskedAutoencoder, masked_token_count
from medood.methods.components.pseudo_abnormal import PseudoAbnormalBoxes, pseudo_abnormal_boxes
from medood.methods.components.reconstruction_scores import RECONSTRUCTION_SCORES, reconstruction_scores

CLASSIFIER_INPUTS = ("abs_diff", "l2_diff", "reconstruction")
SCORES = ("classifier", *RECONSTRUCTION_SCORES)


@dataclass
class Config(BaseConfig):
    """Defaults are the paper's BRATS2020 setting (Sec. 4.3) where it gives one; see each comment."""

    spatial_dims: int = 2
    image_size: int = 224  # Sec. 4.3: 224 x 224 x 1 (BRATS2020); 64 x 64 x 1 for LUNA16
    in_channels: int = 1
    # Not in the paper: the author's released MAE command for BRATS2020 uses 128 (main_pretrain.py);
    # the classifier stage sees 2 * batch_size images per step (negatives + pseudo-abnormal).
    batch_size: int = 128

    # MAE (Sec. 3.2, 4.3): ViT-Base encoder, patch 16 (ViT-B/16 [11]), decoder 512-d, 8 blocks, 16 heads.
    patch_size: int = 16
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75  # alpha, Sec. 4.3 and Fig. 5
    loss_on_all_tokens: bool = False  # Eq. (1) on masked tokens only; True = Sec. 4.5 ablation
    n_reconstructions: int = 4  # Sec. 4.3: "pass it through the MAE framework 4 times and average"
    mae_epochs: int = 1600  # Sec. 4.3 and Fig. 5
    mae_warmup_epochs: int = 40  # the official MAE code's default warm-up
    # The paper only says it trains with the official MAE code [13]. Its optimizer: AdamW,
    # betas (0.9, 0.95), weight decay 0.05, lr = base lr 1.5e-4 * batch / 256 = 7.5e-5 at batch 128
    # (the author's command), with MAE's schedule: linear warm-up for `mae_warmup_epochs` (40), then
    # cosine decay to 0 over the remaining MAE epochs (per epoch, see configure_schedulers).
    mae_lr: float = 7.5e-5
    mae_weight_decay: float = 0.05
    mae_betas: tuple[float, float] = (0.9, 0.95)

    # Anomaly classifier (Sec. 3.4, 4.3): ViT-Base/16, AdamW lr 1e-3, weight decay 0.05, 100 epochs.
    classifier_patch_size: int = 16
    classifier_dim: int = 768
    classifier_depth: int = 12
    classifier_heads: int = 12
    classifier_epochs: int = 100
    classifier_lr: float = 1e-3
    classifier_weight_decay: float = 0.05
    classifier_input: str = "abs_diff"  # Table 2b: abs_diff (L1) | l2_diff | reconstruction

    # Pseudo-abnormal module (Sec. 3.3, 4.3): k ~ U[1, 10]; sides 10-40 px at 224 (5-12 px at 64).
    k_range: tuple[int, int] = (1, 10)
    box_size_range: tuple[int, int] = (10, 40)
    beta_per_pixel: bool = False  # one beta per box; True = Sec. 4.5 ablation
    # Not in the paper (0 = off): redraw a positive's boxes until they change X^ by at least this
    # much in total (sum of |X^' - X^|), so that no positive equals its negative (a box on the
    # background, or beta close to 1, changes nothing); see components/pseudo_abnormal.py.
    pseudo_min_change: float = 0.0

    score: str = "classifier"  # classifier (Sec. 3.4) | mse | mae | ssim (Table 2a)

    def validate(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; known: {', '.join(SCORES)}")
        if self.classifier_input not in CLASSIFIER_INPUTS:
            raise ValueError(
                f"unknown classifier_input {self.classifier_input!r}; known: {', '.join(CLASSIFIER_INPUTS)}"
            )
        for name in ("patch_size", "classifier_patch_size"):
            if self.image_size % getattr(self, name):
                raise ValueError(
                    f"image_size {self.image_size} must be divisible by {name} {getattr(self, name)}"
                )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        # The sin-cos positional embeddings split the width over 2 * spatial_dims sin/cos parts.
        sincos = 4 if self.spatial_dims == 2 else 6
        for dim, heads, what in (
            (self.encoder_dim, self.encoder_heads, "encoder"),
            (self.decoder_dim, self.decoder_heads, "decoder"),
            (self.classifier_dim, self.classifier_heads, "classifier"),
        ):
            if dim % heads:
                raise ValueError(f"{what}_dim {dim} must be divisible by {what}_heads {heads}")
            if what != "classifier" and dim % sincos:
                raise ValueError(
                    f"{what}_dim {dim} must be divisible by {sincos} for {self.spatial_dims}D sin-cos positions"
                )
        if self.n_reconstructions < 1:
            raise ValueError(f"n_reconstructions must be >= 1, got {self.n_reconstructions}")
        k1, k2 = self.k_range
        if not 0 <= k1 <= k2:
            raise ValueError(f"k_range must be (k1, k2) with 0 <= k1 <= k2, got {self.k_range}")
        s1, s2 = self.box_size_range
        if not 1 <= s1 <= s2:
            raise ValueError(f"box_size_range must be (s1, s2) with 1 <= s1 <= s2, got {self.box_size_range}")
        if self.pseudo_min_change < 0:
            raise ValueError(f"pseudo_min_change must be >= 0, got {self.pseudo_min_change}")


class AnomalyClassifier(nn.Module):
    """The anomaly classifier (Sec. 3.4): MONAI's ViT, then a two-way linear head on the mean token.

    The paper says only "ViT"; the author's released fine-tuning code pools by averaging the patch
    tokens (``global_pool``, its default) rather than reading a class token, and so does this head.
    """

    def __init__(
        self,
        spatial_dims: int,
        image_size: int,
        in_channels: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.vit = ViT(
            in_channels=in_channels,
            img_size=image_size,
            patch_size=patch_size,
            hidden_size=dim,
            mlp_dim=int(dim * mlp_ratio),
            num_layers=depth,
            num_heads=heads,
            spatial_dims=spatial_dims,
            qkv_bias=True,
        )
        self.head = nn.Linear(dim, 2)
        # As the released fine-tuning code: a near-zero head starts every sample at p = 1/2.
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, 2) of (normal, abnormal)."""
        tokens, _ = self.vit(x)  # (B, n, dim), after the ViT's final LayerNorm
        return self.head(tokens.mean(dim=1))


@register("mae_classifier")
class MAEClassifier(AnomalyMethod):
    """Masked autoencoder, then a ViT anomaly classifier on ``|X^ - X|`` (Georgescu, KES 2023)."""

    Config = Config
    presets = {
        "paper": {},
        # The LUNA16 setting of Sec. 4.3 (64 x 64 input, 5-12 px boxes) with a small ViT that trains
        # in minutes on a CPU.
        "tiny": {
            "image_size": 64,
            "batch_size": 16,
            "patch_size": 8,
            "encoder_dim": 64,
            "encoder_depth": 2,
            "encoder_heads": 4,
            "decoder_dim": 32,
            "decoder_depth": 1,
            "decoder_heads": 4,
            "mae_epochs": 20,
            "mae_warmup_epochs": 2,
            "mae_lr": 1e-3,
            "classifier_patch_size": 8,
            "classifier_dim": 64,
            "classifier_depth": 2,
            "classifier_heads": 4,
            "classifier_epochs": 5,
            # A small ViT from scratch, without warm-up, learns more steadily here than at 1e-3.
            "classifier_lr": 3e-4,
            "box_size_range": (5, 12),
        },
    }
    # 2D slices of 64^3 volumes (synthetic-brain, slice_axis 2) on a CPU: the tiny networks, trained
    # long enough for the MAE to learn the anatomy. At 15 MAE epochs its reconstructions are still
    # blurry (masked-token loss 0.021; 0.015 at 60) and the classifier only ranks slices at about
    # 0.76 AUROC; Fig. 5 of the paper also shows the detection improving with MAE epochs.
    # About 2 minutes for the MAE and 2 for the classifier on one core with 60 training volumes
    # (~1900 slices); benchmarks/mae_experiment.py has the figures.
    presets["brain-slices"] = {
        **presets["tiny"],
        "mae_epochs": 60,
        "mae_warmup_epochs": 5,
        "classifier_epochs": 10,
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        self.mae = MaskedAutoencoder(
            spatial_dims=c.spatial_dims,
            image_size=c.image_size,
            in_channels=c.in_channels,
            patch_size=c.patch_size,
            encoder_dim=c.encoder_dim,
            encoder_depth=c.encoder_depth,
            encoder_heads=c.encoder_heads,
            decoder_dim=c.decoder_dim,
            decoder_depth=c.decoder_depth,
            decoder_heads=c.decoder_heads,
            mlp_ratio=c.mlp_ratio,
        )
        self.classifier = AnomalyClassifier(
            spatial_dims=c.spatial_dims,
            image_size=c.image_size,
            in_channels=c.in_channels,
            patch_size=c.classifier_patch_size,
            dim=c.classifier_dim,
            depth=c.classifier_depth,
            heads=c.classifier_heads,
            mlp_ratio=c.mlp_ratio,
        )
        # Fixed sin-cos positional embeddings stay frozen whatever stage is trained.
        self._fixed_parameters = {id(p) for p in self.parameters() if not p.requires_grad}

    # -- training ---------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        stages = [Stage("mae", self.config.mae_epochs)]
        if self.config.score == "classifier":
            # Table 2a's MAE-only scores remove the classifier: no need to train it.
            stages.append(Stage("classifier", self.config.classifier_epochs))
        return stages

    def configure_schedulers(
        self, stage: str, optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """MAE stage: linear warm-up then half-cosine decay (the official MAE recipe), stepped per epoch."""
        if stage != "mae":
            return {}
        warmup, total = self.config.mae_warmup_epochs, max(1, self.config.mae_epochs)

        def factor(epoch: int) -> float:
            if epoch < warmup:
                return (epoch + 1) / warmup
            progress = (epoch - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        return {"main": torch.optim.lr_scheduler.LambdaLR(optimizers["main"], factor)}

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        # Only the stage's network is trainable (the MAE is frozen while the classifier trains), so
        # gradient synchronisation never waits for parameters the stage does not use.
        if stage == "mae":
            self._set_trainable(mae=True, classifier=False)
            return {
                "main": torch.optim.AdamW(
                    _decay_groups(self.mae, c.mae_weight_decay), lr=c.mae_lr, betas=c.mae_betas
                )
            }
        if stage == "classifier":
            self._set_trainable(mae=False, classifier=True)
            groups = _decay_groups(self.classifier, c.classifier_weight_decay)
            return {"main": torch.optim.AdamW(groups, lr=c.classifier_lr)}
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(s.name for s in self.stages())}")

    def training_step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        """Eq. (1) (stage ``mae``) or Eq. (2) (stage ``classifier``).

        In training mode the masks and the pseudo-abnormal boxes are drawn from torch's global RNG
        (``torch.manual_seed`` fixes a step). In eval mode (``not self.training``: the platform's
        ``val_loss``) they come from generators seeded with ``config.seed`` and made for the call,
        so a validation loss is a deterministic function of the weights and the batch, and
        computing it changes no state: no buffer, no sampler, not even torch's global RNG.
        """
        image = batch["image"]
        generator = None if self.training else torch.Generator().manual_seed(self.config.seed)
        if stage == "mae":
            out = self.mae(
                image, self.config.mask_ratio, generator=generator, shared_mask=generator is not None
            )
            return {"loss": self.mae.loss(out, on_all_tokens=self.config.loss_on_all_tokens)}
        if stage == "classifier":
            with torch.no_grad():
                reconstruction = self.reconstruct(image, generator=generator)
                # Sec. 3.3: one positive X^' per negative X^, from the same reconstruction.
                if generator is None:
                    box_seed = int(torch.randint(2**31 - 1, ()).item())
                else:
                    box_seed = int(torch.randint(2**31 - 1, (), generator=generator).item())
                pseudo_abnormal = pseudo_abnormal_boxes(
                    reconstruction, self.pseudo_abnormal_transform(box_seed)
                )
                inputs = torch.cat(
                    [
                        self.classifier_input(image, reconstruction),
                        self.classifier_input(image, pseudo_abnormal),
                    ]
                )
            labels = torch.cat(
                [torch.zeros(len(image), dtype=torch.long), torch.ones(len(image), dtype=torch.long)]
            ).to(image.device)
            logits = self.classifier(inputs)
            loss = F.cross_entropy(logits, labels)  # Eq. (2)
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
            return {"loss": loss, "accuracy": accuracy.detach()}
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(s.name for s in self.stages())}")

    def pseudo_abnormal_transform(self, seed: int) -> PseudoAbnormalBoxes:
        """A new pseudo-abnormal module (Sec. 3.3) with its own random state: never shared between calls."""
        c = self.config
        return PseudoAbnormalBoxes(
            c.k_range, c.box_size_range, c.beta_per_pixel, seed=seed, min_change=c.pseudo_min_change
        )

    # -- scoring ----------------------------------------------------------------------------

    def reconstruct(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """X^ (Sec. 4.3): ``n_reconstructions`` masked passes averaged.

        The visible patches are pasted back only when the loss was on the masked tokens only: the
        Sec. 4.5 ablation trains on all tokens "and used the reconstructed tokens instead of the
        original tokens", and with no masked token (``alpha = 0``, Fig. 5's autoencoder) pasting
        would return the input itself.
        """
        c = self.config
        paste = not c.loss_on_all_tokens and masked_token_count(self.mae.n_tokens, c.mask_ratio) > 0
        return self.mae.reconstruct(
            image,
            c.mask_ratio,
            n_passes=c.n_reconstructions,
            paste_visible=paste,
            generator=generator,
            shared_mask=generator is not None,
        )

    def classifier_input(self, image: Tensor, reconstruction: Tensor) -> Tensor:
        """X.. (Sec. 3.4, Table 2b): |X^ - X|, (X^ - X)^2, or X^ itself."""
        kind = self.config.classifier_input
        if kind == "abs_diff":
            return (reconstruction - image).abs()
        if kind == "l2_diff":
            # Per pixel, the Euclidean distance of one channel equals the absolute difference, so
            # Table 2b's "L2" (a different AUROC than L1) is read as the squared difference.
            return (reconstruction - image).pow(2)
        return reconstruction

    @torch.no_grad()
    def score(self, batch: Batch) -> Scores:
        image = batch["image"]
        # A fixed seed per call: the same image gets the same masks, hence the same score, in
        # evaluation and in serving.
        generator = torch.Generator().manual_seed(self.config.seed)
        reconstruction = self.reconstruct(image, generator=generator)
        error_map = (image - reconstruction).abs().mean(dim=1, keepdim=True)
        if self.config.score == "classifier":
            logits = self.classifier(self.classifier_input(image, reconstruction))
            sample = logits.softmax(dim=1)[:, 1]
        else:
            sample, _ = reconstruction_scores(image, reconstruction, self.config.score)
        return Scores(sample=sample, map=error_map)

    # -- helpers ----------------------------------------------------------------------------

    def _set_trainable(self, mae: bool, classifier: bool) -> None:
        for module, flag in ((self.mae, mae), (self.classifier, classifier)):
            for p in module.parameters():
                if id(p) not in self._fixed_parameters:
                    p.requires_grad_(flag)


def _decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in the official MAE / timm code: no weight decay on biases and norm scales."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
