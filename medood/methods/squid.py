"""SQUID: space-aware memory queues for in-painting and detecting anomalies in radiography images.

Thesis: T. Xiang, "Deep Feature In-painting for Unsupervised Anomaly Detection in Radiography Images",
Honours thesis, The University of Sydney, 2022 (also: Xiang et al., "Feature-level In-painting ..." / "In-
painting Radiography Images for Unsupervised Anomaly Detection", ECCV 2022; code: github.com/tiangexiang/
SQUID). Section numbers below are the thesis'; "appendix A" is /work/shared/notes/squid-thesis-003.md,
which resolves the thesis' gaps against the public code.

The image is cut into ``grid x grid`` patches, each encoded separately (E, Table 3.1). The student
generator G_s reconstructs from in-painted features, the teacher G_t from the raw ones; a discriminator
D judges the student's reconstructions. Implemented equations:

    N_ij = sum_k G(w^k) M_ij^k,  w^k = F_ij . M_ij^k                           (3.1)  components/memory.py
    G(w) = sg(hs(w, topk(w)) - phi(w)) + phi(w)                                 (3.2)  components/memory.py
    F' = (1 - delta) F + delta inpaint(F),  delta ~ Bernoulli(rho)  (training)  (3.3)  components/inpainting.py
    F' = inpaint(F)                                                 (inference) (3.4)
    A = phi((D(G_s(E(I))) - mu) / sigma)                                        (3.5)  score, fit_reference
    L_t = (I - G_t(E(I)))^2,  L_s = (I - G_s(E(I)))^2                            (3.6), (3.7)
    L_dist = sum_{i=1..l} (F_t^i - F_s^i)^2                                      (3.8)
    L_gen = log(1 - D(G_s(E(I))))                                                (3.9)
    L_dis = log D(I) + log(1 - D(G_s(E(I))))                                     (3.10)
    min over E, G_t, G_s: lambda_t L_t + lambda_s L_s + lambda_dist L_dist + lambda_gen L_gen   (3.11)
    max over D: lambda_dis L_dis                                                 (3.12)
    soft shortcut F' = (1 - rho) F + rho inpaint(F)                               (4.5)  ablation

Training (§4.1.5): one stage, optimizer ``main`` (encoder, in-painting block, both generators) returns
``loss`` every ``generator_period``-th iteration (2), optimizer ``discriminator`` returns
``loss_discriminator`` every iteration, on detached reconstructions. The memory queue copies the
encoder's (bottleneck) tokens once per generator step and is never written elsewhere.

Validation: in eval mode (``not self.training``; the platform computes val_loss under ``model.eval()``
and ``torch.no_grad()``) ``training_step`` is a pure function of the batch: it always returns the
generator loss (and the discriminator's), writes no queue, advances no counter and draws no random mask.

Scores (``Config.score``):

- ``discriminator``, Eq. 3.5: the discriminator's logit on the student's reconstruction, standardised by
  the mean and standard deviation of the same logit on normal training images (``fit_reference``),
  through a sigmoid, and flipped so that higher = more anomalous: ``A = sigmoid((mu - D) / sigma)`` (D
  says "real" for normal images; the authors' code computes ``1 - sigmoid((D - mu) / sigma)``, appendix A).
- ``reconstruction``: the mean squared error of the student's reconstruction, i.e. the mean of the map.
  The student in-paints every patch from the memory of normal patches, so its error is what the
  discriminator is meant to see; on DigitAnatomy it detects, where D's logit ranks ink and blur (issue 9).
- ``region`` (not the thesis'): the student's mean squared error in each grid region, standardised by that
  region's mean and standard deviation on the normal training images (``fit_reference``, as Eq. 3.5
  standardises by training statistics), maximised over the regions, so that an anomaly in one of nine
  cells is not averaged with eight normal ones. The ``digitanatomy-cpu`` preset's score.

The thesis gives no pixel map (§5.1); ``map`` is the student's squared reconstruction error, the "naive
extension" of §5.2, whatever the score.

Choices where the thesis is silent or ambiguous (each also commented where it is made):

- Gumbel shrinkage forward = softmax over the top-k similarities (§3.3.2; code, appendix A).
- Queue: written once per generator step, with the tokens of that step's forward pass ("for each data
  batch ... only once at each training step", §3.2.3, a step being an update of the network that holds
  the queue; the authors' code calls ``MemoryQueue.update()`` right after the generator's
  ``opt.step()`` and never on discriminator-only iterations, appendix A); items are the bottleneck tokens
  (what is queried); reads ignore slots not yet filled (the thesis does not say how an unfilled queue is
  read).
- Addressing (``addressing``): the thesis' dot product (§3.2.2) or, by default, the cosine similarity
  over a temperature (components/memory.py): with the dot product one large-norm item wins every query
  and the student outputs the mean image (issue 9); ``addressing="dot"`` is the faithful model.
- In-painting block: 1x1 bottleneck 1/4, 8 heads, FFN width D/4, residual on N_ij (code, appendix A);
  missing neighbours are zero tokens masked out of the attention (§3.4.2 leaves borders open).
- Generators: Table 3.2's widths and resolutions; skips and learnable memories ("S&M") at the two levels
  above the deepest, the skip being the encoder's next-finer level, as in the authors' code (appendix A):
  Table 3.2's literal level-4 skip would be the un-in-painted bottleneck, which Eq. 3.4 keeps from the
  student at inference (see ``Generator``). Patches merged after the last memory (§3.7). The teacher
  has the same skips, detached with its input under stop-gradient (code). The student's memories have a
  masked shortcut with the same rho (code). Output: transposed convolution + sigmoid.
- L_gen is the non-saturating form -log D(G_s(E(I))) (DCGAN [57]; the authors' code); losses are means;
  L_dist sums per-level means and does not detach the teacher (code).
- Adam with betas (0.5, 0.999) (DCGAN [57]; code); the thesis' weight decay for E and the generators,
  none for D (code; with lambda_dis = 0.005 the decay would outweigh a confident D's gradient).
  Both learning rates follow cosine annealing over ``epochs`` down to ``lr_min_ratio`` times their
  initial value: §4.1.5 decays 1e-4 to 2e-5, a ratio of 0.2, kept whatever the learning rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import Tensor, nn

from medood.methods.base import AnomalyMethod, BaseConfig, Batch, Scores, Stage, register
from medood.methods.components.inpainting import (
    AGGREGATORS,
    MEMORIES,
    SHORTCUTS,
    InpaintingBlock,
    masked_shortcut,
)
from medood.methods.components.memory import ADDRESSINGS, SHRINKAGES, SpaceAwareMemoryMatrix
from medood.methods.components.reconstruction_scores import reconstruction_scores

INPAINTING_LEVELS = ("feature", "pixel")
SCORES = ("reconstruction", "discriminator", "region")
LEAKY_RELU = ("leakyrelu", {"negative_slope": 0.2})


@dataclass
class Config(BaseConfig):
    """Defaults are the thesis' ZhangLab setting (§3.7, §4.1.5), used for all its datasets."""

    spatial_dims: int = 2
    image_size: int = 128  # §4.1.5: all images resized to 128 x 128
    in_channels: int = 1
    batch_size: int = 16  # §4.1.5
    epochs: int = 1000  # §4.1.5 (the authors' zhang_best config runs 200)
    grid: int = 2  # §3.7, §4.4: 2 x 2 patches of 64 x 64
    channels: tuple[int, ...] = (32, 64, 128, 256)  # Tables 3.1-3.2, one stride-2 level each
    discriminator_channels: tuple[int, ...] = (16, 32, 64, 128, 128)  # Table 3.3
    memory_size: int = 200  # §4.4, Fig. 4.6: items per memory-queue region
    memory_matrix_size: int = 200  # not in the thesis; the authors' mem_num_slots (appendix A)
    top_k: int = 5  # §4.1.5: Gumbel shrinkage keeps the 5 most similar items
    # How queries address memory items (both the queue and the student's matrices). "dot" is the thesis'
    # w^k = F . M^k (§3.2.2); the default "cosine" (cos / memory_temperature; items of the learnable
    # matrices initialised at feature scale) is our choice: with "dot", one item wins every query and the
    # student reconstructs the mean training image for every input (issue 9; tests/test_squid.py).
    addressing: str = "cosine"
    memory_temperature: float = 0.1  # addressing="cosine" only: cosines in [-1, 1] -> logits in [-10, 10]
    shrink_threshold: float = 0.0025  # shrinkage="hard" only: MemAE-style threshold (authors' code)
    shortcut_probability: float = 0.95  # §4.1.5: rho of the masked shortcut
    inpaint_bottleneck: int = 4  # channel reduction of the 1x1 convolutions (code; §3.4.2 gives none)
    inpaint_heads: int = 8  # attention heads (code)
    lambda_t: float = 0.01  # §4.1.5 loss weights
    lambda_s: float = 10.0
    lambda_dist: float = 0.001
    lambda_gen: float = 0.005
    lambda_dis: float = 0.005
    lr: float = 1e-4  # §4.1.5, generator and discriminator
    lr_discriminator: float = 1e-4
    lr_min_ratio: float = 0.2  # §4.1.5: cosine annealing from 1e-4 "eventually decayed to 2e-5" (x 0.2)
    weight_decay: float = 1e-5  # §4.1.5, encoder and generators
    # §4.1.5 names one weight decay for "our network"; the authors' code gives D none (appendix A). With
    # lambda_dis = 0.005 a confident D's gradient is ~1e-6, below 1e-5 * w, so decay would wipe D out.
    weight_decay_discriminator: float = 0.0
    adam_betas: tuple[float, float] = (0.5, 0.999)  # DCGAN [57] / the authors' code
    generator_period: int = 2  # §4.1.5: generators every second iteration, D every iteration
    pixel_mask_probability: float = 0.25  # inpainting_level="pixel" only (§4.5)
    # Ablation switches (Tables 4.4, 4.5 and §4.4's text); the defaults are full SQUID.
    memory: str = "queue"  # "matrix": learnable memory instead of the queue (§4.4); "none": no memory
    space_aware: bool = True  # False: one memory region shared by all cells ("w/o Space-aware Memory")
    inpainting: bool = True  # False: the student decodes E(I) directly ("w/o In-painting Block")
    inpainting_level: str = "feature"  # "pixel": zero 25% of input blocks instead (Table 4.5)
    aggregator: str = "transformer"  # "conv": convolution instead of the Transformer layer (Table 4.5)
    shortcut: str = "masked"  # "soft": Eq. 4.5 (Table 4.5); "none": no shortcut
    shrinkage: str = "gumbel"  # "hard": fixed-threshold MemAE shrinkage; "none": plain softmax (Table 4.4)
    teacher: bool = True  # False: no teacher, no L_t, no L_dist ("w/o Knowledge Distillation")
    stop_gradient: bool = True  # False: the teacher's gradient reaches the encoder ("w/o Stop Gradient")
    skip_connections: bool = True  # "w/o Skip Connection"
    hierarchical_memory: bool = True  # "w/o Hierarchical Memory": no learnable memories in the student
    # The sample score: "discriminator" is Eq. 3.5; "reconstruction" the student's mean squared error (the
    # mean of the map). Default "reconstruction": on DigitAnatomy (digitanatomy preset, 3 seeds,
    # benchmarks/squid_experiment.py) it gave AUROC 0.55-0.61 where Eq. 3.5 stayed at chance (0.50-0.53);
    # the discriminator only ever sees normal images and their reconstructions, so its logit ranks how
    # sharp a reconstruction is, not what it shows (issue 9). "region" (our choice, not the thesis'): each
    # grid region's mean squared error standardised by that region's mean and standard deviation on the
    # normal training images (fit_reference; Eq. 3.5's normalisation by training statistics, applied per
    # space-aware region), and the largest over the regions: a one-cell anomaly is not diluted by the other
    # cells' error. With grid 1 it ranks as "reconstruction" does.
    score: str = "reconstruction"

    def validate(self) -> None:
        if self.spatial_dims != 2:
            raise ValueError(f"squid is a 2D method (thesis §3.7); spatial_dims must be 2, got {self.spatial_dims}")
        for name, value, known in (
            ("memory", self.memory, MEMORIES),
            ("inpainting_level", self.inpainting_level, INPAINTING_LEVELS),
            ("aggregator", self.aggregator, AGGREGATORS),
            ("shortcut", self.shortcut, SHORTCUTS),
            ("shrinkage", self.shrinkage, SHRINKAGES),
            ("addressing", self.addressing, ADDRESSINGS),
            ("score", self.score, SCORES),
        ):
            if value not in known:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
        if self.grid < 1 or self.image_size % self.grid:
            raise ValueError(f"grid {self.grid} must be >= 1 and divide image_size {self.image_size}")
        if len(self.channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {self.channels}")
        patch, depth = self.image_size // self.grid, 2 ** len(self.channels)
        if patch % depth:
            raise ValueError(
                f"the patch size {patch} (image_size / grid) must be divisible by 2**len(channels) = {depth}"
            )
        if self.image_size % 2 ** len(self.discriminator_channels):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**len(discriminator_channels) = "
                f"{2 ** len(self.discriminator_channels)}"
            )
        if self.channels[-1] % self.inpaint_bottleneck:
            raise ValueError(f"inpaint_bottleneck {self.inpaint_bottleneck} must divide channels[-1] {self.channels[-1]}")
        token = self.channels[-1] // self.inpaint_bottleneck * (patch // depth) ** 2
        if token % self.inpaint_heads or token < 4:
            raise ValueError(f"inpaint_heads {self.inpaint_heads} must divide the token size {token} (>= 4)")
        for name in ("memory_size", "memory_matrix_size", "top_k", "generator_period", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.shortcut_probability <= 1.0:
            raise ValueError(f"shortcut_probability must be in [0, 1], got {self.shortcut_probability}")
        if self.memory_temperature <= 0:
            raise ValueError(f"memory_temperature must be > 0, got {self.memory_temperature}")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if not 0.0 <= self.pixel_mask_probability < 1.0:
            raise ValueError(f"pixel_mask_probability must be in [0, 1), got {self.pixel_mask_probability}")


@register("squid")
class Squid(AnomalyMethod):
    Config = Config
    presets = {
        "paper": {},
        # CPU tests and the demo (not the thesis): 64 x 64 input, a quarter of the channels, 32-item
        # memories, and a 10x learning rate so that a few epochs already reconstruct.
        "tiny": {
            "image_size": 64, "batch_size": 16, "epochs": 10, "channels": (8, 16, 32, 64),
            "discriminator_channels": (8, 16, 32, 64, 64), "memory_size": 32, "memory_matrix_size": 32,
            "inpaint_heads": 4, "lr": 1e-3, "lr_discriminator": 1e-3,
        },
        # The authors' DigitAnatomy setting (configs/digit_best.py, appendix A): a 3 x 3 grid matching the
        # 3 x 3 anatomy, 96 px (32 px patches), three encoder levels, 200 items per region, n_critic 1 and a
        # student weight of 1. Sized for CPU (not the authors'): a quarter of their channels (8-16-32 instead
        # of 32-64-128), a lighter discriminator and a 10x learning rate, so that ~10 epochs of ~320 images
        # train in a few minutes on one core.
        "digitanatomy": {
            "image_size": 96, "grid": 3, "batch_size": 16, "epochs": 10, "channels": (8, 16, 32),
            "discriminator_channels": (8, 16, 32, 32, 32), "memory_size": 200, "memory_matrix_size": 200,
            "inpaint_heads": 4, "generator_period": 1, "lambda_s": 1.0, "lr": 1e-3, "lr_discriminator": 1e-3,
        },
        # The digitanatomy preset for the CPU budget (~200 iterations, where the authors train ~20,000):
        # without the student's learnable memories and skips (Table 4.4's "w/o Hierarchical Memory" and
        # "w/o Skip Connection" ablations), scored per region. Measured (benchmarks/squid_experiment.py,
        # seed 0, 10 epochs of 320 images): with them, the learnable memories (5.5M of the 5.8M parameters,
        # items initialised at random) have not learned in 200 steps and the student reconstructs nothing
        # (per-cell MSE 0.13 vs the autoencoder's 0.017, AUROC 0.58); without the memories but with the
        # skips, the skips copy the input, anomalies included (swapping skips between an abnormal image
        # and its normal original moves the reconstruction with the skips; AUROC 0.52); without both,
        # the student decodes only the in-painted bottleneck (memory queue + Transformer) and its error
        # is highest in the anomalous cells (AUROC 0.76; 0.85 with the per-region score). Seeds 1-5, same
        # budget, 200 + 200 test images: region score 0.816 (95% t-interval 0.736-0.896), its whole-image
        # error 0.722, Eq. 3.5 0.525; the autoencoder 0.544; grid 1 0.656; the pixel floor 0.747.
        "digitanatomy-cpu": {
            "image_size": 96, "grid": 3, "batch_size": 16, "epochs": 10, "channels": (8, 16, 32),
            "discriminator_channels": (8, 16, 32, 32, 32), "memory_size": 200, "memory_matrix_size": 200,
            "inpaint_heads": 4, "generator_period": 1, "lambda_s": 1.0, "lr": 1e-3, "lr_discriminator": 1e-3,
            "hierarchical_memory": False, "skip_connections": False, "score": "region",
        },
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        patch = c.image_size // c.grid
        sizes = [patch // 2 ** (level + 1) for level in range(len(c.channels))]  # per-patch map size per level
        memory = dict(
            regions=c.grid * c.grid if c.space_aware else 1,
            shrinkage=c.shrinkage,
            top_k=c.top_k,
            threshold=c.shrink_threshold,
            addressing=c.addressing,
            temperature=c.memory_temperature,
        )
        self.encoder = PatchEncoder(c.in_channels, c.channels)
        self.inpainting = (
            InpaintingBlock(
                channels=c.channels[-1], grid=c.grid, feature_size=sizes[-1], bottleneck=c.inpaint_bottleneck,
                heads=c.inpaint_heads, memory=c.memory, memory_size=c.memory_size, space_aware=c.space_aware,
                shrinkage=c.shrinkage, top_k=c.top_k, shrink_threshold=c.shrink_threshold,
                addressing=c.addressing, temperature=c.memory_temperature, aggregator=c.aggregator, shortcut=c.shortcut, shortcut_probability=c.shortcut_probability,
            )
            if c.inpainting and c.inpainting_level == "feature"
            else None
        )
        student_memory = {**memory, "size": c.memory_matrix_size} if c.hierarchical_memory else None
        self.student = Generator(
            c.in_channels, c.channels, sizes, c.grid, c.skip_connections, student_memory, c.space_aware,
            c.shortcut_probability,
        )
        self.teacher = (
            Generator(c.in_channels, c.channels, sizes, c.grid, c.skip_connections, None, c.space_aware, 1.0)
            if c.teacher
            else None
        )
        self.discriminator = Discriminator(c.in_channels, c.discriminator_channels, c.image_size)
        # Eq. 3.5's mu and sigma (fit_reference); in the state dict so a checkpoint scores alone.
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))
        # score="region": each grid region's reconstruction error's mean and spread on normal training images.
        self.register_buffer("region_mean", torch.zeros(c.grid * c.grid))
        self.register_buffer("region_std", torch.ones(c.grid * c.grid))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long), persistent=False)

    # -- training ---------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        return [Stage("train", self.config.epochs)]

    def configure_schedulers(
        self, stage: str, optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        # §4.1.5: cosine annealing of both learning rates over the whole run, to lr_min_ratio (0.2) times
        # each one's initial value, so a larger learning rate (the CPU presets) decays by the same 5x.
        return {
            name: torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer,
                T_max=max(1, self.config.epochs),
                eta_min=self.config.lr_min_ratio * optimizer.defaults["lr"],
            )
            for name, optimizer in optimizers.items()
        }

    def configure_optimizers(self, stage: str) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        generators = [p for name, p in self.named_parameters() if not name.startswith("discriminator.")]
        return {
            "main": torch.optim.Adam(generators, lr=c.lr, betas=c.adam_betas, weight_decay=c.weight_decay),
            "discriminator": torch.optim.Adam(
                self.discriminator.parameters(),
                lr=c.lr_discriminator,
                betas=c.adam_betas,
                weight_decay=c.weight_decay_discriminator,
            ),
        }

    def training_step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        if stage != "train":
            raise ValueError(f"unknown stage {stage!r} for method 'squid'; known: train")
        c = self.config
        image = self._image(batch)
        if self.training:
            generator_turn = int(self.iteration) % c.generator_period == 0
            self.iteration += 1
        else:
            # Validation: no counter, no queue write (below); always the generator's loss, the val_loss.
            generator_turn = True

        # On discriminator-only iterations the reconstruction is only D's "fake" input: no graph needed.
        with torch.set_grad_enabled(generator_turn and torch.is_grad_enabled()):
            out = self.generate(image, with_teacher=generator_turn)
        reconstruction = out["reconstruction"]

        # Eqs. 3.10 / 3.12 as binary cross-entropies on logits, D every iteration, on detached fakes.
        real_logit = self.discriminator(image)
        fake_logit = self.discriminator(reconstruction.detach())
        dis = F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit)) + (
            F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
        )
        mse_student = F.mse_loss(reconstruction, image)  # Eq. 3.7
        losses = {"loss_discriminator": c.lambda_dis * dis, "dis_adversarial": dis.detach()}

        if generator_turn:
            # Eq. 3.9, non-saturating: minimise -log D(G_s(E(I))) instead of log(1 - D(G_s(E(I)))).
            gen_logit = self.discriminator(reconstruction)
            gen = F.binary_cross_entropy_with_logits(gen_logit, torch.ones_like(gen_logit))
            loss = c.lambda_s * mse_student + c.lambda_gen * gen
            losses["gen_adversarial"] = gen.detach()
            if self.teacher is not None:
                mse_teacher = F.mse_loss(out["teacher_reconstruction"], image)  # Eq. 3.6
                loss = loss + c.lambda_t * mse_teacher + c.lambda_dist * out["distillation"]
                losses["mse_teacher"] = mse_teacher.detach()
                losses["distillation"] = out["distillation"].detach()
            losses["loss"] = loss  # Eq. 3.11
        losses["mse_student"] = mse_student.detach()

        # §3.2.3: copy this batch's encoder features into the queue, once per generator step (the
        # authors' code: after the generator's optimizer step only, appendix A); never in eval mode.
        if self.training and generator_turn and self.inpainting is not None:
            self.inpainting.write_memory(out["tokens"])
        return losses

    def generate(self, image: Tensor, with_teacher: bool = False) -> dict[str, Tensor]:
        """E, the in-painting block and G_s (and G_t): reconstructions, L_dist and the queue's tokens."""
        c = self.config
        if self.training and c.inpainting_level == "pixel":
            image = self._pixel_mask(image)
        skips = self.encoder(to_patches(image, c.grid))  # per-patch features of every level
        features = skips[-1]
        out: dict[str, Tensor] = {}
        if self.inpainting is not None:
            inpainted, out["tokens"] = self.inpainting(features)
        else:
            inpainted = features
        out["reconstruction"], student_levels = self.student(inpainted, skips)
        if with_teacher and self.teacher is not None:
            if c.stop_gradient:
                # §3.1: no backpropagation between the teacher generator and the encoder.
                skips = [s.detach() for s in skips]
            out["teacher_reconstruction"], teacher_levels = self.teacher(skips[-1], skips)
            # Eq. 3.8 over all generator levels; the teacher side is not detached (code, appendix A).
            out["distillation"] = sum(
                (F.mse_loss(s, t) for s, t in zip(student_levels, teacher_levels, strict=True)),
                start=torch.zeros((), device=image.device),
            )
        return out

    # -- scoring ----------------------------------------------------------------------------

    @torch.no_grad()
    def fit_reference(self, batches: Iterable[Batch]) -> None:
        """Eq. 3.5's mu and sigma: the discriminator's logits on the student's reconstructions of the
        normal training images given (§3.5 says all of them; its footnote allows stopping early); and,
        for ``score="region"``, each grid region's reconstruction error's mean and standard deviation."""
        logits, regions = [], []
        with _evaluating(self):
            for b in batches:
                image = self._image(b)
                reconstruction = self.generate(image)["reconstruction"]
                logits.append(self.discriminator(reconstruction))
                regions.append(self._region_errors(reconstruction_scores(image, reconstruction, "mse")[1]))
        if not logits:
            raise ValueError("fit_reference needs at least one batch of normal training images")
        values = torch.cat(logits).flatten()
        self.score_mean.copy_(values.mean())
        self.score_std.copy_(values.std(unbiased=False).clamp_min(1e-6) if values.numel() > 1 else torch.ones(()))
        errors = torch.cat(regions)
        self.region_mean.copy_(errors.mean(dim=0))
        self.region_std.copy_(
            errors.std(dim=0, unbiased=False).clamp_min(1e-6) if len(errors) > 1 else torch.ones_like(self.region_std)
        )

    @torch.no_grad()
    def score(self, batch: Batch) -> Scores:
        """Sample score (``Config.score``): the student's mean squared error; Eq. 3.5 flipped so that
        higher = more anomalous; or the largest standardised region error. Map: the student's squared error."""
        image = self._image(batch)
        with _evaluating(self):
            reconstruction = self.generate(image)["reconstruction"]
            error, error_map = reconstruction_scores(image, reconstruction, "mse")
            if self.config.score == "reconstruction":
                return Scores(sample=error, map=error_map)
            if self.config.score == "region":
                z = (self._region_errors(error_map) - self.region_mean) / self.region_std
                return Scores(sample=z.max(dim=1).values, map=error_map)
            logit = self.discriminator(reconstruction).flatten()
        sample = torch.sigmoid((self.score_mean - logit) / self.score_std)
        return Scores(sample=sample, map=error_map)

    def _region_errors(self, error_map: Tensor) -> Tensor:
        """(B, 1, H, W) error map -> (B, grid^2): the mean error in each grid region, row-major."""
        grid = self.config.grid
        return to_patches(error_map, grid).flatten(1).mean(dim=1).reshape(-1, grid * grid)

    # -- helpers ----------------------------------------------------------------------------

    def _image(self, batch: Batch) -> Tensor:
        image = batch["image"]
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if image.dim() != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(f"squid expects images of shape (B, {', '.join(map(str, expected))}); got {tuple(image.shape)}")
        return image

    def _pixel_mask(self, image: Tensor) -> Tensor:
        """Table 4.5's pixel-level in-painting: zero each block of (patch / 4)^2 pixels with probability p.

        §4.5 says "parts of the input patches"; the block size is our choice.
        """
        block = max(1, self.config.image_size // self.config.grid // 4)
        size = image.shape[-1] // block
        keep = torch.rand(image.shape[0], 1, size, size, device=image.device) >= self.config.pixel_mask_probability
        return image * F.interpolate(keep.to(image.dtype), scale_factor=block, mode="nearest")


class PatchEncoder(nn.Module):
    """E (Table 3.1): one stride-2 residual unit (conv-BN-ReLU x 2) per level, applied to each patch."""

    def __init__(self, in_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        widths = (in_channels, *channels)
        self.levels = nn.ModuleList(
            ResidualUnit(2, widths[i], widths[i + 1], strides=2, subunits=2, act="RELU", norm="BATCH")
            for i in range(len(channels))
        )

    def forward(self, patches: Tensor) -> list[Tensor]:
        features = []
        for level in self.levels:
            patches = level(patches)
            features.append(patches)
        return features


class Generator(nn.Module):
    """G_s / G_t (Table 3.2), from the deepest level up.

    Each level upsamples the level below it (a stride-2 transposed convolution; the deepest level takes
    the in-painted bottleneck features) and refines it with a residual unit. Two levels carry "S&M": the
    encoder's features of the same resolution are concatenated after the upsampling (skip) and, in the
    student, a space-aware learnable memory with a masked shortcut follows the residual unit. Those levels
    work per patch; after the last memory the patches are merged into one map (§3.7), and the output is a
    transposed convolution and a sigmoid (code).

    Which two levels: Table 3.2 marks its levels 4 and 3, where level 4 has the bottleneck's resolution,
    so its "level-wise skip" would be the un-in-painted bottleneck itself, handed to the student around
    the in-painting block (Eq. 3.4 says the student sees only in-painted features at inference). The
    authors' code (appendix A) never skips the bottleneck: its two S&M ``up`` blocks upsample the
    in-painted bottleneck, concatenate the encoder features of the next-finer level and then apply the
    memory. We follow the code: S&M at the two levels above the deepest (Table 3.2's levels 3 and 2 in our
    channel layout); the deepest level only refines the in-painted features. Every skip is followed by a
    memory in the student, so at inference no raw encoder feature reaches the output except through the
    memories' addressing.
    ``forward`` returns the reconstruction and every level's features (for L_dist, Eq. 3.8).
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        sizes: list[int],
        grid: int,
        skip_connections: bool,
        memory: dict | None,
        space_aware: bool,
        shortcut_probability: float,
    ) -> None:
        super().__init__()
        depth = len(channels)
        self.grid, self.skip_connections, self.space_aware = grid, skip_connections, space_aware
        self.shortcut_probability = shortcut_probability
        # Indices from the deepest level (0) up: the S&M levels, and the last one, after which patches merge.
        self.sm_levels = [index for index in (1, 2) if index < depth]
        self.merge_after = self.sm_levels[-1]
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.memories = nn.ModuleList()
        self.memory_levels: list[int] = []
        for index, level in enumerate(reversed(range(depth))):
            self.ups.append(
                nn.Identity()
                if index == 0
                else Convolution(2, channels[level + 1], channels[level], strides=2, is_transposed=True, act="RELU", norm="BATCH")
            )
            sm = index in self.sm_levels
            width = channels[level] * (2 if skip_connections and sm else 1)
            self.blocks.append(ResidualUnit(2, width, channels[level], subunits=2, act="RELU", norm="BATCH"))
            if memory is not None and sm:
                self.memories.append(SpaceAwareMemoryMatrix(dim=channels[level] * sizes[level] ** 2, **memory))
                self.memory_levels.append(index)
        self.output = Convolution(2, channels[0], in_channels, strides=2, is_transposed=True, conv_only=True)

    def forward(self, features: Tensor, skips: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        levels = []
        x = features
        for index, (up, block) in enumerate(zip(self.ups, self.blocks, strict=True)):
            x = up(x)
            if self.skip_connections and index in self.sm_levels:
                x = torch.cat([x, skips[-1 - index]], dim=1)  # the encoder level of this resolution
            x = block(x)
            if index in self.memory_levels:
                x = self._recall(self.memories[self.memory_levels.index(index)], x)
            levels.append(x)
            if index == self.merge_after:
                # §3.7: "after the last Memory Matrix, the feature patches are put back as a whole".
                x = from_patches(x, self.grid)
        return torch.sigmoid(self.output(x)), levels

    def _recall(self, memory: SpaceAwareMemoryMatrix, x: Tensor) -> Tensor:
        cells = self.grid * self.grid
        queries = x.reshape(-1, cells if self.space_aware else 1, memory.dim)
        recalled = memory(queries).reshape(x.shape)
        # The student's memories carry their own masked shortcut in the authors' code (appendix A).
        return masked_shortcut(x, recalled, "masked", self.shortcut_probability, self.training)


class Discriminator(nn.Module):
    """D (Table 3.3): 5x5 stride-2 convolutions with LeakyReLU(0.2), BN after the first (DCGAN [57];
    kernel and activation from the authors' code), and a linear layer to one logit."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], image_size: int) -> None:
        super().__init__()
        widths = (in_channels, *channels)
        self.features = nn.Sequential(
            *(
                Convolution(2, widths[i], widths[i + 1], strides=2, kernel_size=5, act=LEAKY_RELU, norm=None if i == 0 else "BATCH")
                for i in range(len(channels))
            )
        )
        side = image_size // 2 ** len(channels)
        self.logit = nn.Linear(channels[-1] * side * side, 1)

    def forward(self, image: Tensor) -> Tensor:
        return self.logit(self.features(image).flatten(1))


def to_patches(image: Tensor, grid: int) -> Tensor:
    """(B, C, H, W) -> (B * grid^2, C, H / grid, W / grid), each image's cells consecutive, row-major."""
    b, c, h, w = image.shape
    x = image.reshape(b, c, grid, h // grid, grid, w // grid).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * grid * grid, c, h // grid, w // grid)


def from_patches(patches: Tensor, grid: int) -> Tensor:
    """Inverse of ``to_patches``."""
    n, c, h, w = patches.shape
    x = patches.reshape(n // (grid * grid), grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n // (grid * grid), c, grid * h, grid * w)


@contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode (frozen BN statistics, no masked shortcut) for the block, then the caller's mode back."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
